"""PKCS#11 key wrapper: data keys encrypted on an HSM token by an AES-256 key that never leaves it.

The 32-byte data key is encrypted with CKM_AES_GCM on the token (fresh 96-bit random IV, 128-bit
tag, AAD = the envelope's canonical context), so the token itself refuses to open a wrapped key
presented for another kid or cluster prefix. GCM rather than CKM_AES_KEY_WRAP_PAD: measured with
SoftHSM 2.6.1 and python-pkcs11 0.10.1, single-part GCM with a caller IV and AAD works; it binds
the context inside the HSM instead of relying on the envelope's outer layer alone, and it encrypts
the data key as data (CKA_ENCRYPT) where C_WrapKey would first need it imported as a key object.
A tag mismatch comes back from SoftHSM as CKR_GENERAL_ERROR (the spec says
CKR_ENCRYPTED_DATA_INVALID, other tokens CKR_FUNCTION_FAILED): during a decrypt all of these mean
"does not open" and become BackendDenied.

Options ([backend] with kind = "pkcs11"): `module` (path of the PKCS#11 library), `token_label`,
exactly one of `pin` or `pin_file` (the user PIN; the file must not be readable by group or
others), `key_label` (the AES-256 wrapping key), `create_key` (default false), and the call
policy's `timeout` and `attempt_timeout` (backends/calls.py).

Each wrapped key records the label and CKA_ID of the token key that wrapped it, so records sealed
before an operator moves `key_label` to a new key still open with the old one. With
`create_key = true` a missing key is generated on the token: AES-256, token object, private,
sensitive, never extractable, usable only to encrypt and decrypt, with a random 16-byte CKA_ID.
(Two agents creating it on a shared HSM at the same instant would make two keys with one label;
the next start then names the duplicate: create the key once, before the cluster starts.)

python-pkcs11 blocks and its sessions are not thread-safe, so the wrapper holds one session behind
a threading.Lock and runs every call in an abandonable worker thread (backends/calls.py). The
session is opened at build, so a wrong module, token, PIN or key label fails at start-up; a token
that is merely unreachable then is logged and opened on first use. A session that breaks (token
removed, device error, handle invalidated, login lost) is dropped and reopened by the next
attempt. PKCS#11 logins belong to the process, not the session: a second wrapper on the same token
in one process gets CKR_USER_ALREADY_LOGGED_IN and then works through the existing login (its PIN
is not checked again), and closing a logged-in session logs every session of the process out;
the others notice on their next call and log in again. The PIN is never logged, put in a message
or shown by repr.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.types import DecryptMixin, EncryptMixin, SecretKey, Session

from agent.crypto import b64url_decode, b64url_encode
from backends.base import BackendConfigError, BackendDenied, BackendError, BackendUnavailable
from backends.calls import CallPolicy, in_thread, retry
from backends.envelope import associated_data

T = TypeVar("T")
log = logging.getLogger("keyquorum.backend.pkcs11")

DATA_KEY_BYTES = 32
IV_BYTES = 12
TAG_BITS = 128
KEY_ID_BYTES = 16
_WRAPPED_BYTES = DATA_KEY_BYTES + TAG_BITS // 8
_OPTIONS = frozenset(
    {
        "module",
        "token_label",
        "pin",
        "pin_file",
        "key_label",
        "create_key",
        "timeout",
        "attempt_timeout",
    }
)

# Where in a call a PKCS#11 error was raised: it decides what the error means.
Stage = Literal["load", "session", "encrypt", "decrypt"]

_PIN_ERRORS = (
    p11.PinIncorrect,
    p11.PinLenRange,
    p11.PinInvalid,
    p11.PinExpired,
    p11.PinLocked,
    p11.UserPinNotInitialized,
)
_TOKEN_ERRORS = (
    p11.NoSuchToken,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.MultipleTokensReturned,
)
# How tokens report a GCM tag mismatch (tampered IV or ciphertext, other AAD, other key).
_DOES_NOT_OPEN = (
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.FunctionFailed,
    p11.GeneralError,
    p11.DataInvalid,
    p11.DataLenRange,
)
_MECHANISM_ERRORS = (
    p11.MechanismInvalid,
    p11.MechanismParamInvalid,
    p11.KeyTypeInconsistent,
    p11.KeySizeRange,
)


@dataclass(slots=True)
class _Open:
    """A logged-in session with the configured key found; every use holds the wrapper's lock."""

    session: Session
    key: SecretKey
    key_id: bytes
    others: dict[tuple[str, bytes], SecretKey] = field(default_factory=dict)


