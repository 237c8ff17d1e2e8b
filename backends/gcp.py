"""GCP Cloud KMS: the key wrapper (mode = "wrap") and the remote signer (mode = "remote").

Theory of operation, wrapping. `wrap_data_key` calls Encrypt on the configured CryptoKey; Cloud
KMS picks the key's primary version and answers with that version's name, which is recorded beside
the ciphertext. `unwrap_data_key` calls Decrypt on the CryptoKey the recorded version belongs to:
Cloud KMS finds the version from the ciphertext itself, so keys sealed before a rotation of the
CryptoKey still open while their version stays enabled. The envelope context is bound as
additional authenticated data (AAD), so a wrapped key moved to another kid or cluster fails to
decrypt (DESIGN.md §9.5). The recorded version must belong to the configured key: a tampered or
foreign record is refused before any call is made.

Remote signing (`GcpKmsSigner`, below the wrapper): one asymmetric CryptoKey per rotation in a
configured key ring, signing with AsymmetricSign; see its docstring.

Every request and response carries CRC32C checksums, as Google's data-integrity guidelines ask:
a response whose checksums do not match, or that does not confirm the request's checksums, is
discarded and the call retried (BackendUnavailable), up to the call's deadline. CRC32C is
computed here in pure Python (the inputs are a few hundred bytes), so no native package is needed.

The SDK runs over its REST transport with its own retries off (`retry=None`) and each request's
socket timeout set to the attempt timeout; `backends.calls.retry` paces the attempts. `build`
does nothing remote: the SDK client is created on first use (`LazyClient`), because resolving
application default credentials may probe the GCE metadata server. SDK and google-auth
exceptions are translated in one place per class (`_translate`, `_translate_signer`), over the
shared `translate_common`. backends/gcp_secrets.py reuses the helpers here (same pip extra).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import ipaddress
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import google.auth
import trio
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import kms_v1
from google.oauth2 import service_account
from google.protobuf.json_format import ParseError  # type: ignore[import-untyped]

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

KIND = "gcp-kms"
_OPTIONS = frozenset({"key_name", "endpoint", "credentials_file", "timeout", "attempt_timeout"})
_SCOPES = ("https://www.googleapis.com/auth/cloudkms",)
_ID = r"[A-Za-z0-9_-]{1,63}"
_KEY = (
    rf"projects/[a-z0-9][a-z0-9.:-]{{0,62}}/locations/[a-z0-9-]{{1,63}}"
    rf"/keyRings/{_ID}/cryptoKeys/{_ID}"
)
_KEY_NAME = re.compile(_KEY)
_VERSION_NAME = re.compile(rf"(?P<key>{_KEY})/cryptoKeyVersions/[1-9][0-9]{{0,18}}")
_ROLE = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
_CREDENTIALS_HINT = (
    "set backend.credentials_file to a service-account key file, or GOOGLE_APPLICATION_CREDENTIALS "
    "for application default credentials"
)
_RETRYABLE = (
    api_exceptions.TooManyRequests,  # 429 RESOURCE_EXHAUSTED: quota or throttling
    api_exceptions.ServerError,  # 5xx: INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, ...
    api_exceptions.Conflict,  # 409 ABORTED: a concurrency conflict, retry is the documented fix
    api_exceptions.Cancelled,
)
# What the SDK stack raises: API errors, credential errors, transport errors (requests'
# ConnectionError and Timeout are OSErrors), and a response body that is not the expected JSON.
_SDK_ERRORS = (
    api_exceptions.GoogleAPICallError,
    auth_exceptions.GoogleAuthError,
    OSError,
    ParseError,
)

Operation = Literal["encrypt", "decrypt"]
T = TypeVar("T")


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli, RFC 3720) of `data`, the checksum Cloud KMS uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


class _HasTransport(Protocol):
    @property
    def transport(self) -> Any: ...


C = TypeVar("C", bound=_HasTransport)


class LazyClient(Generic[C]):
    """A google-cloud SDK client over REST, created on first use and closed by `close`.

    Creation is deferred because resolving application default credentials may probe the GCE
    metadata server: `build` must stay free of I/O. Shared by the KMS wrapper and signer and by
    the Secret Manager store (backends/gcp_secrets.py).
    """

    __slots__ = ("_client", "_credentials", "_factory", "_lock", "_scopes", "endpoint")

    def __init__(
        self,
        factory: Callable[..., C],
        *,
        endpoint: str | None,
        credentials: Credentials | None,
        scopes: tuple[str, ...],
    ) -> None:
        self._factory = factory
        self.endpoint = endpoint
        self._credentials = credentials  # None: application default credentials, on first use
        self._scopes = scopes
        self._lock = threading.Lock()
        self._client: C | None = None

    def get(self) -> C:
        """The client (blocking: call it from a worker thread)."""
        with self._lock:
            if self._client is None:
                credentials = self._credentials
                if credentials is None:
                    credentials, _project = google.auth.default(scopes=self._scopes)
                options = ClientOptions(api_endpoint=self.endpoint) if self.endpoint else None
                self._client = self._factory(
                    credentials=credentials, transport="rest", client_options=options
                )
            return self._client

    def close(self) -> None:
        """Close the client's connections; the next call opens new ones."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.transport.close()


