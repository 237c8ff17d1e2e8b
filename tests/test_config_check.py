"""`keyquorum config check`: the effective configuration (it loads back), secrets redacted, and
the timing budget; a broken configuration fails naming the setting or relation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import CLUSTER_KEYS, FAST_KEYS, write_config

from agent.config import load_config
from agent.config_check import human
from agent.timing import HOUR, MINUTE, SECOND, Timing


def config_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "config", "check", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_the_printed_configuration_loads_back_as_the_same_one(short_tmp: Path) -> None:
    config = write_config(short_tmp, keys=FAST_KEYS, sections={"socket": {"workers": 2}})
    result = config_check("--config", str(config), env={"KEYQUORUM_KEYS__ALGORITHM": "EdDSA"})
    assert result.returncode == 0, result.stderr
    assert "workers = 2" in result.stdout
    assert 'algorithm = "EdDSA"' in result.stdout  # environment overrides are applied
    printed = short_tmp / "printed.toml"
    printed.write_text(result.stdout)
    original = load_config(config, env={"KEYQUORUM_KEYS__ALGORITHM": "EdDSA"})
    assert load_config(printed, env={}) == original


def test_the_budget_says_how_long_an_outage_is_ridden_through(short_tmp: Path) -> None:
    config = write_config(short_tmp, keys=FAST_KEYS)
    result = config_check("--config", str(config), "--json")
    budget = json.loads(result.stdout)["budget"]
    timing = load_config(config, env={}).keys.timing
    assert f"up to {human(timing.ride_through())} " in budget["outages"]
    assert "backend" in budget["outages"]  # wrap mode: KMS outages are ridden through too


def test_secrets_are_redacted(short_tmp: Path) -> None:
    config = write_config(
        short_tmp,
        keys=CLUSTER_KEYS,
        store_kind="etcd",
        sections={
            "store": {
                "endpoints": ["http://127.0.0.1:2379"],
                "username": "kq",
                "password": "hunter2-secret",
            }
        },
        backend={
            "kind": "vault-transit",
            "mode": "remote",
            "address": "http://x:1",
            "token": "s.very-secret",
        },
    )
    result = config_check("--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "hunter2-secret" not in result.stdout and "s.very-secret" not in result.stdout
    assert result.stdout.count('"<redacted>"') == 2
    assert "signing stops while it is unreachable" in result.stdout  # remote mode's caveat
    assert "dead leader is replaced" in result.stdout


def test_a_broken_relation_fails_naming_it(short_tmp: Path) -> None:
    config = write_config(short_tmp, keys={**FAST_KEYS, "grace_period": "500ms"})
    result = config_check("--config", str(config))
    assert result.returncode == 2
    assert "grace_period >= jwks_max_age + max_clock_skew" in result.stderr


def test_ride_through_is_what_the_relations_promise() -> None:
    t = Timing()
    assert t.ride_through() > t.outage_budget
    assert human(t.ride_through()) == "2h 58m 30s"
    assert human(90 * MINUTE + 5 * SECOND) == "1h 30m 5s"
    assert human(250) == "250ms" and human(2 * HOUR, "") == "2h"
