"""The agent's in-memory keyring: the last good key set and the signers unwrapped from it.

The keyring answers the hot-path question "which signer do I use now?" from a cache that is only
recomputed when the key set changes or the cached answer's horizon passes (`signing_schedule`).
It does no I/O and reads no clock: callers pass `now` (wall-clock milliseconds).

Availability (DESIGN.md §9.1): if the key the policy names is not unwrapped here yet (a backend
outage on this node), the keyring falls back to the newest *loaded* key that is still inside its
signing window. That key is still published and still valid, so the signature verifies; the
agent reports itself degraded while it does this.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.crypto import SigningKey
from agent.keyset import KeyRecord, KeySet
from agent.policy import keys_to_load, signing_key, signing_schedule


class NotReady(Exception):
    """The agent cannot sign right now; the message says why (served as HTTP 503)."""


@dataclass(frozen=True, slots=True)
class Choice:
    signer: SigningKey
    preferred: str  # the kid the policy names; differs from signer.kid when falling back
    valid_until: int


class Keyring:
    def __init__(self) -> None:
        self.keyset: KeySet | None = None
        self.signers: dict[str, SigningKey] = {}
        self._choice: Choice | None = None
        self._horizon = -1
        self.seen: dict[str, int] = {}  # kid -> when this agent first saw it in a key set

    def install(self, keyset: KeySet, now: int) -> None:
        """Adopt a newer key set; forget signers of keys that can no longer sign."""
        self.keyset = keyset
        kids = {r.kid for r in keyset.keys}
        self.seen = {kid: at for kid, at in self.seen.items() if kid in kids}
        for kid in kids:
            self.seen.setdefault(kid, now)
        keep = {r.kid for r in keys_to_load(keyset, now)}
        for kid in list(self.signers):
            if kid not in keep:
                del self.signers[kid]
        self._choice = None
        self._horizon = -1

    def add_signer(self, signer: SigningKey) -> None:
        self.signers[signer.kid] = signer
        self._choice = None
        self._horizon = -1

    def missing(self, now: int) -> tuple[KeyRecord, ...]:
        """Records this agent must unwrap and does not hold yet: first the one the policy says
        signs now, then the newest (a restarted agent on a slow KMS must not spend its time on
        a key that is about to stop signing while the one that replaces it waits)."""
        wanted = signing_key(self.keyset, now)
        return tuple(
            sorted(
                (r for r in keys_to_load(self.keyset, now) if r.kid not in self.signers),
                key=lambda r: (wanted is None or r.kid != wanted.kid, -r.created_at),
            )
        )

    @property
    def loaded(self) -> frozenset[str]:
        return frozenset(self.signers)

    def current(self, now: int) -> SigningKey:
        """The signer to use at `now`, or NotReady with the reason."""
        choice = self._choice
        if choice is not None and now < choice.valid_until:
            return choice.signer
        return self._choose(now).signer

    def choice(self, now: int) -> Choice:
        choice = self._choice
        if choice is not None and now < choice.valid_until:
            return choice
        return self._choose(now)

    def _choose(self, now: int) -> Choice:
        if self.keyset is None:
            raise NotReady("no key set loaded yet")
        record, horizon = signing_schedule(self.keyset, now)
        if record is None:
            raise NotReady(
                f"no key of key-set generation {self.keyset.generation} may sign now "
                "(waiting for the leader to create or activate one)"
            )
        signer = self.signers.get(record.kid)
        if signer is None:
            signer = self._fallback(now, record)
        choice = Choice(signer=signer, preferred=record.kid, valid_until=horizon)
        self._choice = choice
        return choice

    def _fallback(self, now: int, wanted: KeyRecord) -> SigningKey:
        assert self.keyset is not None
        usable = [
            r
            for r in self.keyset.keys
            if r.kid in self.signers
            and r.withdrawn is None
            and r.activate_at is not None
            and r.activate_at <= now < r.deactivate_at
        ]
        if not usable:
            raise NotReady(f"key {wanted.kid} must sign now but is not unwrapped on this node yet")
        best = max(usable, key=lambda r: (r.activate_at or 0, r.created_at))
        return self.signers[best.kid]
