"""Helpers shared by tests: agent configs written as real TOML files."""

from __future__ import annotations

from pathlib import Path

# Second-scale timings that satisfy every relation in agent/timing.py. Keys rotate every ~3.5 s.
FAST_KEYS = {
    "key_ttl": "9s",
    "rotation_threshold": "5.5s",
    "grace_period": "1.5s",
    "check_interval": "250ms",
    "jwks_max_age": "1s",
    "max_clock_skew": "200ms",
    "max_token_ttl": "1s",
    "outage_budget": "1s",
    "lease_ttl": "500ms",
}

# Timings under which nothing rotates on its own during a test (operator commands only).
QUIET_KEYS = {**FAST_KEYS, "key_ttl": "120s", "rotation_threshold": "30s", "max_token_ttl": "5s"}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(
    directory: Path,
    *,
    keys: dict[str, object] | None = None,
    sections: dict[str, dict[str, object]] | None = None,
    node_id: str = "n1",
    store_kind: str = "file",
    backend: dict[str, object] | None = None,
) -> Path:
    """Write an agent.toml for a node living entirely under `directory`; `backend` replaces the
    default local-KEK [backend] table."""
    state = directory / "state"
    merged: dict[str, dict[str, object]] = {
        "socket": {"path": str(directory / "agent.sock")},
        "keys": {"algorithm": "ES256", **FAST_KEYS, **(keys or {})},
        "jwt": {"default_ttl": "1s"},
        "store": (
            {"kind": store_kind, "path": str(state / "keyset.store"), "poll_interval": 0.05}
            if store_kind == "file"
            else {"kind": store_kind}
        ),
        "backend": backend or {"kind": "local", "kek_file": str(state / "kek")},
    }
    for name, values in (sections or {}).items():
        merged.setdefault(name, {}).update(values)
    lines = [f'node_id = "{node_id}"', f'state_dir = "{state}"', ""]
    for name, values in merged.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    path = directory / "agent.toml"
    path.write_text("\n".join(lines))
    return path


# Cluster timings: etcd leases are at least 2 s, so the grace period is 4 s (>= 2 x lease); the
# cluster rides through etcd outages of up to 10 s. Keys rotate every ~7 s.
CLUSTER_KEYS = {
    "key_ttl": "23s",
    "rotation_threshold": "16s",
    "grace_period": "4s",
    "check_interval": "250ms",
    "jwks_max_age": "1s",
    "max_clock_skew": "200ms",
    "max_token_ttl": "1s",
    "outage_budget": "10s",
    "lease_ttl": "2s",
}


def write_cluster_config(
    directory: Path,
    node_id: str,
    endpoints: list[str],
    *,
    prefix: str = "/keyquorum/test",
    backend: dict[str, object] | None = None,
) -> Path:
    """Config for one agent of an etcd-backed cluster; each node has its own dir and KEK copy."""
    return write_config(
        directory,
        node_id=node_id,
        keys=CLUSTER_KEYS,
        backend=backend,
        sections={
            "store": {"kind": "etcd", "endpoints": endpoints, "prefix": prefix, "timeout": 1.0}
        },
    )
