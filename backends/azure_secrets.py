"""Azure Key Vault secrets as the secret store: each private key is a version of one secret.

Versions. `add_version` sets the secret (secrets/set; the first call creates it) to the base64
text of the value, with content type application/keyquorum-key+json, and returns
{"version": <the new version id>}; `read` gets exactly that version (secrets/get with the
version, never "the latest"), so a key record always opens the key it was written with.

The stable label. Key Vault has no labels or stages on secret versions, so the label is a tag,
keyquorum-stable = "true", on the version it marks (tags are per version). `set_stable` tags the
new version first and then removes the tag from every other version (update_secret_properties;
tags are replaced whole, so other tags are kept). A crash between the two updates leaves two
tagged versions; `stable` then takes the newest by `created_on` (whole seconds; ties go to the
later `updated_on`, then the version id) and the next `set_stable` clears the other. Moving the
label back to an older version and crashing half-way would thus briefly report the newer one;
the agent re-checks `stable()` against the version it wants and repairs it. A disabled
(destroyed) version is never reported stable. `stable` lists the secret's versions (secrets/
list, 25 per page), so it costs one request per 25 versions: one version per rotation.

Destroying. Key Vault cannot delete a single version (deleting the secret deletes all of them),
so `destroy` disables the version (update_secret_properties enabled=False): the vault then
refuses to return its value (403 SecretDisabled), which `read` reports as BackendDenied. The
value stays in the vault, disabled, until the whole secret is deleted and purged; an operator
can re-enable a version destroyed by mistake.

Calls, credentials and the connection pool are shared with the Key Vault keys backend
(backends/azure.py): SDK retries off, socket timeouts at `attempt_timeout`, backends.calls.retry
around each call, and SDK errors translated here at one place.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.keyvault.secrets import SecretClient, SecretProperties

from backends.azure import (
    NAME,
    VERSION,
    VaultSettings,
    error_reason,
    is_disabled,
    string_option,
    translate_common,
    vault_settings,
)
from backends.base import BackendConfigError, BackendDenied, BackendError, BackendUnavailable
from backends.calls import in_thread, retry

T = TypeVar("T")

KIND = "azure-secrets"
CONTENT_TYPE = "application/keyquorum-key+json"
STABLE_TAG = "keyquorum-stable"
_OPTIONS = frozenset(
    {
        "vault_url",
        "secret_name",
        "ca_file",
        "tenant_id",
        "client_id",
        "client_secret",
        "timeout",
        "attempt_timeout",
    }
)
_OFFICER = (
    "grant this node's identity the 'Key Vault Secrets Officer' role on the vault or secret "
    "(the leader adds versions and moves the stable tag); with access policies, secrets/{}"
)
_USER = (
    "grant this node's identity the 'Key Vault Secrets User' role on the vault or secret; "
    "with access policies, secrets/{}"
)
_HINTS = {
    "set": _OFFICER.format("set"),
    "get": _USER.format("get"),
    "list": _USER.format("list"),
}
_EPOCH = datetime.min.replace(tzinfo=UTC)


class AzureKeyVaultSecretStore:
    """Keeps each private key as a version of one Key Vault secret (see the module docstring)."""

    kind = KIND

    def __init__(self, settings: VaultSettings, secret_name: str) -> None:
        self.vault_url = settings.vault_url
        self.secret_name = secret_name
        self.policy = settings.policy
        self._connection = settings.connect()
        self._client = SecretClient(
            self.vault_url, settings.credential, **self._connection.client_options
        )

    async def add_version(self, value: bytes) -> dict[str, str]:
        text = base64.b64encode(value).decode("ascii")
        secret = await self._call(
            lambda: self._client.set_secret(self.secret_name, text, content_type=CONTENT_TYPE),
            f"set secret {self.secret_name}",
            "set",
        )
        version = secret.properties.version
        if not version or not VERSION.fullmatch(version):
            raise BackendUnavailable(f"set secret {self.secret_name}: no version in the answer")
        return {"version": version}

    async def read(self, ref: Mapping[str, str]) -> bytes:
        version = _version(ref)
        what = f"get secret {self.secret_name} version {version}"
        secret = await self._call(
            lambda: self._client.get_secret(self.secret_name, version), what, "get"
        )
        if secret.properties.version != version:
            raise BackendDenied(
                f"{what}: the vault answered with version {secret.properties.version}"
            )
        try:
            return base64.b64decode(secret.value or "", validate=True)
        except (binascii.Error, ValueError):
            raise BackendDenied(
                f"{what}: the value is not base64 (not written by keyquorum, or altered)"
            ) from None

    async def set_stable(self, ref: Mapping[str, str]) -> None:
        version = _version(ref)
        versions = {v.version: v for v in await self._versions()}
        target = versions.get(version)
        if target is None:
            raise BackendDenied(
                f"label version {version} of secret {self.secret_name} stable: no such version"
            )
        if target.enabled is False:
            raise BackendDenied(
                f"label version {version} of secret {self.secret_name} stable: it was destroyed "
                "(disabled)"
            )
        # The new label first: a crash in between leaves two tagged versions, never none.
        if not _is_stable(target):
            await self._tag(target, {**(target.tags or {}), STABLE_TAG: "true"})
        for other in versions.values():
            if other.version != version and _is_stable(other):
                tags = {k: v for k, v in (other.tags or {}).items() if k != STABLE_TAG}
                await self._tag(other, tags)

    async def stable(self) -> dict[str, str] | None:
        tagged = [v for v in await self._versions() if _is_stable(v) and v.enabled is not False]
        if not tagged:
            return None
        newest = max(
            tagged,
            key=lambda v: (v.created_on or _EPOCH, v.updated_on or _EPOCH, str(v.version)),
        )
        return {"version": str(newest.version)}

    async def destroy(self, ref: Mapping[str, str]) -> None:
        """Disable the version (Key Vault cannot delete one version); idempotent, and a
        version or secret that no longer exists counts as destroyed."""
        version = _version(ref)

        def call() -> None:
            # Not found: gone already (the whole secret was deleted); counts as destroyed.
            with contextlib.suppress(ResourceNotFoundError):
                self._client.update_secret_properties(self.secret_name, version, enabled=False)

        await self._call(call, f"disable secret {self.secret_name} version {version}", "set")

    async def _versions(self) -> list[SecretProperties]:
        """Every version of the secret (none if the secret does not exist yet)."""

        def call() -> list[SecretProperties]:
            try:
                return list(self._client.list_properties_of_secret_versions(self.secret_name))
            except ResourceNotFoundError:
                return []

        found = await self._call(call, f"list versions of secret {self.secret_name}", "list")
        return [v for v in found if v.version]

    async def _tag(self, version: SecretProperties, tags: dict[str, str]) -> None:
        name, number = self.secret_name, str(version.version)
        await self._call(
            lambda: self._client.update_secret_properties(name, number, tags=tags),
            f"update the tags of secret {name} version {number}",
            "set",
        )

    async def _call(self, fn: Callable[[], T], what: str, action: str) -> T:
        async def attempt() -> T:
            try:
                return await in_thread(fn)
            except BackendError:
                raise
            except Exception as exc:  # noqa: BLE001 - every SDK error is translated here
                raise _translate(exc, what, action) from None

        return await retry(attempt, what=what, policy=self.policy)

    def describe(self) -> str:
        return f"Azure Key Vault secret {self.vault_url}/secrets/{self.secret_name}"

    def close(self) -> None:
        """Close the connection pool (and a credential this store made); not needed to exit."""
        self._connection.close()

    def __repr__(self) -> str:
        return (
            f"AzureKeyVaultSecretStore(vault_url={self.vault_url!r}, "
            f"secret_name={self.secret_name!r})"
        )


def _is_stable(version: SecretProperties) -> bool:
    return (version.tags or {}).get(STABLE_TAG) == "true"


def _version(ref: Mapping[str, str]) -> str:
    version = ref.get("version")
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise BackendDenied(f"secret reference {dict(ref)!r} names no Key Vault secret version")
    return version


def _translate(exc: Exception, what: str, action: str) -> BackendError:
    """The secret store's one place mapping azure-core's exceptions to the backend errors;
    `action` (set, get, list) picks the role and permission a 403 names."""
    if isinstance(exc, ResourceNotFoundError):
        return BackendDenied(
            f"{what}: the vault has no such secret version ({error_reason(exc)})",
            "a deleted secret can be recovered within the vault's retention period (az keyvault "
            "secret recover); are backend.vault_url and backend.secret_name the ones the key set "
            "was written with?",
        )
    if isinstance(exc, HttpResponseError) and not isinstance(exc, ClientAuthenticationError):
        status = exc.status_code or 0
        if status == 403 and is_disabled(exc):
            return BackendDenied(
                f"{what}: the version was destroyed (disabled) ({error_reason(exc)})",
                "its key left the key set; re-enable it (az keyvault secret set-attributes "
                "--enabled true) only if it was destroyed by mistake",
            )
        if status == 409 and action == "set":
            return BackendConfigError(
                f"backend.secret_name: {what}: the secret is deleted but recoverable "
                f"({error_reason(exc)})",
                "recover it (az keyvault secret recover), purge it, or choose another "
                "backend.secret_name",
            )
    return translate_common(exc, what, denied_hint=_HINTS[action])


def build_secret_store(
    options: Mapping[str, Any],
    *,
    credential: TokenCredential | None = None,
    verify_challenge_resource: bool = True,
) -> AzureKeyVaultSecretStore:
    """Options: vault_url, secret_name (required), ca_file, tenant_id, client_id,
    client_secret, timeout, attempt_timeout. `credential` and `verify_challenge_resource` are
    for callers in code (tests), as for backends.azure.build. No request is made here."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for kind '{KIND}'",
            f"the {KIND} backend takes {', '.join(sorted(_OPTIONS))}",
        )
    string_option(options, "vault_url", kind=KIND, required=True)
    secret_name = string_option(options, "secret_name", kind=KIND, required=True)
    assert secret_name is not None
    if not NAME.fullmatch(secret_name):
        raise BackendConfigError(
            f"backend.secret_name: {secret_name!r} is not a Key Vault secret name",
            "secret names are 1-127 letters, digits and dashes",
        )
    settings = vault_settings(
        options,
        kind=KIND,
        credential=credential,
        verify_challenge_resource=verify_challenge_resource,
    )
    return AzureKeyVaultSecretStore(settings, secret_name)
