"""Python client of the agent's socket API (DESIGN.md §5): `Client` (sync) and `AsyncClient` (trio).

Both keep one connection to the Unix socket and speak the compact framed protocol
(`agent.framing`): signing without HTTP or JSON, every other endpoint through its CALL op. An
agent that predates it answers the preamble with HTTP 400; the client then falls back to
HTTP/1.1 keep-alive for good (`protocol="http"` asks for HTTP from the start). One
`AsyncClient` may be shared by many tasks: their requests are pipelined on the one connection.
Errors from the agent arrive as `AgentError` (status, code, message from the JSON error body); a
socket that is missing, refused or not permitted raises `AgentUnreachable`, naming the path and
what to check.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import h11
import trio

from agent import framing


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class SignResult:
    kid: str
    alg: str
    signature: bytes


@dataclass(frozen=True, slots=True)
class BatchSignResult:
    kid: str
    alg: str
    signatures: list[bytes]


@dataclass(frozen=True, slots=True)
class JwtResult:
    token: str
    kid: str
    expires_at: int


_T = TypeVar("_T")


class AgentError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class AgentUnreachable(AgentError):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            0,
            "unreachable",
            f"cannot reach the keyquorum agent at {path}: {reason} "
            "(is `keyquorum run` running, is --socket / KEYQUORUM_SOCKET right, "
            "and may this user open the socket?)",
        )


_MAX_AGE = re.compile(r"max-age=(\d+)")


def _error_from(status: int, body: bytes) -> AgentError:
    try:
        error = json.loads(body)["error"]
        return AgentError(status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return AgentError(status, "http_error", body[:200].decode("utf-8", "replace"))


def _sign_body(payload: bytes) -> dict[str, Any]:
    return {"payload": b64url_encode(payload)}


def _parse_sign(doc: Mapping[str, Any]) -> SignResult:
    return SignResult(doc["kid"], doc["alg"], _b64url_decode(doc["signature"]))


def _parse_batch(doc: Mapping[str, Any]) -> BatchSignResult:
    return BatchSignResult(doc["kid"], doc["alg"], [_b64url_decode(s) for s in doc["signatures"]])


def _jwt_body(claims: Mapping[str, Any], ttl_seconds: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"claims": dict(claims)}
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    return body


def _parse_jwt(doc: Mapping[str, Any]) -> JwtResult:
    return JwtResult(doc["token"], doc["kid"], int(doc["expires_at"]))


def _max_age(headers: Mapping[str, str]) -> int | None:
    match = _MAX_AGE.search(headers.get("cache-control", ""))
    return int(match[1]) if match else None


# ---- sync ---------------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("agent", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.unix_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _Framed:
    """One framed connection (sync): requests answered in order."""

    def __init__(self, path: Path, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.decoder = framing.ResponseDecoder()
        self.preamble = framing.PREAMBLE  # sent with the first request
        self.next_id = 1
        self.used = False

    def roundtrip(self, op: int, body: bytes) -> tuple[int, bytes]:
        ident = self.next_id
        self.next_id = (ident + 1) & 0xFFFFFFFF or 1
        self.sock.sendall(self.preamble + framing.encode_request(op, ident, body))
        self.preamble = b""
        while True:
            answer = self.decoder.next()
            if answer is not None:
                break
            data = self.sock.recv(65536)
            if not data:
                raise _Disconnected
            self.decoder.feed(data)
            if not self.used and self.decoder.starts_like_http():
                raise _NoFraming
        self.used = True
        got, status, payload = answer
        if got != ident:
            raise _Disconnected  # out of step: start over on a fresh connection
        return status, payload

    def close(self) -> None:
        self.sock.close()


class Client:
    def __init__(
        self, socket_path: str | Path, *, timeout: float = 10.0, protocol: str = "framed"
    ) -> None:
        if protocol not in ("framed", "http"):
            raise ValueError("protocol must be 'framed' or 'http'")
        self.path = Path(socket_path)
        self.timeout = timeout
        self.protocol = protocol
        self._conn: _UnixHTTPConnection | None = None
        self._framed: _Framed | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._framed is not None:
            self._framed.close()
            self._framed = None

    def _op(self, op: int, body: bytes) -> tuple[int, bytes]:
        """One framed request: (status, body). Falls back to nothing: callers check protocol."""

        def roundtrip() -> tuple[int, bytes]:
            try:
                if self._framed is None:
                    self._framed = _Framed(self.path, self.timeout)
                return self._framed.roundtrip(op, body)
            except ValueError as exc:  # a malformed answer
                self.close()
                raise AgentUnreachable(self.path, f"garbled answer ({exc})") from None

        return self._attempt(
            roundtrip,
            lambda: self._framed is None,
            (_Disconnected, BrokenPipeError, ConnectionResetError),
        )

    def _attempt(
        self,
        call: Callable[[], _T],
        is_fresh: Callable[[], bool],
        lost: tuple[type[BaseException], ...],
    ) -> _T:
        """Run `call` on this client's connection. Socket errors close it and become
        AgentUnreachable; a `lost` connection that was not fresh (the server closed it while it
        sat idle) is retried once on a new one."""
        for attempt in (1, 2):
            fresh = is_fresh()
            try:
                return call()
            except lost as exc:
                self.close()
                if attempt == 1 and not fresh:
                    continue
                raise AgentUnreachable(
                    self.path, f"connection lost ({type(exc).__name__})"
                ) from None
            except OSError as exc:
                self.close()
                raise _unreachable(self.path, exc) from None
        raise AssertionError("unreachable")

    def _fast(self, op: int, body: bytes) -> bytes | None:
        """The 200 body of a framed op; None if this agent only speaks HTTP."""
        if self.protocol == "http":
            return None
        try:
            status, payload = self._op(op, body)
        except _NoFraming:
            self.close()
            self.protocol = "http"
            return None
        if status >= 400:
            raise _error_from(status, payload)
        return payload

    def _request(
        self, method: str, target: str, body: Any = None
    ) -> tuple[int, dict[str, str], bytes]:
        data = None if body is None else json.dumps(body).encode()
        if self.protocol == "framed":
            try:
                status, payload = self._op(
                    framing.CALL, framing.encode_call(method, target, data or b"")
                )
            except _NoFraming:
                self.close()
                self.protocol = "http"
            else:
                if status >= 400:
                    return status, {}, payload
                headers, payload = framing.decode_called(payload)
                return status, headers, payload
        return self._http(method, target, data)

    def _http(
        self, method: str, target: str, data: bytes | None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": "application/json"} if data is not None else {}

        def exchange() -> tuple[int, dict[str, str], bytes]:
            if self._conn is None:
                self._conn = _UnixHTTPConnection(self.path, self.timeout)
            self._conn.request(method, target, body=data, headers=headers)
            response = self._conn.getresponse()
            payload = response.read()
            if response.will_close:
                self.close()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, payload

        return self._attempt(
            exchange,
            lambda: self._conn is None or self._conn.sock is None,
            (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError),
        )

    def _json(self, method: str, target: str, body: Any = None) -> Any:
        status, _, payload = self._request(method, target, body)
        if status >= 400:
            raise _error_from(status, payload)
        return json.loads(payload)

    def sign(self, payload: bytes) -> SignResult:
        answer = self._fast(framing.SIGN, payload)
        if answer is not None:
            return SignResult(*framing.decode_signed(answer))
        return _parse_sign(self._json("POST", "/v1/sign", _sign_body(payload)))

    def sign_batch(self, payloads: Sequence[bytes]) -> BatchSignResult:
        answer = self._fast(framing.SIGN_BATCH, framing.encode_batch(list(payloads)))
        if answer is not None:
            return BatchSignResult(*framing.decode_signed_batch(answer))
        body = {"payloads": [b64url_encode(p) for p in payloads]}
        return _parse_batch(self._json("POST", "/v1/sign", body))

    def jwt(self, claims: Mapping[str, Any], ttl_seconds: int | None = None) -> JwtResult:
        body = _jwt_body(claims, ttl_seconds)
        answer = self._fast(framing.JWT, json.dumps(body).encode())
        if answer is not None:
            return _parse_jwt(json.loads(answer))
        return _parse_jwt(self._json("POST", "/v1/jwt", body))

    def jwks(self) -> dict[str, Any]:
        return self.jwks_with_max_age()[0]

    def jwks_with_max_age(self) -> tuple[dict[str, Any], int | None]:
        status, headers, payload = self._request("GET", "/v1/jwks")
        if status >= 400:
            raise _error_from(status, payload)
        return json.loads(payload), _max_age(headers)

    def status(self) -> dict[str, Any]:
        return dict(self._json("GET", "/v1/status"))

    def healthz(self) -> tuple[bool, dict[str, Any]]:
        status, _, payload = self._request("GET", "/healthz")
        return status == 200, json.loads(payload)

    def metrics(self) -> str:
        status, _, payload = self._request("GET", "/metrics")
        if status >= 400:
            raise _error_from(status, payload)
        return payload.decode()

    def rotate(self) -> dict[str, Any]:
        return dict(self._json("POST", "/v1/admin/rotate", {}))

    def rollback(self) -> dict[str, Any]:
        return dict(self._json("POST", "/v1/admin/rollback", {}))

    def revoke(self, kid: str) -> dict[str, Any]:
        return dict(self._json("POST", "/v1/admin/revoke", {"kid": kid}))

    def import_pem(self, pem: bytes, alg: str | None = None) -> dict[str, Any]:
        return dict(self._json("POST", "/v1/admin/import", {"pem": pem.decode(), "alg": alg}))


# ---- trio ---------------------------------------------------------------------------------------


class _Slot:
    __slots__ = ("answer", "wake")

    def __init__(self) -> None:
        self.answer: tuple[int, bytes] | None = None
        self.wake: trio.Event | None = None  # set while its task waits for someone to read


class AsyncClient:
    def __init__(
        self, socket_path: str | Path, *, timeout: float = 10.0, protocol: str = "framed"
    ) -> None:
        if protocol not in ("framed", "http"):
            raise ValueError("protocol must be 'framed' or 'http'")
        self.path = Path(socket_path)
        self.timeout = timeout
        self.protocol = protocol
        # HTTP: a trio stream and h11, one request at a time.
        self._stream: trio.SocketStream | None = None
        self._conn: h11.Connection | None = None
        self._lock = trio.Lock()
        # Framed: requests from many tasks pipelined on one connection, without locks on the
        # way. Whoever finds nobody sending sends, and flushes what others queue meanwhile;
        # whoever finds nobody reading reads, hands each answer to its slot (waking its task),
        # and on leaving wakes a waiting task to read next.
        self._sock: socket.socket | None = None
        self._decoder = framing.ResponseDecoder()
        self._waiting: dict[int, _Slot] = {}
        self._outbox: list[bytes] = []
        self._sending = False
        self._reading = False
        self._next_id = 1
        self._generation = 0  # bumped on every reconnect: stale waiters see it and retry
        self._answered = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._drop()
        if self._stream is not None:
            stream, self._stream, self._conn = self._stream, None, None
            await stream.aclose()

    def _drop(self) -> None:
        """Close the framed connection; every task waiting on it retries or fails."""
        if self._sock is not None:
            sock, self._sock = self._sock, None
            self._generation += 1
            trio.lowlevel.notify_closing(sock)
            sock.close()
            for slot in self._waiting.values():
                if slot.wake is not None:
                    slot.wake.set()
            self._waiting.clear()
            self._outbox.clear()

    async def _connect(self) -> None:
        try:
            self._stream = await trio.open_unix_socket(str(self.path))
        except OSError as exc:
            raise _unreachable(self.path, exc) from None
        self._conn = h11.Connection(h11.CLIENT)

    async def _connect_framed(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            try:
                sock.connect(str(self.path))
            except BlockingIOError:  # the listen backlog is full: wait for room
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error)) from None
        except OSError as exc:
            sock.close()
            raise _unreachable(self.path, exc) from None
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._decoder = framing.ResponseDecoder()
        self._answered = False
        self._outbox = [framing.PREAMBLE]
        return sock

    # ---- framed ----------------------------------------------------------------------------------

    async def _op(self, op: int, body: bytes) -> tuple[int, bytes]:
        for attempt in (1, 2):
            try:
                with trio.fail_after(self.timeout):
                    return await self._roundtrip(op, body)
            except _Retry as retry:
                if attempt == 1 and not retry.fresh:
                    continue  # the server closed an idle connection: retry once
                raise AgentUnreachable(self.path, f"connection lost ({retry.reason})") from None
            except trio.TooSlowError:
                self._drop()
                raise AgentUnreachable(self.path, f"no answer within {self.timeout}s") from None
        raise AssertionError("unreachable")

    async def _roundtrip(self, op: int, body: bytes) -> tuple[int, bytes]:
        fresh = self._sock is None
        sock = self._sock if self._sock is not None else await self._connect_framed()
        generation = self._generation
        ident = self._next_id
        self._next_id = (ident + 1) & 0xFFFFFFFF or 1
        slot = self._waiting[ident] = _Slot()
        try:
            self._outbox.append(framing.encode_request(op, ident, body))
            if not self._sending:
                await self._flush(sock, fresh)
            while True:
                answer = slot.answer
                if answer is not None:
                    return answer
                if self._generation != generation:
                    raise _Retry(fresh, "reconnected")
                if self._reading:
                    slot.wake = trio.Event()
                    await slot.wake.wait()
                    slot.wake = None
                    continue
                self._reading = True
                try:
                    while slot.answer is None and self._generation == generation:
                        await self._receive_one(sock, fresh)
                finally:
                    self._reading = False
                    self._wake_a_reader()
        finally:
            if self._waiting.get(ident) is slot:
                del self._waiting[ident]

    async def _flush(self, sock: socket.socket, fresh: bool) -> None:
        self._sending = True
        try:
            while self._outbox:
                data = b"".join(self._outbox)
                self._outbox.clear()
                view = memoryview(data)
                while view:
                    try:
                        sent = sock.send(view)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                        continue
                    except (OSError, trio.ClosedResourceError) as exc:
                        self._drop()
                        raise _Retry(fresh, type(exc).__name__) from None
                    view = view[sent:]
        finally:
            self._sending = False

    def _wake_a_reader(self) -> None:
        for slot in self._waiting.values():
            if slot.answer is None and slot.wake is not None:
                slot.wake.set()
                return

    async def _receive_one(self, sock: socket.socket, fresh: bool) -> None:
        """Read until one answer is complete and hand it to its slot."""
        while True:
            try:
                answer = self._decoder.next()
            except ValueError as exc:
                self._drop()
                raise _Retry(fresh, f"garbled answer: {exc}") from None
            if answer is not None:
                self._answered = True
                ident, status, payload = answer
                slot = self._waiting.get(ident)
                if slot is not None:  # else: its caller gave up (cancelled)
                    slot.answer = (status, payload)
                    if slot.wake is not None:
                        slot.wake.set()
                return
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except (OSError, trio.ClosedResourceError) as exc:
                self._drop()
                raise _Retry(fresh, type(exc).__name__) from None
            if not data:
                self._drop()
                raise _Retry(fresh, "closed by the agent")
            self._decoder.feed(data)
            if not self._answered and self._decoder.starts_like_http():
                self._drop()
                raise _NoFraming

    async def _fast(self, op: int, body: bytes) -> bytes | None:
        if self.protocol == "http":
            return None
        try:
            status, payload = await self._op(op, body)
        except _NoFraming:
            self.protocol = "http"
            return None
        if status >= 400:
            raise _error_from(status, payload)
        return payload

    # ---- HTTP ------------------------------------------------------------------------------------

    async def _request(
        self, method: str, target: str, body: Any = None
    ) -> tuple[int, dict[str, str], bytes]:
        if self.protocol == "framed":
            data = b"" if body is None else json.dumps(body).encode()
            try:
                status, payload = await self._op(
                    framing.CALL, framing.encode_call(method, target, data)
                )
            except _NoFraming:
                self.protocol = "http"
            else:
                if status >= 400:
                    return status, {}, payload
                headers, payload = framing.decode_called(payload)
                return status, headers, payload
        async with self._lock:
            for attempt in (1, 2):
                fresh = self._stream is None
                if fresh:
                    await self._connect()
                try:
                    with trio.fail_after(self.timeout):
                        return await self._exchange(method, target, body)
                except (
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    _Disconnected,
                    h11.RemoteProtocolError,
                ) as exc:
                    await self.aclose()
                    if attempt == 1 and not fresh:
                        continue
                    raise AgentUnreachable(
                        self.path, f"connection lost ({type(exc).__name__})"
                    ) from None
                except trio.TooSlowError:
                    await self.aclose()
                    raise AgentUnreachable(self.path, f"no answer within {self.timeout}s") from None
        raise AssertionError("unreachable")

    async def _exchange(
        self, method: str, target: str, body: Any
    ) -> tuple[int, dict[str, str], bytes]:
        assert self._stream is not None
        assert self._conn is not None
        conn, stream = self._conn, self._stream
        data = b"" if body is None else json.dumps(body).encode()
        headers = [("host", "agent"), ("content-length", str(len(data)))]
        if body is not None:
            headers.append(("content-type", "application/json"))
        out = conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if data:
            out += conn.send(h11.Data(data=data)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)
        status = 0
        response_headers: dict[str, str] = {}
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                received = await stream.receive_some(65536)
                if not received:
                    raise _Disconnected
                conn.receive_data(received)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {n.decode().lower(): v.decode() for n, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise _Disconnected
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.aclose()
        return status, response_headers, b"".join(chunks)

    async def _json(self, method: str, target: str, body: Any = None) -> Any:
        status, _, payload = await self._request(method, target, body)
        if status >= 400:
            raise _error_from(status, payload)
        return json.loads(payload)

    async def sign(self, payload: bytes) -> SignResult:
        answer = await self._fast(framing.SIGN, payload)
        if answer is not None:
            return SignResult(*framing.decode_signed(answer))
        return _parse_sign(await self._json("POST", "/v1/sign", _sign_body(payload)))

    async def sign_batch(self, payloads: Sequence[bytes]) -> BatchSignResult:
        answer = await self._fast(framing.SIGN_BATCH, framing.encode_batch(list(payloads)))
        if answer is not None:
            return BatchSignResult(*framing.decode_signed_batch(answer))
        body = {"payloads": [b64url_encode(p) for p in payloads]}
        return _parse_batch(await self._json("POST", "/v1/sign", body))

    async def jwt(self, claims: Mapping[str, Any], ttl_seconds: int | None = None) -> JwtResult:
        body = _jwt_body(claims, ttl_seconds)
        answer = await self._fast(framing.JWT, json.dumps(body).encode())
        if answer is not None:
            return _parse_jwt(json.loads(answer))
        return _parse_jwt(await self._json("POST", "/v1/jwt", body))

    async def jwks(self) -> dict[str, Any]:
        return (await self.jwks_with_max_age())[0]

    async def jwks_with_max_age(self) -> tuple[dict[str, Any], int | None]:
        status, headers, payload = await self._request("GET", "/v1/jwks")
        if status >= 400:
            raise _error_from(status, payload)
        return json.loads(payload), _max_age(headers)

    async def status(self) -> dict[str, Any]:
        return dict(await self._json("GET", "/v1/status"))

    async def healthz(self) -> tuple[bool, dict[str, Any]]:
        status, _, payload = await self._request("GET", "/healthz")
        return status == 200, json.loads(payload)

    async def metrics(self) -> str:
        status, _, payload = await self._request("GET", "/metrics")
        if status >= 400:
            raise _error_from(status, payload)
        return payload.decode()

    async def rotate(self) -> dict[str, Any]:
        return dict(await self._json("POST", "/v1/admin/rotate", {}))

    async def rollback(self) -> dict[str, Any]:
        return dict(await self._json("POST", "/v1/admin/rollback", {}))

    async def revoke(self, kid: str) -> dict[str, Any]:
        return dict(await self._json("POST", "/v1/admin/revoke", {"kid": kid}))

    async def import_pem(self, pem: bytes, alg: str | None = None) -> dict[str, Any]:
        return dict(await self._json("POST", "/v1/admin/import", {"pem": pem.decode(), "alg": alg}))


def _unreachable(path: Path, exc: OSError) -> AgentUnreachable:
    """The error for a socket that cannot be connected to or used."""
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError, PermissionError)):
        return AgentUnreachable(path, exc.strerror or type(exc).__name__)
    return AgentUnreachable(path, str(exc))


class _Disconnected(Exception):
    pass


class _Retry(Exception):
    def __init__(self, fresh: bool, reason: str) -> None:
        super().__init__(reason)
        self.fresh = fresh
        self.reason = reason


class _NoFraming(Exception):
    """The agent answered the framed preamble with HTTP: it predates the framed protocol."""
