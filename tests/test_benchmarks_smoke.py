"""The benchmark runs end to end (tiny durations), so it never rots; real figures are manual."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent


def bench(tmp_path: Path, *args: str) -> tuple[str, dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--duration", "0.1", "--repeat", "1",
         "--json", str(tmp_path / "bench.json"), *args],
        capture_output=True,
        timeout=240,
        check=False,
        cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return out.stdout.decode(), json.loads((tmp_path / "bench.json").read_text())


def test_the_throughput_table_has_every_row_with_peers_and_targets(tmp_path: Path) -> None:
    stdout, report = bench(tmp_path, "--sections", "throughput")
    rows = report["rows"]
    assert isinstance(rows, list)
    cases = {(r["alg"], r["case"]) for r in rows}
    for alg in ("ES256", "EdDSA"):
        for case in (
            "raw in-process (limit)",
            "agent HTTP, 1 connection",
            "agent, 16 connections",
            "agent, 1 connection, 16 pipelined",
            "agent, batch 64",
            "agent x2 processes, 16 connections",
            "agent, 16 client processes",
            "agent x2 processes, 16 client processes",
            "ssh-agent, 16 client processes",
            "ssh-agent, 16 connections",
            "OpenBao transit, 16 connections",
            "OpenBao transit, batch 64",
        ):
            assert (alg, case) in cases
    assert all(r["ops"] > 0 and r["ratio"] > 0 and r["failures"] == 0 for r in rows)
    assert all(r["server_cpu_us"] is not None for r in rows if "raw" not in r["case"])
    targets = report["targets"]
    assert isinstance(targets, list) and len(targets) == 24
    assert "ssh-agent, 16 connections" in stdout and "targets:" in stdout


def test_rotation_cluster_memory_and_fanout_sections_report_their_figures(
    tmp_path: Path,
) -> None:
    stdout, report = bench(tmp_path, "--sections", "rotation,cluster,memory,fanout")
    rotation = report["rotation"]
    assert isinstance(rotation, dict)
    assert rotation["failed"] == 0 and rotation["kids"] == 2
    cluster = report["cluster"]
    assert isinstance(cluster, dict) and cluster["failover_s"] > 0
    assert len(cluster["propagation_s"]) == 1
    memory = report["memory"]
    assert isinstance(memory, dict) and memory["100"]["rss_kib"] > 0
    fanout = report["fanout"]
    assert isinstance(fanout, dict) and fanout["members"] == 100
    for words in ("rotation under load", "leader failover", "agent RSS", "watch fan-out"):
        assert words in stdout
