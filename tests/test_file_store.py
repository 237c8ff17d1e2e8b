"""The file store: crash-safe, atomic across processes, and never overwrites what it cannot read."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from consensus.file import FileStore
from consensus.store import StoreConflict, StoreCorrupt, Versioned


async def written(path: Path, *values: bytes) -> FileStore:
    store = FileStore(path, poll_interval=0.01)
    revision = 0
    for value in values:
        revision = await store.compare_and_swap(revision, value)
    return store


async def test_document_survives_reopening_and_the_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "keyset.store"
    await written(path, b"one", b"two")
    assert await FileStore(path).get() == Versioned(b"two", 2)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_two_processes_racing_from_one_revision_have_exactly_one_winner(tmp_path: Path) -> None:
    path = tmp_path / "keyset.store"
    trio.run(written, path, b"base")
    script = textwrap.dedent(
        f"""
        import sys, trio
        from consensus.file import FileStore
        from consensus.store import StoreConflict
        async def main():
            try:
                await FileStore({str(path)!r}).compare_and_swap(1, sys.argv[1].encode())
                print("won")
            except StoreConflict:
                print("lost")
        trio.run(main)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, f"p{i}"], stdout=subprocess.PIPE)
        for i in range(4)
    ]
    outcomes = sorted(p.communicate(timeout=60)[0].decode().strip() for p in procs)
    assert outcomes == ["lost", "lost", "lost", "won"]
    current = trio.run(FileStore(path).get)
    assert current.revision == 2
    assert current.value in {b"p0", b"p1", b"p2", b"p3"}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: b"garbage\n" + raw, "bad header"),
        (lambda raw: raw[:20], "bad header"),
        (lambda raw: raw[:-3], "truncated"),
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "checksum"),
        (lambda raw: b"", "bad header"),
    ],
)
async def test_a_damaged_file_is_reported_and_never_overwritten(
    tmp_path: Path, damage: object, message: str
) -> None:
    path = tmp_path / "keyset.store"
    store = await written(path, b'{"a": 1}')
    bad = damage(path.read_bytes())  # type: ignore[operator]
    path.write_bytes(bad)
    with pytest.raises(StoreCorrupt, match=message):
        await store.get()
    with pytest.raises(StoreCorrupt):
        await store.compare_and_swap(1, b"overwrite attempt")
    assert path.read_bytes() == bad
    with pytest.raises(StoreCorrupt), trio.fail_after(5):
        async with contextlib.aclosing(store.watch(0)) as events:
            async for _ in events:
                pass


async def test_after_the_operator_restores_a_valid_file_a_new_watch_sees_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keyset.store"
    store = await written(path, b"v1", b"v2")
    good = path.read_bytes()
    path.write_bytes(b"broken")
    with pytest.raises(StoreCorrupt):
        await store.get()
    other = await written(tmp_path / "other.store", b"x", b"y", b"restored")
    path.write_bytes((tmp_path / "other.store").read_bytes())
    with trio.fail_after(5):
        async with contextlib.aclosing(store.watch(2)) as events:
            async for item in events:
                assert item == Versioned(b"restored", 3)
                break
    assert good != path.read_bytes()
    await other.aclose()


async def test_a_leftover_temp_file_from_a_crash_is_ignored_and_cleaned(tmp_path: Path) -> None:
    path = tmp_path / "keyset.store"
    store = await written(path, b"v1")
    leftover = tmp_path / ".keyset-tmp-99999-2"
    leftover.write_bytes(b"half a write")
    assert await store.get() == Versioned(b"v1", 1)
    await store.compare_and_swap(1, b"v2")
    assert not leftover.exists()
    with pytest.raises(StoreConflict):
        await store.compare_and_swap(1, b"stale")
