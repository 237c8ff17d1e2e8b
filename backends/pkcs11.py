"""PKCS#11 backends on one HSM token: a key wrapper (mode "wrap") and a remote signer ("remote").

Key wrapper (`build`). The 32-byte data key is encrypted with CKM_AES_GCM on the token (fresh
96-bit random IV, 128-bit tag, AAD = the envelope's canonical context), so the token itself
refuses to open a wrapped key presented for another kid or cluster prefix. GCM rather than
CKM_AES_KEY_WRAP_PAD: measured with SoftHSM 2.6.1 and python-pkcs11 0.10.1, single-part GCM with a
caller IV and AAD works; it binds the context inside the HSM instead of relying on the envelope's
outer layer alone, and it encrypts the data key as data (CKA_ENCRYPT) where C_WrapKey would first
need it imported as a key object. A tag mismatch comes back from SoftHSM as CKR_GENERAL_ERROR (the
spec says CKR_ENCRYPTED_DATA_INVALID, other tokens CKR_FUNCTION_FAILED): during a decrypt all of
these mean "does not open" and become BackendDenied.

Wrapper options ([backend] with kind = "pkcs11"): `module` (path of the PKCS#11 library),
`token_label`, exactly one of `pin` or `pin_file` (the user PIN; the file must not be readable by
group or others), `key_label` (the AES-256 wrapping key), `create_key` (default false), and the
call policy's `timeout` and `attempt_timeout` (backends/calls.py).

Each wrapped key records the label and CKA_ID of the token key that wrapped it, so records sealed
before an operator moves `key_label` to a new key still open with the old one. With
`create_key = true` a missing key is generated on the token: AES-256, token object, private,
sensitive, never extractable, usable only to encrypt and decrypt, with a random 16-byte CKA_ID.
(Two agents creating it on a shared HSM at the same instant would make two keys with one label;
the next start then names the duplicate: create the key once, before the cluster starts.)

Remote signer (`build_signer`, backend.mode = "remote"; options as above but `key_label_prefix`,
default "keyquorum", in place of `key_label` and `create_key`). Each rotation generates a key pair
on the token (C_GenerateKeyPair; token objects, the private half private, sensitive,
non-extractable and CKA_SIGN only, the public half CKA_VERIFY only): ES256/ES384 on P-256/P-384,
EdDSA on Ed25519 (CKM_EC_EDWARDS_KEY_PAIR_GEN, where the token offers it), RS256/PS256 on RSA-2048.
Messages are hashed here and only the digest goes to the token: CKM_ECDSA (SoftHSM has no
CKM_ECDSA_SHA256; the result is already JWS's raw r||s), CKM_RSA_PKCS over a SHA-256 DigestInfo
(SoftHSM also offers CKM_SHA256_RSA_PKCS, which gives the same bytes, but local hashing keeps a
large message off the wire to a network HSM), CKM_RSA_PKCS_PSS with MGF1-SHA256 and a 32-byte salt.
Ed25519 has no pre-hash in JWS, so EdDSA sends the whole message (pure CKM_EDDSA).
Both halves carry CKA_LABEL `<key_label_prefix>-<8 hex of sha256(cluster prefix)>-<ms>-<random>`
and a random 16-byte CKA_ID; a record's ref is {"label", "id" (lowercase hex)}. The creation time
(ms since the epoch, 12 hex digits, from this host's clock) lives in the label because
CKA_START_DATE cannot hold it: a CK_DATE has day precision, too coarse for the leader's "is this
key fresh?" margin (a key of unknown age gets retired at once), and SoftHSM 2.6.1 answers
CKR_GENERAL_ERROR when a set CKA_START_DATE is read back. `owned_keys` lists the token's private
keys and keeps those whose label starts with the cluster's name; `retire` destroys both halves at
once (an HSM has no scheduled deletion), the public one first, so that a crash in between leaves
the private key, which `owned_keys` still finds. The signer caches the handles of keys it signed
with; before each use it re-reads the handle's class, label and id, because some HSMs reuse the
handle of a destroyed object (SoftHSM never does: it answers CKR_OBJECT_HANDLE_INVALID).

Sessions (both). python-pkcs11 blocks and its sessions are not thread-safe, so each wrapper or
signer holds one session behind a threading.Lock and runs every call in an abandonable worker
thread (backends/calls.py); there are no SDK retries or sockets to configure: a call that outlives
`attempt_timeout` is abandoned (its thread keeps the lock until the token answers) and retried. On
a slow HSM an RSA key pair can take seconds: raise `attempt_timeout`; the key pair of an abandoned
attempt is an orphan that `owned_keys` finds. The session is opened at build, so a wrong module,
token or PIN fails at start-up; a token that is merely unreachable then is logged and opened on
first use. A session that breaks (token removed, device error, handle invalidated, login lost) is
dropped and reopened by the next attempt. PKCS#11 logins belong to the process, not the session: a
second wrapper or signer on the same token in one process gets CKR_USER_ALREADY_LOGGED_IN and then
works through the existing login (its PIN is not checked again), and closing a logged-in session
logs every session of the process out; the others notice on their next call
(CKR_USER_NOT_LOGGED_IN, an invalid handle) and log in again. A logged-out session's search
silently misses private objects, so the signer checks its session and login (`_check_session`)
before it searches. The PIN is never logged, put in a message or shown by repr.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, Self, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.types import (
    DecryptMixin,
    EncryptMixin,
    Object,
    PrivateKey,
    PublicKey,
    SecretKey,
    Session,
    SignMixin,
)

from agent.crypto import b64url_decode, b64url_encode
from backends.base import (
    BackendConfigError,
    BackendDenied,
    BackendError,
    BackendUnavailable,
    RemoteKey,
)
from backends.calls import CallPolicy, in_thread, retry
from backends.envelope import associated_data

T = TypeVar("T")
log = logging.getLogger("keyquorum.backend.pkcs11")

DATA_KEY_BYTES = 32
IV_BYTES = 12
TAG_BITS = 128
KEY_ID_BYTES = 16
_WRAPPED_BYTES = DATA_KEY_BYTES + TAG_BITS // 8
_TOKEN_OPTIONS = frozenset(
    {"module", "token_label", "pin", "pin_file", "timeout", "attempt_timeout"}
)
_OPTIONS = _TOKEN_OPTIONS | {"key_label", "create_key"}
_SIGNER_OPTIONS = _TOKEN_OPTIONS | {"key_label_prefix"}

# Where in a call a PKCS#11 error was raised: it decides what the error means.
Stage = Literal["load", "session", "encrypt", "decrypt", "generate", "sign"]

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
# A token refusing a key pair template: it cannot make this kind of key (or not this way).
_TEMPLATE_ERRORS = (
    p11.TemplateIncomplete,
    p11.TemplateInconsistent,
    p11.AttributeTypeInvalid,
    p11.AttributeValueInvalid,
    p11.DomainParamsInvalid,
    p11.FunctionNotSupported,
)
_READ_ONLY_ERRORS = (p11.TokenWriteProtected, p11.SessionReadOnly)
# The session cannot serve us (closed, token gone, login lost): open a new one.
_SESSION_LOST = (
    p11.UserNotLoggedIn,
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.DeviceRemoved,
    p11.DeviceError,
    p11.TokenNotPresent,
)


class _Opened(Protocol):
    """What a client keeps while its session is open."""

    session: Session


S = TypeVar("S", bound=_Opened)


class _TokenClient(Generic[S]):
    """One logged-in session on one token behind a lock: opened lazily, dropped when it breaks,
    every call retried under the policy and its PKCS#11 errors translated (module docstring).

    Subclasses say whether they write to the token, check its mechanisms, and prepare what they
    keep per session (`_prepare`); operations run through `_call`, and `_step` marks the token
    call whose errors mean something other than "the session broke".
    """

    __slots__ = (
        "_lib",
        "_lock",
        "_open",
        "_opened_once",
        "_pin",
        "_pin_setting",
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
        policy: CallPolicy,
    ) -> None:
        self._lib = lib
        self.module = module
        self.token_label = token_label
        self._pin = pin
        self._pin_setting = pin_setting  # "backend.pin" or "backend.pin_file", for messages
        self.policy = policy
        self._lock = threading.Lock()
        self._open: S | None = None
        self._opened_once = False

    # ---- hooks ---------------------------------------------------------------------------------

    def _read_write(self) -> bool:
        """Whether sessions must be read-write (to create or destroy token objects)."""
        raise NotImplementedError

    def _check_mechanisms(self, mechanisms: frozenset[Mechanism]) -> None:
        """Refuse (BackendConfigError) a token lacking what this client needs."""

    def _prepare(self, session: Session) -> S:
        """What the client keeps for a freshly opened, logged-in session."""
        raise NotImplementedError

    # ---- session lifecycle ---------------------------------------------------------------------

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

    async def _call(self, what: str, operation: Callable[[S], T]) -> T:
        """Run `operation` on the open session, holding the lock, under the policy's retries.
        PKCS#11 errors it raises outside `_step` are session errors."""

        def locked() -> T:
            # A timed-out attempt's thread may still hold the lock: do not queue behind it forever.
            if not self._lock.acquire(timeout=self.policy.attempt_timeout):
                raise BackendUnavailable(
                    f"{what}: the token session is still busy with an earlier call",
                    "the token may be hanging; check the HSM and its connection",
                )
            try:
                opened = self._ensure_open(what)
                try:
                    return operation(opened)
                except p11.PKCS11Error as exc:
                    raise self._failed(exc, what, "session") from exc
            finally:
                self._lock.release()

        async def attempt() -> T:
            return await in_thread(locked)

        return await retry(attempt, what=what, policy=self.policy)

    def _step(self, what: str, stage: Stage, call: Callable[[], T]) -> T:
        """One token call of an operation, whose PKCS#11 errors mean what `stage` says."""
        try:
            return call()
        except p11.PKCS11Error as exc:
            raise self._failed(exc, what, stage) from exc

    def _ensure_open(self, what: str) -> S:
        if self._open is None:
            try:
                self._open = self._connect()
            except p11.PKCS11Error as exc:
                raise self._failed(exc, what, "session") from exc
            self._opened_once = True
        return self._open

    def _connect(self) -> S:
        token = self._lib.get_token(token_label=self.token_label)
        self._check_mechanisms(frozenset(token.slot.get_mechanisms()))
        rw = self._read_write()
        try:
            session = token.open(rw=rw, user_pin=self._pin)
        except p11.UserAlreadyLoggedIn:
            # Another session of this process is logged in to the token; ours shares that login.
            session = token.open(rw=rw)
        try:
            return self._prepare(session)
        except BaseException:
            _close_quietly(session)
            raise

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


