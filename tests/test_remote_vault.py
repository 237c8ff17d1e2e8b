"""Remote signing with Vault/OpenBao transit (a real OpenBao dev server): one transit key per
rotation, created non-exportable, signing in the server, deleted once retired."""

from __future__ import annotations

import uuid

import pytest
from servers import OpenBaoServer

from agent.crypto import verify_signature
from backends.base import BackendConfigError, BackendDenied, RemoteSigner
from backends.registry import make_remote_signer
from backends.remote import RemoteKeySigner, jwk_of_pem, remote_private
from backends.vault import VaultTransitSigner, build_signer


@pytest.fixture
def signer(openbao: OpenBaoServer) -> VaultTransitSigner:
    mount = f"transit-{uuid.uuid4().hex[:8]}"
    openbao.api("POST", f"sys/mounts/{mount}", {"type": "transit"})
    return build_signer({"address": openbao.url, "token": openbao.token, "mount": mount})


@pytest.mark.parametrize("alg", ["ES256", "ES384", "EdDSA", "RS256", "PS256"])
async def test_transit_keys_sign_verifiable_jws_signatures(
    signer: VaultTransitSigner, alg: str, openbao: OpenBaoServer
) -> None:
    assert isinstance(signer, RemoteSigner)
    created = await signer.create_key(alg, "/keyquorum/a")
    assert created.created_at is not None
    info = openbao.api("GET", f"{signer.mount}/keys/{created.ref['key_name']}")["data"]
    assert info["exportable"] is False
    jwk = jwk_of_pem(created.public_key_pem, alg)
    for message in (b"", b"hello", b"x" * 10_000):
        signature = await signer.sign(created.ref, alg, message)
        assert verify_signature(jwk, message, signature), (alg, len(message))
    loaded = await RemoteKeySigner.load(
        signer, remote_private("vault-transit", created.ref), alg, jwk
    )
    assert verify_signature(jwk, b"keyring", await loaded.sign_async(b"keyring"))


async def test_owned_keys_are_per_cluster_and_retire_deletes(
    signer: VaultTransitSigner, openbao: OpenBaoServer
) -> None:
    assert await signer.owned_keys("/keyquorum/a") == []  # an empty mount answers 404
    mine = [await signer.create_key("ES256", "/keyquorum/a") for _ in range(3)]
    theirs = await signer.create_key("ES256", "/keyquorum/b")
    owned = {k.ref["key_name"] for k in await signer.owned_keys("/keyquorum/a")}
    assert owned == {k.ref["key_name"] for k in mine}
    assert theirs.ref["key_name"] not in owned
    await signer.retire(mine[0].ref)
    owned = {k.ref["key_name"] for k in await signer.owned_keys("/keyquorum/a")}
    assert owned == {k.ref["key_name"] for k in mine[1:]}
    with pytest.raises(BackendDenied):
        await signer.sign(mine[0].ref, "ES256", b"after retirement")


async def test_a_token_that_may_not_sign_is_denied_naming_the_path(
    signer: VaultTransitSigner, openbao: OpenBaoServer
) -> None:
    created = await signer.create_key("ES256", "/keyquorum/a")
    name = created.ref["key_name"]
    token = openbao.token_with_policy(
        f"read-{name}", f'path "{signer.mount}/keys/*" {{ capabilities = ["read"] }}'
    )
    limited = build_signer({"address": openbao.url, "token": token, "mount": signer.mount})
    with pytest.raises(BackendDenied, match=f'path "{signer.mount}/sign/{name}"'):
        await limited.sign(created.ref, "ES256", b"x")


async def test_a_reference_outside_the_key_name_prefix_is_refused(
    signer: VaultTransitSigner,
) -> None:
    with pytest.raises(BackendDenied, match="key_name_prefix"):
        await signer.sign({"key_name": "someone-elses-key"}, "ES256", b"x")


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"key_name": "k"}, r"backend\.key_name: not used with mode = 'remote'"),
        ({"key_name_prefix": "a/b"}, r"backend\.key_name_prefix"),
        ({"keyname_prefix": "x"}, "unknown setting"),
    ],
)
def test_bad_remote_settings_are_refused(options: dict[str, object], says: str) -> None:
    with pytest.raises(BackendConfigError, match=says):
        build_signer({"address": "http://127.0.0.1:1", **options})


def test_the_registry_builds_it() -> None:
    signer = make_remote_signer("vault-transit", {"address": "http://127.0.0.1:1"})
    assert signer.kind == "vault-transit"
    assert "one key per rotation" in signer.describe()


async def test_latency_per_remote_sign(signer: VaultTransitSigner) -> None:
    import statistics
    import time

    created = await signer.create_key("ES256", "/keyquorum/a")
    times = []
    for i in range(30):
        started = time.perf_counter()
        await signer.sign(created.ref, "ES256", b"message %d" % i)
        times.append(time.perf_counter() - started)
    print(f"\nvault-transit remote ES256 sign median {statistics.median(times) * 1000:.1f} ms")
