"""Agent configuration: one TOML file, `KEYQUORUM_*` environment overrides, strict validation.

Every error names the setting as `section.key` and the fix. Unknown sections and keys are errors
(a typo must not silently fall back to a default), except inside `store` and `backend`, whose extra
keys are the chosen kind's options.
"""

from __future__ import annotations

import dataclasses
import grp
import math
import os
import pwd
import re
import socket as _socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.timing import Timing, TimingError

SUPPORTED_ALGORITHMS = frozenset({"ES256", "ES384", "EdDSA", "RS256", "PS256"})
STORE_KINDS = ("file", "memory", "etcd")
# Backend kinds that are secret stores (backends/registry.py SECRET_STORES); mode "secret".
_SECRET_STORE_KINDS = frozenset({"aws-secrets", "gcp-secrets", "azure-secrets", "vault-kv"})
_ETCD_OPTIONS = {"endpoints", "timeout", "username", "password", "ca_file", "cert_file", "key_file"}
PERMISSIONS = ("sign", "jwt", "admin")
DEFAULT_CONFIG = Path("/etc/keyquorum/agent.toml")


class ConfigError(Exception):
    """A configuration problem; the message names the setting and the fix."""


# ---- values -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessRule:
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def allows(self, uid: int, gid: int, groups: frozenset[int]) -> bool:
        return uid in self.uids or gid in self.gids or not self.gids.isdisjoint(groups)


@dataclass(frozen=True, slots=True)
class AccessConfig:
    sign: AccessRule
    jwt: AccessRule
    admin: AccessRule


@dataclass(frozen=True, slots=True)
class SocketConfig:
    path: Path
    mode: int = 0o660
    group: str | None = None
    max_request_bytes: int = 1 << 20
    max_batch: int = 1024
    # Processes serving the socket: the agent itself plus `workers - 1` worker processes that
    # share its listening socket (agent/workers.py); 1 = the agent process alone.
    workers: int = 1


@dataclass(frozen=True, slots=True)
class KeysConfig:
    algorithm: str = "ES256"
    timing: Timing = field(default_factory=Timing)


@dataclass(frozen=True, slots=True)
class JwtConfig:
    issuer: str | None = None
    default_ttl: int = 15 * 60 * 1000
    audience: str | None = None


@dataclass(frozen=True, slots=True)
class StoreConfig:
    path: Path
    prefix: str
    kind: str = "file"
    poll_interval: float = 0.2
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BackendConfig:
    kind: str = "local"
    options: Mapping[str, Any] = field(default_factory=dict)
    # "wrap": private keys live (envelope-encrypted) in the key set; "remote": they never leave
    # the KMS/HSM, which signs every request; "secret": each is a version of a versioned secret
    # (DESIGN.md §8).
    mode: str = "wrap"


@dataclass(frozen=True, slots=True)
class JwksListenConfig:
    """The optional TCP listener for remote verifiers (JWKS and discovery only)."""

    host: str
    port: int
    cert_file: Path | None = None  # with key_file: HTTPS
    key_file: Path | None = None
    public_url: str | None = None  # how verifiers reach it (discovery's jwks_uri)
    metrics: bool = False  # also serve /metrics (Prometheus) on this listener


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node_id: str
    cluster: str
    state_dir: Path
    socket: SocketConfig
    access: AccessConfig
    keys: KeysConfig
    jwt: JwtConfig
    store: StoreConfig
    backend: BackendConfig
    log_level: str = "info"
    jwks: JwksListenConfig | None = None


# ---- durations ----------------------------------------------------------------------------------

