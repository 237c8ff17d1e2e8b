"""AWS Secrets Manager secret store against moto's server, with real boto3 over HTTP on loopback.

What moto stands in for: versions addressed by VersionId, ClientRequestToken idempotency (same
token and value: the same version; another value: ResourceExistsException), staging labels and
their moves, DescribeSecret's VersionIdsToStages, CreateSecret's ResourceExistsException.

What moto does not reproduce, and how each real-AWS behaviour is covered instead:
- Real AWS refuses to attach a label another version holds unless RemoveFromVersionId names
  that holder (InvalidParameterException); moto moves it silently. The request botocore sends
  is checked with a Stubber (`test_moving_stable_names_its_current_holder`).
- IAM: moto allows everything; AccessDenied is a stubbed error response of the exact shape.
- moto replaces all labels of the previously current version with AWSPREVIOUS when AWSCURRENT
  moves implicitly; the store never lets it move (explicit VersionStages), and
  `test_stable_survives_later_versions` would catch a regression on moto too.
- Deprecated-version collection (AWS deletes unlabelled versions beyond ~100) and KMS
  encryption of the secret (kms_key_id) are not modelled by moto; moto also lists unlabelled
  versions in VersionIdsToStages (with no labels) where AWS leaves them out.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
import trio
from botocore.stub import Stubber
from servers import MotoServer

from backends.aws_secrets import LIVE_PREFIX, AwsSecretsStore, build_secret_store
from backends.base import (
    BackendConfigError,
    BackendDenied,
    BackendUnavailable,
    SecretStore,
)
from backends.calls import CallPolicy
from backends.registry import make_secret_store


def store_for(server: MotoServer, name: str | None = None, **extra: Any) -> AwsSecretsStore:
    return build_secret_store(
        {
            "secret_name": name or f"keyquorum/test-{uuid.uuid4().hex[:12]}",
            "region": "us-east-1",
            "endpoint_url": server.url,
            **extra,
        }
    )


@pytest.fixture
def store(moto_server: MotoServer, aws_env: dict[str, str]) -> Iterator[AwsSecretsStore]:
    store = store_for(moto_server)
    yield store
    store.close()


@pytest.fixture
def sm(moto_server: MotoServer, aws_env: dict[str, str]) -> Iterator[Any]:
    client = boto3.client("secretsmanager", endpoint_url=moto_server.url, region_name="us-east-1")
    yield client
    client.close()


def labels(sm: Any, store: AwsSecretsStore) -> dict[str, list[str]]:
    stages = sm.describe_secret(SecretId=store.secret_name)["VersionIdsToStages"]
    return {v: s for v, s in stages.items() if s}  # moto also lists unlabelled versions


async def test_versions_round_trip_and_old_versions_read_exactly(
    store: AwsSecretsStore, sm: Any
) -> None:
    assert isinstance(store, SecretStore)
    values = [b'{"kid": "k%d"}' % i for i in range(3)] + [bytes(range(256))]
    refs = [await store.add_version(value) for value in values]
    assert len({ref["version"] for ref in refs}) == len(refs)
    for ref, value in reversed(list(zip(refs, values, strict=True))):
        assert await store.read(ref) == value
    # Created on first use, tagged; AWSCURRENT stays on the placeholder, each key is live.
    described = sm.describe_secret(SecretId=store.secret_name)
    assert {"Key": "keyquorum", "Value": "managed"} in described["Tags"]
    stages = labels(sm, store)
    for ref in refs:
        assert stages[ref["version"]] == [LIVE_PREFIX + ref["version"]]
    current = next(v for v, s in stages.items() if "AWSCURRENT" in s)
    assert current not in {ref["version"] for ref in refs}
    assert b"no key" in sm.get_secret_value(SecretId=store.secret_name)["SecretString"].encode()


async def test_a_reference_to_no_version_is_denied(store: AwsSecretsStore) -> None:
    await store.add_version(b"one")
    with pytest.raises(BackendDenied, match="no such secret or version"):
        await store.read({"version": str(uuid.uuid4())})
    for bad in ({}, {"version": ""}, {"version": "AWSCURRENT"}):
        with pytest.raises(BackendDenied, match="names no Secrets Manager VersionId"):
            await store.read(bad)


async def test_stable_moves_between_versions(store: AwsSecretsStore, sm: Any) -> None:
    assert await store.stable() is None  # no secret yet
    one, two = await store.add_version(b"one"), await store.add_version(b"two")
    assert await store.stable() is None  # versions, but none labelled yet
    await store.set_stable(one)
    assert await store.stable() == one
    await store.set_stable(two)
    assert await store.stable() == two
    assert "stable" not in labels(sm, store)[one["version"]]
    await store.set_stable(two)  # already there: nothing to do
    assert await store.stable() == two
    await store.set_stable(one)  # and back (a rollback)
    assert await store.stable() == one


async def test_stable_survives_later_versions(store: AwsSecretsStore) -> None:
    """AWSCURRENT never moves, so adding a key relabels no other version."""
    one = await store.add_version(b"one")
    await store.set_stable(one)
    for i in range(3):
        await store.add_version(b"later %d" % i)
    assert await store.stable() == one
    assert await store.read(one) == b"one"


async def test_destroy_removes_every_label_and_the_stable_one(
    store: AwsSecretsStore, sm: Any
) -> None:
    await store.destroy({"version": str(uuid.uuid4())})  # no secret yet: nothing to do
    one, two = await store.add_version(b"one"), await store.add_version(b"two")
    await store.set_stable(one)
    await store.destroy(one)
    stages = labels(sm, store)
    assert one["version"] not in stages  # deprecated: AWS may now delete it
    assert stages[two["version"]] == [LIVE_PREFIX + two["version"]]
    assert await store.stable() is None
    await store.destroy(one)  # idempotent
    # Secrets Manager cannot delete one version: the value stays readable until collected.
    assert await store.read(one) == b"one"


class _LosesFirstAnswer:
    """A client whose first PutSecretValue is applied but its answer lost (a read timeout)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.puts: list[str] = []

    def put_secret_value(self, **kwargs: Any) -> Any:
        answer = self._client.put_secret_value(**kwargs)
        self.puts.append(kwargs["ClientRequestToken"])
        if len(self.puts) == 1:
            raise botocore.exceptions.ReadTimeoutError(endpoint_url="http://moto")
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


