"""Leader election on an etcd lease, and the membership records that ride on the same lease.

Each agent holds one lease (TTL `lease_ttl`, refreshed every TTL/3). The leader key
`<prefix>/leader` is created with a txn on `create_revision == 0`, bound to the lease; its
create_revision is the leader's *term*, the fencing token every key-set write carries.

Safety does not rest on timing: etcd resets leases to their full TTL when its own leader changes,
and checks expiry late, so a lease TTL is a minimum, not a deadline. A deposed leader that still
believes it leads is stopped by the fence in the store's txn (consensus/etcd.py). Timing only
makes it step down early: `is_leader` turns false the moment the last successful keepalive,
counted from when it was *sent*, is older than the TTL it granted.

Members: `<prefix>/members/<node_id>` holds a JSON report (kids loaded, kid in use, health, ...)
bound to the same lease, so a dead agent's record disappears with its lease.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from consensus.etcd_client import Compare, EtcdClient, delete_op, put_op, range_op
from consensus.store import StoreError

log = logging.getLogger("keyquorum.election")


@dataclass(frozen=True, slots=True)
class Leadership:
    """Who leads now, as this agent last saw it."""

    leader: str | None
    term: int | None
    mine: bool


class Election:
    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        node_id: str,
        *,
        lease_ttl: float,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        self.node_id = node_id
        self.ttl = max(2, round(lease_ttl))  # etcd grants at least 2 s
        self.leader_key = f"{self.prefix}/leader".encode()
        self.members_prefix = f"{self.prefix}/members/".encode()
        self.lease: int | None = None
        self.term: int | None = None  # our term while we lead
        self.leader: str | None = None  # who leads, as last seen
        self.leader_term: int | None = None  # their term, as last seen
        self.problem: str | None = None
        self.elections_won = 0
        self._lease_valid_until = 0.0  # trio clock
        self._on_change = on_change or (lambda: None)
        self._report: bytes | None = None
        self._report_dirty = trio.Event()
        self._leader_gone = trio.Event()

    # ---- what the agent asks ---------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.term is not None and trio.current_time() < self._lease_valid_until

    def leadership(self) -> Leadership:
        mine = self.is_leader
        if mine:
            return Leadership(self.node_id, self.term, True)
        return Leadership(self.leader, self.leader_term if self.leader else None, False)

    def step_down(self, why: str) -> None:
        """Stop all leader work at once (e.g. a write was refused by the fence)."""
        if self.term is not None:
            log.warning("%s steps down from term %s: %s", self.node_id, self.term, why)
        self.term = None
        if self.leader == self.node_id:
            self.leader = None  # unknown until the campaign loop reads the leader key again
        self._on_change()

    def publish(self, report: Mapping[str, Any]) -> None:
        """Set this member's report; written to etcd by the running election task."""
        data = json.dumps(dict(report), sort_keys=True, separators=(",", ":")).encode()
        if data != self._report:
            self._report = data
            self._report_dirty.set()

    async def members(self) -> dict[str, dict[str, Any]]:
        kvs, _ = await self.client.range(self.members_prefix, prefix=True)
        out: dict[str, dict[str, Any]] = {}
        for kv in kvs:
            node = kv.key[len(self.members_prefix) :].decode(errors="replace")
            try:
                report = json.loads(kv.value)
            except ValueError:
                continue
            if isinstance(report, dict):
                out[node] = report
        return out

    # ---- the task -----------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            try:
                await self._grant()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keepalive_loop, nursery.cancel_scope)
                    nursery.start_soon(self._member_loop)
                    nursery.start_soon(self._leader_watch_loop)
                    if not started:
                        started = True
                        task_status.started()
                    await self._campaign_loop()
            except* StoreError as group:
                self._lost(f"etcd trouble: {group.exceptions[0]}")
            if not started:
                started = True
                task_status.started()
            await trio.sleep(min(1.0, self.ttl / 3))

    async def _grant(self) -> None:
        sent = trio.current_time()
        lease, ttl = await self.client.lease_grant(self.ttl)
        self.lease = lease
        self._lease_valid_until = sent + ttl
        self.problem = None
        self._report_dirty.set()

    async def _keepalive_loop(self, scope: trio.CancelScope) -> None:
        assert self.lease is not None
        while True:
            await trio.sleep(self.ttl / 3)
            sent = trio.current_time()
            try:
                with trio.fail_after(self.ttl / 3):
                    granted = await self.client.lease_keepalive(self.lease)
            except (StoreError, trio.TooSlowError) as exc:
                self.problem = f"cannot refresh the etcd lease: {exc}"
                if trio.current_time() >= self._lease_valid_until:
                    self._lost("lease could not be refreshed before it ran out")
                    scope.cancel()
                    return
                continue
            if granted <= 0:
                self._lost("the etcd lease expired")
                scope.cancel()
                return
            self.problem = None
            self._lease_valid_until = sent + granted

    async def _member_loop(self) -> None:
        key = self.members_prefix + self.node_id.encode()
        while True:
            await self._report_dirty.wait()
            self._report_dirty = trio.Event()
            if self._report is not None and self.lease is not None:
                await self.client.put(key, self._report, lease=self.lease)

    async def _campaign_loop(self) -> None:
        while True:
            assert self.lease is not None
            if self.term is None:
                result = await self.client.txn(
                    [Compare(self.leader_key, "CREATE", 0)],
                    [put_op(self.leader_key, self.node_id.encode(), self.lease)],
                    [range_op(self.leader_key)],
                )
                if result.succeeded:
                    self.term = result.revision
                    self.leader = self.node_id
                    self.leader_term = self.term
                    self.elections_won += 1
                    log.info("%s is the leader (term %d)", self.node_id, self.term)
                    self._on_change()
                else:
                    (kvs,) = result.ranges()
                    holder = kvs[0].value.decode(errors="replace") if kvs else None
                    self.leader_term = kvs[0].create_revision if kvs else None
                    if holder != self.leader:
                        self.leader = holder
                        self._on_change()
            else:
                kv = await self.client.get(self.leader_key)
                if kv is None or kv.create_revision != self.term:
                    self.step_down("the leader key is no longer ours")
            with trio.move_on_after(self.ttl / 3):  # or at once when the leader key goes
                await self._leader_gone.wait()
            self._leader_gone = trio.Event()

    async def _leader_watch_loop(self) -> None:
        """Followers campaign the moment the leader key is deleted (resign or lease expiry),
        instead of at their next poll. A broken watch only delays that to the poll."""
        while True:
            try:
                async with contextlib.aclosing(self.client.watch(self.leader_key)) as batches:
                    async for batch in batches:
                        if any(event.type == "DELETE" for event in batch.events):
                            self._leader_gone.set()
            except StoreError:
                await trio.sleep(self.ttl / 3)

    def _lost(self, why: str) -> None:
        self.problem = why
        self.lease = None
        self._lease_valid_until = 0.0
        if self.term is not None:
            self.step_down(why)

    async def resign(self) -> None:
        """Give up leadership and the lease (clean shutdown): followers take over at once."""
        term, lease = self.term, self.lease
        self.term = None
        try:
            with trio.move_on_after(2):
                if term is not None:
                    await self.client.txn(
                        [Compare(self.leader_key, "CREATE", term)], [delete_op(self.leader_key)]
                    )
                if lease is not None:
                    await self.client.lease_revoke(lease)
        except StoreError as exc:
            log.warning("could not resign cleanly: %s", exc)
