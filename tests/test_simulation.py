"""The deterministic cluster simulation: its checker catches planted bugs, and the real core
survives faults inside the budget."""

from __future__ import annotations

import os

import pytest
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from agent.timing import SECOND
from simulations.cluster import Bugs, Cluster, Violation
from simulations.machine import PROFILES, TIMING, ClusterMachine, stats


def scenario(bugs: Bugs, seed: int = 3) -> Cluster:
    """Bootstrap, pause the leader past its lease with a write in hand, then run 200 s."""
    cluster = Cluster(TIMING, seed=seed, bugs=bugs)
    cluster.run_until(5 * SECOND)
    leader = cluster.leader()
    assert leader is not None
    cluster.pause(leader, 3 * TIMING.lease_ttl)
    cluster.run_until(200 * SECOND)
    return cluster


def test_the_real_core_rotates_and_survives_the_scenario() -> None:
    cluster = scenario(Bugs())
    assert cluster.keys_created >= 6
    assert cluster.signatures > 4000


@pytest.mark.parametrize(
    ("bugs", "invariant"),
    [
        (Bugs(no_fencing=True), "fencing"),
        (Bugs(early_pruning=True), "not published"),
        (Bugs(no_grace=True), "cache may be"),
    ],
)
def test_each_planted_bug_is_caught(bugs: Bugs, invariant: str) -> None:
    with pytest.raises(Violation, match=invariant):
        scenario(bugs)


def test_one_seed_replays_a_run_exactly() -> None:
    def run(seed: int) -> tuple[int, int, int, str | None]:
        cluster = Cluster(TIMING, seed=seed)
        cluster.run_until(20 * SECOND)
        cluster.etcd_outage(4 * SECOND)
        cluster.run_until(120 * SECOND)
        return cluster.events_run, cluster.signatures, cluster.keys_created, cluster.leader()

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_faults_inside_the_budget_never_break_signing() -> None:
    """The profile named by KEYQUORUM_SIM_PROFILE (default `ci`: >= 10^6 simulated events)."""
    before = stats["events"]
    profile = os.environ.get("KEYQUORUM_SIM_PROFILE", "ci")
    run_state_machine_as_test(ClusterMachine, settings=PROFILES[profile])
    if profile == "ci":
        assert stats["events"] - before >= 1_000_000


@pytest.mark.parametrize(
    "bugs",
    [Bugs(no_fencing=True), Bugs(early_pruning=True), Bugs(no_grace=True)],
    ids=["no_fencing", "early_pruning", "no_grace"],
)
def test_the_state_machine_finds_each_planted_bug_on_its_own(bugs: Bugs) -> None:
    machine = type("BuggyCluster", (ClusterMachine,), {"bugs": bugs})
    with pytest.raises(Violation):
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=200,
                stateful_step_count=50,
                deadline=None,
                derandomize=True,
                report_multiple_bugs=False,
                phases=[Phase.generate],  # finding is the claim here; shrinking takes minutes
            ),
        )
