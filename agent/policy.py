"""The rotation policy: a pure function from (key set, members, timing, now) to decisions.

Theory of operation
-------------------
Key states are derived, never stored (DESIGN.md §2):

    pending  -> created; published; not yet signing (activate_at unset or in the future)
    active   -> the newest non-withdrawn key with activate_at <= now < deactivate_at
    retired  -> activated before, but not the active key (superseded, rolled back, or past
                deactivate_at); still published
    expired  -> now >= expires_at; unpublished; the leader drops the record
    revoked  -> withdrawn by an operator; unpublished at once; never signs again

Every key's times are fixed by the leader when it creates the key:
    deactivate_at = created_at + key_ttl - max_token_ttl - max_clock_skew
    expires_at    = created_at + key_ttl
so anything a key signs (at most max_token_ttl long, on a clock at most max_clock_skew off) is
invalid before the key leaves the published set (DESIGN.md §9.4).

The leader's decisions (`evaluate`), in order:
    1. drop every expired record that no live member reports signing with;
    2. if nothing can sign now or later, create a key that activates at once (bootstrap/emergency);
    3. give each unscheduled pending key its activation time once every live member reports it
       loaded (propagation-gated activation), never before created_at + grace_period; if the
       active key is about to stop signing, activate without the stragglers;
    4. when the newest key is within rotation_threshold of its expiry and has no successor,
       create the successor (pending, activation unscheduled).

The operator's edits (`rotate_now`, `rollback`, `revoke`) are pure too. This module does no I/O and
reads no clock: `now` is always a parameter, so the daemon and the simulator run the same code.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from agent.keyset import KeyRecord, KeySet, with_activation, with_withdrawal
from agent.timing import SECOND, Timing


class KeyState(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    RETIRED = "retired"
    EXPIRED = "expired"
    REVOKED = "revoked"


PUBLISHED_STATES = frozenset({KeyState.PENDING, KeyState.ACTIVE, KeyState.RETIRED})


class PolicyRefusal(ValueError):
    """An operator request the policy will not carry out; the message says why."""


@dataclass(frozen=True, slots=True)
class MemberView:
    """What one live member reports about itself (DESIGN.md §3, members/<node_id>)."""

    node_id: str
    loaded: frozenset[str]
    signing: str | None


@dataclass(frozen=True, slots=True)
class CreateKey:
    """Create a new key with these times (activate_at None: to be scheduled when gated)."""

    created_at: int
    activate_at: int | None
    deactivate_at: int
    expires_at: int
    reason: str


@dataclass(frozen=True, slots=True)
class Activate:
    kid: str
    at: int
    reason: str


@dataclass(frozen=True, slots=True)
class Drop:
    kid: str
    reason: str


Action = CreateKey | Activate | Drop


@dataclass(frozen=True, slots=True)
class Plan:
    """What the leader must do now, why, and when to look again."""

    actions: tuple[Action, ...]
    reason: str
    next_check_at: int


# ---- derived states ----------------------------------------------------------------------------


def signing_key(keyset: KeySet | None, now: int) -> KeyRecord | None:
    """The key that signs at `now`: the newest activated, unwithdrawn key still in its window."""
    best: KeyRecord | None = None
    if keyset is None:
        return None
    for record in keyset.keys:
        if (
            record.withdrawn is None
            and record.activate_at is not None
            and record.activate_at <= now < record.deactivate_at
            and (best is None or _activation_order(record) > _activation_order(best))
        ):
            best = record
    return best


def signing_schedule(keyset: KeySet | None, now: int) -> tuple[KeyRecord | None, int]:
    """The signing key at `now` and the first instant after `now` at which that may change.

    Agents cache the answer on the hot path and recompute only when the instant passes.
    """
    current = signing_key(keyset, now)
    horizon = _FAR_FUTURE
    if keyset is not None:
        for record in keyset.keys:
            if record.activate_at is not None and record.activate_at > now:
                horizon = min(horizon, record.activate_at)
            if record.deactivate_at > now:
                horizon = min(horizon, record.deactivate_at)
    return current, horizon


def key_state(keyset: KeySet, record: KeyRecord, now: int) -> KeyState:
    if record.withdrawn == "revoked":
        return KeyState.REVOKED
    if now >= record.expires_at:
        return KeyState.EXPIRED
    active = signing_key(keyset, now)
    if active is not None and active.kid == record.kid:
        return KeyState.ACTIVE
    if record.withdrawn is None and (record.activate_at is None or now < record.activate_at):
        return KeyState.PENDING
    return KeyState.RETIRED


def published_keys(keyset: KeySet | None, now: int) -> tuple[KeyRecord, ...]:
    """Keys a verifier must be able to find (pending, active, retired), oldest first."""
    if keyset is None:
        return ()
    return tuple(r for r in keyset.keys if r.withdrawn != "revoked" and now < r.expires_at)


def keys_to_load(keyset: KeySet | None, now: int) -> tuple[KeyRecord, ...]:
    """Keys an agent must hold unwrapped: every unrevoked key that may sign now or later."""
    if keyset is None:
        return ()
    return tuple(r for r in keyset.keys if r.withdrawn != "revoked" and now < r.deactivate_at)


def jwks_max_age(keyset: KeySet | None, now: int, timing: Timing) -> int:
    """Cache lifetime (whole seconds) for the JWKS: up to the next predictable change of the
    published set, never more than jwks_max_age, never less than one second."""
    limit = timing.jwks_max_age
    if keyset is not None:
        for record in published_keys(keyset, now):
            limit = min(limit, record.expires_at - now)
        newest = _newest_unwithdrawn(keyset, now)
        if newest is not None and _awaiting_successor(newest, now):
            limit = min(limit, newest.expires_at - timing.rotation_threshold - now)
    return max(1, limit // SECOND)


def vouched_max_age(
    keyset: KeySet | None, now: int, timing: Timing, confirmed_at: int | None
) -> int | None:
    """The JWKS max-age (whole seconds; 0: use it now, do not cache it) an agent whose view of the
    key set was last confirmed current at `confirmed_at` can vouch for; None when it cannot vouch
    for a JWKS at all.

    A key this agent has not seen was created after `confirmed_at`, so it activates no earlier
    than confirmed_at + grace_period (give or take the clock skew on both sides): a verifier may
    cache this JWKS only until then, and past that moment the agent must not serve one (a
    partitioned agent would hand verifiers a key set missing the key the others sign with).
    `confirmed_at` None: a single node, whose own view is the truth. No key set at all (the
    store has not been read yet): nothing to vouch for — an empty JWKS cached by a verifier
    would fail every token for its max-age (found by the simulation: an agent restarted during
    an etcd quorum loss served one)."""
    if keyset is None:
        return None
    max_age = jwks_max_age(keyset, now, timing)
    if confirmed_at is None:
        return max_age
    budget = confirmed_at + timing.grace_period - 2 * timing.max_clock_skew - now
    if budget <= 0:
        return None
    return min(max_age, budget // SECOND)


# ---- the leader's decisions --------------------------------------------------------------------


def evaluate(
    keyset: KeySet | None,
    now: int,
    timing: Timing,
    members: Mapping[str, MemberView] | None = None,
    seen: Mapping[str, int] | None = None,
) -> Plan:
    """Decide what the leader must do at `now`. `members` None means membership is not tracked
    (every gate passes); otherwise it maps each live member's id to its report. `seen` maps kids
    to when this agent first saw them in a committed key set (`Keyring.seen`): a pending key
    activates no earlier than a grace period after that either, because a record can reach the
    store well after its created_at (a slow KMS call, or a leader paused between creating the
    key and writing it whose lease etcd renewed meanwhile; found by the simulation), and the
    grace period is there for verifier caches to pick the key up."""
    actions: list[Action] = []
    notes: list[str] = []
    records = keyset.keys if keyset is not None else ()
    in_use = {m.signing for m in (members or {}).values() if m.signing is not None}

    for record in records:
        if now >= record.expires_at:
            if record.kid in in_use:
                notes.append(f"keeping expired {_short(record.kid)}: a member still signs with it")
            else:
                actions.append(
                    Drop(record.kid, f"{_short(record.kid)} expired at {_iso(record.expires_at)}")
                )

    active = signing_key(keyset, now)
    live = [r for r in records if r.withdrawn is None and now < r.deactivate_at]
    if not live:
        why = "bootstrap: the key set is empty" if not records else "emergency: no key can sign"
        actions.append(_create(now, timing, immediate=True, reason=why))
        return Plan(tuple(actions), why, now + timing.check_interval)

    if active is None:
        # Nothing signs (every live key is still pending): availability beats verifier caches.
        first = max(live, key=lambda r: r.created_at)
        actions.append(
            Activate(first.kid, now, f"{_short(first.kid)}: nothing signs; activating at once")
        )
    else:
        for record in live:
            if record.activate_at is not None:
                continue
            missing = sorted(
                m.node_id for m in (members or {}).values() if record.kid not in m.loaded
            )
            earliest = record.created_at + timing.grace_period
            if not missing:
                published = max(record.created_at, (seen or {}).get(record.kid, 0))
                at = max(now, published + timing.grace_period)
                actions.append(
                    Activate(
                        record.kid,
                        at,
                        f"{_short(record.kid)}: loaded by every member; activates {_iso(at)}",
                    )
                )
            elif now >= _force_deadline(active, timing) and now >= earliest:
                actions.append(
                    Activate(
                        record.kid,
                        now,
                        f"{_short(record.kid)}: activating without {', '.join(missing)}: "
                        f"{_short(active.kid)} stops signing {_iso(active.deactivate_at)}",
                    )
                )
            else:
                notes.append(f"{_short(record.kid)} waits for {', '.join(missing)} to load it")

    newest = _newest_unwithdrawn(keyset, now)
    due_at = _FAR_FUTURE
    if newest is not None and _awaiting_successor(newest, now):
        due_at = newest.expires_at - timing.rotation_threshold
        if now >= due_at:
            actions.append(
                _create(
                    now,
                    timing,
                    immediate=False,
                    reason=f"rotation due: {_short(newest.kid)} expires {_iso(newest.expires_at)}",
                )
            )
            due_at = _FAR_FUTURE

    next_check = min(now + timing.check_interval, max(due_at, now + 1))
    if actions:
        reason = "; ".join(a.reason for a in actions)
    elif active is not None:
        reason = f"{_short(active.kid)} signs until {_iso(active.deactivate_at)}"
        if due_at != _FAR_FUTURE:
            reason += f"; next key due {_iso(due_at)}"
    else:
        reason = "no key signs yet"
    if notes:
        reason += "; " + "; ".join(notes)
    return Plan(tuple(actions), reason, next_check)


def new_key_times(now: int, timing: Timing, *, immediate: bool) -> CreateKey:
    return _create(now, timing, immediate=immediate, reason="")


def _create(now: int, timing: Timing, *, immediate: bool, reason: str) -> CreateKey:
    return CreateKey(
        created_at=now,
        activate_at=now if immediate else None,
        deactivate_at=now + timing.sign_window(),
        expires_at=now + timing.key_ttl,
        reason=reason,
    )


def apply_plan_edits(keyset: KeySet, actions: tuple[Action, ...]) -> tuple[KeyRecord, ...]:
    """The records after the Activate and Drop actions (CreateKey needs I/O: the shell adds it)."""
    drops = {a.kid for a in actions if isinstance(a, Drop)}
    activations = {a.kid: a.at for a in actions if isinstance(a, Activate)}
    out = []
    for record in keyset.keys:
        if record.kid in drops:
            continue
        if record.kid in activations:
            record = with_activation(record, activations[record.kid])
        out.append(record)
    return tuple(out)


# ---- operator edits ----------------------------------------------------------------------------


def rotate_now(keyset: KeySet | None, now: int, timing: Timing) -> CreateKey:
    """A new pending key now (it activates after the grace period like any other)."""
    if keyset is not None:
        for record in keyset.keys:
            if record.withdrawn is None and (
                record.activate_at is None or record.activate_at > now
            ):
                when = "unscheduled" if record.activate_at is None else _iso(record.activate_at)
                raise PolicyRefusal(
                    f"key {record.kid} is already pending (activation {when}); "
                    "revoke it first to replace it"
                )
    return _create(
        now,
        timing,
        immediate=keyset is None or signing_key(keyset, now) is None,
        reason="operator requested rotation",
    )


def rollback(keyset: KeySet, now: int) -> tuple[KeyRecord, ...]:
    """Make the previously active key sign again; the current one is retired (still published)."""
    current = signing_key(keyset, now)
    if current is None:
        raise PolicyRefusal("no key is active, so there is nothing to roll back from")
    assert current.activate_at is not None
    previous = [
        r
        for r in keyset.keys
        if r.withdrawn is None
        and r.activate_at is not None
        and _activation_order(r) < _activation_order(current)
        and now < r.deactivate_at
    ]
    if not previous:
        raise PolicyRefusal(
            f"no earlier key can sign again (it must be unrevoked and before its deactivation); "
            f"{current.kid} stays active"
        )
    return tuple(
        with_withdrawal(r, "retired", now) if r.kid == current.kid else r for r in keyset.keys
    )


def rollback_to(keyset: KeySet, kid: str, now: int) -> tuple[KeyRecord, ...]:
    """Make `kid` (the key a secret store labels stable) sign again: every key activated after
    it is retired (still published, so what it signed still verifies)."""
    target = keyset.get(kid)
    if target is None:
        raise PolicyRefusal(f"the stable key {kid} is no longer in the key set")
    if (
        target.withdrawn is not None
        or target.activate_at is None
        or not target.activate_at <= now < target.deactivate_at
    ):
        raise PolicyRefusal(
            f"the stable key {kid} can no longer sign (withdrawn, never activated, or past its "
            "deactivation)"
        )
    current = signing_key(keyset, now)
    if current is None or current.kid == kid:
        raise PolicyRefusal(f"the stable key {kid} is already the signing key")
    newer = {
        r.kid
        for r in keyset.keys
        if r.withdrawn is None
        and r.activate_at is not None
        and r.activate_at <= now
        and _activation_order(r) > _activation_order(target)
    }
    return tuple(with_withdrawal(r, "retired", now) if r.kid in newer else r for r in keyset.keys)


def revoke(keyset: KeySet, kid: str, now: int) -> tuple[tuple[KeyRecord, ...], bool]:
    """Withdraw `kid` at once. Returns the records and whether a replacement key must be created
    and activated immediately (the revoked key was signing and no successor was waiting)."""
    target = keyset.get(kid)
    if target is None:
        raise PolicyRefusal(f"no key {kid} in the key set")
    if target.withdrawn == "revoked":
        raise PolicyRefusal(f"key {kid} is already revoked")
    was_signing = (active := signing_key(keyset, now)) is not None and active.kid == kid
    records = [with_withdrawal(r, "revoked", now) if r.kid == kid else r for r in keyset.keys]
    if not was_signing:
        return tuple(records), False
    successors = [
        r
        for r in records
        if r.withdrawn is None
        and now < r.deactivate_at
        and _activation_order(r) > _activation_order(target)
    ]
    if successors:
        chosen = max(successors, key=lambda r: r.created_at)
        records = [with_activation(r, now) if r.kid == chosen.kid else r for r in records]
        return tuple(records), False
    remaining = replace(keyset, keys=tuple(records))
    return tuple(records), signing_key(remaining, now) is None


# ---- helpers -----------------------------------------------------------------------------------

_FAR_FUTURE = 2**62


def _activation_order(record: KeyRecord) -> tuple[int, int]:
    return (
        record.activate_at if record.activate_at is not None else _FAR_FUTURE,
        record.created_at,
    )


def _newest_unwithdrawn(keyset: KeySet | None, now: int) -> KeyRecord | None:
    if keyset is None:
        return None
    candidates = [r for r in keyset.keys if r.withdrawn is None and now < r.deactivate_at]
    return max(candidates, key=lambda r: r.created_at, default=None)


def _awaiting_successor(newest: KeyRecord, now: int) -> bool:
    """True when the newest live key already signs (or signed), so no successor is pending."""
    return newest.activate_at is not None and newest.activate_at <= now


def _force_deadline(active: KeyRecord, timing: Timing) -> int:
    # Latest moment to activate a successor so every agent switches before the active key stops.
    return active.deactivate_at - timing.check_interval - 2 * timing.max_clock_skew


def _short(kid: str) -> str:
    return kid[:8]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
