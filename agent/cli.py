"""The `keyquorum` command line (DESIGN.md §6).

`run` starts the daemon in the foreground; every other command talks to a running agent over its
Unix socket with `agent.client.Client` (admin commands need the admin permission there).
Exit codes: 0 success, 1 the agent refused or failed, 2 usage or configuration error,
3 the agent is unreachable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.client import AgentError, AgentUnreachable, Client
from agent.config import AgentConfig, ConfigError, default_socket_path, load_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(_protect_kids(list(sys.argv[1:] if argv is None else argv)))
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "run":
        return _run(args)
    if args.command == "demo":
        from agent.demo import run_demo

        try:
            return run_demo(args)
        except KeyboardInterrupt:  # Ctrl-C: every agent and etcd member is stopped on the way out
            print("\ninterrupted: the demo's processes are stopped", file=sys.stderr)
            return 130
    if args.command == "backend":
        return _backend(args)
    if args.command == "config":
        return _config(args)
    socket_path = Path(args.socket) if args.socket else default_socket_path()
    try:
        with Client(socket_path) as client:
            return int(args.func(client, args) or 0)
    except AgentUnreachable as exc:
        print(f"keyquorum: {exc.message}", file=sys.stderr)
        return 3
    except AgentError as exc:
        print(f"keyquorum: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except _UsageError as exc:
        print(f"keyquorum: {exc}", file=sys.stderr)
        return 2


class _UsageError(Exception):
    pass


def _protect_kids(argv: list[str]) -> list[str]:
    """A kid is base64url and may start with '-': keep argparse from reading it as an option."""
    if "revoke" in argv:
        i = argv.index("revoke") + 1
        if i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-h", "--help", "--"):
            argv.insert(i, "--")
    return argv


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyquorum", description="A distributed key agent: sign over a local socket."
    )
    parser.add_argument(
        "--socket", help="agent socket (default: $KEYQUORUM_SOCKET or the runtime dir)"
    )
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run the agent in the foreground")
    run.add_argument(
        "--config",
        type=Path,
        help="agent.toml (default: $KEYQUORUM_CONFIG or /etc/keyquorum/agent.toml)",
    )

    demo = sub.add_parser("demo", help="a local cluster signing under load while it rotates fast")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds to run (default 30)")
    demo.add_argument("--clients", type=int, default=4, help="concurrent signing clients per node")
    demo.add_argument("--dir", type=Path, help="working directory (default: a temporary one)")
    demo.add_argument("--single", action="store_true", help="one agent on the file store, no etcd")
    demo.add_argument(
        "--kill-leader", action="store_true", help="kill -9 the leader part-way through"
    )

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    config_check = config_sub.add_parser(
        "check", help="validate the configuration, print it and its timing budget"
    )
    config_check.add_argument("--config", type=Path, help="agent.toml (default: as for run)")
    config_check.add_argument("--json", action="store_true", help="print it as JSON")

    backend = sub.add_parser("backend", help="key-protection backend tools")
    backend_sub = backend.add_subparsers(dest="backend_command", required=True)
    check = backend_sub.add_parser(
        "check", help="wrap and unwrap a probe key, and open the stored keys, with this config"
    )
    check.add_argument("--config", type=Path, help="agent.toml (default: as for run)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument(
        "--no-keyset", action="store_true", help="skip opening the keys stored in the key set"
    )

    status = sub.add_parser("status", help="leader, members, keys and health")
    status.add_argument("--json", action="store_true", help="print the raw status document")
    status.set_defaults(func=_status)

    sign = sub.add_parser("sign", help="sign bytes (from --data, a file, or stdin)")
    sign.add_argument("file", nargs="?", default="-", help="file to sign, '-' for stdin")
    sign.add_argument("--data", help="sign this string (UTF-8) instead of a file")
    sign.set_defaults(func=_sign)

    jwt = sub.add_parser("jwt", help="issue a JWT")
    jwt.add_argument("--claims", default="{}", help="claims as a JSON object")
    jwt.add_argument(
        "--claim", action="append", default=[], metavar="NAME=VALUE", help="add a string claim"
    )
    jwt.add_argument("--ttl", type=int, help="lifetime in seconds (capped by the agent)")
    jwt.add_argument("--json", action="store_true", help="print the whole response")
    jwt.set_defaults(func=_jwt)

    jwks = sub.add_parser("jwks", help="print the published JWK Set")
    jwks.set_defaults(func=lambda c, a: _print_json(c.jwks()))

    rotate = sub.add_parser(
        "rotate", help="create the next key now (activates after the grace period)"
    )
    rotate.set_defaults(func=lambda c, a: _print_json(_strip_status(c.rotate())))

    rollback = sub.add_parser("rollback", help="make the previous key sign again")
    rollback.set_defaults(func=lambda c, a: _print_json(_strip_status(c.rollback())))

    revoke = sub.add_parser("revoke", help="withdraw a key at once (compromise)")
    revoke.add_argument("kid")
    revoke.set_defaults(func=lambda c, a: _print_json(_strip_status(c.revoke(a.kid))))

    imp = sub.add_parser("import", help="adopt an existing private key (PEM) as the next key")
    imp.add_argument("pem", type=Path)
    imp.add_argument("--alg", help="algorithm (default: inferred from the key type)")
    imp.set_defaults(func=_import)
    return parser


def _run(args: argparse.Namespace) -> int:
    import trio

    from agent.daemon import Agent, unwrap_single
    from agent.factory import backend_deadline, build_election, build_store, build_wrapper
    from agent.httpd import SocketInUse
    from backends.base import BackendError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"keyquorum: configuration error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config)
    log = logging.getLogger("keyquorum")

    async def serve() -> None:
        store = build_store(config)
        wrapper = await build_wrapper(config)
        agent = Agent(
            config,
            store,
            wrapper,
            election=build_election(config),
            backend_timeout=backend_deadline(wrapper),
            clock=_clock(),
        )
        log.info("agent %s starting; socket %s", config.node_id, config.socket.path)
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, agent)
                await agent.run()
                nursery.cancel_scope.cancel()
        await store.aclose()

    try:
        trio.run(serve)
    except SocketInUse as exc:
        print(f"keyquorum: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, BackendError) as exc:
        print(f"keyquorum: cannot start: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _config(args: argparse.Namespace) -> int:
    """`keyquorum config check`: exit 0 and print the configuration, or 2 naming the mistake."""
    from agent.config_check import budget, effective, render

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"keyquorum: configuration error: {exc}", file=sys.stderr)
        return 2
    source = str(args.config) if args.config else "defaults and KEYQUORUM_* environment"
    if args.json:
        return _print_json({"config": effective(config), "budget": budget(config)})
    print(render(config, source))
    return 0


def _backend(args: argparse.Namespace) -> int:
    """`keyquorum backend check`: exit 0 when every step passed, 1 when one failed."""
    import trio

    from agent.backend_check import check_backend

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"keyquorum: configuration error: {exc}", file=sys.stderr)
        return 2
    report = trio.run(lambda: check_backend(config, with_keyset=not args.no_keyset))
    if args.json:
        _print_json(report.as_dict())
    else:
        print(report.render())
    return 0 if report.ok else 1


def _clock() -> Callable[[], int]:
    """The agent's wall clock; chaos tests skew it with KEYQUORUM_FAULT_CLOCK_OFFSET_MS (as a
    node whose clock is off by that much would be, within keys.max_clock_skew)."""
    from agent.daemon import wall_ms

    offset = int(os.environ.get("KEYQUORUM_FAULT_CLOCK_OFFSET_MS", "0") or 0)
    if not offset:
        return wall_ms
    logging.getLogger("keyquorum").warning("fault injection: clock offset %+d ms", offset)
    return lambda: wall_ms() + offset


async def _stop_on_signal(agent: Any) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logging.getLogger("keyquorum").info(
                "received %s: draining and stopping", signal.Signals(signum).name
            )
            agent.shutdown()
            return


def _setup_logging(config: AgentConfig) -> None:
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _print_json(value: Any) -> int:
    print(json.dumps(value, indent=2, sort_keys=True))
    return 0


def _strip_status(response: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in response.items() if k != "status"}


def _sign(client: Client, args: argparse.Namespace) -> int:
    if args.data is not None:
        data = args.data.encode()
    elif args.file == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(args.file).read_bytes()
        except OSError as exc:
            raise _UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    result = client.sign(data)
    from agent.client import b64url_encode

    return _print_json(
        {"kid": result.kid, "alg": result.alg, "signature": b64url_encode(result.signature)}
    )


def _jwt(client: Client, args: argparse.Namespace) -> int:
    try:
        claims = json.loads(args.claims)
    except json.JSONDecodeError as exc:
        raise _UsageError(f"--claims is not valid JSON: {exc}") from None
    if not isinstance(claims, dict):
        raise _UsageError("--claims must be a JSON object")
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise _UsageError(f"--claim {item!r} must look like NAME=VALUE")
        claims[name] = value
    result = client.jwt(claims, args.ttl)
    if args.json:
        return _print_json(
            {"token": result.token, "kid": result.kid, "expires_at": result.expires_at}
        )
    print(result.token)
    return 0


def _import(client: Client, args: argparse.Namespace) -> int:
    try:
        pem = args.pem.read_bytes()
    except OSError as exc:
        raise _UsageError(f"cannot read {args.pem}: {exc.strerror}") from None
    return _print_json(_strip_status(client.import_pem(pem, args.alg)))


def _status(client: Client, args: argparse.Namespace) -> int:
    doc = client.status()
    if args.json:
        return _print_json(doc)
    health = doc["health"]
    print(
        f"node      {doc['node_id']}  ({doc['role']}; leader {doc['leader']}, term {doc['term']})"
    )
    print(f"health    {health['status']}")
    for reason in health["reasons"]:
        print(f"          - {reason}")
    print(f"signing   {doc['signing_kid']}")
    print(
        f"key set   generation {doc['generation']} "
        f"(store revision {doc['revision']}; {doc['store']})"
    )
    if doc.get("plan"):
        print(f"policy    {doc['plan']['reason']}")
    print()
    rows = [("KID", "ALG", "STATE", "ACTIVATES", "STOPS SIGNING", "EXPIRES", "LOADED")]
    for key in doc["keys"]:
        rows.append(
            (
                key["kid"][:16],
                key["alg"],
                key["state"] + (f" ({key['withdrawn']})" if key["withdrawn"] else ""),
                key["activate_at"] or "unscheduled",
                key["deactivate_at"],
                key["expires_at"],
                "yes" if key["loaded"] else "no",
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print()
    print("members")
    for m in doc["members"]:
        print(f"  {m['node_id']}: signing {m['signing']}, holds {len(m['loaded'])} key(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] if len(sys.argv) > 1 else None))
