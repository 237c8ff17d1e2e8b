"""One contract for every key-set store (DESIGN.md §3); the etcd store joins as another param."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from consensus.etcd import EtcdStore
from consensus.etcd_client import EtcdClient
from consensus.file import FileStore
from consensus.memory import MemoryStore
from consensus.store import KeySetStore, StoreConflict, Versioned

StoreFactory = Callable[[Path], KeySetStore]

FACTORIES: dict[str, StoreFactory] = {
    "memory": lambda _: MemoryStore(),
    "file": lambda d: FileStore(d / "keyset.store", poll_interval=0.01),
}


@pytest.fixture(params=[*sorted(FACTORIES), "etcd"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, unique_prefix: str
) -> AsyncIterator[KeySetStore]:
    if request.param == "etcd":
        etcd = request.getfixturevalue("etcd1")
        instance: KeySetStore = EtcdStore(EtcdClient(etcd.endpoints), unique_prefix)
    else:
        instance = FACTORIES[request.param](tmp_path)
    yield instance
    await instance.aclose()


async def test_an_empty_store_has_no_document_at_revision_zero(store: KeySetStore) -> None:
    assert await store.get() == Versioned(None, 0)


async def test_create_with_zero_then_read_back(store: KeySetStore) -> None:
    revision = await store.compare_and_swap(0, b"doc-1")
    assert revision > 0
    assert await store.get() == Versioned(b"doc-1", revision)


async def test_create_with_zero_twice_conflicts_and_reports_the_current_document(
    store: KeySetStore,
) -> None:
    revision = await store.compare_and_swap(0, b"first")
    with pytest.raises(StoreConflict) as info:
        await store.compare_and_swap(0, b"second")
    assert info.value.current == Versioned(b"first", revision)
    assert (await store.get()).value == b"first"


async def test_stale_revision_is_refused_and_loses_nothing(store: KeySetStore) -> None:
    r1 = await store.compare_and_swap(0, b"one")
    r2 = await store.compare_and_swap(r1, b"two")
    assert r2 > r1
    with pytest.raises(StoreConflict) as info:
        await store.compare_and_swap(r1, b"stale")
    assert info.value.current == Versioned(b"two", r2)
    assert await store.get() == Versioned(b"two", r2)


async def test_watch_delivers_writes_in_revision_order_ending_with_the_latest(
    store: KeySetStore,
) -> None:
    seen: list[Versioned] = []
    latest = trio.Event()

    async def follow() -> None:
        async with contextlib.aclosing(store.watch(0)) as events:
            async for item in events:
                seen.append(item)
                if item.value == b"v5":
                    latest.set()
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        revision = 0
        for i in range(1, 6):
            revision = await store.compare_and_swap(revision, f"v{i}".encode())
            await trio.sleep(0.02)
        with trio.fail_after(5):
            await latest.wait()
    revisions = [v.revision for v in seen]
    assert revisions == sorted(set(revisions))
    assert seen[-1] == Versioned(b"v5", revision)


async def test_watch_from_an_old_revision_yields_the_current_document_at_once(
    store: KeySetStore,
) -> None:
    r1 = await store.compare_and_swap(0, b"a")
    r2 = await store.compare_and_swap(r1, b"b")
    with trio.fail_after(5):
        async with contextlib.aclosing(store.watch(r1)) as events:
            async for item in events:
                assert item == Versioned(b"b", r2)
                break


async def test_concurrent_writers_from_one_revision_have_exactly_one_winner(
    store: KeySetStore,
) -> None:
    base = await store.compare_and_swap(0, b"base")
    outcomes: list[str] = []

    async def writer(n: int) -> None:
        try:
            await store.compare_and_swap(base, f"writer {n}".encode())
            outcomes.append("won")
        except StoreConflict:
            outcomes.append("lost")

    async with trio.open_nursery() as nursery:
        for n in range(8):
            nursery.start_soon(writer, n)
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]


# ---- differential state machine: every store agrees with the in-memory reference ---------------


class StoresAgree(RuleBasedStateMachine):
    """The same operations against the reference and the store under test, step by step."""

    make_store: StoreFactory

    def __init__(self) -> None:
        super().__init__()
        self._dir = tempfile.TemporaryDirectory()
        self.reference = MemoryStore()
        self.subject = self.make_store(Path(self._dir.name))
        # Revisions need not match across implementations, only their order; map them.
        self.revisions: list[tuple[int, int]] = [(0, 0)]

    def teardown(self) -> None:
        self._dir.cleanup()

    def both(self, op: Callable[[KeySetStore, int], object], which: int) -> tuple[object, object]:
        ref_rev, sub_rev = self.revisions[which]

        async def run() -> tuple[object, object]:
            results = []
            for store, rev in ((self.reference, ref_rev), (self.subject, sub_rev)):
                try:
                    results.append(await op(store, rev))  # type: ignore[misc]
                except StoreConflict as exc:
                    results.append(("conflict", exc.current.value))
            return results[0], results[1]

        return trio.run(run)

    @rule(value=st.binary(max_size=64), which=st.integers(0, 1000))
    def cas(self, value: bytes, which: int) -> None:
        index = which % len(self.revisions)
        ref, sub = self.both(lambda s, rev: s.compare_and_swap(rev, value), index)
        if isinstance(ref, int):
            assert isinstance(sub, int), f"reference wrote, subject said {sub!r}"
            self.revisions.append((ref, sub))
        else:
            assert ref == sub

    @rule(value=st.binary(max_size=64))
    def cas_latest(self, value: bytes) -> None:
        self.cas(value, len(self.revisions) - 1)

    @invariant()
    def same_document(self) -> None:
        async def read() -> tuple[Versioned, Versioned]:
            return await self.reference.get(), await self.subject.get()

        ref, sub = trio.run(read)
        assert ref.value == sub.value
        assert (ref.revision, sub.revision) in self.revisions


@pytest.mark.parametrize("kind", sorted(k for k in FACTORIES if k != "memory"))
def test_store_agrees_with_the_in_memory_reference(kind: str) -> None:
    machine = type(
        f"{kind.title()}Agrees", (StoresAgree,), {"make_store": staticmethod(FACTORIES[kind])}
    )
    run_state_machine_as_test(
        machine, settings=settings(max_examples=30, stateful_step_count=20, deadline=None)
    )
