"""Configuration: defaults, durations, relations, typos, env overrides, access rules, paths."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path

import pytest

from agent import config as config_module
from agent.config import (
    SUPPORTED_ALGORITHMS,
    AccessRule,
    AgentConfig,
    ConfigError,
    JwtConfig,
    SocketConfig,
    default_socket_path,
    default_state_dir,
    load_config,
    parse_duration,
)
from agent.timing import HOUR, MINUTE, SECOND, Timing

EXAMPLE = Path(__file__).parent.parent / "deploy" / "agent.example.toml"


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> AgentConfig:
    """Load `text` from tmp_path/agent.toml with the state dir kept under tmp_path."""
    path = tmp_path / "agent.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n' + text)
    return load_config(path, env=env or {})


@pytest.fixture
def no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the /etc default point at a file that does not exist, whatever the host has."""
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG", tmp_path / "etc" / "agent.toml")


def as_user(monkeypatch: pytest.MonkeyPatch, uid: int = 4242) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: uid)


# ---- defaults -----------------------------------------------------------------------------------


def test_defaults_validate_and_follow_the_design(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert config.cluster == "default"
    assert config.log_level == "info"
    assert config.keys.algorithm == "ES256"
    assert config.keys.timing == Timing()
    assert config.keys.timing.key_ttl == 24 * HOUR
    assert config.socket.mode == 0o660
    assert config.socket.group is None
    assert config.socket.max_request_bytes == 1 << 20
    assert config.socket.max_batch == 1024
    assert config.jwt == JwtConfig(issuer=None, default_ttl=15 * MINUTE, audience=None)
    assert config.store.kind == "file"
    assert config.store.path == tmp_path / "state" / "keyset.store"
    assert config.store.prefix == "/keyquorum/default"
    assert config.store.poll_interval == 0.2
    assert config.backend.kind == "local"
    assert config.backend.options["kek_file"] == str(tmp_path / "state" / "kek")
    assert config.backend.options["create_kek"] is True


def test_node_id_defaults_to_the_hostname(tmp_path: Path) -> None:
    import socket

    assert load(tmp_path, "").node_id == socket.gethostname()


def test_default_access_allows_only_root_and_the_agents_own_uid(tmp_path: Path) -> None:
    access = load(tmp_path, "").access
    stranger = os.getuid() + 4242
    for rule in (access.sign, access.jwt, access.admin):
        assert rule == AccessRule(uids=frozenset({0, os.getuid()}))
        assert rule.allows(os.getuid(), 12345, frozenset())
        assert rule.allows(0, 0, frozenset())
        assert not rule.allows(stranger, stranger, frozenset({stranger}))


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cluster = "other"  # type: ignore[misc]


def test_without_any_file_the_embedded_single_node_defaults_load(
    tmp_path: Path, no_system_config: None
) -> None:
    config = load_config(env={"STATE_DIRECTORY": str(tmp_path / "st")})
    assert config.state_dir == tmp_path / "st"
    assert config.store.kind == "file"
    assert config.store.path == tmp_path / "st" / "keyset.store"
    assert config.backend.options["kek_file"] == str(tmp_path / "st" / "kek")


def test_the_system_config_file_is_read_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "etc" / "agent.toml"
    system.parent.mkdir()
    system.write_text(f'state_dir = "{tmp_path}"\ncluster = "from-etc"\n')
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG", system)
    assert load_config(env={}).cluster == "from-etc"


# ---- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (90, 90 * SECOND),
        (0, 0),
        (0.5, 500),
        (1.25, 1250),
        ("24h", 24 * HOUR),
        ("90s", 90 * SECOND),
        ("1m30s", 90 * SECOND),
        ("500ms", 500),
        ("2d", 48 * HOUR),
        ("1.5s", 1500),
        ("1h 30m", 90 * MINUTE),
        ("1d2h3m4s5ms", 93_784_005),
        (" 10m ", 10 * MINUTE),
    ],
)
def test_durations_in_every_accepted_form(value: object, ms: int) -> None:
    assert parse_duration(value, "keys.key_ttl") == ms


