"""Remote signing on a PKCS#11 token (a real SoftHSM2 token in a private temporary directory):
one key pair generated on the token per rotation, signing there, both halves destroyed once
retired.

SoftHSM is a software token, so nothing here exercises a network HSM's latency, session limits,
handle reuse after a destroy (SoftHSM never reuses handles; the signer re-checks cached handles
for HSMs that do) or a token whose policy forbids some mechanism or template.
"""

from __future__ import annotations

import hashlib
import logging
import re
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
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from softhsm import SoftHsmToken, missing, softhsm_token

from agent.crypto import verify_signature
from backends.base import BackendConfigError, BackendDenied, RemoteSigner
from backends.pkcs11 import Pkcs11Signer, build_signer
from backends.registry import make_remote_signer
from backends.remote import RemoteKeySigner, jwk_of_pem, remote_private

PREFIX = "/keyquorum/remote-test"
ALGS = ["ES256", "ES384", "EdDSA", "RS256", "PS256"]
KEY_TYPES = {
    "ES256": KeyType.EC,
    "ES384": KeyType.EC,
    "EdDSA": KeyType.EC_EDWARDS,
    "RS256": KeyType.RSA,
    "PS256": KeyType.RSA,
}


@pytest.fixture(scope="module")
def hsm() -> Iterator[SoftHsmToken]:
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    with softhsm_token(label="kq-remote") as token:
        yield token


@pytest.fixture
def options(hsm: SoftHsmToken) -> dict[str, Any]:
    """Options for a signer with its own label prefix, so tests do not see each other's keys."""
    return {
        "module": hsm.module,
        "token_label": hsm.label,
        "pin": hsm.pin,
        "key_label_prefix": f"kq{uuid.uuid4().hex[:8]}",
        "timeout": 5,
        "attempt_timeout": 2,
    }


@pytest.fixture
def signers() -> Iterator[list[Pkcs11Signer]]:
    """Signers a test builds; all closed at its end, so no login outlives the test."""
    built: list[Pkcs11Signer] = []
    yield built
    for signer in built:
        signer.close()


@pytest.fixture
def signer(options: dict[str, Any], signers: list[Pkcs11Signer]) -> Pkcs11Signer:
    signers.append(build_signer(options))
    return signers[-1]


@contextmanager
def token_session(hsm: SoftHsmToken) -> Iterator[Any]:
    """A session of our own on the test token, to look at what the signer left there."""
    token = pkcs11.lib(hsm.module).get_token(token_label=hsm.label)
    try:
        session = token.open(user_pin=hsm.pin)
    except p11.UserAlreadyLoggedIn:  # a live signer is logged in: share its login
        session = token.open()
    with session:
        yield session


def objects_labelled(hsm: SoftHsmToken, label: str) -> dict[ObjectClass, list[bytes]]:
    """The CKA_IDs of the public and private key objects on the token that carry `label`."""
    with token_session(hsm) as session:
        return {
            cls: [
                obj.id
                for obj in session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label})
            ]
            for cls in (ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY)
        }


def cluster_hash(prefix: str) -> str:
    return hashlib.sha256(prefix.encode()).hexdigest()[:8]