# ---- the key wrapper (backend.mode = "wrap") ---------------------------------------------------


@dataclass(slots=True)
class _Open:
    """A logged-in session with the configured key found; every use holds the wrapper's lock."""

    session: Session
    key: SecretKey
    key_id: bytes
    others: dict[tuple[str, bytes], SecretKey] = field(default_factory=dict)


class Pkcs11Wrapper(_TokenClient[_Open]):
    """Wraps data keys with CKM_AES_GCM under an AES-256 key on a PKCS#11 token."""

    __slots__ = ("_create_key", "key_label")

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
        super().__init__(
            lib,
            module=module,
            token_label=token_label,
            pin=pin,
            pin_setting=pin_setting,
            policy=policy,
        )
        self.key_label = key_label
        self._create_key = create_key

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

    # ---- on the token ------------------------------------------------------------------------

    async def _run(
        self,
        what: str,
        key_ref: tuple[str, bytes] | None,
        operation: Callable[[SecretKey], T],
    ) -> tuple[T, bytes]:
        """Run `operation` on the key `key_ref` names (None: the configured key), with retries."""
        stage: Stage = "encrypt" if key_ref is None else "decrypt"

        def attempt(opened: _Open) -> tuple[T, bytes]:
            key, key_id = self._key_for(opened, key_ref, what)
            return self._step(what, stage, lambda: operation(key)), key_id

        return await self._call(what, attempt)

    def _read_write(self) -> bool:
        return self._create_key

    def _check_mechanisms(self, mechanisms: frozenset[Mechanism]) -> None:
        if Mechanism.AES_GCM not in mechanisms:
            raise BackendConfigError(
                f"backend.token_label: token {self.token_label!r} does not offer CKM_AES_GCM",
                "use a token (or HSM firmware) that supports AES-GCM encryption",
            )

    def _prepare(self, session: Session) -> _Open:
        key = self._find_or_create_key(session)
        return _Open(session, key, bytes(key.id))

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


