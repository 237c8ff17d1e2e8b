"""The Unix-socket HTTP server on its own, with a toy handler, and the clients against it."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from agent.client import AgentError, AgentUnreachable, AsyncClient, Client
from agent.httpd import ApiError, Request, Response, SocketInUse, UnixHttpServer, json_response


class Toy:
    def __init__(self) -> None:
        self.release = trio.Event()
        self.entered = trio.Event()

    async def __call__(self, request: Request) -> Response:
        if request.path == "/echo":
            return json_response(
                {
                    "body": request.body.decode(),
                    "uid": request.peer.uid,
                    "gid": request.peer.gid,
                    "pid": request.peer.pid,
                    "method": request.method,
                    "query": request.query,
                }
            )
        if request.path == "/slow":
            self.entered.set()
            await self.release.wait()
            return json_response({"slow": "done"})
        if request.path == "/teapot":
            raise ApiError(418, "teapot", "short and stout")
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        if request.path == "/healthz":
            return json_response({"status": "ok"})
        raise ApiError(404, "not_found", request.path)


@asynccontextmanager
async def serving(
    path: Path, toy: Toy | None = None, **kwargs: object
) -> AsyncIterator[UnixHttpServer]:
    server = UnixHttpServer(toy or Toy(), path, **kwargs)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        server.shutdown()


async def exchange(path: Path, data: bytes) -> bytes:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(data)
        chunks = []
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def get(path: str, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: a\r\n{extra}\r\n".encode()


async def test_pipelined_requests_are_answered_in_order_on_one_connection(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with serving(sock) as server:
        raw = await exchange(sock, get("/echo?a=1") + get("/teapot") + get("/echo?b=2", close=True))
        assert raw.count(b"HTTP/1.1 ") == 3
        first, second, third = raw.split(b"HTTP/1.1 ")[1:]
        assert first.startswith(b"200") and b'"query":"a=1"' in first
        assert second.startswith(b"418") and b'"code":"teapot"' in second
        assert third.startswith(b"200") and b'"query":"b=2"' in third
        assert server.requests_total == 3


async def test_peer_credentials_are_those_of_the_calling_process(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with serving(sock), AsyncClient(sock) as client:
        status, _, body = await client._request("POST", "/echo", {"x": 1})
        doc = json.loads(body)
        assert status == 200
        assert (doc["uid"], doc["gid"], doc["pid"]) == (os.getuid(), os.getgid(), os.getpid())


async def test_a_handler_bug_is_a_500_and_the_server_keeps_serving(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with serving(sock), AsyncClient(sock) as client:
        with pytest.raises(AgentError) as info:
            await client._json("GET", "/boom")
        assert info.value.status == 500 and info.value.code == "internal"
        assert "handler bug" not in info.value.message
        ok, _ = await client.healthz()
        assert ok


async def test_oversized_content_length_is_refused_before_the_body_is_sent(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with serving(sock, max_body_bytes=100):
        raw = await exchange(
            sock, b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 413")
        assert b'"code":"too_large"' in raw


async def test_chunked_body_over_the_limit_is_refused(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with serving(sock, max_body_bytes=100):
        body = b"".join(b"40\r\n" + b"x" * 64 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
        raw = await exchange(
            sock, b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        )
        assert raw.startswith(b"HTTP/1.1 413")


async def test_garbage_gets_a_400_json_error(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with serving(sock):
        raw = await exchange(sock, b"\x16\x03\x01 not http at all\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400")
        assert b'"error"' in raw


async def test_socket_mode_is_0660_and_a_second_server_is_refused(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    async with serving(sock), AsyncClient(sock) as client:
        assert sock.stat().st_mode & 0o777 == 0o660
        with pytest.raises(SocketInUse, match=str(sock)):
            await UnixHttpServer(Toy(), sock).serve()
        assert (await client.healthz())[0]


async def test_a_stale_socket_file_is_replaced(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))
    dead.close()  # the file stays, nobody listens: what a kill -9 leaves behind
    async with serving(sock), AsyncClient(sock) as client:
        assert (await client.healthz())[0]


async def test_shutdown_lets_an_in_flight_request_finish_and_removes_the_socket(
    short_tmp: Path,
) -> None:
    sock = short_tmp / "s.sock"
    toy = Toy()
    results: list[bytes] = []
    server = UnixHttpServer(toy, sock)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)

        async def slow() -> None:
            results.append(await exchange(sock, get("/slow", close=True)))

        nursery.start_soon(slow)
        with trio.fail_after(5):
            await toy.entered.wait()
        server.shutdown()
        with trio.fail_after(5):
            while sock.exists():
                await trio.sleep(0.01)
        with pytest.raises(OSError):
            await trio.open_unix_socket(str(sock))
        toy.release.set()
    assert results and results[0].startswith(b"HTTP/1.1 200") and b"done" in results[0]
    assert not sock.exists()
    assert not sock.with_name("s.sock.lock").exists()


def test_sync_client_against_a_server_in_another_thread(short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    server = UnixHttpServer(Toy(), sock)
    token: list[trio.lowlevel.TrioToken] = []
    started = threading.Event()

    async def run() -> None:
        token.append(trio.lowlevel.current_trio_token())
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            started.set()

    thread = threading.Thread(target=trio.run, args=(run,))
    thread.start()
    try:
        assert started.wait(10)
        with Client(sock) as client:
            for _ in range(3):  # one keep-alive connection, several requests
                ok, doc = client.healthz()
                assert ok and doc == {"status": "ok"}
            with pytest.raises(AgentError) as info:
                client._json("GET", "/teapot")
            assert info.value.status == 418 and info.value.message == "short and stout"
    finally:
        trio.from_thread.run_sync(server.shutdown, trio_token=token[0])
        thread.join(10)
    assert not sock.exists()


async def test_clients_name_the_socket_when_no_agent_listens(short_tmp: Path) -> None:
    missing = short_tmp / "absent.sock"
    with pytest.raises(AgentUnreachable, match=str(missing)), Client(missing) as client:
        client.status()
    async with AsyncClient(missing) as async_client:
        with pytest.raises(AgentUnreachable, match="keyquorum run"):
            await async_client.status()