@pytest.mark.parametrize("alg", ALGS)
async def test_key_pairs_generated_on_the_token_sign_verifiable_jws_signatures(
    signer: Pkcs11Signer, alg: str, hsm: SoftHsmToken
) -> None:
    assert isinstance(signer, RemoteSigner)
    assert signer.supports(alg)  # SoftHSM 2.6.1 offers every mechanism these need
    before = int(time.time() * 1000)
    created = await signer.create_key(alg, PREFIX)
    after = int(time.time() * 1000)

    label, key_id = created.ref["label"], created.ref["id"]
    assert set(created.ref) == {"label", "id"}
    match = re.fullmatch(
        rf"{signer.key_label_prefix}-{cluster_hash(PREFIX)}-([0-9a-f]{{12}})-[0-9a-f]{{8}}", label
    )
    assert match is not None, label
    assert created.created_at is not None and before <= created.created_at <= after
    assert int(match.group(1), 16) == created.created_at
    assert re.fullmatch("[0-9a-f]{32}", key_id)
    assert objects_labelled(hsm, label) == {
        ObjectClass.PUBLIC_KEY: [bytes.fromhex(key_id)],
        ObjectClass.PRIVATE_KEY: [bytes.fromhex(key_id)],
    }

    jwk = jwk_of_pem(created.public_key_pem, alg)
    assert await signer.public_key(created.ref) == created.public_key_pem
    for message in (b"", b"hello", b"x" * 10_000):
        signature = await signer.sign(created.ref, alg, message)
        assert verify_signature(jwk, message, signature), (alg, len(message))
        assert not verify_signature(jwk, message + b"!", signature)
    loaded = await RemoteKeySigner.load(signer, remote_private("pkcs11", created.ref), alg, jwk)
    assert verify_signature(jwk, b"keyring", await loaded.sign_async(b"keyring"))


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
async def test_the_private_half_is_sensitive_non_extractable_and_may_only_sign(
    signer: Pkcs11Signer, alg: str, hsm: SoftHsmToken
) -> None:
    created = await signer.create_key(alg, PREFIX)
    signer.close()  # our session below logs in and out on its own
    template = {
        Attribute.LABEL: created.ref["label"],
        Attribute.ID: bytes.fromhex(created.ref["id"]),
    }
    with token_session(hsm) as session:
        (private,) = session.get_objects({**template, Attribute.CLASS: ObjectClass.PRIVATE_KEY})
        (public,) = session.get_objects({**template, Attribute.CLASS: ObjectClass.PUBLIC_KEY})
        assert private.key_type == KEY_TYPES[alg] and public.key_type == KEY_TYPES[alg]
        assert private[Attribute.TOKEN] is True and private[Attribute.PRIVATE] is True
        assert private[Attribute.SENSITIVE] is True and private[Attribute.ALWAYS_SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.NEVER_EXTRACTABLE] is True
        assert private[Attribute.LOCAL] is True  # generated on the token, never imported
        assert private[Attribute.SIGN] is True
        for capability in (Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE):
            assert private[capability] is False
        assert public[Attribute.TOKEN] is True and public[Attribute.VERIFY] is True
        for capability in (Attribute.ENCRYPT, Attribute.WRAP):
            assert public[capability] is False
        secret = Attribute.PRIVATE_EXPONENT if alg == "RS256" else Attribute.VALUE
        with pytest.raises(p11.AttributeSensitive):
            private[secret]
    # The signer opens a fresh session after being closed.
    jwk = jwk_of_pem(created.public_key_pem, alg)
    assert verify_signature(jwk, b"m", await signer.sign(created.ref, alg, b"m"))


async def test_owned_keys_are_the_prefix_s_live_keys_with_their_creation_time(
    signer: Pkcs11Signer,
) -> None:
    assert await signer.owned_keys(PREFIX) == []
    mine = [await signer.create_key(alg, PREFIX) for alg in ("ES256", "EdDSA", "ES256")]
    theirs = await signer.create_key("ES256", "/another/cluster")
    owned = await signer.owned_keys(PREFIX)
    assert sorted((k.ref["label"], k.ref["id"], k.created_at) for k in owned) == sorted(
        (k.ref["label"], k.ref["id"], k.created_at) for k in mine
    )
    assert all(k.public_key_pem == b"" for k in owned)
    assert [k.ref for k in await signer.owned_keys("/another/cluster")] == [theirs.ref]
    assert await signer.owned_keys("/a/third/cluster") == []


async def test_owned_keys_ignore_keys_of_another_label_prefix(
    signer: Pkcs11Signer, options: dict[str, Any], signers: list[Pkcs11Signer]
) -> None:
    other = build_signer({**options, "key_label_prefix": options["key_label_prefix"] + "x"})
    signers.append(other)
    await other.create_key("ES256", PREFIX)
    assert await signer.owned_keys(PREFIX) == []