# ---- the remote signer (backend.mode = "remote") -----------------------------------------------

# DER of the named curves' CKA_EC_PARAMS, and the length of a raw public point on each.
_P256 = bytes.fromhex("06082a8648ce3d030107")  # OID prime256v1
_P384 = bytes.fromhex("06052b81040022")  # OID secp384r1
_ED25519 = bytes.fromhex("06032b6570")  # OID id-Ed25519 (RFC 8410)
_CURVES: dict[bytes, tuple[ec.EllipticCurve | None, int]] = {
    _P256: (ec.SECP256R1(), 65),
    _P384: (ec.SECP384R1(), 97),
    _ED25519: (None, 32),
    b"\x13\x0cedwards25519": (None, 32),  # PKCS#11 3.0's PrintableString form of Ed25519
}
# DER of DigestInfo{sha256, NULL} before the 32-byte digest (RFC 8017 §9.2, note 1).
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
_PSS_SHA256 = (Mechanism.SHA256, MGF.SHA256, 32)  # salt length = hash length, as JWS expects
_KEY_ID_HEX = re.compile(r"[0-9a-f]{32}")
_STAMP_HEX = re.compile(r"[0-9a-f]{12}")
_LABEL_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class _Alg:
    """How one JWS algorithm's keys are generated on a token and sign there."""

    key_type: KeyType
    generate: Mechanism
    sign: Mechanism
    signature_bytes: int
    ec_params: bytes | None = None  # EC and Edwards curves
    hash_name: str | None = None  # hashed here; None: the token gets the whole message
    mechanism_param: Any = None


