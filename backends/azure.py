"""Azure Key Vault keys: a key wrapper (mode "wrap") and a remote signer (mode "remote").

How a data key is wrapped. Each wrap reads the key from the vault (`keys/get`: the current
version, or the pinned `key_version`), checks that it is an enabled RSA key whose operations
include both wrapKey and unwrapKey and that is inside its activation dates, then encrypts the data
key with RSA-OAEP-256 under that version's public key through the SDK's CryptographyClient. That
encryption happens on this node: the SDK always does public-key operations locally once it holds
the key (measured: a CryptographyClient built from a key id string fetches the key and wraps
locally too), and RSA-OAEP under the public key is exactly what the vault's wrapKey computes.
Unwrapping needs the private key, which never leaves the vault: `unwrapKey` is always a call to
the vault, authorised by Key Vault RBAC ('Key Vault Crypto User') or an access policy.

The full key id that wrapped a data key, version included, is recorded with it, so after the key
is rotated older records still unwrap with the version that wrapped them; a record naming
another vault is refused before any request, so a stored record can never send this node's
token elsewhere.

The context (kid and cluster prefix). RSA-OAEP has no associated data, so the binding that
matters is the envelope's outer AES-GCM layer, which authenticates the context
(backends/envelope.py): a data key moved to another record does not open that record's
ciphertext. As a cheap early check, a SHA-256 of the canonical context is stored next to the
wrapped key and compared before the vault is asked, so a moved record fails with BackendDenied
without a network call (the hash is not a secret and proves nothing on its own).

Remote signing (AzureKeyVaultSigner). The leader creates one Key Vault key per rotation, named
`<key_name_prefix>-<8 hex of SHA-256(cluster prefix)>-<random>` and tagged keyquorum-prefix =
<cluster prefix>; see the class docstring for the key's life from creation to soft delete.

Shared by both, and by backends/azure_secrets.py: the SDK blocks, so each call runs in an
abandonable worker thread (backends/calls.py) with the SDK's retries off and its socket timeouts
at `attempt_timeout`; one HTTP transport (one connection pool, `VaultConnection`) is shared by
every client of a backend object. Credentials: `credential` injected by the caller (tests), else
tenant_id + client_id + client_secret (a service principal), else azure.identity's
DefaultAzureCredential (environment, workload identity, managed identity - with `client_id`
alone naming a user-assigned managed identity - or the Azure CLI login). `translate_common` maps
the azure-core errors that mean the same for keys and secrets (credentials, 403, throttling,
TLS trust, an unreachable vault); each backend handles its own 400/404/409 first.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.keyvault.keys import (
    KeyClient,
    KeyCurveName,
    KeyOperation,
    KeyProperties,
    KeyType,
    KeyVaultKey,
)
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm, SignatureAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.crypto import b64url_decode, b64url_encode
from backends.base import (
    BackendConfigError,
    BackendDenied,
    BackendError,
    BackendUnavailable,
    RemoteKey,
)
from backends.calls import CallPolicy, in_thread, retry
from backends.envelope import associated_data

T = TypeVar("T")

_OPTIONS = frozenset(
    {
        "vault_url",
        "key_name",
        "key_version",
        "ca_file",
        "tenant_id",
        "client_id",
        "client_secret",
        "timeout",
        "attempt_timeout",
    }
)
ALGORITHM = KeyWrapAlgorithm.rsa_oaep_256
NAME = re.compile(r"[0-9A-Za-z-]{1,127}")  # Key Vault key and secret names
VERSION = re.compile(r"[0-9A-Za-z]{1,64}")  # key and secret versions (32 hex in practice)
_MAX_UNWRAP_CLIENTS = 32  # one per key version seen; versions are few (one per rotation)
_ROLE_HINT = (
    "grant this node's identity the 'Key Vault Crypto User' role on the vault or key (with "
    "access policies instead: the keys/get, keys/wrapKey and keys/unwrapKey permissions)"
)
_CREDENTIAL_HINT = (
    "check the node's Azure credentials: AZURE_TENANT_ID, AZURE_CLIENT_ID and "
    "AZURE_CLIENT_SECRET (or a managed/workload identity), or backend.tenant_id, "
    "backend.client_id and backend.client_secret"
)
_DISABLED_CODES = frozenset({"KeyDisabled", "SecretDisabled"})


def context_digest(context: Mapping[str, str]) -> str:
    """The SHA-256 of the canonical context, stored beside a wrapped key as an early check."""
    return b64url_encode(hashlib.sha256(associated_data(context)).digest())


class VaultConnection:
    """One vault's HTTP transport (one connection pool) and credential, shared by the SDK
    clients of one backend object; `client_options` configure every such client alike."""

    def __init__(
        self,
        policy: CallPolicy,
        credential: TokenCredential,
        *,
        ca_file: str | None = None,
        owns_credential: bool = False,
        verify_challenge_resource: bool = True,
    ) -> None:
        self.credential = credential
        self._owns_credential = owns_credential
        # Creating the transport opens no socket.
        self.transport = RequestsTransport(
            connection_timeout=policy.attempt_timeout,
            read_timeout=policy.attempt_timeout,
            connection_verify=ca_file if ca_file is not None else True,
        )
        self.transport.open()  # the session exists before worker threads share it
        self.client_options: dict[str, Any] = {
            "transport": self.transport,
            "retry_total": 0,  # backends.calls.retry is the only retry loop
            "verify_challenge_resource": verify_challenge_resource,
        }

    def close(self) -> None:
        """Close the connection pool, and the credential if this connection made it."""
        self.transport.close()
        close = getattr(self.credential, "close", None)
        if self._owns_credential and callable(close):
            close()


class AzureKeyVaultWrapper:
    """Wraps data keys with RSA-OAEP-256 under one Key Vault key; unwrapKey runs in the vault."""

    kind = "azure-keyvault"

    def __init__(
        self,
        vault_url: str,
        key_name: str,
        policy: CallPolicy,
        credential: TokenCredential,
        *,
        key_version: str | None = None,
        ca_file: str | None = None,
        owns_credential: bool = False,
        verify_challenge_resource: bool = True,
    ) -> None:
        self.vault_url = vault_url
        self.key_name = key_name
        self.key_version = key_version
        self.policy = policy
        self._connection = VaultConnection(
            policy,
            credential,
            ca_file=ca_file,
            owns_credential=owns_credential,
            verify_challenge_resource=verify_challenge_resource,
        )
        self._credential = credential
        self._client_options = self._connection.client_options
        self._keys = KeyClient(vault_url, credential, **self._client_options)
        self._unwrappers: dict[str, CryptographyClient] = {}

    async def wrap_data_key(self, data_key: bytes, context: Mapping[str, str]) -> dict[str, str]:
        where = f"{self.vault_url}/keys/{self.key_name}" + (
            f"/{self.key_version}" if self.key_version else ""
        )

        def call() -> tuple[str, bytes]:
            key = self._keys.get_key(self.key_name, self.key_version)
            self._check_usable(key, where)
            crypto = CryptographyClient(key, self._credential, **self._client_options)
            result = crypto.wrap_key(ALGORITHM, data_key)
            return str(result.key_id or key.id), result.encrypted_key

        key_id, wrapped = await self._call(call, f"wrapKey with {where}", wrapping=True)
        self._parse_key_id(key_id, "the vault answered with")  # a versioned id in this vault
        return {
            "key_id": key_id,
            "alg": ALGORITHM.value,
            "wrapped_key": b64url_encode(wrapped),
            "context_sha256": context_digest(context),
        }

    async def unwrap_data_key(
        self, wrapped: Mapping[str, str], context: Mapping[str, str]
    ) -> bytes:
        kid = context.get("keyquorum:kid", "?")
        try:
            key_id, alg = wrapped["key_id"], wrapped["alg"]
            blob = b64url_decode(wrapped["wrapped_key"])
            digest = wrapped["context_sha256"]
            if not isinstance(key_id, str) or not isinstance(digest, str) or not blob:
                raise ValueError("empty field")
        except (KeyError, ValueError, TypeError):
            raise BackendDenied(
                f"the wrapped data key of {kid} is malformed (no Key Vault key id, wrapped key "
                "or context digest)"
            ) from None
        if alg != ALGORITHM.value:
            raise BackendDenied(f"the data key of {kid} was wrapped with unknown algorithm {alg!r}")
        if not hmac.compare_digest(digest, context_digest(context)):
            raise BackendDenied(
                f"the wrapped data key of {kid} belongs to another kid or cluster prefix (its "
                "context digest does not match)",
                "a sealed key cannot be copied between records or clusters",
            )
        self._parse_key_id(key_id, f"the data key of {kid} names")
        crypto = self._unwrapper(key_id)

        def call() -> bytes:
            return crypto.unwrap_key(ALGORITHM, blob).key

        plaintext = await self._call(call, f"unwrapKey of {kid} with {key_id}", wrapping=False)
        if len(plaintext) != 32:
            raise BackendDenied(f"unwrapKey of {kid} returned no 32-byte data key")
        return plaintext

    def _unwrapper(self, key_id: str) -> CryptographyClient:
        """A client per key version (built on the trio thread: construction does no I/O)."""
        crypto = self._unwrappers.get(key_id)
        if crypto is None:
            if len(self._unwrappers) >= _MAX_UNWRAP_CLIENTS:
                self._unwrappers.pop(next(iter(self._unwrappers)))
            # From the id string: the SDK fetches the public key once, then unwrapKey is remote.
            crypto = CryptographyClient(key_id, self._credential, **self._client_options)
            self._unwrappers[key_id] = crypto
        return crypto

    @property
    def _key_setting(self) -> str:
        """The option that names the key used for wrapping: what to fix when it is missing."""
        return "backend.key_version" if self.key_version else "backend.key_name"

    def _check_usable(self, key: KeyVaultKey, where: str) -> None:
        """Refuse a key that could wrap but not unwrap, or that the vault would refuse to use."""
        setting = self._key_setting
        kty = key.key_type
        if kty not in (KeyType.rsa, KeyType.rsa_hsm):
            raise BackendConfigError(
                f"{setting}: {where} is a {kty} key; RSA-OAEP-256 needs an RSA key",
                "create an RSA (2048 bits or more) key and point backend.key_name at it",
            )
        ops = set(key.key_operations or ())
        missing = sorted({"wrapKey", "unwrapKey"} - ops)
        if missing:
            raise BackendConfigError(
                f"{setting}: {where} does not permit {' and '.join(missing)} (key_ops: "
                f"{', '.join(sorted(ops)) or 'none'})",
                "allow the wrapKey and unwrapKey operations on the key (az keyvault key "
                "set-attributes --ops wrapKey unwrapKey ...)",
            )
        props = key.properties
        now = datetime.now(UTC)
        if props.enabled is False:
            raise BackendDenied(
                f"wrapKey with {where}: key version {props.version} is disabled",
                "enable it (az keyvault key set-attributes --enabled true) or rotate the key",
            )
        if (props.not_before and now < props.not_before) or (
            props.expires_on and now >= props.expires_on
        ):
            raise BackendDenied(
                f"wrapKey with {where}: key version {props.version} is outside its activation "
                "dates",
                "rotate the key or change its not-before/expiry dates",
            )

    def _parse_key_id(self, key_id: str, what: str) -> str:
        """The version of a full key id in this vault, or BackendDenied saying why not."""
        try:
            parts = urlsplit(key_id)
            path = parts.path.strip("/").split("/")
            ok = parts.scheme == "https" and not parts.query and not parts.fragment
            origin = _origin(parts.hostname or "", parts.port)
        except ValueError:
            ok, path, origin = False, [], ""
        if not ok or len(path) != 3 or path[0] != "keys" or not VERSION.fullmatch(path[2]):
            raise BackendDenied(f"{what} {key_id!r}, which is not a versioned Key Vault key id")
        if origin != _origin_of(self.vault_url):
            raise BackendDenied(
                f"{what} a key in vault {origin}, but this agent is configured with "
                f"{self.vault_url}",
                "set backend.vault_url to the vault that protected the key set",
            )
        return path[2]

    async def _call(self, fn: Callable[[], T], what: str, *, wrapping: bool) -> T:
        async def attempt() -> T:
            try:
                return await in_thread(fn)
            except BackendError:
                raise
            except Exception as exc:  # noqa: BLE001 - every SDK error is translated here
                raise _translate(exc, what, wrapping=wrapping, setting=self._key_setting) from None

        return await retry(attempt, what=what, policy=self.policy)

    def describe(self) -> str:
        pinned = f" (version {self.key_version})" if self.key_version else ""
        return f"Azure Key Vault key {self.vault_url}/{self.key_name}{pinned}"

    def close(self) -> None:
        """Close the connection pool (and a credential this wrapper made); not needed to exit."""
        self._connection.close()

    def __repr__(self) -> str:
        return f"AzureKeyVaultWrapper(vault_url={self.vault_url!r}, key_name={self.key_name!r})"


def _origin(host: str, port: int | None) -> str:
    return f"https://{host.lower()}" + (f":{port}" if port not in (None, 443) else "")


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return _origin(parts.hostname or "", parts.port)


def _translate(
    exc: Exception, what: str, *, wrapping: bool, setting: str = "backend.key_name"
) -> BackendError:
    """The key wrapper's one place mapping azure-core's exceptions to the backend errors.

    `setting` is the option a missing key at wrap time points at (key_name, or key_version when
    the version is pinned).
    """
    if isinstance(exc, ResourceNotFoundError):
        if wrapping:
            return BackendConfigError(
                f"{setting}: {what}: the vault has no such key ({error_reason(exc)})",
                "set backend.key_name (and backend.key_version, if pinned) to an existing RSA "
                "key in backend.vault_url",
            )
        return BackendDenied(
            f"{what}: the key version that wrapped this data key no longer exists "
            f"({error_reason(exc)})",
            "a deleted key can be recovered within its retention period (az keyvault key recover)",
        )
    if isinstance(exc, HttpResponseError) and not isinstance(exc, ClientAuthenticationError):
        status = exc.status_code or 0
        if status == 400 and not wrapping:
            return BackendDenied(
                f"{what}: Key Vault refused the wrapped key ({error_reason(exc)}: tampered, or not "
                "wrapped by this key version)"
            )
        if _is_client_error(status):
            return (BackendConfigError if wrapping else BackendDenied)(
                f"{what}: Key Vault answered {status} ({error_reason(exc)})",
                "check backend.vault_url and backend.key_name" if wrapping else "",
            )
    return translate_common(exc, what, denied_hint=_ROLE_HINT)


def _is_client_error(status: int) -> bool:
    """A 4xx about the request itself (not 403 or throttling, which mean the same for all)."""
    return 400 <= status < 500 and status not in (403, 429)


def translate_common(exc: Exception, what: str, *, denied_hint: str) -> BackendError:
    """The azure-core errors that mean the same for every Key Vault backend: credentials, 403
    (`denied_hint` names the role and permission the operation needs), a disabled key or
    secret version, throttling and 5xx, TLS trust, an unreachable vault, a challenge for another
    resource. Callers map their own 400/404/409 meanings first."""
    if isinstance(exc, ClientAuthenticationError):  # before HttpResponseError: a subclass
        return BackendConfigError(
            f"{what}: Azure rejected or could not get the credentials ({_first_line(exc)})",
            _CREDENTIAL_HINT,
        )
    if isinstance(exc, HttpResponseError):
        status = exc.status_code or 0
        if status == 403 and is_disabled(exc):
            return BackendDenied(
                f"{what}: the version is disabled ({error_reason(exc)})",
                "the vault refuses every use of a disabled version; enable it again (az keyvault "
                "... set-attributes --enabled true) only if it was disabled by mistake",
            )
        if status == 403:
            return BackendDenied(f"{what}: access denied ({error_reason(exc)})", denied_hint)
        if status == 429 or status >= 500:
            return BackendUnavailable(f"{what}: Key Vault is throttling or failing ({status})")
        if status == 0:  # no HTTP answer at all (a broken stream)
            return BackendUnavailable(f"{what}: {type(exc).__name__}: {_first_line(exc)}")
        return BackendDenied(f"{what}: Key Vault answered {status} ({error_reason(exc)})")
    if isinstance(exc, ServiceRequestError) and _is_certificate_error(exc):
        return BackendConfigError(
            f"backend.ca_file: {what}: the vault's TLS certificate is not trusted "
            f"({_first_line(exc)})",
            "set backend.ca_file to the CA bundle that signs the vault's certificate (only for "
            "a TLS-inspecting proxy or a test vault)",
        )
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return BackendUnavailable(
            f"{what}: cannot reach Key Vault ({type(exc).__name__})",
            "is the vault reachable from this node (DNS, firewall, private endpoint)?",
        )
    if isinstance(exc, ValueError) and "challenge" in str(exc):
        return BackendConfigError(
            f"backend.vault_url: {what}: the vault's authentication challenge does not match "
            f"its URL ({exc})",
            "set backend.vault_url to the vault's URI, https://<name>.vault.azure.net",
        )
    if isinstance(exc, AzureError):
        return BackendUnavailable(f"{what}: {type(exc).__name__}: {_first_line(exc)}")
    return BackendUnavailable(f"{what}: unexpected {type(exc).__name__}: {_first_line(exc)}")


def is_disabled(exc: HttpResponseError) -> bool:
    """Whether a 403 is Key Vault refusing a disabled key or secret version (not RBAC): the
    service answers {"code": "Forbidden", "message": "Operation get is not allowed on a disabled
    secret.", "innererror": {"code": "SecretDisabled"}} (KeyDisabled for keys)."""
    error = exc.error
    if error is None:
        return False
    inner = error.innererror or {}
    if str(inner.get("code", "")) in _DISABLED_CODES:
        return True
    return "is not allowed on a disabled" in (error.message or "")


def error_reason(exc: HttpResponseError) -> str:
    """Key Vault's error code and message, e.g. "Forbidden: Caller is not authorized ..."."""
    error = exc.error
    if error is not None and error.code:
        return f"{error.code}: {_first_line(error.message or '')}".rstrip(": ")
    return exc.reason or str(exc.status_code)


def _first_line(exc: object) -> str:
    text = (getattr(exc, "message", None) or str(exc)).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= 200 else line[:197] + "..."


def _is_certificate_error(exc: BaseException) -> bool:
    """Whether a transport error is, somewhere down its chain, a failed certificate check."""
    stack, seen = [exc], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        links = (
            getattr(current, "inner_exception", None),
            getattr(current, "reason", None),  # urllib3's MaxRetryError
            current.__cause__,
            current.__context__,
            *current.args,
        )
        stack.extend(link for link in links if isinstance(link, BaseException))
    return False


def string_option(
    options: Mapping[str, Any], name: str, *, kind: str = "azure-keyvault", required: bool = False
) -> str | None:
    """A non-empty string setting, None when absent and optional; else BackendConfigError."""
    value = options.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise BackendConfigError(
            f"backend.{name}: {f'required for kind {kind}; ' if required else ''}must be "
            "a non-empty string",
            {
                "vault_url": "the vault's URI, e.g. https://my-vault.vault.azure.net",
                "key_name": "the name of an RSA key in the vault",
                "secret_name": "the name of the secret that keeps this cluster's keys",
            }.get(name, ""),
        )
    return value


def _vault_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        parts = None
    if parts is not None and parts.scheme == "http":
        raise BackendConfigError(
            f"backend.vault_url: {value!r} is plain http; the Key Vault SDK sends bearer tokens "
            "only over TLS",
            "use the vault's https:// URI (for a test vault with a private CA, set "
            "backend.ca_file)",
        )
    if (
        parts is None
        or parts.scheme != "https"
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
    ):
        raise BackendConfigError(
            f"backend.vault_url: {value!r} is not a vault URI",
            "use the vault's URI without a path, e.g. https://my-vault.vault.azure.net",
        )
    return f"https://{parts.netloc}"


def _credential_from(options: Mapping[str, Any]) -> TokenCredential:
    tenant_id = string_option(options, "tenant_id")
    client_id = string_option(options, "client_id")
    client_secret = string_option(options, "client_secret")
    if client_secret is not None:
        if tenant_id is None or client_id is None:
            raise BackendConfigError(
                "backend.client_secret: needs backend.tenant_id and backend.client_id too",
                "set all three for a service principal, or none to use the environment or a "
                "managed identity",
            )
        from azure.identity import ClientSecretCredential

        return ClientSecretCredential(tenant_id, client_id, client_secret)
    if tenant_id is not None:
        raise BackendConfigError(
            "backend.tenant_id: only used with backend.client_id and backend.client_secret",
            "set all three for a service principal, or AZURE_TENANT_ID for other credentials",
        )
    from azure.identity import DefaultAzureCredential

    if client_id is not None:  # a user-assigned managed (or workload) identity
        return DefaultAzureCredential(managed_identity_client_id=client_id)
    return DefaultAzureCredential()


@dataclass(frozen=True, slots=True)
class VaultSettings:
    """The settings every Key Vault backend shares, checked; `credential` is built or injected.

    No repr of the credential: it may hold a client secret.
    """

    vault_url: str
    policy: CallPolicy
    credential: TokenCredential = field(repr=False)
    ca_file: str | None
    owns_credential: bool
    verify_challenge_resource: bool

    def connect(self) -> VaultConnection:
        """A new connection pool with these settings (no request is made)."""
        return VaultConnection(
            self.policy,
            self.credential,
            ca_file=self.ca_file,
            owns_credential=self.owns_credential,
            verify_challenge_resource=self.verify_challenge_resource,
        )


def vault_settings(
    options: Mapping[str, Any],
    *,
    kind: str,
    credential: TokenCredential | None,
    verify_challenge_resource: bool,
) -> VaultSettings:
    """Check vault_url, ca_file, timeout, attempt_timeout and the credential settings (the
    caller refuses unknown options first); builds a credential unless one is injected."""
    raw_url = string_option(options, "vault_url", kind=kind, required=True)
    assert raw_url is not None
    vault_url = _vault_url(raw_url)
    ca_file = string_option(options, "ca_file")
    if ca_file is not None and not Path(ca_file).is_file():
        raise BackendConfigError(
            f"backend.ca_file: {ca_file} is not a readable file",
            "point it at a PEM bundle of the CA that signs the vault's certificate",
        )
    policy = CallPolicy.from_options(options)
    owns = credential is None
    if credential is None:
        credential = _credential_from(options)
    else:
        for name in ("tenant_id", "client_id", "client_secret"):
            if name in options:
                raise BackendConfigError(f"backend.{name}: not used with an injected credential")
    return VaultSettings(
        vault_url,
        policy,
        credential,
        ca_file,
        owns,
        verify_challenge_resource=verify_challenge_resource,
    )


def build(
    options: Mapping[str, Any],
    *,
    credential: TokenCredential | None = None,
    verify_challenge_resource: bool = True,
) -> AzureKeyVaultWrapper:
    """Options: vault_url, key_name (required), key_version, ca_file, tenant_id, client_id,
    client_secret, timeout, attempt_timeout. `credential` and `verify_challenge_resource`
    (off only for a test vault on 127.0.0.1) are for callers in code, not the config file.
    No request is made here: the first wrap or unwrap reaches the vault.
    """
    unknown = set(options) - _OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for kind 'azure-keyvault'",
            f"the azure-keyvault backend takes {', '.join(sorted(_OPTIONS))}",
        )
    string_option(options, "vault_url", required=True)
    key_name = string_option(options, "key_name", required=True)
    assert key_name is not None
    if not NAME.fullmatch(key_name):
        raise BackendConfigError(
            f"backend.key_name: {key_name!r} is not a Key Vault key name",
            "key names are 1-127 letters, digits and dashes",
        )
    key_version = string_option(options, "key_version")
    if key_version is not None and not VERSION.fullmatch(key_version):
        raise BackendConfigError(
            f"backend.key_version: {key_version!r} is not a key version",
            "use the 32-character version from the key id, or leave it unset for the current "
            "version",
        )
    settings = vault_settings(
        options,
        kind="azure-keyvault",
        credential=credential,
        verify_challenge_resource=verify_challenge_resource,
    )
    return AzureKeyVaultWrapper(
        settings.vault_url,
        key_name,
        settings.policy,
        settings.credential,
        key_version=key_version,
        ca_file=settings.ca_file,
        owns_credential=settings.owns_credential,
        verify_challenge_resource=settings.verify_challenge_resource,
    )


