"""`python -m benchmarks`: the agent's signing throughput and latency against its limit and peers.

Sections (all by default; `--sections` picks some):

  throughput  one table, side by side in one run: raw in-process signing (the limit, one and
              two threads), the agent over its socket (HTTP and framed; sequential, 16
              connections, 16 pipelined on one connection, batches of 64; one process and
              `--workers` processes), ssh-agent (OpenSSH, over its socket) and an OpenBao
              transit server signing the same 200-byte payloads, for ES256 and EdDSA. Each
              figure is the median of `--repeat` runs of `--duration` seconds: signatures/s,
              the ratio to raw signing of the same algorithm, p50/p99 request latency, and CPU
              per signature of the server (with its workers) and of the client.
  rotation    sign at full rate through a rotation: failed requests, share slower than 2x median
  cluster     three agents on a 3-member etcd: key-set propagation and leader failover times
  memory      agent RSS with 1, 10 and 100 published keys
  fanout      100 simulated members watching the prefix: the cost of one key-set write

`--json FILE` writes every figure for tracking. The client shares the machine with the servers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from agent.demo import agent_process
from benchmarks import scenarios
from benchmarks.load import (
    Figure,
    agent_load,
    children,
    effective_cores,
    measured,
    median_of,
    processes_load,
    raw,
    ssh_agent_load,
    transit_load,
)
from benchmarks.peers import OpenBao, SshAgent

ALGS = ("ES256", "EdDSA")
SECTIONS = ("throughput", "rotation", "cluster", "memory", "fanout")


def write_config(directory: Path, alg: str, workers: int = 1, **keys: str) -> Path:
    """A single-node agent (file store, local KEK) whose keys never rotate on their own."""
    state = directory / "state"
    timing = {
        "key_ttl": "1h", "rotation_threshold": "25m", "grace_period": "10m",
        "check_interval": "1m", "jwks_max_age": "1m", "max_clock_skew": "1s",
        "max_token_ttl": "5m", "outage_budget": "5m", "lease_ttl": "10s", **keys,
    }  # fmt: skip
    config = directory / "agent.toml"
    config.write_text(
        f'node_id = "bench"\nstate_dir = "{state}"\nlog_level = "warning"\n\n'
        f'[socket]\npath = "{directory / "agent.sock"}"\nworkers = {workers}\n\n'
        f'[store]\nkind = "file"\npath = "{state / "keyset.store"}"\n\n'
        f'[backend]\nkind = "local"\nkek_file = "{state / "kek"}"\n\n'
        f'[keys]\nalgorithm = "{alg}"\n'
        + "".join(f'{name} = "{value}"\n' for name, value in timing.items())
        + '\n[jwt]\ndefault_ttl = "5m"\n'
    )
    return config


@contextmanager
def agent(alg: str, workers: int = 1, **keys: str) -> Iterator[tuple[Path, int]]:
    """A running agent: (socket path, pid); stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="kq-bench-", dir="/tmp") as tmp:
        directory = Path(tmp)
        socket_path = directory / "agent.sock"
        with agent_process(write_config(directory, alg, workers, **keys), socket_path) as proc:
            deadline = time.monotonic() + 20
            while len(children(proc.pid)) < workers - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            if workers > 1:
                time.sleep(1.0)  # the workers import, connect back and get their keys
            yield socket_path, proc.pid


class Table:
    def __init__(self, duration: float, repeat: int) -> None:
        self.duration = duration
        self.repeat = repeat
        self.rows: list[dict[str, Any]] = []

    def add(self, alg: str, case: str, run: Callable[[], Figure]) -> Figure:
        figure = median_of([run() for _ in range(self.repeat)])
        self.rows.append({"alg": alg, "case": case, **figure.as_dict()})
        print(f"  {alg:6} {case:42} {figure.ops:10,.0f} sig/s", file=sys.stderr, flush=True)
        return figure

    def load(
        self,
        alg: str,
        case: str,
        pids: list[int],
        loader: Callable[..., tuple[int, list[float], int]],
        *args: Any,
        **kwargs: Any,
    ) -> Figure:
        """A socket load (`loader(*args, duration, **kwargs)`) measured with the server `pids`."""
        return self.add(
            alg, case, lambda: measured(lambda: loader(*args, self.duration, **kwargs), pids)
        )

    def ratios(self) -> None:
        limits = {r["alg"]: r["ops"] for r in self.rows if r["case"] == "raw in-process (limit)"}
        for row in self.rows:
            row["ratio"] = row["ops"] / limits[row["alg"]]

    def print(self) -> None:
        print(
            f"{'alg':6} {'case':42} {'sig/s':>9} {'ratio':>6} {'p50 us':>7} {'p99 us':>7} "
            f"{'srv us':>7} {'cli us':>7}"
        )

        def num(value: float | None) -> str:
            return "-" if value is None else f"{value:,.0f}"

        for row in sorted(self.rows, key=lambda r: ALGS.index(r["alg"])):
            print(
                f"{row['alg']:6} {row['case']:42} {row['ops']:9,.0f} {row['ratio']:6.3f} "
                f"{num(row['p50_us']):>7} {num(row['p99_us']):>7} "
                f"{num(row['server_cpu_us']):>7} {num(row['client_cpu_us']):>7}"
            )

    def find(self, alg: str, case: str) -> dict[str, Any]:
        return next(r for r in self.rows if r["alg"] == alg and r["case"] == case)


