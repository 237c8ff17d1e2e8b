"""The local key-encryption-key backend: a 32-byte KEK in a file only its owner can read.

`LocalKekWrapper.open` creates the KEK atomically on first start (0600, in a 0700 directory) and
refuses a file that group or others can access, or that has the wrong length. The KEK's bytes are
held only inside an AESGCM object: they never appear in repr, logs or exception messages; the
`kek_id` (a SHA-256 prefix) identifies it instead.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.crypto import b64url_decode, b64url_encode
from backends.base import BackendConfigError, BackendDenied
from backends.envelope import associated_data

KEK_BYTES = 32
NONCE_BYTES = 12
_OPTIONS = frozenset({"kek_file", "create_kek", "timeout"})


def kek_id_of(kek: bytes) -> str:
    """The public name of a KEK: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(kek).hexdigest()[:16]


class LocalKekWrapper:
    """Wraps data keys with AES-256-GCM under a local KEK file, binding the context as AAD."""

    __slots__ = ("_aead", "kek_id", "path")
    kind = "local"

    def __init__(self, path: Path, kek: bytes) -> None:
        if len(kek) != KEK_BYTES:
            raise BackendConfigError(f"backend.kek_file: a KEK must be {KEK_BYTES} bytes")
        self.path = path
        self.kek_id = kek_id_of(kek)
        self._aead = AESGCM(kek)

    @classmethod
    def open(cls, path: Path, *, create: bool = True) -> LocalKekWrapper:
        """Load the KEK at `path`, creating it first when absent and `create` is true."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if not create:
                raise BackendConfigError(
                    f"backend.kek_file: {path} does not exist",
                    "restore the cluster's KEK file, or set backend.create_kek = true "
                    "to start a new cluster",
                ) from None
            _create_kek(path)
            fd = _open_or_fail(path)
        except OSError as exc:
            raise BackendConfigError(
                f"backend.kek_file: cannot open {path}: {exc.strerror}",
                f"make {path} readable by the agent's user",
            ) from None
        try:
            kek = _read_checked(fd, path)
        finally:
            os.close(fd)
        return cls(path, kek)

    async def wrap_data_key(self, data_key: bytes, context: Mapping[str, str]) -> dict[str, str]:
        await trio.lowlevel.checkpoint()
        nonce = os.urandom(NONCE_BYTES)
        wrapped = self._aead.encrypt(nonce, data_key, associated_data(context))
        return {
            "kek_id": self.kek_id,
            "nonce": b64url_encode(nonce),
            "wrapped": b64url_encode(wrapped),
        }

    async def unwrap_data_key(
        self, wrapped: Mapping[str, str], context: Mapping[str, str]
    ) -> bytes:
        await trio.lowlevel.checkpoint()
        kek_id = wrapped.get("kek_id")
        if kek_id != self.kek_id:
            raise BackendDenied(
                f"the data key of {context.get('keyquorum:kid', '?')} was wrapped with KEK id "
                f"{kek_id} but the configured KEK file {self.path} has id {self.kek_id}",
                "wrong KEK file? restore the KEK this key set was created with",
            )
        try:
            nonce = b64url_decode(wrapped["nonce"])
            blob = b64url_decode(wrapped["wrapped"])
            if len(nonce) != NONCE_BYTES:
                raise ValueError("bad nonce length")
            return self._aead.decrypt(nonce, blob, associated_data(context))
        except (KeyError, ValueError, TypeError, InvalidTag):
            raise BackendDenied(
                f"the wrapped data key of {context.get('keyquorum:kid', '?')} does not open with "
                f"KEK {self.kek_id} (tampered, or wrapped for another kid or cluster prefix)"
            ) from None

    def describe(self) -> str:
        return f"local KEK file {self.path} (id {self.kek_id})"

    def __repr__(self) -> str:
        return f"LocalKekWrapper(path={str(self.path)!r}, kek_id={self.kek_id!r})"


def _open_or_fail(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise BackendConfigError(f"backend.kek_file: cannot open {path}: {exc.strerror}") from None


def _read_checked(fd: int, path: Path) -> bytes:
    """The KEK behind an open descriptor, after checking what it is and who may read it."""
    info = os.fstat(fd)  # fstat, not stat: the checked file is the one read
    if not stat.S_ISREG(info.st_mode):
        raise BackendConfigError(
            f"backend.kek_file: {path} is not a regular file", "point it at the KEK file"
        )
    if info.st_mode & 0o077:
        raise BackendConfigError(
            f"backend.kek_file: {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o})",
            f"run: chmod 600 {path}",
        )
    kek = os.read(fd, KEK_BYTES + 1)
    if len(kek) != KEK_BYTES:
        raise BackendConfigError(
            f"backend.kek_file: {path} holds {info.st_size} bytes, not a {KEK_BYTES}-byte KEK",
            "restore the cluster's KEK file (it is not text: copy it byte for byte)",
        )
    return kek


def _create_kek(path: Path) -> None:
    """Create a fresh KEK so that `path` is either absent or complete, never half-written.

    The KEK is written to an exclusive temporary file and hard-linked into place: the link fails
    if another process created the file first (then its KEK wins and is read by the caller).
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise BackendConfigError(
            f"backend.kek_file: cannot create {path}: {exc.strerror}",
            f"make {path.parent} writable by the agent's user, or create the KEK there",
        ) from None
    try:
        try:
            os.write(fd, os.urandom(KEK_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
        _fsync_dir(path.parent)
    except OSError as exc:
        raise BackendConfigError(
            f"backend.kek_file: cannot create {path}: {exc.strerror}",
            "create the KEK yourself: head -c 32 /dev/urandom > FILE; chmod 600 FILE",
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build(options: Mapping[str, Any]) -> LocalKekWrapper:
    """The registry's constructor: options `kek_file` (required) and `create_kek` (default true)."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for kind 'local'",
            f"the local backend takes {', '.join(sorted(_OPTIONS))}",
        )
    kek_file = options.get("kek_file")
    if not isinstance(kek_file, str | os.PathLike) or not os.fspath(kek_file):
        raise BackendConfigError(
            "backend.kek_file: required for kind 'local'", "set it to the KEK file's path"
        )
    create = options.get("create_kek", True)
    if not isinstance(create, bool):
        raise BackendConfigError(
            f"backend.create_kek: must be true or false, not {create!r}",
            "write create_kek = true (new cluster) or false (KEK must already exist)",
        )
    return LocalKekWrapper.open(Path(kek_file), create=create)