# ---- remote signing: one Key Vault key per rotation (backend.mode = "remote") ----------------


@dataclass(frozen=True, slots=True)
class _KeySpec:
    """How a JWS algorithm maps onto a Key Vault key and its sign operation."""

    curve: KeyCurveName | None  # EC keys; None: RSA
    rsa_size: int
    algorithm: SignatureAlgorithm
    hash_name: str  # the digest this node computes and the vault signs
    signature_size: int  # EC: raw r||s length (Key Vault returns that, not DER); RSA: 0


_SPECS: dict[str, _KeySpec] = {
    "ES256": _KeySpec(KeyCurveName.p_256, 0, SignatureAlgorithm.es256, "sha256", 64),
    "ES384": _KeySpec(KeyCurveName.p_384, 0, SignatureAlgorithm.es384, "sha384", 96),
    "RS256": _KeySpec(None, 2048, SignatureAlgorithm.rs256, "sha256", 0),
    "PS256": _KeySpec(None, 2048, SignatureAlgorithm.ps256, "sha256", 0),
}
_CURVES: dict[str, type[ec.EllipticCurve]] = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}
PREFIX_TAG = "keyquorum-prefix"
_MAX_TAG_VALUE = 256
_SIGN_OPERATIONS: list[str | KeyOperation] = [KeyOperation.sign, KeyOperation.verify]
_MAX_KEY_NAME_PREFIX = 127 - len("-01234567-") - 16  # names: prefix, cluster hash, 16 random hex
_MAX_SIGNING_CLIENTS = 64  # one per key in use; a key set holds a handful
_SIGNER_OPTIONS = frozenset(
    {
        "vault_url",
        "key_name_prefix",
        "ca_file",
        "tenant_id",
        "client_id",
        "client_secret",
        "timeout",
        "attempt_timeout",
    }
)
_OFFICER = "the 'Key Vault Crypto Officer' role on the vault (the leader creates and deletes keys)"
_USER = "the 'Key Vault Crypto User' role on the vault or key"
_SIGNER_HINTS = {
    "create": f"grant this node's identity {_OFFICER}; with access policies, keys/create",
    "delete": f"grant this node's identity {_OFFICER}; with access policies, keys/delete",
    "list": f"grant this node's identity {_USER}; with access policies, keys/list",
    "get": f"grant this node's identity {_USER}; with access policies, keys/get",
    "sign": f"grant this node's identity {_USER}; with access policies, the keys/sign permission",
}