@pytest.mark.parametrize(
    "bad",
    ["soon", "10", "5x", "-3s", "1h-5m", "h", "1.s", "", -1, -0.5, True, float("inf"), [1], None],
)
def test_a_bad_duration_names_the_setting_and_the_forms(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"keys\.grace_period") as info:
        parse_duration(bad, "keys.grace_period")
    assert isinstance(bad, (int, float)) or '"90s"' in str(info.value)


def test_not_a_number_is_not_a_duration() -> None:
    with pytest.raises(ConfigError, match=r"jwt\.default_ttl"):
        parse_duration(float("nan"), "jwt.default_ttl")


def test_durations_in_the_file_reach_timing_in_milliseconds(tmp_path: Path) -> None:
    config = load(tmp_path, '[keys]\ncheck_interval = 30\nmax_clock_skew = "1500ms"\n')
    assert config.keys.timing.check_interval == 30 * SECOND
    assert config.keys.timing.max_clock_skew == 1500


# ---- timing relations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "relation"),
    [
        (
            'grace_period = "5m"\njwks_max_age = "10m"',
            "grace_period >= jwks_max_age + max_clock_skew",
        ),
        (
            'rotation_threshold = "3h"',
            "rotation_threshold > grace_period + outage_budget + max_token_ttl "
            "+ check_interval + max_clock_skew",
        ),
        ('key_ttl = "8h"', "key_ttl - rotation_threshold > grace_period"),
        ('check_interval = "90m"', "check_interval <= grace_period / 2"),
        ('lease_ttl = "61m"', "lease_ttl <= grace_period / 2"),
    ],
)
def test_timing_that_breaks_a_relation_is_refused_naming_it(
    tmp_path: Path, keys: str, relation: str
) -> None:
    # "max_token_ttl + max_clock_skew < key_ttl" is implied by the rotation_threshold and key_ttl
    # relations together, so no configuration can break it alone.
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"[keys]\n{keys}\n")
    message = str(info.value)
    assert message.startswith("keys")
    assert relation in message
    assert "grace_period=" in message  # the current settings, to compare against the relation


def test_a_zero_duration_where_one_is_needed_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^keys\.grace_period: .*at least 1 ms"):
        load(tmp_path, "[keys]\ngrace_period = 0\n")


def test_second_scale_timings_validate_for_tests_and_demos(tmp_path: Path) -> None:
    keys = {
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
    text = "[keys]\n" + "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    config = load(tmp_path, text + '[jwt]\ndefault_ttl = "1s"\n')
    assert config.keys.timing.key_ttl == 9 * SECOND
    assert config.keys.timing.rotation_threshold == 5500


# ---- algorithm, jwt -----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", sorted(SUPPORTED_ALGORITHMS))
def test_every_supported_algorithm_is_accepted(tmp_path: Path, algorithm: str) -> None:
    assert load(tmp_path, f'[keys]\nalgorithm = "{algorithm}"\n').keys.algorithm == algorithm


@pytest.mark.parametrize("algorithm", ['"ES999"', '"es256"', '["ES256"]', "256"])
def test_unknown_algorithm_lists_the_supported_ones(tmp_path: Path, algorithm: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"[keys]\nalgorithm = {algorithm}\n")
    assert str(info.value).startswith("keys.algorithm: unknown algorithm")
    assert "use one of ES256, ES384, EdDSA, PS256, RS256" in str(info.value)


def test_jwt_default_ttl_longer_than_max_token_ttl_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"jwt\.default_ttl: .*keys\.max_token_ttl"):
        load(tmp_path, '[jwt]\ndefault_ttl = "61m"\n')


def test_jwt_default_ttl_may_equal_max_token_ttl(tmp_path: Path) -> None:
    config = load(tmp_path, '[keys]\nmax_token_ttl = "2h"\n[jwt]\ndefault_ttl = "2h"\n')
    assert config.jwt.default_ttl == 2 * HOUR


