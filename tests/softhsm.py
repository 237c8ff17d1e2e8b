"""SoftHSM2 tokens for tests, in a private temporary directory (never /var/lib/softhsm).

A token lives in its own token directory named by a SOFTHSM2_CONF file; `softhsm2-util
--init-token --free` creates it there with a random user PIN and SO PIN. SoftHSM reads
SOFTHSM2_CONF once per process, when the library is first initialised (C_Initialize), and sees
only the tokens that exist at that moment: `softhsm_token` therefore creates the token first, then
points this process at it, and at the end unloads the module (C_Finalize) so that a later token
directory is read afresh. One token directory is active per test process at a time.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass(frozen=True)
class SoftHsmToken:
    """An initialised token: what a pkcs11 backend's options need, and the env that finds it."""

    module: str
    label: str
    pin: str
    so_pin: str
    conf: Path

    @property
    def env(self) -> dict[str, str]:
        """The environment for processes (softhsm2-util, an agent) that should see this token."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def __repr__(self) -> str:  # keep PINs out of pytest's failure output
        return f"SoftHsmToken(label={self.label!r}, conf={str(self.conf)!r})"


def missing() -> str | None:
    """Why SoftHSM2 tests cannot run here, or None when they can."""
    if not Path(MODULE).exists():
        return f"SoftHSM2 is not installed ({MODULE} does not exist; apt-get install softhsm2)"
    return None


def create_token(directory: Path, label: str = "keyquorum-test") -> SoftHsmToken:
    """Initialise a token labelled `label` in `directory`/tokens, with fresh random PINs."""
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    token = SoftHsmToken(
        module=MODULE,
        label=label,
        pin=f"user-{secrets.token_hex(6)}",
        so_pin=f"so-{secrets.token_hex(6)}",
        conf=conf,
    )
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            token.so_pin,
            "--pin",
            token.pin,
        ],
        env=token.env,
        check=True,
        capture_output=True,
        timeout=30,
    )
    return token


@contextmanager
def softhsm_token(label: str = "keyquorum-test") -> Iterator[SoftHsmToken]:
    """A fresh token that this process's PKCS#11 calls see until the block ends."""
    import pkcs11

    directory = Path(tempfile.mkdtemp(prefix="kq-hsm-", dir="/tmp"))
    saved = os.environ.get("SOFTHSM2_CONF")
    try:
        token = create_token(directory, label)
        pkcs11.unload(MODULE)  # a module initialised earlier would not see this token directory
        os.environ["SOFTHSM2_CONF"] = str(token.conf)
        yield token
    finally:
        pkcs11.unload(MODULE)
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved
        shutil.rmtree(directory, ignore_errors=True)