class GcpKmsWrapper:
    """Wraps data keys with Cloud KMS Encrypt/Decrypt on one symmetric CryptoKey."""

    __slots__ = ("_clients", "_policy", "key_name")
    kind = KIND

    def __init__(
        self,
        key_name: str,
        *,
        endpoint: str | None,
        credentials: Credentials | None,
        policy: CallPolicy,
    ) -> None:
        self.key_name = key_name
        self._policy = policy
        self._clients = LazyClient(
            kms_v1.KeyManagementServiceClient,
            endpoint=endpoint,
            credentials=credentials,
            scopes=_SCOPES,
        )

    @property
    def policy(self) -> CallPolicy:
        """The call policy (agent.factory.backend_deadline reads its deadline)."""
        return self._policy

    async def wrap_data_key(self, data_key: bytes, context: Mapping[str, str]) -> dict[str, str]:
        aad = associated_data(context)

        async def attempt() -> dict[str, str]:
            return await in_thread(lambda: self._encrypt(data_key, aad))

        return await retry(
            attempt, what=f"GCP KMS encrypt with {self.key_name}", policy=self._policy
        )

    async def unwrap_data_key(
        self, wrapped: Mapping[str, str], context: Mapping[str, str]
    ) -> bytes:
        kid = context.get("keyquorum:kid", "?")
        version = wrapped.get("key_version")
        match = _VERSION_NAME.fullmatch(version) if isinstance(version, str) else None
        if match is None or match["key"] != self.key_name:
            raise BackendDenied(
                f"the data key of {kid} was wrapped by Cloud KMS key version {version!r}, which "
                f"is not a version of the configured key {self.key_name}",
                "configure the key this key set was sealed with (backend.key_name)",
            )
        try:
            ciphertext = b64url_decode(wrapped["ciphertext"])
        except (KeyError, ValueError, TypeError):
            raise BackendDenied(
                f"the wrapped data key of {kid} has a missing or malformed ciphertext"
            ) from None
        aad = associated_data(context)

        async def attempt() -> bytes:
            return await in_thread(lambda: self._decrypt(ciphertext, aad, kid))

        return await retry(
            attempt, what=f"GCP KMS decrypt with {self.key_name}", policy=self._policy
        )

    def describe(self) -> str:
        return f"GCP Cloud KMS key {self.key_name}"

    def close(self) -> None:
        """Close the SDK client's connections; the next call opens new ones."""
        self._clients.close()

    def __repr__(self) -> str:
        return f"GcpKmsWrapper(key_name={self.key_name!r}, endpoint={self._clients.endpoint!r})"

    # ---- blocking SDK calls, run in a worker thread --------------------------------------------

    def _encrypt(self, data_key: bytes, aad: bytes) -> dict[str, str]:
        request = kms_v1.EncryptRequest(
            name=self.key_name,
            plaintext=data_key,
            additional_authenticated_data=aad,
            plaintext_crc32c=crc32c(data_key),
            additional_authenticated_data_crc32c=crc32c(aad),
        )
        try:
            response = self._clients.get().encrypt(
                request=request, retry=None, timeout=self._policy.attempt_timeout
            )
        except _SDK_ERRORS as exc:
            raise _translate(exc, "encrypt", self.key_name) from exc
        if not (
            response.verified_plaintext_crc32c
            and response.verified_additional_authenticated_data_crc32c
        ):
            raise _corrupted("encrypt", "did not confirm the request's checksums")
        if int64_checksum(response.ciphertext_crc32c) != crc32c(response.ciphertext):
            raise _corrupted("encrypt", "returned a ciphertext that fails its checksum")
        match = _VERSION_NAME.fullmatch(response.name)
        if match is None or match["key"] != self.key_name:
            raise BackendDenied(
                f"Cloud KMS encrypted with {response.name!r}, not a version of {self.key_name}",
                "check backend.endpoint: it does not behave like Cloud KMS",
            )
        return {"key_version": response.name, "ciphertext": b64url_encode(response.ciphertext)}

    def _decrypt(self, ciphertext: bytes, aad: bytes, kid: str) -> bytes:
        request = kms_v1.DecryptRequest(
            name=self.key_name,
            ciphertext=ciphertext,
            additional_authenticated_data=aad,
            ciphertext_crc32c=crc32c(ciphertext),
            additional_authenticated_data_crc32c=crc32c(aad),
        )
        try:
            response = self._clients.get().decrypt(
                request=request, retry=None, timeout=self._policy.attempt_timeout
            )
        except _SDK_ERRORS as exc:
            raise _translate(exc, "decrypt", self.key_name, kid=kid) from exc
        if int64_checksum(response.plaintext_crc32c) != crc32c(response.plaintext):
            raise _corrupted("decrypt", "returned a plaintext that fails its checksum")
        return bytes(response.plaintext)


def int64_checksum(value: object) -> int | None:
    """A proto Int64Value checksum field as proto-plus hands it over: an int, or None if unset."""
    return value if isinstance(value, int) else None


