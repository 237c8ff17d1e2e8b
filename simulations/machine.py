"""The Hypothesis state machine that drives `simulations.cluster` with faults inside the budget.

Faults that disturb the leader (etcd outage, KMS outage, leader pause or crash) share one
disruption budget derived from the timing: each is at most `outage_budget - lease_ttl -
check_interval` long and the next one waits a full key lifetime, so by the timing relations no
fault here may break availability. Faults on followers (crash, pause) are free.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.timing import SECOND, Timing
from simulations.cluster import Bugs, Cluster

TIMING = Timing(
    key_ttl=60 * SECOND,
    rotation_threshold=30 * SECOND,
    grace_period=6 * SECOND,
    check_interval=SECOND,
    jwks_max_age=2 * SECOND,
    max_clock_skew=SECOND,
    max_token_ttl=5 * SECOND,
    outage_budget=10 * SECOND,
    lease_ttl=3 * SECOND,
).validate()

NODES = ["n1", "n2", "n3"]
MAX_DISRUPTION = TIMING.outage_budget - TIMING.lease_ttl - TIMING.check_interval

# Settings profiles: `ci` (fixed seed, about a minute, >= 10^6 simulated events) and `long`
# (a nightly or local soak). Pick one with KEYQUORUM_SIM_PROFILE or `python -m simulations`.
PROFILES = {
    "ci": settings(max_examples=500, stateful_step_count=50, deadline=None, derandomize=True),
    "long": settings(max_examples=5000, stateful_step_count=100, deadline=None),
}

stats = {"examples": 0, "events": 0, "simulated_ms": 0, "signatures": 0, "keys": 0}


class ClusterMachine(RuleBasedStateMachine):
    cluster: Cluster
    next_disruption: int
    bugs = Bugs()  # planted-bug meta-tests subclass with a bug switched on

    @initialize(seed=st.integers(0, 2**31))
    def start(self, seed: int) -> None:
        self.cluster = Cluster(TIMING, seed=seed, bugs=self.bugs)
        self.next_disruption = 0
        self.cluster.run_until(3 * SECOND)
        stats["examples"] += 1

    def teardown(self) -> None:
        if hasattr(self, "cluster"):
            stats["events"] += self.cluster.events_run
            stats["simulated_ms"] += self.cluster.time
            stats["signatures"] += self.cluster.signatures
            stats["keys"] += self.cluster.keys_created

    def disruption_allowed(self) -> bool:
        return self.cluster.time >= self.next_disruption

    def disrupted(self, length: int) -> None:
        self.next_disruption = self.cluster.time + length + TIMING.key_ttl

    @rule(ms=st.integers(100, 20 * SECOND))
    def advance(self, ms: int) -> None:
        self.cluster.run_until(self.cluster.time + ms)

    @precondition(lambda self: self.disruption_allowed())
    @rule(length=st.integers(100, MAX_DISRUPTION))
    def etcd_outage(self, length: int) -> None:
        self.cluster.etcd_outage(length)
        self.disrupted(length)

    @precondition(lambda self: self.disruption_allowed())
    @rule(length=st.integers(100, MAX_DISRUPTION))
    def kms_outage(self, length: int) -> None:
        self.cluster.kms_outage(length)
        self.disrupted(length)

    @rule()
    def etcd_leader_change(self) -> None:
        self.cluster.etcd_leader_change()

    @precondition(lambda self: self.disruption_allowed())
    @rule(length=st.integers(TIMING.lease_ttl, 4 * TIMING.lease_ttl))
    def pause_the_leader_past_its_lease(self, length: int) -> None:
        """Targeted: the leader freezes with a write in hand, past its lease."""
        leader = self.cluster.leader()
        if leader is not None:
            self.cluster.pause(leader, length)
            self.disrupted(TIMING.lease_ttl + TIMING.check_interval)

    @precondition(lambda self: self.disruption_allowed())
    @rule(downtime=st.integers(100, 30 * SECOND))
    def crash_the_leader(self, downtime: int) -> None:
        leader = self.cluster.leader()
        if leader is not None:
            self.cluster.crash(leader, downtime)
            self.disrupted(TIMING.lease_ttl + TIMING.check_interval)

    @rule(node=st.sampled_from(NODES), downtime=st.integers(100, 30 * SECOND))
    def crash_a_follower(self, node: str, downtime: int) -> None:
        if node != self.cluster.leader():
            self.cluster.crash(node, downtime)

    @rule(node=st.sampled_from(NODES), length=st.integers(100, 10 * SECOND))
    def pause_a_follower(self, node: str, length: int) -> None:
        if node != self.cluster.leader():
            self.cluster.pause(node, length)

    @invariant()
    def someone_can_sign(self) -> None:
        # The online checker raises Violation inside the run; this keeps runs honest about time.
        assert self.cluster.time >= 0
