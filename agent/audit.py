"""The audit log: who did what to the keys, and when, as JSON lines.

Recorded: every administrative request (rotate, rollback, revoke, import; refused ones too, with
the reason), every key lifecycle transition the leader writes (created, activation scheduled,
retired, revoked, dropped), agent start-up and configuration changes. Each event carries the
wall-clock time, the node, and who asked: the caller's uid/gid/pid from SO_PEERCRED for socket
requests, or "policy" for the leader's own decisions.

Events go to `<state_dir>/audit.jsonl` (0600, appended and fsynced: events are rare and must
survive a crash) and, in a cluster, to etcd under `<prefix>/audit/` so one query shows the whole
cluster's history; the etcd copy is bounded (the oldest entries beyond `ETCD_HISTORY` are
deleted). An etcd failure never blocks or fails the action being audited: the local line is
written first, and the etcd copy is retried by the next event. Nothing secret is ever recorded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from agent.keyset import KeySet

log = logging.getLogger("keyquorum.audit")
ETCD_HISTORY = (
    1000  # events kept in etcd (the local file keeps everything; rotate it with logrotate)
)
ETCD_PENDING = 100  # events waiting for etcd at most (oldest dropped first, still in the file)


class AuditLog:
    def __init__(
        self,
        node_id: str,
        path: Path,
        *,
        etcd: Any = None,
        prefix: str = "",
        clock: Any = None,
    ) -> None:
        self.node_id = node_id
        self.path = path
        self.etcd = etcd  # consensus.etcd_client.EtcdClient, or None (single node)
        self.prefix = prefix.rstrip("/") + "/audit/"
        self.clock = clock or (lambda: time.time_ns() // 1_000_000)
        self.pending: deque[tuple[bytes, bytes]] = deque(maxlen=ETCD_PENDING)
        self.sequence = 0
        self.recorded = 0

    def record(self, event: str, actor: Mapping[str, Any], **details: Any) -> dict[str, Any]:
        """Append one event to the local file now (and queue it for etcd); returns it."""
        now = self.clock()
        entry = {
            "ts": datetime.fromtimestamp(now / 1000, UTC).isoformat(timespec="milliseconds"),
            "ts_ms": now,
            "node": self.node_id,
            "event": event,
            "actor": dict(actor),
            **details,
        }
        line = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
        try:
            self._append(line.encode())
        except OSError as exc:
            log.error(  # noqa: TRY400 - the reason is in the message; no traceback wanted
                "cannot write the audit log %s: %s; event: %s", self.path, exc, line.strip()
            )
        if self.etcd is not None:
            self.sequence += 1
            key = f"{self.prefix}{now:015d}-{self.node_id}-{self.sequence:06d}".encode()
            self.pending.append((key, line.encode()))
        self.recorded += 1
        log.info("audit: %s", line.strip())
        return entry

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def flush(self, timeout: float = 5.0) -> bool:
        """Copy queued events to etcd and prune its history; False if etcd was unreachable
        (the events stay queued for the next flush)."""
        if self.etcd is None or not self.pending:
            return True
        try:
            with trio.fail_after(timeout):
                while self.pending:
                    key, value = self.pending[0]
                    await self.etcd.put(key, value)
                    self.pending.popleft()
                await self._prune()
        except Exception as exc:  # noqa: BLE001 - never let auditing break the audited action
            log.warning(
                "audit events not yet copied to etcd (%d queued): %s", len(self.pending), exc
            )
            return False
        return True

    async def _prune(self) -> None:
        kvs, _ = await self.etcd.range(self.prefix.encode(), prefix=True)
        for kv in kvs[: max(0, len(kvs) - ETCD_HISTORY)]:
            await self.etcd.delete(kv.key)


def lifecycle_events(before: KeySet | None, after: KeySet) -> list[tuple[str, dict[str, Any]]]:
    """The key transitions a key-set write makes, as (event, details) pairs."""
    old = {r.kid: r for r in (before.keys if before else ())}
    new = {r.kid: r for r in after.keys}
    events: list[tuple[str, dict[str, Any]]] = []
    for kid, record in new.items():
        previous = old.get(kid)
        if previous is None:
            events.append(
                (
                    "key_created",
                    {
                        "kid": kid,
                        "alg": record.alg,
                        "origin": record.origin,
                        "activate_at": record.activate_at,
                        "expires_at": record.expires_at,
                    },
                )
            )
            continue
        if previous.activate_at != record.activate_at and record.activate_at is not None:
            events.append(("key_activation_scheduled", {"kid": kid, "at": record.activate_at}))
        if previous.withdrawn != record.withdrawn and record.withdrawn is not None:
            events.append((f"key_{record.withdrawn}", {"kid": kid}))
    for kid in old.keys() - new.keys():
        events.append(("key_dropped", {"kid": kid, "expired_at": old[kid].expires_at}))
    return events
