"""An in-memory key-set store shared by any number of agents in one process (tests, simulator)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import trio

from consensus.store import ABSENT, StoreConflict, Versioned


class MemoryStore:
    def __init__(self) -> None:
        self.description = "in-memory store"
        self._current = ABSENT
        self._changed = trio.Event()

    async def get(self) -> Versioned:
        await trio.lowlevel.checkpoint()
        return self._current

    async def compare_and_swap(self, expected_revision: int, value: bytes) -> int:
        await trio.lowlevel.checkpoint()
        if self._current.revision != expected_revision:
            raise StoreConflict(expected_revision, self._current)
        self._current = Versioned(bytes(value), self._current.revision + 1)
        self._changed.set()
        self._changed = trio.Event()
        return self._current.revision

    async def watch(self, after_revision: int) -> AsyncGenerator[Versioned, None]:
        last = after_revision
        while True:
            changed = self._changed
            current = self._current
            if current.revision > last:
                last = current.revision
                yield current
                continue
            await changed.wait()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
