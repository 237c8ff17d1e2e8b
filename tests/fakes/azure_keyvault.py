"""A FAKE Azure Key Vault (keys only) over HTTPS on 127.0.0.1, for the azure-keyvault-keys SDK.

No Key Vault emulator can be installed on this machine (lowkey-vault needs Maven or Docker), so
this is a small stand-in that speaks just enough of the REST API for `backends/azure.py`, driven
by the real SDK:

- TLS with a throwaway private CA generated at start with `cryptography` (the server certificate
  has SAN IP 127.0.0.1 and DNS localhost); `ca_file` is the CA's PEM, for `connection_verify`.
  The SDK refuses to send bearer tokens over plain http, so TLS is not optional.
- Key Vault's challenge authentication: a request without a valid `Authorization: Bearer` token
  gets 401 with `WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/
  <tenant>", resource="https://vault.azure.net"`; the SDK then asks its credential for a token
  for `https://vault.azure.net/.default` and resends. `FakeCredential` hands out `fake.token`.
- GET /keys/{name}[/{version}], POST /keys/{name}/{version}/wrapkey and /unwrapkey with
  {"alg": "RSA-OAEP-256", "value": b64url} -> {"kid": full key id, "value": b64url}: real
  RSA-OAEP with SHA-256 under RSA-2048 keys held in memory. `create_key` and `rotate_key` add
  versions (the newest is current); `disable` turns one version off.
- Switches: `outage` (every request 503), `fail_next(n)` (the next n requests 503: a transient
  outage), `forbidden` (authenticated requests 403, as without an RBAC role) and `stop()` (the
  listener and every open connection are closed: the vault is unreachable).
- Errors use Key Vault's JSON shape {"error": {"code": ..., "message": ...}}.

Fidelity gaps: no key creation over HTTP, no rotation policy, tags, backups or soft-delete; a
disabled key is refused with 403 like the real service, but expiry dates are not modelled. Every
request is logged in `requests` as (method, path) so a test can see what reached the "vault".
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import shutil
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from azure.core.credentials import AccessToken
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TENANT = "72f988bf-0000-4000-8000-00000000kq01"
RESOURCE = "https://vault.azure.net"
KEY_OPS = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeCredential:
    """The smallest azure TokenCredential: a fixed token, and a record of what was asked."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.calls: list[tuple[tuple[str, ...], dict[str, Any]]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.calls.append((scopes, kwargs))
        return AccessToken(self.token, int(time.time()) + 3600)


@dataclass
class _KeyVersion:
    version: str
    private: rsa.RSAPrivateKey
    created: int
    enabled: bool = True


@dataclass
class _Key:
    versions: list[_KeyVersion] = field(default_factory=list)


