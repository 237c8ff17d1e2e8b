"""Vault / OpenBao KV version 2 secret store: each private key is one version of one secret.

Theory of operation, over the HTTP API with httpx (backends/vault.py's token and TLS handling):

- `add_version` writes `{mount}/data/{path}` with `options.cas` = the version this store last
  saw, so two leaders never overwrite each other's version. A stale cas (another writer came
  first) re-reads the current version and retries once; if the version that moved on holds our
  own value, our earlier attempt landed and only its answer was lost, and that version is
  returned. A second conflict fails with BackendDenied (someone else keeps writing the secret).
- Versions are read by number only (`?version=N`, never the latest); a deleted or destroyed
  version answers 404, which is BackendDenied.
- The `stable` label is `custom_metadata.stable = "N"` on `{mount}/metadata/{path}`, written
  read-merge-write so other custom metadata stays. `stable()` ignores a label naming a version
  that is deleted or destroyed, and `destroy` removes the label from the version it destroys.
- `destroy` is `{mount}/destroy/{path}` (the data is gone for good; idempotent).
- Vault keeps only `max_versions` versions of a key (the mount's setting, where 0 means 10)
  and silently drops the oldest. On first use the key's `max_versions` is raised to
  MAX_VERSIONS (1000: the key set names the newest few versions, so only 1000 newer versions,
  say from running `keyquorum backend check` in a loop, could drop a live key; each version's
  metadata is about 50 bytes of the key's one storage entry). A mount-level
  `delete_version_after` would still soft-delete versions after that time: leave it unset.
- The mount must be KV version 2; the first write checks it (sys/internal/ui/mounts) so a KV v1
  mount is refused rather than silently storing a key called "data/<path>".

Policy the agent's token needs (with the default mount and path "keyquorum/prod"):

    path "secret/data/keyquorum/prod"     { capabilities = ["create", "update", "read"] }
    path "secret/metadata/keyquorum/prod" { capabilities = ["create", "update", "read"] }
    path "secret/destroy/keyquorum/prod"  { capabilities = ["update"] }

The token comes from `token_file` (re-read on every call), else VAULT_TOKEN / BAO_TOKEN, or a
literal `token` (tests). An httpx client lives for one operation.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from backends.base import BackendConfigError, BackendDenied, BackendError, BackendUnavailable
from backends.calls import CallPolicy, retry
from backends.vault import _TOKEN_ENV, _read_token_file, _tls

KIND = "vault-kv"
STABLE = "stable"
MAX_VERSIONS = 1000
_OPTIONS = frozenset(
    {
        "address",
        "token",
        "token_file",
        "mount",
        "path",
        "namespace",
        "ca_file",
        "timeout",
        "attempt_timeout",
    }
)
_SEGMENTS = re.compile(r"[A-Za-z0-9_.@=+:-]+(/[A-Za-z0-9_.@=+:-]+)*")
_VERSION = re.compile(r"[1-9][0-9]{0,18}")


class _CasConflict(BackendDenied):
    """The check-and-set version was stale: another writer added a version first."""


class VaultKvStore:
    """Keeps keys as versions of one KV v2 secret; `stable` lives in its custom metadata."""

    kind = KIND

    def __init__(
        self,
        address: str,
        path: str,
        policy: CallPolicy,
        *,
        mount: str = "secret",
        namespace: str | None = None,
        token: str | None = None,
        token_file: Path | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.address = address.rstrip("/")
        self.path = path
        self.mount = mount
        self.namespace = namespace
        self.policy = policy
        self._token = token
        self._token_file = token_file
        self._verify = verify
        self._current: int | None = None  # the newest version this store knows of
        self._prepared = False  # KV v2 mount checked and max_versions raised

    @property
    def _data(self) -> str:
        return f"{self.mount}/data/{self.path}"

    @property
    def _metadata(self) -> str:
        return f"{self.mount}/metadata/{self.path}"

    async def add_version(self, value: bytes) -> dict[str, str]:
        encoded = base64.b64encode(value).decode()
        async with self._client() as http:
            current = self._current
            if current is None or not self._prepared:
                current = await self._prepare(http)
            for attempt in (1, 2):
                body = {"data": {"key": encoded}, "options": {"cas": current}}
                try:
                    written = await self._request(http, "POST", self._data, body)
                except _CasConflict:
                    # Re-read the current version (and raise max_versions again, should an
                    # operator have deleted and recreated the secret meanwhile).
                    current = await self._prepare(http)
                    if await self._holds(http, current, encoded):
                        return {"version": str(current)}  # our earlier attempt landed
                    if attempt == 2:
                        raise BackendDenied(
                            f"{self._data}: another writer added versions concurrently twice "
                            "in a row (check-and-set failed)",
                            "is a second keyquorum cluster or anything else writing this "
                            "secret? backend.path must be this cluster's own",
                        ) from None
                    continue
                version = written.get("version")
                if not isinstance(version, int) or version < 1:
                    raise BackendUnavailable(f"{self._data}: the answer names no version")
                self._current = version
                return {"version": str(version)}
        raise AssertionError("unreachable")  # pragma: no cover

    async def _prepare(self, http: httpx.AsyncClient) -> int:
        """Refuse a KV v1 mount; raise the key's max_versions so no live version is dropped.
        Returns (and remembers) the key's current version."""
        mount = await self._request(
            http, "GET", f"sys/internal/ui/mounts/{self.mount}", None, denied_ok=True
        )
        options = mount.get("options") or {}
        if mount and (mount.get("type") != "kv" or str(options.get("version")) != "2"):
            raise BackendConfigError(
                f"backend.mount: {self.mount} is a {mount.get('type')} engine (version "
                f"{options.get('version', '1')}), not KV version 2",
                f"enable KV v2 there: bao secrets enable -path={self.mount} kv-v2",
            )
        metadata = await self._read_metadata(http)
        self._current = _current_version(metadata)
        max_versions = metadata.get("max_versions", 0)
        if not isinstance(max_versions, int) or max_versions < MAX_VERSIONS:
            await self._request(http, "POST", self._metadata, {"max_versions": MAX_VERSIONS})
        self._prepared = True
        return self._current

    async def _holds(self, http: httpx.AsyncClient, version: int, encoded: str) -> bool:
        if version < 1:
            return False
        answer = await self._request(
            http, "GET", f"{self._data}?version={version}", None, missing_ok=True
        )
        data = answer.get("data")
        return isinstance(data, dict) and data.get("key") == encoded

    async def read(self, ref: Mapping[str, str]) -> bytes:
        version = _version_of(ref)
        async with self._client() as http:
            answer = await self._request(http, "GET", f"{self._data}?version={version}", None)
        metadata, data = answer.get("metadata"), answer.get("data")
        if not isinstance(metadata, dict) or str(metadata.get("version")) != version:
            raise BackendDenied(f"{self._data}: asked for version {version}, got another")
        encoded = data.get("key") if isinstance(data, dict) else None
        try:
            if not isinstance(encoded, str):
                raise ValueError("no key")
            return base64.b64decode(encoded, validate=True)
        except (ValueError, binascii.Error):
            raise BackendDenied(
                f"{self._data} version {version} holds no keyquorum value (no base64 'key')"
            ) from None

    async def set_stable(self, ref: Mapping[str, str]) -> None:
        version = _version_of(ref)
        async with self._client() as http:
            if not self._prepared:
                await self._prepare(http)
            metadata = await self._read_metadata(http)
            if not _usable(metadata, version):
                raise BackendDenied(
                    f"{self._data}: cannot label version {version} stable: it is deleted, "
                    "destroyed or was never written"
                )
            custom = _custom(metadata)
            if custom.get(STABLE) == version:
                return
            custom[STABLE] = version
            await self._request(http, "POST", self._metadata, {"custom_metadata": custom})

    async def stable(self) -> dict[str, str] | None:
        async with self._client() as http:
            metadata = await self._read_metadata(http)
        version = _custom(metadata).get(STABLE, "")
        if not _VERSION.fullmatch(version) or not _usable(metadata, version):
            return None
        return {"version": version}

    async def destroy(self, ref: Mapping[str, str]) -> None:
        version = _version_of(ref)
        async with self._client() as http:
            if not self._prepared:
                await self._prepare(http)
            await self._request(
                http,
                "PUT",
                f"{self.mount}/destroy/{self.path}",
                {"versions": [int(version)]},
                missing_ok=True,
            )
            metadata = await self._read_metadata(http)
            custom = _custom(metadata)
            if custom.get(STABLE) == version:
                del custom[STABLE]
                await self._request(http, "POST", self._metadata, {"custom_metadata": custom})

    async def _read_metadata(self, http: httpx.AsyncClient) -> dict[str, Any]:
        """The key's metadata; {} before the first version (or metadata) was written."""
        metadata = await self._request(http, "GET", self._metadata, None, missing_ok=True)
        if metadata and not isinstance(metadata.get("current_version"), int):
            raise BackendConfigError(
                f"backend.mount: {self._metadata} answers without KV v2 metadata",
                "backend.mount must name a KV version 2 engine",
            )
        return metadata

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[httpx.AsyncClient]:
        timeout = httpx.Timeout(self.policy.attempt_timeout)
        async with httpx.AsyncClient(verify=self._verify, timeout=timeout) as http:
            yield http

    async def _request(
        self,
        http: httpx.AsyncClient,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        missing_ok: bool = False,
        denied_ok: bool = False,
    ) -> dict[str, Any]:
        what = f"{method} {path}"

        async def attempt() -> dict[str, Any]:
            headers = {"X-Vault-Token": self._read_token()}
            if self.namespace:
                headers["X-Vault-Namespace"] = self.namespace
            try:
                response = await http.request(
                    method, f"{self.address}/v1/{path}", json=body, headers=headers
                )
            except httpx.TransportError as exc:
                raise BackendUnavailable(
                    f"{what}: cannot reach {self.address} ({type(exc).__name__})",
                    "is the Vault/OpenBao server up and reachable from this node?",
                ) from None
            status = response.status_code
            if status == 204 or (missing_ok and status == 404 and not _no_route(response)):
                return {}
            if denied_ok and status == 403:
                return {}
            if status == 200:
                try:
                    data = response.json()["data"]
                except (ValueError, KeyError, TypeError):
                    raise BackendUnavailable(f"{what}: the server's answer is not JSON") from None
                if not isinstance(data, dict):
                    raise BackendUnavailable(f"{what}: the server's answer has no data")
                return data
            raise _translate(response, what, method, path.split("?", 1)[0], self.mount)

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
            f"{KIND}: no token (backend.token_file unset and VAULT_TOKEN empty)",
            "set backend.token_file to a file holding the agent's Vault token",
        )

    def describe(self) -> str:
        return (
            f"Vault KV v2 secret {self.mount}/{self.path} at {self.address} (one version per key)"
        )

    def __repr__(self) -> str:
        return f"VaultKvStore(address={self.address!r}, secret={self.mount}/{self.path})"


