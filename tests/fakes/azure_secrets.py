"""A FAKE Azure Key Vault with secrets, for the azure-keyvault-secrets SDK: the keys fake
(tests/fakes/azure_keyvault.py: TLS on 127.0.0.1, challenge auth, the same switches `outage`,
`fail_next`, `forbidden`, `deny` and `stop`) plus the secrets endpoints backends/azure_secrets.py
uses, in Key Vault's REST shapes:

- PUT /secrets/{name} ({"value", "contentType"?, "attributes"?, "tags"?}) adds a version (the
  first one creates the secret) and answers a SecretBundle {"value", "id", "contentType",
  "attributes", "tags"?}; permission secrets/set.
- GET /secrets/{name}/{version} (or without a version: the newest) answers the SecretBundle; a
  disabled version is refused with 403 and innererror SecretDisabled, like the service;
  secrets/get.
- GET /secrets/{name}/versions answers SecretItems {"id", "attributes", "tags"?, "contentType"}
  paged with nextLink, ordered by version id (the service's order is not creation order);
  secrets/list.
- PATCH /secrets/{name}/{version} ({"attributes"?: {"enabled"}, "tags"?, "contentType"?})
  updates a version, a disabled one included; "tags" replaces the version's tags whole, as on
  the service; answers the SecretBundle without its value; secrets/set.

Fidelity gaps: no deleting, recovering, backing up or listing secrets; no expiry or not-before;
a list of versions of a secret that does not exist answers 404 SecretNotFound (not checked
against the service); `created`/`updated` are real time in whole seconds, and `set_times` lets a
test order versions created within one second.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fakes.azure_keyvault import NAME, FakeKeyVault, _Error, bad_request, disabled


@dataclass
class _SecretVersion:
    version: str
    value: str
    content_type: str | None
    created: int
    updated: int
    enabled: bool = True
    tags: dict[str, str] = field(default_factory=dict)


class FakeSecretVault(FakeKeyVault):
    """A key vault with secrets on https://127.0.0.1:<port>; a context manager like its base."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: dict[str, list[_SecretVersion]] = {}

    # -- for tests -------------------------------------------------------------------------
    def secret_versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of a secret in creation order, as {"version", "value", "enabled",
        "tags", "content_type"} (what a test inspects)."""
        with self._lock:
            return [
                {
                    "version": v.version,
                    "value": v.value,
                    "enabled": v.enabled,
                    "tags": dict(v.tags),
                    "content_type": v.content_type,
                }
                for v in self._secrets.get(name, [])
            ]

    def set_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        with self._lock:
            self._secret(name, version).tags = dict(tags)

    def set_times(self, name: str, version: str, *, created: int, updated: int) -> None:
        with self._lock:
            found = self._secret(name, version)
            found.created, found.updated = created, updated

    def secret_id(self, name: str, version: str) -> str:
        return f"{self.vault_url}/secrets/{name}/{version}"

    # -- routes ----------------------------------------------------------------------------
    def _route(
        self, method: str, parts: list[str], query: dict[str, str], request: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        if not parts or parts[0] != "secrets":
            return super()._route(method, parts, query, request)
        path = "/" + "/".join(parts)
        if method == "PUT" and len(parts) == 2:
            self._permit("secrets/set")
            return 200, self._set(parts[1], request)
        if method == "GET" and len(parts) == 3 and parts[2] == "versions":
            self._permit("secrets/list")
            if parts[1] not in self._secrets:
                self._secret(parts[1], "")  # raises SecretNotFound
            versions = sorted(self._secrets[parts[1]], key=lambda v: v.version)
            items = [self._secret_item(parts[1], v) for v in versions]
            return 200, self._page(items, path, query)
        if method == "GET" and len(parts) in (2, 3):
            self._permit("secrets/get")
            found = self._secret(parts[1], parts[2] if len(parts) == 3 else "")
            if not found.enabled:
                raise disabled("get", "secret")
            return 200, self._secret_bundle(parts[1], found, with_value=True)
        if method == "PATCH" and len(parts) == 3:
            self._permit("secrets/set")
            found = self._secret(parts[1], parts[2])
            return 200, self._update(parts[1], found, request)
        raise bad_request(f"Method {method} {path} is not supported by the fake.")

    def _secret(self, name: str, version: str) -> _SecretVersion:
        versions = self._secrets.get(name, [])
        if versions and not version:
            return versions[-1]
        for candidate in versions:
            if candidate.version == version:
                return candidate
        shown = f"{name}/{version}" if version else name
        raise _Error(
            404,
            "SecretNotFound",
            f"A secret with (name/id) {shown} was not found in this key vault. If you recently "
            "deleted this secret you may be able to recover it using the correct recovery "
            "command.",
        )

    def _set(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        if not NAME.fullmatch(name):
            raise bad_request(
                "The request URI contains an invalid name: names are 1-127 letters, digits and "
                "dashes."
            )
        value = request.get("value")
        if not isinstance(value, str):
            raise bad_request("Property value is required.")
        if len(value.encode()) > 25 * 1024:
            raise bad_request("Secret value is too large (at most 25 KiB).")
        attributes = request.get("attributes") or {}
        now = int(time.time())
        version = _SecretVersion(
            uuid.uuid4().hex,
            value,
            request.get("contentType"),
            now,
            now,
            enabled=attributes.get("enabled", True) is not False,
            tags={str(k): str(v) for k, v in (request.get("tags") or {}).items()},
        )
        self._secrets.setdefault(name, []).append(version)
        return self._secret_bundle(name, version, with_value=True)

    def _update(
        self, name: str, version: _SecretVersion, request: dict[str, Any]
    ) -> dict[str, Any]:
        attributes = request.get("attributes") or {}
        if "enabled" in attributes and attributes["enabled"] is not None:
            version.enabled = bool(attributes["enabled"])
        if request.get("tags") is not None:
            tags = request["tags"]
            if not isinstance(tags, dict) or len(tags) > 15:
                raise bad_request("Tags: an object of at most 15 tags.")
            version.tags = {str(k): str(v) for k, v in tags.items()}
        if request.get("contentType") is not None:
            version.content_type = str(request["contentType"])
        version.updated = max(version.updated, int(time.time()))
        return self._secret_bundle(name, version, with_value=False)

    def _secret_attributes(self, version: _SecretVersion) -> dict[str, Any]:
        return {
            "enabled": version.enabled,
            "created": version.created,
            "updated": version.updated,
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": 90,
        }

    def _secret_bundle(
        self, name: str, version: _SecretVersion, *, with_value: bool
    ) -> dict[str, Any]:
        bundle: dict[str, Any] = {
            "id": self.secret_id(name, version.version),
            "attributes": self._secret_attributes(version),
        }
        if with_value:
            bundle["value"] = version.value
        if version.content_type is not None:
            bundle["contentType"] = version.content_type
        if version.tags:
            bundle["tags"] = dict(version.tags)
        return bundle

    def _secret_item(self, name: str, version: _SecretVersion) -> dict[str, Any]:
        """A SecretItem of a list: the bundle without its value."""
        return self._secret_bundle(name, version, with_value=False)
