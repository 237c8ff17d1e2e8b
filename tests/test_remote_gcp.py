"""Remote signing in GCP Cloud KMS through the google-cloud-kms SDK's own REST transport: one
asymmetric CryptoKey per rotation, signing inside Cloud KMS.

Cloud KMS has no emulator: the server is tests/fakes/gcp_kms.py, a fake on 127.0.0.1 that speaks
the real REST wire format and signs with real keys, so every signature is verified here with the
agent's own JWS verifier. What the fake cannot show: real IAM, quotas, HSM protection levels,
asynchronous generation timing (the fake counts state reads instead of seconds), and the real
filter/paging limits of ListCryptoKeys.
"""

from __future__ import annotations

import hashlib
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fakes.gcp_kms import FakeCloudKms

from agent.crypto import verify_signature
from backends.base import (
    BackendConfigError,
    BackendDenied,
    BackendUnavailable,
    RemoteKey,
    RemoteSigner,
)
from backends.gcp import PREFIX_LABEL, RETIRED_LABEL, GcpKmsSigner, build_signer
from backends.registry import make_remote_signer
from backends.remote import RemoteKeySigner, jwk_of_pem, remote_private

RING = "projects/kq-test/locations/global/keyRings/keyquorum"
PREFIX = "/keyquorum/remote-test"
LABEL = hashlib.sha256(PREFIX.encode()).hexdigest()[:8]
Make = Callable[..., GcpKmsSigner]


@pytest.fixture
def kms() -> Iterator[FakeCloudKms]:
    with FakeCloudKms() as fake:
        fake.create_key_ring(RING)
        yield fake


@pytest.fixture
def make(kms: FakeCloudKms) -> Iterator[Make]:
    """Builds signers against the fake; closes their connections before the fake stops."""
    made: list[GcpKmsSigner] = []

    def make_signer(**options: Any) -> GcpKmsSigner:
        signer = build_signer({"key_ring": RING, "endpoint": kms.endpoint, **options})
        made.append(signer)
        return signer

    yield make_signer
    for signer in made:
        signer.close()


@pytest.fixture
def signer(make: Make) -> GcpKmsSigner:
    return make()


def key_of(created: RemoteKey) -> str:
    return created.ref["key_version"].rsplit("/cryptoKeyVersions/", 1)[0]


def versions(keys: list[RemoteKey]) -> set[str]:
    return {k.ref["key_version"] for k in keys}


# ---- keys and signatures ------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256", "PS256", "EdDSA"])
async def test_keys_created_in_cloud_kms_sign_verifiable_jws_signatures(
    signer: GcpKmsSigner, kms: FakeCloudKms, alg: str
) -> None:
    assert isinstance(signer, RemoteSigner)
    assert signer.supports(alg)
    created = await signer.create_key(alg, PREFIX)
    version = created.ref["key_version"]
    assert version.startswith(f"{RING}/cryptoKeys/keyquorum-{LABEL}-")
    assert version.endswith("/cryptoKeyVersions/1")
    assert kms.labels(key_of(created)) == {PREFIX_LABEL: LABEL}
    assert created.created_at is not None
    assert abs(created.created_at - time.time() * 1000) < 60_000
    jwk = jwk_of_pem(created.public_key_pem, alg)
    assert await signer.public_key(created.ref) == created.public_key_pem
    for message in (b"h", b"hello", b"x" * 10_000, b"" if alg != "EdDSA" else b"."):
        signature = await signer.sign(created.ref, alg, message)
        assert verify_signature(jwk, message, signature), (alg, len(message))
        assert not verify_signature(jwk, message + b"!", signature)
    loaded = await RemoteKeySigner.load(signer, remote_private("gcp-kms", created.ref), alg, jwk)
    assert verify_signature(jwk, b"keyring", await loaded.sign_async(b"keyring"))


async def test_eddsa_messages_cloud_kms_cannot_take_are_refused_without_a_call(
    signer: GcpKmsSigner, kms: FakeCloudKms
) -> None:
    created = await signer.create_key("EdDSA", PREFIX)
    before = kms.request_count
    for message in (b"", b"x" * (64 * 1024 + 1)):  # proto3 drops empty bytes; 64 KiB limit
        with pytest.raises(BackendDenied, match="1 to 65536 bytes"):
            await signer.sign(created.ref, "EdDSA", message)
    assert kms.request_count == before
    jwk = jwk_of_pem(created.public_key_pem, "EdDSA")
    message = b"x" * (64 * 1024)
    assert verify_signature(jwk, message, await signer.sign(created.ref, "EdDSA", message))