def corrupted(service: str, operation: str, what: str) -> BackendUnavailable:
    """A response that fails its CRC32C checks: discarded, and the call retried."""
    return BackendUnavailable(
        f"{service} {operation} {what} (data corrupted in transit); the response was discarded",
        f"retried until the deadline; if it persists, something between the agent and {service} "
        "alters requests or responses",
    )


def _corrupted(operation: Operation, what: str) -> BackendUnavailable:
    return corrupted("Cloud KMS", operation, what)


def error_fields(exc: api_exceptions.GoogleAPICallError) -> tuple[str, str]:
    """The canonical status (e.g. FAILED_PRECONDITION) and the server's own message.

    Over REST the SDK picks the exception class from the HTTP status alone, so a 400 is a plain
    BadRequest whether Cloud KMS said INVALID_ARGUMENT or FAILED_PRECONDITION, and a 409 a plain
    Conflict whether it said ABORTED or ALREADY_EXISTS: read the JSON.
    """
    status = exc.grpc_status_code.name if exc.grpc_status_code is not None else ""
    message = str(exc.message)
    response: Any = exc.response
    try:
        error = response.json()["error"] if response is not None else None
    except (AttributeError, KeyError, TypeError, ValueError):
        error = None
    if isinstance(error, dict):
        status = status or str(error.get("status") or "")
        message = str(error.get("message") or message)
    return status, message[:300]


def said(exc: api_exceptions.GoogleAPICallError) -> str:
    """`STATUS: server message`, for error messages."""
    status, message = error_fields(exc)
    return f"{status or exc.code}: {message}"


def is_status(exc: BaseException, status: str) -> bool:
    """Whether `exc` is an API error with this canonical status (read from the JSON body)."""
    return isinstance(exc, api_exceptions.GoogleAPICallError) and error_fields(exc)[0] == status


def translate_common(exc: BaseException, service: str, what: str) -> BackendError | None:
    """The translations every Google API shares: rejected credentials, throttling and server
    errors, credential resolution, transport failures. None: an API error the caller must map
    (permission, missing resource, precondition, bad request)."""
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        if isinstance(exc, api_exceptions.Unauthorized):
            return BackendConfigError(
                f"backend.credentials_file: {service} rejected the agent's credentials "
                f"({said(exc)})",
                _CREDENTIALS_HINT,
            )
        if isinstance(exc, _RETRYABLE):
            return BackendUnavailable(f"{what} failed ({said(exc)})")
        return None
    if isinstance(exc, auth_exceptions.DefaultCredentialsError):
        return BackendConfigError(f"GCP credentials: {exc}", _CREDENTIALS_HINT)
    if isinstance(exc, auth_exceptions.RefreshError) and not getattr(exc, "retryable", False):
        return BackendConfigError(
            f"GCP credentials could not be refreshed: {exc}", _CREDENTIALS_HINT
        )
    if isinstance(exc, auth_exceptions.GoogleAuthError | OSError | ParseError):
        # requests wraps urllib3's error, whose `reason` says what happened without the URL
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        detail = str(reason or exc).strip()[:300]
        return BackendUnavailable(
            f"{what} failed: {type(exc).__name__}: {detail}",
            f"{service} may be unreachable from this node (network, DNS, proxy) or overloaded; "
            "retry with backoff",
        )
    raise TypeError(f"not an SDK error: {type(exc).__name__}") from exc  # pragma: no cover


def _translate(
    exc: BaseException, operation: Operation, key_name: str, *, kid: str = "?"
) -> BackendError:
    """The wrapper's one place where google-cloud, google-auth and transport errors become ours."""
    common = translate_common(exc, "Cloud KMS", f"Cloud KMS {operation}")
    if common is not None:
        return common
    assert isinstance(exc, api_exceptions.GoogleAPICallError)
    permission = f"cloudkms.cryptoKeyVersions.useTo{operation.capitalize()}"
    status = error_fields(exc)[0]
    if isinstance(exc, api_exceptions.Forbidden):
        return BackendDenied(
            f"Cloud KMS denied {operation} with {key_name}: the agent lacks permission "
            f"{permission} ({said(exc)})",
            f"grant the agent's identity {_ROLE} (permission {permission}) on the key",
        )
    if isinstance(exc, api_exceptions.NotFound):
        if operation == "encrypt":
            return BackendConfigError(
                f"backend.key_name: Cloud KMS has no key {key_name} ({said(exc)})",
                "check the project, location, key ring and key name",
            )
        return BackendDenied(
            f"the data key of {kid} cannot be unwrapped: Cloud KMS has no key {key_name} "
            f"({said(exc)})",
            "configure the key this key set was sealed with (backend.key_name)",
        )
    if isinstance(exc, api_exceptions.BadRequest) and status == "FAILED_PRECONDITION":
        return BackendDenied(
            f"Cloud KMS refused to {operation} with {key_name}: the key version is not "
            f"enabled (disabled, scheduled for destruction or destroyed) ({said(exc)})",
            "re-enable the key version (gcloud kms keys versions enable) or restore it; data "
            "wrapped by a destroyed version cannot be recovered",
        )
    if isinstance(exc, api_exceptions.BadRequest) and operation == "decrypt":
        return BackendDenied(
            f"the wrapped data key of {kid} does not decrypt with {key_name} (tampered, or "
            f"wrapped for another kid or cluster prefix) ({said(exc)})"
        )
    return BackendDenied(
        f"Cloud KMS refused to {operation} with {key_name} ({said(exc)})",
        "check that backend.key_name names a symmetric ENCRYPT_DECRYPT key with an enabled "
        "primary version",
    )