async def test_a_retried_put_returns_the_version_already_made(
    store: AwsSecretsStore, sm: Any
) -> None:
    await store.add_version(b"first")  # the secret exists
    losing = _LosesFirstAnswer(store._client)
    retrying = AwsSecretsStore(losing, store.secret_name, CallPolicy(deadline=5.0))
    ref = await retrying.add_version(b"retried")
    assert losing.puts == [ref["version"], ref["version"]]  # the same token both times
    assert len(labels(sm, store)) == 3  # placeholder, first, retried: no duplicate
    assert await store.read(ref) == b"retried"


async def test_two_leaders_creating_the_secret_at_once_both_succeed(
    moto_server: MotoServer, aws_env: dict[str, str]
) -> None:
    name = f"keyquorum/race-{uuid.uuid4().hex[:8]}"
    stores = [store_for(moto_server, name) for _ in range(2)]
    refs: list[dict[str, str]] = []

    async def add(store: AwsSecretsStore, value: bytes) -> None:
        refs.append(await store.add_version(value))

    try:
        async with trio.open_nursery() as nursery:
            for i, store in enumerate(stores):
                nursery.start_soon(add, store, b"leader %d" % i)
        assert len({ref["version"] for ref in refs}) == 2
        assert {await stores[0].read(ref) for ref in refs} == {b"leader 0", b"leader 1"}
    finally:
        for store in stores:
            store.close()


async def test_a_paused_server_is_abandoned_at_the_deadline_and_works_after(
    short_tmp: Path, aws_env: dict[str, str]
) -> None:
    """SIGSTOPped server: connections open but nothing answers; the deadline still holds."""
    with MotoServer(short_tmp / "moto") as server:
        store = store_for(server, timeout=1.0, attempt_timeout=0.3)
        try:
            ref = await store.add_version(b"before the outage")
            server.pause()
            try:
                for operation in (lambda: store.read(ref), store.stable):
                    started = time.monotonic()
                    with pytest.raises(BackendUnavailable, match="gave up after"):
                        await operation()
                    assert time.monotonic() - started < 2.5
            finally:
                server.resume()
            assert await store.read(ref) == b"before the outage"
        finally:
            store.close()


