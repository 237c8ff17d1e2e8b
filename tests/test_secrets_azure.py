"""The Azure Key Vault secret store through the real azure-keyvault-secrets SDK, against the
local fake (tests/fakes/azure_secrets.py: TLS on 127.0.0.1, challenge auth, versions, tags).

What rests on the fake rather than on Azure: the REST shapes and error bodies (modelled on the
service's: a disabled version answers 403 SecretDisabled, PATCH replaces a version's tags whole)
and the answer for the versions of a secret that does not exist yet (404 here; the store also
copes with an empty list).
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
from fakes.azure_keyvault import FakeCredential
from fakes.azure_secrets import FakeSecretVault

from backends.azure_secrets import (
    CONTENT_TYPE,
    STABLE_TAG,
    AzureKeyVaultSecretStore,
    build_secret_store,
)
from backends.base import (
    BackendConfigError,
    BackendDenied,
    BackendUnavailable,
    SecretStore,
)
from backends.registry import make_secret_store

SECRET = "keyquorum-test-keys"
Make = Callable[..., AzureKeyVaultSecretStore]


@pytest.fixture
def vault() -> Iterator[FakeSecretVault]:
    with FakeSecretVault() as fake:
        yield fake


@pytest.fixture
def make(vault: FakeSecretVault) -> Iterator[Make]:
    """Builds stores for the fake vault (options override the defaults); closes them after."""
    made: list[AzureKeyVaultSecretStore] = []

    def factory(credential: Any = None, **options: Any) -> AzureKeyVaultSecretStore:
        settings = {
            "vault_url": vault.vault_url,
            "secret_name": SECRET,
            "ca_file": vault.ca_file,
            "timeout": 3.0,
            "attempt_timeout": 1.0,
            **options,
        }
        store = build_secret_store(
            {k: v for k, v in settings.items() if v is not None},
            credential=credential or vault.credential(),
            verify_challenge_resource=False,  # the fake's challenge names vault.azure.net
        )
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()


def key_document(i: int) -> bytes:
    return json.dumps({"kid": f"k{i}", "alg": "ES256", "pkcs8": os.urandom(64).hex()}).encode()


def tags_of(vault: FakeSecretVault, version: str) -> dict[str, str]:
    (found,) = [v for v in vault.secret_versions(SECRET) if v["version"] == version]
    return dict(found["tags"])


async def test_values_round_trip_as_base64_text_versions(
    vault: FakeSecretVault, make: Make
) -> None:
    store = make()
    assert isinstance(store, SecretStore)
    values = [key_document(1), b"", bytes(range(256)), b"\x00" * 10_000]
    refs = [await store.add_version(value) for value in values]
    assert len({r["version"] for r in refs}) == len(values)
    assert all(set(r) == {"version"} for r in refs)
    for ref, value in zip(refs, values, strict=True):
        assert await store.read(ref) == value
    stored = vault.secret_versions(SECRET)
    assert [v["version"] for v in stored] == [r["version"] for r in refs]
    assert base64.b64decode(stored[0]["value"]) == values[0]
    assert {v["content_type"] for v in stored} == {CONTENT_TYPE}


async def test_reads_return_exactly_the_named_version_never_the_latest(
    vault: FakeSecretVault, make: Make
) -> None:
    store = make()
    first = await store.add_version(b"first key")
    await store.add_version(b"second key")
    assert await store.read(first) == b"first key"
    assert vault.count("GET", f"/secrets/{SECRET}/{first['version']}") == 1
    assert vault.count("GET", f"/secrets/{SECRET}") == 0  # "the latest" is never asked for


async def test_the_stable_tag_moves_between_versions_keeping_other_tags(
    vault: FakeSecretVault, make: Make
) -> None:
    vault.page_size = 2  # the SDK must follow nextLink across pages
    store = make()
    assert await store.stable() is None  # the secret does not exist yet
    refs = [await store.add_version(key_document(i)) for i in range(5)]
    assert await store.stable() is None  # versions, none labelled
    vault.set_tags(SECRET, refs[1]["version"], {"owner": "platform-team"})
    await store.set_stable(refs[1])
    assert await store.stable() == refs[1]
    assert tags_of(vault, refs[1]["version"]) == {"owner": "platform-team", STABLE_TAG: "true"}
    await store.set_stable(refs[3])
    assert await store.stable() == refs[3]
    assert tags_of(vault, refs[1]["version"]) == {"owner": "platform-team"}
    await store.set_stable(refs[3])  # idempotent
    tagged = [v["version"] for v in vault.secret_versions(SECRET) if STABLE_TAG in v["tags"]]
    assert tagged == [refs[3]["version"]]
    await store.set_stable(refs[0])  # back to an older version (a rollback)
    assert await store.stable() == refs[0]


async def test_after_a_crash_between_the_two_updates_the_newest_tagged_version_wins(
    vault: FakeSecretVault, make: Make
) -> None:
    store = make()
    old, new = await store.add_version(b"old"), await store.add_version(b"new")
    now = int(time.time())
    vault.set_times(SECRET, old["version"], created=now - 60, updated=now - 60)
    for ref in (old, new):  # the new label was set, the old one not yet removed
        vault.set_tags(SECRET, ref["version"], {STABLE_TAG: "true"})
    assert await store.stable() == new
    await store.set_stable(new)  # the next move repairs it
    assert tags_of(vault, old["version"]) == {}
    assert await store.stable() == new


async def test_a_destroyed_version_is_disabled_and_reads_are_denied(
    vault: FakeSecretVault, make: Make
) -> None:
    store = make()
    kept, dropped = await store.add_version(b"kept"), await store.add_version(b"dropped")
    await store.set_stable(dropped)
    await store.destroy(dropped)
    await store.destroy(dropped)  # idempotent
    assert [v["enabled"] for v in vault.secret_versions(SECRET)] == [True, False]
    with pytest.raises(
        BackendDenied, match=r"destroyed \(disabled\).*not allowed on a disabled secret"
    ) as info:
        await store.read(dropped)
    assert "key set" in info.value.hint
    assert await store.read(kept) == b"kept"
    assert await store.stable() is None  # a destroyed version is never stable
    with pytest.raises(BackendDenied, match="destroyed"):
        await store.set_stable(dropped)
    await store.destroy({"version": "0" * 32})  # a version that never was: nothing to do


async def test_a_missing_version_is_denied(make: Make) -> None:
    store = make()
    await store.add_version(b"x")
    with pytest.raises(BackendDenied, match=r"no such secret version.*SecretNotFound"):
        await store.read({"version": "0" * 32})
    with pytest.raises(BackendDenied, match="no such version"):
        await store.set_stable({"version": "0" * 32})


async def test_a_malformed_reference_is_refused_without_a_request(
    vault: FakeSecretVault, make: Make
) -> None:
    store = make()
    for ref in ({"version": "../../keys/x"}, {"version": ""}, {"key_arn": "x"}):
        with pytest.raises(BackendDenied, match="names no Key Vault secret version"):
            await store.read(ref)
        with pytest.raises(BackendDenied):
            await store.destroy(ref)
    assert vault.requests == []


async def test_a_transient_outage_is_retried_and_a_lasting_one_is_unavailable(
    vault: FakeSecretVault, make: Make
) -> None:
    store = make(timeout=0.8, attempt_timeout=0.3)
    ref = await store.add_version(b"value")
    vault.fail_next(2)
    assert await store.read(ref) == b"value"
    vault.outage = True
    started = trio.current_time()
    with pytest.raises(BackendUnavailable, match=r"503.*gave up after \d+ attempts"):
        await store.read(ref)
    assert 0.7 < trio.current_time() - started < 3.0
    with pytest.raises(BackendUnavailable, match="gave up"):
        await store.add_version(b"another")
    vault.outage = False
    vault.stop()
    with pytest.raises(BackendUnavailable, match="cannot reach Key Vault"):
        await store.stable()


async def test_forbidden_calls_are_denied_naming_the_role_and_permission(
    vault: FakeSecretVault, make: Make
) -> None:
    store = make()
    ref = await store.add_version(b"value")
    vault.deny = {"secrets/get", "secrets/set"}
    with pytest.raises(BackendDenied, match="access denied") as reading:
        await store.read(ref)
    assert "'Key Vault Secrets User'" in reading.value.hint
    assert "secrets/get" in reading.value.hint
    with pytest.raises(BackendDenied, match="access denied") as writing:
        await store.add_version(b"another")
    assert "'Key Vault Secrets Officer'" in writing.value.hint
    assert "secrets/set" in writing.value.hint


async def test_rejected_credentials_are_a_config_error(make: Make) -> None:
    store = make(FakeCredential("not-the-vaults-token"))
    with pytest.raises(BackendConfigError, match="AZURE_CLIENT_ID") as info:
        await store.add_version(b"x")
    assert "not-the-vaults-token" not in str(info.value)


VAULT = "https://my-vault.vault.azure.net"


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"vault_url": VAULT}, r"backend\.secret_name: required for kind azure-secrets"),
        ({"secret_name": "s"}, r"backend\.vault_url: required for kind azure-secrets"),
        ({"vault_url": VAULT, "secret_name": "a/b"}, r"backend\.secret_name"),
        ({"vault_url": VAULT, "secret_name": "a_b"}, r"backend\.secret_name"),
        ({"vault_url": VAULT, "secret_name": "s" * 128}, r"backend\.secret_name"),
        ({"vault_url": VAULT, "secret_name": 7}, r"backend\.secret_name"),
        ({"vault_url": "http://127.0.0.1:1", "secret_name": "s"}, r"backend\.vault_url.*http"),
        ({"vault_url": f"{VAULT}/secrets/s", "secret_name": "s"}, r"backend\.vault_url"),
        ({"vault_url": VAULT, "secret_name": "s", "key_name": "k"}, "unknown setting.*key_name"),
        ({"vault_url": VAULT, "secret_name": "s", "ca_file": "/no/ca.pem"}, r"backend\.ca_file"),
        ({"vault_url": VAULT, "secret_name": "s", "attempt_timeout": -1}, "attempt_timeout"),
        ({"vault_url": VAULT, "secret_name": "s", "tenant_id": "t"}, r"backend\.tenant_id"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_setting(
    options: dict[str, Any], says: str
) -> None:
    with pytest.raises(BackendConfigError, match=says):
        make_secret_store("azure-secrets", options)


def test_the_registry_builds_it_with_service_principal_settings() -> None:
    store = make_secret_store(
        "azure-secrets",
        {
            "vault_url": f"{VAULT}/",
            "secret_name": "keyquorum-prod",
            "tenant_id": "00000000-0000-0000-0000-000000000001",
            "client_id": "00000000-0000-0000-0000-000000000002",
            "client_secret": "not-a-real-secret",
        },
    )
    try:
        assert isinstance(store, AzureKeyVaultSecretStore)
        assert store.kind == "azure-secrets"
        assert store.describe() == f"Azure Key Vault secret {VAULT}/secrets/keyquorum-prod"
        assert "not-a-real-secret" not in repr(store) + store.describe()
    finally:
        store.close()


async def test_median_add_version_and_read_latency(make: Make) -> None:
    store = make()
    await store.read(await store.add_version(b"warm-up"))
    times = []
    for i in range(30):
        value = key_document(i)
        started = time.perf_counter()
        ref = await store.add_version(value)
        assert await store.read(ref) == value
        times.append(time.perf_counter() - started)
    print(
        f"\nazure-secrets (fake over TLS) add_version+read median "
        f"{statistics.median(times) * 1000:.1f} ms"
    )