class AzureKeyVaultSigner:
    """Creates a Key Vault key per rotation, tagged with the cluster prefix, and signs with it
    in the vault (keys/sign); retired keys are soft-deleted.

    Keys. EC P-256 (ES256), EC P-384 (ES384) or RSA 2048 (RS256, PS256; Key Vault's PS256 salt
    is the hash length, as JWS wants); Key Vault has no Ed25519, so EdDSA is not supported. The
    key operations are sign and verify only, and the key is not exportable: the exportable
    attribute is left out (it defaults to false; setting it belongs to Secure Key Release on
    premium vaults), so the private key never leaves the vault. A name is
    `<key_name_prefix>-<8 hex of SHA-256(cluster prefix)>-<16 random hex>`, fresh for every
    attempt: a create that timed out but happened leaves an orphan under another name (retired
    by the leader later), never a second version of the key the key set names.

    References are {"key_name", "key_version"}: the version pins signing to the key the record
    was published with, and is always the key's oldest version, so `owned_keys` (which lists
    the key's versions) reports the very reference `create_key` returned even if someone added
    a version in the vault. The public key is the JWK the vault returns, as PEM.

    Signing. The digest (SHA-256 or SHA-384 of the message) is computed here and sent to the
    vault's sign operation through the SDK's CryptographyClient; Key Vault returns EC signatures
    already as JWS raw r||s (not DER, unlike AWS/GCP/Vault) and RSA ones as PKCS#1 bytes. One
    client per key is kept; made from the key that `public_key` or `create_key` read, it signs
    without fetching the key again (made from a bare reference, it reads the key once).

    Retirement is Key Vault's soft delete (keys/delete, not waited for): the key leaves the
    vault's key list at once and can no longer sign. The vault's retention period (7-90 days)
    and purge protection govern when it is finally purged; until then an operator can recover
    it (az keyvault key recover).
    """

    kind = "azure-keyvault"

    def __init__(self, settings: VaultSettings, key_name_prefix: str) -> None:
        self.vault_url = settings.vault_url
        self.key_name_prefix = key_name_prefix
        self.policy = settings.policy
        self._connection = settings.connect()
        self._keys = KeyClient(
            self.vault_url, settings.credential, **self._connection.client_options
        )
        self._signers: dict[tuple[str, str], CryptographyClient] = {}

    def supports(self, alg: str) -> bool:
        return alg in _SPECS

    def _names_for(self, prefix: str) -> str:
        return f"{self.key_name_prefix}-{hashlib.sha256(prefix.encode()).hexdigest()[:8]}-"

    async def create_key(self, alg: str, prefix: str) -> RemoteKey:
        spec = _spec(alg)
        if len(prefix) > _MAX_TAG_VALUE:
            raise BackendConfigError(
                f"store.prefix: {len(prefix)} characters; a Key Vault tag value (the "
                f"{PREFIX_TAG} tag that finds this cluster's keys) holds at most {_MAX_TAG_VALUE}",
                "choose a shorter store.prefix for a cluster with Azure Key Vault remote keys",
            )
        start = self._names_for(prefix)
        tags = {PREFIX_TAG: prefix}

        def call() -> KeyVaultKey:
            name = start + secrets.token_hex(8)  # per attempt: see the class docstring
            if spec.curve is not None:
                return self._keys.create_ec_key(
                    name, curve=spec.curve, key_operations=_SIGN_OPERATIONS, tags=tags
                )
            return self._keys.create_rsa_key(
                name, size=spec.rsa_size, key_operations=_SIGN_OPERATIONS, tags=tags
            )

        key = await self._call(call, f"create {alg} key {start}*", "create")
        name, version = key.name, key.properties.version
        if not name or not version:
            raise BackendUnavailable(f"create {alg} key {start}*: no key id in the answer")
        self._remember(key)
        return RemoteKey(
            {"key_name": name, "key_version": version},
            _public_pem(key, f"key {name}/{version}"),
            _millis(key.properties.created_on),
        )

    async def public_key(self, ref: Mapping[str, str]) -> bytes:
        name, version = self._ref(ref)
        key = await self._call(
            lambda: self._keys.get_key(name, version), f"get key {name}/{version}", "get"
        )
        self._remember(key)
        return _public_pem(key, f"key {name}/{version}")

    async def sign(self, ref: Mapping[str, str], alg: str, data: bytes) -> bytes:
        spec = _spec(alg)
        name, version = self._ref(ref)
        crypto = self._signers.get((name, version))
        if crypto is None:  # built on the trio thread: construction does no I/O
            # From the id string, the SDK reads the key once (keys/get) before the first sign.
            crypto = CryptographyClient(
                f"{self.vault_url}/keys/{name}/{version}",
                self._connection.credential,
                **self._connection.client_options,
            )
            self._cache((name, version), crypto)
        digest = hashlib.new(spec.hash_name, data).digest()
        what = f"sign with key {name}/{version}"
        result = await self._call(lambda: crypto.sign(spec.algorithm, digest), what, "sign")
        signature = bytes(result.signature)
        if spec.signature_size and len(signature) != spec.signature_size:
            raise BackendDenied(
                f"{what}: a {len(signature)}-byte {alg} signature, not {spec.signature_size} "
                "bytes of r||s",
                "is the reference's key of another type than the key record's algorithm?",
            )
        return signature

    async def owned_keys(self, prefix: str) -> list[RemoteKey]:
        """Keys named for `prefix` whose first version carries the keyquorum-prefix tag for
        it and is enabled (deleted keys are not listed by the vault). One keys/list of the
        whole vault (25 keys a page), then one list of versions per key so named: tags and the
        enabled flag are per version, and the first version is the one a reference names."""
        start = self._names_for(prefix)

        def listing() -> list[str]:
            return [
                p.name
                for p in self._keys.list_properties_of_keys()
                if p.name.startswith(start) and not p.managed
            ]

        owned = []
        for name in await self._call(listing, f"list keys {start}*", "list"):

            def versions(name: str = name) -> list[KeyProperties]:
                return list(self._keys.list_properties_of_key_versions(name))

            tagged = [
                v
                for v in await self._call(versions, f"list versions of key {name}", "list")
                if v.version and (v.tags or {}).get(PREFIX_TAG) == prefix
            ]
            if not tagged:
                continue  # made by hand, or deleted since the first listing
            # Created times are whole seconds: the version string breaks a (hand-made) tie.
            first = min(tagged, key=lambda v: (_millis(v.created_on) or 0, str(v.version)))
            if first.enabled is False:
                continue
            owned.append(
                RemoteKey(
                    {"key_name": name, "key_version": str(first.version)},
                    b"",
                    _millis(first.created_on),
                )
            )
        return owned

    async def retire(self, ref: Mapping[str, str]) -> None:
        """Soft-delete the key (every version); a key already deleted counts as retired. The
        vault's retention period and purge protection govern its final purge."""
        name, _ = self._ref(ref)

        def call() -> None:
            # Not found: deleted by an attempt whose answer was lost (retire is idempotent).
            with contextlib.suppress(ResourceNotFoundError):
                self._keys.begin_delete_key(name)  # the DELETE is sent now; not waited for

        await self._call(call, f"delete key {name}", "delete")
        for cached in [k for k in self._signers if k[0] == name]:
            self._signers.pop(cached)

    def _ref(self, ref: Mapping[str, str]) -> tuple[str, str]:
        """The key name and version a reference names, if it is one of this agent's keys."""
        name, version = ref.get("key_name"), ref.get("key_version")
        if (
            not isinstance(name, str)
            or not NAME.fullmatch(name)
            or not name.startswith(f"{self.key_name_prefix}-")
        ):
            raise BackendDenied(
                f"remote key {name!r} is not one of this agent's Key Vault keys",
                "backend.key_name_prefix must match the one the key set was created with",
            )
        if not isinstance(version, str) or not VERSION.fullmatch(version):
            raise BackendDenied(f"remote key {name}: {version!r} is not a key version")
        return name, version

    def _remember(self, key: KeyVaultKey) -> None:
        """Keep a signing client made from a key just read: it will not read it again."""
        name, version = key.name, key.properties.version
        if name and version and (name, version) not in self._signers:
            crypto = CryptographyClient(
                key, self._connection.credential, **self._connection.client_options
            )
            self._cache((name, version), crypto)

    def _cache(self, where: tuple[str, str], crypto: CryptographyClient) -> None:
        if len(self._signers) >= _MAX_SIGNING_CLIENTS:
            self._signers.pop(next(iter(self._signers)))
        self._signers[where] = crypto

    async def _call(self, fn: Callable[[], T], what: str, action: str) -> T:
        async def attempt() -> T:
            try:
                return await in_thread(fn)
            except BackendError:
                raise
            except Exception as exc:  # noqa: BLE001 - every SDK error is translated here
                raise _translate_signer(exc, what, action) from None

        return await retry(attempt, what=what, policy=self.policy)

    def describe(self) -> str:
        return f"Azure Key Vault {self.vault_url}, one key per rotation ({self.key_name_prefix}-*)"

    def close(self) -> None:
        """Close the connection pool (and a credential this signer made); not needed to exit."""
        self._connection.close()

    def __repr__(self) -> str:
        return (
            f"AzureKeyVaultSigner(vault_url={self.vault_url!r}, "
            f"key_name_prefix={self.key_name_prefix!r})"
        )


