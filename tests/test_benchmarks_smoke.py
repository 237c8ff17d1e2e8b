"""The benchmark runs end to end (tiny durations), so it never rots; real figures are manual."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_benchmark_prints_every_row_and_writes_json(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--duration", "0.2", "--repeat", "1",
         "--json", str(tmp_path / "bench.json")],
        capture_output=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()
    rows = json.loads((tmp_path / "bench.json").read_text())
    cases = {(r["alg"], r["case"]) for r in rows}
    assert len(cases) == 8
    assert all(r["ops"] > 0 and r["ratio"] > 0 for r in rows)
    assert "socket, 16 connections" in out.stdout.decode()
