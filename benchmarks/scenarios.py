"""Benchmark sections beyond raw throughput: rotation under load, a three-agent etcd cluster
(key-set propagation, leader failover), memory by published keys, and the watch fan-out.

Each starts what it needs (agents, etcd) on loopback and stops it however the run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import trio

from agent.client import AgentError, AsyncClient, Client
from agent.crypto import Signer, generate_private_key, private_key_to_pkcs8
from agent.demo import agent_process, cluster_configs
from agent.keyset import KeyRecord, KeySet, dump_keyset
from backends.envelope import seal
from backends.local import LocalKekWrapper
from benchmarks.load import PAYLOAD, cpu_seconds, percentile
from consensus.etcd_client import EtcdClient
from consensus.file import FileStore
from consensus.local_etcd import LocalEtcd


def _say(text: str) -> None:
    print(text, flush=True)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# ---- rotation under load -------------------------------------------------------------------------


def rotation(duration: float, workers: int) -> dict[str, Any]:
    """16 connections signing at full rate while an operator rotates: the new key activates a
    grace period later; every request must succeed."""
    from benchmarks.__main__ import agent  # the same single-node agent as the table's

    quick = duration < 1
    grace = 0.6 if quick else 2.0
    run_for = grace + (1.0 if quick else max(duration, 2.0) + 1.0)
    keys = {"grace_period": f"{grace}s", "jwks_max_age": "400ms", "max_clock_skew": "100ms",
            "check_interval": "100ms", "lease_ttl": "300ms"}  # fmt: skip
    with agent("ES256", workers, **keys) as (sock, _):
        records: list[tuple[float, float, str | None]] = []  # (sent, latency, kid or None)
        rotated_at = 0.0

        async def main() -> None:
            nonlocal rotated_at
            end = time.perf_counter() + run_for

            async def signer() -> None:
                async with AsyncClient(sock) as client:
                    while time.perf_counter() < end:
                        sent = time.perf_counter()
                        try:
                            kid: str | None = (await client.sign(PAYLOAD)).kid
                        except AgentError:
                            kid = None
                        records.append((sent, time.perf_counter() - sent, kid))

            async def operator() -> None:
                nonlocal rotated_at
                await trio.sleep(0.5)
                async with AsyncClient(sock) as client:
                    rotated_at = time.perf_counter()
                    await client.rotate()

            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(signer)
                nursery.start_soon(operator)

        trio.run(main)
    latencies = sorted(r[1] for r in records if r[2] is not None)
    median = statistics.median(latencies)
    kids = [r[2] for r in sorted(records) if r[2] is not None]
    switch = next((s for s, _, k in sorted(records) if k is not None and k != kids[0]), None)
    result = {
        "workers": workers,
        "requests": len(records),
        "failed": sum(1 for r in records if r[2] is None),
        "rate": len(records) / run_for,
        "p50_us": median * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
        "max_us": latencies[-1] * 1e6,
        "slower_than_2x_median": sum(1 for x in latencies if x > 2 * median) / len(latencies),
        "kids": len(set(kids)),
        "switch_after_rotate_s": (switch - rotated_at) if switch else None,
        "grace_s": grace,
    }
    _say(
        f"rotation under load (ES256, 16 connections, {workers} process(es)): "
        f"{result['requests']:,} requests at {result['rate']:,.0f}/s, "
        f"failed {result['failed']}, slower than 2x median {result['slower_than_2x_median']:.2%}, "
        f"p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us, "
        f"max {latencies[-1] * 1000:.1f} ms; {result['kids']} kids signed, new key from "
        f"{(switch - rotated_at) if switch else float('nan'):.2f}s after `rotate` (grace {grace}s)"
    )
    return result


# ---- a three-agent cluster on etcd ---------------------------------------------------------------

CLUSTER_TIMING = """
[keys]
key_ttl = "10m"
rotation_threshold = "1m"
grace_period = "4s"
check_interval = "250ms"
jwks_max_age = "1s"
max_clock_skew = "200ms"
max_token_ttl = "1s"
outage_budget = "10s"
lease_ttl = "2s"

