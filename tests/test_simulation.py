"""The deterministic cluster simulation: its checker catches planted bugs, the real core survives
faults inside the budget, and a fault beyond it is reported with the bound it broke."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

import simulations.cluster
from agent.policy import jwks_max_age
from agent.timing import SECOND
from simulations.cluster import Bugs, Cluster, Violation
from simulations.machine import PROFILES, TIMING, ClusterMachine, stats


def paused_between_kms_and_commit(bugs: Bugs, *, pause: int = 3600, seed: int = 3) -> Cluster:
    """Bootstrap; the leader freezes right after its KMS call, before its txn, past its lease;
    then 200 s of rotation."""
    cluster = Cluster(TIMING, seed=seed, bugs=bugs)
    cluster.run_for(5 * SECOND)
    cluster.trap_pause = pause
    cluster.run_for(200 * SECOND)
    return cluster


def test_the_real_core_rotates_and_survives_a_deposed_leaders_late_write() -> None:
    cluster = paused_between_kms_and_commit(Bugs())
    assert cluster.trap_pause is None  # the trap fired
    assert cluster.fenced == 1  # the late write reached etcd and the fence refused it
    assert cluster.keys_created >= 6
    assert cluster.signatures > 4000
    assert cluster.verifications > 4000
    assert cluster.excused == []


@pytest.mark.parametrize(
    ("bugs", "invariant"),
    [
        (Bugs(no_fencing=True), "fencing"),
        (Bugs(no_overrun=True), "availability"),
        (Bugs(early_pruning=True), "not published"),
        (Bugs(no_grace=True), "cache may be"),
        (Bugs(leak=True), "sealed"),
    ],
)
def test_each_planted_bug_is_caught_in_the_scenario(bugs: Bugs, invariant: str) -> None:
    with pytest.raises(Violation, match=invariant):
        paused_between_kms_and_commit(bugs)


def test_one_seed_replays_a_run_exactly() -> None:
    def run(seed: int) -> tuple[int, int, int, int, str | None]:
        cluster = Cluster(TIMING, seed=seed)
        cluster.run_for(20 * SECOND)
        cluster.etcd_outage(4 * SECOND)
        cluster.kms_throttle(10 * SECOND, 0.5)
        cluster.run_for(120 * SECOND)
        return (
            cluster.events_run,
            cluster.signatures,
            cluster.verifications,
            cluster.keys_created,
            cluster.leader(),
        )

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_a_fault_beyond_the_budget_is_reported_with_the_bound_it_broke() -> None:
    """An etcd quorum loss longer than the ride-through: signing stops once the active key's
    window closes, and the checker says which bound was exceeded instead of failing."""
    ride_through = TIMING.ride_through()
    cluster = Cluster(TIMING, seed=5)
    cluster.run_for(3 * SECOND)
    cluster.etcd_outage(3 * ride_through)
    cluster.run_for(TIMING.key_ttl + 3 * ride_through)
    assert cluster.excused, "signing should have failed during a 3x ride-through etcd outage"
    _, message, bounds = cluster.excused[0]
    assert "availability" in message
    assert any("etcd quorum loss" in b and "> ride-through" in b for b in bounds)


def test_the_same_outage_inside_the_budget_breaks_nothing() -> None:
    cluster = Cluster(TIMING, seed=5)
    cluster.run_for(3 * SECOND)
    length = TIMING.ride_through() - cluster.budget.recovery("etcd quorum loss") - SECOND
    cluster.etcd_outage(length)
    cluster.run_for(TIMING.key_ttl + 3 * length)
    assert cluster.excused == []
    assert cluster.keys_created >= 3


def test_verifiers_catch_an_agent_vouching_for_an_empty_jwks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by the state machine: an agent restarted during an etcd quorum loss has no key set;
    it used to serve an empty JWKS that verifiers may cache. Put the old behaviour back and the
    same run fails."""

    def scenario() -> Cluster:
        cluster = Cluster(TIMING, seed=0)
        cluster.run_for(3 * SECOND)
        for node in cluster.agents:
            cluster.crash(node, 100)
        cluster.etcd_outage(3 * SECOND)
        cluster.run_for(30 * SECOND)
        return cluster

    assert scenario().excused == []

    def old(keyset: object, now: int, timing: object, confirmed_at: int | None) -> int | None:
        return jwks_max_age(keyset, now, timing)  # type: ignore[arg-type]

    monkeypatch.setattr(simulations.cluster, "vouched_max_age", old)
    with pytest.raises(Violation, match=r"verifiability: .* \(generation 0\)"):
        scenario()


def test_faults_inside_the_budget_never_break_signing() -> None:
    """The profile named by KEYQUORUM_SIM_PROFILE (default `ci`: >= 10^6 simulated events)."""
    before = stats["events"]
    profile = os.environ.get("KEYQUORUM_SIM_PROFILE", "ci")
    run_state_machine_as_test(ClusterMachine, settings=PROFILES[profile])
    if profile == "ci":
        assert stats["events"] - before >= 1_000_000


@pytest.mark.parametrize(
    "bugs",
    [
        Bugs(no_fencing=True),
        Bugs(no_overrun=True),
        Bugs(early_pruning=True),
        Bugs(no_grace=True),
        Bugs(leak=True),
    ],
    ids=["no_fencing", "no_overrun", "early_pruning", "no_grace", "leak"],
)
def test_the_state_machine_finds_each_planted_bug_on_its_own(bugs: Bugs) -> None:
    machine = type("BuggyCluster", (ClusterMachine,), {"bugs": bugs})
    with pytest.raises(Violation):
        run_state_machine_as_test(
            machine,
            settings=settings(
                PROFILES["ci"],
                report_multiple_bugs=False,
                phases=[Phase.generate],  # finding is the claim here; `--planted` also shrinks
            ),
        )


def test_the_command_line_prints_its_figures() -> None:
    """`python -m simulations`, as the README runs it (a few examples)."""
    done = subprocess.run(
        [sys.executable, "-m", "simulations", "--examples", "3", "--steps", "10"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(
        r"profile ci: examples \d+, events [\d,]+ \([\d,]+/s\), simulated", done.stdout
    )
    assert "violations 0" in done.stdout
