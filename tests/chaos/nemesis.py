"""The faults, each a function that injects, waits, heals, and logs its start and end.

A fault's `down` list names the agents it takes down (killed, stopped, restarting): only those
may fail requests while it lasts (the checker enforces it). Durations are chosen against the
cluster timings in tests/helpers.py (CLUSTER_KEYS: keys rotate every ~7 s, lease 2 s, the
timings ride through ~10 s of etcd or backend outage).
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from harness import PREFIX, AgentNode, Cluster

Fault = Callable[[Cluster], None]


@contextlib.contextmanager
def fault(cluster: Cluster, kind: str, down: list[AgentNode] | None = None, **info: Any) -> Any:
    names = [n.name for n in down or []]
    cluster.log.write("fault", kind=kind, phase="start", down=names, **info)
    try:
        yield
    finally:
        cluster.log.write("fault", kind=kind, phase="end", down=names, **info)


def kill_leader(cluster: Cluster) -> None:
    leader = cluster.leader()
    with fault(cluster, "kill -9 leader", [leader], target=leader.name):
        leader.kill()
        time.sleep(3.0)
        leader.start()


def pause_leader(cluster: Cluster) -> None:
    leader = cluster.leader()
    with fault(cluster, "SIGSTOP leader past its lease", [leader], target=leader.name):
        leader.signal(signal.SIGSTOP)
        time.sleep(4.0)  # lease 2 s: another agent takes over meanwhile
        leader.signal(signal.SIGCONT)
        time.sleep(0.5)


def partition_leader(cluster: Cluster) -> None:
    leader = cluster.leader()
    with fault(cluster, "partition leader from etcd", [], target=leader.name):
        for proxy in leader.proxies:
            proxy.cut()
        time.sleep(6.0)
        for proxy in leader.proxies:
            proxy.heal()


def etcd_member_loss(cluster: Cluster) -> None:
    member = cluster.etcd.members[random.randrange(3)]
    with fault(cluster, "etcd member loss", [], target=member.name):
        cluster.etcd.kill(member)
        time.sleep(5.0)
        cluster.etcd.start_member(member)
        cluster.etcd.wait_healthy(20)


def etcd_quorum_loss(cluster: Cluster) -> None:
    members = cluster.etcd.members[1:]
    with fault(cluster, "etcd quorum loss (8 s > a rotation step)", []):
        for member in members:
            cluster.etcd.kill(member)
        time.sleep(8.0)
        for member in members:
            cluster.etcd.start_member(member)
        cluster.etcd.wait_healthy(20)


def backend_outage(cluster: Cluster) -> None:
    with fault(cluster, "backend (KMS) outage across a rotation", []):
        cluster.bao.pause()
        time.sleep(8.0)
        cluster.bao.resume()


def clock_skew(cluster: Cluster) -> None:
    """Restart one follower with its clock 150 ms ahead (keys.max_clock_skew is 200 ms)."""
    leader = cluster.leader()
    node = next(n for n in cluster.nodes if n is not leader)
    with fault(cluster, "clock skew +150 ms on one agent", [node], target=node.name):
        node.stop()
        node.env["KEYQUORUM_FAULT_CLOCK_OFFSET_MS"] = "150"
        node.start()


def rolling_restart(cluster: Cluster) -> None:
    for node in cluster.nodes:
        with fault(cluster, "rolling restart", [node], target=node.name):
            node.stop()
            node.start()
        time.sleep(1.0)


def corrupt_write(cluster: Cluster) -> None:
    key = f"{PREFIX}/keyset".encode()

    async def corrupt(client: Any) -> bytes:
        kv = await client.get(key)
        await client.put(key, b'{"schema": 1, "keys": "garbage"')
        return bytes(kv.value)

    with fault(cluster, "corrupt key-set write (repaired after 3 s)", []):
        good = cluster.etcd_call(corrupt)
        time.sleep(3.0)
        document = json.loads(good)
        document["generation"] += 1  # the operator restores the last good document

        async def restore(client: Any) -> None:
            await client.put(key, json.dumps(document).encode())

        cluster.etcd_call(restore)


def overlapping(cluster: Cluster) -> None:
    """Two faults at once: the leader killed while the backend is out; then a partitioned
    follower while an etcd member is down."""
    for first, second in ((kill_leader, backend_outage), (partition_follower, etcd_member_loss)):
        threads = [threading.Thread(target=f, args=(cluster,)) for f in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cluster.wait_healthy()
        time.sleep(3.0)


def partition_follower(cluster: Cluster) -> None:
    leader = cluster.leader()
    node = next(n for n in cluster.nodes if n is not leader)
    with fault(cluster, "partition follower from etcd", [], target=node.name):
        for proxy in node.proxies:
            proxy.cut()
        time.sleep(5.0)
        for proxy in node.proxies:
            proxy.heal()


SCHEDULE: list[Fault] = [
    kill_leader,
    pause_leader,
    partition_leader,
    etcd_member_loss,
    etcd_quorum_loss,
    backend_outage,
    clock_skew,
    corrupt_write,
    rolling_restart,
    overlapping,
]


def run(cluster: Cluster, duration: float, settle: float = 4.0) -> int:
    """Run the whole schedule, again and again while `duration` lasts (0: once); each fault is
    followed by recovery (every agent healthy) and `settle` seconds. Returns faults injected."""
    started = time.monotonic()
    injected = 0
    cluster.wait_healthy()
    time.sleep(settle)
    while True:
        for inject in SCHEDULE:
            inject(cluster)
            injected += 1
            cluster.wait_healthy()
            time.sleep(settle)
        if time.monotonic() - started > duration:
            return injected
