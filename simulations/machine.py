"""The Hypothesis state machine that drives `simulations.cluster` with faults inside the budget.

Every fault the machine injects is sized from what the fault budget (`cluster.Budget`, derived from
the timing relations) has left, so by the timing relations none of them may break availability;
the online checker raises on any violation. Rules, all in integer milliseconds:

  random faults   etcd quorum loss, one etcd member down (etcd leader change and lease reset when it
                  led), etcd leader change, KMS outage, KMS throttling, a node cut from the KMS or
                  from etcd, crash-restart and pause (leader or follower; a follower's pause may be
                  of any length), clock skew, watch and request delays, a corrupt key-set write;
  targeted rules  strike the leader between its KMS call and its compare-and-swap (paused past its
                  lease), and strike at the instant of an activation or of a removal.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.timing import SECOND, Timing
from simulations.cluster import START, Bugs, Cluster

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
SKEW = TIMING.max_clock_skew // 2

# Settings profiles: `ci` (fixed seed, about a minute, >= 10^6 simulated events) and `long`
# (a nightly or local soak). Pick one with KEYQUORUM_SIM_PROFILE or `python -m simulations`.
PROFILES = {
    "ci": settings(max_examples=300, stateful_step_count=50, deadline=None, derandomize=True),
    "long": settings(max_examples=5000, stateful_step_count=100, deadline=None),
}

stats = {
    "examples": 0,
    "events": 0,
    "simulated_ms": 0,
    "signatures": 0,
    "keys": 0,
    "verifications": 0,
    "faults": 0,
    "excused": 0,
}


class ClusterMachine(RuleBasedStateMachine):
    cluster: Cluster
    bugs = Bugs()  # planted-bug meta-tests subclass with a bug switched on

    @initialize(seed=st.integers(0, 2**31))
    def start(self, seed: int) -> None:
        stats["examples"] += 1
        self.cluster = Cluster(TIMING, seed=seed, bugs=self.bugs)
        self.cluster.run_for(3 * SECOND)

    def teardown(self) -> None:
        if hasattr(self, "cluster"):
            c = self.cluster
            stats["events"] += c.events_run
            stats["simulated_ms"] += c.time - START
            stats["signatures"] += c.signatures
            stats["verifications"] += c.verifications
            stats["keys"] += c.keys_created
            stats["faults"] += len(c.faults)
            stats["excused"] += len(c.excused)

    # ---- budget ------------------------------------------------------------------------------

    def room(self, node: str | None = None) -> int:
        c = self.cluster
        return c.budget.remaining(c.faults, c.time, NODES, node)

    def fits(self, want: int, recovery: int, node: str | None = None) -> int:
        """The largest length <= want whose cost (length + recovery) fits the budget left."""
        return min(want, self.room(node) - recovery)

    # ---- time --------------------------------------------------------------------------------

    @rule(ms=st.integers(100, 2 * SECOND))
    def advance_a_little(self, ms: int) -> None:
        self.cluster.run_for(ms)

    @rule(ms=st.integers(2 * SECOND, 20 * SECOND))
    def advance(self, ms: int) -> None:
        self.cluster.run_for(ms)

    @rule(ms=st.integers(20 * SECOND, 2 * TIMING.key_ttl))
    def advance_through_rotations(self, ms: int) -> None:
        self.cluster.run_for(ms)

    # ---- rotation disruptions (they share the ride-through) -----------------------------------

    @precondition(lambda self: self.room() > self.cluster.budget.recovery("etcd quorum loss"))
    @rule(length=st.integers(100, 20 * SECOND))
    def etcd_quorum_loss(self, length: int) -> None:
        length = self.fits(length, self.cluster.budget.recovery("etcd quorum loss"))
        if length > 0:
            self.cluster.etcd_outage(length)

    @precondition(lambda self: self.room() > TIMING.check_interval)
    @rule(length=st.integers(100, 20 * SECOND))
    def kms_outage(self, length: int) -> None:
        length = self.fits(length, TIMING.check_interval)
        if length > 0:
            self.cluster.kms_outage(length)

    @precondition(lambda self: self.room() > TIMING.check_interval)
    @rule(length=st.integers(100, 20 * SECOND))
    def corrupt_keyset_write(self, length: int) -> None:
        length = self.fits(length, TIMING.check_interval)
        if length > 0:
            self.cluster.corrupt_keyset(length)

    def leader_loss_fits(self) -> bool:
        return self.room() >= self.cluster.budget.failover + TIMING.check_interval

    @precondition(lambda self: self.leader_loss_fits())
    @rule(downtime=st.integers(100, 30 * SECOND))
    def crash_the_leader(self, downtime: int) -> None:
        if (leader := self.cluster.leader()) is not None:
            self.cluster.crash(leader, downtime)

    @precondition(lambda self: self.leader_loss_fits())
    @rule(length=st.integers(100, 4 * TIMING.lease_ttl))
    def pause_the_leader(self, length: int) -> None:
        if (leader := self.cluster.leader()) is not None:
            self.cluster.pause(leader, length)

    @precondition(lambda self: self.leader_loss_fits())
    @rule(length=st.integers(100, 20 * SECOND))
    def partition_the_leader(self, length: int) -> None:
        if (leader := self.cluster.leader()) is not None:
            length = self.fits(length, 0, leader)
            if length > 0:
                self.cluster.partition(leader, length)

    # ---- free or node-local faults -------------------------------------------------------------

    @rule(member=st.integers(0, 2), length=st.integers(100, 30 * SECOND))
    def etcd_member_loss(self, member: int, length: int) -> None:
        etcd = self.cluster.etcd
        if len(etcd.members_up()) == 3:  # a second loss would be quorum loss: another rule
            self.cluster.etcd_member_down(member, length)

    @rule()
    def etcd_leader_change(self) -> None:
        self.cluster.etcd_leader_change()

    @rule(length=st.integers(100, 20 * SECOND), percent=st.integers(10, 90))
    def kms_throttling(self, length: int, percent: int) -> None:
        self.cluster.kms_throttle(length, percent / 100)

    @rule(node=st.sampled_from(NODES), length=st.integers(100, 20 * SECOND))
    def cut_a_follower_from_etcd(self, node: str, length: int) -> None:
        if node != self.cluster.leader():
            length = self.fits(length, 0, node)
            if length > 0:
                self.cluster.partition(node, length)

    @rule(node=st.sampled_from(NODES), length=st.integers(100, 20 * SECOND))
    def cut_a_follower_from_the_kms(self, node: str, length: int) -> None:
        if node != self.cluster.leader():
            length = self.fits(length, 0, node)
            if length > 0:
                self.cluster.cut_kms(node, length)

    @rule(node=st.sampled_from(NODES), downtime=st.integers(100, 30 * SECOND))
    def crash_a_follower(self, node: str, downtime: int) -> None:
        if node != self.cluster.leader():
            self.cluster.crash(node, downtime)

    @rule(node=st.sampled_from(NODES), length=st.integers(100, 90 * SECOND))
    def pause_a_follower(self, node: str, length: int) -> None:
        if node != self.cluster.leader():
            self.cluster.pause(node, length)

    @rule(
        clock=st.sampled_from([*NODES, "v1", "v2"]),
        skew=st.integers(-SKEW, SKEW),
    )
    def skew_a_clock(self, clock: str, skew: int) -> None:
        self.cluster.skew_clock(clock, skew)

    @rule(
        watch=st.integers(0, 2 * SECOND),
        request=st.integers(0, TIMING.lease_ttl // 3),
    )
    def delay_messages(self, watch: int, request: int) -> None:
        self.cluster.delay_messages(watch, request)

    # ---- targeted rules ------------------------------------------------------------------------

    @precondition(lambda self: self.leader_loss_fits())
    @rule(length=st.integers(TIMING.lease_ttl, 4 * TIMING.lease_ttl))
    def pause_the_leader_between_kms_and_commit(self, length: int) -> None:
        """The leader has created a key in the KMS and freezes before its txn, past its lease;
        the write goes out when it resumes, long after another agent took over."""
        c = self.cluster
        c.trap_pause = length
        deadline = c.time + TIMING.key_ttl
        while c.trap_pause is not None and c.time < deadline:
            c.run_for(SECOND)
        c.trap_pause = None

    @rule(
        instant=st.sampled_from(["activation", "removal"]),
        offset=st.integers(-TIMING.check_interval, TIMING.check_interval),
        fault=st.sampled_from(["crash leader", "pause leader", "cut follower", "etcd"]),
        length=st.integers(100, 10 * SECOND),
    )
    def strike_at_the_instant(self, instant: str, offset: int, fault: str, length: int) -> None:
        """Run to just before/after the next activation or removal, then strike."""
        c = self.cluster
        when = c.next_activation() if instant == "activation" else c.next_removal()
        if when is None or when + offset <= c.time:
            return
        c.run_until(when + offset)
        leader = c.leader()
        if fault in ("crash leader", "pause leader") and leader and self.leader_loss_fits():
            if fault == "crash leader":
                c.crash(leader, length)
            else:
                c.pause(leader, length)
        elif fault == "cut follower":
            follower = next((n for n in NODES if n != leader), None)
            if follower is not None and (n := self.fits(length, 0, follower)) > 0:
                c.partition(follower, n)
        elif fault == "etcd":
            n = self.fits(length, c.budget.recovery("etcd quorum loss"))
            if n > 0:
                c.etcd_outage(n)

    @invariant()
    def time_moves_forward(self) -> None:
        # The online checker raises Violation inside the run; this keeps runs honest about time.
        assert self.cluster.time >= 0
