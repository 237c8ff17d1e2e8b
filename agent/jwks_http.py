"""The optional TCP listener for remote verifiers: the JWKS and a discovery document, nothing else.

Verifiers on other machines cannot reach the agent's Unix socket, so `[jwks] listen` opens a
read-only HTTP(S) endpoint (HTTPS with `cert_file`/`key_file`):

- `GET /.well-known/jwks.json` (also `/jwks.json`): the published keys, with
  `Cache-Control: public, max-age=N` from the rotation schedule (never longer than verifiers may
  cache, DESIGN.md §2) and a strong `ETag`; `If-None-Match` answers 304.
- `GET /.well-known/openid-configuration`: `issuer`, `jwks_uri` and the signing algorithm, so
  OIDC libraries can find the keys from the issuer alone.

With `metrics = true` it also serves `/metrics` for Prometheus. It never signs and never shows
anything but public keys and metrics, so it needs no authentication; it reads the agent's
in-memory state and makes no store or backend call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
from typing import TYPE_CHECKING, Any

import h11
import trio

from agent.httpd import SocketInUse
from agent.keyring import NotReady

if TYPE_CHECKING:
    from agent.config import JwksListenConfig
    from agent.daemon import Agent

log = logging.getLogger("keyquorum.jwks")
MAX_REQUEST_BYTES = 16 << 10
IDLE_TIMEOUT = 30.0


def tls_context(config: JwksListenConfig) -> ssl.SSLContext | None:
    if config.cert_file is None or config.key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(config.cert_file), str(config.key_file))
    context.set_alpn_protocols(["http/1.1"])
    return context


class JwksListener:
    def __init__(self, agent: Agent, config: JwksListenConfig) -> None:
        self.agent = agent
        self.config = config
        self.tls = tls_context(config)
        self.port: int | None = None  # the bound port (config port 0: an ephemeral one)

    @property
    def base_url(self) -> str:
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        scheme = "https" if self.tls else "http"
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"{scheme}://{host}:{self.port or self.config.port}"

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        except OSError as exc:
            raise SocketInUse(
                f"jwks.listen: cannot listen on {self.config.host}:{self.config.port}: "
                f"{exc.strerror or exc}"
            ) from None
        self.port = listeners[0].socket.getsockname()[1]
        log.info("serving the JWKS on %s", self.base_url)
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        channel: trio.abc.Stream = stream
        try:
            if self.tls is not None:
                channel = trio.SSLStream(stream, self.tls, server_side=True)
                with trio.fail_after(IDLE_TIMEOUT):
                    await channel.do_handshake()
            await self._serve(channel)
        except (trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError, ssl.SSLError):
            pass
        finally:
            with trio.move_on_after(1):
                await channel.aclose()

    async def _serve(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        while True:
            request = None
            with trio.fail_after(IDLE_TIMEOUT):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(MAX_REQUEST_BYTES)
                        conn.receive_data(bytes(data))
                        if not data and conn.their_state is not h11.SEND_BODY:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
            assert request is not None
            status, headers, body = self.respond(
                request.method.decode(), request.target.decode(), dict(request.headers)
            )
            if status != 304:
                headers.append(("content-length", str(len(body))))
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
            if request.method != b"HEAD" and body:
                await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    def respond(
        self, method: str, target: str, headers: dict[bytes, bytes]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """(status, headers, body) for one request: pure, for tests and the server alike."""
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return _json(405, {"error": "only GET and HEAD"}, [("allow", "GET, HEAD")])
        agent = self.agent
        if path in ("/.well-known/jwks.json", "/jwks.json"):
            try:
                document, max_age = agent.jwks_view()
            except NotReady as exc:
                return _json(503, {"error": str(exc)}, [("retry-after", "1")])
            body = _canonical(document)
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            cache = [("cache-control", f"public, max-age={max_age}"), ("etag", etag)]
            wanted = headers.get(b"if-none-match", b"").decode()
            if etag in [t.strip() for t in wanted.split(",")] or wanted.strip() == "*":
                return 304, cache, b""
            return 200, [("content-type", "application/jwk-set+json"), *cache], body
        if path == "/.well-known/openid-configuration":
            issuer = agent.config.jwt.issuer or self.base_url
            document = {
                "issuer": issuer,
                "jwks_uri": f"{self.base_url}/.well-known/jwks.json",
                "id_token_signing_alg_values_supported": [agent.config.keys.algorithm],
            }
            return _json(200, document, [("cache-control", "public, max-age=3600")])
        if path == "/metrics" and self.config.metrics:
            from agent.api import render_metrics

            page = render_metrics(agent).encode()
            return 200, [("content-type", "text/plain; version=0.0.4; charset=utf-8")], page
        return _json(404, {"error": f"no such resource: {path}"})


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _json(
    status: int, value: Any, extra: list[tuple[str, str]] | None = None
) -> tuple[int, list[tuple[str, str]], bytes]:
    return status, [("content-type", "application/json"), *(extra or [])], _canonical(value)