async def test_retire_destroys_both_objects_and_the_key_is_then_denied(
    signer: Pkcs11Signer, hsm: SoftHsmToken
) -> None:
    first = await signer.create_key("ES256", PREFIX)
    second = await signer.create_key("ES256", PREFIX)
    await signer.sign(first.ref, "ES256", b"caches the handle")
    await signer.retire(first.ref)

    assert objects_labelled(hsm, first.ref["label"]) == {
        ObjectClass.PUBLIC_KEY: [],
        ObjectClass.PRIVATE_KEY: [],
    }
    assert [k.ref for k in await signer.owned_keys(PREFIX)] == [second.ref]
    with pytest.raises(BackendDenied, match="retired or destroyed"):
        await signer.sign(first.ref, "ES256", b"after retirement")
    with pytest.raises(BackendDenied, match="retired or destroyed"):
        await signer.public_key(first.ref)
    await signer.retire(first.ref)  # idempotent: a leader retrying after a crash
    jwk = jwk_of_pem(second.public_key_pem, "ES256")
    assert verify_signature(jwk, b"m", await signer.sign(second.ref, "ES256", b"m"))


async def test_a_second_signer_in_the_same_process_signs_with_the_first_one_s_key(
    options: dict[str, Any], signers: list[Pkcs11Signer]
) -> None:
    first = build_signer(options)
    signers.append(first)
    created = await first.create_key("ES256", PREFIX)
    jwk = jwk_of_pem(created.public_key_pem, "ES256")

    # Its own session, sharing the process's login (CKR_USER_ALREADY_LOGGED_IN).
    second = build_signer(options)
    signers.append(second)
    assert verify_signature(jwk, b"one", await second.sign(created.ref, "ES256", b"one"))
    session_before = second._open
    assert session_before is not None

    # Closing the first logs the whole process out: the second's cached handle goes invalid
    # and its searches would see no private key; it logs in again instead of denying the key.
    first.close()
    assert verify_signature(jwk, b"two", await second.sign(created.ref, "ES256", b"two"))
    assert second._open is not session_before

    # The same for a listing, which would otherwise silently come back empty.
    third = build_signer(options)
    signers.append(third)
    second.close()
    assert [k.ref for k in await third.owned_keys(PREFIX)] == [created.ref]
    third.close()
    fourth = build_signer(options)  # a fresh login of its own
    signers.append(fourth)
    assert await fourth.public_key(created.ref) == created.public_key_pem
    await fourth.retire(created.ref)
    assert await fourth.owned_keys(PREFIX) == []


async def test_a_key_retired_by_another_signer_is_denied_not_signed_with_a_stale_handle(
    options: dict[str, Any], signers: list[Pkcs11Signer]
) -> None:
    leader, follower = build_signer(options), build_signer(options)
    signers.extend([follower, leader])  # the follower shares the leader's login
    created = await leader.create_key("ES384", PREFIX)
    assert len(await follower.sign(created.ref, "ES384", b"cached")) == 96
    await leader.retire(created.ref)
    with pytest.raises(BackendDenied, match="retired or destroyed"):
        await follower.sign(created.ref, "ES384", b"stale")


async def test_a_cached_handle_that_now_names_another_object_is_not_used(
    signer: Pkcs11Signer,
) -> None:
    """Some HSMs give a destroyed object's handle to the next object: the cache re-checks."""
    mine = await signer.create_key("ES256", PREFIX)
    other = await signer.create_key("ES256", PREFIX)
    await signer.sign(other.ref, "ES256", b"caches the other key's handle")
    opened = signer._open
    assert opened is not None
    label, key_id = mine.ref["label"], bytes.fromhex(mine.ref["id"])
    opened.keys[(label, key_id)] = opened.keys[(other.ref["label"], bytes.fromhex(other.ref["id"]))]
    signature = await signer.sign(mine.ref, "ES256", b"m")
    assert verify_signature(jwk_of_pem(mine.public_key_pem, "ES256"), b"m", signature)


