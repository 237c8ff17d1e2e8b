"""Keys kept in a secret store (the GoatDB design): the record's reference and the stored value.

A record of such a key stores `{"scheme": "secret-v1", "store": <kind>, "ref": {...}}` where a
sealed key would be; the secret version holds a small JSON document `{"kid", "alg", "pkcs8"}`,
so a node that reads a version checks it is the key the record describes before using it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agent.crypto import b64url_decode, b64url_encode
from backends.base import BackendDenied

SCHEME = "secret-v1"


def secret_private(kind: str, ref: Mapping[str, str]) -> dict[str, Any]:
    return {"scheme": SCHEME, "store": kind, "ref": dict(ref)}


def is_secret(private: Mapping[str, Any]) -> bool:
    return private.get("scheme") == SCHEME


def secret_ref(private: Mapping[str, Any], kind: str, kid: str) -> dict[str, str]:
    if private.get("store") != kind:
        raise BackendDenied(
            f"key {kid} lives in the {private.get('store')!r} secret store but this agent is "
            f"configured with {kind!r}",
            "configure the secret store that holds the cluster's keys (backend.kind)",
        )
    ref = private.get("ref")
    if not isinstance(ref, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in ref.items()
    ):
        raise BackendDenied(f"key {kid}: the secret version reference is malformed")
    return dict(ref)


def encode_value(kid: str, alg: str, pkcs8: bytes) -> bytes:
    return json.dumps({"kid": kid, "alg": alg, "pkcs8": b64url_encode(pkcs8)}).encode()


def decode_value(value: bytes, kid: str, alg: str) -> bytes:
    """The PKCS#8 key in a secret version, after checking it is the key `kid` of `alg`."""
    try:
        document = json.loads(value)
        stored_kid, stored_alg = document["kid"], document["alg"]
        pkcs8 = b64url_decode(document["pkcs8"])
    except (ValueError, KeyError, TypeError):
        raise BackendDenied(f"key {kid}: the secret version is not a keyquorum key") from None
    if stored_kid != kid or stored_alg != alg:
        raise BackendDenied(
            f"key {kid}: the secret version holds key {stored_kid} ({stored_alg}) instead",
            "the key set and the secret store disagree: was the secret overwritten?",
        )
    return pkcs8