def test_jwt_issuer_and_audience_are_carried(tmp_path: Path) -> None:
    config = load(tmp_path, '[jwt]\nissuer = "https://id.example"\naudience = "api"\n')
    assert config.jwt.issuer == "https://id.example"
    assert config.jwt.audience == "api"


# ---- mistakes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ('[keys]\nkey_tll = "1h"\n', "keys.key_tll"),
        ("[sokcet]\n", "sokcet"),
        ('nodeid = "n1"\n', "nodeid"),
        ('[jwt]\nissuer = "x"\nttl = 5\n', "jwt.ttl"),
        ('[access.sgin]\nusers = ["root"]\n', "access.sgin"),
        ('[access.sign]\nuser = ["root"]\n', "access.sign.user"),
        ('[access.sign]\nusers = ["no-such-user-here"]\n', "access.sign.users"),
        ('[access.sign]\ngroups = ["no-such-group-here"]\n', "access.sign.groups"),
        ("[access.sign]\nuids = [-1]\n", "access.sign.uids"),
        ('[access.jwt]\ngids = ["0"]\n', "access.jwt.gids"),
        ('[access]\nadmin = "root"\n', "access.admin"),
        ('[socket]\nmode = "rw"\n', "socket.mode"),
        ('[socket]\ngroup = "no-such-group-here"\n', "socket.group"),
        ("[socket]\nmax_batch = 0\n", "socket.max_batch"),
        ('keys = "ES256"\n', "keys"),
        ('store = "etcd"\n', "store"),
        ('[store]\nkind = "zookeeper"\n', "store.kind"),
        ('[store]\nprefix = "keyquorum"\n', "store.prefix"),
        ("[store]\npoll_interval = 0\n", "store.poll_interval"),
        ('[store]\nkind = "etcd"\n', "store.endpoints"),
        ('[store]\nkind = "etcd"\nendpoints = ["127.0.0.1:2379"]\n', "store.endpoints"),
        ('[store]\nkind = "etcd"\nendpoints = ["http://a:1"]\nedpoints = 1\n', "store.edpoints"),
        ("[backend]\nkind = 3\n", "backend.kind"),
        ('[backend]\nkind = "aws-kms"\nmode = "sign"\n', "backend.mode: 'sign' is not"),
        ('[backend]\nmode = "remote"\n', "backend.mode: the local backend can only wrap"),
        ('[backend]\nkind = "vault-kv"\nmode = "wrap"\n', "backend.mode: 'wrap' does not go"),
        ('[backend]\nkind = "aws-kms"\nmode = "secret"\n', "backend.mode: 'secret' does not go"),
        ('node_id = "has space"\n', "node_id"),
        ('cluster = ""\n', "cluster"),
        ('log_level = "verbose"\n', "log_level"),
    ],
)
def test_mistakes_are_refused_naming_the_setting(tmp_path: Path, text: str, setting: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(setting)}\b"):
        load(tmp_path, text)


def test_an_unknown_user_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such user 'no-such-user-here'"):
        load(tmp_path, '[access.admin]\nusers = ["no-such-user-here"]\n')


def test_unknown_store_kind_lists_the_kinds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="use one of file, memory, etcd"):
        load(tmp_path, '[store]\nkind = "zookeeper"\n')


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent\.toml: invalid TOML: .*line 3"):
        load(tmp_path, "[keys]\nalgorithm = \n")


def test_missing_explicit_config_file_is_an_error_naming_it(tmp_path: Path) -> None:
    absent = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=f"config file {re.escape(str(absent))} does not exist"):
        load_config(absent, env={})


def test_missing_file_named_by_keyquorum_config_is_an_error(tmp_path: Path) -> None:
    absent = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=re.escape(str(absent))):
        load_config(env={"KEYQUORUM_CONFIG": str(absent)})


