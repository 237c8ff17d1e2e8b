"""Remote signing with AWS KMS (moto's server, real boto3): the private key never leaves KMS.

moto gaps, and the real-AWS behaviour each test stands for: moto ignores MessageType=DIGEST
(it signs the hash of the digest), so the DIGEST path for messages over 4 KiB is checked on the
request botocore sends (Stubber) rather than by verifying moto's signature; moto salts RSA-PSS
with the maximum length where AWS uses the hash length, so PS256 is not verified here.
"""

from __future__ import annotations

import hashlib
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber
from servers import MotoServer

from agent.crypto import verify_signature
from backends.aws import PREFIX_TAG, AwsKmsSigner, build_signer
from backends.base import BackendConfigError, BackendDenied, RemoteSigner
from backends.calls import CallPolicy
from backends.registry import make_remote_signer
from backends.remote import RemoteKeySigner, jwk_of_pem, remote_private

PREFIX = "/keyquorum/remote-test"


@pytest.fixture
def signer(moto_server: MotoServer, aws_env: dict[str, str]) -> AwsKmsSigner:
    moto_server.reset()
    return build_signer({"region": "us-east-1", "endpoint_url": moto_server.url})


@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256"])
async def test_keys_created_in_kms_sign_verifiable_jws_signatures(
    signer: AwsKmsSigner, alg: str
) -> None:
    assert isinstance(signer, RemoteSigner)
    created = await signer.create_key(alg, PREFIX)
    jwk = jwk_of_pem(created.public_key_pem, alg)
    for message in (b"h", b"hello", b"x" * 4096):  # RAW; moto cannot test DIGEST (see above)
        signature = await signer.sign(created.ref, alg, message)
        assert verify_signature(jwk, message, signature), (alg, len(message))
    loaded = await RemoteKeySigner.load(signer, remote_private("aws-kms", created.ref), alg, jwk)
    assert verify_signature(
        jwk, b"through the keyring", await loaded.sign_async(b"through the keyring")
    )


async def test_a_record_whose_kms_key_has_another_public_key_is_refused(
    signer: AwsKmsSigner,
) -> None:
    one = await signer.create_key("ES256", PREFIX)
    other = await signer.create_key("ES256", PREFIX)
    jwk = jwk_of_pem(one.public_key_pem, "ES256")
    with pytest.raises(BackendDenied, match="another public key"):
        await RemoteKeySigner.load(signer, remote_private("aws-kms", other.ref), "ES256", jwk)


async def test_owned_keys_are_the_prefix_s_live_keys_and_retire_schedules_deletion(
    signer: AwsKmsSigner, moto_server: MotoServer
) -> None:
    mine = [await signer.create_key("ES256", PREFIX) for _ in range(3)]
    theirs = await signer.create_key("ES256", "/another/cluster")
    owned = {k.ref["key_arn"] for k in await signer.owned_keys(PREFIX)}
    assert owned == {k.ref["key_arn"] for k in mine}
    assert theirs.ref["key_arn"] not in owned
    await signer.retire(mine[0].ref)
    owned = {k.ref["key_arn"] for k in await signer.owned_keys(PREFIX)}
    assert owned == {k.ref["key_arn"] for k in mine[1:]}
    kms = boto3.client("kms", endpoint_url=moto_server.url, region_name="us-east-1")
    state = kms.describe_key(KeyId=mine[0].ref["key_arn"])["KeyMetadata"]["KeyState"]
    assert state == "PendingDeletion"
    tags = kms.list_resource_tags(KeyId=mine[1].ref["key_arn"])["Tags"]
    assert {"TagKey": PREFIX_TAG, "TagValue": PREFIX} in tags


async def test_empty_and_over_4_kib_messages_are_hashed_and_sent_as_digest() -> None:
    client = boto3.client(
        "kms", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    stubber = Stubber(client)
    message = b"m" * 5000
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    stubber.add_response(
        "sign",
        {"Signature": key.sign(message, ec.ECDSA(hashes.SHA256())), "KeyId": "k"},
        {
            "KeyId": "arn:k",
            "Message": hashlib.sha256(message).digest(),
            "MessageType": "DIGEST",
            "SigningAlgorithm": "ECDSA_SHA_256",
        },
    )
    stubber.add_response(
        "sign",
        {"Signature": key.sign(b"", ec.ECDSA(hashes.SHA256())), "KeyId": "k"},
        {
            "KeyId": "arn:k",
            "Message": hashlib.sha256(b"").digest(),
            "MessageType": "DIGEST",
            "SigningAlgorithm": "ECDSA_SHA_256",
        },
    )
    stubber.add_response(
        "sign",
        {"Signature": key.sign(b"short", ec.ECDSA(hashes.SHA256())), "KeyId": "k"},
        {"KeyId": "arn:k", "Message": b"short", "MessageType": "RAW", "SigningAlgorithm": ANY},
    )
    stubber.activate()
    signer = AwsKmsSigner(client, CallPolicy(deadline=1.0))
    assert len(await signer.sign({"key_arn": "arn:k"}, "ES256", message)) == 64
    assert len(await signer.sign({"key_arn": "arn:k"}, "ES256", b"")) == 64
    assert len(await signer.sign({"key_arn": "arn:k"}, "ES256", b"short")) == 64
    stubber.assert_no_pending_responses()


async def test_access_denied_on_sign_names_the_permission() -> None:
    client = boto3.client(
        "kms", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    stubber = Stubber(client)
    stubber.add_client_error("sign", "AccessDeniedException", "not allowed", 400)
    stubber.activate()
    signer = AwsKmsSigner(client, CallPolicy(deadline=1.0))
    with pytest.raises(BackendDenied, match="grant kms:Sign"):
        await signer.sign({"key_arn": "arn:k"}, "ES256", b"x")


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"key_id": "alias/x"}, r"backend\.key_id: not used with mode = 'remote'"),
        ({"deletion_window_days": 3}, "7 to 30 days"),
        ({"regoin": "x"}, "unknown setting"),
    ],
)
def test_bad_remote_settings_are_refused(
    options: dict[str, Any], says: str, aws_env: dict[str, str]
) -> None:
    with pytest.raises(BackendConfigError, match=says):
        build_signer(options)


def test_the_registry_builds_remote_signers_and_refuses_wrap_only_kinds(
    aws_env: dict[str, str],
) -> None:
    assert make_remote_signer("aws-kms", {"region": "us-east-1"}).kind == "aws-kms"
    with pytest.raises(BackendConfigError, match="can only wrap"):
        make_remote_signer("local", {})


async def test_latency_per_remote_sign(signer: AwsKmsSigner) -> None:
    import statistics
    import time

    created = await signer.create_key("ES256", PREFIX)
    times = []
    for i in range(30):
        started = time.perf_counter()
        await signer.sign(created.ref, "ES256", b"message %d" % i)
        times.append(time.perf_counter() - started)
    print(f"\naws-kms (moto) remote ES256 sign median {statistics.median(times) * 1000:.1f} ms")
