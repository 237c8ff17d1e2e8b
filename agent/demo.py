"""`keyquorum demo`: a local cluster rotating every few seconds while clients sign through it.

By default: a 3-member etcd cluster on loopback and three `keyquorum run` processes sharing one
key set, with second-scale timings; clients sign on every node, a verifier per node re-fetches the
JWKS at the advertised max-age, and every signature is checked against what verifiers held.
`--kill-leader` kills the leader (kill -9) part-way through to show failover; `--single` runs one
agent on the embedded file store instead. A line per second, then a summary; exit status 0 only
if no request failed (outside a node the demo itself killed) and every signature verified.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.client import AgentError, AgentUnreachable, Client
from agent.crypto import verify_signature

DEMO_TIMING = """
[keys]
algorithm = "ES256"
key_ttl = "9s"
rotation_threshold = "5.5s"
grace_period = "1.5s"
check_interval = "250ms"
jwks_max_age = "1s"
max_clock_skew = "200ms"
max_token_ttl = "1s"
outage_budget = "1s"
lease_ttl = "500ms"

[jwt]
default_ttl = "1s"
"""


def demo_config(workdir: Path) -> Path:
    """Write a demo config under `workdir` and return its path."""
    config = workdir / "agent.toml"
    config.write_text(
        f'node_id = "demo-1"\nstate_dir = "{workdir / "state"}"\n\n'
        f'[socket]\npath = "{workdir / "agent.sock"}"\n\n'
        f'[store]\nkind = "file"\npath = "{workdir / "state" / "keyset.store"}"\n'
        f"poll_interval = 0.1\n\n"
        f'[backend]\nkind = "local"\nkek_file = "{workdir / "state" / "kek"}"\n' + DEMO_TIMING
    )
    return config


@contextlib.contextmanager
def agent_process(
    config: Path,
    socket_path: Path,
    *,
    ready_timeout: float = 20.0,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `keyquorum run --config config`, wait until it can sign, stop it with SIGTERM."""
    log_path = config.parent / "agent.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited with {proc.returncode}:\n{log_path.read_text()}")
            if socket_path.exists():
                try:
                    with Client(socket_path, timeout=2.0) as client:
                        ok, _ = client.healthz()
                        if ok:
                            break
                except AgentError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"agent not ready after {ready_timeout}s:\n{log_path.read_text()}"
                )
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class LoadReport:
    """What a load run saw: every signature, every JWKS snapshot, every failure."""

    signatures: list[tuple[float, float, str, bytes, bytes]] = field(default_factory=list)
    snapshots: list[tuple[float, float, dict[str, Any]]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def kids(self) -> list[str]:
        seen: list[str] = []
        for _, _, kid, _, _ in self.signatures:
            if kid not in seen:
                seen.append(kid)
        return seen

    def unverifiable(self, max_age: float, validity: float) -> list[str]:
        """Signatures that fail against some JWKS fetched within `max_age` before signing or
        within `validity` after it (what any verifier with a fresh-enough cache would hold).

        A kid is a thumbprint of its key, so each signature is verified once against its JWK and
        then only the kid's presence is checked in every snapshot of the window."""
        snapshots = sorted(self.snapshots, key=lambda s: s[0])
        starts = [s[0] for s in snapshots]
        kid_sets = [{k.get("kid") for k in jwks["keys"]} for _, _, jwks in snapshots]
        jwks_by_kid = {k["kid"]: k for _, _, jwks in snapshots for k in jwks["keys"] if "kid" in k}
        bad = []
        for send, recv, kid, payload, signature in self.signatures:
            jwk = jwks_by_kid.get(kid)
            if jwk is None or not verify_signature(jwk, payload, signature):
                bad.append(f"signature by {kid} at {send:.3f} does not verify against any JWKS")
                continue
            first = bisect.bisect_left(starts, recv - max_age)
            last = bisect.bisect_right(starts, send + validity)
            for i in range(first, last):
                j_send, j_recv, _ = snapshots[i]
                before = j_recv <= send
                after = j_send >= recv and j_recv <= send + validity
                if (before or after) and kid not in kid_sets[i]:
                    bad.append(
                        f"{kid} (signed at {send:.3f}) missing from the JWKS of {j_send:.3f}"
                    )
                    break
        return bad


def run_load(
    socket_path: Path,
    seconds: float,
    clients: int,
    report: LoadReport,
    *,
    on_tick: Any = None,
    stop_early: threading.Event | None = None,
) -> None:
    """Sign from `clients` threads and poll the JWKS at its max-age for `seconds`, or until
    `stop_early` is set."""
    deadline = time.monotonic() + seconds

    def running() -> bool:
        return time.monotonic() < deadline and not (stop_early is not None and stop_early.is_set())

    def signer(n: int) -> None:
        with Client(socket_path) as client:
            i = 0
            while running():
                payload = f"client {n} message {i}".encode()
                i += 1
                send = time.monotonic()
                try:
                    result = client.sign(payload)
                except AgentError as exc:
                    with report.lock:
                        report.failures.append(
                            f"client {n}: {exc.status} {exc.code}: {exc.message}"
                        )
                    if isinstance(exc, AgentUnreachable):
                        time.sleep(0.05)  # the agent is gone (killed?): do not spin
                    continue
                recv = time.monotonic()
                with report.lock:
                    report.signatures.append((send, recv, result.kid, payload, result.signature))

    def verifier() -> None:
        with Client(socket_path) as client:
            while running():
                send = time.monotonic()
                try:
                    jwks, max_age = client.jwks_with_max_age()
                except AgentError:
                    time.sleep(0.2)
                    continue
                recv = time.monotonic()
                with report.lock:
                    report.snapshots.append((send, recv, jwks))
                time.sleep(min(max_age or 1, 0.2))

    threads = [threading.Thread(target=signer, args=(n,), daemon=True) for n in range(clients)]
    threads.append(threading.Thread(target=verifier, daemon=True))
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=1.0 / len(threads))
        if on_tick is not None:
            on_tick()
    for t in threads:
        t.join()