def _current_version(metadata: Mapping[str, Any]) -> int:
    version = metadata.get("current_version", 0)
    return version if isinstance(version, int) else 0


def _custom(metadata: Mapping[str, Any]) -> dict[str, str]:
    custom = metadata.get("custom_metadata")
    return {str(k): str(v) for k, v in custom.items()} if isinstance(custom, dict) else {}


def _usable(metadata: Mapping[str, Any], version: str) -> bool:
    """Whether the metadata lists `version` as neither deleted nor destroyed."""
    versions = metadata.get("versions")
    entry = versions.get(version) if isinstance(versions, dict) else None
    return isinstance(entry, dict) and not entry.get("destroyed") and not entry.get("deletion_time")


def _version_of(ref: Mapping[str, str]) -> str:
    version = ref.get("version")
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise BackendDenied(f"the secret version reference {dict(ref)!r} names no KV version")
    return version


def _errors(response: httpx.Response) -> str:
    try:
        return "; ".join(str(e).strip() for e in response.json().get("errors", []))
    except (ValueError, AttributeError):
        return ""


def _no_route(response: httpx.Response) -> bool:
    return "no handler for route" in _errors(response)


_CAPABILITIES = {
    ("GET", "data"): ["read"],
    ("POST", "data"): ["create", "update"],
    ("GET", "metadata"): ["read"],
    ("POST", "metadata"): ["create", "update"],
    ("PUT", "destroy"): ["update"],
}


