"""Envelope encryption of private keys, shared by every key wrapper.

A fresh 256-bit data key encrypts the PKCS#8 private key with AES-256-GCM (96-bit random nonce);
the backend wraps the data key. The kid and the cluster prefix are bound as associated data on
both layers, so a sealed key copied into another record or another cluster fails to open
(DESIGN.md §9.5). Opening fails only with BackendError subclasses, never a raw crypto exception.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.crypto import b64url_decode, b64url_encode
from backends.base import BackendDenied, KeyWrapper

SCHEME = "envelope-v1"
DATA_KEY_BYTES = 32
NONCE_BYTES = 12


def context_for(kid: str, prefix: str) -> dict[str, str]:
    """The context every layer binds: which key record, in which cluster."""
    return {"keyquorum:kid": kid, "keyquorum:prefix": prefix}


def associated_data(context: Mapping[str, str]) -> bytes:
    """Canonical JSON of the context (sorted keys, no whitespace): the AES-GCM AAD."""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode()


async def seal(wrapper: KeyWrapper, plaintext: bytes, *, kid: str, prefix: str) -> dict[str, Any]:
    """Encrypt `plaintext` under a fresh data key wrapped by `wrapper`; JSON-serialisable."""
    context = context_for(kid, prefix)
    data_key = os.urandom(DATA_KEY_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, associated_data(context))
    try:
        wrapped = await wrapper.wrap_data_key(data_key, context)
    finally:
        # bytes cannot be wiped; dropping the only reference is the best Python offers
        del data_key
    return {
        "scheme": SCHEME,
        "wrapper": wrapper.kind,
        "data_key": dict(wrapped),
        "nonce": b64url_encode(nonce),
        "ciphertext": b64url_encode(ciphertext),
    }


def _b64_field(sealed: Mapping[str, Any], name: str) -> bytes:
    value = sealed.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} is missing or not a string")
    try:
        return b64url_decode(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _parse(sealed: object, kid: str, kind: str) -> tuple[Mapping[str, str], bytes, bytes]:
    """The wrapped data key, nonce and ciphertext of a sealed key, or BackendDenied naming why."""
    if not isinstance(sealed, Mapping):
        raise BackendDenied(f"key {kid}: the sealed private key is not a JSON object")
    if sealed.get("scheme") != SCHEME:
        raise BackendDenied(
            f"key {kid}: unknown protection scheme {sealed.get('scheme')!r} (expected {SCHEME!r})",
            "upgrade this agent to the version that wrote the key set",
        )
    if sealed.get("wrapper") != kind:
        raise BackendDenied(
            f"key {kid} was sealed by the {sealed.get('wrapper')!r} backend but this agent is "
            f"configured with {kind!r}",
            "configure the backend that protected the key set (backend.kind)",
        )
    wrapped = sealed.get("data_key")
    try:
        if not isinstance(wrapped, Mapping) or not all(
            isinstance(v, str) for v in wrapped.values()
        ):
            raise ValueError("data_key is not an object of strings")
        nonce = _b64_field(sealed, "nonce")
        ciphertext = _b64_field(sealed, "ciphertext")
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"nonce is {len(nonce)} bytes, not {NONCE_BYTES}")
    except ValueError as exc:
        raise BackendDenied(
            f"key {kid}: malformed sealed private key for the {kind!r} backend ({exc})"
        ) from None
    return wrapped, nonce, ciphertext


async def open_sealed(
    wrapper: KeyWrapper, sealed: Mapping[str, Any], *, kid: str, prefix: str
) -> bytes:
    """Decrypt what `seal` produced for this kid and prefix, or raise BackendDenied saying why."""
    wrapped, nonce, ciphertext = _parse(sealed, kid, wrapper.kind)
    context = context_for(kid, prefix)
    data_key = await wrapper.unwrap_data_key(wrapped, context)
    try:
        return AESGCM(data_key).decrypt(nonce, ciphertext, associated_data(context))
    except (InvalidTag, ValueError, TypeError):
        raise BackendDenied(
            f"key {kid}: the sealed private key does not decrypt with the data key the "
            f"{wrapper.kind!r} backend returned (tampered, or sealed for another kid or "
            f"cluster prefix than {prefix!r})"
        ) from None
    finally:
        del data_key