class Pkcs11Wrapper:
    """Wraps data keys with CKM_AES_GCM under an AES-256 key on a PKCS#11 token."""

    __slots__ = (
        "_create_key",
        "_lib",
        "_lock",
        "_open",
        "_opened_once",
        "_pin",
        "_pin_setting",
        "key_label",
        "module",
        "policy",
        "token_label",
    )
    kind = "pkcs11"

    def __init__(
        self,
        lib: Any,
        *,
        module: str,
        token_label: str,
        pin: str,
        pin_setting: str,
        key_label: str,
        create_key: bool,
        policy: CallPolicy,
    ) -> None:
        self._lib = lib
        self.module = module
        self.token_label = token_label
        self._pin = pin
        self._pin_setting = pin_setting  # "backend.pin" or "backend.pin_file", for messages
        self.key_label = key_label
        self._create_key = create_key
        self.policy = policy
        self._lock = threading.Lock()
        self._open: _Open | None = None
        self._opened_once = False

    # ---- the KeyWrapper protocol -------------------------------------------------------------

    async def wrap_data_key(self, data_key: bytes, context: Mapping[str, str]) -> dict[str, str]:
        if len(data_key) != DATA_KEY_BYTES:
            raise BackendDenied(f"a data key must be {DATA_KEY_BYTES} bytes, not {len(data_key)}")
        aad = associated_data(context)
        kid = context.get("keyquorum:kid", "?")

        def encrypt(key: SecretKey) -> tuple[bytes, bytes]:
            iv = os.urandom(IV_BYTES)  # fresh per attempt: never one IV for two encryptions
            return iv, _gcm(key, data_key, iv, aad, decrypt=False)

        what = f"wrapping the data key of {kid} with key {self.key_label!r}"
        (iv, blob), key_id = await self._run(what, None, encrypt)
        if len(blob) != _WRAPPED_BYTES:  # not transient: retrying would not change it
            raise BackendDenied(
                f"{what}: the token returned {len(blob)} bytes, not {_WRAPPED_BYTES}"
            )
        return {
            "key_label": self.key_label,
            "key_id": key_id.hex(),
            "iv": b64url_encode(iv),
            "wrapped": b64url_encode(blob),
        }

    async def unwrap_data_key(
        self, wrapped: Mapping[str, str], context: Mapping[str, str]
    ) -> bytes:
        kid = context.get("keyquorum:kid", "?")
        try:
            label = wrapped["key_label"]
            key_id = bytes.fromhex(wrapped["key_id"])
            iv = b64url_decode(wrapped["iv"])
            blob = b64url_decode(wrapped["wrapped"])
            if not isinstance(label, str) or not label:
                raise ValueError("no key label")
            if wrapped["key_id"] != key_id.hex():  # one spelling per id: "AB" would equal "ab"
                raise ValueError("key id is not lowercase hex")
            if len(iv) != IV_BYTES or len(blob) != _WRAPPED_BYTES:
                raise ValueError("bad IV or ciphertext length")
        except (KeyError, ValueError, TypeError):
            raise BackendDenied(
                f"the wrapped data key of {kid} is malformed (key label, key id, IV or "
                "ciphertext missing or of the wrong size)"
            ) from None
        aad = associated_data(context)

        def decrypt(key: SecretKey) -> bytes:
            return _gcm(key, blob, iv, aad, decrypt=True)

        what = f"unwrapping the data key of {kid} with key {label!r}"
        data_key, _ = await self._run(what, (label, key_id), decrypt)
        if len(data_key) != DATA_KEY_BYTES:
            raise BackendDenied(f"{what}: the token returned no {DATA_KEY_BYTES}-byte data key")
        return data_key

    def describe(self) -> str:
        return f"PKCS#11 token {self.token_label}, key {self.key_label}"

    def __repr__(self) -> str:
        return (
            f"Pkcs11Wrapper(module={self.module!r}, token_label={self.token_label!r}, "
            f"key_label={self.key_label!r})"
        )

    # ---- session lifecycle -------------------------------------------------------------------

    def connect(self) -> None:
        """Open the session now (blocking), so that wrong settings fail at start-up."""
        with self._lock:
            self._ensure_open("opening a session")

    def close(self) -> None:
        """Log out and close the session; a later call would open a new one."""
        if not self._lock.acquire(timeout=self.policy.attempt_timeout):
            log.warning("%s: a token call is still running; its session is left open", self)
            return
        try:
            self._drop()
        finally:
            self._lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def _run(
        self,
        what: str,
        key_ref: tuple[str, bytes] | None,
        operation: Callable[[SecretKey], T],
    ) -> tuple[T, bytes]:
        """Run `operation` on the key `key_ref` names (None: the configured key), with retries."""

        def locked() -> tuple[T, bytes]:
            # A timed-out attempt's thread may still hold the lock: do not queue behind it forever.
            if not self._lock.acquire(timeout=self.policy.attempt_timeout):
                raise BackendUnavailable(
                    f"{what}: the token session is still busy with an earlier call",
                    "the token may be hanging; check the HSM and its connection",
                )
            try:
                return self._attempt(what, key_ref, operation)
            finally:
                self._lock.release()

        async def attempt() -> tuple[T, bytes]:
            return await in_thread(locked)

        return await retry(attempt, what=what, policy=self.policy)

    def _attempt(
        self,
        what: str,
        key_ref: tuple[str, bytes] | None,
        operation: Callable[[SecretKey], T],
    ) -> tuple[T, bytes]:
        """One try, holding the lock: (re)open the session if needed, find the key, use it."""
        opened = self._ensure_open(what)
        stage: Stage = "session"
        try:
            key, key_id = self._key_for(opened, key_ref, what)
            stage = "encrypt" if key_ref is None else "decrypt"
            return operation(key), key_id
        except p11.PKCS11Error as exc:
            raise self._failed(exc, what, stage) from exc

    def _ensure_open(self, what: str) -> _Open:
        if self._open is None:
            try:
                self._open = self._connect()
            except p11.PKCS11Error as exc:
                raise self._failed(exc, what, "session") from exc
            self._opened_once = True
        return self._open

    def _connect(self) -> _Open:
        token = self._lib.get_token(token_label=self.token_label)
        if Mechanism.AES_GCM not in token.slot.get_mechanisms():
            raise BackendConfigError(
                f"backend.token_label: token {self.token_label!r} does not offer CKM_AES_GCM",
                "use a token (or HSM firmware) that supports AES-GCM encryption",
            )
        try:
            session = token.open(rw=self._create_key, user_pin=self._pin)
        except p11.UserAlreadyLoggedIn:
            # Another session of this process is logged in to the token; ours shares that login.
            session = token.open(rw=self._create_key)
        try:
            key = self._find_or_create_key(session)
            return _Open(session, key, bytes(key.id))
        except BaseException:
            _close_quietly(session)
            raise

    def _find_or_create_key(self, session: Session) -> SecretKey:
        found = _secret_keys(session, self.key_label, None)
        if not found and self._create_key:
            key = session.generate_key(
                KeyType.AES,
                DATA_KEY_BYTES * 8,
                id=os.urandom(KEY_ID_BYTES),
                label=self.key_label,
                store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                },
            )
            log.info(
                "created AES-256 key %r (id %s) on PKCS#11 token %r",
                self.key_label,
                key.id.hex(),
                self.token_label,
            )
            found = [key]
        if not found:
            raise BackendConfigError(
                f"backend.key_label: token {self.token_label!r} holds no secret key labelled "
                f"{self.key_label!r}",
                "create an AES-256 key with that label on the token, or set "
                "backend.create_key = true to let the agent create one",
            )
        if len(found) > 1:
            raise BackendConfigError(
                f"backend.key_label: {len(found)} secret keys on token {self.token_label!r} are "
                f"labelled {self.key_label!r}",
                "give the wrapping key a label no other key on the token has",
            )
        key = found[0]
        if (
            key.key_type != KeyType.AES
            or key[Attribute.VALUE_LEN] != DATA_KEY_BYTES
            or not (isinstance(key, EncryptMixin) and isinstance(key, DecryptMixin))
        ):
            raise BackendConfigError(
                f"backend.key_label: key {self.key_label!r} on token {self.token_label!r} is not "
                "an AES-256 key allowed to encrypt and decrypt",
                "point backend.key_label at an AES-256 key with CKA_ENCRYPT and CKA_DECRYPT",
            )
        if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
            log.warning(
                "PKCS#11 key %r on token %r can leave the token (CKA_EXTRACTABLE or not "
                "CKA_SENSITIVE); prefer a sensitive, non-extractable key",
                self.key_label,
                self.token_label,
            )
        return key

    def _key_for(
        self, opened: _Open, key_ref: tuple[str, bytes] | None, what: str
    ) -> tuple[SecretKey, bytes]:
        """The key a wrapped data key names (by label and CKA_ID), or BackendDenied."""
        if key_ref is None or key_ref == (self.key_label, opened.key_id):
            return opened.key, opened.key_id
        key = opened.others.get(key_ref)
        if key is None:
            label, key_id = key_ref
            found = _secret_keys(opened.session, label, key_id)
            if len(found) != 1 or not isinstance(found[0], DecryptMixin):
                raise BackendDenied(
                    f"{what}: token {self.token_label!r} holds "
                    f"{'no' if not found else len(found)} usable secret key(s) labelled "
                    f"{label!r} with id {key_id.hex() or '(none)'}",
                    "restore the key this key set was wrapped with, or the record was tampered",
                )
            key = opened.others[key_ref] = found[0]
        return key, key_ref[1]

    def _failed(self, exc: p11.PKCS11Error, what: str, stage: Stage) -> BackendError:
        error = _translate(
            exc,
            what=f"{what}: PKCS#11 token {self.token_label!r}",
            stage=stage,
            pin_setting=self._pin_setting,
            token_seen=self._opened_once,
        )
        if isinstance(error, BackendUnavailable):
            self._drop()  # the next attempt opens a fresh session
        return error

    def _drop(self) -> None:
        opened, self._open = self._open, None
        if opened is not None:
            _close_quietly(opened.session)


