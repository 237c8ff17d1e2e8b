"""Maps a configured backend `kind` to its constructor, importing provider modules lazily.

Each provider module exposes `build(options) -> KeyWrapper`. It is imported only when chosen, so
an install without one provider's SDK still runs every other backend; choosing a provider whose
SDK is missing fails at start-up naming the pip extra that brings it (`keyquorum[<extra>]`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backends.base import BackendConfigError, KeyWrapper, RemoteSigner, SecretStore


@dataclass(frozen=True, slots=True)
class Provider:
    """Where a backend kind lives and which pip extra installs its SDK (None: no extra needed)."""

    module: str
    extra: str | None = None


KEY_WRAPPERS: dict[str, Provider] = {
    "local": Provider("backends.local"),
    "aws-kms": Provider("backends.aws", "aws"),
    "gcp-kms": Provider("backends.gcp", "gcp"),
    "azure-keyvault": Provider("backends.azure", "azure"),
    "vault-transit": Provider("backends.vault"),
    "pkcs11": Provider("backends.pkcs11", "pkcs11"),
}


# Backends that can also keep keys inside themselves and sign there (backend.mode = "remote");
# each module exposes `build_signer(options) -> RemoteSigner`.
REMOTE_SIGNERS: dict[str, Provider] = {
    "aws-kms": Provider("backends.aws", "aws"),
    "vault-transit": Provider("backends.vault"),
    "gcp-kms": Provider("backends.gcp", "gcp"),
    "azure-keyvault": Provider("backends.azure", "azure"),
    "pkcs11": Provider("backends.pkcs11", "pkcs11"),
}

# Secret stores (backend.mode = "secret", implied by these kinds); each module exposes
# `build_secret_store(options) -> SecretStore`.
SECRET_STORES: dict[str, Provider] = {
    "aws-secrets": Provider("backends.aws_secrets", "aws"),
    "gcp-secrets": Provider("backends.gcp_secrets", "gcp"),
    "azure-secrets": Provider("backends.azure_secrets", "azure"),
    "vault-kv": Provider("backends.vault_kv"),
}


def _provider_module(table: dict[str, Provider], kind: str, what: str) -> Any:
    provider = table.get(kind) if isinstance(kind, str) else None
    if provider is None:
        raise BackendConfigError(
            f"backend.kind: unknown {what} {kind!r}; known: {', '.join(sorted(table))}",
            "set backend.kind to one of the known backends",
        )
    try:
        return importlib.import_module(provider.module)
    except ImportError as exc:
        if provider.extra is None or (exc.name or "").startswith(provider.module):
            raise  # our own module is missing or broken: a packaging bug, not a config error
        raise BackendConfigError(
            f"backend.kind = {kind!r} needs the {exc.name or 'provider'} package, which is not "
            "installed",
            f"pip install 'keyquorum[{provider.extra}]'",
        ) from exc


def make_key_wrapper(kind: str, options: Mapping[str, Any]) -> KeyWrapper:
    """Build the key wrapper the config's `backend.kind` names, or raise BackendConfigError."""
    module = _provider_module(KEY_WRAPPERS, kind, "backend")
    wrapper = module.build(options)
    if not isinstance(wrapper, KeyWrapper):  # pragma: no cover - a provider module bug
        raise TypeError(f"{module.__name__}.build returned {type(wrapper).__name__}")
    return wrapper


def make_secret_store(kind: str, options: Mapping[str, Any]) -> SecretStore:
    """Build the secret store a `*-secrets` / `vault-kv` kind names, or BackendConfigError."""
    module = _provider_module(SECRET_STORES, kind, "secret store")
    store = module.build_secret_store(options)
    if not isinstance(store, SecretStore):  # pragma: no cover - a provider module bug
        raise TypeError(f"{module.__name__}.build_secret_store returned {type(store).__name__}")
    return store


def make_remote_signer(kind: str, options: Mapping[str, Any]) -> RemoteSigner:
    """Build the remote signer for `backend.mode = "remote"`, or raise BackendConfigError."""
    if kind not in REMOTE_SIGNERS and kind in KEY_WRAPPERS:
        raise BackendConfigError(
            f"backend.mode: the {kind!r} backend can only wrap keys, not sign remotely",
            f"use mode = 'wrap', or one of {', '.join(sorted(REMOTE_SIGNERS))} for remote keys",
        )
    module = _provider_module(REMOTE_SIGNERS, kind, "remote signer")
    signer = module.build_signer(options)
    if not isinstance(signer, RemoteSigner):  # pragma: no cover - a provider module bug
        raise TypeError(f"{module.__name__}.build_signer returned {type(signer).__name__}")
    return signer
