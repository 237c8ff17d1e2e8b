"""`python -m simulations [--profile ci|long] [--examples N] [--steps N] [--no-shrink]`: run the
cluster state machine and print examples, events, events/s, simulated hours and violations.

`python -m simulations --planted`: for each planted bug, how long the `ci` profile takes to find
it, how long to find and shrink it, and how many steps the shrunk example has."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

from hypothesis import Phase, settings
from hypothesis.errors import Flaky
from hypothesis.stateful import run_state_machine_as_test

from simulations.cluster import Bugs, Violation
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
    parser.add_argument(
        "--no-shrink", action="store_true", help="report the first failing example as found"
    )
    parser.add_argument(
        "--planted", action="store_true", help="time finding and shrinking each planted bug"
    )
    args = parser.parse_args()
    overrides: dict[str, Any] = {}
    if args.examples is not None:
        overrides["max_examples"] = args.examples
    if args.steps is not None:
        overrides["stateful_step_count"] = args.steps
    if args.no_shrink:
        overrides["phases"] = [Phase.explicit, Phase.reuse, Phase.generate]
    chosen = settings(PROFILES[args.profile], **overrides)
    if args.planted:
        return planted(chosen)
    started = time.perf_counter()
    violations = 0
    try:
        run_state_machine_as_test(ClusterMachine, settings=chosen)
    except (Violation, AssertionError, Flaky) as exc:
        violations = 1
        print(f"VIOLATION: {exc}")
        for note in getattr(exc, "__notes__", []):
            print(note)
    elapsed = time.perf_counter() - started
    print(
        f"profile {args.profile}: examples {stats['examples']}, events {stats['events']:,} "
        f"({stats['events'] / elapsed:,.0f}/s), simulated {stats['simulated_ms'] / 3.6e6:.1f} h, "
        f"signatures {stats['signatures']:,}, verifications {stats['verifications']:,}, "
        f"keys {stats['keys']:,}, faults {stats['faults']:,}, violations {violations}, "
        f"{elapsed:.1f} s"
    )
    return violations


def planted(chosen: settings) -> int:
    """Each planted bug must be found; prints the time to find it and to shrink it."""
    missed = 0
    print(
        f"{'bug':<15} {'found in':>9} {'examples':>9} {'+shrunk in':>11} {'steps':>6}  first line"
    )
    for bug in [f.name for f in dataclasses.fields(Bugs)]:
        machine = type("BuggyCluster", (ClusterMachine,), {"bugs": Bugs(**{bug: True})})
        figures = []
        message = ""
        for phases in ([Phase.generate], [Phase.generate, Phase.shrink]):
            before = stats["examples"]
            started = time.perf_counter()
            try:
                run_state_machine_as_test(
                    machine,
                    settings=settings(chosen, phases=phases, report_multiple_bugs=False),
                )
            except Violation as exc:
                notes = "\n".join(getattr(exc, "__notes__", []))
                steps = sum(
                    1
                    for line in notes.splitlines()
                    if line.strip().startswith("state.") and "time_moves" not in line
                )
                figures.append((time.perf_counter() - started, stats["examples"] - before, steps))
                message = str(exc).splitlines()[0]
            else:
                figures.append((time.perf_counter() - started, stats["examples"] - before, -1))
        (found, examples, _), (shrunk, _, steps) = figures
        if steps < 0:
            missed += 1
            print(f"{bug:<15} NOT FOUND in {examples} examples ({found:.1f} s)")
            continue
        print(f"{bug:<15} {found:>8.1f}s {examples:>9} {shrunk:>10.1f}s {steps:>6}  {message[:90]}")
    return missed


if __name__ == "__main__":
    raise SystemExit(main())