def _secret_keys(session: Session, label: str, key_id: bytes | None) -> list[SecretKey]:
    """The secret keys with this label (and CKA_ID, when not None) the session can see."""
    template: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.LABEL: label,
    }
    if key_id:
        template[Attribute.ID] = key_id
    found = [obj for obj in session.get_objects(template) if isinstance(obj, SecretKey)]
    if key_id is not None and not key_id:  # recorded without a CKA_ID: only keys without one
        found = [key for key in found if not key.id]
    return found


def _gcm(key: SecretKey, data: bytes, iv: bytes, aad: bytes, *, decrypt: bool) -> bytes:
    params = pkcs11.GCMParams(iv, aad, TAG_BITS)
    result: bytes | Iterator[bytes]
    if decrypt:
        assert isinstance(key, DecryptMixin)  # checked when the key was found
        result = key.decrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=params)
    else:
        assert isinstance(key, EncryptMixin)
        result = key.encrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=params)
    assert isinstance(result, bytes)  # bytes in, bytes out (python-pkcs11 single-part call)
    return result


def _close_quietly(session: Session) -> None:
    try:
        session.close()
    except p11.PKCS11Error as exc:  # a broken session cannot be closed cleanly: nothing to do
        log.debug("closing a PKCS#11 session failed: %s", type(exc).__name__)