_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(value: object, setting: str) -> int:
    """Seconds (number) or a string like "1h30m", "90s", "500ms", "2d" -> integer milliseconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{setting}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ConfigError(
                f"{setting}: {value!r} is not a duration; give a finite number of seconds"
            )
        if value < 0:
            raise ConfigError(f"{setting}: a duration cannot be negative ({value})")
        return round(value * 1000)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos = 0
        total = 0.0
        for match in _DURATION.finditer(text):
            if match.start() != pos:
                break
            total += float(match[1]) * _UNITS[match[2]]
            pos = match.end()
        if text and pos == len(text):
            return round(total)
    raise ConfigError(
        f"{setting}: {value!r} is not a duration; write seconds as a number or a string "
        'like "24h", "90s", "1m30s", "500ms"'
    )


# ---- paths --------------------------------------------------------------------------------------


def default_state_dir(env: Mapping[str, str]) -> Path:
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/keyquorum")
    base = env.get("XDG_STATE_HOME") or str(
        Path(env.get("HOME", str(Path.home()))) / ".local" / "state"
    )
    return Path(base) / "keyquorum"


def _default_socket(env: Mapping[str, str], state_dir: Path) -> Path:
    if env.get("RUNTIME_DIRECTORY"):
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "agent.sock"
    if os.geteuid() == 0:
        return Path("/run/keyquorum/agent.sock")
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "keyquorum" / "agent.sock"
    return state_dir / "agent.sock"


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """Where the CLI looks for the agent without reading a config file."""
    env = os.environ if env is None else env
    if env.get("KEYQUORUM_SOCKET"):
        return Path(env["KEYQUORUM_SOCKET"])
    return _default_socket(env, default_state_dir(env))


# ---- loading ------------------------------------------------------------------------------------

_TOP = {
    "node_id",
    "cluster",
    "state_dir",
    "log_level",
    "socket",
    "access",
    "keys",
    "jwt",
    "store",
    "backend",
    "jwks",
}
_TIMING_FIELDS = frozenset(f.name for f in dataclasses.fields(Timing))
_SECTIONS: dict[str, set[str]] = {
    "socket": {"path", "mode", "group", "max_request_bytes", "max_batch", "workers"},
    "keys": {"algorithm", *_TIMING_FIELDS},
    "jwt": {"issuer", "default_ttl", "audience"},
    "access": set(PERMISSIONS),
    "jwks": {"listen", "cert_file", "key_file", "public_url", "metrics"},
}
_RULE_KEYS = {"users", "uids", "groups", "gids"}


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> AgentConfig:
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is None and env.get("KEYQUORUM_CONFIG"):
        path = Path(env["KEYQUORUM_CONFIG"])
    elif path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    if path is not None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(
                f"config file {path} does not exist; create it (deploy/agent.example.toml lists "
                "every setting) or point --config / KEYQUORUM_CONFIG at an existing file"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}; fix the syntax there") from None
        base_dir = Path(path).resolve().parent
    _apply_env(raw, env)
    return _build(raw, env, base_dir)


# Environment variables that are not configuration overrides.
_NOT_SETTINGS = frozenset(
    {
        "KEYQUORUM_CONFIG",
        "KEYQUORUM_SOCKET",
        "KEYQUORUM_FAULT_COMMIT_DELAY",
        "KEYQUORUM_FAULT_CLOCK_OFFSET_MS",
    }
)
_TOP_SCALARS = ("node_id", "cluster", "state_dir", "log_level")
# Text settings keep an override's raw text unless it is a TOML string: KEYQUORUM_NODE_ID=7 is
# the node "7", not the integer 7.
_TEXT_SETTINGS = frozenset(
    {
        *_TOP_SCALARS,
        "socket.path",
        "socket.group",
        "keys.algorithm",
        "jwt.issuer",
        "jwt.audience",
        "store.kind",
        "store.path",
        "store.prefix",
        "backend.kind",
    }
)


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Merge `KEYQUORUM_<SECTION>__<KEY>` overrides into the file's tables; env wins.

    Values are TOML when they parse as TOML (`90`, `true`, `["a"]`), otherwise plain strings.
    A misspelt variable is refused like a misspelt key, naming the variable.
    """
    for name, text in sorted(env.items()):
        if not name.startswith("KEYQUORUM_") or name in _NOT_SETTINGS:
            continue
        key = name[len("KEYQUORUM_") :].lower()
        section, nested, option = key.partition("__")
        setting = f"{section}.{option}" if nested else section
        if not nested and section not in _TOP_SCALARS:
            hint = (
                f"set one key at a time as KEYQUORUM_{section.upper()}__<KEY>"
                if section in _TOP
                else "known: "
                + ", ".join(f"KEYQUORUM_{s.upper()}" for s in _TOP_SCALARS)
                + ", KEYQUORUM_<SECTION>__<KEY>"
            )
            raise ConfigError(f"{name}: {setting} is not a top-level setting; {hint}")
        if nested:
            if section not in _TOP or section in _TOP_SCALARS:
                sections = ", ".join(sorted(_TOP - set(_TOP_SCALARS)))
                raise ConfigError(f"{name}: {section} is not a config section; known: {sections}")
            allowed = _SECTIONS.get(section)
            if allowed is not None and option not in allowed:
                raise ConfigError(
                    f"{name}: {setting} is not a setting; known: {', '.join(sorted(allowed))}"
                )
        try:
            value: Any = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        if setting in _TEXT_SETTINGS and not isinstance(value, str):
            value = text
        if nested:
            target = raw.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{name}: {section} must be a table ([{section}]) in the file")
            target[option] = value
        else:
            raw[section] = value