_ALGS: dict[str, _Alg] = {
    "ES256": _Alg(KeyType.EC, Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA, 64, _P256, "sha256"),
    "ES384": _Alg(KeyType.EC, Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA, 96, _P384, "sha384"),
    "EdDSA": _Alg(
        KeyType.EC_EDWARDS, Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA, 64, _ED25519
    ),
    "RS256": _Alg(
        KeyType.RSA, Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS, 256, None, "sha256"
    ),
    "PS256": _Alg(
        KeyType.RSA,
        Mechanism.RSA_PKCS_KEY_PAIR_GEN,
        Mechanism.RSA_PKCS_PSS,
        256,
        None,
        "sha256",
        _PSS_SHA256,
    ),
}
RSA_BITS = 2048


@dataclass(slots=True)
class _SignerSession:
    """A logged-in read-write session and the handles of keys signed with through it."""

    session: Session
    keys: dict[tuple[str, bytes], SignMixin] = field(default_factory=dict)


class Pkcs11Signer(_TokenClient[_SignerSession]):
    """Generates a key pair on a PKCS#11 token per rotation and signs there (RemoteSigner)."""

    __slots__ = ("_clock", "_mechanisms", "key_label_prefix")

    def __init__(
        self,
        lib: Any,
        *,
        module: str,
        token_label: str,
        pin: str,
        pin_setting: str,
        key_label_prefix: str,
        policy: CallPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            lib,
            module=module,
            token_label=token_label,
            pin=pin,
            pin_setting=pin_setting,
            policy=policy,
        )
        self.key_label_prefix = key_label_prefix
        self._clock = clock  # wall clock for created_at: the token has none we can read
        self._mechanisms: frozenset[Mechanism] | None = None  # known once a session opened

    # ---- the RemoteSigner protocol -----------------------------------------------------------

    def supports(self, alg: str) -> bool:
        """Known algorithm, and (once the token was seen) it offers both mechanisms it needs."""
        spec = _ALGS.get(alg)
        if spec is None:
            return False
        mechanisms = self._mechanisms
        return mechanisms is None or {spec.generate, spec.sign} <= mechanisms

    async def create_key(self, alg: str, prefix: str) -> RemoteKey:
        spec = self._spec(alg, generating=True)
        start = self._names_for(prefix)
        what = f"generating an {alg} key pair for {prefix!r}"

        def generate(opened: _SignerSession) -> RemoteKey:
            # A fresh label and id per attempt: a timed-out attempt's key pair is an orphan
            # with its own name, which owned_keys finds and the leader retires.
            created_at = int(self._clock() * 1000)
            label = f"{start}{created_at:012x}-{secrets.token_hex(4)}"
            key_id = os.urandom(KEY_ID_BYTES)
            public, _ = self._step(
                what, "generate", lambda: _generate_pair(opened.session, spec, label, key_id)
            )
            pem = _public_pem(public, f"{what}: key {label!r}")
            return RemoteKey({"label": label, "id": key_id.hex()}, pem, created_at)

        created = await self._call(what, generate)
        log.info(
            "generated %s key pair %r (id %s) on PKCS#11 token %r",
            alg,
            created.ref["label"],
            created.ref["id"],
            self.token_label,
        )
        return created

    async def public_key(self, ref: Mapping[str, str]) -> bytes:
        label, key_id = self._ref(ref)
        what = f"reading the public key {label!r}"

        def read(opened: _SignerSession) -> bytes:
            found = _keys(opened.session, ObjectClass.PUBLIC_KEY, label, key_id)
            if len(found) != 1:
                raise BackendDenied(
                    f"{what}: token {self.token_label!r} holds {len(found) or 'no'} public "
                    f"key(s) labelled {label!r} with id {key_id.hex()}",
                    "the key was retired or destroyed, or the record was tampered",
                )
            return _public_pem(found[0], what)

        return await self._call(what, read)

    async def sign(self, ref: Mapping[str, str], alg: str, data: bytes) -> bytes:
        spec = self._spec(alg, generating=False)
        label, key_id = self._ref(ref)
        if spec.hash_name is None:
            message = data
        else:
            message = hashlib.new(spec.hash_name, data).digest()
            if alg == "RS256":
                message = _SHA256_DIGEST_INFO + message
        what = f"signing with {alg} key {label!r}"

        def sign(opened: _SignerSession) -> bytes:
            key = self._signing_key(opened, label, key_id, spec, what)
            return self._step(
                what,
                "sign",
                lambda: key.sign(
                    message, mechanism=spec.sign, mechanism_param=spec.mechanism_param
                ),
            )

        signature = await self._call(what, sign)
        if len(signature) != spec.signature_bytes:  # not transient: retrying would not change it
            raise BackendDenied(
                f"{what}: the token returned a {len(signature)}-byte signature, not "
                f"{spec.signature_bytes}",
                "the key on the token is not of the algorithm the key record names",
            )
        return signature

    async def owned_keys(self, prefix: str) -> list[RemoteKey]:
        """Private keys labelled with the prefix's name: PKCS#11 cannot search by label prefix,
        so this reads the label of every private key the user can see (one call per key)."""
        start = self._names_for(prefix)
        what = f"listing the key pairs of {prefix!r}"

        def scan(opened: _SignerSession) -> list[RemoteKey]:
            objects = _find(opened.session, {Attribute.CLASS: ObjectClass.PRIVATE_KEY})
            owned = []
            for obj in objects:
                attrs = obj.get_attributes([Attribute.LABEL, Attribute.ID])
                label, key_id = attrs.get(Attribute.LABEL), attrs.get(Attribute.ID)
                if isinstance(label, str) and label.startswith(start) and key_id:
                    ref = {"label": label, "id": bytes(key_id).hex()}
                    owned.append(RemoteKey(ref, b"", _created_at(label[len(start) :])))
            return owned

        return await self._call(what, scan)

    async def retire(self, ref: Mapping[str, str]) -> None:
        """Destroy both halves now (idempotent: a key already gone is not an error)."""
        label, key_id = self._ref(ref)
        what = f"destroying the key pair {label!r}"

        def destroy(opened: _SignerSession) -> int:
            opened.keys.pop((label, key_id), None)
            # The public half first: see the module docstring.
            found = [
                *_keys(opened.session, ObjectClass.PUBLIC_KEY, label, key_id),
                *_keys(opened.session, ObjectClass.PRIVATE_KEY, label, key_id),
            ]
            for obj in found:
                obj.destroy()
            return len(found)

        destroyed = await self._call(what, destroy)
        log.info(
            "retired key pair %r (id %s) on PKCS#11 token %r: %d object(s) destroyed",
            label,
            key_id.hex(),
            self.token_label,
            destroyed,
        )

    def describe(self) -> str:
        return (
            f"PKCS#11 token {self.token_label}, one key pair per rotation "
            f"({self.key_label_prefix}-*)"
        )

    def __repr__(self) -> str:
        return (
            f"Pkcs11Signer(module={self.module!r}, token_label={self.token_label!r}, "
            f"key_label_prefix={self.key_label_prefix!r})"
        )

    # ---- on the token ------------------------------------------------------------------------

    def _read_write(self) -> bool:
        return True

    def _check_mechanisms(self, mechanisms: frozenset[Mechanism]) -> None:
        self._mechanisms = mechanisms  # what supports() answers from

    def _prepare(self, session: Session) -> _SignerSession:
        return _SignerSession(session)

    def _names_for(self, prefix: str) -> str:
        """The start of the label of every key of the cluster `prefix`."""
        return f"{self.key_label_prefix}-{hashlib.sha256(prefix.encode()).hexdigest()[:8]}-"

    def _spec(self, alg: str, *, generating: bool) -> _Alg:
        if alg not in _ALGS or (generating and not self.supports(alg)):
            raise BackendConfigError(
                f"keys.algorithm: PKCS#11 token {self.token_label!r} cannot hold {alg} keys",
                f"choose one of {', '.join(a for a in _ALGS if self.supports(a))}",
            )
        return _ALGS[alg]

    def _ref(self, ref: Mapping[str, str]) -> tuple[str, bytes]:
        label, key_hex = ref.get("label"), ref.get("id")
        if not isinstance(label, str) or not label.startswith(f"{self.key_label_prefix}-"):
            raise BackendDenied(
                f"remote key {label!r} is not one of this agent's PKCS#11 keys",
                "backend.key_label_prefix must match the one the key set was created with",
            )
        if not isinstance(key_hex, str) or not _KEY_ID_HEX.fullmatch(key_hex):
            raise BackendDenied(f"remote key {label!r}: the key id is not 32 lowercase hex digits")
        return label, bytes.fromhex(key_hex)

    def _signing_key(
        self, opened: _SignerSession, label: str, key_id: bytes, spec: _Alg, what: str
    ) -> SignMixin:
        """The private key `label`/`key_id` names, from the cache if its handle still is it."""
        key = opened.keys.get((label, key_id))
        if key is None or not _is_private_key(key, label, key_id):
            opened.keys.pop((label, key_id), None)
            found = _keys(opened.session, ObjectClass.PRIVATE_KEY, label, key_id)
            if len(found) != 1 or not isinstance(found[0], SignMixin):
                raise BackendDenied(
                    f"{what}: token {self.token_label!r} holds "
                    f"{'no' if not found else len(found)} private key(s) allowed to sign "
                    f"labelled {label!r} with id {key_id.hex()}",
                    "the key was retired or destroyed (or the record was tampered); the next "
                    "rotation replaces it",
                )
            key = opened.keys[(label, key_id)] = found[0]
        if key.key_type != spec.key_type:
            raise BackendDenied(
                f"{what}: key {label!r} is a {key.key_type.name} key",
                "the key record names another algorithm than the key on the token",
            )
        return key