def _describe(exc: p11.PKCS11Error) -> str:
    text = str(exc)  # python-pkcs11's messages name labels and codes, never a PIN
    return f"{type(exc).__name__} ({text})" if text else type(exc).__name__


def _translate(
    exc: p11.PKCS11Error, *, what: str, stage: Stage, pin_setting: str, token_seen: bool
) -> BackendError:
    """The one place mapping python-pkcs11's exceptions to the backend error hierarchy."""
    name = _describe(exc)
    if stage == "load":
        return BackendConfigError(
            f"backend.module: {what}: cannot load it as a PKCS#11 module: {name}",
            "point backend.module at the token vendor's PKCS#11 library (.so) and check the "
            "module's own configuration (for SoftHSM: SOFTHSM2_CONF and its tokendir)",
        )
    if isinstance(exc, _PIN_ERRORS):
        locked = isinstance(exc, p11.PinLocked | p11.PinExpired)
        return BackendConfigError(
            f"{pin_setting}: {what} refused the user PIN ({type(exc).__name__})",
            "the security officer must reset the token's user PIN, then update " + pin_setting
            if locked
            else f"set {pin_setting} to the token's user PIN",
        )
    if isinstance(exc, _TOKEN_ERRORS) and not token_seen:
        return BackendConfigError(
            f"backend.token_label: {what}: no single token with that label ({name})",
            "set backend.token_label to the label of an initialised token (softhsm2-util "
            "--show-slots or pkcs11-tool --list-tokens show them)",
        )
    if stage == "decrypt" and isinstance(exc, _DOES_NOT_OPEN):
        return BackendDenied(
            f"{what}: the wrapped data key does not open ({name}): tampered, or wrapped for "
            "another kid or cluster prefix",
        )
    if isinstance(exc, _MECHANISM_ERRORS):
        return BackendConfigError(
            f"backend.key_label: {what}: the key cannot do CKM_AES_GCM ({name})",
            "use an AES-256 key on a token that supports AES-GCM with a 96-bit IV",
        )
    # Anything else (DeviceError, DeviceRemoved, SessionHandleInvalid, UserNotLoggedIn, an
    # invalidated object handle, a token that vanished, GeneralError outside a decrypt) is treated
    # as transient: the session is dropped and the next attempt opens a new one.
    return BackendUnavailable(
        f"{what}: {name}",
        "the token may have been removed or reset, or the HSM is unreachable; the call is "
        "retried with a fresh session",
    )


