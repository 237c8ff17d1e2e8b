"""Signing primitives: every algorithm, RFC 7638 kids, JWS/JWT, endorsements, strict base64url."""

from __future__ import annotations

import hashlib
import hmac
import json
from functools import cache

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.crypto import (
    ALGORITHMS,
    InvalidToken,
    PrivateKey,
    Signer,
    UnsupportedAlgorithm,
    b64url_decode,
    b64url_encode,
    decode_jws,
    decode_jwt,
    encode_jws,
    encode_jwt,
    endorse,
    generate_private_key,
    jwk_thumbprint,
    load_pem_private_key,
    load_pkcs8,
    private_key_to_pkcs8,
    public_jwk,
    verify_endorsement,
    verify_signature,
)

RSA_ALGS = ("RS256", "PS256")


def key(alg: str, n: int = 0) -> PrivateKey:
    """One key per (alg, n) per test run; RS256 and PS256 share RSA keys (RSA keygen is slow)."""
    return _key("RS256" if alg in RSA_ALGS else alg, n)


@cache
def _key(alg: str, n: int) -> PrivateKey:
    return generate_private_key(alg)


def signer(alg: str, n: int = 0) -> Signer:
    return Signer.from_private_key(key(alg, n), alg)


def header_of(token: str) -> dict[str, object]:
    return json.loads(b64url_decode(token.split(".")[0]))  # type: ignore[no-any-return]


def forge_header(token: str, header: dict[str, object]) -> str:
    _, body, sig = token.split(".")
    return f"{b64url_encode(json.dumps(header).encode())}.{body}.{sig}"


def pem(private: object) -> bytes:
    return private.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# ---- signatures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
def test_every_algorithm_signs_and_verifies_and_a_flipped_bit_fails(alg: str) -> None:
    s = signer(alg)
    signature = s.sign(b"payload")
    assert verify_signature(s.jwk, b"payload", signature)
    assert not verify_signature(s.jwk, b"payloae", signature)
    for position in (0, len(signature) // 2, len(signature) - 1):
        flipped = bytearray(signature)
        flipped[position] ^= 1
        assert not verify_signature(s.jwk, b"payload", bytes(flipped))
    assert not verify_signature(s.jwk, b"payload", b"")
    assert not verify_signature(s.jwk, b"payload", signature + b"\x00")
    assert not verify_signature(signer(alg, 1).jwk, b"payload", signature)


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
def test_kid_is_the_thumbprint_and_the_jwk_is_public_only(alg: str) -> None:
    s = signer(alg)
    assert s.kid == s.jwk["kid"] == jwk_thumbprint(s.jwk)
    assert s.jwk["alg"] == alg and s.jwk["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(s.jwk)
    assert public_jwk(key(alg).public_key(), alg) == s.jwk


@pytest.mark.parametrize(("alg", "size"), [("ES256", 64), ("ES384", 96), ("EdDSA", 64)])
def test_signatures_use_the_fixed_length_jws_encoding(alg: str, size: int) -> None:
    # r or s with leading zero bytes shows up within a few hundred signatures if DER leaked through
    assert {len(signer(alg).sign(i.to_bytes(2, "big"))) for i in range(300)} == {size}


def test_signatures_interoperate_with_the_standard_verifiers() -> None:
    es256, es384 = signer("ES256"), signer("ES384")
    for s, hash_algorithm, size in ((es256, hashes.SHA256(), 32), (es384, hashes.SHA384(), 48)):
        raw = s.sign(b"data")
        der = encode_dss_signature(
            int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
        )
        public_ec = key(s.alg).public_key()
        assert isinstance(public_ec, ec.EllipticCurvePublicKey)
        public_ec.verify(der, b"data", ec.ECDSA(hash_algorithm))
    public = key("RS256").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signer("RS256").sign(b"data"), b"data", padding.PKCS1v15(), hashes.SHA256())
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), salt_length=32)
    public.verify(signer("PS256").sign(b"data"), b"data", pss, hashes.SHA256())


@given(data=st.binary(max_size=512), alg=st.sampled_from(["ES256", "EdDSA"]))
@settings(max_examples=30)
def test_any_data_signed_verifies_with_the_published_jwk(data: bytes, alg: str) -> None:
    s = signer(alg)
    assert verify_signature(s.jwk, data, s.sign(data))


