"""Azure Key Vault key wrapper through the real azure-keyvault-keys SDK against a local fake.

No Key Vault emulator can be installed here, so tests/fakes/azure_keyvault.py stands in: HTTPS on
127.0.0.1 with a private CA, Key Vault's 401 challenge authentication, key versions, and real
RSA-OAEP-256 wrapKey/unwrapKey. What the tests rely on is the SDK's own behaviour on top of it:
the challenge flow and token scope, local public-key wrapping, remote unwrapping, and the
exception types azure-core raises for 401/403/404/5xx and for a vault that is not there.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
from fakes.azure_keyvault import FakeCredential, FakeKeyVault, versions_of
from wrapper_contract import PREFIX, check_key_wrapper, random_data_key

from backends.azure import AzureKeyVaultWrapper, build
from backends.base import BackendConfigError, BackendDenied, BackendUnavailable
from backends.envelope import context_for, open_sealed, seal
from backends.registry import make_key_wrapper

Make = Callable[..., AzureKeyVaultWrapper]


@pytest.fixture
def vault() -> Iterator[FakeKeyVault]:
    with FakeKeyVault() as fake:
        fake.create_key("kek")
        yield fake


@pytest.fixture
def make(vault: FakeKeyVault) -> Iterator[Make]:
    """Builds wrappers for the fake vault (options override the defaults); closes them after."""
    made: list[AzureKeyVaultWrapper] = []

    def factory(credential: Any = None, **options: Any) -> AzureKeyVaultWrapper:
        settings = {
            "vault_url": vault.vault_url,
            "key_name": "kek",
            "ca_file": vault.ca_file,
            "timeout": 3.0,
            "attempt_timeout": 1.0,
            **options,
        }
        settings = {k: v for k, v in settings.items() if v is not None}
        wrapper = build(
            settings,
            credential=credential or vault.credential(),
            verify_challenge_resource=False,  # the fake's challenge names vault.azure.net
        )
        made.append(wrapper)
        return wrapper

    yield factory
    for wrapper in made:
        wrapper.close()


async def test_key_vault_wrapper_meets_the_key_wrapper_contract(make: Make) -> None:
    await check_key_wrapper(make())


async def test_unwrap_runs_in_the_vault_after_challenge_auth(
    vault: FakeKeyVault, make: Make
) -> None:
    credential = vault.credential()
    wrapper = make(credential)
    assert vault.requests == []  # building a wrapper makes no request
    sealed = await seal(wrapper, b"private key", kid="k1", prefix=PREFIX)
    assert vault.count("POST", "/wrapkey") == 0  # RSA-OAEP under the public key, on this node
    assert vault.count("GET", "/keys/kek/") >= 1  # ...after reading the current version
    assert await open_sealed(wrapper, sealed, kid="k1", prefix=PREFIX) == b"private key"
    version = versions_of([sealed["data_key"]["key_id"]])[0]
    assert vault.count("POST", f"/keys/kek/{version}/unwrapkey") == 1
    scopes, kwargs = credential.calls[0]
    assert scopes == ("https://vault.azure.net/.default",)
    assert kwargs.get("tenant_id") == vault.tenant


async def test_old_data_keys_still_open_after_the_vault_key_rotates(
    vault: FakeKeyVault, make: Make
) -> None:
    wrapper = make()
    old = await seal(wrapper, b"old private key", kid="k1", prefix=PREFIX)
    first = old["data_key"]["key_id"]
    assert first.startswith(f"{vault.vault_url}/keys/kek/")
    second = vault.rotate_key("kek")
    new = await seal(wrapper, b"new private key", kid="k2", prefix=PREFIX)
    assert new["data_key"]["key_id"] == second != first  # the current version, resolved per wrap
    assert await open_sealed(wrapper, old, kid="k1", prefix=PREFIX) == b"old private key"
    assert await open_sealed(wrapper, new, kid="k2", prefix=PREFIX) == b"new private key"
    v1, v2 = versions_of([first, second])
    assert vault.count("POST", f"/{v1}/unwrapkey") == 1
    assert vault.count("POST", f"/{v2}/unwrapkey") == 1


async def test_concurrent_seals_and_opens_share_one_wrapper(make: Make) -> None:
    wrapper = make()
    opened: dict[int, bytes] = {}

    async def round_trip(i: int) -> None:
        sealed = await seal(wrapper, b"key %d" % i, kid=f"k{i}", prefix=PREFIX)
        opened[i] = await open_sealed(wrapper, sealed, kid=f"k{i}", prefix=PREFIX)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(round_trip, i)
    assert opened == {i: b"key %d" % i for i in range(8)}


async def test_a_pinned_key_version_is_used_after_rotation(vault: FakeKeyVault, make: Make) -> None:
    pinned = vault.key_id("kek", versions_of([vault.rotate_key("kek")])[0])
    vault.rotate_key("kek")
    wrapper = make(key_version=versions_of([pinned])[0])
    wrapped = await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    assert wrapped["key_id"] == pinned
    assert "version" in wrapper.describe()


async def test_forbidden_is_denied_and_names_the_role_to_grant(
    vault: FakeKeyVault, make: Make
) -> None:
    wrapper = make()
    wrapped = await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    vault.forbidden = True
    with pytest.raises(BackendDenied, match="Key Vault Crypto User") as wrapping:
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    assert "Forbidden" in wrapping.value.message
    with pytest.raises(BackendDenied, match="Key Vault Crypto User"):
        await wrapper.unwrap_data_key(wrapped, context_for("k1", PREFIX))


async def test_a_transient_outage_is_retried_until_the_vault_answers(
    vault: FakeKeyVault, make: Make
) -> None:
    wrapper = make()
    vault.fail_next(3)
    sealed = await seal(wrapper, b"private key", kid="k1", prefix=PREFIX)
    vault.fail_next(3)
    served = len(vault.requests)
    assert await open_sealed(wrapper, sealed, kid="k1", prefix=PREFIX) == b"private key"
    assert len(vault.requests) - served >= 4  # three 503s, then the answer


async def test_a_lasting_outage_is_unavailable_after_the_deadline(
    vault: FakeKeyVault, make: Make
) -> None:
    wrapper = make(timeout=0.6, attempt_timeout=0.3)
    vault.outage = True
    started = trio.current_time()
    with pytest.raises(BackendUnavailable, match=r"503.*gave up after \d+ attempts"):
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    assert 0.5 < trio.current_time() - started < 3.0


async def test_an_unreachable_vault_is_unavailable(vault: FakeKeyVault, make: Make) -> None:
    wrapper = make(timeout=0.6, attempt_timeout=0.3)
    wrapped = await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    vault.stop()  # closes the listener and the pooled keep-alive connection
    with pytest.raises(BackendUnavailable, match="cannot reach Key Vault"):
        await wrapper.unwrap_data_key(wrapped, context_for("k1", PREFIX))
    with pytest.raises(BackendUnavailable, match="cannot reach Key Vault"):
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))


async def test_a_missing_key_is_a_config_error_naming_the_setting(make: Make) -> None:
    wrapper = make(key_name="no-such-key")
    with pytest.raises(BackendConfigError, match=r"^backend\.key_name: .*KeyNotFound"):
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    pinned = make(key_version="0" * 32)
    with pytest.raises(BackendConfigError, match=r"^backend\.key_version: .*KeyNotFound"):
        await pinned.wrap_data_key(random_data_key(), context_for("k1", PREFIX))


async def test_a_deleted_key_version_is_denied_at_unwrap(vault: FakeKeyVault, make: Make) -> None:
    wrapper = make()
    wrapped = await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    gone = {**wrapped, "key_id": vault.key_id("kek", "0" * 32)}
    with pytest.raises(BackendDenied, match="no longer exists"):
        await wrapper.unwrap_data_key(gone, context_for("k1", PREFIX))


async def test_a_record_naming_another_vault_is_refused_without_a_request(
    vault: FakeKeyVault, make: Make
) -> None:
    wrapper = make()
    wrapped = await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    served = len(vault.requests)
    elsewhere = wrapped["key_id"].replace(vault.vault_url, "https://evil.example")
    with pytest.raises(BackendDenied, match=r"backend\.vault_url"):
        await wrapper.unwrap_data_key({**wrapped, "key_id": elsewhere}, context_for("k1", PREFIX))
    with pytest.raises(BackendDenied, match="context digest"):
        await wrapper.unwrap_data_key(wrapped, context_for("k1", "/another/cluster"))
    assert len(vault.requests) == served  # the token never left for another host


async def test_a_disabled_key_version_is_denied(vault: FakeKeyVault, make: Make) -> None:
    wrapper = make()
    wrapped = await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    vault.disable("kek", versions_of([wrapped["key_id"]])[0])
    with pytest.raises(BackendDenied, match="disabled"):
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    with pytest.raises(BackendDenied, match="disabled"):
        await wrapper.unwrap_data_key(wrapped, context_for("k1", PREFIX))


async def test_rejected_credentials_are_a_config_error_naming_them(make: Make) -> None:
    wrapper = make(FakeCredential("not-the-vaults-token"))
    with pytest.raises(BackendConfigError, match="AZURE_CLIENT_ID") as info:
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    assert "backend.client_id" in info.value.hint
    assert "not-the-vaults-token" not in str(info.value)


async def test_an_untrusted_certificate_is_a_config_error_naming_ca_file(
    vault: FakeKeyVault, make: Make
) -> None:
    wrapper = make(ca_file=None)  # the system CAs do not know the fake's private CA
    with pytest.raises(BackendConfigError, match=r"backend\.ca_file"):
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"vault_url": "http://127.0.0.1:1", "key_name": "kek"}, r"backend\.vault_url.*http"),
        ({"vault_url": "https://v.vault.azure.net/keys", "key_name": "k"}, r"backend\.vault_url"),
        ({"key_name": "kek"}, r"backend\.vault_url"),
        ({"vault_url": "https://v.vault.azure.net"}, r"backend\.key_name"),
        ({"vault_url": "https://v.vault.azure.net", "key_name": "a/b"}, r"backend\.key_name"),
        ({"vault_url": "https://v.vault.azure.net", "key_name": "k", "key_version": "../x"}, "ver"),
        ({"vault_url": "https://v.vault.azure.net", "key_name": "k", "ca_file": "/nope"}, "ca_fi"),
        ({"vault_url": "https://v.vault.azure.net", "key_name": "k", "region": "x"}, "region"),
        ({"vault_url": "https://v.vault.azure.net", "key_name": "k", "timeout": 0}, "timeout"),
        (
            {"vault_url": "https://v.vault.azure.net", "key_name": "k", "client_secret": "s"},
            r"backend\.client_secret.*tenant_id",
        ),
        (
            {"vault_url": "https://v.vault.azure.net", "key_name": "k", "tenant_id": "t"},
            r"backend\.tenant_id",
        ),
    ],
)
def test_bad_settings_are_config_errors_naming_the_setting(
    options: dict[str, Any], says: str
) -> None:
    with pytest.raises(BackendConfigError, match=says):
        make_key_wrapper("azure-keyvault", options)


def test_the_registry_builds_it_with_service_principal_settings() -> None:
    wrapper = make_key_wrapper(
        "azure-keyvault",
        {
            "vault_url": "https://my-vault.vault.azure.net/",
            "key_name": "keyquorum-kek",
            "tenant_id": "00000000-0000-0000-0000-000000000001",
            "client_id": "00000000-0000-0000-0000-000000000002",
            "client_secret": "not-a-real-secret",
        },
    )
    try:
        assert isinstance(wrapper, AzureKeyVaultWrapper)
        assert wrapper.kind == "azure-keyvault"
        assert wrapper.describe() == (
            "Azure Key Vault key https://my-vault.vault.azure.net/keyquorum-kek"
        )
        assert "not-a-real-secret" not in repr(wrapper) + wrapper.describe()
    finally:
        wrapper.close()


def test_without_credential_settings_it_uses_the_default_azure_credential() -> None:
    wrapper = make_key_wrapper(
        "azure-keyvault", {"vault_url": "https://my-vault.vault.azure.net", "key_name": "kek"}
    )
    try:
        assert type(wrapper._credential).__name__ == "DefaultAzureCredential"
    finally:
        wrapper.close()


async def test_median_wrap_and_unwrap_latency(vault: FakeKeyVault, make: Make) -> None:
    wrapper = make()
    context = context_for("k1", PREFIX)
    await wrapper.unwrap_data_key(await wrapper.wrap_data_key(random_data_key(), context), context)
    times = []
    for _ in range(30):
        started = time.perf_counter()
        data_key = random_data_key()
        wrapped = await wrapper.wrap_data_key(data_key, context)
        assert await wrapper.unwrap_data_key(wrapped, context) == data_key
        times.append(time.perf_counter() - started)
    print(
        f"\nazure-keyvault (fake over TLS) wrap+unwrap median "
        f"{statistics.median(times) * 1000:.1f} ms"
    )
