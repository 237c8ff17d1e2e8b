"""HashiCorp Vault / OpenBao transit key wrapper, over the HTTP API with httpx (no SDK needed).

Data keys are encrypted with `transit/encrypt/<key>` under an AES-256-GCM transit key, with the
kid and cluster prefix as `associated_data`, so transit refuses to decrypt a data key presented
for another record. Transit ciphertexts name their key version (`vault:v3:...`): after the
transit key is rotated, older records still decrypt as long as `min_decryption_version` allows.

The token comes from `token_file` (re-read on every call, so a Vault Agent sidecar may renew it),
else the VAULT_TOKEN / BAO_TOKEN environment variable; a literal `token` setting is accepted for
tests but discouraged. A client lives for one operation: unwrapping happens once per key per
node, and nothing is left open between rotations.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import os
import re
import secrets
import ssl
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.crypto import b64url_decode
from backends.base import (
    BackendConfigError,
    BackendDenied,
    BackendError,
    BackendUnavailable,
    RemoteKey,
)
from backends.calls import CallPolicy, retry
from backends.envelope import associated_data

_OPTIONS = frozenset(
    {
        "address",
        "token",
        "token_file",
        "mount",
        "key_name",
        "namespace",
        "ca_file",
        "timeout",
        "attempt_timeout",
    }
)
_TOKEN_ENV = ("VAULT_TOKEN", "BAO_TOKEN")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class VaultTransitWrapper:
    """Wraps data keys with a Vault/OpenBao transit key (aes256-gcm96)."""

    kind = "vault-transit"

    def __init__(
        self,
        address: str,
        key_name: str,
        policy: CallPolicy,
        *,
        mount: str = "transit",
        namespace: str | None = None,
        token: str | None = None,
        token_file: Path | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.address = address.rstrip("/")
        self.key_name = key_name
        self.mount = mount.strip("/")
        self.namespace = namespace
        self.policy = policy
        self._token = token
        self._token_file = token_file
        self._verify = verify
        self._key_checked = False

    async def wrap_data_key(self, data_key: bytes, context: Mapping[str, str]) -> dict[str, str]:
        if not self._key_checked:
            await self._check_key()
        body = {"plaintext": _b64(data_key), "associated_data": _b64(associated_data(context))}
        data = await self._post("encrypt", body, wrapping=True)
        ciphertext = data.get("ciphertext")
        if not isinstance(ciphertext, str) or not ciphertext.startswith("vault:v"):
            raise BackendUnavailable(f"transit encrypt with {self.key_name}: no ciphertext")
        return {"key_name": self.key_name, "ciphertext": ciphertext}

    async def unwrap_data_key(
        self, wrapped: Mapping[str, str], context: Mapping[str, str]
    ) -> bytes:
        kid = context.get("keyquorum:kid", "?")
        key_name, ciphertext = wrapped.get("key_name"), wrapped.get("ciphertext")
        if not isinstance(ciphertext, str) or not ciphertext.startswith("vault:v"):
            raise BackendDenied(f"the wrapped data key of {kid} is not a transit ciphertext")
        if key_name != self.key_name:
            raise BackendDenied(
                f"the data key of {kid} was wrapped by transit key {key_name!r} but this agent "
                f"is configured with {self.key_name!r}",
                "set backend.key_name to the transit key that protected the key set",
            )
        body = {"ciphertext": ciphertext, "associated_data": _b64(associated_data(context))}
        data = await self._post("decrypt", body, wrapping=False, kid=kid)
        try:
            plaintext = base64.b64decode(str(data["plaintext"]), validate=True)
        except (KeyError, ValueError):
            raise BackendDenied(f"transit decrypt of {kid} returned no plaintext") from None
        if len(plaintext) != 32:
            raise BackendDenied(f"transit decrypt of {kid} returned no 32-byte data key")
        return plaintext

    async def _check_key(self) -> None:
        """Refuse to wrap under a transit key that does not exist yet: transit's encrypt would
        silently create one (an "upsert") if the token may, so a typo in key_name would start
        a second, unnoticed key. Tokens without read access on the key skip the check."""
        try:
            data = await self._request("GET", f"{self.mount}/keys/{self.key_name}", None, True)
        except BackendDenied:
            self._key_checked = True  # no read capability: least privilege, fine
            return
        key_type = data.get("type")
        if key_type not in ("aes256-gcm96", "aes128-gcm96", "chacha20-poly1305"):
            raise BackendConfigError(
                f"backend.key_name: transit key {self.mount}/{self.key_name} is of type "
                f"{key_type!r}, which cannot bind associated data",
                "create an aes256-gcm96 key: bao write -f transit/keys/NAME type=aes256-gcm96",
            )
        self._key_checked = True

    async def _post(
        self, operation: str, body: dict[str, str], *, wrapping: bool, kid: str = ""
    ) -> dict[str, Any]:
        path = f"{self.mount}/{operation}/{self.key_name}"
        return await self._request("POST", path, body, wrapping, kid=kid)

    async def _request(
        self,
        method: str,
        path: str,
        body: dict[str, str] | None,
        wrapping: bool,
        *,
        kid: str = "",
        missing_ok: bool = False,
    ) -> dict[str, Any]:
        what = f"{path}" + (f" of {kid}" if kid else "")

        async def attempt() -> dict[str, Any]:
            headers = {"X-Vault-Token": self._read_token()}
            if self.namespace:
                headers["X-Vault-Namespace"] = self.namespace
            timeout = httpx.Timeout(self.policy.attempt_timeout)
            try:
                async with httpx.AsyncClient(verify=self._verify, timeout=timeout) as client:
                    response = await client.request(
                        method, f"{self.address}/v1/{path}", json=body, headers=headers
                    )
            except httpx.TransportError as exc:
                raise BackendUnavailable(
                    f"{what}: cannot reach {self.address} ({type(exc).__name__})",
                    "is the Vault/OpenBao server up and reachable from this node?",
                ) from None
            if response.status_code == 204 or (missing_ok and response.status_code == 404):
                return {}
            if response.status_code == 200:
                try:
                    data = response.json()["data"]
                except (ValueError, KeyError, TypeError):
                    raise BackendUnavailable(f"{what}: the server's answer is not JSON") from None
                if not isinstance(data, dict):
                    raise BackendUnavailable(f"{what}: the server's answer has no data")
                return data
            raise _translate(response, what, path, wrapping=wrapping)

        return await retry(attempt, what=what, policy=self.policy)

    def _read_token(self) -> str:
        if self._token_file is not None:
            return _read_token_file(self._token_file)
        if self._token:
            return self._token
        for name in _TOKEN_ENV:
            if os.environ.get(name):
                return os.environ[name]
        raise BackendConfigError(
            "vault-transit: no token (backend.token_file unset and VAULT_TOKEN empty)",
            "set backend.token_file to a file holding the agent's Vault token",
        )

    def describe(self) -> str:
        return f"Vault transit key {self.mount}/{self.key_name} at {self.address}"

    def __repr__(self) -> str:
        return f"VaultTransitWrapper(address={self.address!r}, key={self.mount}/{self.key_name})"


def _translate(response: httpx.Response, what: str, path: str, *, wrapping: bool) -> BackendError:
    """One place mapping Vault's HTTP answers to the backend error hierarchy."""
    status = response.status_code
    try:
        errors = "; ".join(str(e) for e in response.json().get("errors", []))
    except (ValueError, AttributeError):
        errors = ""
    detail = errors or response.reason_phrase
    if status == 403:
        return BackendDenied(
            f"{what}: permission denied ({detail})",
            f'give the agent\'s token a policy with path "{path}" '
            f'{{ capabilities = ["{"read" if path.split("/")[-2] == "keys" else "update"}"] }}',
        )
    if status == 404:
        if wrapping:
            return BackendConfigError(
                f"{what}: no such transit key or mount ({detail})",
                "check backend.mount and backend.key_name, or create the key: "
                "bao write -f transit/keys/NAME type=aes256-gcm96",
            )
        return BackendDenied(f"{what}: the transit key that wrapped this data key is gone")
    if status == 400:
        lowered = detail.lower()
        if "authentication failed" in lowered or "invalid ciphertext" in lowered:
            return BackendDenied(
                f"{what}: transit refused the ciphertext (tampered, or wrapped for another kid "
                "or cluster prefix)"
            )
        if "too old" in lowered or "min_decryption_version" in lowered or "archived" in lowered:
            return BackendDenied(
                f"{what}: {detail}",
                "lower the transit key's min_decryption_version to decrypt older key versions",
            )
        if wrapping:
            return BackendConfigError(
                f"{what}: {detail}",
                "the transit key must be of type aes256-gcm96 (associated data needs AES-GCM)",
            )
        return BackendDenied(f"{what}: transit refused the ciphertext ({detail})")
    if status in (429, 473) or status >= 500:  # 503: sealed or standby; 473: perf standby
        return BackendUnavailable(f"{what}: server answered {status} ({detail})")
    return BackendDenied(f"{what}: server answered {status} ({detail})")