@dataclass(frozen=True, slots=True)
class ApiCall:
    """One kind of request: what it does (for messages) and the IAM permission it needs, with a
    predefined role that holds it (for hints)."""

    operation: str
    permission: str
    role: str


async def run_api_call(
    fn: Callable[[], T],
    *,
    service: str,
    call: ApiCall,
    resource: str,
    translate: Callable[[BaseException, ApiCall, str], BackendError],
    policy: CallPolicy,
    until: float | None = None,
) -> T:
    """Run one blocking SDK request in a worker thread with retries, translating SDK errors.

    `until` (trio time) caps the retries, so that an operation made of several requests (create,
    wait, read back) gives up as a whole within one deadline, with the last request's reason.
    """
    if until is not None:
        left = max(until - trio.current_time(), 0.001)
        policy = dataclasses.replace(
            policy, deadline=left, attempt_timeout=min(policy.attempt_timeout, left)
        )

    async def attempt() -> T:
        try:
            return await in_thread(fn)
        except _SDK_ERRORS as exc:
            raise translate(exc, call, resource) from exc

    return await retry(attempt, what=f"{service}: {call.operation} {resource}", policy=policy)


# ---- construction -------------------------------------------------------------------------------


def api_endpoint(value: object) -> str | None:
    """The API endpoint: host[:port] or https://host[:port]; plain http only to loopback."""
    if value is None:
        return None
    if not (isinstance(value, str) and _is_endpoint(value)):
        raise BackendConfigError(
            f"backend.endpoint: {value!r} is not an API endpoint",
            "write host[:port] or https://host[:port], or leave it unset for Google's",
        )
    parts = urlsplit(value)
    if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
        raise BackendConfigError(
            f"backend.endpoint: {value!r} would send key material in clear over the network",
            "use https; plain http is allowed only to a loopback address (a local test server)",
        )
    return value.rstrip("/")


def _is_endpoint(value: str) -> bool:
    parts = urlsplit(value if "://" in value else f"https://{value}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and parts.path in ("", "/")
        and not (parts.query or parts.fragment or parts.username or parts.password)
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_credentials(
    value: object, endpoint: str | None, scopes: tuple[str, ...] = _SCOPES
) -> Credentials | None:
    """Anonymous for a plain-http test server, a key file's, or None for application default."""
    plain_http = endpoint is not None and endpoint.startswith("http://")
    if value is None:
        return AnonymousCredentials() if plain_http else None  # type: ignore[no-untyped-call]
    if not isinstance(value, str) or not value:
        raise BackendConfigError(
            f"backend.credentials_file: must be a file path, not {value!r}",
            "set it to a service-account key file, or remove it to use application default "
            "credentials",
        )
    if plain_http:
        raise BackendConfigError(
            "backend.credentials_file: credentials are never sent to a plain-http endpoint",
            "use an https backend.endpoint, or remove backend.credentials_file",
        )
    try:
        loaded = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            value, scopes=scopes
        )
    except (OSError, ValueError) as exc:  # unreadable, not JSON, missing fields, bad key
        raise BackendConfigError(
            f"backend.credentials_file: cannot load {value}: {str(exc)[:200]}",
            "point it at a service-account key file (JSON) the agent's user can read",
        ) from None
    return cast(Credentials, loaded)


