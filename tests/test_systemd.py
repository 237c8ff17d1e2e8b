"""`keyquorum run` speaks systemd's notify protocol: READY, STATUS, WATCHDOG, STOPPING."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import QUIET_KEYS, write_config

from agent.client import Client
from agent.systemd import Notifier, listen_sockets

pytestmark = pytest.mark.slow


def receive_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """Datagrams received until one contains `wanted` (or the deadline passes)."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        messages.append(data)
        if wanted in data:
            return messages
    raise AssertionError(f"no {wanted!r} within {timeout}s; got {messages}")


def test_the_agent_notifies_ready_pings_the_watchdog_and_says_stopping(short_tmp: Path) -> None:
    notify_path = short_tmp / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    config = write_config(short_tmp, keys=QUIET_KEYS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        env={**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = receive_until(sock, "READY=1", 20)[-1]
        assert f"MAINPID={proc.pid}" in ready
        assert "STATUS=ok; leader" in ready and "signing with" in ready
        pings = [m for m in receive_until(sock, "WATCHDOG=1", 2) if m == "WATCHDOG=1"]
        receive_until(sock, "WATCHDOG=1", 2)  # and again: a steady ping every WATCHDOG_USEC/2
        assert pings
        proc.send_signal(signal.SIGTERM)
        stopping = receive_until(sock, "STOPPING=1", 10)[-1]
        assert "STATUS=draining" in stopping
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def test_outside_systemd_the_notifier_is_silent() -> None:
    notifier = Notifier(env={})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")  # nothing to send to, nothing raised


def test_abstract_notify_sockets_and_foreign_watchdog_pids_are_understood() -> None:
    notifier = Notifier(env={"NOTIFY_SOCKET": "@sd/notify", "WATCHDOG_USEC": "4000000"})
    assert notifier.address == "\0sd/notify" and notifier.watchdog_interval == 2.0
    other = Notifier(env={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "10", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # the watchdog is for another process


def test_the_service_unit_is_type_notify_with_a_watchdog_and_hardening() -> None:
    unit = (Path(__file__).parent.parent / "deploy" / "systemd" / "keyquorum.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "StateDirectory=keyquorum",
        "RuntimeDirectory=keyquorum",
        "RuntimeDirectoryPreserve=yes",
    ):
        assert line in unit, line


UNITS = Path(__file__).parent.parent / "deploy" / "systemd"


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    keyquorum = Path(sys.executable).with_name("keyquorum")
    for name in ("keyquorum.service", "keyquorum.socket"):
        text = (UNITS / name).read_text().replace("/usr/local/bin/keyquorum", str(keyquorum))
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [
            analyze,
            "verify",
            str(tmp_path / "keyquorum.socket"),
            str(tmp_path / "keyquorum.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    assert "keyquorum" not in result.stderr, result.stderr


def test_socket_activation_serves_the_socket_systemd_passes_and_leaves_it_there(
    short_tmp: Path,
) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    config = write_config(short_tmp, keys=QUIET_KEYS)
    socket_path = short_tmp / "agent.sock"
    process = subprocess.Popen(
        [
            activate,
            "-l",
            str(socket_path),
            "--fdname=api",
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():  # the activator binds it before any agent runs
            assert time.monotonic() < deadline, "the activator did not listen"
            time.sleep(0.05)
        # The first connection starts the agent; the request waits for its first key.
        with Client(socket_path, timeout=20) as client:
            assert client.sign(b"activated").signature
            status = client.status()
        assert status["health"]["status"] == "ok"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        output = process.stdout.read().decode() if process.stdout else ""
        assert "serving the socket(s) systemd passed: api" in output
        # systemd owns the socket: the agent neither unlinked it nor made its own lock file.
        assert socket_path.exists()
        assert not (short_tmp / "agent.sock.lock").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()


def test_listen_sockets_takes_only_what_systemd_passed_to_this_process() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert listen_sockets(env) == {}
    assert env["LISTEN_FDS"] == "1"  # not ours: left alone for the process it belongs to
    a, b = socket.socketpair()
    try:
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}
        assert listen_sockets(env) == {}
        assert "LISTEN_PID" not in env and "LISTEN_FDS" not in env  # unset, like sd_listen_fds
    finally:
        a.close()
        b.close()