def _read_token_file(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise BackendConfigError(
            f"backend.token_file: cannot open {path}: {exc.strerror}"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & 0o077:
            raise BackendConfigError(
                f"backend.token_file: {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(mode):04o})",
                f"run: chmod 600 {path}",
            )
        token = os.read(fd, 4096).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if not token:
        raise BackendConfigError(f"backend.token_file: {path} is empty")
    return token


def _tls(ca_file: str | None) -> ssl.SSLContext:
    """Built once: loading a CA bundle takes ~20 ms, too slow to repeat per call."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise BackendConfigError(f"backend.ca_file: cannot load {ca_file}: {exc}") from None


def build(options: Mapping[str, Any]) -> VaultTransitWrapper:
    """Options: address, key_name (required); mount, namespace, token_file / token, ca_file,
    timeout, attempt_timeout."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for kind 'vault-transit'",
            f"the vault-transit backend takes {', '.join(sorted(_OPTIONS))}",
        )
    for name in ("address", "key_name"):
        if not isinstance(options.get(name), str) or not options[name]:
            raise BackendConfigError(f"backend.{name}: required for kind 'vault-transit'")
    address = str(options["address"])
    if not address.startswith(("http://", "https://")):
        raise BackendConfigError(
            f"backend.address: {address!r} is not an http(s) URL", "e.g. https://vault:8200"
        )
    for name in ("mount", "namespace", "token", "token_file", "ca_file"):
        if name in options and (not isinstance(options[name], str) or not options[name]):
            raise BackendConfigError(f"backend.{name}: must be a non-empty string")
    if "token" in options and "token_file" in options:
        raise BackendConfigError(
            "backend.token and backend.token_file are both set", "keep only token_file"
        )
    token_file = Path(options["token_file"]) if "token_file" in options else None
    if token_file is not None:
        _read_token_file(token_file)  # fail at start-up, not at the first rotation
    return VaultTransitWrapper(
        address,
        str(options["key_name"]),
        CallPolicy.from_options(options),
        mount=str(options.get("mount", "transit")),
        namespace=options.get("namespace"),
        token=options.get("token"),
        token_file=token_file,
        verify=_tls(options.get("ca_file")),
    )


# ---- remote signing: one transit key per rotation (backend.mode = "remote") ------------------

# JWS alg -> (transit key type, sign request parameters, how the signature is encoded)
_TRANSIT_TYPES: dict[str, tuple[str, dict[str, str]]] = {
    "ES256": ("ecdsa-p256", {"hash_algorithm": "sha2-256", "marshaling_algorithm": "jws"}),
    "ES384": ("ecdsa-p384", {"hash_algorithm": "sha2-384", "marshaling_algorithm": "jws"}),
    "EdDSA": ("ed25519", {}),
    "RS256": ("rsa-2048", {"hash_algorithm": "sha2-256", "signature_algorithm": "pkcs1v15"}),
    "PS256": (
        "rsa-2048",
        {"hash_algorithm": "sha2-256", "signature_algorithm": "pss", "salt_length": "hash"},
    ),
}
_SIGNER_OPTIONS = frozenset(
    {
        "address",
        "token",
        "token_file",
        "mount",
        "key_name_prefix",
        "namespace",
        "ca_file",
        "timeout",
        "attempt_timeout",
    }
)


class VaultTransitSigner(VaultTransitWrapper):
    """Creates a non-exportable transit key per rotation and signs with transit/sign.

    Keys are named `<key_name_prefix>-<8 hex of the cluster prefix's SHA-256>-<random>`, so one
    LIST finds every key of this cluster. Vault/OpenBao have no scheduled deletion: `retire`
    enables deletion on the key and deletes it (the key set no longer names it, and nothing it
    signed can still be valid).
    """

    kind = "vault-transit"

    def __init__(self, address: str, key_name_prefix: str, policy: CallPolicy, **kw: Any) -> None:
        super().__init__(address, key_name_prefix, policy, **kw)
        self.key_name_prefix = key_name_prefix

    def supports(self, alg: str) -> bool:
        return alg in _TRANSIT_TYPES

    def _names_for(self, prefix: str) -> str:
        return f"{self.key_name_prefix}-{hashlib.sha256(prefix.encode()).hexdigest()[:8]}-"

    async def create_key(self, alg: str, prefix: str) -> RemoteKey:
        name = self._names_for(prefix) + secrets.token_hex(6)
        key_type = _TRANSIT_TYPES[alg][0]
        await self._request(
            "POST", f"{self.mount}/keys/{name}", {"type": key_type, "exportable": "false"}, False
        )
        ref = {"key_name": name}
        pem, created = await self._public(name)
        return RemoteKey(ref, pem, created)

    async def _public(self, name: str) -> tuple[bytes, int | None]:
        data = await self._request("GET", f"{self.mount}/keys/{name}", None, False)
        versions = data.get("keys")
        first = versions.get("1") if isinstance(versions, dict) else None
        if not isinstance(first, dict) or not isinstance(first.get("public_key"), str):
            raise BackendDenied(f"transit key {self.mount}/{name} has no public key")
        created = None
        stamp = first.get("creation_time")
        if isinstance(stamp, str):
            with contextlib.suppress(ValueError):
                created = int(datetime.datetime.fromisoformat(stamp).timestamp() * 1000)
        public = first["public_key"]
        if not public.startswith("-----BEGIN"):  # ed25519 keys come as base64 of the raw key
            try:
                raw = base64.b64decode(public, validate=True)
                key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
            except ValueError:
                raise BackendDenied(f"transit key {name}: unreadable public key") from None
            public = key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode()
        return public.encode(), created

    async def public_key(self, ref: Mapping[str, str]) -> bytes:
        return (await self._public(self._ref_name(ref)))[0]

    def _ref_name(self, ref: Mapping[str, str]) -> str:
        name = ref.get("key_name", "")
        if not name.startswith(f"{self.key_name_prefix}-") or "/" in name:
            raise BackendDenied(
                f"remote key {name!r} is not one of this agent's transit keys",
                "backend.key_name_prefix must match the one the key set was created with",
            )
        return name

    async def sign(self, ref: Mapping[str, str], alg: str, data: bytes) -> bytes:
        name = self._ref_name(ref)
        body = {"input": _b64(data), **_TRANSIT_TYPES[alg][1]}
        answer = await self._request("POST", f"{self.mount}/sign/{name}", body, False)
        signature = answer.get("signature")
        if not isinstance(signature, str) or not signature.startswith("vault:v"):
            raise BackendUnavailable(f"transit sign with {name}: no signature in the answer")
        encoded = signature.split(":", 2)[2]
        try:
            if alg in ("ES256", "ES384"):  # marshaling_algorithm=jws: base64url r||s
                return b64url_decode(encoded)
            return base64.b64decode(encoded, validate=True)
        except ValueError:
            raise BackendUnavailable(f"transit sign with {name}: undecodable signature") from None

    async def owned_keys(self, prefix: str) -> list[RemoteKey]:
        start = self._names_for(prefix)
        listing = await self._request(  # 404: no keys on the mount yet
            "GET", f"{self.mount}/keys?list=true", None, False, missing_ok=True
        )
        names = [n for n in listing.get("keys", []) if isinstance(n, str) and n.startswith(start)]
        owned = []
        for name in names:
            _, created = await self._public(name)
            owned.append(RemoteKey({"key_name": name}, b"", created))
        return owned

    async def retire(self, ref: Mapping[str, str]) -> None:
        name = self._ref_name(ref)
        await self._request(
            "POST", f"{self.mount}/keys/{name}/config", {"deletion_allowed": "true"}, False
        )
        await self._request("DELETE", f"{self.mount}/keys/{name}", None, False)

    def describe(self) -> str:
        return (
            f"Vault transit at {self.address}, one key per rotation "
            f"({self.mount}/{self.key_name_prefix}-*)"
        )

    def __repr__(self) -> str:
        return f"VaultTransitSigner(address={self.address!r}, mount={self.mount!r})"


def build_signer(options: Mapping[str, Any]) -> VaultTransitSigner:
    """Options: address (required), key_name_prefix (default "keyquorum"), mount, namespace,
    token_file / token, ca_file, timeout, attempt_timeout."""
    if "key_name" in options:
        raise BackendConfigError(
            "backend.key_name: not used with mode = 'remote' (the leader creates a transit key "
            "per rotation)",
            "set backend.key_name_prefix instead, or use mode = 'wrap'",
        )
    unknown = set(options) - _SIGNER_OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for remote vault-transit",
            f"remote vault-transit takes {', '.join(sorted(_SIGNER_OPTIONS))}",
        )
    key_name_prefix = options.get("key_name_prefix", "keyquorum")
    if not isinstance(key_name_prefix, str) or not re.fullmatch(
        r"[A-Za-z0-9_.-]+", key_name_prefix
    ):
        raise BackendConfigError(
            f"backend.key_name_prefix: {key_name_prefix!r} must be letters, digits, '.', '_' or '-'"
        )
    wrapper = build(
        {
            **{k: v for k, v in options.items() if k != "key_name_prefix"},
            "key_name": key_name_prefix,
        }
    )
    return VaultTransitSigner(
        wrapper.address,
        key_name_prefix,
        wrapper.policy,
        mount=wrapper.mount,
        namespace=wrapper.namespace,
        token=wrapper._token,
        token_file=wrapper._token_file,
        verify=wrapper._verify,
    )
