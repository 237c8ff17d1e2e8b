"""The GCP Cloud KMS key wrapper: data keys are wrapped by a symmetric Cloud KMS CryptoKey.

Theory of operation. `wrap_data_key` calls Encrypt on the configured CryptoKey; Cloud KMS picks
the key's primary version and answers with that version's name, which is recorded beside the
ciphertext. `unwrap_data_key` calls Decrypt on the CryptoKey the recorded version belongs to:
Cloud KMS finds the version from the ciphertext itself, so keys sealed before a rotation of the
CryptoKey still open while their version stays enabled. The envelope context is bound as
additional authenticated data (AAD), so a wrapped key moved to another kid or cluster fails to
decrypt (DESIGN.md §9.5). The recorded version must belong to the configured key: a tampered or
foreign record is refused before any call is made.

Every request and response carries CRC32C checksums, as Google's data-integrity guidelines ask:
a response whose checksums do not match, or that does not confirm the request's checksums, is
discarded and the call retried (BackendUnavailable), up to the call's deadline. CRC32C is
computed here in pure Python (the inputs are a few hundred bytes), so no native package is needed.

The SDK runs over its REST transport with its own retries off (`retry=None`) and each request's
socket timeout set to the attempt timeout; `backends.calls.retry` paces the attempts. `build`
does nothing remote: the SDK client is created on first use, because resolving application
default credentials may probe the GCE metadata server. SDK and google-auth exceptions are
translated in one place, `_translate`.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Mapping
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import google.auth
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import kms_v1
from google.oauth2 import service_account
from google.protobuf.json_format import ParseError  # type: ignore[import-untyped]

from agent.crypto import b64url_decode, b64url_encode
from backends.base import BackendConfigError, BackendDenied, BackendError, BackendUnavailable
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


class GcpKmsWrapper:
    """Wraps data keys with Cloud KMS Encrypt/Decrypt on one symmetric CryptoKey."""

    __slots__ = ("_client", "_credentials", "_endpoint", "_lock", "_policy", "key_name")
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
        self._endpoint = endpoint
        self._credentials = credentials  # None: application default credentials, on first use
        self._policy = policy
        self._lock = threading.Lock()
        self._client: kms_v1.KeyManagementServiceClient | None = None

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
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.transport.close()  # type: ignore[no-untyped-call]

    def __repr__(self) -> str:
        return f"GcpKmsWrapper(key_name={self.key_name!r}, endpoint={self._endpoint!r})"

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
            response = self._sdk().encrypt(
                request=request, retry=None, timeout=self._policy.attempt_timeout
            )
        except _SDK_ERRORS as exc:
            raise _translate(exc, "encrypt", self.key_name) from exc
        if not (
            response.verified_plaintext_crc32c
            and response.verified_additional_authenticated_data_crc32c
        ):
            raise _corrupted("encrypt", "did not confirm the request's checksums")
        if _checksum(response.ciphertext_crc32c) != crc32c(response.ciphertext):
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
            response = self._sdk().decrypt(
                request=request, retry=None, timeout=self._policy.attempt_timeout
            )
        except _SDK_ERRORS as exc:
            raise _translate(exc, "decrypt", self.key_name, kid=kid) from exc
        if _checksum(response.plaintext_crc32c) != crc32c(response.plaintext):
            raise _corrupted("decrypt", "returned a plaintext that fails its checksum")
        return bytes(response.plaintext)

    def _sdk(self) -> kms_v1.KeyManagementServiceClient:
        """The SDK client, created on first use (resolving default credentials may need I/O)."""
        with self._lock:
            if self._client is None:
                credentials = self._credentials
                if credentials is None:
                    credentials, _project = google.auth.default(scopes=_SCOPES)
                options = ClientOptions(api_endpoint=self._endpoint) if self._endpoint else None
                self._client = kms_v1.KeyManagementServiceClient(
                    credentials=credentials, transport="rest", client_options=options
                )
            return self._client


def _checksum(value: object) -> int | None:
    """A proto Int64Value checksum field as proto-plus hands it over: an int, or None if unset."""
    return value if isinstance(value, int) else None


def _corrupted(operation: Operation, what: str) -> BackendUnavailable:
    return BackendUnavailable(
        f"Cloud KMS {operation} {what} (data corrupted in transit); the response was discarded",
        "retried until the deadline; if it persists, something between the agent and Cloud KMS "
        "alters requests or responses",
    )


def _error_fields(exc: api_exceptions.GoogleAPICallError) -> tuple[str, str]:
    """The canonical status (e.g. FAILED_PRECONDITION) and the server's own message.

    Over REST the SDK picks the exception class from the HTTP status alone, so a 400 is a plain
    BadRequest whether Cloud KMS said INVALID_ARGUMENT or FAILED_PRECONDITION: read the JSON.
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


