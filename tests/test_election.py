"""Leader election and fencing against a real etcd (DESIGN.md §9.3: no deposed leader's write)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from consensus.election import Election
from consensus.etcd import EtcdStore
from consensus.etcd_client import EtcdClient
from consensus.local_etcd import LocalEtcd
from consensus.store import FencedOut, StoreConflict

pytestmark = pytest.mark.etcd


@asynccontextmanager
async def candidate(etcd: LocalEtcd, prefix: str, node: str) -> AsyncIterator[Election]:
    election = Election(EtcdClient(etcd.endpoints, timeout=2), prefix, node, lease_ttl=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(election.run)
        try:
            yield election
        finally:
            nursery.cancel_scope.cancel()
    await election.client.aclose()


async def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_exactly_one_of_three_candidates_leads_and_the_others_know_who(
    etcd1: LocalEtcd, unique_prefix: str
) -> None:
    async with (
        candidate(etcd1, unique_prefix, "a") as a,
        candidate(etcd1, unique_prefix, "b") as b,
        candidate(etcd1, unique_prefix, "c") as c,
    ):
        await wait_for(lambda: sum(e.is_leader for e in (a, b, c)) == 1)
        leader = next(e for e in (a, b, c) if e.is_leader)
        await wait_for(lambda: all(e.leader == leader.node_id for e in (a, b, c)))
        assert leader.term is not None and leader.term > 0


async def test_a_resigned_leader_is_replaced_with_a_higher_term(
    etcd1: LocalEtcd, unique_prefix: str
) -> None:
    async with candidate(etcd1, unique_prefix, "a") as a:
        await wait_for(lambda: a.is_leader)
        first_term = a.term
        async with candidate(etcd1, unique_prefix, "b") as b:
            await trio.sleep(0.5)
            assert not b.is_leader
            await a.resign()
            await wait_for(lambda: b.is_leader, timeout=5)
            assert b.term is not None and first_term is not None and b.term > first_term
            assert not a.is_leader


async def test_deposed_leader_write_is_rejected_by_fence(
    etcd1: LocalEtcd, unique_prefix: str
) -> None:
    """A leader whose lease ran out (as if paused past its TTL) still tries to write: the txn's
    compare on the leader key's create_revision refuses it, and the new leader's write lands."""
    async with candidate(etcd1, unique_prefix, "old") as old:
        await wait_for(lambda: old.is_leader)
        stale_term = old.term
        old_store = EtcdStore(EtcdClient(etcd1.endpoints), unique_prefix)
        old_store.fence = stale_term
        base = await old_store.compare_and_swap(0, b"generation 1 by old")
        # The old leader's lease vanishes behind its back (what a long pause looks like to etcd).
        assert old.lease is not None
        await old.client.lease_revoke(old.lease)
        async with candidate(etcd1, unique_prefix, "new") as new:
            await wait_for(lambda: new.is_leader, timeout=5)
            assert new.term != stale_term
            with pytest.raises(FencedOut, match=f"term {stale_term} is over"):
                await old_store.compare_and_swap(base, b"generation 2 by the deposed leader")
            new_store = EtcdStore(EtcdClient(etcd1.endpoints), unique_prefix)
            new_store.fence = new.term
            await new_store.compare_and_swap(base, b"generation 2 by new")
            assert (await new_store.get()).value == b"generation 2 by new"
            # A stale write that is fenced correctly but lost the race is a plain conflict.
            with pytest.raises(StoreConflict):
                await new_store.compare_and_swap(base, b"stale")
            await new_store.aclose()
        await old_store.aclose()
        await wait_for(lambda: not old.is_leader, timeout=5)


async def test_member_reports_ride_on_the_lease_and_vanish_with_it(
    etcd1: LocalEtcd, unique_prefix: str
) -> None:
    async with candidate(etcd1, unique_prefix, "a") as a:
        a.publish({"loaded": ["k1"], "signing": "k1"})
        async with candidate(etcd1, unique_prefix, "b") as b:
            b.publish({"loaded": ["k1", "k2"], "signing": "k1"})
            await wait_for(lambda: a.lease is not None and b.lease is not None)
            with trio.fail_after(5):
                while set(await a.members()) != {"a", "b"}:
                    await trio.sleep(0.05)
            members = await a.members()
            assert members["b"] == {"loaded": ["k1", "k2"], "signing": "k1"}
            assert b.lease is not None
            await b.client.lease_revoke(b.lease)
        with trio.fail_after(5):
            while set(await a.members()) != {"a"}:
                await trio.sleep(0.05)
