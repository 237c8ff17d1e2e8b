"""GCP Secret Manager as the secret store, through the google-cloud-secret-manager SDK's own REST
transport.

Secret Manager has no emulator: the server is tests/fakes/gcp_secrets.py, a fake on 127.0.0.1 in
the real REST wire format. Like the real service it names resources by project number in its
answers (here kq-test is project 123456789012). What the fake cannot show: real IAM, quotas,
replication, delayed destruction (a destroyed version is DISABLED with a scheduled time first),
whether the real service refuses to destroy a version an alias points at, and its exact messages
for a second destroy or a stale etag (the store accepts the plausible variants).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fakes.gcp_secrets import FakeSecretManager

from backends.base import BackendConfigError, BackendDenied, BackendUnavailable, SecretStore
from backends.gcp_secrets import GcpSecretStore, build_secret_store
from backends.registry import make_secret_store

SECRET = "projects/kq-test/secrets/keyquorum-keys"
NUMBERED = "projects/123456789012/secrets/keyquorum-keys"
Make = Callable[..., GcpSecretStore]


@pytest.fixture
def sm() -> Iterator[FakeSecretManager]:
    with FakeSecretManager(project_numbers={"kq-test": "123456789012"}) as fake:
        yield fake


@pytest.fixture
def make(sm: FakeSecretManager) -> Iterator[Make]:
    """Builds stores against the fake; closes their connections before the fake stops."""
    made: list[GcpSecretStore] = []

    def make_store(**options: Any) -> GcpSecretStore:
        store = build_secret_store({"secret_name": SECRET, "endpoint": sm.endpoint, **options})
        made.append(store)
        return store

    yield make_store
    for store in made:
        store.close()


@pytest.fixture
def store(make: Make) -> GcpSecretStore:
    return make()


def version(number: int) -> dict[str, str]:
    return {"version": f"{SECRET}/versions/{number}"}


# ---- behaviour against the fake -----------------------------------------------------------------


async def test_the_first_version_creates_the_secret_and_reads_back(
    store: GcpSecretStore, sm: FakeSecretManager
) -> None:
    assert isinstance(store, SecretStore)
    assert await store.stable() is None  # no secret yet
    value = b'{"kid": "k1", "alg": "ES256", "pkcs8": "..."}'
    ref = await store.add_version(value)
    # Spelled with the configured project id, although Secret Manager answers with the number.
    assert ref == version(1)
    assert await store.read(ref) == value
    secret = sm.secret(SECRET)
    assert secret["name"] == NUMBERED
    assert secret["labels"] == {"keyquorum": "managed"}
    assert secret["replication"] == {"automatic": {}}
    assert await store.stable() is None


async def test_reads_are_of_exactly_the_version_named_after_newer_versions(
    store: GcpSecretStore, sm: FakeSecretManager
) -> None:
    values = [os.urandom(200) for _ in range(4)]
    refs = [await store.add_version(v) for v in values]
    assert refs == [version(n) for n in (1, 2, 3, 4)]
    for ref, value in reversed(list(zip(refs, values, strict=True))):
        assert await store.read(ref) == value
    accessed = [resource for method, resource in sm.calls if method == "accessSecretVersion"]
    assert accessed == [f"{SECRET}/versions/{n}" for n in (4, 3, 2, 1)]  # never "latest"


async def test_the_stable_alias_moves_and_other_aliases_are_kept(
    store: GcpSecretStore, sm: FakeSecretManager
) -> None:
    refs = [await store.add_version(b"v%d" % n) for n in range(3)]
    sm.set_alias(SECRET, "operator-pin", 1)
    await store.set_stable(refs[0])
    assert sm.aliases(SECRET) == {"stable": 1, "operator-pin": 1}
    assert await store.stable() == refs[0]
    await store.set_stable(refs[2])
    assert sm.aliases(SECRET) == {"stable": 3, "operator-pin": 1}
    assert await store.stable() == refs[2]
    updates = sm.count("updateSecret")
    await store.set_stable(refs[2])  # already there: no write
    assert sm.count("updateSecret") == updates


async def test_an_alias_change_between_read_and_write_makes_set_stable_start_over(
    store: GcpSecretStore, sm: FakeSecretManager
) -> None:
    ref = await store.add_version(b"v")
    sm.stale_etags(2)
    await store.set_stable(ref)
    assert sm.count("updateSecret") == 3 and sm.count("getSecret") == 3
    assert await store.stable() == ref


async def test_destroy_is_idempotent_and_a_destroyed_version_is_denied(
    store: GcpSecretStore, sm: FakeSecretManager
) -> None:
    old, new = await store.add_version(b"old"), await store.add_version(b"new")
    await store.destroy(old)
    assert sm.version_state(old["version"]) == "DESTROYED"
    await store.destroy(old)  # Secret Manager refuses a second destroy; that is done, not failed
    await store.destroy(version(99))  # never existed: nothing to destroy
    with pytest.raises(BackendDenied, match="destroyed or disabled") as info:
        await store.read(old)
    assert "cannot be recovered" in info.value.hint
    assert await store.read(new) == b"new"
    with pytest.raises(BackendDenied, match="has no"):
        await store.read(version(99))


async def test_a_short_outage_is_ridden_out_and_a_long_one_is_unavailable_after_the_deadline(
    make: Make, sm: FakeSecretManager
) -> None:
    store = make(timeout=1.0)
    sm.fail(503, times=3)
    before = sm.request_count
    ref = await store.add_version(b"value")
    assert sm.request_count - before == 6  # three 503s, 404 (no secret), create, add
    sm.fail(503)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"UNAVAILABLE.*gave up after \d+ attempts in 1s"):
        await store.read(ref)
    assert 0.9 <= time.monotonic() - started < 3.0
    sm.heal()
    assert await store.read(ref) == b"value"


async def test_a_lost_create_answer_is_retried_and_the_existing_secret_used(
    store: GcpSecretStore, sm: FakeSecretManager
) -> None:
    sm.lose_answers(1)  # the secret is created, the answer never arrives
    ref = await store.add_version(b"value")
    assert sm.count("createSecret") == 2  # the retry met ALREADY_EXISTS and carried on
    assert await store.read(ref) == b"value"


async def test_payloads_failing_their_checksum_are_discarded_and_retried(
    make: Make, sm: FakeSecretManager
) -> None:
    store = make(timeout=1.0)
    ref = await store.add_version(b"value")
    sm.corrupt(times=2)
    assert await store.read(ref) == b"value"
    sm.corrupt(times=1_000_000)
    with pytest.raises(BackendUnavailable, match="corrupted in transit"):
        await store.read(ref)


@pytest.mark.parametrize(
    ("operation", "permission", "role"),
    [
        ("read", "secretmanager.versions.access", "roles/secretmanager.secretAccessor"),
        ("add", "secretmanager.versions.add", "roles/secretmanager.secretVersionAdder"),
        ("destroy", "secretmanager.versions.destroy", "roles/secretmanager.secretVersionManager"),
        ("stable", "secretmanager.secrets.get", "roles/secretmanager.viewer"),
    ],
)
async def test_permission_denied_names_the_missing_permission(
    store: GcpSecretStore, sm: FakeSecretManager, operation: str, permission: str, role: str
) -> None:
    ref = await store.add_version(b"value")
    sm.fail(403)
    with pytest.raises(BackendDenied) as info:
        if operation == "read":
            await store.read(ref)
        elif operation == "add":
            await store.add_version(b"more")
        elif operation == "destroy":
            await store.destroy(ref)
        else:
            await store.stable()
    assert permission in info.value.message
    assert permission in info.value.hint and role in info.value.hint


async def test_rejected_credentials_are_a_config_error(
    store: GcpSecretStore, sm: FakeSecretManager
) -> None:
    sm.fail(401)  # the SDK's session tries to refresh the (anonymous) credentials, and cannot
    with pytest.raises(BackendConfigError, match="credentials") as info:
        await store.add_version(b"value")
    assert "GOOGLE_APPLICATION_CREDENTIALS" in info.value.hint


async def test_references_to_other_secrets_aliases_or_latest_are_refused_without_a_call(
    store: GcpSecretStore, sm: FakeSecretManager
) -> None:
    await store.add_version(b"value")
    before = sm.request_count
    for ref in (
        {"version": f"{SECRET}-other/versions/1"},
        {"version": f"{NUMBERED}/versions/1"},
        {"version": f"{SECRET}/versions/latest"},
        {"version": f"{SECRET}/versions/stable"},
        {"version": f"{SECRET}/versions/0"},
        {"name": f"{SECRET}/versions/1"},
    ):
        with pytest.raises(BackendDenied, match="not a version of"):
            await store.read(ref)
        with pytest.raises(BackendDenied, match="not a version of"):
            await store.set_stable(ref)
    assert sm.request_count == before


async def test_labelling_a_deleted_secret_is_denied(
    store: GcpSecretStore, sm: FakeSecretManager
) -> None:
    ref = await store.add_version(b"value")
    sm.delete_secret(SECRET)
    with pytest.raises(BackendDenied, match="no secret"):
        await store.set_stable(ref)
    assert await store.stable() is None


async def test_a_value_over_64_kib_is_refused_without_a_call(
    store: GcpSecretStore, sm: FakeSecretManager
) -> None:
    with pytest.raises(BackendDenied, match="at most 65536 bytes"):
        await store.add_version(b"x" * (64 * 1024 + 1))
    assert sm.request_count == 0


async def test_an_unreachable_endpoint_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = build_secret_store(
        {"secret_name": SECRET, "endpoint": f"http://127.0.0.1:{port}", "timeout": 0.5}
    )
    try:
        with pytest.raises(BackendUnavailable, match="ConnectionError"):
            await store.stable()
    finally:
        store.close()


async def test_latency_per_add_version_and_read(store: GcpSecretStore) -> None:
    await store.add_version(b"warm-up")  # creates the secret
    times = []
    for i in range(30):
        started = time.perf_counter()
        value = b"value %d" % i
        assert await store.read(await store.add_version(value)) == value
        times.append(time.perf_counter() - started)
    print(
        f"\ngcp-secrets (SDK REST -> fake) add_version+read median "
        f"{statistics.median(times) * 1000:.1f} ms"
    )


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({}, r"backend\.secret_name: required"),
        ({"secret_name": "keyquorum-keys"}, r"backend\.secret_name: 'keyquorum-keys' is not"),
        ({"secret_name": f"{SECRET}/versions/1"}, r"backend\.secret_name"),
        ({"secret_name": "projects/kq-test/locations/x/secrets/s"}, r"backend\.secret_name"),
        ({"secret_name": 42}, r"backend\.secret_name"),
        ({"secret_name": SECRET, "secret": SECRET}, "unknown setting"),
        ({"secret_name": SECRET, "endpoint": "http://sm.example.com"}, "in clear"),
        ({"secret_name": SECRET, "attempt_timeout": "fast"}, r"backend\.attempt_timeout"),
        (
            {"secret_name": SECRET, "endpoint": "http://127.0.0.1:9", "credentials_file": "x"},
            r"backend\.credentials_file: .*plain-http",
        ),
    ],
)
def test_bad_settings_are_refused(options: dict[str, Any], says: str) -> None:
    with pytest.raises(BackendConfigError, match=says):
        build_secret_store(options)


def test_a_version_name_is_refused_with_a_hint_to_name_the_secret() -> None:
    with pytest.raises(BackendConfigError) as info:
        build_secret_store({"secret_name": f"{SECRET}/versions/3"})
    assert "not one of its versions" in info.value.hint


def test_the_registry_builds_it_without_a_remote_call(sm: FakeSecretManager) -> None:
    store = make_secret_store("gcp-secrets", {"secret_name": SECRET, "endpoint": sm.endpoint})
    assert isinstance(store, GcpSecretStore)
    assert store.kind == "gcp-secrets"
    assert store.describe() == f"GCP Secret Manager secret {SECRET}"
    assert store.policy.deadline == 10.0
    assert sm.request_count == 0
