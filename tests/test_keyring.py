"""The keyring: which signer to use now, the fallback, what to load first, when keys were seen."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.keyring import Keyring, NotReady
from agent.keyset import KeyRecord, KeySet

T0 = 1_700_000_000_000


@dataclass
class FakeSigner:
    kid: str
    alg: str = "ES256"


def record(kid: str, created: int, activate: int | None, deactivate: int) -> KeyRecord:
    return KeyRecord(
        kid=kid,
        alg="ES256",
        jwk={"kty": "EC"},
        private={"scheme": "test"},
        created_at=created,
        activate_at=activate,
        deactivate_at=deactivate,
        expires_at=deactivate + 1000,
    )


OLD = record("old", T0, T0, T0 + 10_000)
NEW = record("new", T0 + 5_000, T0 + 8_000, T0 + 20_000)
NEXT = record("next", T0 + 7_000, None, T0 + 30_000)
KEYSET = KeySet(generation=3, keys=(OLD, NEW, NEXT))


def test_the_key_that_signs_now_loads_first_then_the_newest() -> None:
    keyring = Keyring()
    keyring.install(KEYSET, T0 + 9_000)  # "new" signs; "old" is still in its window
    assert [r.kid for r in keyring.missing(T0 + 9_000)] == ["new", "next", "old"]
    keyring.install(KEYSET, T0 + 7_500)  # before "new" activates: "old" signs
    assert [r.kid for r in keyring.missing(T0 + 7_500)] == ["old", "next", "new"]


def test_a_running_agent_falls_back_to_a_loaded_key_still_in_its_window() -> None:
    keyring = Keyring()
    keyring.install(KEYSET, T0 + 1_000)
    keyring.add_signer(FakeSigner("old"))  # type: ignore[arg-type]
    choice = keyring.choice(T0 + 9_000)
    assert (choice.signer.kid, choice.preferred) == ("old", "new")
    with pytest.raises(NotReady, match="new must sign now but is not unwrapped"):
        keyring.current(T0 + 10_000)  # "old" stopped signing


def test_seen_records_when_each_key_first_appeared_and_forgets_dropped_ones() -> None:
    keyring = Keyring()
    keyring.install(KeySet(generation=1, keys=(OLD,)), T0)
    keyring.install(KEYSET, T0 + 6_000)
    keyring.install(KEYSET, T0 + 7_000)  # the same keys again: first sight stays
    assert keyring.seen == {"old": T0, "new": T0 + 6_000, "next": T0 + 6_000}
    keyring.install(KeySet(generation=4, keys=(NEW, NEXT)), T0 + 8_000)
    assert keyring.seen == {"new": T0 + 6_000, "next": T0 + 6_000}
