"""An agent keeping its keys in a secret store (Vault/OpenBao KV v2, a real dev server): each key
is a version of one secret, the key set holds only version numbers, the leader labels the last
known-good version `stable`, `rollback` returns to it, and versions of dropped keys are destroyed.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from cluster_tools import wait_until
from helpers import FAST_KEYS, QUIET_KEYS, write_config
from servers import OpenBaoServer

from agent.client import Client
from agent.demo import LoadReport, agent_process, run_load

pytestmark = pytest.mark.slow


def kv_backend(server: OpenBaoServer, path: str) -> dict[str, object]:
    return {
        "kind": "vault-kv",
        "address": server.url,
        "token": server.token,
        "path": path,
        "timeout": 2.0,
    }


def metadata(server: OpenBaoServer, path: str) -> dict[str, Any]:
    return server.api("GET", f"secret/metadata/{path}")["data"]


def test_rollback_returns_to_the_version_labelled_stable(
    openbao: OpenBaoServer, short_tmp: Path
) -> None:
    path = f"keyquorum/{uuid.uuid4().hex[:8]}"
    keys = {**QUIET_KEYS, "grace_period": "5s"}  # a key is labelled stable after 5 s of signing
    config = write_config(short_tmp, keys=keys, backend=kv_backend(openbao, path))
    with agent_process(config, short_tmp / "agent.sock"), Client(short_tmp / "agent.sock") as c:
        first = c.sign(b"x").kid
        wait_until(
            lambda: (metadata(openbao, path).get("custom_metadata") or {}).get("stable") == "1",
            15,
            "the first key's version to be labelled stable",
        )
        c.rotate()
        second = wait_until(lambda: (k := c.sign(b"x").kid) != first and k, 15, "the new key")
        assert metadata(openbao, path)["custom_metadata"]["stable"] == "1"  # not proven yet
        c.rollback()
        assert c.sign(b"after rollback").kid == first
        states = {k["kid"]: k for k in c.status()["keys"]}
        assert states[second]["state"] == "retired"
        # The key set holds version references only; the private keys are in the secret.
        store_text = (short_tmp / "state" / "keyset.store").read_bytes()
        assert b"secret-v1" in store_text and b"pkcs8" not in store_text
        assert sorted(metadata(openbao, path)["versions"]) == ["1", "2"]


def test_rotating_under_load_with_no_failed_sign_and_dropped_versions_destroyed(
    openbao: OpenBaoServer, short_tmp: Path
) -> None:
    path = f"keyquorum/{uuid.uuid4().hex[:8]}"
    config = write_config(short_tmp, keys=FAST_KEYS, backend=kv_backend(openbao, path))
    with agent_process(config, short_tmp / "agent.sock"):
        report = LoadReport()
        stop = threading.Event()
        load = threading.Thread(
            target=run_load,
            args=(short_tmp / "agent.sock", 60.0, 2, report),
            kwargs={"stop_early": stop},
        )
        load.start()

        def first_version_destroyed() -> bool:
            versions = metadata(openbao, path)["versions"]
            with report.lock:
                rotated = len(report.kids()) >= 4
            return rotated and bool(versions.get("1", {}).get("destroyed"))

        try:
            wait_until(first_version_destroyed, 60, "the expired first key's version destroyed")
        finally:
            stop.set()
            load.join()
    assert report.failures == [], report.failures[:5]
    assert report.unverifiable(max_age=1.0, validity=1.0) == []
    print(
        f"\nvault-kv secret store: {len(report.signatures)} signatures, {len(report.kids())} keys,"
        f" {len(metadata(openbao, path)['versions'])} versions, expired ones destroyed"
    )
