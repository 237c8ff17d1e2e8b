"""The key-set document: key records, their JSON form, strict parsing and pure edits.

The key set is the one document every agent shares (DESIGN.md §3). It is written only by the
rotation leader and read by everyone, so parsing is strict: a document that fails any check is
rejected whole with `KeySetInvalid`, and the agent keeps its last good set (DESIGN.md §3).

Times are integer milliseconds since the Unix epoch. Every timing decision (when a key activates,
stops signing, expires) is written into its record by the leader, so every agent derives the same
states from the same document and its own clock (see `agent.policy`).

Invariant kept here (DESIGN.md §9.5): a record's public JWK never carries private members, and the
private half is only ever present as an opaque protected blob produced by a backend.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from agent.crypto import ALGORITHMS, jwk_thumbprint

SCHEMA_VERSION = 1

Withdrawal = Literal["retired", "revoked"]
Origin = Literal["generated", "imported"]

# JWK members that only a private key has (RFC 7518 §6.2.2, §6.3.2, RFC 8037 §2).
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class KeySetInvalid(ValueError):
    """The document cannot be used; the message says what is wrong and where."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One key of the set. `private` is a backend's protected blob, never raw key material."""

    kid: str
    alg: str
    jwk: Mapping[str, str]
    private: Mapping[str, Any]
    created_at: int
    activate_at: int | None
    deactivate_at: int
    expires_at: int
    endorsement: str | None = None
    withdrawn: Withdrawal | None = None
    withdrawn_at: int | None = None
    origin: Origin = "generated"

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "alg": self.alg,
            "jwk": dict(self.jwk),
            "private": dict(self.private),
            "created_at": self.created_at,
            "activate_at": self.activate_at,
            "deactivate_at": self.deactivate_at,
            "expires_at": self.expires_at,
            "endorsement": self.endorsement,
            "withdrawn": self.withdrawn,
            "withdrawn_at": self.withdrawn_at,
            "origin": self.origin,
        }