def build(options: Mapping[str, Any]) -> GcpKmsWrapper:
    """The registry's constructor: `key_name` (required), `endpoint`, `credentials_file`,
    `timeout`, `attempt_timeout`. Validates everything; makes no remote call."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for kind {KIND!r}",
            f"the {KIND} backend takes {', '.join(sorted(_OPTIONS))}",
        )
    key_name = options.get("key_name")
    if not isinstance(key_name, str) or not _KEY_NAME.fullmatch(key_name):
        hint = "write projects/P/locations/L/keyRings/R/cryptoKeys/K"
        if isinstance(key_name, str) and _VERSION_NAME.fullmatch(key_name):
            hint += " (the key, not one of its versions: the primary version is used)"
        raise BackendConfigError(
            f"backend.key_name: {key_name!r} is not a Cloud KMS CryptoKey resource name"
            if key_name is not None
            else f"backend.key_name: required for kind {KIND!r}",
            hint,
        )
    endpoint = api_endpoint(options.get("endpoint"))
    credentials = load_credentials(options.get("credentials_file"), endpoint)
    return GcpKmsWrapper(
        key_name,
        endpoint=endpoint,
        credentials=credentials,
        policy=CallPolicy.from_options(options),
    )


# ---- remote signing: one CryptoKey per rotation (backend.mode = "remote") ----------------------


@dataclass(frozen=True, slots=True)
class _SignSpec:
    """How a JWS algorithm maps onto Cloud KMS."""

    algorithm: int  # the CryptoKeyVersionAlgorithm of the version template
    digest: str | None  # the hash computed here and sent as `digest`; None: send `data`
    coordinate: int  # ECDSA: bytes of each of r and s in the JWS encoding; 0 otherwise


_ALGORITHM = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm
_SIGN_SPECS: dict[str, _SignSpec] = {
    "ES256": _SignSpec(_ALGORITHM.EC_SIGN_P256_SHA256, "sha256", 32),
    "ES384": _SignSpec(_ALGORITHM.EC_SIGN_P384_SHA384, "sha384", 48),
    "RS256": _SignSpec(_ALGORITHM.RSA_SIGN_PKCS1_2048_SHA256, "sha256", 0),
    "PS256": _SignSpec(_ALGORITHM.RSA_SIGN_PSS_2048_SHA256, "sha256", 0),  # salt: hash length
    "EdDSA": _SignSpec(_ALGORITHM.EC_SIGN_ED25519, None, 0),
}
PREFIX_LABEL = "keyquorum-prefix"
RETIRED_LABEL = "keyquorum-retired"
_DATA_LIMIT = 64 * 1024  # Cloud KMS takes at most 64 KiB of `data` (EdDSA signs the message)
_PAGE_SIZE = 1000  # large pages: one ListCryptoKeys call per thousand keys in the ring
# Version states of a key that is no longer live: destroyed, on its way there, or never made.
_GONE = frozenset(
    {
        "DESTROYED",
        "DESTROY_SCHEDULED",
        "PENDING_EXTERNAL_DESTRUCTION",
        "GENERATION_FAILED",
        "IMPORT_FAILED",
    }
)
_SIGNER_OPTIONS = frozenset(
    {"key_ring", "key_name_prefix", "endpoint", "credentials_file", "timeout", "attempt_timeout"}
)
_KEY_RING = re.compile(
    rf"projects/[a-z0-9][a-z0-9.:-]{{0,62}}/locations/[a-z0-9-]{{1,63}}/keyRings/{_ID}"
)
# The key id is `<key_name_prefix>-<8 hex>-<12 hex>`, at most 63 characters.
_KEY_NAME_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,41}")


_CREATE = ApiCall("create a key in", "cloudkms.cryptoKeys.create", "roles/cloudkms.admin")
_LIST = ApiCall("list the keys of", "cloudkms.cryptoKeys.list", "roles/cloudkms.viewer")
_STATE = ApiCall("read the state of", "cloudkms.cryptoKeyVersions.get", "roles/cloudkms.viewer")
_PUBLIC = ApiCall(
    "read the public key of",
    "cloudkms.cryptoKeyVersions.viewPublicKey",
    "roles/cloudkms.signerVerifier",
)
_SIGN = ApiCall(
    "sign with", "cloudkms.cryptoKeyVersions.useToSign", "roles/cloudkms.signerVerifier"
)
_DESTROY = ApiCall("destroy", "cloudkms.cryptoKeyVersions.destroy", "roles/cloudkms.admin")
_RELABEL = ApiCall("label as retired", "cloudkms.cryptoKeys.update", "roles/cloudkms.admin")


class GcpKmsSigner:
    """Creates one asymmetric CryptoKey per rotation in the configured key ring and signs with
    AsymmetricSign there; the private key never leaves Cloud KMS.

    Keys are named `<key_name_prefix>-<8 hex of the cluster prefix's SHA-256>-<12 random hex>`
    and labelled `keyquorum-prefix=<8 hex>`, so `owned_keys` finds a cluster's keys in one paged
    ListCryptoKeys. The key set stores `{"key_version": ".../cryptoKeyVersions/1"}`: each key has
    exactly one version. Cloud KMS generates asymmetric versions asynchronously, so `create_key`
    polls the new version until it is ENABLED, all within one call deadline.

    Cloud KMS never deletes a CryptoKey: `retire` destroys version 1 (Cloud KMS schedules the
    destruction, by default 30 days ahead, and refuses to sign at once) and then relabels the key
    `keyquorum-retired=<8 hex>`. The label keeps `owned_keys` to one list call plus one state read
    per live key, however many retired keys the ring collects over the years (Cloud KMS's read
    quota is per minute); a key destroyed by other means is still recognised by its state.

    Digests (SHA-256/384) are computed here and sent with their CRC32C, and signatures are
    checked against theirs, as the wrapper does; ECDSA signatures come back DER-encoded and are
    converted to JWS's raw r||s. Ed25519 signs the message itself (`data`, at most 64 KiB).
    """

    __slots__ = ("_clients", "key_name_prefix", "key_ring", "policy")
    kind = KIND

    def __init__(
        self,
        key_ring: str,
        key_name_prefix: str,
        *,
        endpoint: str | None,
        credentials: Credentials | None,
        policy: CallPolicy,
    ) -> None:
        self.key_ring = key_ring
        self.key_name_prefix = key_name_prefix
        self.policy = policy
        self._clients = LazyClient(
            kms_v1.KeyManagementServiceClient,
            endpoint=endpoint,
            credentials=credentials,
            scopes=_SCOPES,
        )

    def supports(self, alg: str) -> bool:
        return alg in _SIGN_SPECS

    def _names_for(self, prefix: str) -> str:
        """The start of the resource name of every key created for the cluster `prefix`."""
        return f"{self.key_ring}/cryptoKeys/{self.key_name_prefix}-{_prefix_label(prefix)}-"

    async def create_key(self, alg: str, prefix: str) -> RemoteKey:
        spec = _SIGN_SPECS[alg]
        label = _prefix_label(prefix)
        key_id = f"{self.key_name_prefix}-{label}-{secrets.token_hex(6)}"
        version = f"{self.key_ring}/cryptoKeys/{key_id}/cryptoKeyVersions/1"
        until = trio.current_time() + self.policy.deadline  # one deadline for all three steps
        await self._call(
            _CREATE, self.key_ring, lambda: self._create(key_id, spec, label), until=until
        )
        created_at = await self._wait_enabled(version, until)
        pem = await self._call(_PUBLIC, version, lambda: self._public_key(version), until=until)
        return RemoteKey({"key_version": version}, pem, created_at)

    async def _wait_enabled(self, version: str, until: float) -> int | None:
        """Poll the new version until Cloud KMS has generated it; its creation time (ms)."""
        pause = 0.05
        while True:
            state, created_at = await self._call(
                _STATE, version, lambda: self._version_state(version), until=until
            )
            if state == "ENABLED":
                return created_at
            if state not in (None, "PENDING_GENERATION"):
                raise BackendUnavailable(
                    f"Cloud KMS key version {version} is {state} instead of ENABLED",
                    "the leader creates another key on its next attempt; this one is retired "
                    "with the other unused keys",
                )
            if until - trio.current_time() <= pause:
                raise BackendUnavailable(
                    f"Cloud KMS had not finished generating {version} within "
                    f"{self.policy.deadline:g}s (state {state or 'not yet visible'})",
                    "asymmetric keys are generated asynchronously (HSM keys can take longer); "
                    "raise backend.timeout if this persists",
                )
            await trio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def public_key(self, ref: Mapping[str, str]) -> bytes:
        version = self._ref_version(ref)
        return await self._call(_PUBLIC, version, lambda: self._public_key(version))

    async def sign(self, ref: Mapping[str, str], alg: str, data: bytes) -> bytes:
        spec = _SIGN_SPECS[alg]
        version = self._ref_version(ref)
        if spec.digest is None and not 0 < len(data) <= _DATA_LIMIT:
            # proto3 cannot tell empty `data` from none, so Cloud KMS cannot sign b"" either
            raise BackendDenied(
                f"Cloud KMS signs 1 to {_DATA_LIMIT} bytes with {alg}; got {len(data)}",
                "EdDSA in Cloud KMS signs the message itself, not a digest",
            )
        signature = await self._call(_SIGN, version, lambda: self._sign(version, spec, data))
        if not spec.coordinate:
            return signature
        try:  # ECDSA: DER -> r||s
            r, s = decode_dss_signature(signature)
            return r.to_bytes(spec.coordinate, "big") + s.to_bytes(spec.coordinate, "big")
        except (ValueError, OverflowError):
            raise BackendDenied(
                f"Cloud KMS returned a malformed {alg} signature from {version}",
                "check backend.endpoint: it does not behave like Cloud KMS",
            ) from None

    async def owned_keys(self, prefix: str) -> list[RemoteKey]:
        start, label = self._names_for(prefix), _prefix_label(prefix)
        listed = await self._call(_LIST, self.key_ring, self._list_keys)
        owned = []
        for name, labels in listed:
            if not name.startswith(start) or labels.get(PREFIX_LABEL) != label:
                continue  # another cluster's key, or one relabelled when it was retired
            version = f"{name}/cryptoKeyVersions/1"
            state, created_at = await self._call(
                _STATE, version, functools.partial(self._version_state, version)
            )
            if state is None or state in _GONE:
                continue
            owned.append(RemoteKey({"key_version": version}, b"", created_at))
        return owned

    async def retire(self, ref: Mapping[str, str]) -> None:
        version = self._ref_version(ref)
        key_name = version.rsplit("/cryptoKeyVersions/", 1)[0]
        if await self._call(_DESTROY, version, lambda: self._destroy(version)):
            await self._call(_RELABEL, key_name, lambda: self._relabel(key_name))

    def _ref_version(self, ref: Mapping[str, str]) -> str:
        """The version a reference names, if it is one of this agent's keys; else refused
        without a call (a tampered or foreign record)."""
        version = ref.get("key_version")
        ours = f"{self.key_ring}/cryptoKeys/{self.key_name_prefix}-"
        if not (
            isinstance(version, str)
            and _VERSION_NAME.fullmatch(version)
            and version.startswith(ours)
            and version.endswith("/cryptoKeyVersions/1")
            and "/" not in version[len(ours) : -len("/cryptoKeyVersions/1")]
        ):
            raise BackendDenied(
                f"remote key {version!r} is not one of this agent's Cloud KMS keys",
                "backend.key_ring and backend.key_name_prefix must match the ones the key set "
                "was created with",
            )
        return version

    async def _call(
        self, call: ApiCall, resource: str, fn: Callable[[], T], *, until: float | None = None
    ) -> T:
        return await run_api_call(
            fn,
            service="Cloud KMS",
            call=call,
            resource=resource,
            translate=_translate_signer,
            policy=self.policy,
            until=until,
        )

    def describe(self) -> str:
        return (
            f"GCP Cloud KMS key ring {self.key_ring}, one key per rotation "
            f"({self.key_name_prefix}-*)"
        )

    def close(self) -> None:
        """Close the SDK client's connections; the next call opens new ones."""
        self._clients.close()

    def __repr__(self) -> str:
        return (
            f"GcpKmsSigner(key_ring={self.key_ring!r}, key_name_prefix="
            f"{self.key_name_prefix!r}, endpoint={self._clients.endpoint!r})"
        )

    # ---- blocking SDK calls, run in a worker thread --------------------------------------------

    def _create(self, key_id: str, spec: _SignSpec, label: str) -> None:
        request = kms_v1.CreateCryptoKeyRequest(
            parent=self.key_ring,
            crypto_key_id=key_id,
            crypto_key=kms_v1.CryptoKey(
                purpose=kms_v1.CryptoKey.CryptoKeyPurpose.ASYMMETRIC_SIGN,
                version_template=kms_v1.CryptoKeyVersionTemplate(algorithm=spec.algorithm),
                labels={PREFIX_LABEL: label},
            ),
        )
        try:
            self._clients.get().create_crypto_key(
                request=request, retry=None, timeout=self.policy.attempt_timeout
            )
        except api_exceptions.Conflict as exc:
            # The random name is ours alone: an earlier attempt created the key and its answer
            # was lost. Carry on with that key rather than leave it orphaned.
            if not is_status(exc, "ALREADY_EXISTS"):
                raise

    def _version_state(self, version: str) -> tuple[str | None, int | None]:
        """The version's state name and creation time (ms); (None, None) if it does not exist."""
        try:
            response = self._clients.get().get_crypto_key_version(
                request=kms_v1.GetCryptoKeyVersionRequest(name=version),
                retry=None,
                timeout=self.policy.attempt_timeout,
            )
        except api_exceptions.NotFound:
            return None, None
        return response.state.name, _millis(response.create_time)

    def _public_key(self, version: str) -> bytes:
        response = self._clients.get().get_public_key(
            request=kms_v1.GetPublicKeyRequest(name=version),
            retry=None,
            timeout=self.policy.attempt_timeout,
        )
        pem = response.pem.encode()
        if int64_checksum(response.pem_crc32c) != crc32c(pem):
            raise _corrupted_signer("getPublicKey", "returned a public key that fails its checksum")
        if response.name != version:
            raise BackendDenied(
                f"Cloud KMS answered with the public key of {response.name!r}, not {version}",
                "check backend.endpoint: it does not behave like Cloud KMS",
            )
        return pem

    def _sign(self, version: str, spec: _SignSpec, data: bytes) -> bytes:
        if spec.digest is not None:
            digest = hashlib.new(spec.digest, data).digest()
            request = kms_v1.AsymmetricSignRequest(
                name=version,
                digest=kms_v1.Digest(**{spec.digest: digest}),
                digest_crc32c=crc32c(digest),
            )
        else:
            request = kms_v1.AsymmetricSignRequest(
                name=version, data=data, data_crc32c=crc32c(data)
            )
        response = self._clients.get().asymmetric_sign(
            request=request, retry=None, timeout=self.policy.attempt_timeout
        )
        confirmed = (
            response.verified_digest_crc32c
            if spec.digest is not None
            else response.verified_data_crc32c
        )
        if not confirmed:
            raise _corrupted_signer("asymmetricSign", "did not confirm the request's checksum")
        if int64_checksum(response.signature_crc32c) != crc32c(response.signature):
            raise _corrupted_signer("asymmetricSign", "returned a signature failing its checksum")
        if response.name != version:
            raise BackendDenied(
                f"Cloud KMS signed with {response.name!r} instead of {version}",
                "check backend.endpoint: it does not behave like Cloud KMS",
            )
        return bytes(response.signature)

    def _list_keys(self) -> list[tuple[str, dict[str, str]]]:
        """Every CryptoKey in the key ring (all pages) with its labels."""
        pager = self._clients.get().list_crypto_keys(
            request=kms_v1.ListCryptoKeysRequest(parent=self.key_ring, page_size=_PAGE_SIZE),
            retry=None,
            timeout=self.policy.attempt_timeout,
        )
        return [(key.name, dict(key.labels)) for key in pager]

    def _destroy(self, version: str) -> bool:
        """Destroy the version; False if it does not exist. Idempotent: a version already
        scheduled for destruction (or destroyed) counts as done."""
        try:
            self._clients.get().destroy_crypto_key_version(
                request=kms_v1.DestroyCryptoKeyVersionRequest(name=version),
                retry=None,
                timeout=self.policy.attempt_timeout,
            )
        except api_exceptions.NotFound:
            return False
        except api_exceptions.BadRequest as exc:
            if not is_status(exc, "FAILED_PRECONDITION"):
                raise
            state, _ = self._version_state(version)
            if state not in _GONE:
                raise
        return True

    def _relabel(self, key_name: str) -> None:
        label = key_name.rsplit("/", 1)[1][len(self.key_name_prefix) + 1 :][:8]
        self._clients.get().update_crypto_key(
            request=kms_v1.UpdateCryptoKeyRequest(
                crypto_key=kms_v1.CryptoKey(name=key_name, labels={RETIRED_LABEL: label}),
                update_mask={"paths": ["labels"]},
            ),
            retry=None,
            timeout=self.policy.attempt_timeout,
        )


