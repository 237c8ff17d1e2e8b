"""The etcd key-set store: `<prefix>/keyset`, written with fenced compare-and-swap (DESIGN.md §3).

Every write is one txn:  mod_revision(keyset) == R  AND  create_revision(leader) == term  -> put.
The second compare is the fence (Jepsen: etcd locks alone cannot give mutual exclusion, because a
paused leader's lease can run out while it still believes it leads). When the txn fails the same
round trip reads both keys, so the caller learns whether it lost a race (`StoreConflict`) or its
leadership (`FencedOut`) — DESIGN.md §9.3.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

import trio

from consensus.etcd_client import Compare, EtcdClient, WatchCompacted, put_op, range_op
from consensus.store import FencedOut, StoreConflict, Versioned


class EtcdStore:
    def __init__(self, client: EtcdClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        self.key = f"{self.prefix}/keyset".encode()
        self.leader_key = f"{self.prefix}/leader".encode()
        self.description = f"{client.describe()} {self.prefix}/keyset"
        # The term (leader key create_revision) that fences writes; None: unfenced (tests, tools).
        self.fence: int | None = None

    async def get(self) -> Versioned:
        kv = await self.client.get(self.key)
        return Versioned(None, 0) if kv is None else Versioned(kv.value, kv.mod_revision)

    async def compare_and_swap(self, expected_revision: int, value: bytes) -> int:
        compares = [Compare(self.key, "MOD", expected_revision)]
        fence = self.fence
        if fence is not None:
            compares.append(Compare(self.leader_key, "CREATE", fence))
        result = await self.client.txn(
            compares,
            [put_op(self.key, value)],
            [range_op(self.key), range_op(self.leader_key)],
        )
        if result.succeeded:
            return result.revision
        keyset_kvs, leader_kvs = result.ranges()
        current = (
            Versioned(keyset_kvs[0].value, keyset_kvs[0].mod_revision)
            if keyset_kvs
            else Versioned(None, 0)
        )
        if fence is not None:
            holder = leader_kvs[0].create_revision if leader_kvs else 0
            if holder != fence:
                raise FencedOut(
                    f"write refused by the fence: this agent's term {fence} is over "
                    f"(the leader key's term is now {holder or 'vacant'})"
                )
        raise StoreConflict(expected_revision, current)

    async def watch(self, after_revision: int) -> AsyncGenerator[Versioned, None]:
        """Follow the key; resume from the last revision + 1 after a broken stream, and re-read
        in full after a compaction (DESIGN.md §3)."""
        last = after_revision
        current = await self.get()
        if current.revision > last:
            last = current.revision
            yield current
        while True:
            try:
                async with contextlib.aclosing(
                    self.client.watch(self.key, start_revision=last + 1)
                ) as batches:
                    async for batch in batches:
                        for event in batch.events:
                            if event.type == "PUT" and event.kv.mod_revision > last:
                                last = event.kv.mod_revision
                                yield Versioned(event.kv.value, last)
            except WatchCompacted:
                current = await self.get()
                if current.revision > last:
                    last = current.revision
                    yield current
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.client.aclose()
