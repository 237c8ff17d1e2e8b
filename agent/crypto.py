"""Signing primitives: key generation, JWKs and RFC 7638 kids, JWS signatures, JWTs, endorsements.

Pure functions over the `cryptography` package; no I/O, no clock. `Signer.sign` is the agent's hot
path, so everything that can be decided once per key is decided in the constructor. Errors never
carry key material: messages name key types and sizes, never bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as _CryptoUnsupported
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

ALGORITHMS: frozenset[str] = frozenset({"ES256", "ES384", "EdDSA", "RS256", "PS256"})
ENDORSEMENT_TYPE = "keyquorum-endorsement+jwt"
MIN_RSA_BITS = 2048

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

# alg -> (curve class, JWK crv, coordinate / scalar size in bytes, hash)
_EC_CURVES: dict[str, tuple[type[ec.EllipticCurve], str, int, hashes.HashAlgorithm]] = {
    "ES256": (ec.SECP256R1, "P-256", 32, hashes.SHA256()),
    "ES384": (ec.SECP384R1, "P-384", 48, hashes.SHA384()),
}
_CRV_TO_ALG = {crv: alg for alg, (_, crv, _, _) in _EC_CURVES.items()}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_SUPPORTED_KEYS = "P-256, P-384, Ed25519 or RSA of at least 2048 bits"


class UnsupportedAlgorithm(ValueError):
    """An `alg` outside ALGORITHMS; the message lists the supported ones."""

    def __init__(self, alg: object) -> None:
        super().__init__(f"unknown algorithm {alg!r}; use one of {', '.join(sorted(ALGORITHMS))}")


class InvalidToken(ValueError):
    """A JWS/JWT that does not verify or is not currently valid; the message says why."""


def _check_alg(alg: object) -> str:
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise UnsupportedAlgorithm(alg)
    return alg


# ---- base64url --------------------------------------------------------------------------------

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B64URL_VALUE = {
    c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict unpadded base64url: one canonical text per byte string, ValueError on anything else.

    Refusing padding, stray characters and non-zero trailing bits keeps tokens non-malleable.
    """
    if not isinstance(text, str):
        raise ValueError(f"base64url value must be a string, not {type(text).__name__}")
    if _B64URL.fullmatch(text) is None:
        raise ValueError("base64url value has characters outside [A-Za-z0-9_-] (no padding)")
    tail = len(text) % 4
    if tail == 1:
        raise ValueError(f"base64url value has an impossible length ({len(text)})")
    if tail and _B64URL_VALUE[text[-1]] & (0x0F if tail == 2 else 0x03):
        raise ValueError("base64url value is not canonical (non-zero trailing bits)")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_b64(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url_encode(value.to_bytes(size, "big"))


def _b64_int(text: str) -> int:
    return int.from_bytes(b64url_decode(text), "big")


# ---- keys -------------------------------------------------------------------------------------


def generate_private_key(alg: str) -> PrivateKey:
    """A fresh key for `alg`: P-256, P-384, Ed25519, or RSA 2048 with e = 65537."""
    alg = _check_alg(alg)
    if alg in _EC_CURVES:
        return ec.generate_private_key(_EC_CURVES[alg][0]())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)


def private_key_to_pkcs8(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 DER: only ever handed straight to envelope encryption."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _describe_key(key: object) -> str:
    """The key's type and size, for error messages (never its material)."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"an EC {_CURVE_NAMES.get(key.curve.name, key.curve.name)} key"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "an Ed25519 key"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"an RSA-{key.key_size} key"
    return f"a {type(key).__name__}"


def _alg_matches(key: object, alg: str) -> bool:
    """Whether a private or public key object is the type `alg` signs with."""
    if alg in _EC_CURVES:
        return isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and (
            isinstance(key.curve, _EC_CURVES[alg][0])
        )
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey)
    return isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey)


def _require_alg_matches(key: object, alg: str) -> None:
    if not _alg_matches(key, alg):
        raise ValueError(f"the key is {_describe_key(key)}, which does not fit algorithm {alg}")


def load_pkcs8(der: bytes, alg: str) -> PrivateKey:
    """Load an unencrypted PKCS#8 DER private key and check it is the type `alg` needs."""
    alg = _check_alg(alg)
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, _CryptoUnsupported) as exc:
        raise ValueError(f"not a usable PKCS#8 private key ({type(exc).__name__})") from None
    _require_alg_matches(key, alg)
    return key  # type: ignore[return-value]  # narrowed by _require_alg_matches


