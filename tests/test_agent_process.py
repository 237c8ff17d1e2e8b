"""`keyquorum run` as a real process: signing through rotations, and the operator commands.

These start the console entry point in a child process with second-scale timings and drive it
through the real socket with the sync client and the CLI, exactly as an operator would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import FAST_KEYS, QUIET_KEYS, write_config

from agent.client import Client
from agent.crypto import decode_jwt, verify_signature
from agent.demo import LoadReport, agent_process, run_load

pytestmark = pytest.mark.slow


def cli(
    *args: str, socket_path: Path, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--socket", str(socket_path), *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        check=False,
    )


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def fast_agent(short_tmp: Path) -> Iterator[Path]:
    config = write_config(short_tmp, keys=FAST_KEYS)
    with agent_process(config, short_tmp / "agent.sock"):
        yield short_tmp / "agent.sock"


@pytest.fixture
def quiet_agent(short_tmp: Path) -> Iterator[Path]:
    config = write_config(short_tmp, keys=QUIET_KEYS)
    with agent_process(config, short_tmp / "agent.sock"):
        yield short_tmp / "agent.sock"


def test_signing_never_fails_through_three_rotations_and_every_signature_verifies(
    fast_agent: Path,
) -> None:
    report = LoadReport()
    # Keys rotate every ~3.5 s with these timings: ~11 s for three activations; the load runs
    # until the fourth key has signed (up to 45 s on a loaded machine).
    stop = threading.Event()
    load = threading.Thread(
        target=run_load, args=(fast_agent, 45.0, 4, report), kwargs={"stop_early": stop}
    )
    load.start()
    while load.is_alive():
        load.join(timeout=0.1)
        with report.lock:
            if len(report.kids()) >= 4:
                stop.set()
    assert report.failures == []
    kids = report.kids()
    assert len(kids) >= 4, f"expected >= 3 rotations, saw keys {kids}"
    assert len(report.signatures) > 500
    assert len(report.snapshots) > 20
    # Every signature verifies against every JWKS a verifier could hold: fetched at most one
    # cache lifetime (jwks_max_age = 1 s, well inside the 1.5 s grace period) before signing, or
    # while the signature is still valid after it.
    assert report.unverifiable(max_age=1.0, validity=1.0) == []
    with Client(fast_agent) as client:
        # The trust chain: each key after the first is endorsed by its predecessor.
        keys = client.status()["keys"]
        endorsed = [k for k in keys if k["endorsement"]]
        assert endorsed, "rotated keys carry endorsements"


def test_sigterm_drains_and_removes_the_socket(short_tmp: Path) -> None:
    config = write_config(short_tmp, keys=QUIET_KEYS)
    socket_path = short_tmp / "agent.sock"
    with agent_process(config, socket_path) as proc, Client(socket_path) as client:
        assert client.sign(b"x").signature
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert not socket_path.exists()


def test_cli_sign_jwt_jwks_and_status_work_against_a_running_agent(quiet_agent: Path) -> None:
    signed = cli("sign", "--data", "hello", socket_path=quiet_agent)
    assert signed.returncode == 0, signed.stderr
    result = json.loads(signed.stdout)
    jwks = json.loads(cli("jwks", socket_path=quiet_agent).stdout)
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == result["kid"]]
    import base64

    signature = base64.urlsafe_b64decode(result["signature"] + "==")
    assert verify_signature(jwk, b"hello", signature)
    piped = cli("sign", socket_path=quiet_agent, stdin=b"from stdin")
    assert piped.returncode == 0
    token = cli("jwt", "--claim", "sub=bob", "--ttl", "2", socket_path=quiet_agent)
    assert token.returncode == 0, token.stderr
    assert decode_jwt(token.stdout.decode().strip(), jwks)["sub"] == "bob"
    status = cli("status", socket_path=quiet_agent)
    assert (
        status.returncode == 0 and b"active" in status.stdout and b"health    ok" in status.stdout
    )
    as_json = json.loads(cli("status", "--json", socket_path=quiet_agent).stdout)
    assert as_json["signing_kid"] == result["kid"]


def test_cli_reports_an_unreachable_agent_clearly(short_tmp: Path) -> None:
    missing = short_tmp / "nobody.sock"
    out = cli("status", socket_path=missing)
    assert out.returncode == 3
    assert str(missing).encode() in out.stderr


def _active(client: Client) -> str | None:
    status = client.status()
    return str(status["signing_kid"]) if status["signing_kid"] else None


def test_rotate_then_rollback_then_revoke_end_to_end(quiet_agent: Path) -> None:
    with Client(quiet_agent) as client:
        first = _active(client)
        rotated = cli("rotate", socket_path=quiet_agent)
        assert rotated.returncode == 0, rotated.stderr
        second = json.loads(rotated.stdout)["created"]
        again = cli("rotate", socket_path=quiet_agent)
        assert again.returncode == 1 and b"already pending" in again.stderr
        # Published at once, signing only after the grace period (1.5 s).
        assert second in {k["kid"] for k in client.jwks()["keys"]}
        assert client.sign(b"x").kid == first
        wait_until(lambda: client.sign(b"x").kid == second, what="the new key to activate")

        rolled = cli("rollback", socket_path=quiet_agent)
        assert rolled.returncode == 0, rolled.stderr
        assert client.sign(b"after rollback").kid == first
        keys = {k["kid"]: k for k in client.status()["keys"]}
        assert keys[second]["state"] == "retired" and keys[second]["withdrawn"] == "retired"
        assert second in {k["kid"] for k in client.jwks()["keys"]}  # still verifiable

        revoked = cli("revoke", str(first), socket_path=quiet_agent)
        assert revoked.returncode == 0, revoked.stderr
        # The revoked key disappears from the JWKS and never signs again; a fresh key signs now.
        assert first not in {k["kid"] for k in client.jwks()["keys"]}
        replacement = client.sign(b"after revoke").kid
        assert replacement not in (first, second)
        unknown = cli("revoke", "no-such-kid", socket_path=quiet_agent)
        assert unknown.returncode == 1 and b"no key" in unknown.stderr


def test_import_adopts_an_existing_pem_key_end_to_end(quiet_agent: Path, short_tmp: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem_path = short_tmp / "legacy.pem"
    pem_path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(pem_path, 0o600)
    imported = cli("import", str(pem_path), socket_path=quiet_agent)
    assert imported.returncode == 0, imported.stderr
    kid = json.loads(imported.stdout)["imported"]
    with Client(quiet_agent) as client:
        assert kid in {k["kid"] for k in client.jwks()["keys"]}
        wait_until(lambda: client.sign(b"m").kid == kid, what="the imported key to sign")
        result = client.sign(b"legacy verifier")
        # A verifier holding only the legacy public key accepts the agent's signature.
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        r = int.from_bytes(result.signature[:32], "big")
        s = int.from_bytes(result.signature[32:], "big")
        private.public_key().verify(
            encode_dss_signature(r, s), b"legacy verifier", ec.ECDSA(hashes.SHA256())
        )
        origin = {k["kid"]: k["origin"] for k in client.status()["keys"]}
        assert origin[kid] == "imported"
    store = (Path(quiet_agent).parent / "state" / "keyset.store").read_bytes()
    secret = private.private_numbers().private_value.to_bytes(32, "big")
    assert secret not in store and pem_path.read_bytes() not in store


def start_expecting_refusal(config: Path) -> subprocess.CompletedProcess[bytes]:
    """Run `keyquorum run` with a config it must refuse; returns once it has exited."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_agent_refuses_to_start_with_an_unknown_algorithm(short_tmp: Path) -> None:
    config = write_config(short_tmp, keys={"algorithm": "ES999"})
    out = start_expecting_refusal(config)
    assert out.returncode == 2
    assert b"keys.algorithm" in out.stderr and b"ES999" in out.stderr


def test_agent_refuses_a_kek_file_readable_by_others(short_tmp: Path) -> None:
    config = write_config(short_tmp, keys=QUIET_KEYS)
    kek = short_tmp / "state" / "kek"
    kek.parent.mkdir(parents=True)
    kek.write_bytes(os.urandom(32))
    os.chmod(kek, 0o644)
    out = start_expecting_refusal(config)
    assert out.returncode == 2, out.stderr
    assert b"chmod 600" in out.stderr
    assert not (short_tmp / "agent.sock").exists()


def test_timing_that_breaks_a_relation_stops_start_up_naming_it(short_tmp: Path) -> None:
    config = write_config(short_tmp, keys={"grace_period": "500ms"})
    out = start_expecting_refusal(config)
    assert out.returncode == 2
    assert b"grace_period >= jwks_max_age + max_clock_skew" in out.stderr
