"""Vault/OpenBao KV v2 secret store against a real OpenBao dev server (KV v2 at secret/).

Everything here is the real engine: versions, check-and-set, custom metadata, destroy, ACL
policies, the 404 a deleted or destroyed version answers with. What the dev server does not
show: HashiCorp Vault Enterprise namespaces (the header is sent, not exercised), performance
standbys (473) and a sealed server (503), which are mapped by status code only, and
max_versions pruning after 1000 versions (only the setting is checked).
"""

from __future__ import annotations

import base64
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from servers import OpenBaoServer

from backends.base import BackendConfigError, BackendDenied, BackendUnavailable, SecretStore
from backends.registry import make_secret_store
from backends.vault_kv import MAX_VERSIONS, VaultKvStore, build_secret_store


def store_for(server: OpenBaoServer, path: str, **extra: Any) -> VaultKvStore:
    return build_secret_store({"address": server.url, "token": server.token, "path": path, **extra})


@pytest.fixture
def path() -> str:
    return f"keyquorum/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(openbao: OpenBaoServer, path: str) -> VaultKvStore:
    return store_for(openbao, path)


def metadata(server: OpenBaoServer, path: str, mount: str = "secret") -> dict[str, Any]:
    return dict(server.api("GET", f"{mount}/metadata/{path}")["data"])


async def test_versions_round_trip_and_old_versions_read_exactly(
    store: VaultKvStore, openbao: OpenBaoServer, path: str
) -> None:
    assert isinstance(store, SecretStore)
    values = [b'{"kid": "k%d"}' % i for i in range(3)] + [bytes(range(256))]
    refs = [await store.add_version(value) for value in values]
    assert refs == [{"version": str(n)} for n in range(1, 5)]
    for ref, value in reversed(list(zip(refs, values, strict=True))):
        assert await store.read(ref) == value
    assert metadata(openbao, path)["max_versions"] == MAX_VERSIONS
    with pytest.raises(BackendDenied, match="no such version"):
        await store.read({"version": "5"})  # never "the latest": not written yet
    for bad in ({}, {"version": "0"}, {"version": "latest"}, {"version": "-1"}):
        with pytest.raises(BackendDenied, match="names no KV version"):
            await store.read(bad)


async def test_a_stale_check_and_set_retries_and_never_overwrites(
    openbao: OpenBaoServer, path: str
) -> None:
    first, second = store_for(openbao, path), store_for(openbao, path)
    one = await first.add_version(b"first's")  # first now believes version 1 is current
    two = await second.add_version(b"second's")
    three = await first.add_version(b"first's again")  # cas=1 is stale: re-read, retry
    assert [one, two, three] == [{"version": str(n)} for n in (1, 2, 3)]
    assert [await second.read(r) for r in (one, two, three)] == [
        b"first's",
        b"second's",
        b"first's again",
    ]


async def test_two_stores_adding_concurrently_both_succeed_with_distinct_versions(
    openbao: OpenBaoServer, path: str
) -> None:
    stores = [store_for(openbao, path), store_for(openbao, path)]
    written: dict[str, bytes] = {}

    async def add(store: VaultKvStore, value: bytes) -> None:
        written[(await store.add_version(value))["version"]] = value

    for round_ in range(5):
        async with trio.open_nursery() as nursery:
            for i, store in enumerate(stores):
                nursery.start_soon(add, store, b"store %d round %d" % (i, round_))
    assert sorted(written, key=int) == [str(n) for n in range(1, 11)]
    for version, value in written.items():
        assert await stores[0].read({"version": version}) == value


async def test_a_write_that_landed_before_a_conflict_is_not_written_twice(
    store: VaultKvStore, openbao: OpenBaoServer, path: str
) -> None:
    """The answer to our write was lost and the retry hits a stale cas: the version that moved
    on holds our value, so it is ours."""
    await store.add_version(b"one")
    encoded = base64.b64encode(b"lost answer").decode()
    openbao.api("POST", f"secret/data/{path}", {"data": {"key": encoded}, "options": {"cas": 1}})
    assert await store.add_version(b"lost answer") == {"version": "2"}
    assert metadata(openbao, path)["current_version"] == 2


