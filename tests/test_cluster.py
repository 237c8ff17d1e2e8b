"""Three `keyquorum run` processes on a 3-member etcd cluster: one key set, rotated under load.

Each agent has its own state directory and socket; they share the etcd cluster and the same KEK
(with the local backend every node needs a copy of the cluster's KEK).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from cluster_tools import (
    Node,
    Signature,
    audit_in_etcd,
    kids_of,
    leader_of,
    make_nodes,
    sign_everywhere,
    start_nodes,
    wait_until,
)

from agent.client import AgentError, Client
from agent.demo import LoadReport, agent_process
from consensus.local_etcd import LocalEtcd

pytestmark = [pytest.mark.slow, pytest.mark.etcd]


@pytest.fixture
def cluster(etcd3: LocalEtcd, short_tmp: Path) -> Iterator[tuple[LocalEtcd, list[Node]]]:
    nodes = make_nodes(short_tmp, etcd3)
    with ExitStack() as stack:
        for node in nodes:
            node.process = stack.enter_context(agent_process(node.config, node.socket))
        yield etcd3, nodes


def test_three_agents_share_one_key_set_and_rotate_under_load_with_no_failed_sign(
    cluster: tuple[LocalEtcd, list[Node]],
) -> None:
    etcd, nodes = cluster
    wait_until(lambda: leader_of(nodes), 10, "a leader")
    # Keys rotate every ~7 s: four keys take ~21 s; up to 60 s on a loaded machine.
    report = sign_everywhere(nodes, 60.0, until=lambda sigs: len(kids_of(sigs)) >= 4)
    assert report.failures == []
    kids = report.kids()
    assert len(kids) >= 4, f"expected >= 3 rotations, saw {kids}"
    # A verifier holding the JWKS of any node (fetched within max-age) verifies every signature
    # made on any node.
    assert report.unverifiable(max_age=1.0, validity=1.0) == []
    statuses = [n.status() for n in nodes]
    assert len({s["generation"] for s in statuses}) <= 2  # converged (one write may be in flight)
    # Every node's status names the same leader and term and shows every member and its keys.
    assert len({(st["leader"], st["term"]) for st in statuses}) == 1
    assert statuses[0]["term"] is not None
    for st in statuses:
        members = {m["node_id"]: m for m in st["members"]}
        assert sorted(members) == ["n1", "n2", "n3"]
        assert all(m["signing"] and m["loaded"] for m in members.values())
    # The cluster's audit trail is in etcd: every node's start, and the leader's key writes.
    audit = audit_in_etcd(etcd)
    assert {e["node"] for e in audit if e["event"] == "agent_started"} == {"n1", "n2", "n3"}
    created = {e["kid"] for e in audit if e["event"] == "key_created"}
    assert set(kids) <= created
    print(
        f"\ncluster: {len(report.signatures)} signatures, {len(kids)} keys, "
        f"{len(report.snapshots)} JWKS fetches, 0 failed"
    )


def test_killing_the_leader_elects_another_and_rotation_goes_on(
    cluster: tuple[LocalEtcd, list[Node]],
) -> None:
    _, nodes = cluster
    leader = wait_until(lambda: leader_of(nodes), 10, "a leader")
    first_term = leader.status()["term"]
    survivors = [n for n in nodes if n is not leader]
    result: dict[str, LoadReport] = {}
    recovered = threading.Event()
    killed_at = time.monotonic() + 2.0

    def rotated_after_failover(signatures: list[Signature]) -> bool:
        # Two keys signing after the new leader took over: a rotation it drove.
        return recovered.is_set() and len(kids_of(signatures, after=killed_at + 4.0)) >= 2

    load = threading.Thread(
        target=lambda: result.setdefault(
            "r", sign_everywhere(survivors, 45.0, until=rotated_after_failover)
        )
    )
    load.start()
    time.sleep(max(0.0, killed_at - time.monotonic()))
    killed_at = time.monotonic()
    leader.process.kill()
    leader.process.wait()
    new = wait_until(lambda: leader_of(survivors), 10, "a new leader")
    failover = time.monotonic() - killed_at
    recovered.set()
    load.join()
    report = result["r"]
    assert report.failures == []
    assert report.unverifiable(max_age=1.0, validity=1.0) == []
    status = new.status()
    assert status["term"] != first_term
    # Lease TTL 2 s (etcd may hold it up to ~1 s longer) + the 2/3 s campaign poll.
    assert failover < 2.0 + 2.0, f"failover took {failover:.2f}s"
    after = kids_of(report.signatures, after=killed_at + failover)
    assert len(after) >= 2, f"rotation continued under the new leader: {after}"
    print(f"\nleader failover: {failover:.2f}s; {len(report.signatures)} signatures")


def test_paused_leaders_pending_write_is_refused_by_the_fence_and_it_steps_down(
    etcd3: LocalEtcd, short_tmp: Path
) -> None:
    """n1 leads and holds a write for 3 s (fault injection); it is SIGSTOPped inside that window
    past its lease, n2 or n3 takes over and writes; on SIGCONT n1's write goes out with the old
    term and etcd refuses it. The refused write is visible as n1's answer to the operator."""
    nodes = make_nodes(short_tmp, etcd3)
    n1 = nodes[0]
    with ExitStack() as stack:
        start_nodes(stack, nodes[:1], {"n1": {"KEYQUORUM_FAULT_COMMIT_DELAY": "3"}})
        start_nodes(stack, nodes[1:])
        wait_until(lambda: n1.status()["role"] == "leader", 10, "n1 to lead")
        old_term = n1.status()["term"]
        generation = n1.status()["generation"]
        answer: dict[str, Any] = {}

        def operator_rotates_on_n1() -> None:
            try:
                with Client(n1.socket, timeout=30) as client:
                    answer["ok"] = client.rotate()
            except AgentError as exc:
                answer["error"] = exc

        operator = threading.Thread(target=operator_rotates_on_n1)
        operator.start()
        log = n1.directory / "agent.log"
        holding = f"holding generation {generation + 1} "
        wait_until(lambda: holding in log.read_text(), 5, "n1 to hold its write")
        n1.process.send_signal(signal.SIGSTOP)
        try:
            new = wait_until(lambda: leader_of(nodes[1:]), 10, "a new leader while n1 is paused")
            new_term = new.status()["term"]
            assert new_term != old_term
            with Client(new.socket) as client:
                created = client.rotate()["created"]  # the new leader writes
        finally:
            n1.process.send_signal(signal.SIGCONT)
        operator.join(30)
        error = answer.get("error")
        assert error is not None, f"n1's held write was accepted: {answer}"
        assert error.status == 503 and "refused by the fence" in error.message
        assert f"term {old_term} is over" in error.message
        wait_until(lambda: n1.status()["role"] == "follower", 5, "n1 to step down")
        with Client(n1.socket) as client:
            assert "keyquorum_fenced_writes_total 1" in client.metrics()
            # n1 follows the new leader's key set and keeps signing.
            wait_until(
                lambda: created in {k["kid"] for k in client.jwks()["keys"]}, 5, "n1 to follow"
            )
            assert client.sign(b"after the pause").signature