# ---- environment --------------------------------------------------------------------------------


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "KEYQUORUM_KEYS__ALGORITHM": "EdDSA",
        "KEYQUORUM_SOCKET__PATH": str(tmp_path / "env.sock"),
        "KEYQUORUM_NODE_ID": "from-env",
        "KEYQUORUM_KEYS__GRACE_PERIOD": '"3h"',
        "KEYQUORUM_KEYS__CHECK_INTERVAL": "30",
        "KEYQUORUM_JWT__DEFAULT_TTL": "10m",
    }
    config = load(
        tmp_path, 'node_id = "from-file"\n[keys]\nalgorithm = "ES384"\ngrace_period = "2h"\n', env
    )
    assert config.keys.algorithm == "EdDSA"
    assert config.socket.path == tmp_path / "env.sock"
    assert config.node_id == "from-env"
    assert config.keys.timing.grace_period == 3 * HOUR
    assert config.keys.timing.check_interval == 30 * SECOND
    assert config.jwt.default_ttl == 10 * MINUTE


def test_environment_values_are_toml_when_they_parse(tmp_path: Path) -> None:
    env = {
        "KEYQUORUM_ACCESS__SIGN": '{users = ["root"], gids = [4242]}',
        "KEYQUORUM_BACKEND__CREATE_KEK": "false",
        "KEYQUORUM_SOCKET__MAX_BATCH": "16",
    }
    config = load(tmp_path, "", env)
    assert config.access.sign == AccessRule(uids=frozenset({0}), gids=frozenset({4242}))
    assert config.backend.options["create_kek"] is False
    assert config.socket.max_batch == 16


def test_a_numeric_environment_value_for_a_text_setting_stays_text(tmp_path: Path) -> None:
    config = load(tmp_path, "", {"KEYQUORUM_NODE_ID": "7", "KEYQUORUM_CLUSTER": '"blue"'})
    assert config.node_id == "7"
    assert config.cluster == "blue"
    assert config.store.prefix == "/keyquorum/blue"


@pytest.mark.parametrize(
    ("name", "named"),
    [
        ("KEYQUORUM_KEYS__KEY_TLL", "keys.key_tll"),
        ("KEYQUORUM_SOKCET__PATH", "sokcet"),
        ("KEYQUORUM_NODEID", "nodeid"),
        ("KEYQUORUM_KEYS", "KEYQUORUM_KEYS__<KEY>"),
        ("KEYQUORUM_NODE_ID__X", "node_id"),
    ],
)
def test_a_misspelt_environment_override_is_refused_naming_the_variable(
    tmp_path: Path, name: str, named: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}: .*{re.escape(named)}"):
        load(tmp_path, "", {name: "1"})


def test_non_override_environment_variables_are_ignored(tmp_path: Path) -> None:
    env = {
        "KEYQUORUM_SOCKET": "/elsewhere.sock",
        "KEYQUORUM_FAULT_COMMIT_DELAY": "3",
        "HOME": str(tmp_path),
        "KEYQUORUMX": "1",
    }
    assert load(tmp_path, "", env).keys.timing == Timing()


def test_extra_store_and_backend_keys_become_options(tmp_path: Path) -> None:
    env = {"KEYQUORUM_STORE__ENDPOINTS": "http://a:2379,http://b:2379"}
    config = load(
        tmp_path,
        '[store]\nkind = "etcd"\n[backend]\nkind = "aws"\nkey_id = "alias/kq"\nregion = "eu"\n',
        env,
    )
    assert config.store.kind == "etcd"
    assert config.store.options["endpoints"] == ["http://a:2379", "http://b:2379"]
    assert config.backend.kind == "aws"
    assert dict(config.backend.options) == {"key_id": "alias/kq", "region": "eu"}
    assert config.backend.mode == "wrap"


