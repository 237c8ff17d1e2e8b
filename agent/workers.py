"""Worker processes sharing the agent's listening socket (`[socket] workers = N`).

One Python process signs ECDSA on one core at a time (the GIL). With `workers = N`, the agent
process starts N - 1 workers that accept connections on the same listening socket, so up to N
processes serve the hot path (sign, sign batch, JWT; HTTP or framed) on N cores. Everything else
stays in the agent process: a worker forwards any other request (JWKS, status, metrics, admin)
to it over a private control channel, with the caller's peer credentials, and gets the answer
back. So the agent process alone watches the store, leads, unwraps keys and answers for the
cluster.

The control channel is a socketpair inherited by the worker (no path in the filesystem), with
length-prefixed pickled messages between a parent and its own child:

    agent -> worker   ("config", AgentConfig)                      once, first
                      ("state", keyset JSON, [(kid, alg, PKCS#8)], problems, ready)
                      ("answer", id, Response)
    worker -> agent   ("call", id, Request)                        a request it forwards
                      ("metrics", counters, histograms)            increments since the last

The agent sends a new state whenever its key set, loaded keys, problems or readiness change
(checked every `STATE_POLL` seconds), so a worker signs with exactly the key the agent would:
it runs the same keyring over the same document and clock. The private halves travel only over
the socketpair, in memory, never to a file or a log (DESIGN.md §9.5). A worker whose control
channel closes (the agent stopped or died) stops at once: it must never sign with a key set
the agent no longer vouches for. A worker that dies is restarted with backoff.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import struct
import sys
from typing import Any

import trio

from agent.api import SigningApi
from agent.config import AgentConfig
from agent.crypto import Signer, load_pkcs8, private_key_to_pkcs8
from agent.httpd import ApiError, Request, Response, UnixHttpServer
from agent.keyring import Keyring
from agent.keyset import dump_keyset, parse_keyset
from agent.metrics import Histogram, Metrics

log = logging.getLogger("keyquorum.workers")

STATE_POLL = 0.05  # seconds between checks for a changed key state to push to workers
METRICS_PUSH = 1.0  # seconds between a worker's metric reports
_LENGTH = struct.Struct(">I")


class _Channel:
    """Length-prefixed pickled messages over a stream (both ends are this program)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._send_lock = trio.Lock()
        self._buffer = bytearray()

    async def send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        async with self._send_lock:
            await self.stream.send_all(_LENGTH.pack(len(data)) + data)

    async def receive(self) -> tuple[Any, ...] | None:
        """The next message, or None once the other end has closed."""
        while True:
            if len(self._buffer) >= 4:
                (size,) = _LENGTH.unpack_from(self._buffer)
                if len(self._buffer) >= 4 + size:
                    data = bytes(self._buffer[4 : 4 + size])
                    del self._buffer[: 4 + size]
                    # Both ends are this program: the agent and its own child process.
                    message: tuple[Any, ...] = pickle.loads(data)  # noqa: S301
                    return message
            try:
                chunk = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not chunk:
                return None
            self._buffer += chunk


def metrics_delta(
    metrics: Metrics, sent: dict[Any, Any]
) -> tuple[dict[Any, float], dict[Any, tuple[list[int], float, int]]]:
    """Counter and histogram increments since the last call (`sent` remembers what was sent)."""
    counters: dict[Any, float] = {}
    for key, value in metrics.counters.items():
        before = sent.get(("c", key), 0.0)
        if value != before:
            counters[key] = value - before
            sent[("c", key)] = value
    histograms: dict[Any, tuple[list[int], float, int]] = {}
    for key, histogram in metrics.histograms.items():
        counts, total, count = sent.get(("h", key), ([0] * len(histogram.counts), 0.0, 0))
        if histogram.count != count:
            histograms[key] = (
                [a - b for a, b in zip(histogram.counts, counts, strict=True)],
                histogram.total - total,
                histogram.count - count,
            )
            sent[("h", key)] = (list(histogram.counts), histogram.total, histogram.count)
    return counters, histograms


