"""Rotation timing: the durations that schedule every key, and the relations they must satisfy.

All durations are integer milliseconds, so the pure core and the simulator compute exactly the same
instants on every node. The relations are the ones in DESIGN.md §2; `Timing.validate` refuses a
configuration that breaks one, naming the relation and the settings involved, because a timing
mistake here shows up weeks later as tokens that fail to verify.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE


class TimingError(ValueError):
    """A timing configuration that cannot keep the invariants; the message names the relation."""


@dataclass(frozen=True, slots=True)
class Timing:
    """Durations (ms) that the leader uses to schedule keys and agents use to judge them.

    key_ttl: from a key's creation to its expiry (after which nothing it signed is valid).
    rotation_threshold: how long before the newest key's expiry its successor is created.
    grace_period: the least time between a key's creation and its activation.
    check_interval: how often the leader re-evaluates the policy.
    jwks_max_age: the longest JWKS cache lifetime told to verifiers (Cache-Control max-age).
    max_clock_skew: the largest clock difference assumed between any two nodes or verifiers.
    max_token_ttl: the longest lifetime of anything a key signs (JWT exp is capped to it).
    outage_budget: the etcd/KMS outage the cluster must ride through without losing signing.
    lease_ttl: the leader's lease (cluster mode).
    """

    key_ttl: int = 24 * HOUR
    rotation_threshold: int = 6 * HOUR
    grace_period: int = 2 * HOUR
    check_interval: int = 1 * MINUTE
    jwks_max_age: int = 10 * MINUTE
    max_clock_skew: int = 30 * SECOND
    max_token_ttl: int = 1 * HOUR
    outage_budget: int = 1 * HOUR
    lease_ttl: int = 10 * SECOND

    def validate(self) -> Timing:
        """Return self if every relation holds; else raise TimingError naming the broken one."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TimingError(f"{field.name} must be an integer number of milliseconds")
            floor = 0 if field.name in ("max_clock_skew", "outage_budget") else 1
            if value < floor:
                raise TimingError(f"{field.name} must be at least {floor} ms (got {value})")
        t = self
        checks: list[tuple[bool, str]] = [
            (
                t.grace_period >= t.jwks_max_age + t.max_clock_skew,
                "grace_period >= jwks_max_age + max_clock_skew "
                "(verifiers must have fetched a key before it signs)",
            ),
            (
                t.rotation_threshold
                > t.grace_period
                + t.outage_budget
                + t.max_token_ttl
                + t.check_interval
                + t.max_clock_skew,
                "rotation_threshold > grace_period + outage_budget + max_token_ttl "
                "+ check_interval + max_clock_skew (the successor must be active before the "
                "old key has to stop signing, even after an outage)",
            ),
            (
                t.key_ttl - t.rotation_threshold > t.grace_period,
                "key_ttl - rotation_threshold > grace_period "
                "(a key must activate before its own successor is prepared)",
            ),
            (
                t.max_token_ttl + t.max_clock_skew < t.key_ttl,
                "max_token_ttl + max_clock_skew < key_ttl (a key must be able to sign at all)",
            ),
            (
                2 * t.check_interval <= t.grace_period,
                "check_interval <= grace_period / 2 (the leader must look often enough)",
            ),
            (
                2 * t.lease_ttl <= t.grace_period,
                "lease_ttl <= grace_period / 2 (a lost leader must be replaced within a grace)",
            ),
        ]
        for ok, relation in checks:
            if not ok:
                raise TimingError(f"timing relation violated: {relation}; settings: {t.describe()}")
        return self

    def describe(self) -> str:
        """The settings in seconds, as an operator would write them in the config file."""
        return ", ".join(
            f"{f.name}={getattr(self, f.name) / SECOND:g}s" for f in dataclasses.fields(self)
        )

    def sign_window(self) -> int:
        """How long after creation a key may sign (its deactivation offset)."""
        return self.key_ttl - self.max_token_ttl - self.max_clock_skew

    def ride_through(self) -> int:
        """The longest etcd or backend outage during which no signature fails, worst case (it
        begins just as a rotation is due): the old key still signs for rotation_threshold -
        max_token_ttl - max_clock_skew, of which the successor needs a grace period to become
        active and the leader up to one check interval to notice. Always > outage_budget."""
        return (
            self.rotation_threshold
            - self.grace_period
            - self.max_token_ttl
            - self.check_interval
            - self.max_clock_skew
        )