def test_keyquorum_config_chooses_the_file_and_an_argument_beats_it(tmp_path: Path) -> None:
    a = tmp_path / "a.toml"
    b = tmp_path / "b.toml"
    a.write_text(f'state_dir = "{tmp_path}"\ncluster = "a"\n')
    b.write_text(f'state_dir = "{tmp_path}"\ncluster = "b"\n')
    assert load_config(env={"KEYQUORUM_CONFIG": str(a)}).cluster == "a"
    assert load_config(b, env={"KEYQUORUM_CONFIG": str(a)}).cluster == "b"


# ---- access -------------------------------------------------------------------------------------


def test_access_rules_resolve_names_and_replace_the_default(tmp_path: Path) -> None:
    config = load(
        tmp_path, '[access.sign]\nusers = ["root"]\ngids = [4242]\n[access.admin]\nuids = []\n'
    )
    assert config.access.sign == AccessRule(uids=frozenset({0}), gids=frozenset({4242}))
    assert config.access.sign.allows(0, 1, frozenset())
    assert config.access.sign.allows(999, 4242, frozenset())
    assert config.access.sign.allows(999, 1, frozenset({4242}))
    assert not config.access.sign.allows(999, 1, frozenset())
    assert not config.access.admin.allows(0, 0, frozenset())
    assert config.access.jwt.allows(os.getuid(), 1, frozenset())  # untouched: the default


def test_group_names_resolve_to_gids(tmp_path: Path) -> None:
    config = load(tmp_path, '[access.jwt]\ngroups = ["root"]\nuids = [1001]\n')
    assert config.access.jwt == AccessRule(uids=frozenset({1001}), gids=frozenset({0}))
    assert config.access.jwt.allows(5000, 5000, frozenset({0}))
    assert not config.access.jwt.allows(0, 5000, frozenset())  # root is not implicit


# ---- socket -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [('"0660"', 0o660), ('"660"', 0o660), ('"0o600"', 0o600), ("0o640", 0o640), ("384", 0o600)],
)
def test_socket_mode_is_octal_text_or_an_integer(tmp_path: Path, mode: str, expected: int) -> None:
    assert load(tmp_path, f"[socket]\nmode = {mode}\n").socket.mode == expected


@pytest.mark.parametrize("mode", ['"0999"', '"rw-rw----"', "0o1777", "-1", "true"])
def test_a_bad_socket_mode_is_refused(tmp_path: Path, mode: str) -> None:
    with pytest.raises(ConfigError, match=r"^socket\.mode: .*0660"):
        load(tmp_path, f"[socket]\nmode = {mode}\n")


def test_socket_group_is_checked_and_carried(tmp_path: Path) -> None:
    config = load(tmp_path, '[socket]\ngroup = "root"\nmax_request_bytes = 4096\n')
    assert config.socket == SocketConfig(
        path=config.socket.path, group="root", max_request_bytes=4096
    )


# ---- paths --------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = conf_dir / "agent.toml"
    path.write_text(
        'state_dir = "state"\n[socket]\npath = "run/a.sock"\nmode = "0600"\n'
        '[store]\npath = "data/keyset"\n[backend]\nkek_file = "secret/kek"\n'
    )
    config = load_config(path, env={})
    assert config.state_dir == conf_dir / "state"
    assert config.socket.path == conf_dir / "run" / "a.sock"
    assert config.socket.mode == 0o600
    assert config.store.path == conf_dir / "data" / "keyset"
    assert config.backend.options["kek_file"] == str(conf_dir / "secret" / "kek")