CLUSTER_TIMING = """
[keys]
algorithm = "ES256"
key_ttl = "23s"
rotation_threshold = "16s"
grace_period = "4s"
check_interval = "250ms"
jwks_max_age = "1s"
max_clock_skew = "200ms"
max_token_ttl = "1s"
outage_budget = "10s"
lease_ttl = "2s"

[jwt]
default_ttl = "1s"
"""


def cluster_configs(
    workdir: Path,
    endpoints: list[str],
    count: int = 3,
    *,
    prefix: str = "/keyquorum/demo",
    timing: str = CLUSTER_TIMING,
    log_level: str | None = None,
) -> list[Path]:
    """One config per node under workdir/n<i>, all on the same etcd prefix and the same KEK;
    `timing` is the [keys] and [jwt] tables."""
    kek = os.urandom(32)
    configs = []
    for i in range(1, count + 1):
        node = workdir / f"n{i}"
        state = node / "state"
        state.mkdir(parents=True, exist_ok=True)
        (state / "kek").write_bytes(kek)
        (state / "kek").chmod(0o600)
        config = node / "agent.toml"
        config.write_text(
            f'node_id = "n{i}"\nstate_dir = "{state}"\n'
            + (f'log_level = "{log_level}"\n' if log_level else "")
            + f'\n[socket]\npath = "{node / "agent.sock"}"\n\n'
            f'[store]\nkind = "etcd"\nendpoints = {endpoints!r}\nprefix = "{prefix}"\n'
            f"timeout = 1.0\n\n"
            f'[backend]\nkind = "local"\nkek_file = "{state / "kek"}"\n' + timing
        )
        configs.append(config)
    return configs


def run_demo(args: argparse.Namespace) -> int:
    if not args.single:
        return run_cluster_demo(args)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="kq-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = demo_config(workdir)
    socket_path = workdir / "agent.sock"
    print(
        f"keyquorum demo: one agent in {workdir}, keys rotate every ~3.5 s; "
        f"{args.clients} clients sign for {args.duration:g} s"
    )
    report = LoadReport()
    start = time.monotonic()
    try:
        with agent_process(config, socket_path), Client(socket_path) as watcher:
            last = [0]

            def tick() -> None:
                status = watcher.status()
                with report.lock:
                    count = len(report.signatures)
                    failures = len(report.failures)
                states = " ".join(f"{k['kid'][:6]}:{k['state']}" for k in status["keys"])
                rate = count - last[0]
                last[0] = count
                print(
                    f"  t={time.monotonic() - start:5.1f}s  "
                    f"signing={str(status['signing_kid'])[:8]}  "
                    f"{rate:5d} sig/s  failed={failures}  keys: {states}",
                    flush=True,
                )

            run_load(socket_path, args.duration, args.clients, report, on_tick=tick)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    bad = report.unverifiable(max_age=1.0, validity=1.0)
    kids = report.kids()
    print(
        f"summary: {len(report.signatures)} signatures with {len(kids)} keys "
        f"({max(0, len(kids) - 1)} rotations), {len(report.failures)} failed requests, "
        f"{len(bad)} unverifiable, {len(report.snapshots)} JWKS fetches"
    )
    for line in (report.failures + bad)[:10]:
        print(f"  {line}")
    return 0 if not report.failures and not bad else 1