def test_an_unusable_jwk_is_an_error_not_a_failed_verification() -> None:
    jwk = signer("ES256").jwk
    with pytest.raises(ValueError, match="does not fit"):
        verify_signature({**jwk, "alg": "ES384"}, b"x", b"sig")
    with pytest.raises(UnsupportedAlgorithm):
        verify_signature({**jwk, "alg": "HS256"}, b"x", b"sig")
    with pytest.raises(ValueError, match="lacks"):
        verify_signature({k: v for k, v in jwk.items() if k != "y"}, b"x", b"sig")
    with pytest.raises(ValueError, match="curve"):
        verify_signature({**jwk, "crv": "P-521"}, b"x", b"sig")


def test_keys_that_do_not_fit_the_algorithm_are_refused() -> None:
    with pytest.raises(ValueError, match="P-256"):
        Signer.from_private_key(key("ES256"), "ES384")
    with pytest.raises(ValueError, match="does not fit"):
        public_jwk(key("EdDSA"), "RS256")
    with pytest.raises(UnsupportedAlgorithm, match="ES256, ES384, EdDSA, PS256, RS256"):
        generate_private_key("HS256")


def test_signer_repr_shows_no_key_material() -> None:
    s = signer("ES256")
    assert repr(s) == f"Signer(kid={s.kid!r}, alg='ES256')"


# ---- kids ---------------------------------------------------------------------------------------