def test_a_relative_state_dir_carries_the_derived_defaults(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('state_dir = "st"\n')
    config = load_config(path, env={})
    assert config.store.path == tmp_path / "st" / "keyset.store"
    assert config.backend.options["kek_file"] == str(tmp_path / "st" / "kek")


def test_state_dir_prefers_systemds_state_directory() -> None:
    assert default_state_dir({"STATE_DIRECTORY": "/srv/kq:/srv/other"}) == Path("/srv/kq")


def test_state_dir_for_root_is_var_lib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_state_dir({}) == Path("/var/lib/keyquorum")


def test_state_dir_for_a_user_follows_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    as_user(monkeypatch)
    assert default_state_dir({"XDG_STATE_HOME": "/h/st", "HOME": "/h"}) == Path("/h/st/keyquorum")
    assert default_state_dir({"HOME": "/h"}) == Path("/h/.local/state/keyquorum")


def test_default_socket_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_socket_path(
        {"KEYQUORUM_SOCKET": "/x/y.sock", "RUNTIME_DIRECTORY": "/r"}
    ) == Path("/x/y.sock")
    assert default_socket_path({"RUNTIME_DIRECTORY": "/run/kq"}) == Path("/run/kq/agent.sock")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_socket_path({"XDG_RUNTIME_DIR": "/u"}) == Path("/run/keyquorum/agent.sock")
    as_user(monkeypatch)
    assert default_socket_path({"XDG_RUNTIME_DIR": "/u"}) == Path("/u/keyquorum/agent.sock")
    assert default_socket_path({"HOME": "/h"}) == Path("/h/.local/state/keyquorum/agent.sock")


def test_loaded_socket_path_uses_the_same_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_user(monkeypatch)
    config = load(tmp_path, "", {"XDG_RUNTIME_DIR": str(tmp_path / "rt")})
    assert config.socket.path == tmp_path / "rt" / "keyquorum" / "agent.sock"
    assert config.socket.path == default_socket_path({"XDG_RUNTIME_DIR": str(tmp_path / "rt")})
    assert load(tmp_path, "", {}).socket.path == tmp_path / "state" / "agent.sock"


# ---- store and backend --------------------------------------------------------------------------


def test_store_prefix_defaults_to_the_cluster(tmp_path: Path) -> None:
    assert load(tmp_path, 'cluster = "blue"\n').store.prefix == "/keyquorum/blue"


def test_memory_store_and_a_poll_interval_duration_are_accepted(tmp_path: Path) -> None:
    config = load(tmp_path, '[store]\nkind = "memory"\npoll_interval = "50ms"\n')
    assert config.store.kind == "memory"
    assert config.store.poll_interval == 0.05


def test_local_backend_options_keep_what_is_given(tmp_path: Path) -> None:
    config = load(tmp_path, '[backend]\nkek_file = "/k/kek"\ncreate_kek = false\n')
    assert dict(config.backend.options) == {"kek_file": "/k/kek", "create_kek": False}


# ---- the example --------------------------------------------------------------------------------


def test_the_example_config_validates_and_states_the_defaults(
    tmp_path: Path, no_system_config: None
) -> None:
    env = {"STATE_DIRECTORY": str(tmp_path)}
    config = load_config(EXAMPLE, env=env)
    defaults = load_config(env=env)
    assert dataclasses.replace(config, node_id=defaults.node_id) == defaults


def test_the_example_config_mentions_every_setting() -> None:
    text = EXAMPLE.read_text()
    tomllib.loads(text)
    names = [
        "node_id",
        "cluster",
        "state_dir",
        "log_level",
        *(f"[access.{p}]" for p in ("sign", "jwt", "admin")),
        *("users", "uids", "groups", "gids"),
        *(f.name for f in dataclasses.fields(SocketConfig)),
        "algorithm",
        *(f.name for f in dataclasses.fields(Timing)),
        *(f.name for f in dataclasses.fields(JwtConfig)),
        *("kind", "path", "prefix", "poll_interval", "kek_file", "create_kek"),
    ]
    missing = [name for name in names if name not in text]
    assert missing == []


def test_the_secret_store_kinds_are_the_registry_s() -> None:
    from agent.config import _SECRET_STORE_KINDS
    from backends.registry import SECRET_STORES

    assert set(SECRET_STORES) == _SECRET_STORE_KINDS


def test_secret_store_kinds_imply_secret_mode(tmp_path: Path) -> None:
    config = load(tmp_path, '[backend]\nkind = "vault-kv"\naddress = "http://127.0.0.1:1"\n')
    assert config.backend.mode == "secret"
