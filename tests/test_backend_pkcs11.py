"""PKCS#11 key wrapper against a real SoftHSM2 token in a private temporary directory."""

from __future__ import annotations

import json
import logging
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pkcs11
import pytest
import trio
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11
from softhsm import SoftHsmToken, missing, softhsm_token
from wrapper_contract import PREFIX, check_key_wrapper, random_data_key

from backends.base import BackendConfigError, BackendDenied, KeyWrapper
from backends.envelope import context_for, open_sealed, seal
from backends.pkcs11 import Pkcs11Wrapper, build
from backends.registry import make_key_wrapper


@pytest.fixture(scope="module")
def hsm() -> Iterator[SoftHsmToken]:
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    with softhsm_token(label="kq-test") as token:
        yield token


@pytest.fixture
def options(hsm: SoftHsmToken) -> dict[str, Any]:
    """Options for a wrapper with its own, not yet existing key (created on first use)."""
    return {
        "module": hsm.module,
        "token_label": hsm.label,
        "pin": hsm.pin,
        "key_label": f"kq-{uuid.uuid4().hex[:10]}",
        "create_key": True,
        "timeout": 5,
        "attempt_timeout": 2,
    }


@pytest.fixture
def wrappers() -> Iterator[list[Pkcs11Wrapper]]:
    """Wrappers a test builds; all closed at its end, so no login outlives the test."""
    built: list[Pkcs11Wrapper] = []
    yield built
    for wrapper in built:
        wrapper.close()


@pytest.fixture
def wrapper(options: dict[str, Any], wrappers: list[Pkcs11Wrapper]) -> Pkcs11Wrapper:
    wrappers.append(build(options))
    return wrappers[-1]


@contextmanager
def token_session(hsm: SoftHsmToken) -> Iterator[Any]:
    """A session of our own on the test token, to look at what the wrapper left there."""
    token = pkcs11.lib(hsm.module).get_token(token_label=hsm.label)
    try:
        session = token.open(user_pin=hsm.pin)
    except p11.UserAlreadyLoggedIn:  # a live wrapper is logged in: share its login
        session = token.open()
    with session:
        yield session


def key_ids_labelled(hsm: SoftHsmToken, label: str) -> list[bytes]:
    """The CKA_IDs of the secret keys on the token that carry `label`."""
    with token_session(hsm) as session:
        template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
        return [key.id for key in session.get_objects(template)]


def flip(value: str, at: int) -> str:
    return value[:at] + ("A" if value[at] != "A" else "B") + value[at + 1 :]


async def test_pkcs11_wrapper_meets_the_key_wrapper_contract(wrapper: Pkcs11Wrapper) -> None:
    await check_key_wrapper(wrapper)
    assert wrapper.kind == "pkcs11"
    assert wrapper.describe() == f"PKCS#11 token kq-test, key {wrapper.key_label}"


async def test_wrapped_key_records_the_token_key_and_a_fresh_iv(
    wrapper: Pkcs11Wrapper, hsm: SoftHsmToken
) -> None:
    context = context_for("k1", PREFIX)
    first = await wrapper.wrap_data_key(random_data_key(), context)
    second = await wrapper.wrap_data_key(random_data_key(), context)
    assert set(first) == {"key_label", "key_id", "iv", "wrapped"}
    assert first["key_label"] == wrapper.key_label
    (key_id,) = key_ids_labelled(hsm, wrapper.key_label)
    assert first["key_id"] == key_id.hex() and len(key_id) == 16
    assert first["iv"] != second["iv"]


async def test_created_key_is_made_once_and_a_second_wrapper_opens_what_the_first_sealed(
    options: dict[str, Any], wrappers: list[Pkcs11Wrapper], hsm: SoftHsmToken
) -> None:
    first = build(options)
    wrappers.append(first)
    sealed = await seal(first, b"private key", kid="k1", prefix=PREFIX)

    # A second wrapper in the same process: its own session, sharing the process's login.
    second = build(options)
    wrappers.append(second)
    assert await open_sealed(second, sealed, kid="k1", prefix=PREFIX) == b"private key"
    assert len(key_ids_labelled(hsm, options["key_label"])) == 1

    # Closing the first logs the whole process out; the second logs in again on its next call.
    first.close()
    assert await open_sealed(second, sealed, kid="k1", prefix=PREFIX) == b"private key"
    second.close()

    # A fresh wrapper that may not create keys finds the one the first created.
    third = build({**options, "create_key": False})
    wrappers.append(third)
    assert await open_sealed(third, sealed, kid="k1", prefix=PREFIX) == b"private key"
    assert len(key_ids_labelled(hsm, options["key_label"])) == 1


