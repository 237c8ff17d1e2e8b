"""AWS KMS key wrapper against moto's server with real boto3 over HTTP on loopback.

moto stands in for KMS's Encrypt/Decrypt semantics that matter here: EncryptionContext must match
on Decrypt (real KMS: InvalidCiphertextException), ciphertext tampering is refused, the KeyId in
the answer is the key's ARN, and aliases resolve. It does not model IAM (no AccessDenied) nor
disabled keys (moto still decrypts with them), so those paths are tested through botocore's
stubbed error responses, which are the exact shapes real KMS returns.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import boto3
import pytest
import trio
from botocore.stub import Stubber
from servers import MotoServer
from wrapper_contract import PREFIX, check_key_wrapper, random_data_key

from backends.aws import AwsKmsWrapper, build
from backends.base import BackendConfigError, BackendDenied, BackendUnavailable
from backends.envelope import context_for, open_sealed, seal
from backends.registry import make_key_wrapper


@pytest.fixture
def kms(moto_server: MotoServer, aws_env: dict[str, str]) -> Any:
    return boto3.client("kms", endpoint_url=moto_server.url, region_name="us-east-1")


def new_key(kms: Any, alias: str | None = None) -> str:
    arn = str(kms.create_key(Description="keyquorum test KEK")["KeyMetadata"]["Arn"])
    if alias:
        kms.create_alias(AliasName=alias, TargetKeyId=arn)
    return arn


def wrapper_for(moto_server: MotoServer, key_id: str, **extra: Any) -> AwsKmsWrapper:
    return build(
        {"key_id": key_id, "region": "us-east-1", "endpoint_url": moto_server.url, **extra}
    )


async def test_kms_wrapper_meets_the_key_wrapper_contract(
    moto_server: MotoServer, kms: Any
) -> None:
    await check_key_wrapper(wrapper_for(moto_server, new_key(kms)))


async def test_data_keys_wrapped_before_an_alias_moves_still_open(
    moto_server: MotoServer, kms: Any
) -> None:
    """Re-pointing the alias to a new key (how KMS keys are swapped) strands no record."""
    alias = f"alias/kq-{time.monotonic_ns()}"
    first = new_key(kms, alias)
    wrapper = wrapper_for(moto_server, alias)
    old = await seal(wrapper, b"old private key", kid="k1", prefix=PREFIX)
    assert old["data_key"]["key_arn"] == first
    second = new_key(kms)
    kms.update_alias(AliasName=alias, TargetKeyId=second)
    new = await seal(wrapper, b"new private key", kid="k2", prefix=PREFIX)
    assert new["data_key"]["key_arn"] == second
    assert await open_sealed(wrapper, old, kid="k1", prefix=PREFIX) == b"old private key"
    assert await open_sealed(wrapper, new, kid="k2", prefix=PREFIX) == b"new private key"


async def test_kms_itself_refuses_a_data_key_presented_with_another_context(
    moto_server: MotoServer, kms: Any
) -> None:
    wrapper = wrapper_for(moto_server, new_key(kms))
    wrapped = await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    with pytest.raises(BackendDenied, match="InvalidCiphertextException"):
        await wrapper.unwrap_data_key(wrapped, context_for("k2", PREFIX))


async def test_a_missing_key_is_a_config_error_naming_the_setting(
    moto_server: MotoServer, aws_env: dict[str, str]
) -> None:
    wrapper = wrapper_for(moto_server, "alias/does-not-exist")
    with pytest.raises(BackendConfigError, match=r"backend\.key_id"):
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))


def stubbed(error_code: str, status: int, operation: str = "decrypt") -> AwsKmsWrapper:
    """A wrapper whose client answers one call with a real KMS error response."""
    client = boto3.client(
        "kms", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    stubber = Stubber(client)
    stubber.add_client_error(operation, error_code, "from the stub", status)
    stubber.activate()
    return build_with(client)


def build_with(client: Any) -> AwsKmsWrapper:
    from backends.calls import CallPolicy

    return AwsKmsWrapper(client, "arn:aws:kms:us-east-1:1:key/x", CallPolicy(deadline=1.0))


WRAPPED = {"key_arn": "arn:aws:kms:us-east-1:1:key/x", "ciphertext": "AAAA"}


@pytest.mark.parametrize(
    ("code", "status", "error", "says"),
    [
        ("AccessDeniedException", 400, BackendDenied, "grant kms:Decrypt"),
        ("DisabledException", 400, BackendDenied, "enable the key"),
        ("KMSInvalidStateException", 400, BackendDenied, "cancel its scheduled deletion"),
        ("UnrecognizedClientException", 400, BackendConfigError, "credentials"),
        ("NotFoundException", 400, BackendDenied, "no longer exists"),
    ],
)
async def test_kms_errors_become_clear_messages_that_name_the_fix(
    code: str, status: int, error: type[Exception], says: str
) -> None:
    wrapper = stubbed(code, status)
    with pytest.raises(error, match=says):
        await wrapper.unwrap_data_key(WRAPPED, context_for("k1", PREFIX))


async def test_throttling_is_retried_until_it_clears() -> None:
    client = boto3.client(
        "kms", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    stubber = Stubber(client)
    stubber.add_client_error("decrypt", "ThrottlingException", "Rate exceeded", 400)
    stubber.add_client_error("decrypt", "KMSInternalException", "oops", 500)
    stubber.add_response("decrypt", {"Plaintext": b"k" * 32, "KeyId": WRAPPED["key_arn"]})
    stubber.activate()
    wrapper = build_with(client)
    assert await wrapper.unwrap_data_key(WRAPPED, context_for("k1", PREFIX)) == b"k" * 32
    stubber.assert_no_pending_responses()


async def test_an_unreachable_kms_is_unavailable_after_the_deadline(
    aws_env: dict[str, str],
) -> None:
    from consensus.local_etcd import free_ports

    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    wrapper = build({"key_id": "alias/x", "endpoint_url": closed, "timeout": 0.5})
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="cannot reach KMS") as caught:
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    assert time.monotonic() - started < 3.0
    assert "attempt" in str(caught.value)


async def test_a_hung_kms_is_abandoned_at_the_deadline(moto_server: MotoServer, kms: Any) -> None:
    """SIGSTOPped server: connections open but nothing answers; the deadline still holds."""
    wrapper = wrapper_for(moto_server, new_key(kms), timeout=1.0, attempt_timeout=0.3)
    moto_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
        assert time.monotonic() - started < 2.5
    finally:
        moto_server.resume()
    # and it works again once the server is back
    assert await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({}, r"backend\.key_id: required"),
        ({"key_id": ""}, r"backend\.key_id"),
        ({"key_id": "alias/x", "regoin": "eu-west-1"}, "unknown setting.*regoin"),
        ({"key_id": "alias/x", "timeout": 0}, r"backend\.timeout"),
        ({"key_id": "alias/x", "profile": "no-such-profile-kq"}, r"backend\.profile"),
    ],
)
def test_bad_settings_are_refused_at_start_up(
    options: dict[str, Any], says: str, aws_env: dict[str, str]
) -> None:
    with pytest.raises(BackendConfigError, match=says):
        build(options)


def test_the_registry_builds_it(moto_server: MotoServer, aws_env: dict[str, str]) -> None:
    wrapper = make_key_wrapper("aws-kms", {"key_id": "alias/x", "endpoint_url": moto_server.url})
    assert wrapper.kind == "aws-kms"
    assert "alias/x" in wrapper.describe()


async def test_latency_per_wrap_and_unwrap(moto_server: MotoServer, kms: Any) -> None:
    wrapper = wrapper_for(moto_server, new_key(kms))
    context = context_for("k1", PREFIX)
    times = []
    for _ in range(30):
        started = trio.current_time()
        wrapped = await wrapper.wrap_data_key(random_data_key(), context)
        await wrapper.unwrap_data_key(wrapped, context)
        times.append(trio.current_time() - started)
    print(f"\naws-kms (moto) wrap+unwrap median {statistics.median(times) * 1000:.1f} ms")