async def test_a_record_whose_key_has_another_public_key_is_refused(
    signer: GcpKmsSigner,
) -> None:
    one = await signer.create_key("ES256", PREFIX)
    other = await signer.create_key("ES256", PREFIX)
    jwk = jwk_of_pem(one.public_key_pem, "ES256")
    with pytest.raises(BackendDenied, match="another public key"):
        await RemoteKeySigner.load(signer, remote_private("gcp-kms", other.ref), "ES256", jwk)


async def test_create_waits_until_cloud_kms_has_generated_the_key(
    signer: GcpKmsSigner, kms: FakeCloudKms
) -> None:
    kms.generation_polls = 3  # PENDING_GENERATION for three state reads
    created = await signer.create_key("ES256", PREFIX)
    assert kms.count("getCryptoKeyVersion") == 4
    assert kms.version_state(created.ref["key_version"]) == "ENABLED"
    signature = await signer.sign(created.ref, "ES256", b"m")
    assert verify_signature(jwk_of_pem(created.public_key_pem, "ES256"), b"m", signature)


async def test_a_key_still_generating_at_the_deadline_is_unavailable_and_still_owned(
    make: Make, kms: FakeCloudKms
) -> None:
    signer = make(timeout=0.5)
    kms.generation_polls = 1_000_000
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="had not finished generating") as info:
        await signer.create_key("ES256", PREFIX)
    assert time.monotonic() - started < 1.5
    assert "backend.timeout" in info.value.hint
    # The pending key is live: owned_keys finds it, so the leader retires it as an orphan.
    [pending] = kms.key_names(RING)
    assert versions(await signer.owned_keys(PREFIX)) == {f"{pending}/cryptoKeyVersions/1"}


async def test_a_failed_generation_is_unavailable_and_the_key_is_not_owned(
    signer: GcpKmsSigner, kms: FakeCloudKms
) -> None:
    kms.generation_outcome = "GENERATION_FAILED"
    with pytest.raises(BackendUnavailable, match="GENERATION_FAILED instead of ENABLED"):
        await signer.create_key("ES256", PREFIX)
    assert len(kms.key_names(RING)) == 1
    assert await signer.owned_keys(PREFIX) == []


async def test_a_create_whose_answer_was_lost_is_retried_without_a_second_key(
    signer: GcpKmsSigner, kms: FakeCloudKms
) -> None:
    kms.lose_answers(1)  # Cloud KMS creates the key, the answer never arrives
    created = await signer.create_key("ES256", PREFIX)
    assert kms.count("createCryptoKey") == 2  # the retry met ALREADY_EXISTS and carried on
    assert kms.key_names(RING) == [key_of(created)]


# ---- ownership and retirement -------------------------------------------------------------------


async def test_owned_keys_are_the_prefix_s_live_keys_and_retire_schedules_destruction(
    signer: GcpKmsSigner, kms: FakeCloudKms
) -> None:
    assert await signer.owned_keys(PREFIX) == []
    mine = [await signer.create_key("ES256", PREFIX) for _ in range(3)]
    theirs = await signer.create_key("ES256", "/another/cluster")
    owned = await signer.owned_keys(PREFIX)
    assert versions(owned) == versions(mine)
    assert all(k.created_at is not None for k in owned)
    assert versions(await signer.owned_keys("/another/cluster")) == versions([theirs])

    await signer.retire(mine[0].ref)
    retired = mine[0].ref["key_version"]
    assert kms.version_state(retired) == "DESTROY_SCHEDULED"
    assert kms.labels(key_of(mine[0])) == {RETIRED_LABEL: LABEL}
    assert key_of(mine[0]) in kms.key_names(RING)  # Cloud KMS never deletes a CryptoKey
    assert versions(await signer.owned_keys(PREFIX)) == versions(mine[1:])
    with pytest.raises(BackendDenied, match="DESTROY_SCHEDULED") as info:
        await signer.sign(mine[0].ref, "ES256", b"after retirement")
    assert "restore" in info.value.hint
    await signer.retire(mine[0].ref)  # idempotent
    assert kms.version_state(retired) == "DESTROY_SCHEDULED"