def test_kid_matches_the_rfc_7638_example() -> None:
    jwk = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6t"
            "Soc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-6"
            "5YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLy"
            "rdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJz"
            "KnqDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_okp_kid_matches_the_rfc_8037_example_and_ignores_optional_members() -> None:
    jwk = {"crv": "Ed25519", "kty": "OKP", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    expected = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert jwk_thumbprint(jwk) == jwk_thumbprint({**jwk, "use": "sig", "kid": "x"}) == expected
    with pytest.raises(ValueError, match="kty"):
        jwk_thumbprint({"kty": "oct", "k": "AAAA"})
    with pytest.raises(ValueError, match="x"):
        jwk_thumbprint({"kty": "OKP", "crv": "Ed25519"})


def test_pkcs8_round_trip_keeps_the_kid_and_checks_the_algorithm() -> None:
    der = private_key_to_pkcs8(key("ES256"))
    assert Signer.from_private_key(load_pkcs8(der, "ES256"), "ES256").kid == signer("ES256").kid
    with pytest.raises(ValueError, match="does not fit"):
        load_pkcs8(der, "ES384")
    with pytest.raises(ValueError, match="PKCS#8"):
        load_pkcs8(b"not der", "ES256")


# ---- JWS / JWT ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
def test_jwt_round_trips_for_every_algorithm(alg: str) -> None:
    s = signer(alg)
    token = encode_jwt(s, {"sub": "alice", "exp": 2000})
    assert header_of(token) == {"typ": "JWT", "alg": alg, "kid": s.kid}
    assert " " not in b64url_decode(token.split(".")[1]).decode()
    assert decode_jwt(token, {"keys": [signer("ES256", 1).jwk, s.jwk]}, now=1999) == {
        "sub": "alice",
        "exp": 2000,
    }


@given(
    claims=st.dictionaries(
        st.text(max_size=8),
        st.none() | st.booleans() | st.integers() | st.text(max_size=16),
        max_size=5,
    )
)
@settings(max_examples=30)
def test_any_json_claims_survive_a_round_trip(claims: dict[str, object]) -> None:
    s = signer("EdDSA")
    assert decode_jwt(encode_jwt(s, claims), {"keys": [s.jwk]}) == claims


def test_jws_header_keeps_caller_members_but_not_a_forged_alg_or_kid() -> None:
    s = signer("EdDSA")
    token = encode_jws(s, b"\x00bytes", {"typ": "x", "alg": "none", "kid": "other"})
    assert header_of(token) == {"typ": "x", "alg": "EdDSA", "kid": s.kid}
    assert decode_jws(token, {"keys": [s.jwk]})[1] == b"\x00bytes"


def test_expired_and_not_yet_valid_tokens_are_refused_only_when_now_is_given() -> None:
    s = signer("ES256")
    jwks = {"keys": [s.jwk]}
    token = encode_jwt(s, {"exp": 2000, "nbf": 1000})
    with pytest.raises(InvalidToken, match="expired"):
        decode_jwt(token, jwks, now=2000)
    with pytest.raises(InvalidToken, match="not valid before"):
        decode_jwt(token, jwks, now=999.5)
    assert decode_jwt(token, jwks)["exp"] == 2000
    with pytest.raises(InvalidToken, match="NumericDate"):
        decode_jwt(encode_jwt(s, {"exp": "tomorrow"}), jwks, now=0)


def test_alg_confusion_and_none_are_refused() -> None:
    rs256 = signer("RS256")
    jwks = {"keys": [rs256.jwk]}
    token = encode_jwt(rs256, {"sub": "alice"})
    with pytest.raises(InvalidToken, match="not accepted"):
        decode_jwt(
            forge_header(token, {"alg": "none", "kid": rs256.kid}).rsplit(".", 1)[0] + ".", jwks
        )
    # the classic attack: HMAC keyed with the public key the verifier publishes
    head = b64url_encode(json.dumps({"alg": "HS256", "kid": rs256.kid}).encode())
    body = token.split(".")[1]
    mac = hmac.new(json.dumps(rs256.jwk).encode(), f"{head}.{body}".encode(), hashlib.sha256)
    with pytest.raises(InvalidToken, match="not accepted"):
        decode_jwt(f"{head}.{body}.{b64url_encode(mac.digest())}", jwks)
    # the same RSA key signing PS256 while the JWK Set pins it to RS256
    ps256_token = encode_jwt(signer("PS256"), {"sub": "alice"})
    assert header_of(ps256_token)["kid"] == rs256.kid
    with pytest.raises(InvalidToken, match="differs"):
        decode_jwt(ps256_token, jwks)
    with pytest.raises(InvalidToken, match="algorithm"):
        decode_jwt(forge_header(token, {"alg": ["RS256"], "kid": rs256.kid}), jwks)


def test_unknown_kid_bad_signature_and_malformed_tokens_are_refused() -> None:
    s = signer("ES256")
    jwks = {"keys": [s.jwk]}
    token = encode_jwt(s, {"sub": "alice"})
    head, _, sig = token.split(".")
    with pytest.raises(InvalidToken, match="no key"):
        decode_jwt(token, {"keys": [signer("ES256", 1).jwk]})
    with pytest.raises(InvalidToken, match="does not verify"):
        decode_jwt(f"{head}.{b64url_encode(b'{}')}.{sig}", jwks)
    with pytest.raises(InvalidToken, match="three"):
        decode_jwt("a.b", jwks)
    with pytest.raises(InvalidToken, match="malformed"):
        decode_jwt(f"{head}=.e30.{sig}", jwks)
    with pytest.raises(InvalidToken, match="critical"):
        decode_jwt(forge_header(token, {**header_of(token), "crit": ["exp"]}), jwks)
    with pytest.raises(InvalidToken, match="no kid"):
        decode_jwt(forge_header(token, {"alg": "ES256"}), jwks)
    with pytest.raises(InvalidToken, match="keys"):
        decode_jwt(token, {"keys": "nope"})
    with pytest.raises(InvalidToken, match="unusable"):
        decode_jwt(token, {"keys": [{**s.jwk, "x": "!"}]})


# ---- trust chain --------------------------------------------------------------------------------


def test_endorsement_chains_a_new_key_to_the_active_one() -> None:
    old, new = signer("ES256"), signer("EdDSA")
    token = endorse(old, new.jwk, issued_at=1000)
    header, payload = decode_jws(token, {"keys": [old.jwk]})
    assert header == {"typ": "keyquorum-endorsement+jwt", "alg": "ES256", "kid": old.kid}
    assert json.loads(payload) == {"sub": new.kid, "jwk": new.jwk, "iat": 1000}
    assert verify_endorsement(token, old.jwk, new.jwk)


def test_endorsement_fails_for_another_endorser_another_key_or_tampering() -> None:
    old, new, stranger = signer("ES256"), signer("EdDSA"), signer("ES256", 2)
    token = endorse(old, new.jwk, issued_at=1000)
    assert not verify_endorsement(token, stranger.jwk, new.jwk)
    assert not verify_endorsement(token, old.jwk, stranger.jwk)
    assert not verify_endorsement(token, old.jwk, {**new.jwk, "alg": "ES256"})
    assert not verify_endorsement(endorse(stranger, new.jwk, issued_at=1000), old.jwk, new.jwk)
    head, body, sig = token.split(".")
    assert not verify_endorsement(f"{head}.{body}.{sig[:-2]}AA", old.jwk, new.jwk)
    swapped = b64url_encode(json.dumps({"sub": stranger.kid, "jwk": stranger.jwk}).encode())
    assert not verify_endorsement(f"{head}.{swapped}.{sig}", old.jwk, stranger.jwk)
    # a JWT by the same key over the same body is not an endorsement
    plain = encode_jws(old, b64url_decode(body))
    assert not verify_endorsement(plain, old.jwk, new.jwk)
    assert not verify_endorsement("garbage", old.jwk, new.jwk)


# ---- base64url ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["a+b", "a/bc", "ab==", "QUFB=", "a", "abcde", "é", "a b", "QUFB\n"]
)
def test_b64url_decode_refuses_anything_but_unpadded_base64url(bad: str) -> None:
    with pytest.raises(ValueError, match="base64url"):
        b64url_decode(bad)