def throughput(table: Table, workers: int, directory: Path) -> None:
    d = table.duration
    for alg in ALGS:
        table.add(alg, "raw in-process (limit)", partial(raw, alg, d))
        table.add(alg, "raw in-process, 2 threads", partial(raw, alg, d, threads=2))
        with agent(alg) as (sock, pid):
            table.load(alg, "agent HTTP, 1 connection", [pid], agent_load, sock, protocol="http")
            table.load(alg, "agent HTTP, 16 connections", [pid], agent_load, sock,
                       protocol="http", connections=16)  # fmt: skip
            table.load(alg, "agent, 1 connection", [pid], agent_load, sock)
            table.load(alg, "agent, 16 connections", [pid], agent_load, sock, connections=16)
            table.load(alg, "agent, 1 connection, 16 pipelined", [pid], agent_load, sock,
                       in_flight=16)  # fmt: skip
            table.load(alg, "agent, batch 64", [pid], agent_load, sock, batch=64)
            table.load(alg, "agent, 16 client processes", [pid], processes_load, "agent", sock)
        if workers > 1:
            with agent(alg, workers) as (sock, pid):
                table.load(alg, f"agent x{workers} processes, 16 connections", [pid],
                           agent_load, sock, connections=16)  # fmt: skip
                table.load(alg, f"agent x{workers} processes, batch 64, 2 conns", [pid],
                           agent_load, sock, batch=64, connections=2)  # fmt: skip
                table.load(alg, f"agent x{workers} processes, 16 client processes", [pid],
                           processes_load, "agent", sock)  # fmt: skip
    with SshAgent(directory) as ssh:
        for alg in ALGS:
            for case, conns, window in (
                ("ssh-agent, 1 connection", 1, 1),
                ("ssh-agent, 16 connections", 16, 1),
                ("ssh-agent, 1 connection, 16 pipelined", 1, 16),
            ):
                table.load(alg, case, [ssh.pid], ssh_agent_load, ssh.socket, ssh.blobs[alg],
                           connections=conns, window=window)  # fmt: skip
            table.load(alg, "ssh-agent, 16 client processes", [ssh.pid], processes_load,
                       "ssh-agent", ssh.socket, blob=ssh.blobs[alg])  # fmt: skip
    with OpenBao(directory) as bao:
        for alg in ALGS:
            for case, conns, batch in (
                ("OpenBao transit, 1 connection", 1, 1),
                ("OpenBao transit, 16 connections", 16, 1),
                ("OpenBao transit, batch 64", 1, 64),
            ):
                table.load(alg, case, [bao.pid], transit_load, bao, alg,
                           connections=conns, batch=batch)  # fmt: skip
    table.ratios()


def targets(table: Table, workers: int) -> list[dict[str, Any]]:
    """The issue's targets against this run's figures (ES256 unless named)."""
    out: list[dict[str, Any]] = []

    def target(name: str, value: float, goal: float, better: str, unit: str = "x") -> None:
        met = value >= goal if better == "higher" else value <= goal
        out.append({"target": name, "value": value, "goal": goal, "met": met})
        sign = ">=" if better == "higher" else "<"
        print(f"  {name:68} {value:8.2f}{unit} (goal {sign} {goal:g}{unit}) "
              f"{'met' if met else 'NOT MET'}")  # fmt: skip

    cases = ["agent, 16 connections", "agent, 16 client processes"]
    if workers > 1:
        cases.append(f"agent x{workers} processes, 16 connections")
        cases.append(f"agent x{workers} processes, 16 client processes")
    print("targets:")
    for case in cases:
        row = table.find("ES256", case)
        target(f"ES256 {case} / raw", row["ratio"], 0.6, "higher")
        target(f"ES256 {case} p99", row["p99_us"] / 1000, 2.0, "lower", " ms")
        for alg in ALGS:
            row = table.find(alg, case)
            clients = "16 client processes" if "client processes" in case else "16 connections"
            ssh = table.find(alg, f"ssh-agent, {clients}")
            bao = table.find(alg, "OpenBao transit, 16 connections")
            target(f"{alg} {case} / ssh-agent", row["ops"] / ssh["ops"], 10, "higher")
            target(f"{alg} {case} / OpenBao 16 conns", row["ops"] / bao["ops"], 10, "higher")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median taken)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the scaling rows")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": _cpus(),
            "args": {**vars(args), "json": str(args.json) if args.json else None},
        },
    }
    with tempfile.TemporaryDirectory(prefix="kq-bench-", dir="/tmp") as tmp:
        directory = Path(tmp)
        cores = effective_cores()
        report["machine"]["effective_cores"] = cores
        print(f"effective cores (two busy processes vs one): {cores:.2f} of {_cpus()}")
        if "throughput" in sections:
            table = Table(args.duration, args.repeat)
            throughput(table, args.workers, directory)
            table.print()
            report["rows"] = table.rows
            report["targets"] = targets(table, args.workers)
        if "rotation" in sections:
            report["rotation"] = scenarios.rotation(args.duration, args.workers)
        if "cluster" in sections:
            report["cluster"] = scenarios.cluster(directory, quick=args.duration < 1)
        if "memory" in sections:
            report["memory"] = scenarios.memory(directory)
        if "fanout" in sections:
            report["fanout"] = scenarios.fanout(directory, quick=args.duration < 1)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    raise SystemExit(main())
