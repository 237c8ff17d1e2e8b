"""Remote signing with Azure Key Vault through the real azure-keyvault-keys SDK, against the local
fake (tests/fakes/azure_keyvault.py: TLS on 127.0.0.1, challenge auth, real key pairs).

What rests on the fake rather than on Azure: the REST shapes and error bodies (modelled on the
service's), Key Vault returning ES256/ES384 signatures as raw r||s (measured on the service, see
shared/notes/backends-testing.md), PS256 salted with the hash length, and soft delete (the fake
keeps deleted keys but cannot recover or purge them).
"""

from __future__ import annotations

import hashlib
import re
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
from fakes.azure_keyvault import FakeCredential, FakeKeyVault

from agent.crypto import verify_signature
from backends.azure import PREFIX_TAG, AzureKeyVaultSigner, build_signer
from backends.base import (
    BackendConfigError,
    BackendDenied,
    BackendUnavailable,
    RemoteSigner,
)
from backends.registry import make_remote_signer
from backends.remote import RemoteKeySigner, jwk_of_pem, remote_private

PREFIX = "/keyquorum/remote-test"
Make = Callable[..., AzureKeyVaultSigner]


@pytest.fixture
def vault() -> Iterator[FakeKeyVault]:
    with FakeKeyVault() as fake:
        yield fake


@pytest.fixture
def make(vault: FakeKeyVault) -> Iterator[Make]:
    """Builds signers for the fake vault (options override the defaults); closes them after."""
    made: list[AzureKeyVaultSigner] = []

    def factory(credential: Any = None, **options: Any) -> AzureKeyVaultSigner:
        settings = {
            "vault_url": vault.vault_url,
            "ca_file": vault.ca_file,
            "timeout": 3.0,
            "attempt_timeout": 1.0,
            **options,
        }
        signer = build_signer(
            {k: v for k, v in settings.items() if v is not None},
            credential=credential or vault.credential(),
            verify_challenge_resource=False,  # the fake's challenge names vault.azure.net
        )
        made.append(signer)
        return signer

    yield factory
    for signer in made:
        signer.close()


@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256", "PS256"])
async def test_keys_created_in_the_vault_sign_verifiable_jws_signatures(
    vault: FakeKeyVault, make: Make, alg: str
) -> None:
    signer = make()
    assert isinstance(signer, RemoteSigner)
    assert signer.supports(alg)
    created = await signer.create_key(alg, PREFIX)
    name = created.ref["key_name"]
    cluster = hashlib.sha256(PREFIX.encode()).hexdigest()[:8]
    assert re.fullmatch(rf"keyquorum-{cluster}-[0-9a-f]{{16}}", name)
    assert set(created.ref) == {"key_name", "key_version"}
    assert created.created_at is not None
    assert abs(created.created_at - time.time() * 1000) < 5000
    bundle = vault.bundle(name)
    assert bundle["key"]["key_ops"] == ["sign", "verify"]
    assert bundle["attributes"]["exportable"] is False
    assert bundle["tags"] == {PREFIX_TAG: PREFIX}
    assert bundle["key"]["kty"] == ("EC" if alg.startswith("ES") else "RSA")

    jwk = jwk_of_pem(created.public_key_pem, alg)
    for message in (b"", b"hello", b"x" * 10_000):
        signature = await signer.sign(created.ref, alg, message)
        assert verify_signature(jwk, message, signature), (alg, len(message))
    assert not verify_signature(jwk, b"another message", signature)
    assert vault.count("POST", f"/keys/{name}/{created.ref['key_version']}/sign") == 3

    # Another node: no cached client; it loads the record (keys/get), then signs.
    follower = make()
    loaded = await RemoteKeySigner.load(
        follower, remote_private("azure-keyvault", created.ref), alg, jwk
    )
    assert verify_signature(jwk, b"keyring", await loaded.sign_async(b"keyring"))


async def test_a_signer_without_a_cached_key_reads_it_once_then_signs(
    vault: FakeKeyVault, make: Make
) -> None:
    created = await make().create_key("ES256", PREFIX)
    fresh = make()
    jwk = jwk_of_pem(created.public_key_pem, "ES256")
    name = created.ref["key_name"]
    for i in range(3):
        assert verify_signature(jwk, b"m%d" % i, await fresh.sign(created.ref, "ES256", b"m%d" % i))
    assert vault.count("GET", f"/keys/{name}/{created.ref['key_version']}") == 1


async def test_eddsa_and_untaggable_prefixes_are_refused_without_a_request(
    vault: FakeKeyVault, make: Make
) -> None:
    signer = make()
    assert not signer.supports("EdDSA")
    with pytest.raises(BackendConfigError, match=r"keys\.algorithm.*EdDSA"):
        await signer.create_key("EdDSA", PREFIX)
    with pytest.raises(BackendConfigError, match=r"store\.prefix: 257 characters"):
        await signer.create_key("ES256", "/" + "p" * 256)
    assert vault.requests == []


