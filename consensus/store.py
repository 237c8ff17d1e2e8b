"""The key-set store protocol: one versioned document, compare-and-swap writes, and a watch.

Stores treat the document as opaque bytes; parsing and validation belong to `agent.keyset`, so a
corrupt document is still delivered (and reported by the agent) rather than hidden by the store.
Revisions are > 0 and strictly increase with every write (etcd's are global, so not consecutive);
revision 0 with no value means no document has been written yet.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Versioned:
    value: bytes | None
    revision: int


ABSENT = Versioned(None, 0)


class StoreError(Exception):
    """The store could not do what was asked; the message says why."""


class StoreConflict(StoreError):
    """A compare-and-swap lost: the document changed since `expected`; `current` is there now."""

    def __init__(self, expected: int, current: Versioned) -> None:
        super().__init__(
            f"the key set changed: expected revision {expected}, found {current.revision}"
        )
        self.current = current


class StoreUnavailable(StoreError):
    """Transient: the store cannot be reached now. Retry with backoff."""


class StoreCorrupt(StoreError):
    """The store's own framing is unreadable (e.g. a hand-edited or truncated file)."""

    def __init__(self, message: str, revision: int | None = None) -> None:
        super().__init__(message)
        self.revision = revision


class FencedOut(StoreError):
    """A write from a leader that no longer holds its term (reserved for the etcd store)."""


class KeySetStore(Protocol):
    description: str

    async def get(self) -> Versioned: ...

    async def compare_and_swap(self, expected_revision: int, value: bytes) -> int:
        """Write `value` if the current revision is `expected_revision` (0: only if absent).
        Returns the new revision; raises StoreConflict otherwise."""
        ...

    def watch(self, after_revision: int) -> AsyncGenerator[Versioned, None]:
        """Committed documents with revision > after_revision, in order (rapid writes may be
        coalesced, but the latest is always delivered). Raises StoreError when it cannot read."""
        ...

    async def aclose(self) -> None: ...
