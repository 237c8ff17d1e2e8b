"""A FAKE of Cloud KMS's REST API, for tests: Google ships no Cloud KMS emulator.

It is not Google's service. It serves only what keyquorum calls, `POST /v1/{name}:encrypt` and
`POST /v1/{name}:decrypt`, on 127.0.0.1, in the wire format of the real REST API: JSON with
camelCase fields, bytes as standard base64, CRC32C checksums as int64 strings, the name of the
CryptoKeyVersion used in every Encrypt response, and errors in Google's JSON error shape
(`{"error": {"code", "message", "status"}}`) so the SDK raises the same exception classes as
against Cloud KMS. Each CryptoKeyVersion has its own random AES-256-GCM key held in memory; the
ciphertext starts with the version number, so Decrypt finds the version as Cloud KMS does. AAD is
honoured, checksums are verified and reported, disabled versions refuse with FAILED_PRECONDITION.

Test controls: `create_key`, `rotate` (a new primary version), `disable`, `fail(code, times)`
(answer every request, or the next `times`, with an error such as 503 or 403), `corrupt(times)`
(send wrong checksums), `heal`. Use it as a context manager: leaving stops the server thread,
drops open keep-alive connections and closes the listening socket.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_ROUTE = re.compile(r"/v1/(?P<name>projects/[^:]+):(?P<verb>encrypt|decrypt)")
_VERSION = re.compile(r"(?P<key>.+/cryptoKeys/[^/]+)/cryptoKeyVersions/(?P<number>[0-9]+)")
_MAX_DATA = 64 * 1024
_HEADER = struct.Struct(">I")  # the version number that starts every ciphertext
_NONCE = 12


def crc32c(data: bytes) -> int:
    """CRC32C computed bit by bit: independent of the table-driven one in backends/gcp.py."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