[jwt]
default_ttl = "1s"
"""


def _status(sock: Path) -> dict[str, Any]:
    with Client(sock, timeout=2) as client:
        return client.status()


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (AgentError, OSError):
            value = None
        if value:
            return value
        time.sleep(0.005)
    raise RuntimeError(f"timed out waiting for {what}")


def cluster(directory: Path, *, quick: bool = False) -> dict[str, Any]:
    """Propagation: from the leader's committed write of a new key until every agent has it
    loaded (and in its JWKS). Failover: from kill -9 of the leader until another agent leads."""
    root = Path(tempfile.mkdtemp(prefix="kq-cl-", dir="/tmp"))
    etcd = LocalEtcd(root / "etcd", size=3)
    result: dict[str, Any] = {}
    try:
        etcd.start()
        configs = cluster_configs(
            root,
            etcd.endpoints,
            prefix="/keyquorum/bench",
            timing=CLUSTER_TIMING,
            log_level="warning",
        )
        socks = {config.parent.name: config.parent / "agent.sock" for config in configs}
        with ExitStack() as stack:
            procs = {
                config.parent.name: stack.enter_context(
                    agent_process(config, config.parent / "agent.sock", ready_timeout=60)
                )
                for config in configs
            }

            def leader() -> str | None:
                roles = {n: _status(s)["role"] for n, s in socks.items() if procs[n].poll() is None}
                leaders = [n for n, role in roles.items() if role == "leader"]
                return leaders[0] if len(leaders) == 1 else None

            first = _wait(leader, 30, "a leader")
            propagation: list[float] = []
            for _ in range(1 if quick else 3):
                kid, committed = _rotate_when_allowed(socks[first])
                _wait(
                    lambda k=kid: all(_loaded(s, k) for s in socks.values()),
                    30,
                    "the new key on every agent",
                )
                propagation.append(time.perf_counter() - committed)
            result["propagation_s"] = propagation
            _say(
                "key-set propagation (rotate committed on the leader -> new key loaded on all 3 "
                f"agents): median {statistics.median(propagation) * 1000:.0f} ms, "
                f"max {max(propagation) * 1000:.0f} ms over {len(propagation)} rotations"
            )
            term = _status(socks[first])["term"]
            killed_at = time.perf_counter()
            procs[first].send_signal(signal.SIGKILL)
            procs[first].wait()
            others = [n for n in socks if n != first]

            def new_leader() -> str | None:
                for node in others:
                    status = _status(socks[node])
                    if status["role"] == "leader" and status["term"] != term:
                        return node
                return None

            successor = _wait(new_leader, 60, "a new leader")
            failover = time.perf_counter() - killed_at
            result["failover_s"] = failover
            result["lease_ttl_s"] = 2.0
            _say(
                f"leader failover (kill -9 of {first} -> {successor} leads, new term): "
                f"{failover:.2f} s (lease TTL 2 s)"
            )
    finally:
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)
    return result


def _rotate_when_allowed(sock: Path) -> tuple[str, float]:
    """Rotate on the leader (retrying while the previous key is still pending); returns the new
    kid and when the write was committed (the answer's arrival)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with Client(sock, timeout=10) as client:
                created = client.rotate()["created"]
            return str(created), time.perf_counter()
        except AgentError as exc:
            if exc.status != 409 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _all_loaded(sock: Path, count: int) -> bool:
    keys = _status(sock)["keys"]
    return len(keys) == count and all(k["loaded"] for k in keys)


def _loaded(sock: Path, kid: str) -> bool:
    status = _status(sock)
    return any(k["kid"] == kid and k["loaded"] for k in status["keys"])


# ---- memory by published keys --------------------------------------------------------------------


def memory(directory: Path) -> dict[str, Any]:
    """RSS of an agent whose key set holds 1, 10 or 100 published keys (all unwrapped)."""
    from benchmarks.__main__ import write_config

    result: dict[str, Any] = {}
    for count in (1, 10, 100):
        with tempfile.TemporaryDirectory(prefix="kq-mem-", dir="/tmp") as tmp:
            where = Path(tmp)
            config = write_config(where, "ES256")
            trio.run(_seed_keyset, where / "state", count)
            with agent_process(config, where / "agent.sock", ready_timeout=60) as proc:
                _wait(partial(_all_loaded, where / "agent.sock", count), 60, "every key loaded")
                with Client(where / "agent.sock") as client:
                    for _ in range(200):
                        client.sign(PAYLOAD)
                    jwks = client.jwks()
                    assert len(jwks["keys"]) == count, len(jwks["keys"])
                result[str(count)] = {"rss_kib": _rss_kib(proc.pid)}
    one = result["1"]["rss_kib"]
    per_key = (result["100"]["rss_kib"] - one) / 99
    result["per_key_kib"] = per_key
    _say(
        "agent RSS by published keys: "
        + ", ".join(f"{n}: {result[n]['rss_kib'] / 1024:.1f} MiB" for n in ("1", "10", "100"))
        + f" (~{per_key:.1f} KiB per key)"
    )
    return result


async def _seed_keyset(state: Path, count: int) -> None:
    """Write a key set of `count` keys, sealed under the node's KEK: the newest active, the
    rest retired but still published (a long key TTL keeps them)."""
    state.mkdir(parents=True, exist_ok=True)
    wrapper = LocalKekWrapper.open(state / "kek")
    now = time.time_ns() // 1_000_000
    ttl, tail = 3_600_000, 5 * 60_000 + 1_000  # key_ttl; max_token_ttl + max_clock_skew
    records = []
    for index in range(count):
        key = generate_private_key("ES256")
        signer = Signer.from_private_key(key, "ES256")
        created = now - (count - index) * 1_000
        sealed = await seal(
            wrapper, private_key_to_pkcs8(key), kid=signer.kid, prefix="/keyquorum/default"
        )
        records.append(
            KeyRecord(
                kid=signer.kid, alg="ES256", jwk=dict(signer.jwk), private=sealed,
                created_at=created, activate_at=created, deactivate_at=created + ttl - tail,
                expires_at=created + ttl,
            )
        )  # fmt: skip
    keyset = KeySet(generation=1, keys=tuple(records), last_change={"by": "benchmark"})
    store = FileStore(state / "keyset.store")
    try:
        await store.compare_and_swap(0, dump_keyset(keyset))
    finally:
        await store.aclose()


# ---- the watch fan-out with 100 members ----------------------------------------------------------


def fanout(directory: Path, *, quick: bool = False, members: int = 100) -> dict[str, Any]:
    """100 simulated members, each with its own etcd client and lease like an agent: a watch on
    the key set and a member report. Per key-set write: the time until every member's watch
    has delivered it, then until all have written their reports back (what the leader's
    activation gate waits for), the leader's range over the reports, and etcd's CPU."""
    root = Path(tempfile.mkdtemp(prefix="kq-fan-", dir="/tmp"))
    etcd = LocalEtcd(root / "etcd", size=1)
    try:
        etcd.start()
        etcd_pids = [m.process.pid for m in etcd.members if m.process is not None]
        result = trio.run(_fanout, etcd.endpoints, etcd_pids, members, 3 if quick else 20)
    finally:
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)
    _say(
        f"watch fan-out ({members} members, single-member etcd, {result['writes']} key-set "
        f"writes): all watches delivered in median {result['delivered_ms_p50']:.1f} ms "
        f"(max {result['delivered_ms_max']:.1f}); all {members} reports back in median "
        f"{result['reported_ms_p50']:.1f} ms; leader's range over {members} reports "
        f"{result['range_ms_p50']:.2f} ms; etcd CPU {result['etcd_cpu_ms_per_write']:.1f} ms "
        f"per write incl. its {members} report puts; members' CPU "
        f"{result['member_cpu_us_per_write']:.0f} us each per write"
    )
    return result