def test_a_wrong_pin_is_a_config_error_naming_the_setting_but_never_the_pin(
    options: dict[str, Any], hsm: SoftHsmToken, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + uuid.uuid4().hex[:8]
    with pytest.raises(BackendConfigError, match=r"backend\.pin:") as caught:
        build_signer({**options, "pin": wrong})
    for text in (str(caught.value), repr(caught.value), caught.value.hint):
        assert wrong not in text and hsm.pin not in text

    pin_file = tmp_path / "pin"
    pin_file.write_text(wrong + "\n")
    pin_file.chmod(0o600)
    without_pin = {k: v for k, v in options.items() if k != "pin"}
    with pytest.raises(BackendConfigError, match=r"backend\.pin_file:") as caught:
        build_signer({**without_pin, "pin_file": str(pin_file)})
    assert wrong not in str(caught.value)
    assert wrong not in caplog.text and hsm.pin not in caplog.text


async def test_a_private_pin_file_works_and_the_pin_stays_out_of_repr_describe_and_logs(
    options: dict[str, Any],
    signers: list[Pkcs11Signer],
    hsm: SoftHsmToken,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    pin_file = tmp_path / "pin"
    pin_file.write_text(hsm.pin + "\n")
    pin_file.chmod(0o600)
    signer = build_signer(
        {**{k: v for k, v in options.items() if k != "pin"}, "pin_file": str(pin_file)}
    )
    signers.append(signer)
    created = await signer.create_key("ES256", PREFIX)
    assert signer._open is not None
    signer._open.session.close()  # a broken session, dropped and reopened: logged
    await signer.sign(created.ref, "ES256", b"m")
    await signer.retire(created.ref)
    assert "generated ES256 key pair" in caplog.text and "retired key pair" in caplog.text
    assert signer.describe() == (
        f"PKCS#11 token kq-remote, one key pair per rotation ({options['key_label_prefix']}-*)"
    )
    for text in (repr(signer), signer.describe(), caplog.text):
        assert hsm.pin not in text


@pytest.mark.parametrize(
    "ref",
    [
        {"label": "someone-elses-key", "id": "00" * 16},
        {"id": "00" * 16},
        {"label": "PREFIX-x", "id": "00" * 15},
        {"label": "PREFIX-x", "id": "AB" * 16},  # not the recorded spelling
        {"label": "PREFIX-x"},
    ],
)
async def test_a_reference_outside_the_label_prefix_or_malformed_is_denied(
    signer: Pkcs11Signer, ref: dict[str, str]
) -> None:
    ref = {k: v.replace("PREFIX", signer.key_label_prefix) for k, v in ref.items()}
    with pytest.raises(BackendDenied):
        await signer.sign(ref, "ES256", b"x")
    with pytest.raises(BackendDenied):
        await signer.retire(ref)


async def test_a_record_naming_another_algorithm_than_its_key_is_denied(
    signer: Pkcs11Signer,
) -> None:
    created = await signer.create_key("ES256", PREFIX)
    with pytest.raises(BackendDenied, match="not of the algorithm"):
        await signer.sign(created.ref, "ES384", b"x")  # a P-256 key gives 64 bytes, not 96
    with pytest.raises(BackendDenied, match="another algorithm"):
        await signer.sign(created.ref, "EdDSA", b"x")


def test_supports_follows_the_token_s_mechanisms(signer: Pkcs11Signer) -> None:
    assert [alg for alg in ALGS if signer.supports(alg)] == ALGS
    assert not signer.supports("HS256") and not signer.supports("ES512")
    assert signer._mechanisms is not None
    without_eddsa = signer._mechanisms - {Mechanism.EC_EDWARDS_KEY_PAIR_GEN}
    signer._mechanisms = without_eddsa  # as a token without Edwards curves would answer
    assert not signer.supports("EdDSA") and signer.supports("ES256")


async def test_an_algorithm_the_token_lacks_is_a_config_error_naming_keys_algorithm(
    signer: Pkcs11Signer,
) -> None:
    assert signer._mechanisms is not None
    signer._mechanisms = signer._mechanisms - {Mechanism.EC_EDWARDS_KEY_PAIR_GEN}
    with pytest.raises(BackendConfigError, match=r"keys\.algorithm: .* cannot hold EdDSA"):
        await signer.create_key("EdDSA", PREFIX)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"key_label": "k"}, r"backend\.key_label: not used with mode = 'remote'"),
        ({"create_key": True}, r"backend\.create_key: not used with mode = 'remote'"),
        ({"key_label_prefix": "a/b"}, r"backend\.key_label_prefix"),
        ({"key_label_prefix": ""}, r"backend\.key_label_prefix"),
        ({"key_label_prefix": 7}, r"backend\.key_label_prefix"),
        ({"colour": "blue"}, "unknown setting"),
        ({"module": None}, r"backend\.module"),
        ({"module": "/nonexistent/libpkcs11.so"}, r"backend\.module"),
        ({"module": __file__}, r"backend\.module"),  # exists, but is no shared library
        ({"token_label": None}, r"backend\.token_label"),
        ({"token_label": "no-such-token"}, r"backend\.token_label"),
        ({"pin": None}, r"backend\.pin / backend\.pin_file"),
        ({"pin_file": "/some/where"}, r"backend\.pin / backend\.pin_file"),
        ({"timeout": 0}, r"backend\.timeout"),
        ({"attempt_timeout": "2"}, r"backend\.attempt_timeout"),
    ],
)
def test_bad_remote_settings_are_refused_naming_the_setting(
    options: dict[str, Any], change: dict[str, Any], says: str
) -> None:
    changed = {k: v for k, v in {**options, **change}.items() if v is not None}
    with pytest.raises(BackendConfigError, match=says) as caught:
        build_signer(changed)
    if "key_label" in change or "create_key" in change:
        assert "key_label_prefix" in caught.value.hint and "mode = 'wrap'" in caught.value.hint


