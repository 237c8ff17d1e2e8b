"""The chaos suite in CI: real etcd, real agents, real faults, zero failed signatures.

One pass through every fault (tests/chaos/nemesis.py), then the offline checker over the event
log. Longer runs: tests/chaos/run.py --duration N.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from run import run

pytestmark = [pytest.mark.slow, pytest.mark.etcd]


def test_the_cluster_survives_every_fault_with_no_failed_or_unverifiable_signature(
    short_tmp: Path,
) -> None:
    verdict = run(short_tmp, duration=0)  # duration 0: each fault once
    print("\n" + verdict.table())
    assert verdict.summary["faults_total"] >= 12
    assert verdict.summary["signatures"] > 1000
    assert verdict.summary["rotations"] >= 5
    assert verdict.ok, "\n".join(verdict.violations)