class _AlwaysStale(VaultKvStore):
    """Sees version 1 as current forever, as if another writer kept winning."""

    async def _read_metadata(self, http: httpx.AsyncClient) -> dict[str, Any]:
        return {**await super()._read_metadata(http), "current_version": 1}


async def test_a_second_conflict_in_a_row_fails_clearly(
    store: VaultKvStore, openbao: OpenBaoServer, path: str
) -> None:
    await store.add_version(b"one")
    await store.add_version(b"two")
    stale = _AlwaysStale(openbao.url, path, store.policy, token=openbao.token)
    with pytest.raises(BackendDenied, match="another writer added versions concurrently"):
        await stale.add_version(b"three")
    assert metadata(openbao, path)["current_version"] == 2  # nothing overwritten


async def test_stable_moves_between_versions_and_keeps_other_metadata(
    store: VaultKvStore, openbao: OpenBaoServer, path: str
) -> None:
    assert await store.stable() is None  # no secret yet
    one, two = await store.add_version(b"one"), await store.add_version(b"two")
    assert await store.stable() is None
    openbao.api("POST", f"secret/metadata/{path}", {"custom_metadata": {"owner": "team-a"}})
    await store.set_stable(one)
    assert await store.stable() == one
    await store.set_stable(two)
    assert await store.stable() == two
    await store.set_stable(two)  # already there
    assert metadata(openbao, path)["custom_metadata"] == {"owner": "team-a", "stable": "2"}
    await store.add_version(b"three")
    assert await store.stable() == two


async def test_destroyed_versions_are_denied_and_lose_the_stable_label(
    store: VaultKvStore, openbao: OpenBaoServer, path: str
) -> None:
    await store.destroy({"version": "1"})  # no secret yet: nothing to do
    one, two = await store.add_version(b"one"), await store.add_version(b"two")
    await store.set_stable(one)
    await store.destroy(one)
    with pytest.raises(BackendDenied, match="no such version"):
        await store.read(one)
    assert metadata(openbao, path)["versions"]["1"]["destroyed"] is True
    assert await store.stable() is None
    await store.destroy(one)  # idempotent
    with pytest.raises(BackendDenied, match="cannot label version 1 stable"):
        await store.set_stable(one)
    assert await store.read(two) == b"two"
    openbao.api("POST", f"secret/delete/{path}", {"versions": [2]})  # a soft delete
    with pytest.raises(BackendDenied, match="no such version"):
        await store.read(two)


async def test_a_token_without_the_policy_is_denied_naming_the_path(
    store: VaultKvStore, openbao: OpenBaoServer, path: str
) -> None:
    ref = await store.add_version(b"one")
    reader = openbao.token_with_policy(
        f"kv-reader-{uuid.uuid4().hex[:6]}",
        f'path "secret/data/{path}" {{ capabilities = ["read"] }}\n'
        f'path "secret/metadata/{path}" {{ capabilities = ["read"] }}',
    )
    limited = build_secret_store({"address": openbao.url, "token": reader, "path": path})
    assert await limited.read(ref) == b"one"
    assert await limited.stable() is None
    with pytest.raises(BackendDenied) as caught:
        await limited.add_version(b"two")
    assert f'path "secret/data/{path}" {{ capabilities = ["create", "update"] }}' in str(
        caught.value
    )
    with pytest.raises(BackendDenied, match=f'path "secret/destroy/{path}"'):
        await limited.destroy(ref)
    with pytest.raises(BackendDenied, match=f'path "secret/metadata/{path}"'):
        await limited.set_stable(ref)
    nobody = openbao.token_with_policy("kv-nothing", 'path "nothing/*" { capabilities = ["read"] }')
    stranger = build_secret_store({"address": openbao.url, "token": nobody, "path": path})
    with pytest.raises(BackendDenied, match=rf'path "secret/data/{path}" .*\["read"\]'):
        await stranger.read(ref)


