"""Load generators and the figures they produce: rate, latency percentiles, CPU per signature.

Every socket load runs in this (client) process on trio; the server's CPU is read from
/proc/<pid>/stat (utime + stime) of the server process and of its children (the agent's worker
processes), the client's from getrusage. All figures are per signature (a batch of 64 counts 64).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from agent.client import AgentError, AsyncClient, Client
from agent.crypto import Signer, generate_private_key
from benchmarks.peers import (
    OpenBao,
    SshAgentConnection,
    TransitConnection,
    read_message,
    sign_request,
)

PAYLOAD = b"x" * 200
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Figure:
    ops: float  # signatures per second
    p50_us: float | None = None
    p99_us: float | None = None
    server_cpu_us: float | None = None  # server CPU time per signature
    client_cpu_us: float | None = None
    requests: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime + stime in ticks) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12])


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[0] == pid:
                found.append(int(entry))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by these processes and their children."""
    total = 0
    for pid in pids:
        for each in (pid, *children(pid)):
            stat = _stat(each)
            if stat is not None:
                total += stat[1]
    return total / _TICK


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measured(run: Callable[[], tuple[int, list[float], int]], server_pids: list[int]) -> Figure:
    """Run one load (returning signatures, latencies in seconds, failures) and measure it."""
    server_before, client_before = cpu_seconds(server_pids), _own_cpu()
    _CHILD_CPU.clear()
    _WINDOW.clear()
    started = time.perf_counter()
    signatures, latencies, failures = run()
    elapsed = time.perf_counter() - started
    server_cpu = cpu_seconds(server_pids) - server_before
    client_cpu = _own_cpu() - client_before + sum(_CHILD_CPU)
    if _WINDOW:  # client processes sign in a window of their own, after their start-up
        elapsed = _WINDOW.pop()
    latencies.sort()
    count = max(signatures, 1)
    return Figure(
        ops=signatures / elapsed,
        p50_us=percentile(latencies, 0.5) * 1e6 if latencies else None,
        p99_us=percentile(latencies, 0.99) * 1e6 if latencies else None,
        server_cpu_us=server_cpu / count * 1e6 if server_pids else None,
        client_cpu_us=client_cpu / count * 1e6,
        requests=len(latencies),
        failures=failures,
    )


