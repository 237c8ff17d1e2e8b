"""What every key wrapper must do, checked the same way for each backend.

A backend's test module calls `check_key_wrapper(wrapper)` against its real server or fake; the
checks go through the public envelope (seal/open_sealed), as the agent does.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from agent.crypto import b64url_encode, generate_private_key, private_key_to_pkcs8
from backends.base import BackendDenied, KeyWrapper
from backends.envelope import open_sealed, seal

PREFIX = "/keyquorum/contract"


async def check_key_wrapper(wrapper: KeyWrapper) -> None:
    """Round trip, context binding, tamper detection, no plaintext in the sealed document."""
    assert isinstance(wrapper, KeyWrapper)
    pkcs8 = private_key_to_pkcs8(generate_private_key("ES256"))

    sealed = await seal(wrapper, pkcs8, kid="kid-1", prefix=PREFIX)
    text = json.dumps(sealed)  # what would be written to etcd
    assert sealed["wrapper"] == wrapper.kind
    assert b64url_encode(pkcs8) not in text and pkcs8.hex() not in text
    assert await open_sealed(wrapper, sealed, kid="kid-1", prefix=PREFIX) == pkcs8

    # The same plaintext seals differently each time (fresh data key and nonce).
    again = await seal(wrapper, pkcs8, kid="kid-1", prefix=PREFIX)
    assert again["ciphertext"] != sealed["ciphertext"]

    # Bound to its kid and its cluster prefix.
    with pytest.raises(BackendDenied):
        await open_sealed(wrapper, sealed, kid="kid-2", prefix=PREFIX)
    with pytest.raises(BackendDenied):
        await open_sealed(wrapper, sealed, kid="kid-1", prefix="/another/cluster")

    # A wrapped data key moved onto another record's ciphertext does not open it.
    other = await seal(wrapper, pkcs8, kid="kid-2", prefix=PREFIX)
    swapped: dict[str, Any] = {**other, "data_key": sealed["data_key"]}
    with pytest.raises(BackendDenied):
        await open_sealed(wrapper, swapped, kid="kid-2", prefix=PREFIX)

    # Tampering with any field of the wrapped data key fails with BackendDenied, not a crash.
    for field in sealed["data_key"]:
        value = sealed["data_key"][field]
        broken = {**sealed, "data_key": {**sealed["data_key"], field: _flip(value)}}
        with pytest.raises(BackendDenied):
            await open_sealed(wrapper, broken, kid="kid-1", prefix=PREFIX)

    assert "\n" not in wrapper.describe() and wrapper.describe()


def _flip(value: str) -> str:
    """A different value of the same shape (one character changed)."""
    if not value:
        return "x"
    i = len(value) // 2
    replacement = "A" if value[i] != "A" else "B"
    return value[:i] + replacement + value[i + 1 :]


def random_data_key() -> bytes:
    return os.urandom(32)