async def test_a_key_destroyed_behind_keyquorum_s_back_is_not_owned(
    signer: GcpKmsSigner, kms: FakeCloudKms
) -> None:
    mine = [await signer.create_key("ES256", PREFIX) for _ in range(2)]
    kms.destroy(mine[0].ref["key_version"])  # still labelled: its state says it is gone
    assert versions(await signer.owned_keys(PREFIX)) == versions(mine[1:])
    await signer.retire(mine[0].ref)  # already scheduled: done, and relabelled
    assert kms.labels(key_of(mine[0])) == {RETIRED_LABEL: LABEL}


async def test_retired_keys_cost_no_state_reads_and_every_page_is_listed(
    signer: GcpKmsSigner, kms: FakeCloudKms
) -> None:
    mine = [await signer.create_key("ES256", PREFIX) for _ in range(5)]
    for key in mine[:3]:
        await signer.retire(key.ref)
    kms.max_page_size = 2
    before_reads, before_lists = kms.count("getCryptoKeyVersion"), kms.count("listCryptoKeys")
    assert versions(await signer.owned_keys(PREFIX)) == versions(mine[3:])
    assert kms.count("getCryptoKeyVersion") - before_reads == 2  # one per live key
    assert kms.count("listCryptoKeys") - before_lists == 3  # 5 keys, pages of 2


async def test_a_reference_outside_the_key_ring_or_name_prefix_is_refused_without_a_call(
    signer: GcpKmsSigner, kms: FakeCloudKms
) -> None:
    created = await signer.create_key("ES256", PREFIX)
    version = created.ref["key_version"]
    before = kms.request_count
    for ref in (
        {"key_version": version.replace("/keyRings/keyquorum/", "/keyRings/other/")},
        {"key_version": version.replace("/cryptoKeys/keyquorum-", "/cryptoKeys/theirs-")},
        {"key_version": version.replace("/cryptoKeyVersions/1", "/cryptoKeyVersions/2")},
        {"key_name": version},
    ):
        with pytest.raises(BackendDenied, match="not one of this agent's Cloud KMS keys"):
            await signer.sign(ref, "ES256", b"x")
    assert kms.request_count == before


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "permission", "role"),
    [
        ("sign", "cloudkms.cryptoKeyVersions.useToSign", "roles/cloudkms.signerVerifier"),
        ("create", "cloudkms.cryptoKeys.create", "roles/cloudkms.admin"),
        ("public_key", "cloudkms.cryptoKeyVersions.viewPublicKey", "roles/cloudkms.signerVerifier"),
        ("retire", "cloudkms.cryptoKeyVersions.destroy", "roles/cloudkms.admin"),
        ("owned_keys", "cloudkms.cryptoKeys.list", "roles/cloudkms.viewer"),
    ],
)
async def test_permission_denied_names_the_missing_permission(
    signer: GcpKmsSigner, kms: FakeCloudKms, operation: str, permission: str, role: str
) -> None:
    created = await signer.create_key("ES256", PREFIX)
    kms.fail(403)
    with pytest.raises(BackendDenied) as info:
        if operation == "sign":
            await signer.sign(created.ref, "ES256", b"x")
        elif operation == "create":
            await signer.create_key("ES256", PREFIX)
        elif operation == "public_key":
            await signer.public_key(created.ref)
        elif operation == "retire":
            await signer.retire(created.ref)
        else:
            await signer.owned_keys(PREFIX)
    assert permission in info.value.message
    assert permission in info.value.hint and role in info.value.hint
    assert RING in info.value.hint


async def test_a_missing_key_ring_is_a_config_error_naming_key_ring(make: Make) -> None:
    signer = make(key_ring=RING.replace("/keyquorum", "/absent"))
    with pytest.raises(BackendConfigError, match=r"backend\.key_ring: .*no key ring"):
        await signer.create_key("ES256", PREFIX)
    with pytest.raises(BackendConfigError, match=r"backend\.key_ring"):
        await signer.owned_keys(PREFIX)


