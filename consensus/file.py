"""The file-backed key-set store: the embedded single-node default.

On disk: one header line, then exactly the document bytes:

    keyquorum-keyset-store v1 revision=<n> length=<bytes> sha256=<hex>\\n<document>

Writes are crash-safe (temp file in the same directory, fsync, rename, fsync of the directory) and
atomic across processes (an exclusive flock on `<path>.lock` covers read-compare-write). A file
whose framing does not check out is never overwritten: every call raises StoreCorrupt until an
operator restores or removes it, so nothing is lost by a hand edit or a bad disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import trio

from consensus.store import ABSENT, StoreConflict, StoreCorrupt, StoreError, Versioned

_HEADER = re.compile(
    rb"^keyquorum-keyset-store v1 revision=(\d+) length=(\d+) sha256=([0-9a-f]{64})$"
)
_TMP_PREFIX = ".keyset-tmp-"


class FileStore:
    def __init__(self, path: Path, *, poll_interval: float = 0.2) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.description = f"file store {self.path}"
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    # ---- reading ---------------------------------------------------------------------------

    def _read(self) -> Versioned:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return ABSENT
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc.strerror}") from None
        return _decode(raw, self.path)

    async def get(self) -> Versioned:
        return await trio.to_thread.run_sync(self._read)

    # ---- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _cas(self, expected_revision: int, value: bytes) -> int:
        with self._locked():
            current = self._read()  # StoreCorrupt propagates: never overwrite what we cannot read
            if current.revision != expected_revision:
                raise StoreConflict(expected_revision, current)
            revision = current.revision + 1
            self._write(revision, value)
            self._clean_temp_files()
            return revision

    def _write(self, revision: int, value: bytes) -> None:
        header = (
            f"keyquorum-keyset-store v1 revision={revision} length={len(value)} "
            f"sha256={hashlib.sha256(value).hexdigest()}\n"
        ).encode()
        directory = self.path.parent
        tmp = directory / f"{_TMP_PREFIX}{os.getpid()}-{revision}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, header + value)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _clean_temp_files(self) -> None:
        # Called with the lock held: any temp file left now is from a writer that crashed.
        for leftover in self.path.parent.glob(f"{_TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    async def compare_and_swap(self, expected_revision: int, value: bytes) -> int:
        return await trio.to_thread.run_sync(self._cas, expected_revision, bytes(value))

    # ---- watching --------------------------------------------------------------------------

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    async def watch(self, after_revision: int) -> AsyncGenerator[Versioned, None]:
        last = after_revision
        seen: tuple[int, int, int] | bool | None = False  # False: nothing looked at yet
        while True:
            signature = await trio.to_thread.run_sync(self._signature)
            if signature != seen:
                current = await self.get()
                seen = signature
                if current.revision > last:
                    last = current.revision
                    yield current
                    continue
            await trio.sleep(self.poll_interval)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _decode(raw: bytes, path: Path) -> Versioned:
    header, newline, body = raw.partition(b"\n")
    match = _HEADER.match(header) if newline else None
    if match is None:
        raise StoreCorrupt(
            f"{path} is not a keyquorum key-set store file (bad header); restore it from a "
            "backup or remove it so the agent writes its last good key set back"
        )
    revision, length, digest = int(match[1]), int(match[2]), match[3].decode()
    if len(body) != length:
        raise StoreCorrupt(
            f"{path} is truncated or padded: header says {length} bytes, found {len(body)}",
            revision,
        )
    if hashlib.sha256(body).hexdigest() != digest:
        raise StoreCorrupt(f"{path}: document checksum mismatch (edited by hand?)", revision)
    if revision <= 0:
        raise StoreCorrupt(f"{path}: revision must be positive", revision)
    return Versioned(body, revision)