def run_cluster_demo(args: argparse.Namespace) -> int:
    from consensus.local_etcd import LocalEtcd, find_etcd

    try:
        find_etcd()
    except FileNotFoundError as exc:
        print(f"keyquorum demo: {exc}; or run `keyquorum demo --single`", file=sys.stderr)
        return 2
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="kq-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"keyquorum demo: 3-member etcd + 3 agents in {workdir}; keys rotate every ~7 s; "
        f"{args.clients} clients per node sign for {args.duration:g} s"
    )
    etcd = LocalEtcd(workdir / "etcd", size=3)
    configs = cluster_configs(workdir, [])
    reports = {f"n{i}": LoadReport() for i in range(1, 4)}
    killed: dict[str, float] = {}
    terms: set[int] = set()
    start = time.monotonic()
    try:
        etcd.start()
        configs = cluster_configs(workdir, etcd.endpoints)
        with contextlib.ExitStack() as stack:
            procs = {}
            for config in configs:
                name = config.parent.name
                procs[name] = stack.enter_context(
                    agent_process(config, config.parent / "agent.sock")
                )
            print(f"  cluster up in {time.monotonic() - start:.1f}s; signing starts")
            start = time.monotonic()
            last = dict.fromkeys(reports, 0)

            def tick() -> None:
                elapsed = time.monotonic() - start
                alive = [n for n in procs if n not in killed]
                statuses = {}
                for name in alive:
                    with (
                        contextlib.suppress(AgentError),
                        Client(workdir / name / "agent.sock", timeout=2) as client,
                    ):
                        statuses[name] = client.status()
                leaders = [n for n, st in statuses.items() if st["role"] == "leader"]
                for st in statuses.values():
                    if st["role"] == "leader" and st["term"]:
                        terms.add(st["term"])
                any_status = next(iter(statuses.values()), None)
                keys = (
                    " ".join(f"{k['kid'][:6]}:{k['state']}" for k in any_status["keys"])
                    if any_status
                    else "?"
                )
                rates = []
                for name, report in reports.items():
                    with report.lock:
                        count = len(report.signatures)
                    rates.append(f"{name} {count - last[name]:4d}/s")
                    last[name] = count
                failed = sum(len(r.failures) for n, r in reports.items() if n not in killed)
                leader = leaders[0] if leaders else "(electing)"
                if leaders and statuses[leaders[0]]["term"]:
                    leader += f" (term {statuses[leaders[0]]['term']})"
                down = f"  down: {','.join(killed)}" if killed else ""
                print(
                    f"  t={elapsed:5.1f}s  leader={leader}  {'  '.join(rates)}  "
                    f"failed={failed}{down}  keys: {keys}",
                    flush=True,
                )
                if args.kill_leader and not killed and elapsed >= args.duration * 0.4 and leaders:
                    victim = leaders[0]
                    procs[victim].kill()
                    killed[victim] = time.monotonic()
                    print(f"  >>> kill -9 of the leader {victim}", flush=True)

            threads = [
                threading.Thread(
                    target=run_load,
                    args=(workdir / name / "agent.sock", args.duration, args.clients, report),
                    daemon=True,
                )
                for name, report in reports.items()
            ]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                time.sleep(1.0)
                tick()
    finally:
        etcd.stop()
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    merged = LoadReport()
    excused = 0
    for name, report in reports.items():
        merged.signatures.extend(report.signatures)
        merged.snapshots.extend(report.snapshots)
        if name in killed:
            excused += len(report.failures)  # the node the demo killed: its own downtime
        else:
            merged.failures.extend(report.failures)
    bad = merged.unverifiable(max_age=1.0, validity=1.0)
    kids = merged.kids()
    print(
        f"summary: {len(merged.signatures)} signatures on 3 nodes with {len(kids)} keys "
        f"({max(0, len(kids) - 1)} rotations), {len(terms)} leader term(s), "
        f"{len(merged.failures)} failed requests"
        + (f" (+{excused} on the killed node after its death)" if killed else "")
        + f", {len(bad)} unverifiable, {len(merged.snapshots)} JWKS fetches"
    )
    for line in (merged.failures + bad)[:10]:
        print(f"  {line}")
    return 0 if not merged.failures and not bad else 1