def _prefix_label(prefix: str) -> str:
    """8 hex characters of the cluster prefix's SHA-256: fits key ids and label values."""
    return hashlib.sha256(prefix.encode()).hexdigest()[:8]


def _millis(value: object) -> int | None:
    """A proto Timestamp as proto-plus hands it over (a datetime), in ms; None if unset."""
    if isinstance(value, datetime.datetime) and value.timestamp() > 0:
        return int(value.timestamp() * 1000)
    return None


def _corrupted_signer(operation: str, what: str) -> BackendUnavailable:
    return corrupted("Cloud KMS", operation, what)


def _translate_signer(exc: BaseException, call: ApiCall, resource: str) -> BackendError:
    """The signer's one place where SDK, google-auth and transport errors become ours."""
    common = translate_common(exc, "Cloud KMS", f"Cloud KMS: {call.operation} {resource}")
    if common is not None:
        return common
    assert isinstance(exc, api_exceptions.GoogleAPICallError)
    status = error_fields(exc)[0]
    on_ring = call in (_CREATE, _LIST)
    if isinstance(exc, api_exceptions.Forbidden):
        return BackendDenied(
            f"Cloud KMS denied the agent to {call.operation} {resource}: it lacks permission "
            f"{call.permission} ({said(exc)})",
            f"grant the agent's identity {call.role} (or another role with {call.permission}) "
            f"on the key ring {resource.split('/cryptoKeys/')[0]}",
        )
    if isinstance(exc, api_exceptions.NotFound):
        if on_ring:
            return BackendConfigError(
                f"backend.key_ring: Cloud KMS has no key ring {resource} ({said(exc)})",
                "create it (gcloud kms keyrings create) or fix the project, location or name",
            )
        return BackendDenied(
            f"Cloud KMS has no key version {resource} ({said(exc)})",
            "the key set names a key that is not in backend.key_ring",
        )
    if isinstance(exc, api_exceptions.BadRequest) and status == "FAILED_PRECONDITION":
        return BackendDenied(
            f"Cloud KMS refused to {call.operation} {resource}: the key version is not enabled "
            f"(disabled, scheduled for destruction or destroyed) ({said(exc)})",
            "a version scheduled for destruction can be restored until its destroy time "
            "(gcloud kms keys versions restore), then enabled",
        )
    if call is _CREATE:
        return BackendConfigError(
            f"backend.key_ring: Cloud KMS refused to {call.operation} {resource} ({said(exc)})",
            "check that the key ring's location offers the algorithm in keys.algorithm and that "
            "no organization policy forbids it",
        )
    return BackendDenied(f"Cloud KMS refused to {call.operation} {resource} ({said(exc)})")