async def test_a_missing_key_without_create_key_is_a_config_error_naming_key_label(
    options: dict[str, Any], hsm: SoftHsmToken
) -> None:
    with pytest.raises(BackendConfigError, match=r"backend\.key_label") as caught:
        build({**options, "create_key": False})
    assert "create_key" in caught.value.hint
    assert key_ids_labelled(hsm, options["key_label"]) == []


def test_a_wrong_pin_is_a_config_error_naming_the_setting_but_never_the_pin(
    options: dict[str, Any], hsm: SoftHsmToken, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + uuid.uuid4().hex[:8]
    with pytest.raises(BackendConfigError, match=r"backend\.pin:") as caught:
        build({**options, "pin": wrong})
    for text in (str(caught.value), repr(caught.value), caught.value.hint):
        assert wrong not in text and hsm.pin not in text

    pin_file = tmp_path / "pin"
    pin_file.write_text(wrong + "\n")
    pin_file.chmod(0o600)
    without_pin = {k: v for k, v in options.items() if k != "pin"}
    with pytest.raises(BackendConfigError, match=r"backend\.pin_file:") as caught:
        build({**without_pin, "pin_file": str(pin_file)})
    assert wrong not in str(caught.value)
    assert wrong not in caplog.text and hsm.pin not in caplog.text


async def test_the_pin_stays_out_of_repr_describe_logs_and_wrapped_keys(
    options: dict[str, Any],
    wrappers: list[Pkcs11Wrapper],
    hsm: SoftHsmToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrapper = build(options)  # creates its key: logged
    wrappers.append(wrapper)
    sealed = await seal(wrapper, b"private key", kid="k1", prefix=PREFIX)
    assert wrapper._open is not None
    wrapper._open.session.close()  # a broken session, dropped and reopened: logged
    assert await open_sealed(wrapper, sealed, kid="k1", prefix=PREFIX) == b"private key"
    assert "created AES-256 key" in caplog.text
    for text in (repr(wrapper), wrapper.describe(), json.dumps(sealed), caplog.text):
        assert hsm.pin not in text


def test_an_unknown_token_label_is_a_config_error_naming_token_label(
    options: dict[str, Any],
) -> None:
    with pytest.raises(BackendConfigError, match=r"backend\.token_label"):
        build({**options, "token_label": "no-such-token"})


async def test_a_pin_file_readable_by_others_is_refused_and_a_private_one_works(
    options: dict[str, Any], wrappers: list[Pkcs11Wrapper], hsm: SoftHsmToken, tmp_path: Path
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(hsm.pin + "\n")
    pin_file.chmod(0o644)
    without_pin = {k: v for k, v in options.items() if k != "pin"}
    with pytest.raises(
        BackendConfigError, match=r"backend\.pin_file: .* group or others"
    ) as caught:
        build({**without_pin, "pin_file": str(pin_file)})
    assert "chmod 600" in caught.value.hint and hsm.pin not in str(caught.value)

    pin_file.chmod(0o600)
    wrappers.append(build({**without_pin, "pin_file": str(pin_file)}))
    sealed = await seal(wrappers[-1], b"private key", kid="k1", prefix=PREFIX)
    assert await open_sealed(wrappers[-1], sealed, kid="k1", prefix=PREFIX) == b"private key"


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"colour": "blue"}, "colour"),
        ({"module": None}, r"backend\.module"),
        ({"module": "/nonexistent/libpkcs11.so"}, r"backend\.module"),
        ({"module": __file__}, r"backend\.module"),  # exists, but is no shared library
        ({"token_label": None}, r"backend\.token_label"),
        ({"key_label": ""}, r"backend\.key_label"),
        ({"pin": None}, r"backend\.pin / backend\.pin_file"),
        ({"pin_file": "/some/where"}, r"backend\.pin / backend\.pin_file"),
        ({"create_key": "yes"}, r"backend\.create_key"),
        ({"timeout": 0}, r"backend\.timeout"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(
    options: dict[str, Any], change: dict[str, Any], setting: str
) -> None:
    changed = {k: v for k, v in {**options, **change}.items() if v is not None}
    with pytest.raises(BackendConfigError, match=setting):
        build(changed)


async def test_the_registry_builds_the_pkcs11_wrapper(
    options: dict[str, Any], wrappers: list[Pkcs11Wrapper]
) -> None:
    wrapper = make_key_wrapper("pkcs11", options)
    assert isinstance(wrapper, Pkcs11Wrapper) and isinstance(wrapper, KeyWrapper)
    wrappers.append(wrapper)
    sealed = await seal(wrapper, b"private key", kid="k1", prefix=PREFIX)
    assert sealed["wrapper"] == "pkcs11"
    assert await open_sealed(wrapper, sealed, kid="k1", prefix=PREFIX) == b"private key"


async def test_a_tampered_iv_ciphertext_or_context_is_denied_by_the_token(
    wrapper: Pkcs11Wrapper,
) -> None:
    context = context_for("k1", PREFIX)
    data_key = random_data_key()
    wrapped = await wrapper.wrap_data_key(data_key, context)
    assert await wrapper.unwrap_data_key(wrapped, context) == data_key

    broken: list[dict[str, str]] = [
        {**wrapped, "iv": flip(wrapped["iv"], 3)},
        {**wrapped, "wrapped": flip(wrapped["wrapped"], 10)},  # ciphertext
        {**wrapped, "wrapped": flip(wrapped["wrapped"], 60)},  # tag
        {**wrapped, "wrapped": wrapped["wrapped"][:-4]},  # truncated
        {**wrapped, "key_label": "another-key"},
        {**wrapped, "key_id": "00" * 16},
        {**wrapped, "key_id": wrapped["key_id"].upper()},  # not the recorded spelling
        {k: v for k, v in wrapped.items() if k != "iv"},
    ]
    for case in broken:
        with pytest.raises(BackendDenied):
            await wrapper.unwrap_data_key(case, context)
    with pytest.raises(BackendDenied, match="does not open"):
        await wrapper.unwrap_data_key(wrapped, context_for("k2", PREFIX))
    # A refused decrypt does not break the session.
    assert await wrapper.unwrap_data_key(wrapped, context) == data_key


async def test_records_wrapped_by_a_previous_key_open_after_key_label_moves(
    options: dict[str, Any], wrappers: list[Pkcs11Wrapper]
) -> None:
    old = build(options)
    wrappers.append(old)
    sealed = await seal(old, b"private key", kid="k1", prefix=PREFIX)
    old.close()
    new = build({**options, "key_label": options["key_label"] + "-v2"})
    wrappers.append(new)
    assert await open_sealed(new, sealed, kid="k1", prefix=PREFIX) == b"private key"
    assert (await seal(new, b"x", kid="k2", prefix=PREFIX))["data_key"]["key_label"].endswith("-v2")


async def test_the_created_key_is_sensitive_and_never_extractable(
    wrapper: Pkcs11Wrapper, hsm: SoftHsmToken
) -> None:
    wrapper.close()  # our session below logs in and out on its own
    with token_session(hsm) as session:
        key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=wrapper.key_label)
        assert key.key_type == KeyType.AES
        assert key[Attribute.VALUE_LEN] == 32
        assert key[Attribute.TOKEN] is True and key[Attribute.PRIVATE] is True
        assert key[Attribute.SENSITIVE] is True and key[Attribute.ALWAYS_SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False and key[Attribute.NEVER_EXTRACTABLE] is True
        assert key[Attribute.ENCRYPT] is True and key[Attribute.DECRYPT] is True
        for capability in (Attribute.WRAP, Attribute.UNWRAP, Attribute.SIGN, Attribute.DERIVE):
            assert key[capability] is False
        with pytest.raises(p11.AttributeSensitive):
            key[Attribute.VALUE]


async def test_a_broken_session_is_dropped_and_reopened(wrapper: Pkcs11Wrapper) -> None:
    context = context_for("k1", PREFIX)
    wrapped = await wrapper.wrap_data_key(random_data_key(), context)
    # Invalidate the wrapper's session handle behind its back (as a token reset would).
    opened = wrapper._open
    assert opened is not None
    opened.session.close()
    assert len(await wrapper.unwrap_data_key(wrapped, context)) == 32
    assert wrapper._open is not None and wrapper._open is not opened


async def test_concurrent_calls_share_one_session_safely(wrapper: Pkcs11Wrapper) -> None:
    results: dict[int, bytes] = {}

    async def round_trip(i: int) -> None:
        sealed = await seal(wrapper, f"key {i}".encode(), kid=f"k{i}", prefix=PREFIX)
        results[i] = await open_sealed(wrapper, sealed, kid=f"k{i}", prefix=PREFIX)

    async with trio.open_nursery() as nursery:
        for i in range(32):
            nursery.start_soon(round_trip, i)
    assert results == {i: f"key {i}".encode() for i in range(32)}


async def test_wrap_and_unwrap_latency_on_softhsm(
    wrapper: Pkcs11Wrapper, capsys: pytest.CaptureFixture[str]
) -> None:
    context = context_for("k1", PREFIX)
    data_key = random_data_key()
    timings = []
    for _ in range(200):
        start = time.perf_counter()
        wrapped = await wrapper.wrap_data_key(data_key, context)
        assert await wrapper.unwrap_data_key(wrapped, context) == data_key
        timings.append(time.perf_counter() - start)
    median_ms = statistics.median(timings) * 1000
    with capsys.disabled():
        print(f"\nPKCS#11 (SoftHSM2) wrap+unwrap median {median_ms:.3f} ms over 200 round trips")
    assert median_ms < 100