def _translate_signer(exc: Exception, what: str, action: str) -> BackendError:
    """The remote signer's one place mapping azure-core's exceptions to the backend errors;
    `action` (create, get, sign, list, delete) picks the role and permission a 403 names."""
    if isinstance(exc, ResourceNotFoundError):
        return BackendDenied(
            f"{what}: the vault has no such key ({error_reason(exc)})",
            "a deleted key can be recovered within the vault's retention period (az keyvault key "
            "recover); is backend.vault_url the vault that holds the key set's keys?",
        )
    if isinstance(exc, HttpResponseError) and not isinstance(exc, ClientAuthenticationError):
        status = exc.status_code or 0
        if action == "create" and _is_client_error(status):
            return BackendConfigError(
                f"backend.vault_url: {what}: the vault refused to create the key "
                f"({status}: {error_reason(exc)})",
                "backend.vault_url must name a Key Vault that allows software EC and RSA keys "
                "with tags (not a Managed HSM)",
            )
        if _is_client_error(status):
            return BackendDenied(f"{what}: Key Vault refused the request ({error_reason(exc)})")
    return translate_common(exc, what, denied_hint=_SIGNER_HINTS[action])


def _spec(alg: str) -> _KeySpec:
    spec = _SPECS.get(alg)
    if spec is None:
        raise BackendConfigError(
            f"keys.algorithm: Azure Key Vault cannot hold {alg} keys",
            f"choose one of {', '.join(sorted(_SPECS))} (Key Vault has no Ed25519 keys)",
        )
    return spec