def _load_module(module: str) -> Any:
    if not os.path.isfile(module):
        raise BackendConfigError(
            f"backend.module: {module} does not exist",
            "point it at the token vendor's PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so",
        )
    try:
        return pkcs11.lib(module)
    except p11.PKCS11Error as exc:
        raise _translate(exc, what=module, stage="load", pin_setting="", token_seen=False) from exc


def _read_pin_file(path: Path) -> str:
    """The PIN in `path`, after checking that only its owner can read it (like the KEK file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise BackendConfigError(
            f"backend.pin_file: cannot open {path}: {exc.strerror}",
            f"make {path} readable by the agent's user",
        ) from None
    try:
        info = os.fstat(fd)  # fstat, not stat: the checked file is the one read
        if not stat.S_ISREG(info.st_mode):
            raise BackendConfigError(f"backend.pin_file: {path} is not a regular file")
        if info.st_mode & 0o077:
            raise BackendConfigError(
                f"backend.pin_file: {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o})",
                f"run: chmod 600 {path}",
            )
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        pin = raw.decode().rstrip("\r\n")
    except UnicodeDecodeError:
        raise BackendConfigError(f"backend.pin_file: {path} is not UTF-8 text") from None
    if not pin:
        raise BackendConfigError(f"backend.pin_file: {path} is empty", "write the user PIN in it")
    return pin


def _text(options: Mapping[str, Any], name: str, hint: str) -> str:
    value = options.get(name)
    if not isinstance(value, str) or not value:
        raise BackendConfigError(f"backend.{name}: required for kind 'pkcs11' (a string)", hint)
    return value


def build(options: Mapping[str, Any]) -> Pkcs11Wrapper:
    """The registry's constructor; see the module docstring for what each option does."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for kind 'pkcs11'",
            f"the pkcs11 backend takes {', '.join(sorted(_OPTIONS))}",
        )
    module = _text(options, "module", "set it to the PKCS#11 library's path")
    token_label = _text(options, "token_label", "set it to the token's label")
    key_label = _text(options, "key_label", "set it to the label of the AES-256 wrapping key")
    create_key = options.get("create_key", False)
    if not isinstance(create_key, bool):
        raise BackendConfigError(
            f"backend.create_key: must be true or false, not {create_key!r}",
            "write create_key = true (create the key when missing) or false",
        )
    if ("pin" in options) == ("pin_file" in options):
        raise BackendConfigError(
            "backend.pin / backend.pin_file: set exactly one of them",
            "prefer pin_file: a file only the agent's user can read, holding the user PIN",
        )
    if "pin" in options:
        pin, pin_setting = _text(options, "pin", "set it to the token's user PIN"), "backend.pin"
    else:
        pin_file = options["pin_file"]
        if not isinstance(pin_file, str | os.PathLike) or not os.fspath(pin_file):
            raise BackendConfigError("backend.pin_file: must be a path to the PIN file")
        pin, pin_setting = _read_pin_file(Path(pin_file)), "backend.pin_file"
    policy = CallPolicy.from_options(options)
    wrapper = Pkcs11Wrapper(
        _load_module(module),
        module=module,
        token_label=token_label,
        pin=pin,
        pin_setting=pin_setting,
        key_label=key_label,
        create_key=create_key,
        policy=policy,
    )
    try:
        wrapper.connect()
    except BackendUnavailable as exc:
        log.warning("%s; the session is opened on first use", exc)
    return wrapper