def _translate(
    exc: BaseException, operation: Operation, key_name: str, *, kid: str = "?"
) -> BackendError:
    """The one place where google-cloud, google-auth and transport errors become ours."""
    permission = f"cloudkms.cryptoKeyVersions.useTo{operation.capitalize()}"
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        status, message = _error_fields(exc)
        said = f"{status or exc.code}: {message}"
        if isinstance(exc, api_exceptions.Unauthorized):
            return BackendConfigError(
                f"backend.credentials_file: Cloud KMS rejected the agent's credentials ({said})",
                _CREDENTIALS_HINT,
            )
        if isinstance(exc, api_exceptions.Forbidden):
            return BackendDenied(
                f"Cloud KMS denied {operation} with {key_name}: the agent lacks permission "
                f"{permission} ({said})",
                f"grant the agent's identity {_ROLE} (permission {permission}) on the key",
            )
        if isinstance(exc, api_exceptions.NotFound):
            if operation == "encrypt":
                return BackendConfigError(
                    f"backend.key_name: Cloud KMS has no key {key_name} ({said})",
                    "check the project, location, key ring and key name",
                )
            return BackendDenied(
                f"the data key of {kid} cannot be unwrapped: Cloud KMS has no key {key_name} "
                f"({said})",
                "configure the key this key set was sealed with (backend.key_name)",
            )
        if isinstance(exc, _RETRYABLE):
            return BackendUnavailable(f"Cloud KMS {operation} failed ({said})")
        if isinstance(exc, api_exceptions.BadRequest) and status == "FAILED_PRECONDITION":
            return BackendDenied(
                f"Cloud KMS refused to {operation} with {key_name}: the key version is not "
                f"enabled (disabled, scheduled for destruction or destroyed) ({said})",
                "re-enable the key version (gcloud kms keys versions enable) or restore it; data "
                "wrapped by a destroyed version cannot be recovered",
            )
        if isinstance(exc, api_exceptions.BadRequest) and operation == "decrypt":
            return BackendDenied(
                f"the wrapped data key of {kid} does not decrypt with {key_name} (tampered, or "
                f"wrapped for another kid or cluster prefix) ({said})"
            )
        return BackendDenied(
            f"Cloud KMS refused to {operation} with {key_name} ({said})",
            "check that backend.key_name names a symmetric ENCRYPT_DECRYPT key with an enabled "
            "primary version",
        )
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
            f"Cloud KMS {operation} failed: {type(exc).__name__}: {detail}",
            "Cloud KMS may be unreachable from this node (network, DNS, proxy) or overloaded; "
            "retry with backoff",
        )
    raise TypeError(f"not an SDK error: {type(exc).__name__}") from exc  # pragma: no cover


# ---- construction -------------------------------------------------------------------------------


def _endpoint(value: object) -> str | None:
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
            f"backend.endpoint: {value!r} would send data keys in clear over the network",
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


def _credentials(value: object, endpoint: str | None) -> Credentials | None:
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
            value, scopes=_SCOPES
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
    endpoint = _endpoint(options.get("endpoint"))
    credentials = _credentials(options.get("credentials_file"), endpoint)
    return GcpKmsWrapper(
        key_name,
        endpoint=endpoint,
        credentials=credentials,
        policy=CallPolicy.from_options(options),
    )
