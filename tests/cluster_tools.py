"""Driving a cluster of real `keyquorum run` processes from tests: nodes, load, waiting."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import write_cluster_config

from agent.client import AgentError, Client
from agent.demo import LoadReport, agent_process, run_load
from consensus.local_etcd import LocalEtcd

Signature = tuple[float, float, str, bytes, bytes]


@dataclass
class Node:
    name: str
    directory: Path
    config: Path
    process: Any = None

    @property
    def socket(self) -> Path:
        return self.directory / "agent.sock"

    def status(self) -> dict[str, Any]:
        with Client(self.socket, timeout=3) as client:
            return client.status()


def make_nodes(
    root: Path,
    etcd: LocalEtcd,
    count: int = 3,
    *,
    backend: dict[str, object] | None = None,
    prefix: str = "/keyquorum/test",
) -> list[Node]:
    """Nodes sharing the etcd cluster; with the local backend each gets a copy of one KEK."""
    kek = os.urandom(32)
    nodes = []
    for i in range(1, count + 1):
        directory = root / f"n{i}"
        (directory / "state").mkdir(parents=True)
        kek_path = directory / "state" / "kek"
        kek_path.write_bytes(kek)
        kek_path.chmod(0o600)
        config = write_cluster_config(
            directory, f"n{i}", etcd.endpoints, backend=backend, prefix=prefix
        )
        nodes.append(Node(f"n{i}", directory, config))
    return nodes


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (AgentError, OSError) as exc:
            last_error = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error})")


def leader_of(nodes: list[Node]) -> Node | None:
    leaders = [n for n in nodes if n.process.poll() is None and n.status()["role"] == "leader"]
    return leaders[0] if len(leaders) == 1 else None


def kids_of(signatures: list[Signature], after: float = 0.0) -> set[str]:
    return {kid for send, _, kid, _, _ in signatures if send > after}


def sign_everywhere(
    nodes: list[Node],
    seconds: float,
    clients: int = 2,
    *,
    until: Callable[[list[Signature]], bool] | None = None,
) -> LoadReport:
    """Load on every node at once; one merged report (snapshots from all nodes).

    With `until`, the load stops early once the signatures so far satisfy it (say, enough
    distinct keys have signed), so a slow machine gets more time rather than a flaky count."""
    reports = {n.name: LoadReport() for n in nodes}
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=run_load,
            args=(n.socket, seconds, clients, reports[n.name]),
            kwargs={"stop_early": stop},
        )
        for n in nodes
    ]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(0.1)
        if until is None:
            continue
        signatures: list[Signature] = []
        for report in reports.values():
            with report.lock:
                signatures.extend(report.signatures)
        if until(signatures):
            stop.set()
    for t in threads:
        t.join()
    merged = LoadReport()
    for report in reports.values():
        merged.signatures.extend(report.signatures)
        merged.snapshots.extend(report.snapshots)
        merged.failures.extend(report.failures)
    return merged


def start_nodes(
    stack: ExitStack, nodes: list[Node], env: dict[str, dict[str, str]] | None = None
) -> None:
    for node in nodes:
        node.process = stack.enter_context(
            agent_process(node.config, node.socket, env=(env or {}).get(node.name))
        )


def audit_in_etcd(etcd: LocalEtcd, prefix: str = "/keyquorum/test") -> list[dict[str, Any]]:
    """The audit events the cluster copied to etcd, oldest first."""
    import json

    import trio

    from consensus.etcd_client import EtcdClient

    async def read() -> list[dict[str, Any]]:
        client = EtcdClient(etcd.endpoints)
        try:
            kvs, _ = await client.range(f"{prefix}/audit/".encode(), prefix=True)
        finally:
            await client.aclose()
        return [json.loads(kv.value) for kv in kvs]

    return trio.run(read)