def stubbed(*responses: tuple[str, Any, Any]) -> tuple[AwsSecretsStore, Stubber]:
    client = boto3.client(
        "secretsmanager", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    stubber = Stubber(client)
    for operation, answer, expected in responses:
        if isinstance(answer, tuple):  # (error code, HTTP status)
            stubber.add_client_error(operation, answer[0], "from the stub", answer[1])
        else:
            stubber.add_response(operation, answer, expected)
    stubber.activate()
    return AwsSecretsStore(client, "kq/stubbed", CallPolicy(deadline=1.0)), stubber


V1, V2 = "a" * 32, "b" * 32


async def test_moving_stable_names_its_current_holder() -> None:
    """Real AWS needs RemoveFromVersionId when the label is held elsewhere (moto does not)."""
    store, stubber = stubbed(
        ("describe_secret", {"VersionIdsToStages": {V1: ["stable"], V2: ["x"]}}, None),
        (
            "update_secret_version_stage",
            {},
            {
                "SecretId": "kq/stubbed",
                "VersionStage": "stable",
                "MoveToVersionId": V2,
                "RemoveFromVersionId": V1,
            },
        ),
        ("describe_secret", {"VersionIdsToStages": {V1: ["x"]}}, None),
        (
            "update_secret_version_stage",
            {},
            {"SecretId": "kq/stubbed", "VersionStage": "stable", "MoveToVersionId": V1},
        ),
    )
    await store.set_stable({"version": V2})
    await store.set_stable({"version": V1})  # held by none: nothing to remove it from
    stubber.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("operation", "responses", "permission"),
    [
        ("read", [("get_secret_value", ("AccessDeniedException", 400), None)], "GetSecretValue"),
        ("add", [("put_secret_value", ("AccessDeniedException", 400), None)], "PutSecretValue"),
        (
            "add",
            [
                ("put_secret_value", ("ResourceNotFoundException", 400), None),
                ("create_secret", ("AccessDeniedException", 400), None),
            ],
            "CreateSecret and secretsmanager:TagResource",
        ),
        ("stable", [("describe_secret", ("AccessDeniedException", 400), None)], "DescribeSecret"),
        (
            "set_stable",
            [
                ("describe_secret", {"VersionIdsToStages": {}}, None),
                ("update_secret_version_stage", ("AccessDeniedException", 400), None),
            ],
            "UpdateSecretVersionStage",
        ),
    ],
)
async def test_access_denied_names_the_permission(
    operation: str, responses: list[tuple[str, Any, Any]], permission: str
) -> None:
    store, _ = stubbed(*responses)
    calls = {
        "read": lambda: store.read({"version": V1}),
        "add": lambda: store.add_version(b"x"),
        "stable": store.stable,
        "set_stable": lambda: store.set_stable({"version": V1}),
    }
    with pytest.raises(BackendDenied, match=f"grant secretsmanager:{permission} on the secret"):
        await calls[operation]()


async def test_errors_are_mapped_to_what_to_do() -> None:
    store, stubber = stubbed(
        ("get_secret_value", ("ThrottlingException", 400), None),
        ("get_secret_value", ("InternalServiceError", 500), None),
        (
            "get_secret_value",
            {"VersionId": V1, "SecretBinary": b"ok"},
            {"SecretId": "kq/stubbed", "VersionId": V1},
        ),
        ("get_secret_value", ("DecryptionFailure", 400), None),
        ("get_secret_value", ("UnrecognizedClientException", 400), None),
        ("get_secret_value", ("InvalidRequestException", 400), None),
    )
    assert await store.read({"version": V1}) == b"ok"  # throttling and 500s are retried
    with pytest.raises(BackendDenied, match="kms:Decrypt"):
        await store.read({"version": V1})
    with pytest.raises(BackendConfigError, match="credentials"):
        await store.read({"version": V1})
    with pytest.raises(BackendDenied, match="restore-secret"):
        await store.read({"version": V1})
    stubber.assert_no_pending_responses()


async def test_an_arn_that_names_no_secret_is_a_config_error(
    moto_server: MotoServer, aws_env: dict[str, str]
) -> None:
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:keyquorum-none-AbCdEf"
    store = store_for(moto_server, arn)
    try:
        with pytest.raises(BackendConfigError, match=r"backend\.secret_name: no secret"):
            await store.add_version(b"x")
    finally:
        store.close()


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({}, r"backend\.secret_name: required"),
        ({"secret_name": ""}, r"backend\.secret_name"),
        ({"secret_name": "bad name!"}, r"backend\.secret_name"),
        ({"secret_name": "s", "regoin": "eu-west-1"}, "unknown setting.*regoin"),
        ({"secret_name": "s", "kms_key_id": ""}, r"backend\.kms_key_id"),
        ({"secret_name": "s", "timeout": 0}, r"backend\.timeout"),
        ({"secret_name": "s", "attempt_timeout": "3"}, r"backend\.attempt_timeout"),
        ({"secret_name": "s", "profile": "no-such-profile-kq"}, r"backend\.profile"),
    ],
)
def test_bad_settings_are_refused_at_start_up(
    options: dict[str, Any], says: str, aws_env: dict[str, str]
) -> None:
    with pytest.raises(BackendConfigError, match=says):
        build_secret_store(options)


def test_the_registry_builds_it(moto_server: MotoServer, aws_env: dict[str, str]) -> None:
    store = make_secret_store(
        "aws-secrets", {"secret_name": "kq/registry", "endpoint_url": moto_server.url}
    )
    assert isinstance(store, AwsSecretsStore)
    assert store.kind == "aws-secrets"
    assert "kq/registry" in store.describe()
    store.close()


async def test_latency_per_add_version_and_read(store: AwsSecretsStore) -> None:
    await store.add_version(b"warm-up")  # creates the secret
    times = []
    for i in range(30):
        started = time.perf_counter()
        ref = await store.add_version(b"key %d" % i)
        await store.read(ref)
        times.append(time.perf_counter() - started)
    print(f"\naws-secrets (moto) add_version+read median {statistics.median(times) * 1000:.1f} ms")
