"""`keyquorum config check`: the effective configuration and what its timings ride through.

It loads the configuration exactly as `keyquorum run` does (file, then KEYQUORUM_* overrides),
so a mistake fails here with the same message; it then prints every setting (secrets redacted)
and the timing budget an operator plans with: how long an etcd or KMS outage the cluster rides
through with no failed signature, how fast a lost leader is replaced, how long verifiers cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from agent.config import AgentConfig
from agent.timing import SECOND

_SECRET_OPTIONS = frozenset({"password", "token", "client_secret", "pin"})


def human(ms: int, sep: str = " ") -> str:
    """1h 30m, 45s, 250ms: durations as an operator reads them (sep="" for the config file)."""
    if ms % SECOND:
        return f"{ms}ms" if ms < 10 * SECOND else f"{ms / SECOND:g}s"
    seconds = ms // SECOND
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            count, seconds = divmod(seconds, size)
            if count:
                parts.append(f"{count}{unit}")
    return sep.join(parts) or "0s"


def _redacted(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ("<redacted>" if k in _SECRET_OPTIONS else v) for k, v in options.items()}


def effective(config: AgentConfig) -> dict[str, Any]:
    """The whole configuration in the config file's own shape (it loads back as the same
    configuration), secrets redacted."""
    timing = config.keys.timing
    socket = config.socket
    return {
        "node_id": config.node_id,
        "cluster": config.cluster,
        "state_dir": str(config.state_dir),
        "log_level": config.log_level,
        "socket": {
            "path": str(socket.path),
            "mode": f"{socket.mode:04o}",
            **({"group": socket.group} if socket.group else {}),
            "max_request_bytes": socket.max_request_bytes,
            "max_batch": socket.max_batch,
            "workers": socket.workers,
        },
        "access": {
            name: {"uids": sorted(rule.uids), "gids": sorted(rule.gids)}
            for name, rule in (
                ("sign", config.access.sign),
                ("jwt", config.access.jwt),
                ("admin", config.access.admin),
            )
        },
        "keys": {
            "algorithm": config.keys.algorithm,
            **{f.name: human(getattr(timing, f.name), "") for f in dataclasses.fields(timing)},
        },
        "jwt": {
            **({"issuer": config.jwt.issuer} if config.jwt.issuer else {}),
            **({"audience": config.jwt.audience} if config.jwt.audience else {}),
            "default_ttl": human(config.jwt.default_ttl, ""),
        },
        "store": {
            "kind": config.store.kind,
            "path": str(config.store.path),
            "prefix": config.store.prefix,
            "poll_interval": config.store.poll_interval,
            **_redacted(config.store.options),
        },
        "backend": {
            "kind": config.backend.kind,
            "mode": config.backend.mode,
            **_redacted(config.backend.options),
        },
        **({"jwks": _jwks(config)} if config.jwks else {}),
    }


def _jwks(config: AgentConfig) -> dict[str, Any]:
    jwks = config.jwks
    assert jwks is not None
    host = f"[{jwks.host}]" if ":" in jwks.host else jwks.host
    out: dict[str, Any] = {"listen": f"{host}:{jwks.port}"}
    if jwks.cert_file and jwks.key_file:
        out["cert_file"], out["key_file"] = str(jwks.cert_file), str(jwks.key_file)
    if jwks.public_url:
        out["public_url"] = jwks.public_url
    out["metrics"] = jwks.metrics
    return out


def budget(config: AgentConfig) -> dict[str, str]:
    """What the timings mean in operation, one sentence per line."""
    t = config.keys.timing
    remote = config.backend.mode == "remote"
    lines = {
        "rotation": (
            f"a key signs for {human(t.sign_window())} after creation and is published for "
            f"{human(t.key_ttl)}; its successor is created {human(t.rotation_threshold)} "
            f"before it expires and activates at least {human(t.grace_period)} later"
        ),
        "outages": (
            f"an etcd{'' if remote else ' or backend'} outage of up to {human(t.ride_through())} "
            f"is ridden through with no failed signature, even one that begins as a rotation "
            f"is due (outage_budget asks for {human(t.outage_budget)}); a longer one stops "
            "rotation first, then signing when the active key reaches its deactivation"
        ),
        "verifiers": (
            f"verifiers may cache the JWKS for {human(t.jwks_max_age)}; every key is published "
            f"at least {human(t.grace_period)} before it signs and stays published "
            f"{human(t.max_token_ttl + t.max_clock_skew)} after it stops"
        ),
    }
    if remote:
        lines["backend"] = (
            "backend.mode = remote: every signature is a call to the KMS/HSM, so signing stops "
            "while it is unreachable (wrap mode keeps signing from memory instead)"
        )
    if config.store.kind == "etcd":
        lines["leader"] = (
            f"a dead leader is replaced within about {human(t.lease_ttl)} (its etcd lease) "
            "plus one campaign poll; nothing waits on the leader to sign"
        )
    return lines


def render(config: AgentConfig, source: str) -> str:
    lines = [f"# effective configuration ({source}); all timing relations hold", ""]
    for section, values in effective(config).items():
        if not isinstance(values, dict):
            lines.append(f"{section} = {_toml(values)}")
    for section, values in effective(config).items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines.extend(_table(values))
    lines.append("\n# what these settings ride through")
    lines.extend(f"# {name}: {text}" for name, text in budget(config).items())
    return "\n".join(lines)


def _table(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out.extend(_table(value, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key} = {_toml(value)}")
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