class KmsError(Exception):
    """An error answer: HTTP code, canonical status and message, as Cloud KMS sends them."""

    def __init__(self, code: int, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status or STATUS[code]
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


@dataclass
class _Version:
    aead: AESGCM
    enabled: bool = True


@dataclass
class _Key:
    versions: dict[int, _Version] = field(default_factory=dict)
    primary: int = 0


class FakeCloudKms:
    """In-memory symmetric CryptoKeys behind a loopback HTTP server (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._fault: int | None = None
        self._fault_left: int | None = None  # None: until heal()
        self._corrupt_left = 0
        self.request_count = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- test controls ------------------------------------------------------------------------

    def create_key(self, key_name: str) -> str:
        """Create a CryptoKey with one enabled primary version; returns that version's name."""
        with self._lock:
            self._keys[key_name] = _Key()
        return self.rotate(key_name)

    def rotate(self, key_name: str) -> str:
        """Add a version and make it primary, as `gcloud kms keys versions create --primary`."""
        with self._lock:
            key = self._keys[key_name]
            number = max(key.versions, default=0) + 1
            key.versions[number] = _Version(AESGCM(AESGCM.generate_key(bit_length=256)))
            key.primary = number
        return f"{key_name}/cryptoKeyVersions/{number}"

    def disable(self, version_name: str) -> None:
        match = _VERSION.fullmatch(version_name)
        assert match, version_name
        with self._lock:
            self._keys[match["key"]].versions[int(match["number"])].enabled = False

    def fail(self, code: int, times: int | None = None) -> None:
        """Answer the next `times` requests (every request if None) with HTTP `code`."""
        with self._lock:
            self._fault, self._fault_left = code, times

    def corrupt(self, times: int) -> None:
        """Send wrong response checksums in the next `times` successful answers."""
        with self._lock:
            self._corrupt_left = times

    def heal(self) -> None:
        with self._lock:
            self._fault, self._fault_left, self._corrupt_left = None, None, 0

    # ---- server lifecycle ---------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start the fake first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeCloudKms:
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-cloud-kms",
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

    def __enter__(self) -> FakeCloudKms:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- the API ------------------------------------------------------------------------------

    def handle(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """One request: (HTTP status, JSON body)."""
        url = urlsplit(path)
        route = _ROUTE.fullmatch(unquote(url.path))
        with self._lock:
            self.request_count += 1
            try:
                if route is None:
                    raise KmsError(404, f"The requested URL {url.path} was not found.")
                self._inject_fault(route["verb"], route["name"])
                request = _json_object(body)
                if route["verb"] == "encrypt":
                    answer = self._encrypt(route["name"], request)
                else:
                    answer = self._decrypt(route["name"], request)
            except KmsError as exc:
                return exc.code, exc.body()
            if self._corrupt_left > 0:
                self._corrupt_left -= 1
                for name in ("ciphertextCrc32c", "plaintextCrc32c"):
                    if name in answer:
                        answer[name] = str((int(answer[name]) + 1) % 2**32)
        # Enums are numbers when the client asks for them ($alt=json;enum-encoding=int).
        answer["protectionLevel"] = 1 if "enum-encoding=int" in unquote(url.query) else "SOFTWARE"
        return 200, answer

    def _inject_fault(self, verb: str, name: str) -> None:
        if self._fault is None:
            return
        code = self._fault
        if self._fault_left is not None:
            self._fault_left -= 1
            if self._fault_left <= 0:
                self._fault = self._fault_left = None
        if code == 403:
            permission = f"cloudkms.cryptoKeyVersions.useTo{verb.capitalize()}"
            raise KmsError(
                403, f"Permission '{permission}' denied on resource '{name}' (or it may not exist)."
            )
        messages = {
            401: "Request had invalid authentication credentials. Expected OAuth 2 access token, "
            "login cookie or other valid authentication credential.",
            429: "Quota exceeded for quota metric 'Cryptographic requests'.",
            503: "The service is currently unavailable.",
        }
        raise KmsError(code, messages.get(code, "Internal error encountered."))

    def _encrypt(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        version_match = _VERSION.fullmatch(name)
        key_name = version_match["key"] if version_match else name
        key = self._key(key_name)
        number = int(version_match["number"]) if version_match else key.primary
        version_name = f"{key_name}/cryptoKeyVersions/{number}"
        version = key.versions.get(number)
        if version is None:
            raise KmsError(404, f"CryptoKeyVersion {version_name} not found.")
        _require_enabled(version, version_name)
        plaintext = _bytes_field(request, "plaintext", required=True)
        aad = _bytes_field(request, "additionalAuthenticatedData")
        _check_crc(request, "plaintext", plaintext)
        _check_crc(request, "additionalAuthenticatedData", aad)
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
        }

    def _decrypt(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        key = self._key(name)
        ciphertext = _bytes_field(request, "ciphertext", required=True)
        aad = _bytes_field(request, "additionalAuthenticatedData")
        _check_crc(request, "ciphertext", ciphertext)
        _check_crc(request, "additionalAuthenticatedData", aad)
        if len(ciphertext) < _HEADER.size + _NONCE + 16:
            raise KmsError(400, "Decryption failed: the ciphertext is invalid.")
        (number,) = _HEADER.unpack_from(ciphertext)
        version = key.versions.get(number)
        if version is None:
            raise KmsError(400, "Decryption failed: the ciphertext is invalid.")
        _require_enabled(version, f"{name}/cryptoKeyVersions/{number}")
        nonce = ciphertext[_HEADER.size : _HEADER.size + _NONCE]
        try:
            plaintext = version.aead.decrypt(nonce, ciphertext[_HEADER.size + _NONCE :], aad)
        except InvalidTag:
            raise KmsError(
                400, "Decryption failed: verify that 'name' refers to the correct CryptoKey."
            ) from None
        return {
            "plaintext": base64.b64encode(plaintext).decode(),
            "plaintextCrc32c": str(crc32c(plaintext)),
            "usedPrimary": number == key.primary,
        }

    def _key(self, name: str) -> _Key:
        key = self._keys.get(name)
        if key is None:
            raise KmsError(404, f"CryptoKey {name} not found.")
        return key


def _require_enabled(version: _Version, version_name: str) -> None:
    if not version.enabled:
        raise KmsError(
            400,
            f"The request cannot be fulfilled. Resource {version_name} has value DISABLED in "
            "field crypto_key_version.state.",
            "FAILED_PRECONDITION",
        )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        raise KmsError(400, "Invalid JSON payload received.") from None
    if not isinstance(request, dict):
        raise KmsError(400, "Invalid JSON payload received. Expected an object.")
    return request


def _bytes_field(request: dict[str, Any], name: str, *, required: bool = False) -> bytes:
    value = request.get(name, "")
    try:
        data = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except binascii.Error:
        data = None
    if data is None:
        raise KmsError(400, f"Invalid value at '{name}' (TYPE_BYTES), Base64 decoding failed.")
    if required and not data:
        raise KmsError(400, f"{name} is required.")
    if len(data) > _MAX_DATA:
        raise KmsError(400, f"{name} is larger than {_MAX_DATA} bytes.")
    return data


def _check_crc(request: dict[str, Any], name: str, data: bytes) -> None:
    """Verify `<name>Crc32c` when sent, as Cloud KMS does (an int64 sent as a JSON string)."""
    sent = request.get(f"{name}Crc32c")
    if sent is not None and int(sent) != crc32c(data):
        raise KmsError(400, f"The checksum in field {name}_crc32c did not match the data.")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    disable_nagle_algorithm = True  # else each small response waits ~40 ms for a delayed ACK
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        code, payload = self.server.kms.handle(self.path, self.rfile.read(length))
        self._send(code, payload)

    def do_GET(self) -> None:
        self._send(404, KmsError(404, f"The requested URL {self.path} was not found.").body())

    def _send(self, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # handler threads are joined by server_close()

    def __init__(self, kms: FakeCloudKms) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.kms = kms
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
