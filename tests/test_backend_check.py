"""`keyquorum backend check`: a working backend passes; each kind of breakage is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from helpers import QUIET_KEYS, write_config
from servers import OpenBaoServer

from agent.demo import agent_process


def backend_check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "backend", "check", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_new_local_backend_passes_and_reports_each_step(short_tmp: Path) -> None:
    config = write_config(short_tmp, keys=QUIET_KEYS)
    result = backend_check(config)
    assert result.returncode == 1  # no KEK yet: the check says so and does not create one
    assert "does not exist" in result.stdout
    assert not (short_tmp / "state" / "kek").exists()
    kek = short_tmp / "state" / "kek"
    kek.parent.mkdir(parents=True)
    kek.write_bytes(os.urandom(32))
    kek.chmod(0o600)
    result = backend_check(config, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    steps = {s["step"]: s for s in report["steps"]}
    assert [name for name in steps] == ["wrap", "unwrap", "binding", "key set"]
    assert steps["wrap"]["ms"] is not None
    assert "no key set stored yet" in steps["key set"]["detail"]


@pytest.mark.slow
def test_a_node_with_the_wrong_kek_is_told_which_keys_it_cannot_open(short_tmp: Path) -> None:
    config = write_config(short_tmp, keys=QUIET_KEYS)
    with agent_process(config, short_tmp / "agent.sock"):
        pass  # the agent created the first key, sealed with this node's KEK
    result = backend_check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "this node can open it" in result.stdout
    kek = short_tmp / "state" / "kek"
    kek.write_bytes(os.urandom(32))  # another cluster's KEK
    result = backend_check(config)
    assert result.returncode == 1
    assert "FAIL  key " in result.stdout
    assert "wrong KEK file?" in result.stdout
    assert "backend check FAILED" in result.stdout


def test_a_missing_transit_key_and_an_unreachable_server_are_named(
    openbao: OpenBaoServer, short_tmp: Path
) -> None:
    backend = {
        "kind": "vault-transit",
        "address": openbao.url,
        "key_name": f"missing-{uuid.uuid4().hex[:8]}",
        "token": openbao.token,
        "timeout": 1.0,
    }
    config = write_config(short_tmp, keys=QUIET_KEYS, backend=backend)
    result = backend_check(config, "--no-keyset")
    assert result.returncode == 1
    assert "FAIL  wrap" in result.stdout and "backend.key_name" in result.stdout

    openbao.transit_key(str(backend["key_name"]))
    result = backend_check(config, "--no-keyset")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    binding" in result.stdout
    assert "backend check passed" in result.stdout

    config = write_config(
        short_tmp, keys=QUIET_KEYS, backend={**backend, "address": "http://127.0.0.1:9"}
    )
    result = backend_check(config, "--no-keyset")
    assert result.returncode == 1
    assert "cannot reach" in result.stdout


def test_a_bad_backend_setting_fails_the_configure_step(short_tmp: Path) -> None:
    config = write_config(
        short_tmp, keys=QUIET_KEYS, backend={"kind": "aws-kms", "key_id": "alias/x", "regin": "x"}
    )
    result = backend_check(config)
    assert result.returncode == 1
    assert "FAIL  configure" in result.stdout and "regin" in result.stdout


def test_remote_mode_creates_signs_verifies_and_retires_a_probe_key(
    openbao: OpenBaoServer, short_tmp: Path
) -> None:
    mount = f"transit-{uuid.uuid4().hex[:8]}"
    openbao.api("POST", f"sys/mounts/{mount}", {"type": "transit"})
    backend = {
        "kind": "vault-transit",
        "mode": "remote",
        "address": openbao.url,
        "token": openbao.token,
        "mount": mount,
    }
    config = write_config(short_tmp, keys=QUIET_KEYS, backend=backend)
    result = backend_check(config, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [s["step"] for s in json.loads(result.stdout)["steps"]]
    assert steps == ["create", "sign", "verify", "retire", "key set"]
    # The probe key is gone: the mount lists no keys at all (404).
    listing = httpx.get(
        f"{openbao.url}/v1/{mount}/keys?list=true", headers={"X-Vault-Token": openbao.token}
    )
    assert listing.status_code == 404, listing.text
