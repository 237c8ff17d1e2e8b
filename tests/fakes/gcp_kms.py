"""A FAKE of Cloud KMS's REST API, for tests: Google ships no Cloud KMS emulator.

It is not Google's service. It serves only what keyquorum calls, on 127.0.0.1, in the wire format
of the real REST API: JSON with camelCase fields, bytes as standard base64, CRC32C checksums as
int64 strings, enums as numbers when the client asks for them (`$alt=json;enum-encoding=int`, as
the SDK does) and as names otherwise, and errors in Google's JSON error shape
(`{"error": {"code", "message", "status"}}`) so the SDK raises the same exception classes as
against Cloud KMS.

Symmetric keys (the wrapper): `:encrypt` and `:decrypt`. Each CryptoKeyVersion has its own random
AES-256-GCM key held in memory; the ciphertext starts with the version number, so Decrypt finds
the version as Cloud KMS does. AAD is honoured, checksums are verified and reported, versions
that are not ENABLED refuse with FAILED_PRECONDITION.

Asymmetric signing keys (the remote signer): createCryptoKey (ASYMMETRIC_SIGN, one version of
EC_SIGN_P256_SHA256, EC_SIGN_P384_SHA384, RSA_SIGN_PKCS1_2048_SHA256, RSA_SIGN_PSS_2048_SHA256 or
EC_SIGN_ED25519 with a real key from `cryptography`), list cryptoKeys (paged), updateCryptoKey
(labels), getCryptoKeyVersion, getPublicKey (PEM), asymmetricSign (digest of the algorithm's hash,
or data for Ed25519; DER ECDSA, PSS salted with the hash length, as Cloud KMS) and
destroyCryptoKeyVersion (DESTROY_SCHEDULED 30 days ahead; the key stays, as keys cannot be
deleted). New versions can be made to stay PENDING_GENERATION for a number of state reads, as
Cloud KMS generates asymmetric keys asynchronously.

Test controls: `create_key_ring`, `create_key` (symmetric), `rotate`, `disable`, `destroy`,
`version_state`, `labels`, `generation_polls`, `generation_outcome`, `max_page_size`, and from
`GoogleApiFake`: `fail(code, times)` (answer every request, or the next `times`, with an error such
as 503 or 403), `lose_answers(times)` (carry requests out, then answer 503: a lost response),
`corrupt(times)` (send wrong checksums), `heal`, `request_count`, `calls`. Use it as a context
manager: leaving stops the server thread, drops open keep-alive connections and closes the
listening socket.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import json
import os
import re
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_MAX_DATA = 64 * 1024


def crc32c(data: bytes) -> int:
    """CRC32C computed bit by bit: independent of the table-driven one in backends/gcp.py."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def timestamp(moment: datetime.datetime | None = None) -> str:
    """RFC 3339 in UTC with microseconds, as Google's JSON renders a Timestamp."""
    moment = moment or datetime.datetime.now(datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    """An error answer: HTTP code, canonical status and message, as Google APIs send them."""

    def __init__(self, code: int, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status or STATUS[code]
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


KmsError = ApiError


def failed_precondition(message: str) -> ApiError:
    return ApiError(400, message, "FAILED_PRECONDITION")


@dataclass(frozen=True)
class Route:
    """One request, resolved: the method's name, the permission it needs, on what resource."""

    method: str
    permission: str
    resource: str
    run: Callable[[dict[str, list[str]], bytes], dict[str, Any]]


class GoogleApiFake:
    """A loopback HTTP server answering a Google REST API from memory; subclasses supply `route`.

    Requests are handled one at a time under a lock, so the state needs no further locking.
    """

    thread_name: ClassVar[str] = "fake-google-api"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fault: int | None = None
        self._fault_left: int | None = None  # None: until heal()
        self._lose_left = 0
        self._corrupt_left = 0
        self.int_enums = False  # how the request being answered wants enums
        self.request_count = 0
        self.calls: list[tuple[str, str]] = []  # (method, resource) of every routed request
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- test controls ------------------------------------------------------------------------

    def fail(self, code: int, times: int | None = None) -> None:
        """Answer the next `times` requests (every request if None) with HTTP `code`."""
        with self._lock:
            self._fault, self._fault_left = code, times

    def lose_answers(self, times: int) -> None:
        """Carry out the next `times` requests, then answer 503 as if the response were lost."""
        with self._lock:
            self._lose_left = times

    def corrupt(self, times: int) -> None:
        """Send wrong response checksums in the next `times` successful answers."""
        with self._lock:
            self._corrupt_left = times

    def heal(self) -> None:
        with self._lock:
            self._fault, self._fault_left = None, None
            self._corrupt_left = self._lose_left = 0

    def count(self, method: str) -> int:
        """How many requests of API method `method` (e.g. "asymmetricSign") were routed."""
        with self._lock:
            return sum(1 for called, _ in self.calls if called == method)

    # ---- server lifecycle ---------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start the fake first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=self.thread_name,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.shutdown()  # no new connections
        server.drop_connections()  # wake handler threads parked on idle keep-alive connections
        server.server_close()  # closes the socket and joins the handler threads
        thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- requests -----------------------------------------------------------------------------

    def route(self, verb: str, path: str, query: dict[str, list[str]]) -> Route:
        """The API method for an HTTP verb and (unquoted) path, or ApiError 404."""
        raise NotImplementedError

    def denied_message(self, route: Route) -> str:
        return (
            f"Permission '{route.permission}' denied on resource '{route.resource}' (or it may "
            "not exist)."
        )

    def handle(self, verb: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """One request: (HTTP status, JSON body)."""
        url = urlsplit(path)
        query = parse_qs(url.query)
        with self._lock:
            self.request_count += 1
            self.int_enums = "enum-encoding=int" in " ".join(query.get("$alt", []))
            try:
                route = self.route(verb, unquote(url.path), query)
                self.calls.append((route.method, route.resource))
                self._inject_fault(route)
                answer = route.run(query, body)
            except ApiError as exc:
                return exc.code, exc.body()
            if self._lose_left > 0:
                self._lose_left -= 1
                return 503, ApiError(503, "The service is currently unavailable.").body()
            if self._corrupt_left > 0:
                self._corrupt_left -= 1
                _corrupt_checksums(answer)
        return 200, answer

    def _inject_fault(self, route: Route) -> None:
        if self._fault is None:
            return
        code = self._fault
        if self._fault_left is not None:
            self._fault_left -= 1
            if self._fault_left <= 0:
                self._fault = self._fault_left = None
        if code == 403:
            raise ApiError(403, self.denied_message(route))
        messages = {
            401: "Request had invalid authentication credentials. Expected OAuth 2 access token, "
            "login cookie or other valid authentication credential.",
            429: "Quota exceeded for quota metric 'Cryptographic requests'.",
            503: "The service is currently unavailable.",
        }
        raise ApiError(code, messages.get(code, "Internal error encountered."))


def _corrupt_checksums(answer: dict[str, Any]) -> None:
    for name, value in answer.items():
        if name.endswith("Crc32c") and isinstance(value, str):
            answer[name] = str((int(value) + 1) % 2**32)
        elif isinstance(value, dict):
            _corrupt_checksums(value)


# ---- Cloud KMS ---------------------------------------------------------------------------------

_STATES = {
    "ENABLED": 1,
    "DISABLED": 2,
    "DESTROYED": 3,
    "DESTROY_SCHEDULED": 4,
    "PENDING_GENERATION": 5,
    "GENERATION_FAILED": 8,
}
_ALGORITHMS = {
    "GOOGLE_SYMMETRIC_ENCRYPTION": 1,
    "RSA_SIGN_PSS_2048_SHA256": 2,
    "RSA_SIGN_PKCS1_2048_SHA256": 5,
    "EC_SIGN_P256_SHA256": 12,
    "EC_SIGN_P384_SHA384": 13,
    "EC_SIGN_ED25519": 40,
}
_PURPOSES = {"ENCRYPT_DECRYPT": 1, "ASYMMETRIC_SIGN": 5}
_PROTECTION = {"SOFTWARE": 1}
# signing algorithm -> the digest field it takes (None: data, for Ed25519)
_SIGN_DIGESTS: dict[str, str | None] = {
    "EC_SIGN_P256_SHA256": "sha256",
    "EC_SIGN_P384_SHA384": "sha384",
    "RSA_SIGN_PKCS1_2048_SHA256": "sha256",
    "RSA_SIGN_PSS_2048_SHA256": "sha256",
    "EC_SIGN_ED25519": None,
}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"sha256": hashes.SHA256, "sha384": hashes.SHA384}
_DESTROY_AFTER = datetime.timedelta(days=30)  # Cloud KMS's default destroy_scheduled_duration

_SEGMENT = r"[^/:]+"
_RING = rf"projects/{_SEGMENT}/locations/{_SEGMENT}/keyRings/{_SEGMENT}"
_KEY = rf"{_RING}/cryptoKeys/{_SEGMENT}"
_VERSION_PATH = rf"{_KEY}/cryptoKeyVersions/{_SEGMENT}"
_VERSION = re.compile(r"(?P<key>.+/cryptoKeys/[^/]+)/cryptoKeyVersions/(?P<number>[0-9]+)")
_KEY_ID = re.compile(r"[a-zA-Z0-9_-]{1,63}")
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
_HEADER = struct.Struct(">I")  # the version number that starts every ciphertext
_NONCE = 12


@dataclass
class _Version:
    number: int
    algorithm: str
    create_time: str
    aead: AESGCM | None = None
    private_key: Any = None
    state: str = "ENABLED"
    polls_left: int = 0  # PENDING_GENERATION for this many more state reads
    outcome: str = "ENABLED"  # the state generation ends in
    destroy_time: str | None = None


@dataclass
class _Key:
    name: str
    purpose: str
    algorithm: str
    create_time: str
    labels: dict[str, str] = field(default_factory=dict)
    versions: dict[int, _Version] = field(default_factory=dict)
    primary: int = 0


class FakeCloudKms(GoogleApiFake):
    """In-memory CryptoKeys behind a loopback HTTP server (see the module docstring)."""

    thread_name = "fake-cloud-kms"

    def __init__(self) -> None:
        super().__init__()
        self._rings: set[str] = set()
        self._keys: dict[str, _Key] = {}
        self.generation_polls = 0  # new asymmetric versions stay pending for this many reads
        self.generation_outcome = "ENABLED"  # or "GENERATION_FAILED"
        self.max_page_size = 1000

    # ---- test controls ------------------------------------------------------------------------

    def create_key_ring(self, ring: str) -> None:
        with self._lock:
            self._rings.add(ring)

    def create_key(self, key_name: str) -> str:
        """Create a symmetric CryptoKey with one enabled primary version; that version's name."""
        with self._lock:
            self._rings.add(key_name.split("/cryptoKeys/")[0])
            self._keys[key_name] = _Key(
                key_name, "ENCRYPT_DECRYPT", "GOOGLE_SYMMETRIC_ENCRYPTION", timestamp()
            )
        return self.rotate(key_name)

    def rotate(self, key_name: str) -> str:
        """Add a version and make it primary, as `gcloud kms keys versions create --primary`."""
        with self._lock:
            key = self._keys[key_name]
            version = self._new_version(key)
            key.primary = version.number
        return f"{key_name}/cryptoKeyVersions/{version.number}"

    def disable(self, version_name: str) -> None:
        with self._lock:
            self._version(version_name).state = "DISABLED"

    def destroy(self, version_name: str) -> None:
        """Schedule a version's destruction behind keyquorum's back (as an operator would)."""
        with self._lock:
            version = self._version(version_name)
            version.state = "DESTROY_SCHEDULED"
            version.destroy_time = timestamp(datetime.datetime.now(datetime.UTC) + _DESTROY_AFTER)

    def version_state(self, version_name: str) -> str:
        with self._lock:
            return self._version(version_name).state

    def labels(self, key_name: str) -> dict[str, str]:
        with self._lock:
            return dict(self._keys[key_name].labels)

    def key_names(self, ring: str) -> list[str]:
        with self._lock:
            return [name for name in self._keys if name.startswith(f"{ring}/cryptoKeys/")]

    def _version(self, version_name: str) -> _Version:
        match = _VERSION.fullmatch(version_name)
        assert match, version_name
        return self._keys[match["key"]].versions[int(match["number"])]

    def _new_version(self, key: _Key) -> _Version:
        number = max(key.versions, default=0) + 1
        version = _Version(number, key.algorithm, timestamp())
        if key.purpose == "ENCRYPT_DECRYPT":
            version.aead = AESGCM(AESGCM.generate_key(bit_length=256))
        else:
            version.private_key = _generate(key.algorithm)
            version.outcome = self.generation_outcome
            version.polls_left = self.generation_polls
            version.state = "PENDING_GENERATION" if self.generation_polls else version.outcome
        key.versions[number] = version
        return version

    # ---- routing ------------------------------------------------------------------------------

    _ROUTES: ClassVar[list[tuple[str, re.Pattern[str], str, str]]] = [
        # (HTTP verb, path, API method, permission); method M is served by `_M` below
        ("POST", re.compile(rf"/v1/(?P<name>{_KEY}(?:/cryptoKeyVersions/{_SEGMENT})?):encrypt"),
         "encrypt", "cloudkms.cryptoKeyVersions.useToEncrypt"),
        ("POST", re.compile(rf"/v1/(?P<name>{_KEY}):decrypt"),
         "decrypt", "cloudkms.cryptoKeyVersions.useToDecrypt"),
        ("POST", re.compile(rf"/v1/(?P<name>{_RING})/cryptoKeys"),
         "createCryptoKey", "cloudkms.cryptoKeys.create"),
        ("GET", re.compile(rf"/v1/(?P<name>{_RING})/cryptoKeys"),
         "listCryptoKeys", "cloudkms.cryptoKeys.list"),
        ("PATCH", re.compile(rf"/v1/(?P<name>{_KEY})"),
         "updateCryptoKey", "cloudkms.cryptoKeys.update"),
        ("GET", re.compile(rf"/v1/(?P<name>{_VERSION_PATH})"),
         "getCryptoKeyVersion", "cloudkms.cryptoKeyVersions.get"),
        ("GET", re.compile(rf"/v1/(?P<name>{_VERSION_PATH})/publicKey"),
         "getPublicKey", "cloudkms.cryptoKeyVersions.viewPublicKey"),
        ("POST", re.compile(rf"/v1/(?P<name>{_VERSION_PATH}):asymmetricSign"),
         "asymmetricSign", "cloudkms.cryptoKeyVersions.useToSign"),
        ("POST", re.compile(rf"/v1/(?P<name>{_VERSION_PATH}):destroy"),
         "destroyCryptoKeyVersion", "cloudkms.cryptoKeyVersions.destroy"),
    ]  # fmt: skip

    def route(self, verb: str, path: str, query: dict[str, list[str]]) -> Route:
        for route_verb, pattern, method, permission in self._ROUTES:
            match = pattern.fullmatch(path) if route_verb == verb else None
            if match is not None:
                name = match["name"]
                handler = getattr(self, f"_{method}")
                return Route(
                    method,
                    permission,
                    name,
                    lambda query, body, handler=handler, name=name: handler(name, query, body),
                )
        raise ApiError(404, f"The requested URL {path} was not found.")

    # ---- rendering ----------------------------------------------------------------------------

    def _enum(self, table: dict[str, int], name: str) -> int | str:
        return table[name] if self.int_enums else name

    def _key_json(self, key: _Key) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "name": key.name,
            "purpose": self._enum(_PURPOSES, key.purpose),
            "createTime": key.create_time,
            "versionTemplate": {
                "protectionLevel": self._enum(_PROTECTION, "SOFTWARE"),
                "algorithm": self._enum(_ALGORITHMS, key.algorithm),
            },
            "destroyScheduledDuration": f"{int(_DESTROY_AFTER.total_seconds())}s",
        }
        if key.labels:
            answer["labels"] = dict(key.labels)
        if key.purpose == "ENCRYPT_DECRYPT" and key.primary:  # asymmetric keys have no primary
            answer["primary"] = self._version_json(key, key.versions[key.primary])
        return answer

    def _version_json(self, key: _Key, version: _Version) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "name": f"{key.name}/cryptoKeyVersions/{version.number}",
            "state": self._enum(_STATES, version.state),
            "protectionLevel": self._enum(_PROTECTION, "SOFTWARE"),
            "algorithm": self._enum(_ALGORITHMS, version.algorithm),
            "createTime": version.create_time,
        }
        if version.state not in ("PENDING_GENERATION", "GENERATION_FAILED"):
            answer["generateTime"] = version.create_time
        if version.destroy_time:
            answer["destroyTime"] = version.destroy_time
        return answer

    # ---- symmetric keys -----------------------------------------------------------------------

    def _encrypt(self, name: str, query: dict[str, list[str]], body: bytes) -> dict[str, Any]:
        request = json_object(body)
        version_match = _VERSION.fullmatch(name)
        key_name = version_match["key"] if version_match else name
        key = self._key(key_name)
        number = int(version_match["number"]) if version_match else key.primary
        version_name = f"{key_name}/cryptoKeyVersions/{number}"
        version = key.versions.get(number)
        if version is None:
            raise ApiError(404, f"CryptoKeyVersion {version_name} not found.")
        if version.aead is None:
            raise failed_precondition(f"{key_name} is not an ENCRYPT_DECRYPT key.")
        _require_state(version, version_name)
        plaintext = bytes_field(request, "plaintext", required=True)
        aad = bytes_field(request, "additionalAuthenticatedData")
        check_crc(request, "plaintext", plaintext)
        check_crc(request, "additionalAuthenticatedData", aad)
        nonce = os.urandom(_NONCE)
        ciphertext = _HEADER.pack(number) + nonce + version.aead.encrypt(nonce, plaintext, aad)
        return {
            "name": version_name,
            "ciphertext": base64.b64encode(ciphertext).decode(),
            "ciphertextCrc32c": str(crc32c(ciphertext)),
            "verifiedPlaintextCrc32c": "plaintextCrc32c" in request,
            "verifiedAdditionalAuthenticatedDataCrc32c": (
                "additionalAuthenticatedDataCrc32c" in request
            ),
            "protectionLevel": self._enum(_PROTECTION, "SOFTWARE"),
        }

    def _decrypt(self, name: str, query: dict[str, list[str]], body: bytes) -> dict[str, Any]:
        request = json_object(body)
        key = self._key(name)
        ciphertext = bytes_field(request, "ciphertext", required=True)
        aad = bytes_field(request, "additionalAuthenticatedData")
        check_crc(request, "ciphertext", ciphertext)
        check_crc(request, "additionalAuthenticatedData", aad)
        if len(ciphertext) < _HEADER.size + _NONCE + 16:
            raise ApiError(400, "Decryption failed: the ciphertext is invalid.")
        (number,) = _HEADER.unpack_from(ciphertext)
        version = key.versions.get(number)
        if version is None or version.aead is None:
            raise ApiError(400, "Decryption failed: the ciphertext is invalid.")
        _require_state(version, f"{name}/cryptoKeyVersions/{number}")
        nonce = ciphertext[_HEADER.size : _HEADER.size + _NONCE]
        try:
            plaintext = version.aead.decrypt(nonce, ciphertext[_HEADER.size + _NONCE :], aad)
        except InvalidTag:
            raise ApiError(
                400, "Decryption failed: verify that 'name' refers to the correct CryptoKey."
            ) from None
        return {
            "plaintext": base64.b64encode(plaintext).decode(),
            "plaintextCrc32c": str(crc32c(plaintext)),
            "usedPrimary": number == key.primary,
            "protectionLevel": self._enum(_PROTECTION, "SOFTWARE"),
        }

    # ---- asymmetric signing keys --------------------------------------------------------------

    def _createCryptoKey(
        self, ring: str, query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        if ring not in self._rings:
            raise ApiError(404, f"KeyRing {ring} not found.")
        key_id = query.get("cryptoKeyId", [""])[0]
        if not _KEY_ID.fullmatch(key_id):
            raise ApiError(400, f"Invalid value for crypto_key_id: {key_id!r}.")
        name = f"{ring}/cryptoKeys/{key_id}"
        request = json_object(body)
        purpose = _enum_name(_PURPOSES, request.get("purpose"), "crypto_key.purpose")
        template = request.get("versionTemplate") or {}
        default = "GOOGLE_SYMMETRIC_ENCRYPTION" if purpose == "ENCRYPT_DECRYPT" else None
        algorithm = _enum_name(
            _ALGORITHMS,
            template.get("algorithm", default),
            "crypto_key.version_template.algorithm",
        )
        if (purpose == "ASYMMETRIC_SIGN") != (algorithm in _SIGN_DIGESTS):
            raise ApiError(
                400, f"Algorithm {algorithm} is not compatible with CryptoKey purpose {purpose}."
            )
        labels = request.get("labels") or {}
        _check_labels(labels)
        if name in self._keys:
            raise ApiError(409, f"CryptoKey {name} already exists.", "ALREADY_EXISTS")
        key = _Key(name, purpose, algorithm, timestamp(), dict(labels))
        self._keys[name] = key
        version = self._new_version(key)
        if purpose == "ENCRYPT_DECRYPT":
            key.primary = version.number
        return self._key_json(key)

    def _listCryptoKeys(
        self, ring: str, query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        if ring not in self._rings:
            raise ApiError(404, f"KeyRing {ring} not found.")
        if query.get("filter") or query.get("orderBy"):
            raise ApiError(400, "This fake does not filter or sort.")
        keys = [key for key in self._keys.values() if key.name.startswith(f"{ring}/cryptoKeys/")]
        try:
            size = int(query.get("pageSize", ["0"])[0]) or 100
            start = int(query.get("pageToken", ["0"])[0] or 0)
        except ValueError:
            raise ApiError(400, "Invalid page size or page token.") from None
        size = min(size, self.max_page_size)
        page = keys[start : start + size]
        answer: dict[str, Any] = {"totalSize": len(keys)}
        if page:
            answer["cryptoKeys"] = [self._key_json(key) for key in page]
        if start + size < len(keys):
            answer["nextPageToken"] = str(start + size)
        return answer

    def _updateCryptoKey(
        self, name: str, query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        key = self._key(name)
        mask = ",".join(query.get("updateMask", []))
        if mask != "labels":
            raise ApiError(400, f"This fake updates only labels, not {mask!r}.")
        labels = json_object(body).get("labels") or {}
        _check_labels(labels)
        key.labels = dict(labels)
        return self._key_json(key)

    def _getCryptoKeyVersion(
        self, name: str, query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        key, version = self._key_version(name)
        if version.state == "PENDING_GENERATION":
            if version.polls_left > 0:
                version.polls_left -= 1
            else:
                version.state = version.outcome
        return self._version_json(key, version)

    def _getPublicKey(self, name: str, query: dict[str, list[str]], body: bytes) -> dict[str, Any]:
        key, version = self._key_version(name)
        if key.purpose != "ASYMMETRIC_SIGN":
            raise failed_precondition(f"{key.name} has purpose {key.purpose}.")
        _require_state(version, name)
        pem = (
            version.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        return {
            "pem": pem,
            "algorithm": self._enum(_ALGORITHMS, version.algorithm),
            "pemCrc32c": str(crc32c(pem.encode())),
            "name": name,
            "protectionLevel": self._enum(_PROTECTION, "SOFTWARE"),
        }

    def _asymmetricSign(
        self, name: str, query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        key, version = self._key_version(name)
        if key.purpose != "ASYMMETRIC_SIGN":
            raise failed_precondition(f"{key.name} has purpose {key.purpose}.")
        _require_state(version, name)
        request = json_object(body)
        wanted = _SIGN_DIGESTS[version.algorithm]
        if wanted is None:  # Ed25519 signs the data itself
            if "digest" in request:
                raise ApiError(400, f"{version.algorithm} signs data, not a digest.")
            data = bytes_field(request, "data", required=True)
            check_crc(request, "data", data)
            signature = version.private_key.sign(data)
        else:
            digests = request.get("digest")
            if "data" in request or not isinstance(digests, dict) or set(digests) != {wanted}:
                raise ApiError(
                    400,
                    f"The request digest algorithm does not match the CryptoKeyVersion algorithm "
                    f"{version.algorithm} (expected digest.{wanted}).",
                )
            digest = bytes_field(digests, wanted, required=True)
            if len(digest) != _HASHES[wanted].digest_size:
                raise ApiError(400, f"digest.{wanted} has the wrong length.")
            check_crc(request, "digest", digest)
            signature = _sign_digest(version, digest, _HASHES[wanted]())
        return {
            "signature": base64.b64encode(signature).decode(),
            "signatureCrc32c": str(crc32c(signature)),
            "verifiedDigestCrc32c": "digestCrc32c" in request,
            "verifiedDataCrc32c": "dataCrc32c" in request,
            "name": name,
            "protectionLevel": self._enum(_PROTECTION, "SOFTWARE"),
        }

    def _destroyCryptoKeyVersion(
        self, name: str, query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        key, version = self._key_version(name)
        if version.state not in ("ENABLED", "DISABLED"):
            raise failed_precondition(
                f"The request cannot be fulfilled. Resource {name} has value {version.state} in "
                "field crypto_key_version.state."
            )
        version.state = "DESTROY_SCHEDULED"
        version.destroy_time = timestamp(datetime.datetime.now(datetime.UTC) + _DESTROY_AFTER)
        return self._version_json(key, version)

    def _key(self, name: str) -> _Key:
        key = self._keys.get(name)
        if key is None:
            raise ApiError(404, f"CryptoKey {name} not found.")
        return key

    def _key_version(self, name: str) -> tuple[_Key, _Version]:
        match = _VERSION.fullmatch(name)
        key = self._keys.get(match["key"]) if match else None
        version = key.versions.get(int(match["number"])) if key and match else None
        if key is None or version is None:
            raise ApiError(404, f"CryptoKeyVersion {name} not found.")
        return key, version


def _generate(algorithm: str) -> Any:
    if algorithm == "EC_SIGN_P256_SHA256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "EC_SIGN_P384_SHA384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == "EC_SIGN_ED25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _sign_digest(version: _Version, digest: bytes, hash_algorithm: hashes.HashAlgorithm) -> bytes:
    prehashed = Prehashed(hash_algorithm)
    key = version.private_key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(digest, ec.ECDSA(prehashed))  # DER, as Cloud KMS returns it
    if version.algorithm.startswith("RSA_SIGN_PSS"):
        salted = padding.PSS(padding.MGF1(hash_algorithm), hash_algorithm.digest_size)
        return key.sign(digest, salted, prehashed)  # type: ignore[no-any-return]
    return key.sign(digest, padding.PKCS1v15(), prehashed)  # type: ignore[no-any-return]


def _require_state(version: _Version, version_name: str) -> None:
    if version.state != "ENABLED":
        raise failed_precondition(
            f"The request cannot be fulfilled. Resource {version_name} has value "
            f"{version.state} in field crypto_key_version.state."
        )


def _enum_name(table: dict[str, int], value: object, where: str) -> str:
    """An enum sent as a number or a name (the SDK sends numbers)."""
    for name, number in table.items():
        if value in (name, number):
            return name
    raise ApiError(400, f"Invalid value at '{where}': {value!r}.")


def _check_labels(labels: object) -> None:
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _LABEL_KEY.fullmatch(k)
        and _LABEL_VALUE.fullmatch(v)
        for k, v in labels.items()
    ):  # fmt: skip
        raise ApiError(400, f"Invalid labels: {labels!r}.")


def json_object(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        raise ApiError(400, "Invalid JSON payload received.") from None
    if not isinstance(request, dict):
        raise ApiError(400, "Invalid JSON payload received. Expected an object.")
    return request


def bytes_field(request: dict[str, Any], name: str, *, required: bool = False) -> bytes:
    value = request.get(name, "")
    try:
        data = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except binascii.Error:
        data = None
    if data is None:
        raise ApiError(400, f"Invalid value at '{name}' (TYPE_BYTES), Base64 decoding failed.")
    if required and not data:
        raise ApiError(400, f"{name} is required.")
    if len(data) > _MAX_DATA:
        raise ApiError(400, f"{name} is larger than {_MAX_DATA} bytes.")
    return data


def check_crc(request: dict[str, Any], name: str, data: bytes) -> None:
    """Verify `<name>Crc32c` when sent, as Google does (an int64 sent as a JSON string)."""
    sent = request.get(f"{name}Crc32c")
    if sent is not None and int(sent) != crc32c(data):
        raise ApiError(400, f"The checksum in field {name}_crc32c did not match the data.")


# ---- HTTP plumbing -----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    disable_nagle_algorithm = True  # else each small response waits ~40 ms for a delayed ACK
    server: _Server

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        code, payload = self.server.api.handle(self.command, self.path, body)
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # handler threads are joined by server_close()

    def __init__(self, api: GoogleApiFake) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.api = api
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                connection.shutdown(socket.SHUT_RDWR)