async def test_a_mount_that_is_not_kv_v2_is_a_config_error(
    openbao: OpenBaoServer, path: str
) -> None:
    kv1 = f"kv1-{uuid.uuid4().hex[:6]}"
    openbao.api("POST", f"sys/mounts/{kv1}", {"type": "kv", "options": {"version": "1"}})
    with pytest.raises(BackendConfigError, match=r"backend\.mount: .* not KV version 2"):
        await store_for(openbao, path, mount=kv1).add_version(b"x")
    listed = httpx.request(
        "LIST", f"{openbao.url}/v1/{kv1}", headers={"X-Vault-Token": openbao.token}
    )
    assert listed.status_code == 404  # refused before writing anything there
    with pytest.raises(BackendConfigError, match=r"no secrets engine mounted at nowhere"):
        await store_for(openbao, path, mount="nowhere").add_version(b"x")


async def test_a_token_file_is_read_on_every_call(
    openbao: OpenBaoServer, path: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("wrong-token\n")
    token_file.chmod(0o600)
    store = build_secret_store(
        {"address": openbao.url, "token_file": str(token_file), "path": path}
    )
    with pytest.raises(BackendDenied, match="permission denied"):
        await store.stable()
    token_file.write_text(openbao.token)  # the sidecar renewed it
    assert await store.stable() is None


async def test_a_paused_server_is_abandoned_at_the_deadline_and_works_after(
    short_tmp: Path, path: str
) -> None:
    with OpenBaoServer(short_tmp / "bao") as server:
        store = store_for(server, path, timeout=1.0, attempt_timeout=0.3)
        ref = await store.add_version(b"before the outage")
        server.pause()
        try:
            for operation in (lambda: store.read(ref), lambda: store.add_version(b"during")):
                started = time.monotonic()
                with pytest.raises(BackendUnavailable, match="gave up after"):
                    await operation()
                assert time.monotonic() - started < 2.5
        finally:
            server.resume()
        assert await store.read(ref) == b"before the outage"
    with pytest.raises(BackendUnavailable, match="cannot reach"):  # server gone: refused
        await store.read(ref)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"path": "p"}, r"backend\.address: required"),
        ({"address": "vault:8200", "path": "p"}, r"backend\.address.*not an http"),
        ({"address": "http://127.0.0.1:1"}, r"backend\.path: required"),
        ({"address": "http://127.0.0.1:1", "path": "/abs"}, r"backend\.path"),
        ({"address": "http://127.0.0.1:1", "path": "a/../b"}, r"backend\.path"),
        ({"address": "http://127.0.0.1:1", "path": "a?b"}, r"backend\.path"),
        ({"address": "http://127.0.0.1:1", "path": "p", "mount": ""}, r"backend\.mount"),
        ({"address": "http://127.0.0.1:1", "path": "p", "pth": "x"}, "unknown setting.*pth"),
        ({"address": "http://127.0.0.1:1", "path": "p", "timeout": -1}, r"backend\.timeout"),
        (
            {"address": "http://127.0.0.1:1", "path": "p", "token": "a", "token_file": "b"},
            "both set",
        ),
        (
            {"address": "http://127.0.0.1:1", "path": "p", "token_file": "/nonexistent/t"},
            r"backend\.token_file: cannot open",
        ),
        (
            {"address": "http://127.0.0.1:1", "path": "p", "ca_file": "/nonexistent/ca"},
            r"backend\.ca_file",
        ),
    ],
)
def test_bad_settings_are_refused_at_start_up(options: dict[str, Any], says: str) -> None:
    with pytest.raises(BackendConfigError, match=says):
        build_secret_store(options)


async def test_no_token_anywhere_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VAULT_TOKEN", "BAO_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    store = build_secret_store({"address": "http://127.0.0.1:1", "path": "p"})
    with pytest.raises(BackendConfigError, match="no token"):
        await store.stable()


def test_the_registry_builds_it(openbao: OpenBaoServer) -> None:
    store = make_secret_store("vault-kv", {"address": openbao.url, "path": "kq/registry"})
    assert isinstance(store, VaultKvStore)
    assert store.kind == "vault-kv"
    assert "secret/kq/registry" in store.describe()
    assert "token" not in repr(store).lower()


async def test_latency_per_add_version_and_read(store: VaultKvStore) -> None:
    await store.add_version(b"warm-up")  # creates the secret, raises max_versions
    times = []
    for i in range(30):
        started = time.perf_counter()
        ref = await store.add_version(b"key %d" % i)
        await store.read(ref)
        times.append(time.perf_counter() - started)
    print(f"\nvault-kv add_version+read median {statistics.median(times) * 1000:.1f} ms")