def load_pem_private_key(pem: bytes, alg: str | None = None) -> tuple[PrivateKey, str]:
    """Load an existing PEM private key for import; infer `alg` from the key type when not given.

    P-256 -> ES256, P-384 -> ES384, Ed25519 -> EdDSA, RSA (>= 2048 bits) -> RS256.
    """
    if alg is not None:
        alg = _check_alg(alg)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValueError("the PEM key is encrypted; decrypt it first") from None
    except (ValueError, _CryptoUnsupported):
        raise ValueError("not a PEM-encoded private key this agent can read") from None
    inferred: str | None = None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        inferred = next((a for a, c in _EC_CURVES.items() if isinstance(key.curve, c[0])), None)
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        inferred = "EdDSA"
    elif isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"RSA keys must have at least {MIN_RSA_BITS} bits; this one has {key.key_size}"
            )
        inferred = "RS256"
    if inferred is None:
        raise ValueError(
            f"the PEM holds {_describe_key(key)}, which is not supported; use {_SUPPORTED_KEYS}"
        )
    if alg is None:
        return key, inferred  # type: ignore[return-value]  # one of the three types above
    _require_alg_matches(key, alg)
    return key, alg  # type: ignore[return-value]


def _public(key: PrivateKey | PublicKey) -> PublicKey:
    if isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        return key.public_key()
    return key


