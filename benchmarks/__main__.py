"""`python -m benchmarks`: signing throughput and latency, side by side in one run.

Rows: raw in-process signing (the limit) and the agent over its Unix socket — sequential on one
connection, 16 concurrent connections, and batches of 64 — for ES256 and EdDSA. Each figure is the
median of `--repeat` runs of `--duration` seconds; latencies are p50/p99 over all requests of the
median run. The ratio column compares each row to raw in-process signing of the same algorithm.
Peers (ssh-agent, OpenBao transit) and the process-scaling figures of issue 8 are not here yet.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from agent.client import AsyncClient
from agent.crypto import Signer, generate_private_key
from agent.demo import agent_process

TIMING = """
[keys]
algorithm = "{alg}"
key_ttl = "1h"
rotation_threshold = "25m"
grace_period = "10m"
check_interval = "1m"
jwks_max_age = "1m"
max_clock_skew = "1s"
max_token_ttl = "5m"
outage_budget = "5m"
lease_ttl = "10s"

[jwt]
default_ttl = "5m"
"""

PAYLOAD = b"x" * 200


def write_config(directory: Path, alg: str) -> Path:
    state = directory / "state"
    config = directory / "agent.toml"
    config.write_text(
        f'node_id = "bench"\nstate_dir = "{state}"\nlog_level = "warning"\n\n'
        f'[socket]\npath = "{directory / "agent.sock"}"\n\n'
        f'[store]\nkind = "file"\npath = "{state / "keyset.store"}"\n\n'
        f'[backend]\nkind = "local"\nkek_file = "{state / "kek"}"\n' + TIMING.format(alg=alg)
    )
    return config


def raw(alg: str, duration: float) -> dict[str, Any]:
    signer = Signer.from_private_key(generate_private_key(alg), alg)
    count = 0
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        for _ in range(200):
            signer.sign(PAYLOAD)
        count += 200
    return {"ops": count / duration, "p50_us": None, "p99_us": None}


async def _socket_run(
    socket_path: Path, duration: float, connections: int, batch: int
) -> dict[str, Any]:
    latencies: list[float] = []
    signatures = 0
    end = trio.current_time() + duration

    async def worker() -> None:
        nonlocal signatures
        async with AsyncClient(socket_path) as client:
            while trio.current_time() < end:
                start = time.perf_counter()
                if batch == 1:
                    await client.sign(PAYLOAD)
                else:
                    await client.sign_batch([PAYLOAD] * batch)
                latencies.append(time.perf_counter() - start)
                signatures += batch

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "ops": signatures / elapsed,
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e6,
    }


def raw_case(alg: str) -> Callable[[float], dict[str, Any]]:
    return lambda duration: raw(alg, duration)


def socket_case(
    socket_path: Path, connections: int, batch: int
) -> Callable[[float], dict[str, Any]]:
    return lambda duration: trio.run(_socket_run, socket_path, duration, connections, batch)


def median_of(
    run: Callable[[float], dict[str, Any]], duration: float, repeat: int
) -> dict[str, Any]:
    results = sorted((run(duration) for _ in range(repeat)), key=lambda r: r["ops"])
    return results[len(results) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median taken)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for alg in ("ES256", "EdDSA"):
        limit = median_of(raw_case(alg), args.duration, args.repeat)
        rows.append({"alg": alg, "case": "raw in-process (limit)", **limit})
        with tempfile.TemporaryDirectory(prefix="kq-bench-", dir="/tmp") as tmp:
            directory = Path(tmp)
            socket_path = directory / "agent.sock"
            with agent_process(write_config(directory, alg), socket_path):
                for name, connections, batch in (
                    ("socket, 1 connection", 1, 1),
                    ("socket, 16 connections", 16, 1),
                    ("socket, batch 64", 1, 64),
                ):
                    figure = median_of(
                        socket_case(socket_path, connections, batch), args.duration, args.repeat
                    )
                    rows.append({"alg": alg, "case": name, **figure})
        for row in rows:
            if row["alg"] == alg:
                row["ratio"] = row["ops"] / limit["ops"]
    print(f"{'alg':6} {'case':26} {'sig/s':>10} {'ratio':>7} {'p50 us':>9} {'p99 us':>9}")
    for row in rows:
        p50 = f"{row['p50_us']:.0f}" if row["p50_us"] is not None else "-"
        p99 = f"{row['p99_us']:.0f}" if row["p99_us"] is not None else "-"
        print(
            f"{row['alg']:6} {row['case']:26} {row['ops']:10,.0f} {row['ratio']:7.3f} "
            f"{p50:>9} {p99:>9}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