async def test_owned_keys_are_the_prefix_s_tagged_enabled_keys(
    vault: FakeKeyVault, make: Make
) -> None:
    vault.page_size = 2  # the SDK must follow nextLink across pages
    signer = make()
    mine = [await signer.create_key("ES256", PREFIX) for _ in range(4)]
    theirs = await signer.create_key("ES256", "/another/cluster")
    other_prefix = make(key_name_prefix="other")
    foreign = await other_prefix.create_key("ES256", PREFIX)  # same cluster, other name prefix
    # A key with this cluster's name pattern but no tag (made by hand) is not ours.
    vault.create_key(f"keyquorum-{hashlib.sha256(PREFIX.encode()).hexdigest()[:8]}-byhand")
    vault.disable(mine[3].ref["key_name"], mine[3].ref["key_version"])

    owned = await signer.owned_keys(PREFIX)
    assert sorted(k.ref["key_name"] for k in owned) == sorted(k.ref["key_name"] for k in mine[:3])
    by_name = {k.ref["key_name"]: k for k in owned}
    for key in mine[:3]:  # the very reference create_key returned: the agent compares them
        assert by_name[key.ref["key_name"]].ref == key.ref
        assert by_name[key.ref["key_name"]].created_at == key.created_at
    assert [k.ref for k in await signer.owned_keys("/another/cluster")] == [theirs.ref]
    assert [k.ref for k in await other_prefix.owned_keys(PREFIX)] == [foreign.ref]
    assert await signer.owned_keys("/no/such/cluster") == []


async def test_a_version_added_in_the_vault_changes_neither_reference_nor_signatures(
    vault: FakeKeyVault, make: Make
) -> None:
    signer = make()
    created = await signer.create_key("ES256", PREFIX)
    name, version = created.ref["key_name"], created.ref["key_version"]
    vault.set_created(name, version, int(time.time()) - 60)
    vault.rotate_key(name)  # someone adds a version by hand, untagged...
    vault.rotate_key(name, tags={PREFIX_TAG: PREFIX})  # ...or with the tags copied
    assert [k.ref for k in await signer.owned_keys(PREFIX)] == [created.ref]
    jwk = jwk_of_pem(created.public_key_pem, "ES256")
    assert verify_signature(jwk, b"pinned", await make().sign(created.ref, "ES256", b"pinned"))


async def test_retire_soft_deletes_the_key_and_it_leaves_owned_keys(
    vault: FakeKeyVault, make: Make
) -> None:
    signer = make()
    mine = [await signer.create_key("ES256", PREFIX) for _ in range(2)]
    await signer.sign(mine[0].ref, "ES256", b"before")
    await signer.retire(mine[0].ref)
    assert [k.ref for k in await signer.owned_keys(PREFIX)] == [mine[1].ref]
    assert mine[0].ref["key_name"] in vault.deleted_keys  # soft-deleted, recoverable
    with pytest.raises(BackendDenied, match=r"no such key.*KeyNotFound"):
        await signer.sign(mine[0].ref, "ES256", b"after retirement")
    await signer.retire(mine[0].ref)  # idempotent: a lost answer is retried safely
    assert vault.count("DELETE", f"/keys/{mine[0].ref['key_name']}") == 2


async def test_forbidden_sign_is_denied_naming_the_role_and_permission(
    vault: FakeKeyVault, make: Make
) -> None:
    signer = make()
    created = await signer.create_key("ES256", PREFIX)
    vault.deny = {"keys/sign"}
    for who in (signer, make()):  # with a cached key, and reading it first
        with pytest.raises(BackendDenied, match="access denied") as info:
            await who.sign(created.ref, "ES256", b"x")
        assert "'Key Vault Crypto User'" in info.value.hint
        assert "keys/sign" in info.value.hint
        assert "ForbiddenByRbac" not in info.value.hint
    vault.deny = {"keys/create"}
    with pytest.raises(BackendDenied, match="access denied") as creating:
        await signer.create_key("ES256", PREFIX)
    assert "'Key Vault Crypto Officer'" in creating.value.hint
    assert "keys/create" in creating.value.hint


async def test_a_disabled_key_is_denied_as_disabled(vault: FakeKeyVault, make: Make) -> None:
    signer = make()
    created = await signer.create_key("ES256", PREFIX)
    vault.disable(created.ref["key_name"], created.ref["key_version"])
    with pytest.raises(BackendDenied, match="disabled") as info:
        await signer.sign(created.ref, "ES256", b"x")
    assert "enable it again" in info.value.hint


async def test_an_algorithm_that_does_not_fit_the_key_is_denied(make: Make) -> None:
    signer = make()
    created = await signer.create_key("ES256", PREFIX)
    with pytest.raises(BackendDenied, match="refused the request"):
        await signer.sign(created.ref, "ES384", b"x")