async def _fanout(
    endpoints: list[str], etcd_pids: list[int], members: int, writes: int
) -> dict[str, Any]:
    prefix = b"/keyquorum/fanout"
    keyset_key = prefix + b"/keyset"
    document = b'{"keys":[' + b",".join([b'{"kid":"%d","pad":"%s"}' % (i, b"x" * 900)
                                         for i in range(3)]) + b"]}"  # fmt: skip
    leader = EtcdClient(endpoints)
    clients = [EtcdClient(endpoints) for _ in range(members)]
    leases = [(await c.lease_grant(10))[0] for c in clients]
    received: list[list[float]] = [[] for _ in range(members)]
    delivered = [trio.Event() for _ in range(writes)]
    seen = [0] * writes
    delivered_ms: list[float] = []
    reported_ms: list[float] = []
    range_ms: list[float] = []
    write_at = [0.0] * writes

    async def member(index: int) -> None:
        client = clients[index]
        revision = (await client.range(keyset_key))[1]
        async for batch in client.watch(keyset_key, start_revision=revision + 1):
            for event in batch.events:
                number = int(event.kv.value.split(b"#", 1)[0])
                received[index].append(time.perf_counter())
                report = json.dumps({"loaded": [number]}).encode()
                await client.put(prefix + b"/members/m%d" % index, report, lease=leases[index])
                seen[number] += 1
                if seen[number] == members:
                    delivered[number].set()

    async with trio.open_nursery() as nursery:
        for index in range(members):
            nursery.start_soon(member, index)
        await trio.sleep(1.0)  # every watch established
        cpu_before = cpu_seconds(etcd_pids)
        own_before = _own_cpu()
        for number in range(writes):
            write_at[number] = time.perf_counter()
            await leader.put(keyset_key, b"%d#" % number + document)
            with trio.fail_after(30):
                await delivered[number].wait()
            reported_ms.append((time.perf_counter() - write_at[number]) * 1000)
            last = max(r[number] for r in received)
            delivered_ms.append((last - write_at[number]) * 1000)
            started = time.perf_counter()
            kvs, _ = await leader.range(prefix + b"/members/", prefix=True)
            range_ms.append((time.perf_counter() - started) * 1000)
            assert len(kvs) == members
        etcd_cpu = cpu_seconds(etcd_pids) - cpu_before
        own_cpu = _own_cpu() - own_before
        nursery.cancel_scope.cancel()
    for client in (leader, *clients):
        await client.aclose()
    return {
        "members": members,
        "writes": writes,
        "delivered_ms_p50": statistics.median(delivered_ms),
        "delivered_ms_max": max(delivered_ms),
        "reported_ms_p50": statistics.median(reported_ms),
        "range_ms_p50": statistics.median(range_ms),
        "etcd_cpu_ms_per_write": etcd_cpu / writes * 1000,
        "member_cpu_us_per_write": own_cpu / writes / members * 1e6,
    }


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system