def build_signer(options: Mapping[str, Any]) -> GcpKmsSigner:
    """The registry's constructor for mode = "remote": `key_ring` (required), `key_name_prefix`
    (default "keyquorum"), `endpoint`, `credentials_file`, `timeout`, `attempt_timeout`.
    Validates everything; makes no remote call."""
    if "key_name" in options:
        raise BackendConfigError(
            "backend.key_name: not used with mode = 'remote' (the leader creates a CryptoKey per "
            "rotation in backend.key_ring)",
            "set backend.key_ring (projects/P/locations/L/keyRings/R) instead, or use "
            "mode = 'wrap' to wrap keys under key_name",
        )
    unknown = set(options) - _SIGNER_OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for remote {KIND}",
            f"remote {KIND} takes {', '.join(sorted(_SIGNER_OPTIONS))}",
        )
    key_ring = options.get("key_ring")
    if not isinstance(key_ring, str) or not _KEY_RING.fullmatch(key_ring):
        hint = "write projects/P/locations/L/keyRings/R"
        if isinstance(key_ring, str) and (
            _KEY_NAME.fullmatch(key_ring) or _VERSION_NAME.fullmatch(key_ring)
        ):
            hint += " (the key ring itself, not a key in it)"
        raise BackendConfigError(
            f"backend.key_ring: {key_ring!r} is not a Cloud KMS key ring resource name"
            if key_ring is not None
            else f"backend.key_ring: required for remote {KIND}",
            hint,
        )
    key_name_prefix = options.get("key_name_prefix", "keyquorum")
    if not isinstance(key_name_prefix, str) or not _KEY_NAME_PREFIX.fullmatch(key_name_prefix):
        raise BackendConfigError(
            f"backend.key_name_prefix: {key_name_prefix!r} must be 1 to 41 letters, digits, '_' "
            "or '-'",
            "key ids are <key_name_prefix>-<8 hex>-<12 hex>, at most 63 characters",
        )
    endpoint = api_endpoint(options.get("endpoint"))
    credentials = load_credentials(options.get("credentials_file"), endpoint)
    return GcpKmsSigner(
        key_ring,
        key_name_prefix,
        endpoint=endpoint,
        credentials=credentials,
        policy=CallPolicy.from_options(options),
    )