async def test_a_reference_outside_the_key_name_prefix_is_refused_without_a_request(
    vault: FakeKeyVault, make: Make
) -> None:
    signer = make()
    for ref in (
        {"key_name": "someone-elses-key", "key_version": "0" * 32},
        {"key_name": "keyquorum-x", "key_version": "../../secrets/x"},
        {"key_name": "keyquorum/../x", "key_version": "0" * 32},
        {"key_arn": "arn:aws:kms:x"},
    ):
        with pytest.raises(BackendDenied, match=r"key_name_prefix|not a key version"):
            await signer.sign(ref, "ES256", b"x")
        with pytest.raises(BackendDenied):
            await signer.retire(ref)
    assert vault.requests == []


async def test_a_transient_outage_is_retried_and_a_lasting_one_is_unavailable(
    vault: FakeKeyVault, make: Make
) -> None:
    signer = make(timeout=0.8, attempt_timeout=0.3)
    created = await signer.create_key("ES256", PREFIX)
    vault.fail_next(2)
    jwk = jwk_of_pem(created.public_key_pem, "ES256")
    assert verify_signature(jwk, b"x", await signer.sign(created.ref, "ES256", b"x"))
    vault.outage = True
    started = trio.current_time()
    with pytest.raises(BackendUnavailable, match=r"503.*gave up after \d+ attempts"):
        await signer.sign(created.ref, "ES256", b"x")
    assert 0.7 < trio.current_time() - started < 3.0
    vault.outage = False
    vault.stop()
    with pytest.raises(BackendUnavailable, match="cannot reach Key Vault"):
        await signer.owned_keys(PREFIX)


async def test_rejected_credentials_are_a_config_error(make: Make) -> None:
    signer = make(FakeCredential("not-the-vaults-token"))
    with pytest.raises(BackendConfigError, match="AZURE_CLIENT_ID") as info:
        await signer.create_key("ES256", PREFIX)
    assert "not-the-vaults-token" not in str(info.value)


VAULT = "https://my-vault.vault.azure.net"


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"vault_url": VAULT, "key_name": "k"}, r"backend\.key_name: not used with mode = 'remo"),
        ({"vault_url": VAULT, "key_version": "0" * 32}, r"backend\.key_version: not used"),
        ({"vault_url": VAULT, "key_name_prefix": "a/b"}, r"backend\.key_name_prefix"),
        ({"vault_url": VAULT, "key_name_prefix": "a_b"}, r"backend\.key_name_prefix"),
        ({"vault_url": VAULT, "key_name_prefix": "k" * 102}, r"backend\.key_name_prefix: .*1-101"),
        ({"vault_url": VAULT, "key_name_prefix": ""}, r"backend\.key_name_prefix"),
        ({"vault_url": VAULT, "keyname_prefix": "x"}, "unknown setting.*keyname_prefix"),
        ({"vault_url": VAULT, "deletion_window_days": 7}, "unknown setting"),
        ({"vault_url": "http://127.0.0.1:1"}, r"backend\.vault_url.*http"),
        ({"vault_url": f"{VAULT}/keys/x"}, r"backend\.vault_url"),
        ({}, r"backend\.vault_url: required"),
        ({"vault_url": VAULT, "ca_file": "/no/such/ca.pem"}, r"backend\.ca_file"),
        ({"vault_url": VAULT, "timeout": 0}, r"backend\.timeout"),
        ({"vault_url": VAULT, "client_secret": "s"}, r"backend\.client_secret.*tenant_id"),
    ],
)
def test_bad_remote_settings_are_refused_naming_the_setting(
    options: dict[str, Any], says: str
) -> None:
    with pytest.raises(BackendConfigError, match=says) as info:
        make_remote_signer("azure-keyvault", options)
    if "key_name" in options or "key_version" in options:
        assert "key_name_prefix" in info.value.hint


def test_the_registry_builds_it_with_service_principal_settings() -> None:
    signer = make_remote_signer(
        "azure-keyvault",
        {
            "vault_url": f"{VAULT}/",
            "key_name_prefix": "kq-prod",
            "tenant_id": "00000000-0000-0000-0000-000000000001",
            "client_id": "00000000-0000-0000-0000-000000000002",
            "client_secret": "not-a-real-secret",
            "timeout": 5,
        },
    )
    try:
        assert isinstance(signer, AzureKeyVaultSigner)
        assert signer.kind == "azure-keyvault"
        assert signer.policy.deadline == 5
        assert signer.describe() == f"Azure Key Vault {VAULT}, one key per rotation (kq-prod-*)"
        assert "not-a-real-secret" not in repr(signer) + signer.describe()
    finally:
        signer.close()


async def test_median_remote_sign_latency(make: Make) -> None:
    signer = make()
    created = await signer.create_key("ES256", PREFIX)
    await signer.sign(created.ref, "ES256", b"warm-up")
    times = []
    for i in range(30):
        started = time.perf_counter()
        await signer.sign(created.ref, "ES256", b"message %d" % i)
        times.append(time.perf_counter() - started)
    print(
        f"\nazure-keyvault (fake over TLS) remote ES256 sign median "
        f"{statistics.median(times) * 1000:.1f} ms"
    )
