"""The pure rotation core: properties over arbitrary valid timings and sequences of `now`."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.keyset import KeyRecord, KeySet
from agent.policy import (
    Activate,
    CreateKey,
    Drop,
    KeyState,
    MemberView,
    PolicyRefusal,
    apply_plan_edits,
    evaluate,
    jwks_max_age,
    key_state,
    published_keys,
    revoke,
    rollback,
    rollback_to,
    rotate_now,
    signing_key,
    vouched_max_age,
)
from agent.timing import SECOND, Timing, TimingError

T0 = 1_700_000_000_000


@st.composite
def timings(draw: st.DrawFn) -> Timing:
    """Valid timings built to satisfy every relation with a random slack in each."""
    skew = draw(st.integers(0, 2 * SECOND))
    jwks = draw(st.integers(SECOND, 10 * SECOND))
    check = draw(st.integers(SECOND // 2, 3 * SECOND))
    grace = max(jwks + skew, 2 * check) + draw(st.integers(0, 5 * SECOND))
    token = draw(st.integers(SECOND, 20 * SECOND))
    outage = draw(st.integers(0, 15 * SECOND))
    threshold = grace + outage + token + check + skew + draw(st.integers(1, 10 * SECOND))
    ttl = threshold + grace + draw(st.integers(1, 30 * SECOND))
    return Timing(
        key_ttl=ttl,
        rotation_threshold=threshold,
        grace_period=grace,
        check_interval=check,
        jwks_max_age=jwks,
        max_clock_skew=skew,
        max_token_ttl=token,
        outage_budget=outage,
        lease_ttl=max(1, grace // 2),
    ).validate()


class Leader:
    """A minimal shell around `evaluate`: it creates keys with fake kids and loads them at once."""

    def __init__(self, timing: Timing) -> None:
        self.timing = timing
        self.keyset: KeySet | None = None
        self.created = 0

    def tick(self, now: int) -> None:
        members = {"self": self.view(now)}
        plan = evaluate(self.keyset, now, self.timing, members)
        base = self.keyset or KeySet()
        records = list(apply_plan_edits(base, plan.actions))
        for action in plan.actions:
            if isinstance(action, CreateKey):
                records.append(self.record(action))
        if plan.actions:
            self.keyset = base.evolve(records, at=now, by="self", what=plan.reason)

    def view(self, now: int) -> MemberView:
        active = signing_key(self.keyset, now)
        loaded = frozenset(r.kid for r in (self.keyset.keys if self.keyset else ()))
        return MemberView("self", loaded, active.kid if active else None)

    def record(self, action: CreateKey) -> KeyRecord:
        self.created += 1
        return fake_record(f"k{self.created}", action)


def fake_record(kid: str, action: CreateKey) -> KeyRecord:
    return KeyRecord(
        kid=kid,
        alg="ES256",
        jwk={"kty": "EC", "kid": kid},
        private={"scheme": "test"},
        created_at=action.created_at,
        activate_at=action.activate_at,
        deactivate_at=action.deactivate_at,
        expires_at=action.expires_at,
    )


def check_instants(keyset: KeySet, start: int, end: int) -> list[int]:
    """Every instant in [start, end) at which the derived states can change, plus the ends."""
    points = {start, end - 1}
    for r in keyset.keys:
        for t in (r.activate_at, r.deactivate_at, r.expires_at):
            if t is not None:
                points.update(x for x in (t - 1, t) if start <= x < end)
    return sorted(points)


def run_leader(timing: Timing, gaps: list[int]) -> None:
    """Drive a leader through `gaps`, asserting the invariants at every instant that matters."""
    leader = Leader(timing)
    now = T0
    leader.tick(now)
    last_signed: dict[str, int] = {}
    first_signed: dict[str, int] = {}
    for gap in gaps:
        keyset = leader.keyset
        assert keyset is not None
        for t in check_instants(keyset, now, now + gap):
            active = signing_key(keyset, t)
            # Availability: exactly one key signs at every instant once started.
            assert active is not None, f"nothing signs at +{t - T0} ms"
            assert [r.kid for r in keyset.keys if key_state(keyset, r, t) == KeyState.ACTIVE] == [
                active.kid
            ]
            # The signing key is published.
            assert active in published_keys(keyset, t)
            last_signed[active.kid] = t
            first_signed.setdefault(active.kid, t)
            # Safe removal: a key stays published while anything it signed can still be valid.
            published = {r.kid for r in published_keys(keyset, t)}
            for kid, last in last_signed.items():
                if t < last + timing.max_token_ttl + timing.max_clock_skew:
                    assert kid in published, f"{kid} unpublished while its signatures are valid"
        now += gap
        leader.tick(now)
    # Verifiability: every key except the bootstrap one was published a whole verifier cache
    # lifetime (plus skew) before it first signed.
    assert leader.keyset is not None
    created = {r.kid: r.created_at for r in leader.keyset.keys}
    for kid, first in first_signed.items():
        if kid != "k1" and kid in created:
            assert first - created[kid] >= timing.jwks_max_age + timing.max_clock_skew


def gap_sequence(timing: Timing, data: st.DataObject, horizon: int) -> list[int]:
    """Leader check gaps (each at most check_interval): a drawn pattern repeated to `horizon`.
    Gaps are at least check_interval / 16 to keep the step count bounded."""
    low = max(1, timing.check_interval // 16)
    pattern = data.draw(
        st.lists(st.integers(low, timing.check_interval), min_size=1, max_size=40), label="gaps"
    )
    gaps: list[int] = []
    total = 0
    while total < horizon:
        gaps.extend(pattern)
        total += sum(pattern)
    return gaps


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timing=timings(), data=st.data())
def test_one_published_key_always_signs_when_the_leader_checks_on_time(
    timing: Timing, data: st.DataObject
) -> None:
    horizon = 4 * (timing.key_ttl - timing.rotation_threshold + timing.grace_period)
    run_leader(timing, gap_sequence(timing, data, horizon))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timing=timings(), data=st.data())
def test_signing_survives_one_outage_within_the_budget(timing: Timing, data: st.DataObject) -> None:
    horizon = 3 * (timing.key_ttl - timing.rotation_threshold + timing.grace_period)
    gaps = gap_sequence(timing, data, horizon)
    outage_at = data.draw(st.integers(0, len(gaps) - 1), label="outage_at")
    gaps.insert(outage_at, timing.outage_budget + timing.check_interval)
    run_leader(timing, gaps)


def test_a_bug_that_skips_rotation_is_caught_by_the_availability_property() -> None:
    """The property can fail: a leader that never creates a successor loses signing."""
    timing = Timing(
        key_ttl=30 * SECOND,
        rotation_threshold=15 * SECOND,
        grace_period=4 * SECOND,
        check_interval=SECOND,
        jwks_max_age=2 * SECOND,
        max_clock_skew=0,
        max_token_ttl=5 * SECOND,
        outage_budget=SECOND,
        lease_ttl=2 * SECOND,
    ).validate()
    with pytest.raises(AssertionError, match="nothing signs"):
        # A single gap far beyond the budget is what a stuck leader looks like.
        run_leader(timing, [SECOND] * 5 + [60 * SECOND])


# ---- example-based tests of each decision -----------------------------------------------------

FAST = Timing(
    key_ttl=60 * SECOND,
    rotation_threshold=30 * SECOND,
    grace_period=5 * SECOND,
    check_interval=SECOND,
    jwks_max_age=3 * SECOND,
    max_clock_skew=SECOND,
    max_token_ttl=10 * SECOND,
    outage_budget=5 * SECOND,
    lease_ttl=2 * SECOND,
).validate()


def started(now: int = T0) -> Leader:
    leader = Leader(FAST)
    leader.tick(now)
    return leader


def test_empty_key_set_bootstraps_a_key_that_signs_at_once() -> None:
    plan = evaluate(None, T0, FAST)
    (create,) = plan.actions
    assert isinstance(create, CreateKey)
    assert create.activate_at == T0
    assert create.expires_at == T0 + FAST.key_ttl
    assert create.deactivate_at == T0 + FAST.key_ttl - FAST.max_token_ttl - FAST.max_clock_skew
    assert "bootstrap" in plan.reason


def test_successor_is_created_at_the_rotation_threshold_and_not_before() -> None:
    leader = started()
    due = T0 + FAST.key_ttl - FAST.rotation_threshold
    assert evaluate(leader.keyset, due - 1, FAST).actions == ()
    plan = evaluate(leader.keyset, due, FAST)
    assert [type(a) for a in plan.actions] == [CreateKey]
    assert plan.actions[0].activate_at is None  # gated: scheduled once members load it
    assert evaluate(leader.keyset, due - 10 * SECOND, FAST).next_check_at <= due


def test_activation_waits_for_every_member_and_never_precedes_the_grace_period() -> None:
    leader = started()
    due = T0 + FAST.key_ttl - FAST.rotation_threshold
    leader.tick(due)
    assert leader.keyset is not None
    pending = leader.keyset.keys[-1]
    everyone = frozenset(r.kid for r in leader.keyset.keys)
    members = {
        "a": MemberView("a", everyone, "k1"),
        "b": MemberView("b", frozenset({"k1"}), "k1"),
    }
    plan = evaluate(leader.keyset, due + SECOND, FAST, members)
    assert plan.actions == ()
    assert "waits for b" in plan.reason
    members["b"] = MemberView("b", everyone, "k1")
    (activate,) = evaluate(leader.keyset, due + SECOND, FAST, members).actions
    assert activate == Activate(pending.kid, due + FAST.grace_period, activate.reason)


def test_a_straggler_cannot_hold_activation_past_the_old_keys_deadline() -> None:
    leader = started()
    due = T0 + FAST.key_ttl - FAST.rotation_threshold
    leader.tick(due)
    assert leader.keyset is not None
    members = {"b": MemberView("b", frozenset({"k1"}), "k1")}
    old = leader.keyset.get("k1")
    assert old is not None
    late = old.deactivate_at - FAST.check_interval - 2 * FAST.max_clock_skew
    assert evaluate(leader.keyset, late - 1, FAST, members).actions == ()
    (activate,) = evaluate(leader.keyset, late, FAST, members).actions
    assert isinstance(activate, Activate)
    assert "without b" in activate.reason


def test_expired_key_is_dropped_only_when_no_member_signs_with_it() -> None:
    leader = started()
    for t in range(T0, T0 + 2 * FAST.key_ttl, FAST.check_interval):
        leader.tick(t)
    assert leader.keyset is not None
    assert "k1" not in {r.kid for r in leader.keyset.keys}
    # Re-create a set where k1 is expired but a member still reports signing with it.
    leader2 = started()
    assert leader2.keyset is not None
    after = T0 + FAST.key_ttl
    sticky = {"x": MemberView("x", frozenset({"k1"}), "k1")}
    assert not any(
        isinstance(a, Drop) for a in evaluate(leader2.keyset, after, FAST, sticky).actions
    )
    assert any(isinstance(a, Drop) for a in evaluate(leader2.keyset, after, FAST).actions)


def advanced(leader: Leader, until: int) -> int:
    t = T0
    while t < until:
        leader.tick(t)
        t += FAST.check_interval
    return t


def test_rollback_makes_the_previous_key_sign_and_keeps_the_newer_one_published() -> None:
    leader = started()
    now = advanced(
        leader, T0 + FAST.key_ttl - FAST.rotation_threshold + FAST.grace_period + 2 * SECOND
    )
    keyset = leader.keyset
    assert keyset is not None
    current = signing_key(keyset, now)
    assert current is not None and current.kid == "k2"
    rolled = keyset.evolve(rollback(keyset, now), at=now, by="op", what="rollback")
    assert signing_key(rolled, now).kid == "k1"  # type: ignore[union-attr]
    assert key_state(rolled, rolled.get("k2"), now) == KeyState.RETIRED  # type: ignore[arg-type]
    assert "k2" in {r.kid for r in published_keys(rolled, now)}


def test_rollback_refuses_when_there_is_no_earlier_key() -> None:
    leader = started()
    assert leader.keyset is not None
    with pytest.raises(PolicyRefusal, match="no earlier key"):
        rollback(leader.keyset, T0 + SECOND)


def three_active_keys() -> KeySet:
    """k1, k2, k3 activated at 0, 10 s, 20 s, all signing-eligible until 100 s."""
    return KeySet(
        keys=tuple(
            fake_record(kid, CreateKey(at, at, 100 * SECOND, 120 * SECOND, "test"))
            for kid, at in (("k1", 0), ("k2", 10 * SECOND), ("k3", 20 * SECOND))
        )
    )


def test_rollback_to_the_stable_key_retires_every_newer_key_unlike_plain_rollback() -> None:
    keyset, now = three_active_keys(), 25 * SECOND
    assert signing_key(keyset, now).kid == "k3"  # type: ignore[union-attr]
    back = KeySet(keys=rollback_to(keyset, "k1", now))
    assert signing_key(back, now).kid == "k1"  # type: ignore[union-attr]
    assert {r.kid for r in back.keys if r.withdrawn == "retired"} == {"k2", "k3"}
    assert {r.kid for r in published_keys(back, now)} == {"k1", "k2", "k3"}
    plain = KeySet(keys=rollback(keyset, now))
    assert signing_key(plain, now).kid == "k2"  # type: ignore[union-attr]


def test_rollback_to_refuses_a_stable_key_that_cannot_sign_or_already_does() -> None:
    keyset = three_active_keys()
    with pytest.raises(PolicyRefusal, match="already the signing key"):
        rollback_to(keyset, "k3", 25 * SECOND)
    with pytest.raises(PolicyRefusal, match="can no longer sign"):
        rollback_to(keyset, "k1", 100 * SECOND)
    with pytest.raises(PolicyRefusal, match="no longer in the key set"):
        rollback_to(keyset, "k9", 25 * SECOND)


def test_revoking_the_signing_key_activates_the_pending_successor_at_once() -> None:
    leader = started()
    due = T0 + FAST.key_ttl - FAST.rotation_threshold
    leader.tick(due)
    assert leader.keyset is not None
    records, need_new = revoke(leader.keyset, "k1", due + 1)
    revoked = leader.keyset.evolve(records, at=due + 1, by="op", what="revoke")
    assert not need_new
    assert signing_key(revoked, due + 1).kid == "k2"  # type: ignore[union-attr]
    assert "k1" not in {r.kid for r in published_keys(revoked, due + 1)}


def test_revoking_the_only_key_asks_for_an_immediate_replacement() -> None:
    leader = started()
    assert leader.keyset is not None
    records, need_new = revoke(leader.keyset, "k1", T0 + 1)
    assert need_new
    assert records[0].withdrawn == "revoked"
    with pytest.raises(PolicyRefusal, match="already revoked"):
        revoke(KeySet(keys=records), "k1", T0 + 2)
    with pytest.raises(PolicyRefusal, match="no key"):
        revoke(KeySet(keys=records), "nope", T0 + 2)


def test_manual_rotation_refuses_while_a_key_is_pending() -> None:
    leader = started()
    create = rotate_now(leader.keyset, T0 + SECOND, FAST)
    assert create.activate_at is None
    leader.keyset = leader.keyset.evolve(  # type: ignore[union-attr]
        [*leader.keyset.keys, fake_record("k9", create)],  # type: ignore[union-attr]
        at=T0 + SECOND,
        by="op",
        what="rotate",
    )
    with pytest.raises(PolicyRefusal, match="already pending"):
        rotate_now(leader.keyset, T0 + 2 * SECOND, FAST)


def test_jwks_max_age_never_exceeds_the_configured_cache_lifetime() -> None:
    leader = started()
    assert jwks_max_age(leader.keyset, T0, FAST) == FAST.jwks_max_age // SECOND
    due = T0 + FAST.key_ttl - FAST.rotation_threshold
    assert jwks_max_age(leader.keyset, due - 1500, FAST) == 1
    assert jwks_max_age(None, T0, FAST) == FAST.jwks_max_age // SECOND


@pytest.mark.parametrize(
    ("change", "relation"),
    [
        ({"grace_period": 1000, "jwks_max_age": 5000}, "grace_period >= jwks_max_age"),
        ({"rotation_threshold": 2 * 3600 * SECOND}, "rotation_threshold >"),
        ({"key_ttl": 7 * 3600 * SECOND}, "key_ttl - rotation_threshold"),
        ({"check_interval": 5400 * SECOND}, "check_interval <="),
        ({"lease_ttl": 5400 * SECOND}, "lease_ttl <="),
        ({"key_ttl": 0}, "key_ttl must be at least"),
    ],
)
def test_timing_that_breaks_a_relation_is_refused_naming_it(
    change: Mapping[str, int], relation: str
) -> None:
    import dataclasses

    with pytest.raises(TimingError, match=relation.replace("(", r"\(")):
        dataclasses.replace(Timing(), **change).validate()


def test_a_key_published_late_still_waits_a_whole_grace_period_after_it_was_seen() -> None:
    """A leader paused between creating a key and writing it (its lease renewed by an etcd
    leader change) publishes a record whose created_at is old: the grace period, which is there
    for verifier caches, counts from when the key was first seen in the key set."""
    leader = started()
    due = T0 + FAST.key_ttl - FAST.rotation_threshold
    leader.tick(due)
    assert leader.keyset is not None
    pending = leader.keyset.keys[-1]
    everyone = frozenset(r.kid for r in leader.keyset.keys)
    members = {"a": MemberView("a", everyone, "k1")}
    seen_late = due + FAST.grace_period - SECOND  # the write landed this late
    (activate,) = evaluate(
        leader.keyset, seen_late, FAST, members, {pending.kid: seen_late}
    ).actions
    assert activate == Activate(pending.kid, seen_late + FAST.grace_period, activate.reason)
    (on_time,) = evaluate(leader.keyset, seen_late, FAST, members, {pending.kid: due}).actions
    assert isinstance(on_time, Activate) and on_time.at == due + FAST.grace_period


def test_no_key_set_means_no_jwks_to_vouch_for() -> None:
    """An empty JWKS cached by a verifier would fail every token for its max-age."""
    assert vouched_max_age(None, T0, FAST, None) is None
    assert vouched_max_age(None, T0, FAST, T0) is None
    leader = started()
    assert vouched_max_age(leader.keyset, T0, FAST, None) == jwks_max_age(leader.keyset, T0, FAST)
    stale = T0 - FAST.grace_period + 2 * FAST.max_clock_skew
    assert vouched_max_age(leader.keyset, T0, FAST, stale) is None