def test_losing_etcd_quorum_stops_rotation_but_not_signing(
    cluster: tuple[LocalEtcd, list[Node]],
) -> None:
    etcd, nodes = cluster
    wait_until(lambda: leader_of(nodes), 10, "a leader")
    result: dict[str, LoadReport] = {}
    load = threading.Thread(target=lambda: result.setdefault("r", sign_everywhere(nodes, 16.0)))
    load.start()
    time.sleep(1.0)
    generation_before = nodes[0].status()["generation"]
    down = etcd.members[1:]
    for member in down:
        etcd.kill(member)
    # While etcd has no quorum every agent keeps signing and says it is degraded, and why.
    wait_until(
        lambda: all(
            n.status()["health"]["status"] == "degraded"
            and any("etcd" in r for r in n.status()["health"]["reasons"])
            for n in nodes
        ),
        6,
        "every agent to report degraded",
    )
    time.sleep(5.0)  # 8 s in all: longer than a rotation step (keys rotate every ~7 s)
    for member in down:
        etcd.start_member(member)
    etcd.wait_healthy(20)
    load.join()
    report = result["r"]
    assert report.failures == [], report.failures[:5]
    assert report.unverifiable(max_age=1.0, validity=1.0) == []
    # Rotation resumes once quorum is back.
    wait_until(
        lambda: all(n.status()["generation"] > generation_before + 1 for n in nodes),
        20,
        "rotation to resume after quorum returns",
    )


def test_a_corrupt_key_set_written_into_etcd_is_reported_and_ignored(
    cluster: tuple[LocalEtcd, list[Node]],
) -> None:
    import trio

    from consensus.etcd_client import EtcdClient

    etcd, nodes = cluster
    wait_until(lambda: leader_of(nodes), 10, "a leader")
    with Client(nodes[0].socket) as first:
        kid = first.sign(b"x").kid

    async def tamper(value: bytes | None) -> bytes:
        client = EtcdClient(etcd.endpoints)
        try:
            kv = await client.get(b"/keyquorum/test/keyset")
            assert kv is not None
            if value is not None:
                await client.put(b"/keyquorum/test/keyset", value)
            return kv.value
        finally:
            await client.aclose()

    good = trio.run(tamper, b'{"schema": 1, "keys": "not a list"')

    def all_degraded() -> bool:
        return all(
            n.status()["health"]["status"] == "degraded"
            and any("invalid" in r for r in n.status()["health"]["reasons"])
            for n in nodes
        )

    wait_until(all_degraded, 10, "every agent to report the corrupt document")
    for node in nodes:
        with Client(node.socket) as client:
            assert client.sign(b"still signing").kid == kid
    # The operator writes the last good document back: everyone recovers.
    trio.run(
        tamper,
        json.dumps({**json.loads(good), "generation": json.loads(good)["generation"] + 1}).encode(),
    )
    wait_until(lambda: all(n.status()["health"]["status"] == "ok" for n in nodes), 10, "recovery")


def test_the_readme_demo_runs_a_cluster_and_survives_killing_its_leader(short_tmp: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--duration", "8", "--kill-leader",
         "--dir", str(short_tmp / "demo")],
        capture_output=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    text = out.stdout.decode()
    assert out.returncode == 0, text + out.stderr.decode()
    assert ">>> kill -9 of the leader" in text
    assert " 0 failed requests" in text and " 0 unverifiable" in text


def test_ctrl_c_stops_the_demo_and_every_process_it_started(short_tmp: Path) -> None:
    import subprocess
    import sys

    demo_dir = short_tmp / "demo"
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "demo", "--duration", "60", "--dir", str(demo_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # the live view is up once the first tick prints
            if "t=" in line:
                assert "leader=" in line and "(term " in line
                break
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()
    leftovers = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(demo_dir) in cmdline:
                leftovers.append(cmdline.replace("\0", " "))
    assert leftovers == []
