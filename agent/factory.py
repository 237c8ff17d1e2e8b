"""Build the configured key-set store, election and key wrapper (the one place mapping kinds)."""

from __future__ import annotations

from agent.config import AgentConfig, ConfigError
from backends.base import KeyWrapper, RemoteSigner, SecretStore
from backends.registry import make_key_wrapper, make_remote_signer, make_secret_store
from consensus.election import Election
from consensus.etcd import EtcdStore
from consensus.etcd_client import EtcdClient
from consensus.file import FileStore
from consensus.memory import MemoryStore
from consensus.store import KeySetStore


def etcd_client(config: AgentConfig) -> EtcdClient:
    options = config.store.options
    cert = (options["cert_file"], options["key_file"]) if "cert_file" in options else None
    return EtcdClient(
        options["endpoints"],
        timeout=options.get("timeout", 5.0),
        verify=options.get("ca_file", True),
        cert=cert,
        username=options.get("username"),
        password=options.get("password"),
    )


def build_store(config: AgentConfig) -> KeySetStore:
    kind = config.store.kind
    if kind == "file":
        return FileStore(config.store.path, poll_interval=config.store.poll_interval)
    if kind == "memory":
        return MemoryStore()
    if kind == "etcd":
        return EtcdStore(etcd_client(config), config.store.prefix)
    raise ConfigError(f"store.kind: unknown store kind {kind!r}; use 'file', 'memory' or 'etcd'")


def build_election(config: AgentConfig) -> Election | None:
    """The leader election for cluster stores; None for single-node ones."""
    if config.store.kind != "etcd":
        return None
    return Election(
        etcd_client(config),
        config.store.prefix,
        config.node_id,
        lease_ttl=config.keys.timing.lease_ttl / 1000,
    )


async def build_wrapper(config: AgentConfig) -> KeyWrapper | RemoteSigner | SecretStore:
    """The key wrapper; with backend.mode = "remote" the remote signer; for a secret-store
    kind the secret store."""
    if config.backend.mode == "secret":
        return make_secret_store(config.backend.kind, config.backend.options)
    if config.backend.mode == "remote":
        return make_remote_signer(config.backend.kind, config.backend.options)
    return make_key_wrapper(config.backend.kind, config.backend.options)


def backend_deadline(wrapper: KeyWrapper | RemoteSigner | SecretStore) -> float:
    """The agent's outer deadline for one backend operation: a safety net a little past the
    wrapper's own deadline (its retries end first and say why)."""
    policy = getattr(wrapper, "policy", None)
    deadline = getattr(policy, "deadline", None)
    return float(deadline) + 2.0 if isinstance(deadline, int | float) else 10.0
