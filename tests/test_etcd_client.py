"""The etcd JSON-gateway client against a real etcd: the quirks DESIGN.md §4 lists."""

from __future__ import annotations

import contextlib

import pytest
import trio

from consensus.etcd import EtcdStore
from consensus.etcd_client import (
    Compare,
    EtcdClient,
    WatchCompacted,
    put_op,
    range_end_for_prefix,
    range_op,
)
from consensus.local_etcd import LocalEtcd, free_ports
from consensus.store import StoreUnavailable, Versioned

pytestmark = pytest.mark.etcd


@pytest.fixture
async def client(etcd1: LocalEtcd) -> EtcdClient:
    c = EtcdClient(etcd1.endpoints, timeout=2)
    yield c  # type: ignore[misc]
    await c.aclose()


def test_prefix_range_end() -> None:
    assert range_end_for_prefix(b"/a/") == b"/a0"
    assert range_end_for_prefix(b"a\xff") == b"b"


async def test_absent_keys_and_failed_txns_come_back_without_their_default_fields(
    client: EtcdClient, unique_prefix: str
) -> None:
    key = f"{unique_prefix}/k".encode()
    assert await client.get(key) is None  # no "kvs" in the answer
    result = await client.txn([Compare(key, "VERSION", 1)], [put_op(key, b"x")], [range_op(key)])
    assert result.succeeded is False  # no "succeeded" in the answer
    assert result.ranges() == [[]]
    revision = await client.put(key, b"v")
    kv = await client.get(key)
    assert kv is not None and (kv.value, kv.mod_revision, kv.version) == (b"v", revision, 1)


async def test_keepalive_of_a_lost_lease_reports_zero(client: EtcdClient) -> None:
    lease, ttl = await client.lease_grant(3)
    assert ttl == 3
    assert await client.lease_keepalive(lease) == 3
    await client.lease_revoke(lease)
    assert await client.lease_keepalive(lease) == 0  # no "TTL" in the answer, still HTTP 200
    assert await client.lease_time_to_live(lease) == -1


async def test_calls_fail_over_to_a_live_endpoint(etcd1: LocalEtcd, unique_prefix: str) -> None:
    (dead,) = free_ports(1)
    c = EtcdClient([f"http://127.0.0.1:{dead}", *etcd1.endpoints], timeout=2)
    try:
        await c.put(f"{unique_prefix}/k".encode(), b"v")
        assert c.endpoints[c._current] == etcd1.endpoints[0]
    finally:
        await c.aclose()


async def test_no_live_endpoint_is_unavailable_naming_each() -> None:
    ports = free_ports(2)
    c = EtcdClient([f"http://127.0.0.1:{p}" for p in ports], timeout=1)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await c.get(b"/x")
        assert all(str(p) in str(info.value) for p in ports)
    finally:
        await c.aclose()


async def test_watch_from_a_compacted_revision_says_so_and_the_store_rereads(
    client: EtcdClient, unique_prefix: str
) -> None:
    store = EtcdStore(client, unique_prefix)
    first = await store.compare_and_swap(0, b"one")
    second = await store.compare_and_swap(first, b"two")
    third = await store.compare_and_swap(second, b"three")
    await client.call("/v3/kv/compaction", {"revision": str(third), "physical": True})
    with pytest.raises(WatchCompacted) as info, trio.fail_after(5):
        async with contextlib.aclosing(client.watch(store.key, start_revision=first)) as events:
            async for _ in events:
                pass
    assert info.value.compact_revision == third
    # The store's watch hides it: a full re-read, then the stream from there.
    with trio.fail_after(5):
        async with contextlib.aclosing(store.watch(first)) as documents:
            async for doc in documents:
                assert doc == Versioned(b"three", third)
                break


async def test_a_watch_sees_puts_and_deletes_under_a_prefix(
    client: EtcdClient, unique_prefix: str
) -> None:
    prefix = f"{unique_prefix}/w/".encode()
    seen: list[tuple[str, bytes]] = []

    async def follow() -> None:
        async with contextlib.aclosing(client.watch(prefix, prefix=True)) as batches:
            async for batch in batches:
                seen.extend((e.type, e.kv.key) for e in batch.events)
                if len(seen) >= 2:
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.sleep(0.2)
        await client.put(prefix + b"a", b"1")
        await client.delete(prefix + b"a")
        await client.put(f"{unique_prefix}/elsewhere".encode(), b"x")
    assert seen == [("PUT", prefix + b"a"), ("DELETE", prefix + b"a")]


async def test_a_broken_watch_stream_raises_unavailable(short_tmp: object) -> None:
    from pathlib import Path

    etcd = LocalEtcd(Path(str(short_tmp)) / "e", size=1).start()
    c = EtcdClient(etcd.endpoints, timeout=2)
    try:
        with pytest.raises(StoreUnavailable), trio.fail_after(10):
            async with contextlib.aclosing(c.watch(b"/x")) as events:
                await trio.sleep(0.2)
                etcd.stop()
                async for _ in events:
                    pass
    finally:
        etcd.stop()
        await c.aclose()
