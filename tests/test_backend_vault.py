"""Vault/OpenBao transit key wrapper against a real OpenBao dev server on loopback."""

from __future__ import annotations

import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
from servers import OpenBaoServer
from wrapper_contract import PREFIX, check_key_wrapper, random_data_key

from backends.base import BackendConfigError, BackendDenied, BackendUnavailable
from backends.envelope import context_for, open_sealed, seal
from backends.registry import make_key_wrapper
from backends.vault import VaultTransitWrapper, build


@pytest.fixture
def key_name(openbao: OpenBaoServer) -> str:
    name = f"kq-{uuid.uuid4().hex[:10]}"
    openbao.transit_key(name)
    return name


def wrapper_for(server: OpenBaoServer, key_name: str, **extra: Any) -> VaultTransitWrapper:
    options = {"address": server.url, "key_name": key_name, "token": server.token, **extra}
    return build(options)


async def test_transit_wrapper_meets_the_key_wrapper_contract(
    openbao: OpenBaoServer, key_name: str
) -> None:
    await check_key_wrapper(wrapper_for(openbao, key_name))


async def test_records_wrapped_before_a_transit_key_rotation_still_open(
    openbao: OpenBaoServer, key_name: str
) -> None:
    wrapper = wrapper_for(openbao, key_name)
    old = await seal(wrapper, b"old private key", kid="k1", prefix=PREFIX)
    assert old["data_key"]["ciphertext"].startswith("vault:v1:")
    openbao.api("POST", f"transit/keys/{key_name}/rotate")
    new = await seal(wrapper, b"new private key", kid="k2", prefix=PREFIX)
    assert new["data_key"]["ciphertext"].startswith("vault:v2:")
    assert await open_sealed(wrapper, old, kid="k1", prefix=PREFIX) == b"old private key"
    assert await open_sealed(wrapper, new, kid="k2", prefix=PREFIX) == b"new private key"
    # Raising min_decryption_version retires v1: the error says what to change.
    openbao.api("POST", f"transit/keys/{key_name}/config", {"min_decryption_version": 2})
    with pytest.raises(BackendDenied, match="min_decryption_version"):
        await open_sealed(wrapper, old, kid="k1", prefix=PREFIX)


async def test_a_token_without_the_policy_is_denied_with_the_policy_to_add(
    openbao: OpenBaoServer, key_name: str, tmp_path: Path
) -> None:
    encrypt_only = openbao.token_with_policy(
        f"enc-{key_name}", f'path "transit/encrypt/{key_name}" {{ capabilities = ["update"] }}'
    )
    token_file = tmp_path / "token"
    token_file.write_text(encrypt_only + "\n")
    token_file.chmod(0o600)
    wrapper = build({"address": openbao.url, "key_name": key_name, "token_file": str(token_file)})
    sealed = await seal(wrapper, b"private", kid="k1", prefix=PREFIX)
    with pytest.raises(BackendDenied, match=f'path "transit/decrypt/{key_name}"') as caught:
        await open_sealed(wrapper, sealed, kid="k1", prefix=PREFIX)
    assert encrypt_only not in str(caught.value)
    # The token file is re-read per call: a renewed token takes effect without a restart.
    token_file.write_text(openbao.token)
    assert await open_sealed(wrapper, sealed, kid="k1", prefix=PREFIX) == b"private"


async def test_a_missing_transit_key_is_a_config_error_naming_the_settings(
    openbao: OpenBaoServer,
) -> None:
    wrapper = wrapper_for(openbao, "no-such-key-kq")
    with pytest.raises(BackendConfigError, match=r"backend\.key_name"):
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))


async def test_a_record_wrapped_by_another_transit_key_is_refused_by_name(
    openbao: OpenBaoServer, key_name: str
) -> None:
    sealed = await seal(wrapper_for(openbao, key_name), b"x", kid="k1", prefix=PREFIX)
    other = f"{key_name}-other"
    openbao.transit_key(other)
    with pytest.raises(BackendDenied, match=r"backend\.key_name"):
        await open_sealed(wrapper_for(openbao, other), sealed, kid="k1", prefix=PREFIX)


async def test_a_paused_server_is_abandoned_at_the_deadline_and_works_after(
    short_tmp: Path,
) -> None:
    with OpenBaoServer(short_tmp / "bao") as server:
        name = "kq-pause"
        server.transit_key(name)
        wrapper = wrapper_for(server, name, timeout=1.0, attempt_timeout=0.3)
        sealed = await seal(wrapper, b"private", kid="k1", prefix=PREFIX)
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="gave up after"):
                await open_sealed(wrapper, sealed, kid="k1", prefix=PREFIX)
            assert time.monotonic() - started < 2.5
        finally:
            server.resume()
        assert await open_sealed(wrapper, sealed, kid="k1", prefix=PREFIX) == b"private"
    # Server gone: connection refused is retried, then reported as unreachable.
    with pytest.raises(BackendUnavailable, match="cannot reach"):
        await open_sealed(wrapper, sealed, kid="k1", prefix=PREFIX)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"key_name": "k"}, r"backend\.address: required"),
        ({"address": "vault:8200", "key_name": "k"}, r"backend\.address.*not an http"),
        ({"address": "http://127.0.0.1:1"}, r"backend\.key_name: required"),
        ({"address": "http://127.0.0.1:1", "key_name": "k", "mout": "x"}, "unknown setting"),
        (
            {"address": "http://127.0.0.1:1", "key_name": "k", "token": "a", "token_file": "b"},
            "both set",
        ),
        (
            {"address": "http://127.0.0.1:1", "key_name": "k", "token_file": "/nonexistent/t"},
            r"backend\.token_file: cannot open",
        ),
    ],
)
def test_bad_settings_are_refused_at_start_up(options: dict[str, Any], says: str) -> None:
    with pytest.raises(BackendConfigError, match=says):
        build(options)


def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s.secret-token-value")
    token_file.chmod(0o644)
    with pytest.raises(BackendConfigError, match="chmod 600") as caught:
        build({"address": "http://127.0.0.1:1", "key_name": "k", "token_file": str(token_file)})
    assert "secret-token-value" not in str(caught.value)


async def test_no_token_anywhere_is_a_config_error(
    openbao: OpenBaoServer, key_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    monkeypatch.delenv("BAO_TOKEN", raising=False)
    wrapper = build({"address": openbao.url, "key_name": key_name})
    with pytest.raises(BackendConfigError, match="token_file"):
        await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))
    monkeypatch.setenv("BAO_TOKEN", openbao.token)
    assert await wrapper.wrap_data_key(random_data_key(), context_for("k1", PREFIX))


def test_the_registry_builds_it(openbao: OpenBaoServer) -> None:
    wrapper = make_key_wrapper(
        "vault-transit", {"address": openbao.url, "key_name": "k", "mount": "kq-transit"}
    )
    assert wrapper.kind == "vault-transit"
    assert "kq-transit/k" in wrapper.describe()


async def test_latency_per_wrap_and_unwrap(openbao: OpenBaoServer, key_name: str) -> None:
    wrapper = wrapper_for(openbao, key_name)
    context = context_for("k1", PREFIX)
    times = []
    for _ in range(30):
        started = trio.current_time()
        wrapped = await wrapper.wrap_data_key(random_data_key(), context)
        await wrapper.unwrap_data_key(wrapped, context)
        times.append(trio.current_time() - started)
    print(f"\nvault-transit (OpenBao) wrap+unwrap median {statistics.median(times) * 1000:.1f} ms")