def _public_pem(key: KeyVaultKey, where: str) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of the public JWK the vault returned for a key."""
    jwk = key.key

    def number(name: str) -> int:
        value = getattr(jwk, name, None)
        if not isinstance(value, bytes) or not value:
            raise ValueError(f"no {name}")
        return int.from_bytes(value, "big")

    public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    try:
        kty = getattr(jwk, "kty", None)
        if kty in (KeyType.ec, KeyType.ec_hsm):
            crv = getattr(jwk, "crv", None)
            crv = getattr(crv, "value", crv)  # the SDK's JsonWebKeyCurveName enum, or a string
            curve = _CURVES.get(crv) if isinstance(crv, str) else None
            if curve is None:
                raise ValueError(f"curve {crv}")
            public = ec.EllipticCurvePublicNumbers(number("x"), number("y"), curve()).public_key()
        elif kty in (KeyType.rsa, KeyType.rsa_hsm):
            public = rsa.RSAPublicNumbers(number("e"), number("n")).public_key()
        else:
            raise ValueError(f"key type {kty}")
    except ValueError as exc:
        raise BackendDenied(f"{where}: the vault returned no usable public key ({exc})") from None
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _millis(value: datetime | None) -> int | None:
    return int(value.timestamp() * 1000) if value is not None else None


def build_signer(
    options: Mapping[str, Any],
    *,
    credential: TokenCredential | None = None,
    verify_challenge_resource: bool = True,
) -> AzureKeyVaultSigner:
    """Options: vault_url (required), key_name_prefix (default "keyquorum"), ca_file,
    tenant_id, client_id, client_secret, timeout, attempt_timeout. `credential` and
    `verify_challenge_resource` are for callers in code (tests), as for `build`. No request
    is made here."""
    for name in ("key_name", "key_version"):
        if name in options:
            raise BackendConfigError(
                f"backend.{name}: not used with mode = 'remote' (the leader creates a Key Vault "
                "key per rotation)",
                "set backend.key_name_prefix instead, or use mode = 'wrap' to wrap keys under "
                "that key",
            )
    unknown = set(options) - _SIGNER_OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for remote azure-keyvault",
            f"remote azure-keyvault takes {', '.join(sorted(_SIGNER_OPTIONS))}",
        )
    key_name_prefix = options.get("key_name_prefix", "keyquorum")
    if (
        not isinstance(key_name_prefix, str)
        or not NAME.fullmatch(key_name_prefix)
        or len(key_name_prefix) > _MAX_KEY_NAME_PREFIX
    ):
        raise BackendConfigError(
            f"backend.key_name_prefix: {key_name_prefix!r} must be 1-{_MAX_KEY_NAME_PREFIX} "
            "letters, digits or dashes",
            "Key Vault key names are letters, digits and dashes",
        )
    settings = vault_settings(
        options,
        kind="azure-keyvault",
        credential=credential,
        verify_challenge_resource=verify_challenge_resource,
    )
    return AzureKeyVaultSigner(settings, key_name_prefix)