def _translate(
    response: httpx.Response, what: str, method: str, path: str, mount: str
) -> BackendError:
    """One place mapping Vault's HTTP answers to the backend error hierarchy."""
    status = response.status_code
    detail = _errors(response) or response.reason_phrase
    if status == 403:
        endpoint = path[len(mount) + 1 :].split("/", 1)[0] if path.startswith(mount) else ""
        capabilities = _CAPABILITIES.get((method, endpoint), ["read"])
        return BackendDenied(
            f"{what}: permission denied ({detail})",
            f'give the agent\'s token a policy with path "{path}" '
            f"{{ capabilities = {json.dumps(capabilities)} }}",
        )
    if status == 404:
        if "no handler for route" in detail:
            return BackendConfigError(
                f"{what}: no secrets engine mounted at {mount}",
                f"check backend.mount, or enable KV v2: bao secrets enable -path={mount} kv-v2",
            )
        return BackendDenied(
            f"{what}: no such version (deleted, destroyed, dropped past max_versions or never "
            "written)",
            "the key set names a version the KV store no longer has: restore it from a backup "
            "or let the key expire",
        )
    if status == 400:
        if "check-and-set" in detail:
            return _CasConflict(f"{what}: {detail}")
        return BackendDenied(f"{what}: the server refused the request ({detail})")
    if status in (429, 473) or status >= 500:  # 503: sealed or standby; 473: perf standby
        return BackendUnavailable(f"{what}: server answered {status} ({detail})")
    return BackendDenied(f"{what}: server answered {status} ({detail})")


