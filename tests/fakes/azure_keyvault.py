"""A FAKE Azure Key Vault (keys) over HTTPS on 127.0.0.1, for the azure-keyvault-keys SDK.

No Key Vault emulator can be installed on this machine (lowkey-vault needs Maven or Docker), so
this is a small stand-in that speaks just enough of the REST API for `backends/azure.py`, driven
by the real SDK (tests/fakes/azure_secrets.py adds the secrets endpoints on top of it):

- TLS with a throwaway private CA generated at start with `cryptography` (the server certificate
  has SAN IP 127.0.0.1 and DNS localhost); `ca_file` is the CA's PEM, for `connection_verify`.
  The SDK refuses to send bearer tokens over plain http, so TLS is not optional.
- Key Vault's challenge authentication: a request without a valid `Authorization: Bearer` token
  gets 401 with `WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/
  <tenant>", resource="https://vault.azure.net"`; the SDK then asks its credential for a token
  for `https://vault.azure.net/.default` and resends. `FakeCredential` hands out `fake.token`.
- Keys, with real key pairs from `cryptography` held in memory, in Key Vault's JSON shapes
  (KeyBundle, KeyItem, DeletedKeyBundle; `created` in Unix seconds):
  POST /keys/{name}/create ({"kty": "EC"|"RSA", "crv" | "key_size", "key_ops", "attributes",
  "tags"}; a name in use gets a new version); GET /keys and GET /keys/{name}/versions (paged by
  `page_size` with a `nextLink` carrying `$skiptoken`); GET /keys/{name}[/{version}];
  POST /keys/{name}/{version}/sign ({"alg", "value": b64url digest} -> {"kid", "value"}: ES256
  and ES384 as raw r||s like the real service, RS256/PS256 (salt = hash length) as PKCS#1);
  POST .../wrapkey and /unwrapkey (RSA-OAEP-256); DELETE /keys/{name} (soft delete: the key
  leaves the list and `deleted_keys` holds it; its name cannot be reused, 409, until purged).
  A key's `key_ops` are enforced (403, like the service). Python-side `create_key` and
  `rotate_key` add RSA-2048 versions with every operation; `disable` turns one version off.
- Switches: `outage` (every request 503), `fail_next(n)` (the next n requests 503: a transient
  outage), `forbidden` (every authenticated request 403, as without any RBAC role), `deny`
  (a set of permissions such as "keys/sign" refused with the service's ForbiddenByRbac 403,
  as for a role without them) and `stop()` (the listener and every open connection are closed:
  the vault is unreachable).
- Errors use Key Vault's JSON shape {"error": {"code", "message", "innererror"?}}; a disabled
  version is refused with 403 and innererror KeyDisabled / SecretDisabled, like the service.

Fidelity gaps: no rotation policies, backups, recovery or purge over HTTP, managed
(certificate-backed) keys, release policies or Managed HSM; expiry and not-before dates are not
enforced; keys are listed in creation order and versions by version id (the service documents
no order; versions are not in creation order there either); `created` is real time in whole
seconds, as the service reports it. Every request is logged in `requests` as
(method, path) so a test can see what reached the "vault".
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import re
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
from urllib.parse import parse_qs, urlsplit

from azure.core.credentials import AccessToken
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TENANT = "72f988bf-0000-4000-8000-00000000kq01"
RESOURCE = "https://vault.azure.net"
KEY_OPS = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
RETENTION_DAYS = 90
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_CURVES: dict[str, tuple[type[ec.EllipticCurve], int]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
}
# JWS alg -> (key type, curve for EC, hash, digest length)
_SIGN_ALGS: dict[str, tuple[str, str | None, type[hashes.HashAlgorithm], int]] = {
    "ES256": ("EC", "P-256", hashes.SHA256, 32),
    "ES384": ("EC", "P-384", hashes.SHA384, 48),
    "RS256": ("RSA", None, hashes.SHA256, 32),
    "PS256": ("RSA", None, hashes.SHA256, 32),
}
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


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
    private: PrivateKey
    created: int
    enabled: bool = True
    key_ops: list[str] = field(default_factory=lambda: list(KEY_OPS))
    tags: dict[str, str] = field(default_factory=dict)
    exportable: bool = False


@dataclass
class _Key:
    versions: list[_KeyVersion] = field(default_factory=list)


@dataclass
class _DeletedKey:
    key: _Key
    deleted: int


class _Error(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        inner: str | None = None,
        **headers: str,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers
        self.inner = inner


def bad_request(message: str) -> _Error:
    return _Error(400, "BadParameter", message)


def disabled(operation: str, what: str) -> _Error:
    """Key Vault's answer to any use of a disabled key or secret version."""
    return _Error(
        403,
        "Forbidden",
        f"Operation {operation} is not allowed on a disabled {what}.",
        inner="KeyDisabled" if what == "key" else "SecretDisabled",
    )


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

    def do_PATCH(self) -> None:
        self._handle("PATCH")

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
            error: dict[str, Any] = {"code": exc.code, "message": exc.message}
            if exc.inner:
                error["innererror"] = {"code": exc.inner}
            payload = {"error": error}
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

    page_size = 25  # Key Vault's maximum page; tests lower it to exercise nextLink paging

    def __init__(self, tenant: str = TENANT) -> None:
        self.tenant = tenant
        self.token = f"fake-kv-token-{uuid.uuid4().hex}"
        self.outage = False
        self.forbidden = False
        self.deny: set[str] = set()  # permissions refused, e.g. {"keys/sign"}
        self.requests: list[tuple[str, str]] = []
        self._fail_next = 0
        self._keys: dict[str, _Key] = {}
        self.deleted_keys: dict[str, _DeletedKey] = {}
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
    def create_key(self, name: str, tags: dict[str, str] | None = None) -> str:
        """Create key `name` (or a new version of it); returns the new version's full key id."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        version = uuid.uuid4().hex
        with self._lock:
            self._keys.setdefault(name, _Key()).versions.append(
                _KeyVersion(version, private, int(time.time()), tags=dict(tags or {}))
            )
        return self.key_id(name, version)

    rotate_key = create_key  # Key Vault's rotate makes a new current version, like create

    def disable(self, name: str, version: str) -> None:
        with self._lock:
            self._find(name, version).enabled = False

    def set_created(self, name: str, version: str, created: int) -> None:
        """Back-date a version (created times are whole seconds, so tests order them)."""
        with self._lock:
            self._find(name, version).created = created

    def key_id(self, name: str, version: str) -> str:
        return f"{self.vault_url}/keys/{name}/{version}"

    def key_names(self) -> list[str]:
        """The names of the keys the vault lists (not the deleted ones)."""
        with self._lock:
            return list(self._keys)

    def bundle(self, name: str, version: str = "") -> dict[str, Any]:
        """What GET /keys/{name}[/{version}] answers, for tests to inspect a key."""
        with self._lock:
            return self._bundle(name, self._find(name, version))

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

    def _permit(self, permission: str) -> None:
        """Refuse a permission in `deny` as Azure RBAC does for a role that lacks it."""
        if permission in self.deny:
            kind, action = permission.split("/")
            data_action = {
                "keys/get": "keys/read",
                "keys/list": "keys/read",
                "keys/create": "keys/create/action",
                "keys/delete": "keys/delete",
                "secrets/get": "secrets/getSecret/action",
                "secrets/list": "secrets/readMetadata/action",
                "secrets/set": "secrets/setSecret/action",
            }.get(permission, f"{kind}/{action}/action")
            raise _Error(
                403,
                "Forbidden",
                "Caller is not authorized to perform action on resource.\r\nIf role assignments, "
                "deny assignments or role definitions were changed recently, please observe "
                f"propagation time.\r\nAction: 'Microsoft.KeyVault/vaults/{data_action}'",
                inner="ForbiddenByRbac",
            )

    def _dispatch(
        self, method: str, target: str, headers: Any, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        split = urlsplit(target)
        path = split.path
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
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        try:
            request = json.loads(body) if body else {}
        except ValueError:
            raise bad_request("The request body is not JSON.") from None
        if not isinstance(request, dict):
            raise bad_request("The request body is not a JSON object.")
        with self._lock:
            return self._route(method, parts, query, request)

    def _route(
        self, method: str, parts: list[str], query: dict[str, str], request: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Answer one authenticated request (called with the lock held); subclasses add
        routes and fall back to this one."""
        path = "/" + "/".join(parts)
        if not parts or parts[0] != "keys":
            raise bad_request(f"Method {method} {path} is not supported by the fake.")
        if method == "GET" and len(parts) == 1:
            self._permit("keys/list")
            items = [self._item(n, k.versions[-1], versioned=False) for n, k in self._keys.items()]
            return 200, self._page(items, path, query)
        if method == "GET" and len(parts) == 3 and parts[2] == "versions":
            self._permit("keys/list")
            key = self._keys.get(parts[1])
            versions = sorted(key.versions, key=lambda v: v.version) if key is not None else []
            items = [self._item(parts[1], v, versioned=True) for v in versions]
            return 200, self._page(items, path, query)
        if method == "GET" and len(parts) in (2, 3):
            self._permit("keys/get")
            version = self._find(parts[1], parts[2] if len(parts) == 3 else "")
            return 200, self._bundle(parts[1], version)
        if method == "POST" and len(parts) == 3 and parts[2] == "create":
            self._permit("keys/create")
            return 200, self._create(parts[1], request)
        if method == "DELETE" and len(parts) == 2:
            self._permit("keys/delete")
            return 200, self._delete(parts[1])
        if method == "POST" and len(parts) == 4 and parts[3] in ("wrapkey", "unwrapkey", "sign"):
            operation = {"wrapkey": "wrapKey", "unwrapkey": "unwrapKey", "sign": "sign"}[parts[3]]
            self._permit(f"keys/{operation}")
            version = self._find(parts[1], parts[2])
            if not version.enabled:
                raise disabled(operation, "key")
            if operation not in version.key_ops:
                raise _Error(
                    403, "Forbidden", f"Operation {operation} is not permitted on this key."
                )
            if operation == "sign":
                return 200, self._sign(parts[1], version, request)
            return 200, self._operate(parts[1], version, parts[3], request)
        raise bad_request(f"Method {method} {path} is not supported by the fake.")

    def _page(
        self, items: list[dict[str, Any]], path: str, query: dict[str, str]
    ) -> dict[str, Any]:
        """One page of a list, with Key Vault's nextLink (a full URL with $skiptoken)."""
        try:
            start = int(query.get("$skiptoken", "0"))
            size = min(int(query.get("maxresults", self.page_size)), self.page_size)
        except ValueError:
            raise bad_request("Invalid $skiptoken or maxresults.") from None
        end = start + size
        next_link = None
        if end < len(items):
            next_link = (
                f"{self.vault_url}{path}?api-version={query.get('api-version', '7.6')}"
                f"&$skiptoken={end}&maxresults={size}"
            )
        return {"value": items[start:end], "nextLink": next_link}

    def _create(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        if not NAME.fullmatch(name):
            raise bad_request(
                "The request URI contains an invalid name: names are 1-127 letters, digits and "
                "dashes."
            )
        if name in self.deleted_keys:
            raise _Error(
                409,
                "Conflict",
                f"Key {name} is currently in a deleted but recoverable state, and its name "
                "cannot be reused; in this state, the key can only be recovered or purged.",
            )
        kty = request.get("kty")
        private: PrivateKey
        if kty == "EC":
            curve = _CURVES.get(str(request.get("crv")))
            if curve is None:
                raise bad_request(f"The curve {request.get('crv')!r} is not supported.")
            private = ec.generate_private_key(curve[0]())
        elif kty == "RSA":
            size = request.get("key_size") or 2048
            if size not in (2048, 3072, 4096):
                raise bad_request(f"The key size {size!r} is not supported.")
            private = rsa.generate_private_key(public_exponent=65537, key_size=size)
        elif kty in ("EC-HSM", "RSA-HSM", "oct-HSM"):
            raise bad_request("Hardware key operation not allowed on standard vault.")
        else:
            raise bad_request(f"The key type {kty!r} is not supported.")
        attributes = request.get("attributes") or {}
        if attributes.get("exportable") and not request.get("release_policy"):
            raise bad_request("Exportable keys must have release policy.")
        tags = request.get("tags") or {}
        if len(tags) > 15 or any(len(k) > 512 or len(str(v)) > 256 for k, v in tags.items()):
            raise bad_request("Tags: at most 15, names up to 512 and values up to 256 characters.")
        version = _KeyVersion(
            uuid.uuid4().hex,
            private,
            int(time.time()),
            enabled=attributes.get("enabled", True) is not False,
            key_ops=list(request.get("key_ops") or KEY_OPS),
            tags={str(k): str(v) for k, v in tags.items()},
            exportable=bool(attributes.get("exportable")),
        )
        self._keys.setdefault(name, _Key()).versions.append(version)
        return self._bundle(name, version)

    def _delete(self, name: str) -> dict[str, Any]:
        key = self._keys.get(name)
        if key is None or not key.versions:
            self._find(name, "")  # raises KeyNotFound
            raise AssertionError("unreachable")
        del self._keys[name]
        now = int(time.time())
        self.deleted_keys[name] = _DeletedKey(key, now)
        return {
            **self._bundle(name, key.versions[-1]),
            "recoveryId": f"{self.vault_url}/deletedkeys/{name}",
            "deletedDate": now,
            "scheduledPurgeDate": now + RETENTION_DAYS * 86400,
        }

    def _attributes(self, version: _KeyVersion) -> dict[str, Any]:
        return {
            "enabled": version.enabled,
            "created": version.created,
            "updated": version.created,
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": RETENTION_DAYS,
            "exportable": version.exportable,
        }

    def _item(self, name: str, version: _KeyVersion, *, versioned: bool) -> dict[str, Any]:
        """A KeyItem of a list: the key's id (with the version in a versions list)."""
        item: dict[str, Any] = {
            "kid": self.key_id(name, version.version)
            if versioned
            else f"{self.vault_url}/keys/{name}",
            "attributes": self._attributes(version),
        }
        if version.tags:
            item["tags"] = dict(version.tags)
        return item

    def _bundle(self, name: str, version: _KeyVersion) -> dict[str, Any]:
        jwk: dict[str, Any] = {
            "kid": self.key_id(name, version.version),
            "key_ops": version.key_ops,
        }
        public = version.private.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[public.curve.name]
            size = _CURVES[crv][1]
            numbers = public.public_numbers()
            jwk.update(
                kty="EC",
                crv=crv,
                x=b64url(numbers.x.to_bytes(size, "big")),
                y=b64url(numbers.y.to_bytes(size, "big")),
            )
        else:
            rsa_numbers = public.public_numbers()
            jwk.update(
                kty="RSA",
                n=b64url(rsa_numbers.n.to_bytes((rsa_numbers.n.bit_length() + 7) // 8, "big")),
                e=b64url(rsa_numbers.e.to_bytes(3, "big")),
            )
        bundle: dict[str, Any] = {"key": jwk, "attributes": self._attributes(version)}
        if version.tags:
            bundle["tags"] = dict(version.tags)
        return bundle

    def _sign(self, name: str, version: _KeyVersion, request: dict[str, Any]) -> dict[str, Any]:
        try:
            alg, digest = request["alg"], unb64url(request["value"])
        except (ValueError, KeyError, TypeError):
            raise bad_request("Property has invalid value") from None
        spec = _SIGN_ALGS.get(alg)
        private = version.private
        if spec is None:
            raise bad_request(f"Algorithm {alg!r} is not supported by the fake.")
        kty, crv, hash_type, digest_size = spec
        if len(digest) != digest_size:
            raise bad_request(f"Invalid length of digest for algorithm {alg}.")
        prehashed = utils.Prehashed(hash_type())
        if isinstance(private, ec.EllipticCurvePrivateKey):
            size = _CURVES.get(crv or "", (None, 0))[1]
            if kty != "EC" or private.curve.key_size != size * 8:
                raise bad_request(f"Key and signing algorithm {alg} are incompatible.")
            r, s = utils.decode_dss_signature(private.sign(digest, ec.ECDSA(prehashed)))
            signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
        else:
            if kty != "RSA":
                raise bad_request(f"Key and signing algorithm {alg} are incompatible.")
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if alg == "RS256"
                else padding.PSS(mgf=padding.MGF1(hash_type()), salt_length=digest_size)
            )
            signature = private.sign(digest, pad, prehashed)
        return {"kid": self.key_id(name, version.version), "value": b64url(signature)}

    def _operate(
        self, name: str, version: _KeyVersion, operation: str, request: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            alg, value = request["alg"], unb64url(request["value"])
        except (ValueError, KeyError, TypeError):
            raise bad_request("Property has invalid value") from None
        private = version.private
        if alg != "RSA-OAEP-256" or not isinstance(private, rsa.RSAPrivateKey):
            raise bad_request(f"Algorithm {alg!r} is not supported by the fake for this key.")
        if operation == "wrapkey":
            result = private.public_key().encrypt(value, _OAEP)
        else:
            try:
                result = private.decrypt(value, _OAEP)
            except ValueError:
                raise bad_request("Error unwrapping the key.") from None
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