@dataclass(frozen=True, slots=True)
class KeySet:
    """The whole document. `generation` increases by one with every accepted write."""

    generation: int = 0
    keys: tuple[KeyRecord, ...] = ()
    last_change: Mapping[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def get(self, kid: str) -> KeyRecord | None:
        for record in self.keys:
            if record.kid == kid:
                return record
        return None

    def evolve(self, keys: Iterable[KeyRecord], *, at: int, by: str, what: str) -> KeySet:
        """The next generation with `keys`, noting who changed it, when and why."""
        return KeySet(
            generation=self.generation + 1,
            keys=tuple(keys),
            last_change={"at": at, "by": by, "what": what},
            schema=self.schema,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "generation": self.generation,
            "keys": [record.to_json() for record in self.keys],
            "last_change": dict(self.last_change),
        }


def dump_keyset(keyset: KeySet) -> bytes:
    """Canonical bytes of the document (sorted keys, no whitespace)."""
    return json.dumps(keyset.to_json(), sort_keys=True, separators=(",", ":")).encode()


def parse_keyset(data: bytes) -> KeySet:
    """Parse and validate a document; raise KeySetInvalid naming the first problem."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeySetInvalid(f"key-set document is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise KeySetInvalid("key-set document must be a JSON object")
    schema = doc.get("schema")
    if schema != SCHEMA_VERSION:
        raise KeySetInvalid(
            f"key-set schema {schema!r} is not supported (this agent reads schema "
            f"{SCHEMA_VERSION}); upgrade the agent"
        )
    generation = _int(doc, "generation", "key set")
    raw_keys = doc.get("keys")
    if not isinstance(raw_keys, list):
        raise KeySetInvalid("key set: 'keys' must be a list")
    records = tuple(_parse_record(raw, i) for i, raw in enumerate(raw_keys))
    seen: set[str] = set()
    for record in records:
        if record.kid in seen:
            raise KeySetInvalid(f"key set: kid {record.kid} appears twice")
        seen.add(record.kid)
    last_change = doc.get("last_change", {})
    if not isinstance(last_change, dict):
        raise KeySetInvalid("key set: 'last_change' must be an object")
    return KeySet(generation=generation, keys=records, last_change=last_change)


def _parse_record(raw: object, index: int) -> KeyRecord:
    where = f"key #{index}"
    if not isinstance(raw, dict):
        raise KeySetInvalid(f"{where}: must be an object")
    kid = raw.get("kid")
    if not isinstance(kid, str) or not kid:
        raise KeySetInvalid(f"{where}: 'kid' must be a non-empty string")
    where = f"key {kid}"
    alg = raw.get("alg")
    if alg not in ALGORITHMS:
        raise KeySetInvalid(f"{where}: unknown algorithm {alg!r}")
    jwk = raw.get("jwk")
    if not isinstance(jwk, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in jwk.items()
    ):
        raise KeySetInvalid(f"{where}: 'jwk' must be an object of strings")
    leaked = _PRIVATE_JWK_MEMBERS & jwk.keys()
    if leaked:
        raise KeySetInvalid(f"{where}: public JWK carries private members {sorted(leaked)}")
    try:
        thumbprint = jwk_thumbprint(jwk)
    except (KeyError, ValueError) as exc:
        raise KeySetInvalid(f"{where}: unusable JWK ({exc})") from exc
    if thumbprint != kid:
        raise KeySetInvalid(f"{where}: kid is not the RFC 7638 thumbprint of its JWK")
    if jwk.get("alg", alg) != alg:
        raise KeySetInvalid(f"{where}: JWK alg {jwk.get('alg')!r} differs from record alg")
    private = raw.get("private")
    if not isinstance(private, dict) or not isinstance(private.get("scheme"), str):
        raise KeySetInvalid(f"{where}: 'private' must be a protected blob with a 'scheme'")
    created_at = _int(raw, "created_at", where)
    deactivate_at = _int(raw, "deactivate_at", where)
    expires_at = _int(raw, "expires_at", where)
    activate_at = _opt_int(raw, "activate_at", where)
    if not created_at <= deactivate_at <= expires_at:
        raise KeySetInvalid(f"{where}: needs created_at <= deactivate_at <= expires_at")
    if activate_at is not None and activate_at < created_at:
        raise KeySetInvalid(f"{where}: activate_at is before created_at")
    endorsement = raw.get("endorsement")
    if endorsement is not None and not isinstance(endorsement, str):
        raise KeySetInvalid(f"{where}: 'endorsement' must be a compact JWS string or null")
    withdrawn = raw.get("withdrawn")
    if withdrawn not in (None, "retired", "revoked"):
        raise KeySetInvalid(f"{where}: 'withdrawn' must be null, 'retired' or 'revoked'")
    withdrawn_at = _opt_int(raw, "withdrawn_at", where)
    if (withdrawn is None) != (withdrawn_at is None):
        raise KeySetInvalid(f"{where}: 'withdrawn' and 'withdrawn_at' go together")
    origin = raw.get("origin", "generated")
    if origin not in ("generated", "imported"):
        raise KeySetInvalid(f"{where}: 'origin' must be 'generated' or 'imported'")
    return KeyRecord(
        kid=kid,
        alg=alg,
        jwk=jwk,
        private=private,
        created_at=created_at,
        activate_at=activate_at,
        deactivate_at=deactivate_at,
        expires_at=expires_at,
        endorsement=endorsement,
        withdrawn=withdrawn,
        withdrawn_at=withdrawn_at,
        origin=origin,
    )


def _int(obj: Mapping[str, Any], name: str, where: str) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise KeySetInvalid(f"{where}: '{name}' must be a non-negative integer")
    return value


def _opt_int(obj: Mapping[str, Any], name: str, where: str) -> int | None:
    if obj.get(name) is None:
        return None
    return _int(obj, name, where)


# ---- pure edits (each returns a new record) ---------------------------------------------------


def with_activation(record: KeyRecord, at: int) -> KeyRecord:
    return replace(record, activate_at=at)


def with_withdrawal(record: KeyRecord, how: Withdrawal, at: int) -> KeyRecord:
    return replace(record, withdrawn=how, withdrawn_at=at)