async def test_an_outage_is_ridden_out_and_a_permanent_one_is_unavailable_after_the_deadline(
    make: Make, kms: FakeCloudKms
) -> None:
    signer = make(timeout=1.0)
    created = await signer.create_key("ES256", PREFIX)
    jwk = jwk_of_pem(created.public_key_pem, "ES256")
    kms.fail(503, times=3)
    before = kms.request_count
    assert verify_signature(jwk, b"m", await signer.sign(created.ref, "ES256", b"m"))
    assert kms.request_count - before == 4
    kms.fail(503)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"UNAVAILABLE.*gave up after \d+ attempts"):
        await signer.sign(created.ref, "ES256", b"m")
    assert 0.9 <= time.monotonic() - started < 3.0


async def test_signatures_failing_their_checksums_are_discarded_and_retried(
    make: Make, kms: FakeCloudKms
) -> None:
    signer = make(timeout=1.0)
    created = await signer.create_key("EdDSA", PREFIX)
    jwk = jwk_of_pem(created.public_key_pem, "EdDSA")
    kms.corrupt(times=2)
    before = kms.request_count
    assert verify_signature(jwk, b"m", await signer.sign(created.ref, "EdDSA", b"m"))
    assert kms.request_count - before == 3
    kms.corrupt(times=1_000_000)
    with pytest.raises(BackendUnavailable, match="corrupted in transit"):
        await signer.sign(created.ref, "EdDSA", b"m")


async def test_an_unreachable_endpoint_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    signer = build_signer(
        {"key_ring": RING, "endpoint": f"http://127.0.0.1:{port}", "timeout": 0.5}
    )
    try:
        with pytest.raises(BackendUnavailable, match="ConnectionError"):
            await signer.owned_keys(PREFIX)
    finally:
        signer.close()


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (
            {"key_ring": RING, "key_name": f"{RING}/cryptoKeys/k"},
            r"backend\.key_name: not used with mode = 'remote'",
        ),
        ({}, r"backend\.key_ring: required"),
        ({"key_ring": "keyquorum"}, r"backend\.key_ring: 'keyquorum' is not"),
        ({"key_ring": f"{RING}/cryptoKeys/k"}, r"backend\.key_ring"),
        ({"key_ring": RING, "key_name_prefix": "a/b"}, r"backend\.key_name_prefix"),
        ({"key_ring": RING, "key_name_prefix": "k" * 42}, r"backend\.key_name_prefix"),
        ({"key_ring": RING, "keyring": RING}, "unknown setting"),
        ({"key_ring": RING, "endpoint": "http://kms.example.com"}, "in clear"),
        ({"key_ring": RING, "timeout": 0}, r"backend\.timeout"),
    ],
)
def test_bad_remote_settings_are_refused(options: dict[str, Any], says: str) -> None:
    with pytest.raises(BackendConfigError, match=says):
        build_signer(options)


def test_the_hints_say_what_to_set_instead() -> None:
    with pytest.raises(BackendConfigError) as info:
        build_signer({"key_name": f"{RING}/cryptoKeys/k"})
    assert "backend.key_ring" in info.value.hint
    with pytest.raises(BackendConfigError) as info:
        build_signer({"key_ring": f"{RING}/cryptoKeys/k"})
    assert "not a key in it" in info.value.hint


def test_the_registry_builds_it_without_a_remote_call(kms: FakeCloudKms) -> None:
    signer = make_remote_signer("gcp-kms", {"key_ring": RING, "endpoint": kms.endpoint})
    assert isinstance(signer, GcpKmsSigner)
    assert signer.kind == "gcp-kms"
    assert "one key per rotation" in signer.describe() and RING in signer.describe()
    assert all(signer.supports(alg) for alg in ("ES256", "ES384", "RS256", "PS256", "EdDSA"))
    assert not signer.supports("HS256")
    assert kms.request_count == 0
    assert "GcpKmsSigner(key_ring=" in repr(signer)


async def test_latency_per_remote_sign(signer: GcpKmsSigner) -> None:
    created = await signer.create_key("ES256", PREFIX)
    times = []
    for i in range(30):
        started = time.perf_counter()
        await signer.sign(created.ref, "ES256", b"message %d" % i)
        times.append(time.perf_counter() - started)
    print(
        f"\ngcp-kms (SDK REST -> fake) remote ES256 sign median "
        f"{statistics.median(times) * 1000:.1f} ms"
    )