def _generate_pair(
    session: Session, spec: _Alg, label: str, key_id: bytes
) -> tuple[PublicKey, PrivateKey]:
    """C_GenerateKeyPair: the private half never leaves the token and may only sign."""
    public_template: dict[Attribute, Any] = {Attribute.TOKEN: True, Attribute.PRIVATE: False}
    if spec.ec_params is not None:
        public_template[Attribute.EC_PARAMS] = spec.ec_params
    return session.generate_keypair(
        spec.key_type,
        RSA_BITS if spec.key_type == KeyType.RSA else None,
        id=key_id,
        label=label,
        store=True,
        mechanism=spec.generate,
        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
        public_template=public_template,
        private_template={
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
        },
    )


def _keys(session: Session, object_class: ObjectClass, label: str, key_id: bytes) -> list[Any]:
    return _find(
        session, {Attribute.CLASS: object_class, Attribute.LABEL: label, Attribute.ID: key_id}
    )


def _find(session: Session, template: Mapping[Attribute, Any]) -> list[Any]:
    """The objects matching `template`, after `_check_session` (so an empty answer means none)."""
    _check_session(session)
    return list(session.get_objects(dict(template)))


def _check_session(session: Session) -> None:
    """Raise if the session is unusable or the process has lost its login (another client closed
    its logged-in session): searches then silently miss every private object. Creating a private
    session object needs both (~15 us on SoftHSM). It also keeps a broken session away from
    C_FindObjectsInit, whose failure python-pkcs11 reports again from a finaliser.
    A token that refuses the probe object for any other reason cannot be asked: carry on."""
    template = {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.TOKEN: False,
        Attribute.PRIVATE: True,
        Attribute.LABEL: "keyquorum-login-probe",
    }
    try:
        probe = session.create_object(template)
    except _SESSION_LOST:
        raise  # translated as transient: the next attempt opens a session and logs in
    except p11.PKCS11Error as exc:
        log.debug("PKCS#11 session probe refused (%s); assuming logged in", type(exc).__name__)
        return
    probe.destroy()