def merge_metrics(
    metrics: Metrics,
    counters: dict[Any, float],
    histograms: dict[Any, tuple[list[int], float, int]],
) -> None:
    for key, amount in counters.items():
        metrics.counters[key] = metrics.counters.get(key, 0.0) + amount
    for key, (counts, total, count) in histograms.items():
        histogram = metrics.histograms.get(key)
        if histogram is None:
            histogram = metrics.histograms[key] = Histogram()
        histogram.counts = [a + b for a, b in zip(histogram.counts, counts, strict=True)]
        histogram.total += total
        histogram.count += count


# ---- the agent's side ----------------------------------------------------------------------------


class WorkerPool:
    """Starts and supervises `count - 1` workers once the agent's server is listening."""

    def __init__(self, agent: Any, handle: Any, server: UnixHttpServer, count: int) -> None:
        self.agent = agent
        self.handle = handle  # the agent's full HTTP handler, for forwarded requests
        self.server = server
        self.count = count
        self.pids: dict[int, int] = {}  # worker index -> pid of the running process

    async def run(self) -> None:
        await self.server.listening.wait()
        async with trio.open_nursery() as nursery:
            for index in range(1, self.count):
                nursery.start_soon(self._supervise, index)

    async def _supervise(self, index: int) -> None:
        delay = 0.2
        while True:
            started = trio.current_time()
            code = await self._run_worker(index)
            log.warning("worker %d exited with %s; restarting in %.1fs", index, code, delay)
            await trio.sleep(delay)
            delay = 0.2 if trio.current_time() - started > 30 else min(delay * 2, 10.0)

    async def _run_worker(self, index: int) -> int | None:
        listen = self.server.listen_socket
        assert listen is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "agent.workers", str(listen.fileno()), str(theirs.fileno())],
                pass_fds=(listen.fileno(), theirs.fileno()),
            )
        finally:
            theirs.close()
        self.pids[index] = process.pid
        channel = _Channel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        try:
            await channel.send(("config", self.agent.config))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._push_state, channel)
                nursery.start_soon(self._serve_worker, channel, nursery)
                await process.wait()
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.pids.pop(index, None)
            with trio.CancelScope(shield=True):
                await channel.stream.aclose()  # the worker stops once its channel closes
                with trio.move_on_after(self.server.drain_timeout + 1):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        return process.returncode

    def _state(self) -> tuple[Any, ...]:
        agent = self.agent
        keyring: Keyring = agent.keyring
        document = dump_keyset(keyring.keyset) if keyring.keyset is not None else None
        signers = [
            (kid, signer.alg, private_key_to_pkcs8(signer.private_key))
            for kid, signer in sorted(keyring.signers.items())
            if isinstance(signer, Signer)
        ]
        return ("state", document, signers, dict(agent.problems), agent.ready.is_set())

    async def _push_state(self, channel: _Channel) -> None:
        last: tuple[Any, ...] | None = None
        while True:
            agent = self.agent
            keyring = agent.keyring
            seen = (
                id(keyring.keyset),
                tuple(keyring.signers),
                tuple(sorted(agent.problems.items())),
                agent.ready.is_set(),
            )
            if seen != last:
                await channel.send(self._state())
                last = seen
            await trio.sleep(STATE_POLL)

    async def _serve_worker(self, channel: _Channel, nursery: trio.Nursery) -> None:
        while True:
            message = await channel.receive()
            if message is None:
                return
            if message[0] == "call":
                nursery.start_soon(self._answer, channel, message[1], message[2])
            elif message[0] == "metrics":
                merge_metrics(self.agent.metrics, message[1], message[2])

    async def _answer(self, channel: _Channel, ident: int, request: Request) -> None:
        try:
            response = await self.handle(request)
        except ApiError as exc:
            response = exc.response()
        except Exception:
            log.exception("internal error handling forwarded %s %s", request.method, request.path)
            response = ApiError(500, "internal", "internal error; see the agent log").response()
        await channel.send(("answer", ident, response))


