"""An agent rotating through every backend the cluster tests do not already cover, under load.

In-process agents (the Azure fake needs its credential object handed to the SDK, which a
separate `keyquorum run` process cannot be given): Azure Key Vault (wrap, remote, secrets), GCP
(remote, Secret Manager), AWS Secrets Manager, Vault KV and PKCS#11 remote keys. For each: the
agent signs continuously through three keys with no failed request and every signature
verifies; then the backend goes away across a due rotation. Wrapped and secret-store keys keep
signing and rotation resumes afterwards; remote keys cannot sign while their KMS is gone, and
say so with a 503 `backend_unavailable`, then sign again once it is back.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import FAST_KEYS
from servers import AWS_ENV, MotoServer, OpenBaoServer
from test_agent import config_for

from agent.client import AgentError, AsyncClient
from agent.crypto import verify_signature
from agent.daemon import Agent
from agent.factory import backend_deadline
from consensus.memory import MemoryStore

pytestmark = pytest.mark.slow


@dataclass
class Case:
    backend: Any  # a KeyWrapper, RemoteSigner or SecretStore
    outage: Callable[[bool], None] | None  # outage(True) cuts the backend off, (False) heals
    remote: bool = False


@contextlib.contextmanager
def azure(kind: str) -> Iterator[Case]:
    from fakes.azure_keyvault import FakeKeyVault

    fake_class: Any = FakeKeyVault
    if kind == "secrets":
        from fakes.azure_secrets import FakeSecretVault

        fake_class = FakeSecretVault
    with fake_class() as vault:
        options = {
            "vault_url": vault.vault_url,
            "ca_file": vault.ca_file,
            "timeout": 1.0,
            "attempt_timeout": 0.5,
        }
        extra = {"credential": vault.credential(), "verify_challenge_resource": False}

        def outage(on: bool) -> None:
            vault.outage = on

        if kind == "wrap":
            from backends.azure import build

            vault.create_key("keyquorum-kek")
            backend = build({**options, "key_name": "keyquorum-kek"}, **extra)
        elif kind == "remote":
            from backends.azure import build_signer

            backend = build_signer(options, **extra)
        else:
            from backends.azure_secrets import build_secret_store

            backend = build_secret_store({**options, "secret_name": "keyquorum"}, **extra)
        try:
            yield Case(backend, outage, remote=kind == "remote")
        finally:
            backend.close()


@contextlib.contextmanager
def gcp(kind: str) -> Iterator[Case]:
    if kind == "remote":
        from fakes.gcp_kms import FakeCloudKms

        from backends.gcp import build_signer

        ring = "projects/kq-test/locations/global/keyRings/keyquorum"
        with FakeCloudKms() as fake:
            fake.create_key_ring(ring)
            signer = build_signer({"key_ring": ring, "endpoint": fake.endpoint, "timeout": 1.0})
            try:
                yield Case(signer, lambda on: fake.fail(503) if on else fake.heal(), remote=True)
            finally:
                signer.close()
        return
    from fakes.gcp_secrets import FakeSecretManager

    from backends.gcp_secrets import build_secret_store

    with FakeSecretManager(project_numbers={"kq-test": "123456789012"}) as fake:
        store = build_secret_store(
            {
                "secret_name": "projects/kq-test/secrets/keyquorum",
                "endpoint": fake.endpoint,
                "timeout": 1.0,
            }
        )
        try:
            yield Case(store, lambda on: fake.fail(503) if on else fake.heal())
        finally:
            store.close()


@contextlib.contextmanager
def aws_secrets(workdir: Path) -> Iterator[Case]:
    from backends.aws_secrets import build_secret_store

    with MotoServer(workdir / "moto") as server:
        yield Case(
            build_secret_store(
                {
                    "secret_name": "keyquorum",
                    "region": "us-east-1",
                    "endpoint_url": server.url,
                    "timeout": 1.0,
                    "attempt_timeout": 0.3,
                }
            ),
            lambda on: server.pause() if on else server.resume(),
        )


@contextlib.contextmanager
def vault_kv(workdir: Path) -> Iterator[Case]:
    from backends.vault_kv import build_secret_store

    with OpenBaoServer(workdir / "bao") as server:
        yield Case(
            build_secret_store(
                {
                    "address": server.url,
                    "token": server.token,
                    "path": "keyquorum",
                    "timeout": 1.0,
                    "attempt_timeout": 0.3,
                }
            ),
            lambda on: server.pause() if on else server.resume(),
        )


@contextlib.contextmanager
def pkcs11_remote() -> Iterator[Case]:
    from softhsm import missing, softhsm_token

    if missing():
        pytest.skip(missing() or "")
    from backends.pkcs11 import build_signer

    with softhsm_token() as token:
        signer = build_signer(
            {"module": token.module, "token_label": token.label, "pin": token.pin}
        )
        try:
            yield Case(signer, None, remote=True)
        finally:
            signer.close()


CASES: dict[str, Callable[[Path], Any]] = {
    "azure-keyvault wrap": lambda d: azure("wrap"),
    "azure-keyvault remote": lambda d: azure("remote"),
    "azure-secrets": lambda d: azure("secrets"),
    "gcp-kms remote": lambda d: gcp("remote"),
    "gcp-secrets": lambda d: gcp("secrets"),
    "aws-secrets": aws_secrets,
    "vault-kv": vault_kv,
    "pkcs11 remote": lambda d: pkcs11_remote(),
}


@asynccontextmanager
async def agent_with(short_tmp: Path, backend: Any) -> AsyncIterator[Agent]:
    config = config_for(short_tmp, keys=FAST_KEYS)
    agent = Agent(config, MemoryStore(), backend, backend_timeout=backend_deadline(backend))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        with trio.fail_after(15):
            await agent.ready.wait()
        try:
            yield agent
        finally:
            agent.shutdown()


@dataclass
class Load:
    signatures: list[tuple[str, bytes, bytes]]
    failures: list[tuple[float, str]]


async def sign_until(
    client: AsyncClient, load: Load, done: Callable[[], bool], deadline: float = 40.0
) -> None:
    with trio.fail_after(deadline):
        i = 0
        while not done():
            payload = b"m%d" % i
            i += 1
            try:
                result = await client.sign(payload)
            except AgentError as exc:
                load.failures.append((trio.current_time(), f"{exc.code}: {exc.message}"))
                await trio.sleep(0.05)
                continue
            load.signatures.append((result.kid, payload, result.signature))
            await trio.sleep(0.005)


@pytest.mark.parametrize("name", sorted(CASES))
async def test_an_agent_rotates_through_the_backend_and_rides_out_its_outage(
    name: str, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable, value in AWS_ENV.items():
        monkeypatch.setenv(variable, value)
    with CASES[name](short_tmp) as case:
        async with (
            agent_with(short_tmp, case.backend) as agent,
            AsyncClient(agent.config.socket.path) as client,
        ):
            load = Load([], [])
            kids = lambda: {kid for kid, _, _ in load.signatures}  # noqa: E731
            published: dict[str, Any] = {}  # every key the agent published, kept after expiry
            await sign_until(client, load, lambda: len(kids()) >= 3)
            published.update({k["kid"]: k for k in (await client.jwks())["keys"]})
            assert load.failures == [], load.failures[:3]
            if case.outage is not None:
                generation = agent.keyring.keyset.generation  # type: ignore[union-attr]
                before = len(load.signatures)
                case.outage(True)
                outage_load = Load([], [])
                try:
                    stop = trio.current_time() + 2.0
                    await sign_until(client, outage_load, lambda: trio.current_time() > stop)
                finally:
                    case.outage(False)
                if case.remote:  # the KMS signs every request: it cannot while it is gone
                    assert outage_load.failures, "a remote key signed without its KMS?"
                    assert all("backend_unavailable" in f for _, f in outage_load.failures)
                else:  # loaded keys keep signing through the outage
                    assert outage_load.failures == [], outage_load.failures[:3]
                load.signatures += outage_load.signatures
                # Rotation (and, for remote keys, signing) resumes once the backend is back.
                await sign_until(
                    client,
                    load,
                    lambda: (
                        agent.keyring.keyset.generation > generation + 1  # type: ignore[union-attr]
                        and len(load.signatures) > before + 50
                    ),
                )
            published.update({k["kid"]: k for k in (await client.jwks())["keys"]})
    by_kid = published
    bad = [
        k for k, payload, sig in load.signatures if not verify_signature(by_kid[k], payload, sig)
    ]
    assert bad == []
    ridden = (
        "no outage test"
        if case.outage is None
        else (
            "503 while the KMS is gone, as remote keys must" if case.remote else "signed through it"
        )
    )
    print(f"\n{name}: {len(load.signatures)} signatures, {len(kids())} keys; outage: {ridden}")
