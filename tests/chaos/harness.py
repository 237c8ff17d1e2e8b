"""The chaos harness: a real cluster under load, a nemesis, and a JSONL event log.

Three etcd members and an OpenBao server (the key backend: Vault transit) on loopback, and
`keyquorum run` agents with second-scale timings, each reaching each etcd member through its own
TCP proxy (tests/chaos/proxy.py) so one agent can be cut off. Every agent is under signing load
from a client thread and has a verifier thread that refetches its JWKS at the advertised
max-age; a poller records every agent's role and term. Everything goes to one event log, one
JSON object per line, which tests/chaos/checker.py judges afterwards (Jepsen-style: the run and
the verdict are separate).

The nemesis injects faults one at a time, then overlapping: kill -9 of the leader; SIGSTOP of the
leader past its lease; a partition of the leader from etcd; loss of an etcd member; loss of etcd
quorum for longer than a rotation step; a backend outage across a rotation; clock skew on one
agent; a rolling restart; a corrupt key-set write. Each fault logs when it starts and ends, and
which agent's downtime it causes (only a killed, stopped or restarting agent may fail requests).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from helpers import write_cluster_config
from proxy import TcpProxy
from servers import OpenBaoServer

from agent.client import AgentError, AgentUnreachable, Client
from consensus.etcd_client import EtcdClient
from consensus.local_etcd import LocalEtcd

PREFIX = "/keyquorum/chaos"
# A breath between signatures (~300/s per agent instead of thousands): continuous load that the
# checker can verify signature by signature in seconds.
SIGN_PAUSE = 0.003


class EventLog:
    """Thread-safe JSONL writer; `t` is time.monotonic() on this machine for every event."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a")
        self._lock = threading.Lock()

    def write(self, event_type: str, /, **fields: Any) -> None:
        line = json.dumps({"type": event_type, "t": time.monotonic(), **fields}, sort_keys=True)
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


@dataclass
class AgentNode:
    name: str
    directory: Path
    config: Path
    proxies: list[TcpProxy]
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.directory / "agent.sock"

    def start(self, timeout: float = 20.0) -> None:
        log = (self.directory / "agent.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"{self.name} exited: {self.log_tail()}"
            try:
                with Client(self.socket, timeout=2) as client:
                    if client.healthz()[0]:
                        return
            except AgentError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not become ready: {self.log_tail()}")

    def log_tail(self) -> str:
        return (self.directory / "agent.log").read_text(errors="replace")[-3000:]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def status(self) -> dict[str, Any]:
        with Client(self.socket, timeout=2) as client:
            return client.status()


class Cluster:
    def __init__(self, workdir: Path, log: EventLog, agents: int = 3) -> None:
        self.workdir = workdir
        self.log = log
        self.etcd = LocalEtcd(workdir / "etcd", size=3)
        self.bao = OpenBaoServer(workdir / "bao")
        self.count = agents
        self.nodes: list[AgentNode] = []
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.etcd.start()
        self.bao.start()
        self.bao.transit_key("keyquorum")
        backend = {
            "kind": "vault-transit",
            "address": self.bao.url,
            "key_name": "keyquorum",
            "token": self.bao.token,
            "timeout": 2.0,
            "attempt_timeout": 0.5,
        }
        for i in range(1, self.count + 1):
            name = f"n{i}"
            directory = self.workdir / name
            (directory / "state").mkdir(parents=True)
            proxies = [TcpProxy(("127.0.0.1", _port(m.client_url))) for m in self.etcd.members]
            config = write_cluster_config(
                directory, name, [p.url for p in proxies], prefix=PREFIX, backend=backend
            )
            self.nodes.append(AgentNode(name, directory, config, proxies))
        for node in self.nodes:
            node.start()
        self.log.write("cluster", agents=[n.name for n in self.nodes], prefix=PREFIX)
        for node in self.nodes:
            for target in (self._signer, self._verifier):
                self.threads.append(threading.Thread(target=target, args=(node,), daemon=True))
        self.threads.append(threading.Thread(target=self._poller, daemon=True))
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=10)
        for node in self.nodes:
            node.stop()
            for proxy in node.proxies:
                proxy.close()
        self.bao.stop()
        self.etcd.stop()

    # ---- load, verifiers, observation -------------------------------------------------------

    def _signer(self, node: AgentNode) -> None:
        i = 0
        client: Client | None = None
        while not self.stopping.is_set():
            payload = f"{node.name}-{i}".encode()
            i += 1
            t0 = time.monotonic()
            try:
                if client is None:
                    client = Client(node.socket, timeout=5)
                result = client.sign(payload)
            except AgentError as exc:
                self.log.write(
                    "sign", node=node.name, t0=t0, ok=False, error=f"{exc.code}: {exc.message}"
                )
                if client is not None:
                    client.close()
                client = None
                if isinstance(exc, AgentUnreachable):
                    time.sleep(0.05)
                continue
            time.sleep(SIGN_PAUSE)
            self.log.write(
                "sign",
                node=node.name,
                t0=t0,
                ok=True,
                kid=result.kid,
                payload=_b64(payload),
                signature=_b64(result.signature),
            )
        if client is not None:
            client.close()

    def _verifier(self, node: AgentNode) -> None:
        while not self.stopping.is_set():
            t0 = time.monotonic()
            try:
                with Client(node.socket, timeout=5) as client:
                    jwks, max_age = client.jwks_with_max_age()
            except AgentError:
                time.sleep(0.2)
                continue
            self.log.write("jwks", node=node.name, t0=t0, keys=jwks["keys"], max_age=max_age)
            self.stopping.wait(min(max_age or 1, 0.5))

    def _poller(self) -> None:
        while not self.stopping.is_set():
            for node in self.nodes:
                try:
                    status = node.status()
                except AgentError:
                    continue
                self.log.write(
                    "status",
                    node=node.name,
                    role=status["role"],
                    term=status["term"],
                    leader=status["leader"],
                    generation=status["generation"],
                    health=status["health"]["status"],
                )
            self.stopping.wait(0.25)

    # ---- helpers for the nemesis ------------------------------------------------------------

    def leader(self, timeout: float = 15.0) -> AgentNode:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leaders = []
            for node in self.nodes:
                try:
                    alive = node.process is not None and node.process.poll() is None
                    if alive and node.status()["role"] == "leader":
                        leaders.append(node)
                except AgentError:
                    pass
            if len(leaders) == 1:
                return leaders[0]
            time.sleep(0.1)
        raise AssertionError("no single leader")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every agent is up and says ok (a fault healed completely)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(n.status()["health"]["status"] == "ok" for n in self.nodes):
                    return
            except AgentError:
                pass
            time.sleep(0.2)
        raise AssertionError("the cluster did not recover: " + json.dumps(self._statuses()))

    def _statuses(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for node in self.nodes:
            try:
                out[node.name] = node.status()["health"]
            except AgentError as exc:
                out[node.name] = str(exc)
        return out

    def etcd_call(self, fn: Callable[[EtcdClient], Any]) -> Any:
        async def run() -> Any:
            client = EtcdClient(self.etcd.endpoints, timeout=5)
            try:
                return await fn(client)
            finally:
                await client.aclose()

        return trio.run(run)

    def etcd_dump(self) -> list[dict[str, str]]:
        async def dump(client: EtcdClient) -> list[dict[str, str]]:
            kvs, _ = await client.range(PREFIX.encode(), prefix=True)
            return [
                {"key": kv.key.decode(), "value": kv.value.decode(errors="replace")} for kv in kvs
            ]

        return list(self.etcd_call(dump))


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
