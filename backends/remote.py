"""Keys that live in a KMS/HSM: how a key record refers to them, and the signer the keyring holds.

A record of a remote key stores `{"scheme": "remote-v1", "signer": <kind>, "ref": {...}}` where
a sealed key would be: a reference, never key material. Loading such a record on a node means
asking the backend for the key's public half and checking it against the record's JWK (the same
check unwrapping does), then signing through the backend for every request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agent.crypto import public_jwk
from backends.base import BackendDenied, RemoteSigner

SCHEME = "remote-v1"


def remote_private(kind: str, ref: Mapping[str, str]) -> dict[str, Any]:
    """What a key record stores in place of a sealed private key."""
    return {"scheme": SCHEME, "signer": kind, "ref": dict(ref)}


def is_remote(private: Mapping[str, Any]) -> bool:
    return private.get("scheme") == SCHEME


def remote_ref(private: Mapping[str, Any], kind: str, kid: str) -> dict[str, str]:
    """The backend reference in a record, or BackendDenied naming what is wrong."""
    if private.get("signer") != kind:
        raise BackendDenied(
            f"key {kid} lives in the {private.get('signer')!r} backend but this agent is "
            f"configured with {kind!r}",
            "configure the backend that holds the cluster's keys (backend.kind)",
        )
    ref = private.get("ref")
    if not isinstance(ref, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in ref.items()
    ):
        raise BackendDenied(f"key {kid}: the remote key reference is malformed")
    return dict(ref)


def jwk_of_pem(pem: bytes, alg: str) -> dict[str, Any]:
    try:
        key = load_pem_public_key(pem)
    except ValueError as exc:
        raise BackendDenied(f"the backend returned an unreadable public key: {exc}") from None
    return public_jwk(key, alg)  # type: ignore[arg-type]


class RemoteKeySigner:
    """Signs with a key that never leaves its backend; quacks like agent.crypto.Signer."""

    __slots__ = ("alg", "backend", "jwk", "kid", "ref")

    def __init__(
        self, backend: RemoteSigner, ref: Mapping[str, str], alg: str, jwk: Mapping[str, Any]
    ) -> None:
        self.backend = backend
        self.ref = dict(ref)
        self.alg = alg
        self.jwk = dict(jwk)
        self.kid = str(jwk["kid"])

    @classmethod
    async def load(
        cls, backend: RemoteSigner, private: Mapping[str, Any], alg: str, jwk: Mapping[str, Any]
    ) -> RemoteKeySigner:
        """The signer for a record, after checking the backend holds the record's key."""
        kid = str(jwk["kid"])
        ref = remote_ref(private, backend.kind, kid)
        held = jwk_of_pem(await backend.public_key(ref), alg)
        if held["kid"] != kid:
            raise BackendDenied(
                f"key {kid}: the backend's key at {ref} has another public key ({held['kid']})",
                "the key set and the backend disagree: was the remote key replaced?",
            )
        return cls(backend, ref, alg, jwk)

    async def sign_async(self, data: bytes) -> bytes:
        return await self.backend.sign(self.ref, self.alg, data)

    def __repr__(self) -> str:
        return f"RemoteKeySigner(kid={self.kid!r}, alg={self.alg!r}, backend={self.backend.kind})"
