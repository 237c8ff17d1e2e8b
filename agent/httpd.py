"""A small HTTP/1.1 server over a Unix socket, on trio with h11.

It knows nothing of signing: the agent plugs in one handler `Request -> Response`. What it does:
keep-alive and pipelined requests answered in order, size limits enforced before a body is read,
JSON errors for malformed HTTP, per-connection peer credentials (SO_PEERCRED), exclusive
ownership of the socket path (a second server is refused, a stale socket file replaced), and a
graceful stop that lets in-flight requests finish and removes the socket.

The same socket also speaks the compact framed protocol of `agent.framing`, told apart by the
connection's first byte. Its CALL op reaches the same handler as HTTP; the other ops go to the
`fast` handler the agent plugs in (signing without HTTP or JSON on the hot path).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import trio

from agent import framing

log = logging.getLogger("keyquorum.httpd")

_RECEIVE = 65536
REACTOR_WAIT = 0.0005  # seconds the reactor waits for more requests outside trio's scheduler
REACTOR_SLICE = 0.002  # seconds the reactor may keep the event loop before yielding


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    peer: Peer


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(
    obj: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return Response(status, body, "application/json", headers)


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message"}}` with `status` (DESIGN.md §5)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> Response:
        return json_response({"error": {"code": self.code, "message": self.message}}, self.status)


class SocketInUse(Exception):
    """Another live server already owns this socket path."""


Handler = Callable[[Request], Awaitable[Response]]
# (op, body, peer) -> the body of a 200 answer, or ApiError / framing.FramingError.
FastHandler = Callable[[int, bytes, Peer], Awaitable[bytes]]
# The same without waiting, or None when the request needs `fast` (or the HTTP handler).
InstantHandler = Callable[[int, bytes, Peer], bytes | None]


def peer_credentials(sock: socket.socket | trio.socket.SocketType) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, _supplementary_groups(pid))


def _supplementary_groups(pid: int) -> frozenset[int]:
    # Best effort: SO_PEERCRED has no supplementary groups; /proc can vanish under us.
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


class UnixHttpServer:
    def __init__(
        self,
        handler: Handler,
        path: Path,
        *,
        mode: int = 0o660,
        gid: int | None = None,
        max_body_bytes: int = 1 << 20,
        max_header_bytes: int = 16 << 10,
        idle_timeout: float = 60.0,
        drain_timeout: float = 10.0,
        inherited: socket.socket | None = None,
        fast: FastHandler | None = None,
        instant: InstantHandler | None = None,
    ) -> None:
        """`inherited`: a listening socket passed by systemd socket activation (or by the agent
        to its worker processes); it is used as is (its owner keeps its path, mode and group).
        `fast`: the framed protocol's SIGN, SIGN_BATCH and JWT ops (without it they get 404)."""
        self.handler = handler
        self.fast = fast
        self.instant = instant
        # The framed connections the reactor task answers while they ask only `instant` things.
        self._epoll: select.epoll | None = None
        self._reacting: dict[int, _FramedConnection] = {}
        self.inherited = inherited
        self.path = Path(path)
        self.mode = mode
        self.gid = gid
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.idle_timeout = idle_timeout
        self.drain_timeout = drain_timeout
        self.requests_total = 0
        self.connections_active = 0
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._stopping = trio.Event()
        self._busy = 0
        self._idle_changed = trio.Event()
        # The listening socket once `serve` has it (worker processes share it).
        self.listen_socket: socket.socket | None = None
        self.listening = trio.Event()

    # ---- socket ownership --------------------------------------------------------------------

    def _acquire(self) -> tuple[int, socket.socket]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise SocketInUse(f"another agent already serves {self.path}") from None
            raise
        try:
            if self.path.exists() or self.path.is_symlink():
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(self.path))
                except OSError:
                    self.path.unlink()  # stale: its server is gone
                else:
                    raise SocketInUse(f"another agent already serves {self.path}")
                finally:
                    probe.close()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o777 & ~self.mode)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            os.chmod(self.path, self.mode)
            if self.gid is not None:
                os.chown(self.path, -1, self.gid)
            sock.listen(128)
        except BaseException:
            os.close(lock_fd)
            raise
        return lock_fd, sock

    def _release(self, lock_fd: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._lock_path.unlink()
        os.close(lock_fd)

    # ---- serving -----------------------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.inherited is not None:
            lock_fd, raw = -1, self.inherited
            if raw.family != socket.AF_UNIX or raw.type != socket.SOCK_STREAM:
                raise ValueError("the socket passed by systemd is not a Unix stream socket")
        else:
            lock_fd, raw = self._acquire()
        self.listen_socket = raw
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
        try:
            async with trio.open_nursery() as connections:
                if self.instant is not None:
                    self._epoll = select.epoll()
                    connections.start_soon(self._reactor, self._epoll)
                self.listening.set()
                task_status.started()
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(self._accept_loop, listener, connections)
                    await self._stopping.wait()
                    accepting.cancel_scope.cancel()
                await listener.aclose()
                if self.inherited is None:
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()  # refuse new connections at once
                with trio.move_on_after(self.drain_timeout):
                    while self._busy:
                        await self._wait_idle_change()
                connections.cancel_scope.cancel()
        finally:
            with contextlib.suppress(trio.ClosedResourceError, OSError):
                await trio.aclose_forcefully(listener)
            if lock_fd >= 0:
                self._release(lock_fd)
            if self._epoll is not None:
                self._epoll.close()
                self._epoll = None

    def shutdown(self) -> None:
        self._stopping.set()

    async def _wait_idle_change(self) -> None:
        event = self._idle_changed
        await event.wait()

    def _set_busy(self, delta: int) -> None:
        self._busy += delta
        if self._stopping.is_set():  # only the drain after a stop waits for changes
            self._idle_changed.set()
            self._idle_changed = trio.Event()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    log.warning("accept failed (%s); backing off", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections_active += 1
        try:
            try:
                peer = peer_credentials(stream.socket)
            except OSError:
                await stream.aclose()
                return
            async with stream:
                first = b""
                with trio.move_on_after(self.idle_timeout):
                    first = await stream.receive_some(_RECEIVE)
                if not first:
                    return
                if first[0] == framing.FIRST_BYTE:
                    await self._serve_framed(stream, peer, first)
                    return
                conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
                conn.receive_data(first)
                await self._serve_connection(stream, conn, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.connections_active -= 1

    async def _serve_connection(
        self, stream: trio.SocketStream, conn: h11.Connection, peer: Peer
    ) -> None:
        while True:
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                request = await self._read_request(stream, conn, peer)
            except _Closed:
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in (400, 413, 431) else 400
                await self._send_error_and_close(
                    stream, conn, ApiError(status, "bad_http", f"malformed HTTP request: {exc}")
                )
                return
            except _TooLarge as exc:
                await self._send_error_and_close(stream, conn, ApiError(413, "too_large", str(exc)))
                return
            self._set_busy(+1)
            try:
                response = await self._dispatch(request)
                await self._send(stream, conn, response)
            finally:
                self._set_busy(-1)
            self.requests_total += 1
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                if self._stopping.is_set():
                    return
                conn.start_next_cycle()
            else:
                return

    async def _receive(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        with trio.move_on_after(self.idle_timeout) as scope:
            data = await stream.receive_some(_RECEIVE)
        if scope.cancelled_caught:
            raise _Closed
        conn.receive_data(data)

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection, peer: Peer
    ) -> Request:
        head: h11.Request | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if self._stopping.is_set() and head is None and not conn.trailing_data[0]:
                    raise _Closed
                await self._receive(stream, conn)
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise _Closed
            if isinstance(event, h11.Request):
                head = event
                for name, value in event.headers:
                    if name == b"content-length" and int(value) > self.max_body_bytes:
                        raise _TooLarge(
                            f"request body of {int(value)} bytes exceeds the limit of "
                            f"{self.max_body_bytes} (socket.max_request_bytes)"
                        )
                continue
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body_bytes:
                    raise _TooLarge(
                        f"request body exceeds the limit of {self.max_body_bytes} bytes"
                    )
                chunks.append(bytes(event.data))
                continue
            if isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = head.target.decode("ascii", "replace")
                path, _, query = target.partition("?")
                headers = tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers)
                return Request(
                    head.method.decode("ascii", "replace"),
                    path,
                    query,
                    headers,
                    b"".join(chunks),
                    peer,
                )

    async def _dispatch(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except ApiError as exc:
            return exc.response()
        except Exception:
            log.exception("internal error handling %s %s", request.method, request.path)
            return ApiError(500, "internal", "internal error; see the agent log").response()

    async def _send(
        self, stream: trio.SocketStream, conn: h11.Connection, response: Response
    ) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        if self._stopping.is_set():
            headers.append(("connection", "close"))
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)

    async def _send_error_and_close(
        self, stream: trio.SocketStream, conn: h11.Connection, error: ApiError
    ) -> None:
        response = error.response()
        try:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                data = conn.send(
                    h11.Response(
                        status_code=response.status,
                        headers=[
                            ("content-type", response.content_type),
                            ("content-length", str(len(response.body))),
                            ("connection", "close"),
                        ],
                    )
                )
                data += conn.send(h11.Data(data=response.body)) or b""
                data += conn.send(h11.EndOfMessage()) or b""
            else:  # h11 refuses to answer yet (e.g. the request line itself was garbage)
                data = (
                    f"HTTP/1.1 {response.status} Bad Request\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(response.body)}\r\nconnection: close\r\n\r\n"
                ).encode() + response.body
            await stream.send_all(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # ---- the framed protocol ------------------------------------------------------------------

    async def _serve_framed(self, stream: trio.SocketStream, peer: Peer, first: bytes) -> None:
        # The hot path works on the connection's socket directly (non-blocking calls, waiting
        # on readiness only when they would block): trio's stream wrappers cost about as much
        # CPU as the signature. `raw` shares the stream's fd (not a dup) and is detached after.
        raw = socket.socket(fileno=stream.socket.fileno())
        try:
            if self._epoll is None:
                await self._framed_loop(raw, peer, first)
            else:
                await self._framed_with_reactor(_FramedConnection(raw, peer, self), first)
        except OSError:
            pass  # the peer went away
        finally:
            raw.detach()

    async def _framed_with_reactor(self, conn: _FramedConnection, first: bytes) -> None:
        """This task answers what needs waiting (JWT, CALL, a KMS signature, a frame error);
        in between, the connection belongs to the reactor, which answers signatures made in
        memory for every such connection in one task, without a task switch per request."""
        conn.decoder.feed(first)
        epoll = self._epoll
        assert epoll is not None
        while True:
            if conn.unsent:
                data, conn.unsent = conn.unsent, b""
                await _send_all(conn.raw, data)
            if conn.closed:
                return
            busy = conn.pending is not None or conn.decoder.pending
            if busy and not await self._answer_buffered(conn):
                return
            if self._stopping.is_set():
                return
            conn.handed_back = trio.Event()
            self._reacting[conn.fd] = conn
            epoll.register(conn.fd, select.EPOLLIN)
            try:
                while not conn.handed_back.is_set():
                    with trio.move_on_after(self.idle_timeout):
                        await conn.handed_back.wait()
                    if trio.current_time() - conn.active > self.idle_timeout:
                        return  # idle
            finally:
                if self._reacting.pop(conn.fd, None) is not None:
                    epoll.unregister(conn.fd)

    async def _answer_buffered(self, conn: _FramedConnection) -> bool:
        """Answer the frames already received, waiting as they need; False: close."""
        answers: list[bytes] = []
        self._set_busy(+1)
        try:
            while True:
                frame = conn.pending
                conn.pending = None
                if frame is None:
                    try:
                        frame = conn.decoder.next()
                    except framing.FramingError as exc:
                        answers.append(framing.encode_error(0, exc.status, exc.code, exc.message))
                        await _send_all(conn.raw, b"".join(answers))
                        return False
                if frame is None:
                    break
                answers.append(await self._answer_frame(frame, conn.peer))
                self.requests_total += 1
            if answers:
                await _send_all(conn.raw, b"".join(answers))
        finally:
            self._set_busy(-1)
        return True

    async def _reactor(self, epoll: select.epoll) -> None:
        """Answer, for every framed connection handed to it, what `instant` can answer.

        While requests keep coming it waits for the next ones in its own epoll, briefly
        (REACTOR_WAIT), instead of through trio: a pass of trio's scheduler per request costs
        more than the signature. It yields to trio at least every REACTOR_SLICE, so the
        agent's other tasks wait at most that long."""
        reacting = self._reacting
        clock = time.monotonic
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            until = clock() + REACTOR_SLICE
            events = epoll.poll(0)
            while events:
                for fd, _ in events:
                    conn = reacting.get(fd)
                    if conn is not None and conn.react():
                        del reacting[fd]
                        epoll.unregister(fd)
                        conn.handed_back.set()
                if clock() >= until:
                    break
                events = epoll.poll(REACTOR_WAIT)

    async def _framed_loop(self, raw: socket.socket, peer: Peer, first: bytes) -> None:
        """Answer every complete frame that has arrived, in order, with one send; a frame that
        loses the framing is answered (after those before it) and ends the connection."""
        decoder = framing.RequestDecoder(self.max_body_bytes)
        decoder.feed(first)
        eager = 0  # receives in a row that did not have to wait
        with trio.CancelScope(deadline=trio.current_time() + self.idle_timeout) as idle:
            renewed = trio.current_time()
            while True:
                answers: list[bytes] = []
                fatal = False
                self._set_busy(+1)
                try:
                    while True:
                        try:
                            frame = decoder.next()
                        except framing.FramingError as exc:
                            answers.append(
                                framing.encode_error(0, exc.status, exc.code, exc.message)
                            )
                            fatal = True
                            break
                        if frame is None:
                            break
                        answers.append(await self._answer_frame(frame, peer))
                        self.requests_total += 1
                    if answers:
                        await _send_all(raw, b"".join(answers))
                finally:
                    self._set_busy(-1)
                if fatal or (self._stopping.is_set() and not decoder.pending):
                    return
                while True:
                    try:
                        data = raw.recv(_RECEIVE)
                    except BlockingIOError:
                        eager = 0
                        await trio.lowlevel.wait_readable(raw)
                        continue
                    eager += 1
                    if eager >= 4:  # a client that never lets us wait must not starve others
                        eager = 0
                        await trio.lowlevel.checkpoint()
                    break
                if not data:
                    return
                decoder.feed(data)
                now = trio.current_time()
                if now - renewed > 1.0:
                    idle.deadline = now + self.idle_timeout
                    renewed = now

    async def _answer_frame(self, frame: framing.Frame | framing.Oversized, peer: Peer) -> bytes:
        if isinstance(frame, framing.Oversized):
            return framing.encode_error(
                frame.id,
                413,
                "too_large",
                f"request body of {frame.length} bytes exceeds the limit of "
                f"{self.max_body_bytes} (socket.max_request_bytes)",
            )
        try:
            if frame.op == framing.CALL:
                method, target, body = framing.decode_call(frame.body)
                path, _, query = target.partition("?")
                request = Request(method, path, query, (), body, peer)
                response = await self._dispatch(request)
                return framing.encode_response(
                    frame.id,
                    response.status,
                    framing.encode_called(
                        (("content-type", response.content_type), *response.headers),
                        response.body,
                    )
                    if response.status < 400
                    else response.body,
                )
            if frame.op not in framing.OPS or self.fast is None:
                raise ApiError(404, "unknown_op", f"no such framed operation: {frame.op}")
            return framing.encode_response(
                frame.id, 200, await self.fast(frame.op, frame.body, peer)
            )
        except (ApiError, framing.FramingError) as exc:
            return framing.encode_error(frame.id, exc.status, exc.code, exc.message)
        except Exception:
            log.exception("internal error handling framed op %s", frame.op)
            return framing.encode_error(
                frame.id, 500, "internal", "internal error; see the agent log"
            )


class _FramedConnection:
    """A framed connection's state, shared by its own task and the reactor."""

    __slots__ = ("active", "closed", "decoder", "fd", "handed_back", "peer", "pending", "raw",
                 "server", "unsent")  # fmt: skip

    def __init__(self, raw: socket.socket, peer: Peer, server: UnixHttpServer) -> None:
        self.raw = raw
        self.fd = raw.fileno()
        self.peer = peer
        self.server = server
        self.decoder = framing.RequestDecoder(server.max_body_bytes)
        self.pending: framing.Frame | framing.Oversized | None = None  # for the task to answer
        self.unsent = b""  # answers the socket would not take at once: the task sends them
        self.closed = False
        self.active = trio.current_time()
        self.handed_back = trio.Event()

    def react(self) -> bool:
        """Read and answer what arrived; True: hand the connection back to its task."""
        try:
            data = self.raw.recv(_RECEIVE)
        except BlockingIOError:
            return False
        except OSError:
            self.closed = True
            return True
        if not data:
            self.closed = True
            return True
        self.active = trio.current_time()
        decoder = self.decoder
        decoder.feed(data)
        instant = self.server.instant
        assert instant is not None
        answers: list[bytes] = []
        back = False
        while True:
            try:
                frame = decoder.next()
            except framing.FramingError:
                back = True  # the task answers it (after these) and closes
                break
            if frame is None:
                break
            if isinstance(frame, framing.Frame):
                try:
                    body = instant(frame.op, frame.body, self.peer)
                except (ApiError, framing.FramingError) as exc:
                    answers.append(
                        framing.encode_error(frame.id, exc.status, exc.code, exc.message)
                    )
                    self.server.requests_total += 1
                    continue
                except Exception:
                    log.exception("internal error handling framed op %s", frame.op)
                    error = "internal error; see the agent log"
                    answers.append(framing.encode_error(frame.id, 500, "internal", error))
                    continue
                if body is not None:
                    answers.append(framing.encode_response(frame.id, 200, body))
                    self.server.requests_total += 1
                    continue
            self.pending = frame  # needs waiting: the task answers it and what follows
            back = True
            break
        if answers:
            data = b"".join(answers)
            try:
                sent = self.raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.closed = True
                return True
            if sent < len(data):
                self.unsent = data[sent:]
                back = True
        return back


async def _send_all(raw: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = raw.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(raw)
            continue
        view = view[sent:]


class _Closed(Exception):
    pass


class _TooLarge(Exception):
    pass