def _is_private_key(key: Object, label: str, key_id: bytes) -> bool:
    """Whether a cached handle still names this key: it fails once the key is destroyed, and
    some HSMs hand a destroyed object's handle to the next object created."""
    try:
        attrs = key.get_attributes([Attribute.CLASS, Attribute.LABEL, Attribute.ID])
    except (p11.ObjectHandleInvalid, p11.KeyHandleInvalid):
        return False
    return attrs == {
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        Attribute.LABEL: label,
        Attribute.ID: key_id,
    }


def _public_pem(public: Object, what: str) -> bytes:
    """The public key object as PEM (SubjectPublicKeyInfo), or BackendDenied."""
    key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
    try:
        key_type = public[Attribute.KEY_TYPE]
        if key_type == KeyType.RSA:
            attrs = public.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
            key = rsa.RSAPublicNumbers(
                int.from_bytes(attrs[Attribute.PUBLIC_EXPONENT], "big"),
                int.from_bytes(attrs[Attribute.MODULUS], "big"),
            ).public_key()
        elif key_type in (KeyType.EC, KeyType.EC_EDWARDS):
            attrs = public.get_attributes([Attribute.EC_PARAMS, Attribute.EC_POINT])
            curve, raw_length = _CURVES[bytes(attrs[Attribute.EC_PARAMS])]
            point = bytes(attrs[Attribute.EC_POINT])
            # CKA_EC_POINT is a DER OCTET STRING (SoftHSM); some tokens give the raw point.
            if len(point) == raw_length + 2 and point[:2] == bytes([4, raw_length]):
                point = point[2:]
            if curve is None:
                key = ed25519.Ed25519PublicKey.from_public_bytes(point)
            else:
                key = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        else:
            raise ValueError(f"key type {key_type!r}")
    except (KeyError, ValueError) as exc:
        raise BackendDenied(
            f"{what}: the token's public key is not one this agent can use ({exc})"
        ) from None
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _created_at(suffix: str) -> int | None:
    """The ms the label suffix `<12 hex ms>-<random>` records (None for any other suffix)."""
    stamp, dash, _ = suffix.partition("-")
    return int(stamp, 16) if dash and _STAMP_HEX.fullmatch(stamp) else None