@pytest.mark.parametrize("bad", [b"QUFB", None, 42])
def test_b64url_decode_refuses_non_strings(bad: object) -> None:
    with pytest.raises(ValueError, match="must be a string"):
        b64url_decode(bad)  # type: ignore[arg-type]


def test_b64url_decode_accepts_only_the_canonical_text_of_each_value() -> None:
    assert b64url_decode("AQ") == b"\x01"
    assert b64url_decode("") == b""
    with pytest.raises(ValueError, match="canonical"):
        b64url_decode("AR")
    with pytest.raises(ValueError, match="canonical"):
        b64url_decode("AAB")


@given(st.binary(max_size=256))
@settings(max_examples=200)
def test_b64url_round_trips_any_bytes(data: bytes) -> None:
    encoded = b64url_encode(data)
    assert "=" not in encoded and "+" not in encoded and "/" not in encoded
    assert b64url_decode(encoded) == data


# ---- PEM import ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "ES384", "EdDSA", "RS256"])
def test_pem_import_infers_the_algorithm_from_the_key_type(alg: str) -> None:
    loaded, inferred = load_pem_private_key(pem(key(alg)))
    assert inferred == alg
    assert Signer.from_private_key(loaded, inferred).kid == signer(alg).kid


def test_pem_import_takes_ps256_for_an_rsa_key_when_asked() -> None:
    loaded, alg = load_pem_private_key(pem(key("RS256")), "PS256")
    assert alg == "PS256"
    assert Signer.from_private_key(loaded, alg).kid == signer("PS256").kid


def test_pem_import_refuses_rsa_1024_without_echoing_the_key() -> None:
    weak = pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with pytest.raises(ValueError, match="at least 2048 bits; this one has 1024") as info:
        load_pem_private_key(weak)
    body = b"".join(weak.splitlines()[1:-1]).decode()
    assert "PRIVATE" not in str(info.value) and body[:16] not in str(info.value)


@pytest.mark.parametrize(
    "private",
    [ec.generate_private_key(ec.SECP521R1()), ed448.Ed448PrivateKey.generate()],
    ids=["P-521", "Ed448"],
)
def test_pem_import_refuses_unsupported_key_types(private: object) -> None:
    with pytest.raises(ValueError, match="not supported; use P-256, P-384, Ed25519"):
        load_pem_private_key(pem(private))


def test_pem_import_refuses_mismatches_encryption_and_garbage() -> None:
    with pytest.raises(ValueError, match="P-256 key, which does not fit algorithm RS256"):
        load_pem_private_key(pem(key("ES256")), "RS256")
    with pytest.raises(UnsupportedAlgorithm):
        load_pem_private_key(pem(key("ES256")), "ES512")
    encrypted = key("ES256").private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ValueError, match="encrypted"):
        load_pem_private_key(encrypted)
    with pytest.raises(ValueError, match="not a PEM-encoded private key"):
        load_pem_private_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
