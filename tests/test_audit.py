"""The audit log: operator commands (with who asked and the outcome), key lifecycle transitions,
start-up and configuration changes, locally as JSON lines and in etcd with a bounded history."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import QUIET_KEYS
from test_agent import config_for, running

import agent.audit
from agent.audit import AuditLog
from agent.client import AgentError, AsyncClient
from consensus.etcd_client import EtcdClient
from consensus.local_etcd import LocalEtcd
from consensus.memory import MemoryStore


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_operator_commands_and_key_transitions_are_audited_with_who_and_outcome(
    short_tmp: Path,
) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config) as agent, AsyncClient(config.socket.path) as client:
        first = (await client.sign(b"x")).kid
        created = (await client.rotate())["created"]
        with pytest.raises(AgentError):
            await client.rotate()  # refused: a key is already pending
        await client.revoke(created)
        assert agent.audit.recorded >= 6
    log = short_tmp / "state" / "audit.jsonl"
    assert (log.stat().st_mode & 0o777) == 0o600
    entries = events(log)
    names = [e["event"] for e in entries]
    assert names[0] == "agent_started"
    bootstrap = next(e for e in entries if e["event"] == "key_created" and e["kid"] == first)
    assert bootstrap["actor"] == {"leader": "n1"} and "bootstrap" in bootstrap["reason"]
    rotations = [e for e in entries if e["event"] == "admin_rotate"]
    assert [r["outcome"] for r in rotations] == ["done", "refused"]
    me = {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid()}
    assert all(r["actor"] == me for r in rotations)
    assert rotations[0]["kid"] == created and "pending" in rotations[1]["reason"]
    assert any(e["event"] == "key_created" and e["kid"] == created for e in entries)
    assert any(e["event"] == "key_revoked" and e["kid"] == created for e in entries)
    revoke = next(e for e in entries if e["event"] == "admin_revoke")
    assert revoke["outcome"] == "done" and revoke["kid"] == created
    for entry in entries:
        assert entry["node"] == "n1" and entry["ts"].endswith("+00:00")
    assert "PRIVATE" not in log.read_text() and "pkcs8" not in log.read_text()


async def test_a_caller_without_admin_permission_is_refused_and_audited(short_tmp: Path) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS, sections={"access.admin": {"uids": [4242]}})
    async with running(config), AsyncClient(config.socket.path) as client:
        with pytest.raises(AgentError) as refused:
            await client.rollback()
        assert refused.value.status == 403
    (denied,) = [
        e for e in events(short_tmp / "state" / "audit.jsonl") if "forbidden" in e["event"]
    ]
    assert denied["path"] == "/v1/admin/rollback" and denied["actor"]["uid"] == os.getuid()


async def test_a_changed_configuration_is_audited_at_start_up(short_tmp: Path) -> None:
    store = MemoryStore()
    async with running(config_for(short_tmp, keys=QUIET_KEYS), store):
        pass
    async with running(config_for(short_tmp, keys=QUIET_KEYS), store):
        pass  # same configuration: no change event
    changed = config_for(short_tmp, keys={**QUIET_KEYS, "max_token_ttl": "4s"})
    async with running(changed, store):
        pass
    names = [e["event"] for e in events(short_tmp / "state" / "audit.jsonl")]
    assert names.count("agent_started") == 3
    assert names.count("config_changed") == 1
    assert names.index("config_changed") > names.index("agent_started", 2)


async def test_events_are_copied_to_etcd_with_a_bounded_history(
    etcd1: LocalEtcd, unique_prefix: str, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent.audit, "ETCD_HISTORY", 3)
    client = EtcdClient(etcd1.endpoints)
    try:
        log = AuditLog("n7", short_tmp / "audit.jsonl", etcd=client, prefix=unique_prefix)
        for i in range(5):
            log.record("key_created", {"leader": "n7"}, kid=f"k{i}")
        assert await log.flush()
        kvs, _ = await client.range(f"{unique_prefix}/audit/".encode(), prefix=True)
        kept = [json.loads(kv.value)["kid"] for kv in kvs]
        assert kept == ["k2", "k3", "k4"]  # the newest, in order
        assert len(events(short_tmp / "audit.jsonl")) == 5  # the local file keeps everything
        # etcd unreachable: the event is written locally, queued, and copied later.
        unreachable = EtcdClient(["http://127.0.0.1:9"], timeout=0.2)
        log.etcd = unreachable
        log.record("key_dropped", {"leader": "n7"}, kid="k0")
        assert not await log.flush(timeout=1)
        assert len(log.pending) == 1
        await unreachable.aclose()
        log.etcd = client
        assert await log.flush()
        kvs, _ = await client.range(f"{unique_prefix}/audit/".encode(), prefix=True)
        assert json.loads(kvs[-1].value)["event"] == "key_dropped"
    finally:
        await client.aclose()
    await trio.lowlevel.checkpoint()
