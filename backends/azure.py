"""Azure Key Vault key wrapper: data keys wrapped with RSA-OAEP-256 under a Key Vault RSA key.

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

The SDK blocks, so each call runs in an abandonable worker thread (backends/calls.py) with the
SDK's retries off and its socket timeouts at `attempt_timeout`; one HTTP transport (one
connection pool) is shared by every client of a wrapper. Credentials: `credential` injected by
the caller (tests), else tenant_id + client_id + client_secret (a service principal), else
azure.identity's DefaultAzureCredential (environment, workload identity, managed identity - with
`client_id` alone naming a user-assigned managed identity - or the Azure CLI login).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl
from collections.abc import Callable, Mapping
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
from azure.keyvault.keys import KeyClient, KeyType, KeyVaultKey
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm

from agent.crypto import b64url_decode, b64url_encode
from backends.base import BackendConfigError, BackendDenied, BackendError, BackendUnavailable
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
_KEY_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
_KEY_VERSION = re.compile(r"[0-9A-Za-z]{1,64}")
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


def context_digest(context: Mapping[str, str]) -> str:
    """The SHA-256 of the canonical context, stored beside a wrapped key as an early check."""
    return b64url_encode(hashlib.sha256(associated_data(context)).digest())


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
        self._credential = credential
        self._owns_credential = owns_credential
        # One connection pool for every client of this wrapper; creating it opens no socket.
        self._transport = RequestsTransport(
            connection_timeout=policy.attempt_timeout,
            read_timeout=policy.attempt_timeout,
            connection_verify=ca_file if ca_file is not None else True,
        )
        self._transport.open()  # the session exists before worker threads share it
        self._client_options: dict[str, Any] = {
            "transport": self._transport,
            "retry_total": 0,  # backends.calls.retry is the only retry loop
            "verify_challenge_resource": verify_challenge_resource,
        }
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
        if not ok or len(path) != 3 or path[0] != "keys" or not _KEY_VERSION.fullmatch(path[2]):
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
        self._transport.close()
        close = getattr(self._credential, "close", None)
        if self._owns_credential and callable(close):
            close()

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
    """One place mapping azure-core's exceptions to the backend error hierarchy.

    `setting` is the option a missing key at wrap time points at (key_name, or key_version when
    the version is pinned).
    """
    if isinstance(exc, ClientAuthenticationError):  # before HttpResponseError: a subclass
        return BackendConfigError(
            f"{what}: Azure rejected or could not get the credentials ({_first_line(exc)})",
            _CREDENTIAL_HINT,
        )
    if isinstance(exc, ResourceNotFoundError):
        if wrapping:
            return BackendConfigError(
                f"{setting}: {what}: the vault has no such key ({_reason(exc)})",
                "set backend.key_name (and backend.key_version, if pinned) to an existing RSA "
                "key in backend.vault_url",
            )
        return BackendDenied(
            f"{what}: the key version that wrapped this data key no longer exists ({_reason(exc)})",
            "a deleted key can be recovered within its retention period (az keyvault key recover)",
        )
    if isinstance(exc, HttpResponseError):
        status = exc.status_code or 0
        if status == 403:
            return BackendDenied(f"{what}: access denied ({_reason(exc)})", _ROLE_HINT)
        if status == 429 or status >= 500:
            return BackendUnavailable(f"{what}: Key Vault is throttling or failing ({status})")
        if status == 400 and not wrapping:
            return BackendDenied(
                f"{what}: Key Vault refused the wrapped key ({_reason(exc)}: tampered, or not "
                "wrapped by this key version)"
            )
        if status == 0:  # no HTTP answer at all (a broken stream)
            return BackendUnavailable(f"{what}: {type(exc).__name__}: {_first_line(exc)}")
        return (BackendConfigError if wrapping else BackendDenied)(
            f"{what}: Key Vault answered {status} ({_reason(exc)})",
            "check backend.vault_url and backend.key_name" if wrapping else "",
        )
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


def _reason(exc: HttpResponseError) -> str:
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


def _string_option(options: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = options.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise BackendConfigError(
            f"backend.{name}: {'required for kind azure-keyvault; ' if required else ''}must be "
            "a non-empty string",
            {
                "vault_url": "the vault's URI, e.g. https://my-vault.vault.azure.net",
                "key_name": "the name of an RSA key in the vault",
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
    tenant_id = _string_option(options, "tenant_id")
    client_id = _string_option(options, "client_id")
    client_secret = _string_option(options, "client_secret")
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
    raw_url = _string_option(options, "vault_url", required=True)
    key_name = _string_option(options, "key_name", required=True)
    assert raw_url is not None
    assert key_name is not None
    vault_url = _vault_url(raw_url)
    if not _KEY_NAME.fullmatch(key_name):
        raise BackendConfigError(
            f"backend.key_name: {key_name!r} is not a Key Vault key name",
            "key names are 1-127 letters, digits and dashes",
        )
    key_version = _string_option(options, "key_version")
    if key_version is not None and not _KEY_VERSION.fullmatch(key_version):
        raise BackendConfigError(
            f"backend.key_version: {key_version!r} is not a key version",
            "use the 32-character version from the key id, or leave it unset for the current "
            "version",
        )
    ca_file = _string_option(options, "ca_file")
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
    return AzureKeyVaultWrapper(
        vault_url,
        key_name,
        policy,
        credential,
        key_version=key_version,
        ca_file=ca_file,
        owns_credential=owns,
        verify_challenge_resource=verify_challenge_resource,
    )
