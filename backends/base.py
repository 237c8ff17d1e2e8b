"""Key-protection protocols and the backend error hierarchy (DESIGN.md §8).

Every provider module translates its SDK's exceptions into these at one place, so nothing above
the backend boundary ever sees a boto3, google or azure exception. Each error carries a `hint`:
what an operator (or the caller's retry logic) should do about it. Only the key-wrapper protocol
lives here so far; remote signers and secret stores get their own protocols beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable


class BackendError(Exception):
    """A key-protection backend failed; `message` says what, `hint` what to do about it."""

    default_hint: ClassVar[str] = ""

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint or self.default_hint
        super().__init__(f"{message}; {self.hint}" if self.hint else message)


class BackendUnavailable(BackendError):
    """Transient: the backend could not be reached, timed out or throttled us."""

    default_hint = "the backend may be down or throttling; retry with backoff"


class BackendDenied(BackendError):
    """Permanent for this input: permission denied, wrong key, or tampered data."""

    default_hint = "do not retry blindly: check the backend's permissions and the key material"


class BackendConfigError(BackendError):
    """The backend settings are wrong; the message names the setting, the hint the fix."""

    default_hint = "fix the backend setting named above and restart the agent"


@runtime_checkable
class KeyWrapper(Protocol):
    """Wraps and unwraps data keys for envelope encryption (backends/envelope.py).

    `context` carries the kid and the cluster prefix; implementations bind it as associated data
    or encryption context, so a wrapped key cannot be moved to another record or cluster. Both
    calls raise only BackendError subclasses. `wrap_data_key` returns JSON-serialisable strings.
    """

    @property
    def kind(self) -> str:
        """The config `kind` that builds this wrapper, recorded in every sealed key."""
        ...

    async def wrap_data_key(
        self, data_key: bytes, context: Mapping[str, str]
    ) -> dict[str, str]: ...

    async def unwrap_data_key(
        self, wrapped: Mapping[str, str], context: Mapping[str, str]
    ) -> bytes: ...

    def describe(self) -> str:
        """A one-line description for status and logs (never secret material)."""
        ...


@dataclass(frozen=True, slots=True)
class RemoteKey:
    """A key pair created inside a KMS/HSM: its public half, and how to find it again.

    `ref` is JSON-safe and is all a key record stores of a remote key (DESIGN.md §8): no private
    material ever leaves the backend. `created_at` (ms, the backend's own clock where it has
    one) lets the leader tell a fresh key from one stranded by a crash.
    """

    ref: Mapping[str, str]
    public_key_pem: bytes
    created_at: int | None = None


@runtime_checkable
class RemoteSigner(Protocol):
    """Creates one key per rotation inside the backend and signs with it there.

    Keys carry the cluster prefix (as a tag, label or name) so that `owned_keys` can find every
    key this cluster ever created, including ones a crashed leader created and never published;
    the leader schedules the deletion of each key no longer in the key set (`retire`). Signatures
    come back in JWS encoding (EC: raw r||s), whatever the provider's native format.
    """

    @property
    def kind(self) -> str: ...

    def supports(self, alg: str) -> bool:
        """Whether this backend can create and sign with keys of JWS algorithm `alg`."""
        ...

    async def create_key(self, alg: str, prefix: str) -> RemoteKey: ...

    async def public_key(self, ref: Mapping[str, str]) -> bytes:
        """The PEM public key the backend holds for `ref` (checked against the record)."""
        ...

    async def sign(self, ref: Mapping[str, str], alg: str, data: bytes) -> bytes: ...

    async def owned_keys(self, prefix: str) -> list[RemoteKey]:
        """Every live (not yet retired) key this backend created for the cluster `prefix`."""
        ...

    async def retire(self, ref: Mapping[str, str]) -> None:
        """Schedule the key's deletion (or destroy it where the backend has no schedule)."""
        ...

    def describe(self) -> str: ...


@runtime_checkable
class SecretStore(Protocol):
    """Keeps each private key as a version of one versioned secret per cluster (the GoatDB
    design): the key set holds only the version's reference; a `stable` label marks the last
    version known good, which `keyquorum rollback` goes back to.

    `name` is the secret's name (from the config); values are opaque bytes (the agent stores a
    small JSON document with the kid, alg and PKCS#8 key). All calls raise only BackendError.
    """

    @property
    def kind(self) -> str: ...

    async def add_version(self, value: bytes) -> dict[str, str]:
        """Store `value` as a new version (creating the secret on first use); its reference."""
        ...

    async def read(self, ref: Mapping[str, str]) -> bytes:
        """The value of exactly the version `ref` names (never "the latest")."""
        ...

    async def set_stable(self, ref: Mapping[str, str]) -> None:
        """Move the `stable` label to the version `ref` (off any other version)."""
        ...

    async def stable(self) -> dict[str, str] | None:
        """The reference of the version labelled `stable`, or None if none is."""
        ...

    async def destroy(self, ref: Mapping[str, str]) -> None:
        """Destroy / disable the version (its key left the key set); idempotent."""
        ...

    def describe(self) -> str: ...
