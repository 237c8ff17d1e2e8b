"""Run the chaos suite outside pytest, for as long as you like (soak tests):

    .venv/bin/python tests/chaos/run.py --duration 600 [--dir DIR] [--agents 3]

It prints the summary table and exits non-zero if the checker found a violation; the event log
stays in DIR (a temporary directory by default, printed) for inspection.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent.parent)]

import checker  # noqa: E402
import nemesis  # noqa: E402
from harness import Cluster, EventLog  # noqa: E402


def run(workdir: Path, duration: float, agents: int = 3) -> checker.Verdict:
    log = EventLog(workdir / "events.jsonl")
    cluster = Cluster(workdir, log, agents=agents)
    started = time.monotonic()
    try:
        cluster.start()
        injected = nemesis.run(cluster, duration)
        cluster.wait_healthy()
        time.sleep(2.0)  # a last stretch of fault-free load
        dump = cluster.etcd_dump()
    finally:
        cluster.stop()
        log.close()
    verdict = checker.check(checker.load(workdir / "events.jsonl"), dump)
    verdict.summary["seconds"] = round(time.monotonic() - started, 1)
    verdict.summary["injected"] = injected
    return verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of faults")
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="keep the run here (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="kq-chaos-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    verdict = run(workdir, args.duration, args.agents)
    print(verdict.table())
    print(f"event log: {workdir / 'events.jsonl'}")
    for violation in verdict.violations:
        print(f"VIOLATION: {violation}")
    if verdict.ok and args.dir is None:
        shutil.rmtree(workdir / "etcd", ignore_errors=True)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