# ---- the worker's side ---------------------------------------------------------------------------


class WorkerState:
    """What `SigningApi` needs, mirrored from the agent process."""

    def __init__(self, config: AgentConfig) -> None:
        from agent.daemon import wall_ms

        self.config = config
        self.keyring = Keyring()
        self.metrics = Metrics()
        self.ready = trio.Event()
        self.problems: dict[str, str] = {}
        self.clock = wall_ms

    def adopt(
        self,
        document: bytes | None,
        signers: list[tuple[str, str, bytes]],
        problems: dict[str, str],
        ready: bool,
    ) -> None:
        keyring = Keyring()
        if document is not None:
            keyring.install(parse_keyset(document), self.clock())
        for _kid, alg, pkcs8 in signers:
            keyring.add_signer(Signer.from_private_key(load_pkcs8(pkcs8, alg), alg))
        self.keyring = keyring  # swapped whole: a request never sees half a state
        self.problems = problems
        if ready:
            self.ready.set()


class Worker:
    def __init__(self, config: AgentConfig, channel: _Channel, listen: socket.socket) -> None:
        self.state = WorkerState(config)
        self.api = SigningApi(self.state)
        self.local = {("POST", "/v1/sign"): self.api.sign, ("POST", "/v1/jwt"): self.api.jwt}
        self.channel = channel
        self.server = UnixHttpServer(
            self.handle,
            config.socket.path,
            inherited=listen,
            max_body_bytes=config.socket.max_request_bytes,
            fast=self.api.fast,
            instant=self.api.sign_now,
        )
        self._waiting: dict[int, tuple[trio.Event, list[Response]]] = {}
        self._next_id = 0
        self._metrics_sent: dict[Any, Any] = {}

    async def handle(self, request: Request) -> Response:
        handler = self.local.get((request.method, request.path))
        if handler is None:
            return await self._forward(request)
        return await self.api.counted(handler, request)

    async def _forward(self, request: Request) -> Response:
        self._next_id += 1
        ident = self._next_id
        done: tuple[trio.Event, list[Response]] = (trio.Event(), [])
        self._waiting[ident] = done
        try:
            await self.channel.send(("call", ident, request))
            await done[0].wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._waiting.pop(ident, None)
        if not done[1]:
            raise ApiError(503, "unavailable", "the agent process is stopping; try again")
        return done[1][0]

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_agent)
            nursery.start_soon(self._report_metrics)
            await self.server.serve()
            nursery.cancel_scope.cancel()

    async def _follow_agent(self) -> None:
        while True:
            message = await self.channel.receive()
            if message is None:  # the agent is gone: stop serving its keys now
                self.server.shutdown()
                for event, _ in self._waiting.values():
                    event.set()
                return
            if message[0] == "state":
                self.state.adopt(*message[1:])
            elif message[0] == "answer":
                waiting = self._waiting.get(message[1])
                if waiting is not None:
                    waiting[1].append(message[2])
                    waiting[0].set()

    async def _report_metrics(self) -> None:
        while True:
            await trio.sleep(METRICS_PUSH)
            counters, histograms = metrics_delta(self.state.metrics, self._metrics_sent)
            if counters or histograms:
                await self.channel.send(("metrics", counters, histograms))


async def _worker_main(listen_fd: int, control_fd: int) -> None:
    control = socket.socket(fileno=control_fd)
    channel = _Channel(trio.SocketStream(trio.socket.from_stdlib_socket(control)))
    message = await channel.receive()
    if message is None or message[0] != "config":
        return
    config: AgentConfig = message[1]
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker[{os.getpid()}] %(name)s: %(message)s",
    )
    listen = socket.socket(fileno=listen_fd)
    worker = Worker(config, channel, listen)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    worker.server.shutdown()
                    return

            nursery.start_soon(stop_on_signal)
            await worker.run()
            nursery.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the whole process group: the agent process decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trio.run(_worker_main, int(argv[0]), int(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