def _section(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a table ([{name}])")
    allowed = _SECTIONS.get(name)
    if allowed is not None:
        unknown = set(value) - allowed
        if unknown:
            raise ConfigError(
                f"{name}.{sorted(unknown)[0]}: unknown setting; known: {', '.join(sorted(allowed))}"
            )
    return dict(value)


def _jwks(raw: Mapping[str, Any], base: Path) -> JwksListenConfig | None:
    section = _section(raw, "jwks")
    if "listen" not in section:
        if section:
            raise ConfigError("jwks.listen: required to serve the JWKS over TCP (host:port)")
        return None
    listen = section["listen"]
    host, sep, port_text = str(listen).rpartition(":") if isinstance(listen, str) else ("", "", "")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(
            f'jwks.listen: {listen!r} is not host:port (e.g. "127.0.0.1:8443" or "[::]:8443")'
        )
    cert = _path(section["cert_file"], "jwks.cert_file", base) if "cert_file" in section else None
    key = _path(section["key_file"], "jwks.key_file", base) if "key_file" in section else None
    if (cert is None) != (key is None):
        raise ConfigError("jwks.cert_file and jwks.key_file go together (HTTPS)")
    public_url = section.get("public_url")
    if public_url is not None and (
        not isinstance(public_url, str) or not public_url.startswith(("http://", "https://"))
    ):
        raise ConfigError("jwks.public_url: must be an http(s) URL")
    metrics = section.get("metrics", False)
    if not isinstance(metrics, bool):
        raise ConfigError("jwks.metrics: must be true or false")
    return JwksListenConfig(host, int(port_text), cert, key, public_url, metrics)


def _path(value: object, setting: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{setting}: must be a path string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _int_setting(value: object, setting: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{setting}: must be an integer >= {minimum} (got {value!r})")
    return value


def _build(raw: Mapping[str, Any], env: Mapping[str, str], base: Path) -> AgentConfig:
    unknown = set(raw) - _TOP
    if unknown:
        raise ConfigError(
            f"{sorted(unknown)[0]}: unknown setting or section; known: {', '.join(sorted(_TOP))}"
        )
    node_id = raw.get("node_id", _socket.gethostname())
    if not isinstance(node_id, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", node_id):
        raise ConfigError("node_id: must be 1-64 characters of letters, digits, '.', '_' or '-'")
    cluster = raw.get("cluster", "default")
    if not isinstance(cluster, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", cluster):
        raise ConfigError("cluster: must be 1-64 characters of letters, digits, '.', '_' or '-'")
    state_dir = (
        _path(raw["state_dir"], "state_dir", base) if "state_dir" in raw else default_state_dir(env)
    )
    log_level = raw.get("log_level", "info")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level: use one of debug, info, warning, error")

    sock = _section(raw, "socket")
    socket_path = (
        _path(sock["path"], "socket.path", base)
        if "path" in sock
        else _default_socket(env, state_dir)
    )
    mode = sock.get("mode", 0o660)
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            raise ConfigError(f'socket.mode: {mode!r} is not an octal mode like "0660"') from None
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
        raise ConfigError('socket.mode: must be an octal permission like "0660"')
    group = sock.get("group")
    if group is not None:
        if not isinstance(group, str):
            raise ConfigError("socket.group: must be a group name")
        try:
            grp.getgrnam(group)
        except KeyError:
            raise ConfigError(f"socket.group: no such group {group!r}") from None
    socket_config = SocketConfig(
        path=socket_path,
        mode=mode,
        group=group,
        max_request_bytes=_int_setting(
            sock.get("max_request_bytes", 1 << 20), "socket.max_request_bytes", 256
        ),
        max_batch=_int_setting(sock.get("max_batch", 1024), "socket.max_batch"),
        workers=_int_setting(sock.get("workers", 1), "socket.workers"),
    )
    if socket_config.workers > 256:
        raise ConfigError("socket.workers: at most 256 (about one per core is what helps)")

    keys = _section(raw, "keys")
    algorithm = keys.pop("algorithm", "ES256")
    if not isinstance(algorithm, str) or algorithm not in SUPPORTED_ALGORITHMS:
        raise ConfigError(
            f"keys.algorithm: unknown algorithm {algorithm!r}; use one of "
            f"{', '.join(sorted(SUPPORTED_ALGORITHMS))}"
        )
    durations = {name: parse_duration(value, f"keys.{name}") for name, value in keys.items()}
    try:
        timing = dataclasses.replace(Timing(), **durations).validate()
    except TimingError as exc:
        # Keep TimingError's text: it names the relation, which is what the operator must fix.
        first = str(exc).split(" ", 1)[0]
        setting = f"keys.{first}" if first in _TIMING_FIELDS else "keys"
        raise ConfigError(
            f"{setting}: {exc}; change the [keys] durations so that it holds"
        ) from None

    jwt = _section(raw, "jwt")
    default_ttl = parse_duration(jwt.get("default_ttl", 900), "jwt.default_ttl")
    if default_ttl > timing.max_token_ttl:
        raise ConfigError(
            f"jwt.default_ttl: {default_ttl / 1000:g}s exceeds keys.max_token_ttl "
            f"({timing.max_token_ttl / 1000:g}s); lower it or raise keys.max_token_ttl"
        )
    if default_ttl < 1000:
        raise ConfigError("jwt.default_ttl: must be at least 1s")
    for name in ("issuer", "audience"):
        if jwt.get(name) is not None and not isinstance(jwt[name], str):
            raise ConfigError(f"jwt.{name}: must be a string")
    jwt_config = JwtConfig(
        issuer=jwt.get("issuer"), default_ttl=default_ttl, audience=jwt.get("audience")
    )

    if not isinstance(raw.get("store", {}), dict):
        raise ConfigError("store: must be a table ([store])")
    store = dict(raw.get("store", {}))
    kind = store.pop("kind", "file")
    if kind not in STORE_KINDS:
        raise ConfigError(
            f"store.kind: unknown store kind {kind!r}; use one of {', '.join(STORE_KINDS)}"
        )
    store_path = (
        _path(store.pop("path"), "store.path", base)
        if "path" in store
        else state_dir / "keyset.store"
    )
    prefix = store.pop("prefix", f"/keyquorum/{cluster}")
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise ConfigError("store.prefix: must be a string starting with '/'")
    poll = store.pop("poll_interval", 0.2)
    if isinstance(poll, str):
        poll = parse_duration(poll, "store.poll_interval") / 1000
    if not isinstance(poll, (int, float)) or isinstance(poll, bool) or not 0 < poll <= 60:
        raise ConfigError("store.poll_interval: must be a number of seconds in (0, 60]")
    if kind == "etcd":
        _check_etcd_options(store, base)
        if timing.lease_ttl < 2000:
            raise ConfigError("keys.lease_ttl: etcd grants leases of at least 2s; set >= 2s")
    store_config = StoreConfig(
        path=store_path, prefix=prefix, kind=kind, poll_interval=float(poll), options=store
    )

    if not isinstance(raw.get("backend", {}), dict):
        raise ConfigError("backend: must be a table ([backend])")
    backend = dict(raw.get("backend", {}))
    backend_kind = backend.pop("kind", "local")
    if not isinstance(backend_kind, str):
        raise ConfigError("backend.kind: must be a string")
    secret_kind = backend_kind in _SECRET_STORE_KINDS
    backend_mode = backend.pop("mode", "secret" if secret_kind else "wrap")
    if backend_mode not in ("wrap", "remote", "secret"):
        raise ConfigError(
            f"backend.mode: {backend_mode!r} is not 'wrap' (keys sealed into the key set), "
            "'remote' (keys stay in the KMS/HSM, which signs) or 'secret' (keys kept in a "
            "secret store)"
        )
    if secret_kind != (backend_mode == "secret"):
        raise ConfigError(
            f"backend.mode: {backend_mode!r} does not go with kind {backend_kind!r}: secret "
            f"stores ({', '.join(sorted(_SECRET_STORE_KINDS))}) keep keys as secret versions, "
            "the other kinds wrap or sign"
        )
    if backend_mode == "remote" and backend_kind == "local":
        raise ConfigError("backend.mode: the local backend can only wrap; use mode = 'wrap'")
    if backend_kind == "local":
        backend["kek_file"] = str(
            _path(backend["kek_file"], "backend.kek_file", base)
            if "kek_file" in backend
            else state_dir / "kek"
        )
        backend.setdefault("create_kek", True)
    if backend_mode == "remote" and socket_config.workers > 1:
        raise ConfigError(
            "socket.workers: worker processes sign with keys held in memory; with "
            "backend.mode = 'remote' every signature is a KMS/HSM call: set socket.workers = 1"
        )
    backend_config = BackendConfig(kind=backend_kind, options=backend, mode=backend_mode)

    return AgentConfig(
        jwks=_jwks(raw, base),
        node_id=node_id,
        cluster=cluster,
        state_dir=state_dir,
        socket=socket_config,
        access=_access(raw),
        keys=KeysConfig(algorithm=algorithm, timing=timing),
        jwt=jwt_config,
        store=store_config,
        backend=backend_config,
        log_level=log_level,
    )


def _check_etcd_options(options: dict[str, Any], base: Path) -> None:
    unknown = set(options) - _ETCD_OPTIONS
    if unknown:
        known = ", ".join(sorted(_ETCD_OPTIONS))
        raise ConfigError(f"store.{sorted(unknown)[0]}: unknown etcd setting; known: {known}")
    endpoints = options.get("endpoints")
    if isinstance(endpoints, str):
        endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
    if (
        not isinstance(endpoints, list)
        or not endpoints
        or not all(
            isinstance(e, str) and re.match(r"^https?://[^/]+$", e.rstrip("/")) for e in endpoints
        )
    ):
        raise ConfigError(
            'store.endpoints: give etcd client URLs, e.g. endpoints = ["http://127.0.0.1:2379"]'
        )
    options["endpoints"] = endpoints
    timeout = options.get("timeout", 5)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 60:
        raise ConfigError("store.timeout: seconds per etcd call, in (0, 60]")
    options["timeout"] = float(timeout)
    for name in ("ca_file", "cert_file", "key_file"):
        if name in options:
            options[name] = str(_path(options[name], f"store.{name}", base))
    if ("cert_file" in options) != ("key_file" in options):
        raise ConfigError("store.cert_file and store.key_file go together (TLS client certificate)")


def _access(raw: Mapping[str, Any]) -> AccessConfig:
    section = _section(raw, "access")
    default = AccessRule(uids=frozenset({0, os.getuid()}))
    rules: dict[str, AccessRule] = {}
    for permission in PERMISSIONS:
        if permission not in section:
            rules[permission] = default
            continue
        spec = section[permission]
        where = f"access.{permission}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: must be a table with users/uids/groups/gids")
        unknown = set(spec) - _RULE_KEYS
        if unknown:
            raise ConfigError(
                f"{where}.{sorted(unknown)[0]}: unknown setting; use users, uids, groups, gids"
            )
        uids = set(_int_list(spec.get("uids", []), f"{where}.uids"))
        gids = set(_int_list(spec.get("gids", []), f"{where}.gids"))
        for user in _str_list(spec.get("users", []), f"{where}.users"):
            try:
                uids.add(pwd.getpwnam(user).pw_uid)
            except KeyError:
                raise ConfigError(f"{where}.users: no such user {user!r}") from None
        for group in _str_list(spec.get("groups", []), f"{where}.groups"):
            try:
                gids.add(grp.getgrnam(group).gr_gid)
            except KeyError:
                raise ConfigError(f"{where}.groups: no such group {group!r}") from None
        rules[permission] = AccessRule(frozenset(uids), frozenset(gids))
    return AccessConfig(**rules)


def _int_list(value: object, setting: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ConfigError(f"{setting}: must be a list of non-negative integers")
    return list(value)


def _str_list(value: object, setting: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{setting}: must be a list of names")
    return list(value)