# ---- shared helpers and the one place errors are translated ------------------------------------


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
    if isinstance(exc, _READ_ONLY_ERRORS):
        return BackendDenied(
            f"{what}: the token refuses to create or destroy objects ({name})",
            "the agent needs a read-write token and its user (CKU_USER) login: check the "
            "token's write protection and the HSM's role for that user",
        )
    if stage in ("generate", "sign") and isinstance(exc, _MECHANISM_ERRORS + _TEMPLATE_ERRORS):
        doing = "generate" if stage == "generate" else "sign with"
        return BackendConfigError(
            f"keys.algorithm: {what}: the token cannot {doing} this kind of key ({name})",
            "choose a keys.algorithm the token supports (ES256 works on most HSMs)",
        )
    if stage == "generate" and isinstance(exc, p11.DeviceMemory):
        return BackendDenied(
            f"{what}: the token has no room for another key pair ({name})",
            "free space on the token (objects of clusters that no longer exist?)",
        )
    if isinstance(exc, _MECHANISM_ERRORS):
        return BackendConfigError(
            f"backend.key_label: {what}: the key cannot do CKM_AES_GCM ({name})",
            "use an AES-256 key on a token that supports AES-GCM with a 96-bit IV",
        )
    # Anything else (DeviceError, DeviceRemoved, SessionHandleInvalid, UserNotLoggedIn, an
    # invalidated object handle, a token that vanished, GeneralError outside a decrypt) is treated
    # as transient: the session is dropped and the next attempt opens a new one (where a key that
    # was destroyed meanwhile is then not found: BackendDenied).
    return BackendUnavailable(
        f"{what}: {name}",
        "the token may have been removed or reset, or the HSM is unreachable; the call is "
        "retried with a fresh session",
    )


