"""`[socket] workers = N`: worker processes share the agent's socket and sign what it would."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from cluster_tools import wait_until
from helpers import QUIET_KEYS, write_config

from agent.client import Client
from agent.config import ConfigError, load_config
from agent.crypto import verify_signature
from agent.demo import agent_process


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(entry))
    return found


def signatures_total(client: Client) -> float:
    total = 0.0
    for line in client.metrics().splitlines():
        if line.startswith("keyquorum_signatures_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_workers_sign_verifiable_signatures_and_forward_everything_else(short_tmp: Path) -> None:
    config = write_config(short_tmp, keys=QUIET_KEYS, sections={"socket": {"workers": 3}})
    socket_path = short_tmp / "agent.sock"
    with agent_process(config, socket_path) as process:
        wait_until(lambda: len(children_of(process.pid)) == 2, 20, "two worker processes")
        failures: list[str] = []
        results: list[tuple[bytes, str, bytes]] = []

        def load(n: int) -> None:
            # Fresh connections each time: the kernel hands them to any serving process.
            for i in range(40):
                payload = f"{n}/{i}".encode()
                try:
                    with Client(socket_path, protocol="http" if i % 2 else "framed") as client:
                        result = client.sign(payload)
                except Exception as exc:
                    failures.append(repr(exc))
                    continue
                results.append((payload, result.kid, result.signature))

        threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        with Client(socket_path) as client:
            jwks = {k["kid"]: k for k in client.jwks()["keys"]}
            assert all(verify_signature(jwks[kid], p, s) for p, kid, s in results)
            # Forwarded to the agent process from whichever process took the connection:
            for _ in range(6):
                with Client(socket_path) as fresh:
                    assert fresh.status()["node_id"] == "n1"
            # The workers' counts reach the agent's /metrics (reported every second).
            wait_until(
                lambda: signatures_total(client) >= len(results), 20, "every signature counted"
            )
            # An operator's rotation reaches every process: all of them sign with the new key
            # once it is active (here: rollback to the key created before, after a rotate).
            created = client.rotate()["created"]
            assert created in {k["kid"] for k in client.jwks()["keys"]}


def test_workers_stop_when_the_agent_process_dies(short_tmp: Path) -> None:
    config = write_config(short_tmp, keys=QUIET_KEYS, sections={"socket": {"workers": 2}})
    with agent_process(config, short_tmp / "agent.sock") as process:
        wait_until(lambda: len(children_of(process.pid)) == 1, 20, "one worker process")
        (worker,) = children_of(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

        def gone() -> bool:
            try:
                with open(f"/proc/{worker}/stat") as fh:
                    return fh.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not reaped
            except OSError:
                return True

        wait_until(gone, 20, "the workers to exit")


def test_workers_need_keys_in_memory(short_tmp: Path) -> None:
    config = write_config(
        short_tmp,
        sections={"socket": {"workers": 2}},
        backend={"kind": "vault-transit", "mode": "remote", "address": "http://127.0.0.1:1",
                 "key_name_prefix": "kq", "token": "x"},
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"socket\.workers"):
        load_config(config, env={})
