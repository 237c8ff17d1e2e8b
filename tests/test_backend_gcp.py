"""GCP Cloud KMS key wrapper through the google-cloud-kms SDK's own REST transport.

Cloud KMS has no emulator: the server is tests/fakes/gcp_kms.py, a fake on 127.0.0.1 that speaks
the real REST wire format (JSON, base64 bytes, CRC32C checksums, Google's error shape).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fakes.gcp_kms import FakeCloudKms
from fakes.gcp_kms import crc32c as fake_crc32c
from wrapper_contract import PREFIX, check_key_wrapper, random_data_key

from backends.base import BackendConfigError, BackendDenied, BackendUnavailable
from backends.envelope import context_for, open_sealed, seal
from backends.gcp import GcpKmsWrapper, build, crc32c
from backends.registry import make_key_wrapper

KEY = "projects/kq-test/locations/global/keyRings/keyquorum/cryptoKeys/wrap"
Make = Callable[..., GcpKmsWrapper]


@pytest.fixture
def kms() -> Iterator[FakeCloudKms]:
    with FakeCloudKms() as fake:
        fake.create_key(KEY)
        yield fake


@pytest.fixture
def make(kms: FakeCloudKms) -> Iterator[Make]:
    """Builds wrappers against the fake; closes their connections before the fake stops."""
    made: list[GcpKmsWrapper] = []

    def make_wrapper(**options: Any) -> GcpKmsWrapper:
        wrapper = build({"key_name": KEY, "endpoint": kms.endpoint, **options})
        made.append(wrapper)
        return wrapper

    yield make_wrapper
    for wrapper in made:
        wrapper.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---- behaviour against the fake -----------------------------------------------------------------


async def test_gcp_wrapper_meets_the_key_wrapper_contract(make: Make) -> None:
    await check_key_wrapper(make())


async def test_keys_sealed_before_a_rotation_still_open_and_new_ones_use_the_new_primary(
    kms: FakeCloudKms, make: Make
) -> None:
    wrapper = make()
    old = await seal(wrapper, b"old private key", kid="k1", prefix=PREFIX)
    assert old["data_key"]["key_version"] == f"{KEY}/cryptoKeyVersions/1"
    assert kms.rotate(KEY) == f"{KEY}/cryptoKeyVersions/2"
    new = await seal(wrapper, b"new private key", kid="k2", prefix=PREFIX)
    assert new["data_key"]["key_version"] == f"{KEY}/cryptoKeyVersions/2"
    assert await open_sealed(wrapper, old, kid="k1", prefix=PREFIX) == b"old private key"
    assert await open_sealed(wrapper, new, kid="k2", prefix=PREFIX) == b"new private key"
    # Disabling the old version locks its keys out, and the error names the version.
    kms.disable(f"{KEY}/cryptoKeyVersions/1")
    with pytest.raises(BackendDenied, match=r"cryptoKeyVersions/1 has value DISABLED") as info:
        await open_sealed(wrapper, old, kid="k1", prefix=PREFIX)
    assert "not enabled" in info.value.message and "enable" in info.value.hint
    assert await open_sealed(wrapper, new, kid="k2", prefix=PREFIX) == b"new private key"


async def test_a_wrapped_data_key_does_not_open_under_another_context(make: Make) -> None:
    wrapper = make()
    data_key = random_data_key()
    wrapped = await wrapper.wrap_data_key(data_key, context_for("k1", PREFIX))
    assert await wrapper.unwrap_data_key(wrapped, context_for("k1", PREFIX)) == data_key
    with pytest.raises(BackendDenied, match="does not decrypt"):
        await wrapper.unwrap_data_key(wrapped, context_for("k1", "/other/cluster"))


async def test_a_record_naming_another_key_is_refused_without_a_call(
    kms: FakeCloudKms, make: Make
) -> None:
    wrapper = make()
    wrapped = await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    before = kms.request_count
    foreign = {**wrapped, "key_version": wrapped["key_version"].replace("/wrap/", "/other/")}
    with pytest.raises(BackendDenied, match="not a version of the configured key"):
        await wrapper.unwrap_data_key(foreign, context_for("k1", PREFIX))
    assert kms.request_count == before


@pytest.mark.parametrize(
    ("operation", "permission"),
    [("wrap", "useToEncrypt"), ("unwrap", "useToDecrypt")],
)
async def test_permission_denied_names_the_missing_permission(
    kms: FakeCloudKms, make: Make, operation: str, permission: str
) -> None:
    wrapper = make()
    context = context_for("k1", PREFIX)
    wrapped = await wrapper.wrap_data_key(random_data_key(), context)
    kms.fail(403)
    with pytest.raises(BackendDenied) as info:
        if operation == "wrap":
            await wrapper.wrap_data_key(random_data_key(), context)
        else:
            await wrapper.unwrap_data_key(wrapped, context)
    assert f"cloudkms.cryptoKeyVersions.{permission}" in info.value.message
    assert f"cloudkms.cryptoKeyVersions.{permission}" in info.value.hint
    assert "roles/cloudkms.cryptoKeyEncrypterDecrypter" in info.value.hint


async def test_a_short_outage_is_ridden_out_by_retries(kms: FakeCloudKms, make: Make) -> None:
    wrapper = make()
    context = context_for("k1", PREFIX)
    data_key = random_data_key()
    kms.fail(503, times=3)
    before = kms.request_count
    wrapped = await wrapper.wrap_data_key(data_key, context)
    assert kms.request_count - before == 4  # three 503s, then success
    kms.fail(429, times=2)
    assert await wrapper.unwrap_data_key(wrapped, context) == data_key


async def test_a_permanent_outage_is_unavailable_after_the_deadline(
    kms: FakeCloudKms, make: Make
) -> None:
    wrapper = make(timeout=1.0)
    kms.fail(503)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"UNAVAILABLE.*gave up after \d+ attempts in 1s"):
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    assert 0.9 <= time.monotonic() - started < 3.0
    assert kms.request_count > 2


async def test_an_unreachable_endpoint_is_unavailable() -> None:
    wrapper = build(
        {"key_name": KEY, "endpoint": f"http://127.0.0.1:{closed_port()}", "timeout": 1}
    )
    try:
        with pytest.raises(BackendUnavailable, match="ConnectionError") as info:
            await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
        assert "gave up after" in info.value.message
    finally:
        wrapper.close()


async def test_responses_failing_their_checksums_are_discarded_and_retried(
    kms: FakeCloudKms, make: Make
) -> None:
    wrapper = make(timeout=1.0)
    context = context_for("k1", PREFIX)
    data_key = random_data_key()
    kms.corrupt(times=2)
    before = kms.request_count
    wrapped = await wrapper.wrap_data_key(data_key, context)
    assert kms.request_count - before == 3
    kms.corrupt(times=1)
    assert await wrapper.unwrap_data_key(wrapped, context) == data_key
    kms.corrupt(times=1_000_000)
    with pytest.raises(BackendUnavailable, match="corrupted in transit"):
        await wrapper.unwrap_data_key(wrapped, context)


async def test_rejected_credentials_are_a_config_error(kms: FakeCloudKms, make: Make) -> None:
    wrapper = make()
    kms.fail(401)
    with pytest.raises(BackendConfigError) as info:
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    assert "GOOGLE_APPLICATION_CREDENTIALS" in info.value.hint


async def test_a_key_that_does_not_exist_is_a_config_error_naming_key_name(
    kms: FakeCloudKms,
) -> None:
    missing = KEY.replace("/wrap", "/missing")
    wrapper = build({"key_name": missing, "endpoint": kms.endpoint})
    try:
        with pytest.raises(BackendConfigError, match=r"backend\.key_name: .* no key"):
            await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    finally:
        wrapper.close()


async def test_missing_application_default_credentials_are_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The file named by the variable is missing, so google.auth.default() fails at once, before
    # looking anywhere else; the endpoint is a closed loopback port all the same.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    wrapper = build({"key_name": KEY, "endpoint": f"https://127.0.0.1:{closed_port()}"})
    with pytest.raises(BackendConfigError) as info:
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    assert "missing.json" in info.value.message
    assert "backend.credentials_file" in info.value.hint
    assert "GOOGLE_APPLICATION_CREDENTIALS" in info.value.hint


async def test_latency_per_wrap_and_unwrap(make: Make) -> None:
    wrapper = make()
    context = context_for("k1", PREFIX)
    times = []
    for _ in range(50):
        started = time.perf_counter()
        data_key = random_data_key()
        wrapped = await wrapper.wrap_data_key(data_key, context)
        assert await wrapper.unwrap_data_key(wrapped, context) == data_key
        times.append(time.perf_counter() - started)
    print(
        f"\ngcp-kms (SDK REST -> fake) wrap+unwrap median {statistics.median(times) * 1000:.1f} ms"
    )


# ---- configuration ------------------------------------------------------------------------------


def test_build_makes_no_remote_call(kms: FakeCloudKms) -> None:
    wrapper = build({"key_name": KEY, "endpoint": kms.endpoint, "timeout": 2})
    assert kms.request_count == 0
    assert wrapper.describe() == f"GCP Cloud KMS key {KEY}"
    assert wrapper.kind == "gcp-kms"


def test_make_key_wrapper_builds_the_gcp_backend(kms: FakeCloudKms) -> None:
    wrapper = make_key_wrapper("gcp-kms", {"key_name": KEY, "endpoint": kms.endpoint})
    assert isinstance(wrapper, GcpKmsWrapper)
    assert wrapper.kind == "gcp-kms"


@pytest.mark.parametrize(
    "key_name",
    [
        None,
        42,
        "",
        "projects/kq-test/locations/global/keyRings/keyquorum",
        f"{KEY}/",
        f"{KEY}/cryptoKeyVersions/1",
        "projects/kq test/locations/global/keyRings/r/cryptoKeys/k",
    ],
)
def test_a_bad_key_name_is_a_config_error_naming_it(key_name: object) -> None:
    options = {} if key_name is None else {"key_name": key_name}
    with pytest.raises(BackendConfigError, match=r"backend\.key_name"):
        build(options)


def test_a_key_version_name_is_refused_with_a_hint_to_name_the_key() -> None:
    with pytest.raises(BackendConfigError) as info:
        build({"key_name": f"{KEY}/cryptoKeyVersions/3"})
    assert "not one of its versions" in info.value.hint


def test_unknown_options_are_rejected() -> None:
    with pytest.raises(BackendConfigError, match=r"unknown setting.*key_ring") as info:
        build({"key_name": KEY, "key_ring": "r"})
    assert "key_name" in info.value.hint


@pytest.mark.parametrize(
    ("endpoint", "match"),
    [
        ("http://kms.example.com", "in clear"),
        ("http://10.1.2.3:8080", "in clear"),
        ("ftp://127.0.0.1", "not an API endpoint"),
        ("https://kms.example.com/v1", "not an API endpoint"),
        ("127.0.0.1:notaport", "not an API endpoint"),
        (8443, "not an API endpoint"),
    ],
)
def test_a_bad_endpoint_is_a_config_error(endpoint: object, match: str) -> None:
    with pytest.raises(BackendConfigError, match=rf"backend\.endpoint: .*{match}"):
        build({"key_name": KEY, "endpoint": endpoint})


@pytest.mark.parametrize(("name", "value"), [("timeout", 0), ("attempt_timeout", "fast")])
def test_bad_timeouts_are_config_errors(name: str, value: object) -> None:
    with pytest.raises(BackendConfigError, match=rf"backend\.{name}"):
        build({"key_name": KEY, name: value})


def test_credentials_file_is_loaded_at_build_without_network(tmp_path: Path) -> None:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    key_file = tmp_path / "sa.json"
    key_file.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "kq-test",
                "private_key_id": "0" * 40,
                "private_key": pem,
                "client_email": "keyquorum@kq-test.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    wrapper = build({"key_name": KEY, "credentials_file": str(key_file)})  # Google's endpoint
    assert wrapper.describe() == f"GCP Cloud KMS key {KEY}"
    assert pem not in repr(wrapper)


def test_an_unreadable_credentials_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(BackendConfigError, match=r"backend\.credentials_file: cannot load"):
        build({"key_name": KEY, "credentials_file": str(tmp_path / "absent.json")})
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(BackendConfigError, match=r"backend\.credentials_file"):
        build({"key_name": KEY, "credentials_file": str(tmp_path / "junk.json")})


def test_credentials_are_never_sent_to_a_plain_http_endpoint(tmp_path: Path) -> None:
    with pytest.raises(BackendConfigError, match=r"backend\.credentials_file: .*plain-http"):
        build(
            {
                "key_name": KEY,
                "endpoint": "http://127.0.0.1:9",
                "credentials_file": str(tmp_path / "sa.json"),
            }
        )


def test_crc32c_matches_the_rfc_3720_check_value_and_an_independent_implementation() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    for size in (1, 31, 32, 100, 1000):
        data = os.urandom(size)
        assert crc32c(data) == fake_crc32c(data)
