"""Every command in the README's shell blocks runs, as written, in a test.

The commands are read from the README itself; paths that only exist on a real node
(/etc/keyquorum, /run/keyquorum, key.pem, KID) are mapped to this test's agent. A command this
test does not know how to run fails the test, so the README cannot gain an untested command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import QUIET_KEYS, write_config

from agent.client import Client
from agent.demo import agent_process

pytestmark = pytest.mark.slow
README = Path(__file__).parent.parent / "README.md"

# Commands run by other tests (named here so that this test knows them).
ELSEWHERE = {
    "pip install": ".ci/run installs exactly this way",
    "keyquorum demo": "tests/test_cluster.py::test_the_readme_demo_runs_a_cluster_and_...",
    "python -m pytest": ".ci/run runs it",
    "python -m simulations": "tests/test_simulation.py runs the same entry point",
}


def readme_commands() -> list[str]:
    """Each command line of the README's ```sh blocks, comments stripped."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_every_readme_command_works_as_written(short_tmp: Path) -> None:
    commands = readme_commands()
    assert len(commands) >= 12, commands
    config = write_config(short_tmp, keys=QUIET_KEYS)
    socket_path = short_tmp / "agent.sock"
    key_pem = short_tmp / "key.pem"
    key_pem.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    env = {**os.environ, "KEYQUORUM_SOCKET": str(socket_path)}
    ran = []
    with agent_process(config, socket_path), Client(socket_path) as client:
        first = client.sign(b"first").kid
        for command in commands:
            if any(marker in command for marker in ELSEWHERE):
                continue
            if " run" in command and "keyquorum run" in command:
                run_agent_command(command, short_tmp)
                ran.append(command)
                continue
            if command.startswith("keyquorum rollback"):
                # A rollback needs the rotated key to have activated first (grace 1.5 s).
                wait_until_another_key_signs(client, first)
            argv = shlex.split(
                command.replace("/etc/keyquorum/agent.toml", str(config))
                .replace("/run/keyquorum/agent.sock", str(socket_path))
                .replace("key.pem", str(key_pem))
                .replace("KID", retired_kid(client) or "KID")
            )
            if argv[0] == "keyquorum":
                argv = [sys.executable, "-m", "agent.cli", *argv[1:]]
            elif argv[0] != "curl":
                pytest.fail(f"the README command {command!r} is not run by any test")
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=60, env=env, check=False
            )
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            if argv[0] == "curl":
                assert json.loads(result.stdout)["signature"]
            ran.append(command)
    assert any(c.startswith("keyquorum import") for c in ran)
    assert any(c.startswith("curl") for c in ran)
    print(f"\nREADME: {len(ran)} commands run as written")


def run_agent_command(command: str, directory: Path) -> None:
    """`keyquorum run [--config agent.toml]`: starts, serves its socket, stops on SIGTERM."""
    node = directory / ("run-config" if "--config" in command else "run-default")
    node.mkdir()
    env = {
        "KEYQUORUM_STATE_DIR": str(node / "state"),
        "KEYQUORUM_SOCKET__PATH": str(node / "agent.sock"),
    }
    argv = [sys.executable, "-m", "agent.cli", *shlex.split(command)[1:]]
    if "--config" in command:
        config = write_config(node, keys=QUIET_KEYS)
        argv[argv.index("agent.toml")] = str(config)
    process = subprocess.Popen(
        argv,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            if (node / "agent.sock").exists():
                with Client(node / "agent.sock", timeout=5) as client:
                    if client.sign(b"readme").signature:
                        break
            assert time.monotonic() < deadline, f"{command} did not serve its socket"
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=15)
        if process.stderr:
            process.stderr.close()


def wait_until_another_key_signs(client: Client, first: str) -> None:
    deadline = time.monotonic() + 10
    while client.sign(b"probe").kid == first:
        assert time.monotonic() < deadline, client.status()["keys"]
        time.sleep(0.1)


def retired_kid(client: Client) -> str | None:
    keys = client.status()["keys"]
    retired = [k["kid"] for k in keys if k["state"] == "retired"]
    return retired[0] if retired else None