async def test_the_registry_builds_the_pkcs11_remote_signer(
    options: dict[str, Any], signers: list[Pkcs11Signer]
) -> None:
    signer = make_remote_signer("pkcs11", options)
    assert isinstance(signer, Pkcs11Signer) and isinstance(signer, RemoteSigner)
    signers.append(signer)
    assert signer.kind == "pkcs11" and signer.policy.deadline == 5
    created = await signer.create_key("ES256", PREFIX)
    jwk = jwk_of_pem(created.public_key_pem, "ES256")
    assert verify_signature(jwk, b"m", await signer.sign(created.ref, "ES256", b"m"))


async def test_concurrent_signs_share_one_session_safely(signer: Pkcs11Signer) -> None:
    keys = [await signer.create_key(alg, PREFIX) for alg in ("ES256", "EdDSA")]
    algs = ["ES256", "EdDSA"]
    results: dict[int, bool] = {}

    async def sign(i: int) -> None:
        key, alg = keys[i % 2], algs[i % 2]
        message = f"message {i}".encode()
        signature = await signer.sign(key.ref, alg, message)
        results[i] = verify_signature(jwk_of_pem(key.public_key_pem, alg), message, signature)

    async with trio.open_nursery() as nursery:
        for i in range(32):
            nursery.start_soon(sign, i)
    assert results == {i: True for i in range(32)}


async def test_sign_and_create_latency_on_softhsm(
    signer: Pkcs11Signer, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = []
    for alg in ALGS:
        started = time.perf_counter()
        created = await signer.create_key(alg, PREFIX)
        create_ms = (time.perf_counter() - started) * 1000
        timings = []
        for i in range(100):
            started = time.perf_counter()
            await signer.sign(created.ref, alg, b"message %d" % i)
            timings.append(time.perf_counter() - started)
        median_ms = statistics.median(timings) * 1000
        figures.append(f"{alg} sign {median_ms:.3f} ms (create {create_ms:.0f} ms)")
        assert median_ms < 100
    with capsys.disabled():
        print("\nPKCS#11 (SoftHSM2) remote, median over 100 signs: " + "; ".join(figures))