# ---- options ---------------------------------------------------------------------------------


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


def _refuse_unknown(options: Mapping[str, Any], known: frozenset[str], mode: str) -> None:
    unknown = set(options) - known
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for kind 'pkcs11'{mode}",
            f"the pkcs11 backend{mode} takes {', '.join(sorted(known))}",
        )


@dataclass(frozen=True, slots=True)
class _TokenSettings:
    """The settings every PKCS#11 client needs, checked; the PIN stays out of repr."""

    module: str
    token_label: str
    pin: str = field(repr=False)
    pin_setting: str
    policy: CallPolicy


def _token_settings(options: Mapping[str, Any]) -> _TokenSettings:
    module = _text(options, "module", "set it to the PKCS#11 library's path")
    token_label = _text(options, "token_label", "set it to the token's label")
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
    return _TokenSettings(module, token_label, pin, pin_setting, CallPolicy.from_options(options))


def _connected(client: _TokenClient[Any]) -> None:
    try:
        client.connect()
    except BackendUnavailable as exc:
        log.warning("%s; the session is opened on first use", exc)


def build(options: Mapping[str, Any]) -> Pkcs11Wrapper:
    """The registry's constructor; see the module docstring for what each option does."""
    _refuse_unknown(options, _OPTIONS, "")
    key_label = _text(options, "key_label", "set it to the label of the AES-256 wrapping key")
    create_key = options.get("create_key", False)
    if not isinstance(create_key, bool):
        raise BackendConfigError(
            f"backend.create_key: must be true or false, not {create_key!r}",
            "write create_key = true (create the key when missing) or false",
        )
    settings = _token_settings(options)
    wrapper = Pkcs11Wrapper(
        _load_module(settings.module),
        module=settings.module,
        token_label=settings.token_label,
        pin=settings.pin,
        pin_setting=settings.pin_setting,
        key_label=key_label,
        create_key=create_key,
        policy=settings.policy,
    )
    _connected(wrapper)
    return wrapper


def build_signer(options: Mapping[str, Any]) -> Pkcs11Signer:
    """The registry's constructor for backend.mode = "remote" (options: module docstring)."""
    for name in ("key_label", "create_key"):
        if name in options:
            raise BackendConfigError(
                f"backend.{name}: not used with mode = 'remote' (the leader generates a key "
                "pair on the token per rotation)",
                "set backend.key_label_prefix instead, or use mode = 'wrap' to wrap keys under "
                "an AES key on the token",
            )
    _refuse_unknown(options, _SIGNER_OPTIONS, " in mode 'remote'")
    key_label_prefix = options.get("key_label_prefix", "keyquorum")
    if not isinstance(key_label_prefix, str) or not _LABEL_PREFIX.fullmatch(key_label_prefix):
        raise BackendConfigError(
            f"backend.key_label_prefix: {key_label_prefix!r} must be 1 to 64 letters, digits, "
            "'.', '_' or '-'",
            "the key labels are <key_label_prefix>-<cluster hash>-<time>-<random>",
        )
    settings = _token_settings(options)
    signer = Pkcs11Signer(
        _load_module(settings.module),
        module=settings.module,
        token_label=settings.token_label,
        pin=settings.pin,
        pin_setting=settings.pin_setting,
        key_label_prefix=key_label_prefix,
        policy=settings.policy,
    )
    _connected(signer)
    return signer