def public_jwk(key: PrivateKey | PublicKey, alg: str) -> dict[str, str]:
    """RFC 7517 public JWK with `alg`, `use: sig` and `kid` (= RFC 7638 thumbprint)."""
    alg = _check_alg(alg)
    pub = _public(key)
    _require_alg_matches(pub, alg)
    jwk: dict[str, str]
    if isinstance(pub, ec.EllipticCurvePublicKey):
        _, crv, size, _ = _EC_CURVES[alg]
        numbers = pub.public_numbers()
        jwk = {
            "kty": "EC",
            "crv": crv,
            "x": _int_b64(numbers.x, size),
            "y": _int_b64(numbers.y, size),
        }
    elif isinstance(pub, ed25519.Ed25519PublicKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
    else:
        rsa_numbers = pub.public_numbers()
        jwk = {"kty": "RSA", "n": _int_b64(rsa_numbers.n), "e": _int_b64(rsa_numbers.e)}
    jwk["alg"] = alg
    jwk["use"] = "sig"
    jwk["kid"] = jwk_thumbprint(jwk)
    return jwk


_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint (base64url) over the required members only."""
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        raise ValueError(f"unsupported JWK kty {kty!r}; use EC, OKP or RSA")
    missing = [m for m in members if not isinstance(jwk.get(m), str)]
    if missing:
        raise ValueError(f"JWK lacks required member(s) {', '.join(missing)}")
    # members are already in lexicographic order; RFC 7638 §3.3: UTF-8, no whitespace, no escaping
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), ensure_ascii=False)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def public_key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """The public key a JWK describes; ValueError when it is malformed or unsupported."""
    kty = jwk.get("kty")
    try:
        if kty == "EC":
            crv = jwk.get("crv")
            alg = _CRV_TO_ALG.get(crv) if isinstance(crv, str) else None
            if alg is None:
                raise ValueError(f"unsupported curve {crv!r}; use P-256 or P-384")
            curve = _EC_CURVES[alg][0]()
            return ec.EllipticCurvePublicNumbers(
                _b64_int(jwk["x"]), _b64_int(jwk["y"]), curve
            ).public_key()
        if kty == "OKP":
            if jwk.get("crv") != "Ed25519":
                raise ValueError(f"unsupported OKP curve {jwk.get('crv')!r}; use Ed25519")
            return ed25519.Ed25519PublicKey.from_public_bytes(b64url_decode(jwk["x"]))
        if kty == "RSA":
            return rsa.RSAPublicNumbers(_b64_int(jwk["e"]), _b64_int(jwk["n"])).public_key()
    except KeyError as exc:
        raise ValueError(f"JWK lacks required member {exc}") from None
    raise ValueError(f"unsupported JWK kty {kty!r}; use EC, OKP or RSA")


# ---- signing and verifying ----------------------------------------------------------------------


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


class Signer:
    """A loaded private key that signs in JWS encoding (EC: fixed-length raw r||s)."""

    __slots__ = ("_sign", "alg", "jwk", "kid", "private_key")

    def __init__(self, private_key: PrivateKey, alg: str) -> None:
        alg = _check_alg(alg)
        _require_alg_matches(private_key, alg)
        self.private_key = private_key
        self.alg = alg
        self.jwk = public_jwk(private_key, alg)
        self.kid = self.jwk["kid"]
        self._sign = _sign_function(private_key, alg)

    @classmethod
    def from_private_key(cls, key: PrivateKey, alg: str) -> Signer:
        return cls(key, alg)

    def sign(self, data: bytes) -> bytes:
        """The JWS signature of `data` (RFC 7518 §3 encoding)."""
        return self._sign(data)

    async def sign_async(self, data: bytes) -> bytes:
        """The same, behind the interface remote (KMS/HSM) signers share."""
        return self._sign(data)

    def __repr__(self) -> str:
        return f"Signer(kid={self.kid!r}, alg={self.alg!r})"


class SigningKey(Protocol):
    """What the keyring hands out: a local Signer or a key held by a KMS/HSM."""

    @property
    def kid(self) -> str: ...

    @property
    def alg(self) -> str: ...

    @property
    def jwk(self) -> Mapping[str, Any]: ...

    async def sign_async(self, data: bytes) -> bytes: ...


def _sign_function(key: PrivateKey, alg: str) -> Callable[[bytes], bytes]:
    """The per-key signing closure: padding, hash and sizes bound once."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = _EC_CURVES[alg][2]
        ec_sign = partial(key.sign, signature_algorithm=ec.ECDSA(_EC_CURVES[alg][3]))

        def sign_ec(data: bytes) -> bytes:
            r, s = decode_dss_signature(ec_sign(data))
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")

        return sign_ec
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign
    pad = padding.PKCS1v15() if alg == "RS256" else _pss()
    return partial(key.sign, padding=pad, algorithm=hashes.SHA256())


def verify_signature(jwk: Mapping[str, Any], data: bytes, signature: bytes) -> bool:
    """True iff `signature` (JWS encoding) over `data` verifies with the JWK's key and `alg`.

    A wrong signature gives False; a JWK that cannot be used (unknown alg, malformed, key type
    not fitting its alg) raises ValueError.
    """
    alg = _check_alg(jwk.get("alg"))
    pub = public_key_from_jwk(jwk)
    _require_alg_matches(pub, alg)
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            size = _EC_CURVES[alg][2]
            if len(signature) != 2 * size:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            pub.verify(der, data, ec.ECDSA(_EC_CURVES[alg][3]))
        elif isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(signature, data)
        else:
            pad = padding.PKCS1v15() if alg == "RS256" else _pss()
            pub.verify(signature, data, pad, hashes.SHA256())
    except InvalidSignature:
        return False
    return True


# ---- JWS / JWT ------------------------------------------------------------------------------


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def encode_jws(signer: Signer, payload: bytes, header: Mapping[str, Any] | None = None) -> str:
    """Compact JWS over `payload`; the header always carries the signer's `alg` and `kid`."""
    head = {**(header or {}), "alg": signer.alg, "kid": signer.kid}
    signing_input = b64url_encode(_compact_json(head)) + "." + b64url_encode(payload)
    return signing_input + "." + b64url_encode(signer.sign(signing_input.encode("ascii")))


async def encode_jws_async(
    signer: SigningKey, payload: bytes, header: Mapping[str, Any] | None = None
) -> str:
    """`encode_jws` for any SigningKey (a remote one signs over the network)."""
    head = {**(header or {}), "alg": signer.alg, "kid": signer.kid}
    signing_input = b64url_encode(_compact_json(head)) + "." + b64url_encode(payload)
    signature = await signer.sign_async(signing_input.encode("ascii"))
    return signing_input + "." + b64url_encode(signature)


async def encode_jwt_async(signer: SigningKey, claims: Mapping[str, Any]) -> str:
    return await encode_jws_async(signer, _compact_json(claims), {"typ": "JWT"})


def encode_jwt(signer: Signer, claims: Mapping[str, Any]) -> str:
    """Compact JWT with header {alg, typ: JWT, kid}; the caller sets iat/exp."""
    return encode_jws(signer, _compact_json(claims), {"typ": "JWT"})


def _find_key(jwks: Mapping[str, Any], kid: str) -> Mapping[str, Any] | None:
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        raise InvalidToken("the JWK Set has no 'keys' list")
    return next((k for k in keys if isinstance(k, Mapping) and k.get("kid") == kid), None)


def decode_jws(token: str, jwks: Mapping[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Verify a compact JWS against a JWK Set; returns (header, payload) or raises InvalidToken.

    The key is chosen by `kid` and its own `alg` must equal the header's: no alg confusion, and
    `none` (or any algorithm outside ALGORITHMS) is refused.
    """
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise InvalidToken("not a compact JWS (three base64url parts separated by dots)")
    try:
        header = json.loads(b64url_decode(parts[0]))
        payload = b64url_decode(parts[1])
        signature = b64url_decode(parts[2])
    except ValueError as exc:
        raise InvalidToken(f"malformed JWS: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidToken("JWS header is not a JSON object")
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise InvalidToken(f"algorithm {alg!r} is not accepted")
    if "crit" in header:  # RFC 7515 §4.1.11: we understand no extensions
        raise InvalidToken("JWS header has critical extensions this verifier does not support")
    if not isinstance(kid, str):
        raise InvalidToken("JWS header has no kid")
    jwk = _find_key(jwks, kid)
    if jwk is None:
        raise InvalidToken(f"no key with kid {kid!r} in the JWK Set")
    if jwk.get("alg") != alg:
        raise InvalidToken(f"header alg {alg} differs from the key's alg {jwk.get('alg')!r}")
    try:
        valid = verify_signature(jwk, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)
    except ValueError as exc:
        raise InvalidToken(f"key {kid} in the JWK Set is unusable: {exc}") from None
    if not valid:
        raise InvalidToken("signature does not verify")
    return header, payload


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"claim {name!r} is not a NumericDate")
    return float(value)


def decode_jwt(token: str, jwks: Mapping[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """Verify a JWT and return its claims; with `now` (seconds), also enforce `exp` and `nbf`."""
    _, payload = decode_jws(token, jwks)
    try:
        claims = json.loads(payload)
    except ValueError:
        raise InvalidToken("JWT payload is not JSON") from None
    if not isinstance(claims, dict):
        raise InvalidToken("JWT payload is not a JSON object")
    if now is not None:
        exp, nbf = _numeric_date(claims, "exp"), _numeric_date(claims, "nbf")
        if exp is not None and now >= exp:
            raise InvalidToken(f"token expired at {exp:g} (now {now:g})")
        if nbf is not None and now < nbf:
            raise InvalidToken(f"token not valid before {nbf:g} (now {now:g})")
    return claims


# ---- trust chain (DESIGN.md §2) ----------------------------------------------------------------

_PUBLIC_JWK_MEMBERS = frozenset({"kty", "crv", "x", "y", "n", "e", "alg", "use", "kid"})


def _public_members(jwk: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in jwk.items() if k in _PUBLIC_JWK_MEMBERS}


def endorse(endorser: Signer, jwk: Mapping[str, Any], issued_at: int) -> str:
    """The active key's signature over a new public key, so verifiers can follow rotations."""
    body = {"sub": jwk_thumbprint(jwk), "jwk": _public_members(jwk), "iat": issued_at}
    return encode_jws(endorser, _compact_json(body), {"typ": ENDORSEMENT_TYPE})


async def endorse_async(endorser: SigningKey, jwk: Mapping[str, Any], issued_at: int) -> str:
    """`endorse` for any SigningKey."""
    body = {"sub": jwk_thumbprint(jwk), "jwk": _public_members(jwk), "iat": issued_at}
    return await encode_jws_async(endorser, _compact_json(body), {"typ": ENDORSEMENT_TYPE})


def verify_endorsement(token: str, endorser_jwk: Mapping[str, Any], jwk: Mapping[str, Any]) -> bool:
    """True iff `token` is `endorser_jwk`'s endorsement of exactly the key `jwk` describes.

    False for any problem with the token; ValueError only when either JWK itself is unusable.
    """
    endorser_kid, endorsed_kid = jwk_thumbprint(endorser_jwk), jwk_thumbprint(jwk)
    # select the endorser by thumbprint, whatever `kid` the caller's copy of its JWK carries
    endorser = {**endorser_jwk, "kid": endorser_kid}
    try:
        header, payload = decode_jws(token, {"keys": [endorser]})
        body = json.loads(payload)
    except ValueError:
        return False
    if header.get("typ") != ENDORSEMENT_TYPE or not isinstance(body, dict):
        return False
    endorsed = body.get("jwk")
    if body.get("sub") != endorsed_kid or not isinstance(endorsed, dict):
        return False
    try:
        same_key = jwk_thumbprint(endorsed) == endorsed_kid
    except ValueError:
        return False
    return same_key and endorsed.get("alg") == jwk.get("alg")