def _segments(options: Mapping[str, Any], name: str, default: str | None) -> str:
    value = options.get(name, default)
    if (
        not isinstance(value, str)
        or not _SEGMENTS.fullmatch(value)
        or any(part in (".", "..") for part in value.split("/"))
    ):
        raise BackendConfigError(
            f"backend.{name}: {'required for kind vault-kv; ' if default is None else ''}"
            f"must be slash-separated names (letters, digits, _.@=+:-), not {value!r}",
            "e.g. mount = 'secret', path = 'keyquorum/prod'",
        )
    return value


def build_secret_store(options: Mapping[str, Any]) -> VaultKvStore:
    """Options: address, path (required); mount (default "secret"), namespace, token_file /
    token, ca_file, timeout, attempt_timeout."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for kind '{KIND}'",
            f"the {KIND} backend takes {', '.join(sorted(_OPTIONS))}",
        )
    address = options.get("address")
    if not isinstance(address, str) or not address:
        raise BackendConfigError(f"backend.address: required for kind '{KIND}'")
    if not address.startswith(("http://", "https://")):
        raise BackendConfigError(
            f"backend.address: {address!r} is not an http(s) URL", "e.g. https://vault:8200"
        )
    path = _segments(options, "path", None)
    mount = _segments(options, "mount", "secret")
    for name in ("namespace", "token", "token_file", "ca_file"):
        if name in options and (not isinstance(options[name], str) or not options[name]):
            raise BackendConfigError(f"backend.{name}: must be a non-empty string")
    if "token" in options and "token_file" in options:
        raise BackendConfigError(
            "backend.token and backend.token_file are both set", "keep only token_file"
        )
    token_file = Path(options["token_file"]) if "token_file" in options else None
    if token_file is not None:
        _read_token_file(token_file)  # fail at start-up, not at the first rotation
    return VaultKvStore(
        address,
        path,
        CallPolicy.from_options(options),
        mount=mount,
        namespace=options.get("namespace"),
        token=options.get("token"),
        token_file=token_file,
        verify=_tls(options.get("ca_file")),
    )
