"""`python -m simulations [--profile ci|long] [--examples N] [--steps N]`: run the cluster state
machine and print examples, events, events/s, simulated hours and violations."""

from __future__ import annotations

import argparse
import os
import time

from hypothesis import settings
from hypothesis.errors import Flaky
from hypothesis.stateful import run_state_machine_as_test

from simulations.cluster import Violation
from simulations.machine import PROFILES, ClusterMachine, stats


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations")
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=os.environ.get("KEYQUORUM_SIM_PROFILE", "ci"),
    )
    parser.add_argument("--examples", type=int, help="override the profile's example count")
    parser.add_argument("--steps", type=int, help="override the profile's steps per example")
    args = parser.parse_args()
    chosen = PROFILES[args.profile]
    overrides = {}
    if args.examples is not None:
        overrides["max_examples"] = args.examples
    if args.steps is not None:
        overrides["stateful_step_count"] = args.steps
    started = time.perf_counter()
    violations = 0
    try:
        run_state_machine_as_test(ClusterMachine, settings=settings(chosen, **overrides))
    except (Violation, AssertionError, Flaky) as exc:
        violations = 1
        print(f"VIOLATION: {exc}")
    elapsed = time.perf_counter() - started
    print(
        f"profile {args.profile}: examples {stats['examples']}, events {stats['events']:,} "
        f"({stats['events'] / elapsed:,.0f}/s), simulated {stats['simulated_ms'] / 3.6e6:.1f} h, "
        f"signatures {stats['signatures']:,}, keys {stats['keys']:,}, violations {violations}, "
        f"{elapsed:.1f} s"
    )
    return violations


if __name__ == "__main__":
    raise SystemExit(main())
