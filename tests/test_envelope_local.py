"""Envelope encryption with the local KEK file: sealed keys open only where they belong."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.crypto import b64url_decode, b64url_encode, generate_private_key, private_key_to_pkcs8
from backends.base import BackendConfigError, BackendDenied, BackendError, KeyWrapper
from backends.envelope import open_sealed, seal
from backends.local import LocalKekWrapper
from backends.registry import KEY_WRAPPERS, Provider, make_key_wrapper

PREFIX = "/keyquorum/test"


@pytest.fixture
def pkcs8() -> bytes:
    return private_key_to_pkcs8(generate_private_key("ES256"))


class RecordingWrapper:
    """A local wrapper that remembers the data keys it was handed, to look for them later."""

    kind = "local"

    def __init__(self, inner: LocalKekWrapper) -> None:
        self.inner = inner
        self.data_keys: list[bytes] = []

    async def wrap_data_key(self, data_key: bytes, context: Mapping[str, str]) -> dict[str, str]:
        self.data_keys.append(data_key)
        return await self.inner.wrap_data_key(data_key, context)

    async def unwrap_data_key(
        self, wrapped: Mapping[str, str], context: Mapping[str, str]
    ) -> bytes:
        return await self.inner.unwrap_data_key(wrapped, context)

    def describe(self) -> str:
        return "recording " + self.inner.describe()


def appears_in(secret: bytes, text: str) -> bool:
    return any(form in text for form in (b64url_encode(secret), secret.hex(), repr(secret)))


# ---- envelope -----------------------------------------------------------------------------------


async def test_sealed_key_round_trips_through_json(tmp_path: Path, pkcs8: bytes) -> None:
    wrapper = LocalKekWrapper.open(tmp_path / "kek")
    sealed = json.loads(json.dumps(await seal(wrapper, pkcs8, kid="k1", prefix=PREFIX)))
    assert await open_sealed(wrapper, sealed, kid="k1", prefix=PREFIX) == pkcs8
    assert set(sealed) == {"scheme", "wrapper", "data_key", "nonce", "ciphertext"}
    assert sealed["scheme"] == "envelope-v1" and sealed["wrapper"] == "local"
    assert set(sealed["data_key"]) == {"kek_id", "nonce", "wrapped"}
    assert len(b64url_decode(sealed["nonce"])) == 12


async def test_sealed_json_holds_neither_the_private_key_nor_the_data_key_nor_the_kek(
    tmp_path: Path, pkcs8: bytes
) -> None:
    wrapper = RecordingWrapper(LocalKekWrapper.open(tmp_path / "kek"))
    assert isinstance(wrapper, KeyWrapper)
    sealed = await seal(wrapper, pkcs8, kid="k1", prefix=PREFIX)
    text = json.dumps(sealed)
    (data_key,) = wrapper.data_keys
    assert len(data_key) == 32
    for secret in (pkcs8, data_key, (tmp_path / "kek").read_bytes()):
        assert not appears_in(secret, text)


async def test_every_seal_uses_a_fresh_data_key_and_nonce(tmp_path: Path, pkcs8: bytes) -> None:
    wrapper = RecordingWrapper(LocalKekWrapper.open(tmp_path / "kek"))
    first = await seal(wrapper, pkcs8, kid="k1", prefix=PREFIX)
    second = await seal(wrapper, pkcs8, kid="k1", prefix=PREFIX)
    assert wrapper.data_keys[0] != wrapper.data_keys[1]
    assert first["nonce"] != second["nonce"] and first["ciphertext"] != second["ciphertext"]


@given(plaintext=st.binary(max_size=300), kid=st.text(max_size=12), prefix=st.text(max_size=12))
@settings(max_examples=25)
def test_any_plaintext_opens_only_for_the_kid_and_prefix_it_was_sealed_for(
    tmp_path_factory: pytest.TempPathFactory, plaintext: bytes, kid: str, prefix: str
) -> None:
    wrapper = LocalKekWrapper.open(tmp_path_factory.getbasetemp() / "property-kek")

    async def check() -> None:
        sealed = await seal(wrapper, plaintext, kid=kid, prefix=prefix)
        assert await open_sealed(wrapper, sealed, kid=kid, prefix=prefix) == plaintext
        with pytest.raises(BackendDenied):
            await open_sealed(wrapper, sealed, kid=kid + "x", prefix=prefix)
        with pytest.raises(BackendDenied):
            await open_sealed(wrapper, sealed, kid=kid, prefix=prefix + "x")

    trio.run(check)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("kid", "data key of k2 does not open with KEK"),
        ("prefix", "another kid or cluster prefix"),
        ("ciphertext", "key k1: the sealed private key does not decrypt"),
        ("data_key", "does not open with KEK"),
        ("nonce", "key k1: malformed sealed private key for the 'local' backend"),
        ("short nonce", "nonce is 8 bytes"),
        ("wrapper", "sealed by the 'aws-kms' backend but this agent is configured with 'local'"),
        ("scheme", "unknown protection scheme 'envelope-v0'"),
        ("missing", "ciphertext is missing"),
    ],
)
async def test_a_sealed_key_moved_or_tampered_is_denied_saying_why(
    tmp_path: Path, pkcs8: bytes, where: str, message: str
) -> None:
    wrapper = LocalKekWrapper.open(tmp_path / "kek")
    sealed: dict[str, Any] = await seal(wrapper, pkcs8, kid="k1", prefix=PREFIX)
    kid, prefix = "k1", PREFIX
    if where == "kid":
        kid = "k2"
    elif where == "prefix":
        prefix = "/keyquorum/other"
    elif where == "wrapper":
        sealed["wrapper"] = "aws-kms"
    elif where == "scheme":
        sealed["scheme"] = "envelope-v0"
    elif where == "data_key":
        wrapped = b64url_decode(sealed["data_key"]["wrapped"])
        sealed["data_key"]["wrapped"] = b64url_encode(bytes([wrapped[0] ^ 1]) + wrapped[1:])
    elif where == "nonce":
        sealed["nonce"] = "not base64!"
    elif where == "short nonce":
        sealed["nonce"] = b64url_encode(bytes(8))
    elif where == "missing":
        del sealed["ciphertext"]
    else:
        ct = b64url_decode(sealed["ciphertext"])
        sealed["ciphertext"] = b64url_encode(ct[:-1] + bytes([ct[-1] ^ 1]))
    with pytest.raises(BackendDenied, match=message):
        await open_sealed(wrapper, sealed, kid=kid, prefix=prefix)


@pytest.mark.parametrize("sealed", [None, [], "envelope-v1", {"scheme": "envelope-v1"}])
async def test_a_sealed_key_that_is_not_an_envelope_is_denied(tmp_path: Path, sealed: Any) -> None:
    wrapper = LocalKekWrapper.open(tmp_path / "kek")
    with pytest.raises(BackendDenied, match="key k1"):
        await open_sealed(wrapper, sealed, kid="k1", prefix=PREFIX)


async def test_wrong_kek_is_refused_naming_both_kek_ids_and_the_file(
    tmp_path: Path, pkcs8: bytes
) -> None:
    right = LocalKekWrapper.open(tmp_path / "a")
    wrong = LocalKekWrapper.open(tmp_path / "b")
    sealed = await seal(right, pkcs8, kid="k1", prefix=PREFIX)
    with pytest.raises(BackendDenied, match="wrong KEK file") as info:
        await open_sealed(wrong, sealed, kid="k1", prefix=PREFIX)
    message = str(info.value)
    assert (
        f"KEK id {right.kek_id}" in message and f"{tmp_path / 'b'} has id {wrong.kek_id}" in message
    )
    for kek in ((tmp_path / "a").read_bytes(), (tmp_path / "b").read_bytes()):
        assert not appears_in(kek, message)


# ---- the KEK file -------------------------------------------------------------------------------


async def test_kek_file_is_created_owner_only_on_first_start(tmp_path: Path) -> None:
    path = tmp_path / "state" / "kek"
    wrapper = LocalKekWrapper.open(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    kek = path.read_bytes()
    assert len(kek) == 32
    assert LocalKekWrapper.open(path, create=False).kek_id == wrapper.kek_id
    assert path.read_bytes() == kek  # an existing KEK is never replaced
    for text in (repr(wrapper), wrapper.describe()):
        assert not appears_in(kek, text)
    assert wrapper.kek_id in wrapper.describe() and str(path) in wrapper.describe()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_kek_accessible_by_group_or_others_is_refused_with_the_fix(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "kek"
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    with pytest.raises(BackendConfigError, match=f"chmod 600 {path}") as info:
        LocalKekWrapper.open(path)
    assert str(path) in info.value.message and f"{mode:04o}" in info.value.message


def test_missing_kek_without_create_is_refused_and_not_created(tmp_path: Path) -> None:
    with pytest.raises(BackendConfigError, match="does not exist") as info:
        LocalKekWrapper.open(tmp_path / "absent", create=False)
    assert "create_kek" in info.value.hint
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("size", [0, 16, 33])
def test_kek_of_the_wrong_length_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "kek"
    path.write_bytes(os.urandom(size))
    path.chmod(0o600)
    with pytest.raises(BackendConfigError, match=f"holds {size} bytes, not a 32-byte KEK"):
        LocalKekWrapper.open(path)


def test_a_directory_in_place_of_the_kek_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kek").mkdir(mode=0o700)
    with pytest.raises(BackendConfigError, match="not a regular file"):
        LocalKekWrapper.open(tmp_path / "kek")


# ---- errors and the registry --------------------------------------------------------------------


def test_backend_errors_carry_a_hint_by_default() -> None:
    for error in (BackendDenied("no"), BackendConfigError("bad")):
        assert isinstance(error, BackendError) and error.hint
        assert str(error) == f"{error.message}; {error.hint}"


def test_registry_builds_the_local_wrapper_from_config_options(tmp_path: Path) -> None:
    wrapper = make_key_wrapper("local", {"kek_file": str(tmp_path / "kek"), "create_kek": True})
    assert isinstance(wrapper, LocalKekWrapper) and wrapper.kind == "local"
    with pytest.raises(BackendConfigError, match="does not exist"):
        make_key_wrapper("local", {"kek_file": str(tmp_path / "new"), "create_kek": False})


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("nope", {}, "unknown backend 'nope'; known: .*local.*pkcs11.*vault-transit"),
        ("local", {"kek_file": "/x", "region": "eu"}, "unknown setting.*region"),
        ("local", {}, "backend.kek_file: required"),
        ("local", {"kek_file": "/x", "create_kek": "no"}, "backend.create_kek: must be true or"),
    ],
)
def test_registry_refuses_bad_settings_naming_them(
    kind: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(BackendConfigError, match=message):
        make_key_wrapper(kind, options)


def test_registry_names_the_pip_extra_of_a_provider_whose_sdk_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "kq_fake_provider.py").write_text("import kq_sdk_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(KEY_WRAPPERS, "fake", Provider("kq_fake_provider", "fake"))
    with pytest.raises(BackendConfigError, match=r"kq_sdk_that_is_not_installed") as info:
        make_key_wrapper("fake", {})
    assert info.value.hint == "pip install 'keyquorum[fake]'"