def median_of(runs: list[Figure]) -> Figure:
    return sorted(runs, key=lambda f: f.ops)[len(runs) // 2]


# ---- raw in-process signing ----------------------------------------------------------------------


def raw(alg: str, duration: float, threads: int = 1) -> Figure:
    """Signatures per second of this process signing in memory, on `threads` threads."""
    signer = Signer.from_private_key(generate_private_key(alg), alg)
    counts = [0] * threads
    end = time.perf_counter() + duration

    def loop(index: int) -> None:
        sign = signer.sign
        while time.perf_counter() < end:
            for _ in range(100):
                sign(PAYLOAD)
            counts[index] += 100

    started, cpu_before = time.perf_counter(), _own_cpu()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    total = sum(counts)
    return Figure(
        ops=total / elapsed,
        client_cpu_us=(_own_cpu() - cpu_before) / total * 1e6,
        requests=total,
    )


# ---- socket loads --------------------------------------------------------------------------------


async def _drive(
    duration: float,
    streams: int,
    operation: Callable[[int], Awaitable[int]],
) -> tuple[int, list[float], int]:
    """`streams` tasks calling `operation(task index)` (it returns signatures made) until the
    duration is over; a raised exception counts as a failed request."""
    latencies: list[float] = []
    signatures = 0
    failures = 0
    end = trio.current_time() + duration

    async def task(index: int) -> None:
        nonlocal signatures, failures
        clock = time.perf_counter
        while trio.current_time() < end:
            start = clock()
            try:
                made = await operation(index)
            except (AgentError, httpx.HTTPError):
                failures += 1
                await trio.sleep(0.001)
                continue
            latencies.append(clock() - start)
            signatures += made

    async with trio.open_nursery() as nursery:
        for index in range(streams):
            nursery.start_soon(task, index)
    return signatures, latencies, failures


def agent_load(
    socket_path: Path,
    duration: float,
    *,
    connections: int = 1,
    in_flight: int = 1,
    batch: int = 1,
    protocol: str = "framed",
) -> tuple[int, list[float], int]:
    """`connections` clients, each shared by `in_flight` tasks (pipelined on its connection)."""

    async def main() -> tuple[int, list[float], int]:
        clients = [AsyncClient(socket_path, protocol=protocol) for _ in range(connections)]
        payloads = [PAYLOAD] * batch

        async def operation(index: int) -> int:
            client = clients[index % connections]
            if batch == 1:
                await client.sign(PAYLOAD)
                return 1
            return len((await client.sign_batch(payloads)).signatures)

        try:
            for client in clients:  # connect (and fall back, if ever) before the clock starts
                await client.sign(PAYLOAD)
            return await _drive(duration, connections * in_flight, operation)
        finally:
            for client in clients:
                await client.aclose()

    return trio.run(main)


def ssh_agent_load(
    socket_path: Path, blob: bytes, duration: float, *, connections: int = 1, window: int = 1
) -> tuple[int, list[float], int]:
    """ssh-agent: `connections` connections, each with `window` requests outstanding (sent
    ahead, answered in order)."""

    async def main() -> tuple[int, list[float], int]:
        conns = [await SshAgentConnection.open(socket_path, blob) for _ in range(connections)]
        latencies: list[float] = []
        signatures = 0
        end = trio.current_time() + duration

        async def windowed(conn: SshAgentConnection) -> None:
            nonlocal signatures
            sent: list[float] = []
            for _ in range(window):
                sent.append(time.perf_counter())
                await conn.send(PAYLOAD)
            while sent:
                await conn.receive()
                latencies.append(time.perf_counter() - sent.pop(0))
                signatures += 1
                if trio.current_time() < end:
                    sent.append(time.perf_counter())
                    await conn.send(PAYLOAD)

        try:
            async with trio.open_nursery() as nursery:
                for conn in conns:
                    nursery.start_soon(windowed, conn)
        finally:
            for conn in conns:
                await conn.aclose()
        return signatures, latencies, 0

    return trio.run(main)


def transit_load(
    bao: OpenBao, alg: str, duration: float, *, connections: int = 1, batch: int = 1
) -> tuple[int, list[float], int]:
    async def main() -> tuple[int, list[float], int]:
        conns = [TransitConnection(bao, alg) for _ in range(connections)]
        payloads = [PAYLOAD] * batch

        async def operation(index: int) -> int:
            conn = conns[index]
            if batch == 1:
                await conn.sign(PAYLOAD)
                return 1
            return len(await conn.sign_batch(payloads))

        try:
            for conn in conns:
                await conn.sign(PAYLOAD)
            return await _drive(duration, connections, operation)
        finally:
            for conn in conns:
                await conn.aclose()

    return trio.run(main)


# ---- clients in their own processes ------------------------------------------------------------


def _client_process(
    kind: str, target: str, blob: bytes, start: float, end: float, results: Any
) -> None:
    """One client process: sign sequentially from `start` to `end` (wall clock)."""
    latencies: list[float] = []
    if kind == "agent":
        client = Client(target)
        client.sign(PAYLOAD)  # connected before the clock starts

        def sign() -> None:
            client.sign(PAYLOAD)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(target)
        request = sign_request(blob, PAYLOAD)

        def sign() -> None:
            sock.sendall(request)
            read_message(sock)

    while time.time() < start:
        time.sleep(0.001)
    clock = time.perf_counter
    while time.time() < end:
        began = clock()
        sign()
        latencies.append(clock() - began)
    results.put(latencies)


def processes_load(
    kind: str, target: Path, duration: float, *, clients: int = 16, blob: bytes = b""
) -> tuple[int, list[float], int]:
    """`clients` separate processes with a blocking client each, as applications on a node
    would be (the agent's framed `Client`, or a minimal ssh-agent client)."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    start = time.time() + 0.3 + 0.02 * clients
    end = start + duration
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = [
        context.Process(target=_client_process, args=(kind, str(target), blob, start, end, results))
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    latencies: list[float] = []
    for _ in procs:
        latencies.extend(results.get())
    for proc in procs:
        proc.join()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    _CHILD_CPU.append(
        children_after.ru_utime + children_after.ru_stime
        - children_before.ru_utime - children_before.ru_stime
    )  # fmt: skip
    _WINDOW.append(duration)
    return len(latencies), latencies, 0


_CHILD_CPU: list[float] = []  # CPU seconds of the last processes_load's client processes
_WINDOW: list[float] = []  # and the seconds they signed for


def _spin(seconds: float, results: Any) -> None:
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        count += 1
    results.put(count)


def effective_cores(seconds: float = 0.5) -> float:
    """How many CPUs this machine really gives two busy processes at once (a shared 2-vCPU
    machine may give them one between them): their total work over one process's alone."""
    context = multiprocessing.get_context("fork")
    totals: list[int] = []
    for count in (1, 2):
        results = context.Queue()
        procs = [context.Process(target=_spin, args=(seconds, results)) for _ in range(count)]
        for proc in procs:
            proc.start()
        totals.append(sum(int(results.get()) for _ in procs))
        for proc in procs:
            proc.join()
    return totals[1] / totals[0]