class _Error(Exception):
    def __init__(self, status: int, code: str, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class _Server(ThreadingHTTPServer):
    """Accepts on the plain listener; the TLS handshake runs in the connection's own thread."""

    daemon_threads = True
    block_on_close = False  # FakeKeyVault.stop joins the connection threads itself

    def __init__(self, vault: FakeKeyVault, context: ssl.SSLContext) -> None:
        self.vault = vault
        self.tls = context
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        self.vault._track(conn, add=True)
        try:
            self.RequestHandlerClass(conn, client_address, self)
        except OSError:
            pass  # the client or stop() closed the connection
        finally:
            self.vault._track(conn, add=False)
            conn.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 10
    server: _Server

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            status, payload = self.server.vault._dispatch(method, self.path, self.headers, body)
            headers: dict[str, str] = {}
        except _Error as exc:
            status, headers = exc.status, exc.headers
            payload = {"error": {"code": exc.code, "message": exc.message}}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class FakeKeyVault:
    """A key vault on https://127.0.0.1:<port>; use as a context manager (stops on exit)."""

    def __init__(self, tenant: str = TENANT) -> None:
        self.tenant = tenant
        self.token = f"fake-kv-token-{uuid.uuid4().hex}"
        self.outage = False
        self.forbidden = False
        self.requests: list[tuple[str, str]] = []
        self._fail_next = 0
        self._keys: dict[str, _Key] = {}
        self._lock = threading.Lock()
        self._conns: set[ssl.SSLSocket] = set()
        self._dir: Path | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeKeyVault:
        self._dir = Path(tempfile.mkdtemp(prefix="kq-akv-"))
        context = _tls_context(self._dir)
        self._server = _Server(self, context)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every open connection: the vault becomes unreachable."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            # the plain socket's shutdown: wakes the thread blocked reading the TLS stream
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with self._lock:
                if not self._conns:
                    break
            time.sleep(0.01)

    def __enter__(self) -> FakeKeyVault:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def vault_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> str:
        assert self._dir is not None, "start the fake first"
        return str(self._dir / "ca.pem")

    def credential(self) -> FakeCredential:
        return FakeCredential(self.token)

    # -- keys ------------------------------------------------------------------------------
    def create_key(self, name: str) -> str:
        """Create key `name` (or a new version of it); returns the new version's full key id."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        version = uuid.uuid4().hex
        with self._lock:
            self._keys.setdefault(name, _Key()).versions.append(
                _KeyVersion(version, private, int(time.time()))
            )
        return self.key_id(name, version)

    rotate_key = create_key  # Key Vault's rotate makes a new current version, like create

    def disable(self, name: str, version: str) -> None:
        with self._lock:
            self._find(name, version).enabled = False

    def key_id(self, name: str, version: str) -> str:
        return f"{self.vault_url}/keys/{name}/{version}"

    def fail_next(self, count: int) -> None:
        """The next `count` requests get 503, then the vault answers again."""
        with self._lock:
            self._fail_next = count

    def count(self, method: str, suffix: str) -> int:
        """How many requests with this method had a path ending in `suffix`."""
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and p.endswith(suffix))

    # -- internals -------------------------------------------------------------------------
    def _track(self, conn: ssl.SSLSocket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _find(self, name: str, version: str) -> _KeyVersion:
        key = self._keys.get(name)
        if key is not None and key.versions:
            if not version:
                return key.versions[-1]
            for candidate in key.versions:
                if candidate.version == version:
                    return candidate
        shown = f"{name}/{version}" if version else name
        raise _Error(
            404,
            "KeyNotFound",
            f"A key with (name/id) {shown} was not found in this key vault. If you recently "
            "deleted this key you may be able to recover it using the correct recovery command.",
        )

    def _dispatch(
        self, method: str, target: str, headers: Any, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        path = urlsplit(target).path
        with self._lock:
            self.requests.append((method, path))
            failing = self.outage or self._fail_next > 0
            if self._fail_next > 0:
                self._fail_next -= 1
        if failing:
            raise _Error(503, "ServiceUnavailable", "The service is temporarily unavailable.")
        if headers.get("Authorization") != f"Bearer {self.token}":
            raise _Error(
                401,
                "Unauthorized",
                "AKV10000: Request is missing a Bearer or PoP token.",
                **{
                    "WWW-Authenticate": (
                        f'Bearer authorization="https://login.microsoftonline.com/{self.tenant}", '
                        f'resource="{RESOURCE}"'
                    )
                },
            )
        if self.forbidden:
            raise _Error(
                403,
                "Forbidden",
                "Caller is not authorized to perform action on resource. If role assignments "
                "were recently changed, please wait several minutes for role assignments to "
                "become effective.",
            )
        parts = [p for p in path.split("/") if p]
        with self._lock:
            if method == "GET" and len(parts) in (2, 3) and parts[0] == "keys":
                version = self._find(parts[1], parts[2] if len(parts) == 3 else "")
                return 200, self._bundle(parts[1], version)
            if (
                method == "POST"
                and len(parts) == 4
                and parts[0] == "keys"
                and parts[3] in ("wrapkey", "unwrapkey")
            ):
                version = self._find(parts[1], parts[2])
                return 200, self._operate(parts[1], version, parts[3], body)
        raise _Error(400, "BadParameter", f"Method {method} {path} is not supported by the fake.")

    def _bundle(self, name: str, version: _KeyVersion) -> dict[str, Any]:
        numbers = version.private.public_key().public_numbers()
        return {
            "key": {
                "kid": self.key_id(name, version.version),
                "kty": "RSA",
                "key_ops": KEY_OPS,
                "n": b64url(numbers.n.to_bytes(256, "big")),
                "e": b64url(numbers.e.to_bytes(3, "big")),
            },
            "attributes": {
                "enabled": version.enabled,
                "created": version.created,
                "updated": version.created,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
            },
        }

    def _operate(
        self, name: str, version: _KeyVersion, operation: str, body: bytes
    ) -> dict[str, Any]:
        if not version.enabled:
            raise _Error(
                403, "Forbidden", f"Operation {operation} is not allowed on a disabled key."
            )
        try:
            request = json.loads(body)
            alg, value = request["alg"], unb64url(request["value"])
        except (ValueError, KeyError, TypeError):
            raise _Error(400, "BadParameter", "Property has invalid value") from None
        if alg != "RSA-OAEP-256":
            raise _Error(400, "BadParameter", f"Algorithm {alg!r} is not supported by the fake.")
        if operation == "wrapkey":
            result = version.private.public_key().encrypt(value, _OAEP)
        else:
            try:
                result = version.private.decrypt(value, _OAEP)
            except ValueError:
                raise _Error(400, "BadParameter", "Error unwrapping the key.") from None
        return {"kid": self.key_id(name, version.version), "value": b64url(result)}


def _tls_context(directory: Path) -> ssl.SSLContext:
    """A private CA and a server certificate for 127.0.0.1/localhost, valid for a day."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyquorum fake Key Vault CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        _builder(name, ca_name, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (directory / "server.pem").write_bytes(cert.public_bytes(pem))
    (directory / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(directory / "server.pem", directory / "server.key")
    return context


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: Any, now: datetime.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def versions_of(ids: Iterable[str]) -> list[str]:
    """The version part of full key ids (…/keys/<name>/<version>)."""
    return [i.rstrip("/").rsplit("/", 1)[1] for i in ids]
