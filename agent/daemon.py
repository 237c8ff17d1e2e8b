"""The agent daemon: the trio shell around the pure core (`agent.policy`) and the keyring.

Tasks, all in one nursery owned by `Agent.run`:
    watch   follows the key-set store; installs every valid newer document, reports and ignores
            invalid ones (the last good set stays in use, DESIGN.md §3);
    loader  unwraps every key the set says this agent may need, retrying with backoff while the
            backend is unavailable; signing goes on with what is loaded (DESIGN.md §9.1);
    leader  evaluates the policy and commits its decisions with compare-and-swap writes; on a
            single node this agent is always the leader (the etcd election arrives with the
            cluster store);
    server  the HTTP/1.1 Unix-socket API (`agent.api`).
Shutdown is `Agent.shutdown()`: the server drains in-flight requests, then the nursery is cancelled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import trio

from agent.audit import AuditLog, lifecycle_events
from agent.config import AgentConfig
from agent.crypto import (
    PrivateKey,
    Signer,
    SigningKey,
    endorse_async,
    generate_private_key,
    load_pkcs8,
    private_key_to_pkcs8,
)
from agent.keyring import Keyring, NotReady
from agent.keyset import KeyRecord, KeySet, KeySetInvalid, dump_keyset, parse_keyset
from agent.metrics import Metrics
from agent.policy import (
    Action,
    CreateKey,
    MemberView,
    Plan,
    PolicyRefusal,
    apply_plan_edits,
    evaluate,
    published_keys,
    rollback_to,
    rotate_now,
    signing_key,
    vouched_max_age,
)
from agent.policy import revoke as policy_revoke
from agent.policy import rollback as policy_rollback
from agent.systemd import Notifier
from backends.base import (
    BackendConfigError,
    BackendDenied,
    BackendError,
    KeyWrapper,
    RemoteSigner,
    SecretStore,
)
from backends.envelope import open_sealed, seal
from backends.remote import RemoteKeySigner, is_remote, jwk_of_pem, remote_private, remote_ref
from backends.secret_keys import decode_value, encode_value, is_secret, secret_private, secret_ref
from consensus.election import Election
from consensus.store import FencedOut, KeySetStore, StoreConflict, StoreError, Versioned

log = logging.getLogger("keyquorum.agent")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        store: KeySetStore,
        wrapper: KeyWrapper | RemoteSigner | SecretStore,
        *,
        clock: Callable[[], int] = wall_ms,
        backend_timeout: float = 10.0,
        election: Election | None = None,
    ) -> None:
        self.config = config
        self.timing = config.keys.timing
        self.store = store
        self.wrapper = wrapper
        # backend.mode = "remote": keys are created in and sign through the KMS/HSM.
        self.remote: RemoteSigner | None = wrapper if isinstance(wrapper, RemoteSigner) else None
        self._next_reconcile = 0
        # backend.kind = a secret store: each key is a version of one versioned secret.
        self.secrets: SecretStore | None = wrapper if isinstance(wrapper, SecretStore) else None
        self._stable_ref: dict[str, str] | None = None  # last `stable` label we know of
        # When this agent last confirmed its key-set view current (a read of the store that
        # succeeded, timed from before it was sent): the JWKS it may serve depends on it.
        self.confirmed_at: int | None = None
        self.clock = clock
        self.backend_timeout = backend_timeout
        self.node_id = config.node_id
        self.keyring = Keyring()
        self.revision = 0  # store revision of the key set in use
        self.metrics = Metrics()
        self.problems: dict[str, str] = {}  # area -> human-readable problem (status/health)
        self.last_plan: Plan | None = None
        self.started_at = clock()
        self.ready = trio.Event()  # set once this agent can sign
        self._changed = trio.Event()
        self._write_lock = trio.Lock()
        self._store_lost_document = False
        self._bad_revision = 0  # revision of an invalid document seen in the store, if any
        self._shutdown: Callable[[], None] | None = None
        # Cluster mode: the etcd election and the member reports it last read (None: one node).
        self.election = election
        self._member_reports: dict[str, dict[str, Any]] = {}
        self.notifier = Notifier()
        self.jwks_listener: Any = None  # agent.jwks_http.JwksListener when [jwks] listen is set
        self.audit = AuditLog(
            config.node_id,
            config.state_dir / "audit.jsonl",
            etcd=getattr(store, "client", None) if config.store.kind == "etcd" else None,
            prefix=config.store.prefix,
            clock=clock,
        )
        # Chaos tests only (KEYQUORUM_FAULT_COMMIT_DELAY): seconds between deciding and writing.
        self.fault_commit_delay = float(os.environ.get("KEYQUORUM_FAULT_COMMIT_DELAY", "0") or 0)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from agent.api import Api
        from agent.httpd import UnixHttpServer
        from agent.systemd import listen_sockets

        inherited = listen_sockets()
        if inherited:
            log.info("serving the socket(s) systemd passed: %s", ", ".join(sorted(inherited)))
        api = Api(self)
        server = UnixHttpServer(
            api.handle,
            self.config.socket.path,
            fast=api.fast,
            instant=api.sign_now,
            inherited=inherited.get("api"),
            mode=self.config.socket.mode,
            gid=_group_id(self.config.socket.group),
            max_body_bytes=self.config.socket.max_request_bytes,
        )
        self.server = server
        self._shutdown = server.shutdown
        await self._initial_load()
        with unwrap_single(), contextlib.closing(api):
            async with trio.open_nursery() as nursery:
                if self.election is not None:
                    await nursery.start(self.election.run)
                nursery.start_soon(self._watch_loop)
                nursery.start_soon(self._loader_loop)
                nursery.start_soon(self._leader_loop)
                nursery.start_soon(self._systemd_loop)
                nursery.start_soon(self._audit_loop)
                nursery.start_soon(self._confirm_loop)
                if self.config.socket.workers > 1:
                    from agent.workers import WorkerPool

                    pool = WorkerPool(self, api.handle, server, self.config.socket.workers)
                    nursery.start_soon(pool.run)
                if self.config.jwks is not None:
                    from agent.jwks_http import JwksListener

                    self.jwks_listener = JwksListener(self, self.config.jwks)
                    await nursery.start(self.jwks_listener.serve)
                await server.serve(task_status=task_status)
                if self.election is not None:
                    await self.election.resign()
                nursery.cancel_scope.cancel()
        log.info("agent %s stopped", self.node_id)

    async def _audit_loop(self) -> None:
        """Copy audit events to etcd in the background (never in the way of a key write)."""
        self._audit_started()
        while True:
            await self.audit.flush()
            await trio.sleep(0.5)

    def _audit_started(self) -> None:
        """`agent_started`, and `config_changed` when the configuration differs from the last
        start's (its digest is kept in the state directory)."""
        from agent.config_check import effective

        document = json.dumps(effective(self.config), sort_keys=True).encode()
        digest = hashlib.sha256(document).hexdigest()
        marker = self.config.state_dir / "config.sha256"
        try:
            previous = marker.read_text().strip()
        except OSError:
            previous = None
        self.audit.record("agent_started", {"node": self.node_id}, config_sha256=digest)
        if previous is not None and previous != digest:
            self.audit.record(
                "config_changed", {"node": self.node_id}, previous=previous, current=digest
            )
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(digest + "\n")
        except OSError as exc:
            log.warning("cannot remember the configuration digest in %s: %s", marker, exc)

    def shutdown(self) -> None:
        """Stop accepting requests, let in-flight ones finish, then stop every task."""
        self.notifier.stopping()
        if self._shutdown is not None:
            self._shutdown()

    def status_line(self) -> str:
        """One line for systemd's STATUS= (shown by `systemctl status`)."""
        role, leader, term = self.role()
        state, reasons = self.health()
        try:
            kid = self.keyring.current(self.clock()).kid[:12]
        except NotReady:
            kid = "none"
        line = f"{state}; {role}" + (f" (term {term})" if term else f", leader {leader}")
        line += f"; signing with {kid}"
        return line + (f"; {reasons[0]}" if reasons else "")

    async def _systemd_loop(self) -> None:
        """READY=1 once this agent can sign, STATUS= as it changes, WATCHDOG=1 from the loop."""
        notifier = self.notifier
        if not notifier.enabled:
            return
        period = notifier.watchdog_interval or 1.0
        while not self.ready.is_set():
            notifier.status(f"starting: {self.status_line()}")
            if notifier.watchdog_interval:
                notifier.watchdog()
            with trio.move_on_after(period):
                await self.ready.wait()
        notifier.ready(self.status_line())
        while True:
            notifier.status(self.status_line())
            if notifier.watchdog_interval:
                notifier.watchdog()
            await trio.sleep(period)

    # ---- following the store -----------------------------------------------------------------

    async def _initial_load(self) -> None:
        sent = self.clock()
        try:
            with trio.fail_after(self.backend_timeout):
                current = await self.store.get()
        except (StoreError, trio.TooSlowError) as exc:
            self._problem(
                "store", f"cannot read the key-set store ({self.store.description}): {exc}"
            )
            return
        self._absorb(current)
        self.confirmed_at = sent

    async def _confirm_loop(self) -> None:
        """Re-read the store now and then: it confirms this agent's view is current (a
        partitioned agent cannot know of keys created since, so what JWKS it may serve shrinks;
        see `jwks_view`), and catches up on anything a silently stalled watch missed."""
        period = min(self.timing.check_interval, self.timing.grace_period // 8) / 1000
        while True:
            await trio.sleep(period)
            sent = self.clock()
            try:
                with trio.fail_after(max(period * 4, 1.0)):
                    current = await self.store.get()
            except (StoreError, trio.TooSlowError):
                continue  # the watch loop reports store trouble
            self._absorb(current)
            self.confirmed_at = sent

    def jwks_view(self) -> tuple[dict[str, Any], int]:
        """The JWKS and the max-age this agent can vouch for (`policy.vouched_max_age`), or
        NotReady once its view of the key set is too old to vouch for any."""
        now = self.clock()
        keyset = self.keyring.keyset
        max_age = vouched_max_age(keyset, now, self.timing, self.confirmed_at)
        if max_age is None:
            if keyset is None or self.confirmed_at is None:
                raise NotReady("no key set loaded yet: the key-set store has not been read")
            raise NotReady(
                f"this agent's view of the key set was last confirmed "
                f"{(now - self.confirmed_at) / 1000:.1f}s ago (the store is unreachable "
                "from here), so it cannot vouch for a JWKS; fetch it from another node"
            )
        keys = [dict(r.jwk) for r in published_keys(keyset, now)]
        return {"keys": keys}, max_age

    async def _watch_loop(self) -> None:
        backoff = _Backoff(0.2, max(1.0, self.timing.check_interval / 1000))
        while True:
            try:
                async with contextlib.aclosing(self.store.watch(self.revision)) as events:
                    async for versioned in events:
                        self._absorb(versioned)
                        backoff.reset()
            except StoreError as exc:
                self._problem("store", f"watching the key-set store failed: {exc}")
                self.metrics.inc("keyquorum_store_errors_total")
            await trio.sleep(backoff.next())

    def _absorb(self, versioned: Versioned) -> None:
        """Adopt a document from the store if it is newer and valid; otherwise report it."""
        if versioned.value is None:
            if self.keyring.keyset is not None:
                self._store_lost_document = True
                self._problem("keyset", "the key-set document vanished from the store; restoring")
                self._notify()
            return
        if versioned.revision <= self.revision:
            return
        try:
            keyset = parse_keyset(versioned.value)
        except KeySetInvalid as exc:
            self._report_invalid(versioned.revision, exc)
            return
        self._install(keyset, versioned.revision)

    def _report_invalid(self, revision: int, exc: KeySetInvalid) -> None:
        kept = self.keyring.keyset.generation if self.keyring.keyset else None
        if self._bad_revision != revision:
            self.metrics.inc("keyquorum_keyset_invalid_total")
        self._problem(
            "keyset",
            f"key-set document at revision {revision} is invalid and ignored ({exc}); "
            f"keeping generation {kept}; rotation paused until it is repaired",
        )
        self._bad_revision = revision

    def _install(self, keyset: KeySet, revision: int) -> None:
        self.revision = revision
        self._bad_revision = 0
        self._store_lost_document = False
        self.keyring.install(keyset, self.clock())
        self._clear("keyset")
        self._clear("store")
        self._notify()
        self._update_ready()

    # ---- unwrapping keys ---------------------------------------------------------------------

    async def _loader_loop(self) -> None:
        backoff = _Backoff(0.2, max(1.0, self.timing.check_interval / 1000))
        while True:
            changed = self._changed
            failures = 0
            loaded_any = False
            for record in self.keyring.missing(self.clock()):
                try:
                    with self.metrics.timed("keyquorum_backend_seconds", op="unwrap"):
                        signer = await self._unwrap(record)
                except (BackendError, ValueError, trio.TooSlowError) as exc:
                    self.metrics.inc("keyquorum_backend_errors_total", op="unwrap")
                    failures += 1
                    self._problem(f"load:{record.kid}", f"cannot unwrap key {record.kid}: {exc}")
                    self.metrics.inc("keyquorum_unwrap_errors_total")
                    continue
                self.keyring.add_signer(signer)
                self._clear(f"load:{record.kid}")
                log.info("loaded key %s (%s)", record.kid, record.alg)
                loaded_any = True
            self._forget_stale_load_problems()
            self._update_ready()
            if loaded_any:
                self._notify()  # the leader's activation gate looks at what members hold
                changed = self._changed
            if failures:
                with trio.move_on_after(backoff.next()):
                    await changed.wait()
            else:
                backoff.reset()
                with trio.move_on_after(self._next_horizon()):
                    await changed.wait()

    async def _unwrap(self, record: KeyRecord) -> SigningKey:
        if is_remote(record.private):
            if self.remote is None:
                raise BackendDenied(
                    f"key {record.kid} lives in the {record.private.get('signer')!r} KMS/HSM "
                    "but this agent is configured to unwrap sealed keys",
                    "set backend.mode = 'remote' and backend.kind to that backend",
                )
            with trio.fail_after(self.backend_timeout):
                return await RemoteKeySigner.load(
                    self.remote, record.private, record.alg, record.jwk
                )
        if is_secret(record.private):
            if self.secrets is None:
                raise BackendDenied(
                    f"key {record.kid} lives in the {record.private.get('store')!r} secret "
                    "store but this agent is not configured with it",
                    "set backend.kind to that secret store",
                )
            ref = secret_ref(record.private, self.secrets.kind, record.kid)
            with trio.fail_after(self.backend_timeout):
                value = await self.secrets.read(ref)
            pkcs8 = decode_value(value, record.kid, record.alg)
            signer = Signer.from_private_key(load_pkcs8(pkcs8, record.alg), record.alg)
            if signer.kid != record.kid:
                raise ValueError("the stored private key does not match the record's public key")
            return signer
        if self.remote is not None or self.secrets is not None:
            raise BackendDenied(
                f"key {record.kid} is sealed into the key set but this agent is configured for "
                f"{'remote keys' if self.remote else 'a secret store'}",
                "configure the wrapping backend until the sealed keys have expired",
            )
        wrapper = self.wrapper
        assert isinstance(wrapper, KeyWrapper)
        with trio.fail_after(self.backend_timeout):
            pkcs8 = await open_sealed(
                wrapper, record.private, kid=record.kid, prefix=self.config.store.prefix
            )
        signer = Signer.from_private_key(load_pkcs8(pkcs8, record.alg), record.alg)
        if signer.kid != record.kid:
            raise ValueError("the unwrapped private key does not match the record's public key")
        return signer

    def _forget_stale_load_problems(self) -> None:
        wanted = {f"load:{r.kid}" for r in self.keyring.missing(self.clock())}
        for area in [a for a in self.problems if a.startswith("load:") and a not in wanted]:
            del self.problems[area]

    def _next_horizon(self) -> float:
        try:
            choice = self.keyring.choice(self.clock())
        except NotReady:
            return self.timing.check_interval / 1000
        return max(0.01, min(choice.valid_until - self.clock(), self.timing.check_interval) / 1000)

    # ---- leading -----------------------------------------------------------------------------

    def members(self, now: int) -> dict[str, MemberView]:
        """Live members and what they hold: the reports last read from etcd (this agent's own
        entry always current); on a single node, this agent alone."""
        views = {self.node_id: self.member_view(now)}
        for node, report in self._member_reports.items():
            if node != self.node_id:
                loaded = report.get("loaded", [])
                signing = report.get("signing")
                views[node] = MemberView(
                    node,
                    frozenset(k for k in loaded if isinstance(k, str)),
                    signing if isinstance(signing, str) else None,
                )
        return views

    def member_report(self) -> dict[str, Any]:
        """What this agent tells the others about itself (DESIGN.md §3 members/<node_id>)."""
        view = self.member_view(self.clock())
        state, reasons = self.health()
        keyset = self.keyring.keyset
        return {
            "version": _version(),
            "started_at": self.started_at,
            "loaded": sorted(view.loaded),
            "signing": view.signing,
            "health": state,
            "reasons": reasons[:3],
            "generation": keyset.generation if keyset else None,
        }

    def _publish(self) -> None:
        if self.election is not None:
            self.election.publish(self.member_report())

    def member_view(self, now: int) -> MemberView:
        try:
            signing: str | None = self.keyring.current(now).kid
        except NotReady:
            signing = None
        return MemberView(self.node_id, self.keyring.loaded, signing)

    def can_write(self) -> str | None:
        """None when the leader may write; otherwise why not."""
        if self._bad_revision:
            return "the key-set document in the store is invalid"
        if "store" in self.problems and self.keyring.keyset is None:
            return "the key-set store is unreachable"
        return None

    async def _leader_loop(self) -> None:
        backoff = _Backoff(0.2, max(1.0, self.timing.check_interval / 1000))
        while True:
            changed = self._changed
            delay = self.timing.check_interval / 1000
            try:
                plan = await self.leader_step()
                if plan is not None:
                    delay = max(0.0, (plan.next_check_at - self.clock()) / 1000)
                self._clear("rotation")
                backoff.reset()
                if plan is not None and self.remote is not None:
                    await self._maybe_reconcile()
                if plan is not None and self.secrets is not None:
                    await self._maybe_mark_stable()
            except StoreConflict as exc:
                self._absorb(exc.current)
                delay = 0.0
            except FencedOut as exc:
                self._problem("rotation", f"deposed: {exc}")
            except (StoreError, BackendError, trio.TooSlowError, NotReady) as exc:
                self._problem("rotation", f"rotation postponed: {exc}")
                self.metrics.inc("keyquorum_rotation_errors_total")
                delay = backoff.next()
            self._publish()
            with trio.move_on_after(delay):
                await changed.wait()

    async def _maybe_mark_stable(self) -> None:
        """Label the signing key's secret version `stable` once it has signed for a whole grace
        period on every member (the last known good key, which `rollback` returns to)."""
        secrets = self.secrets
        keyset = self.keyring.keyset
        now = self.clock()
        record = signing_key(keyset, now)
        if secrets is None or record is None or not is_secret(record.private):
            return
        assert record.activate_at is not None
        if now - record.activate_at < self.timing.grace_period:
            return
        ref = secret_ref(record.private, secrets.kind, record.kid)
        try:
            async with self._write_lock:
                if not self._leading():
                    return
                with trio.fail_after(self.backend_timeout):
                    if self._stable_ref is None:
                        self._stable_ref = await secrets.stable()
                    if self._stable_ref != ref:
                        await secrets.set_stable(ref)
                        self._stable_ref = ref
                        log.info("labelled the secret version of %s stable", record.kid)
            self._clear("stable")
        except (BackendError, trio.TooSlowError) as exc:
            self._stable_ref = None
            self._problem("stable", f"cannot label the stable key's secret version: {exc}")

    async def _destroy_secret_versions(self, dropped: list[KeyRecord]) -> None:
        """Destroy the secret versions of keys that left the key set (best effort: a version
        left behind is still protected by the store, and is reported)."""
        secrets = self.secrets
        if secrets is None:
            return
        for record in dropped:
            if not is_secret(record.private):
                continue
            try:
                with trio.fail_after(self.backend_timeout):
                    await secrets.destroy(secret_ref(record.private, secrets.kind, record.kid))
                log.info("destroyed the secret version of dropped key %s", record.kid)
                self._clear(f"destroy:{record.kid}")
            except (BackendError, trio.TooSlowError) as exc:
                self._problem(
                    f"destroy:{record.kid}",
                    f"cannot destroy the secret version of dropped key {record.kid}: {exc}",
                )

    async def _maybe_reconcile(self) -> None:
        """Retire unused remote keys now and then (they cost money and widen exposure)."""
        now = self.clock()
        if now < self._next_reconcile:
            return
        try:
            async with self._write_lock:
                if self._leading():
                    await self.reconcile_remote_keys(now)
            self._clear("reconcile")
            self._next_reconcile = now + max(5000, 4 * self.timing.check_interval)
        except (BackendError, trio.TooSlowError) as exc:
            self._problem("reconcile", f"retiring unused remote keys failed: {exc}")
            self._next_reconcile = now + max(1000, self.timing.check_interval)

    async def leader_step(self) -> Plan | None:
        """One pass of the policy: evaluate and commit. Returns the plan (None if not allowed)."""
        async with self._write_lock:
            if not self._leading():
                self.last_plan = None
                self._clear("rotation")
                if self.election is not None:  # followers show the members in their status too
                    self._member_reports = await self.election.members()
                return None
            if self._bad_revision or "store" in self.problems or "keyset" in self.problems:
                await self._recheck_store()
            if (why := self.can_write()) is not None:
                self._problem("rotation", f"rotation paused: {why}")
                return None
            if self.election is not None:
                self._member_reports = await self.election.members()
            now = self.clock()
            keyset = self.keyring.keyset
            plan = evaluate(keyset, now, self.timing, self.members(now), self.keyring.seen)
            self.last_plan = plan
            if plan.actions:
                log.info("leader: %s", plan.reason)
                await self._commit(keyset, plan.actions, now, what=plan.reason)
            elif self._store_lost_document and keyset is not None:
                await self._commit(keyset, (), now, what="restored the lost key-set document")
            return plan

    def _leading(self) -> bool:
        """True when this agent may write the key set; arms the store's fence with the term."""
        if self.election is None:
            return True
        leading = self.election.is_leader
        if hasattr(self.store, "fence"):
            self.store.fence = self.election.term if leading else None
        return leading

    async def _recheck_store(self) -> None:
        """Re-read the store after trouble: clears problems the operator has repaired, notices a
        vanished document (to restore it) and documents the watch may have missed."""
        with trio.fail_after(self.backend_timeout):
            current = await self.store.get()
        self._clear("store")
        if current.value is None:
            if self.keyring.keyset is not None:
                self._store_lost_document = True
            return
        if current.revision == self.revision:
            self._bad_revision = 0
            self._clear("keyset")
            return
        try:
            keyset = parse_keyset(current.value)
        except KeySetInvalid as exc:
            self._report_invalid(current.revision, exc)
            return
        if current.revision < self.revision:
            log.warning(
                "the store went back from revision %d to %d (restored backup?); adopting it",
                self.revision,
                current.revision,
            )
        self._install(keyset, current.revision)

    async def _commit(
        self,
        base: KeySet | None,
        actions: Iterable[Action],
        now: int,
        *,
        what: str,
        records: tuple[KeyRecord, ...] | None = None,
        origin_key: tuple[PrivateKey, str] | None = None,
    ) -> KeySet:
        """Build the next generation (creating keys as asked) and write it with CAS."""
        base = base or KeySet()
        actions = tuple(actions)
        out = list(records if records is not None else apply_plan_edits(base, actions))
        new_signers: list[SigningKey] = []
        for action in actions:
            if isinstance(action, CreateKey):
                try:
                    with self.metrics.timed("keyquorum_backend_seconds", op="create"):
                        record, signer = await self._create_key(action, now, origin_key)
                except (BackendError, trio.TooSlowError):
                    self.metrics.inc("keyquorum_backend_errors_total", op="create")
                    raise
                out.append(record)
                new_signers.append(signer)
        keyset = base.evolve(out, at=now, by=self.node_id, what=what)
        expected = 0 if self._store_lost_document else self.revision
        if self.fault_commit_delay:
            # Fault injection for chaos tests: widen the window between deciding and writing.
            log.warning(
                "fault injection: holding generation %d for %.1fs before writing it",
                keyset.generation,
                self.fault_commit_delay,
            )
            await trio.sleep(self.fault_commit_delay)
        try:
            # A store that never answers must not hold the leader (and its write lock) forever;
            # on a timeout the write may still have landed: the next CAS conflicts and adopts it.
            with (
                self.metrics.timed("keyquorum_store_seconds", op="compare_and_swap"),
                trio.fail_after(self.backend_timeout),
            ):
                revision = await self.store.compare_and_swap(expected, dump_keyset(keyset))
        except FencedOut as exc:
            # Our term is over (DESIGN.md §9.3): stop all leader work at once.
            self.metrics.inc("keyquorum_fenced_writes_total")
            log.warning("write of generation %d refused: %s", keyset.generation, exc)
            if self.election is not None:
                self.election.step_down(str(exc))
            raise
        for signer in new_signers:
            self.keyring.add_signer(signer)
        kept = {r.kid for r in keyset.keys}
        dropped = [r for r in base.keys if r.kid not in kept]
        self._install(keyset, revision)
        for event, details in lifecycle_events(base, keyset):
            self.metrics.inc("keyquorum_audit_events_total", event=event)
            self.audit.record(
                event,
                {"leader": self.node_id},
                generation=keyset.generation,
                reason=what,
                **details,
            )
        if dropped and self.secrets is not None:
            await self._destroy_secret_versions(dropped)
        self.metrics.inc("keyquorum_keyset_writes_total")
        if new_signers:
            self.metrics.inc("keyquorum_keys_created_total", len(new_signers))
        return keyset

    async def _create_key(
        self, action: CreateKey, now: int, origin_key: tuple[PrivateKey, str] | None
    ) -> tuple[KeyRecord, SigningKey]:
        signer: SigningKey
        if self.remote is not None:
            if origin_key is not None:
                raise BackendConfigError(
                    "cannot import a private key into a remote backend's key set: its keys "
                    "are created inside the KMS/HSM",
                    "import the key with the KMS/HSM's own tools, or use backend.mode = 'wrap'",
                )
            signer, private = await self._create_remote_key()
            alg = signer.alg
        else:
            if origin_key is None:
                alg = self.config.keys.algorithm
                if alg in ("RS256", "PS256"):  # RSA generation takes ~100 ms: off the loop
                    key = await trio.to_thread.run_sync(generate_private_key, alg)
                else:  # EC and Ed25519 keys take microseconds
                    key = generate_private_key(alg)
            else:
                key, alg = origin_key
            signer = Signer.from_private_key(key, alg)
            if self.secrets is not None:
                value = encode_value(signer.kid, alg, private_key_to_pkcs8(key))
                with trio.fail_after(self.backend_timeout):
                    ref = await self.secrets.add_version(value)
                private = secret_private(self.secrets.kind, ref)
            else:
                wrapper = self.wrapper
                assert isinstance(wrapper, KeyWrapper)
                with trio.fail_after(self.backend_timeout):
                    private = await seal(
                        wrapper,
                        private_key_to_pkcs8(key),
                        kid=signer.kid,
                        prefix=self.config.store.prefix,
                    )
        endorser = signing_key(self.keyring.keyset, now)
        endorsement = None
        if endorser is not None and endorser.kid in self.keyring.signers:
            with trio.fail_after(self.backend_timeout):
                endorsement = await endorse_async(
                    self.keyring.signers[endorser.kid], signer.jwk, now // 1000
                )
        record = KeyRecord(
            kid=signer.kid,
            alg=alg,
            jwk=signer.jwk,
            private=private,
            created_at=action.created_at,
            activate_at=action.activate_at,
            deactivate_at=action.deactivate_at,
            expires_at=action.expires_at,
            endorsement=endorsement,
            origin="generated" if origin_key is None else "imported",
        )
        log.info("created key %s (%s): %s", signer.kid, alg, action.reason or "operator request")
        return record, signer

    async def _create_remote_key(self) -> tuple[RemoteKeySigner, dict[str, Any]]:
        """A new key pair inside the KMS/HSM. If this leader dies before the key set naming it
        is written, the key is an orphan that `reconcile_remote_keys` retires later."""
        remote = self.remote
        assert remote is not None
        alg = self.config.keys.algorithm
        if not remote.supports(alg):
            raise BackendConfigError(
                f"keys.algorithm: the {remote.kind} backend cannot hold {alg} keys",
                "choose an algorithm the KMS/HSM supports (ES256 works everywhere)",
            )
        with trio.fail_after(self.backend_timeout):
            created = await remote.create_key(alg, self.config.store.prefix)
        jwk = jwk_of_pem(created.public_key_pem, alg)
        self.metrics.inc("keyquorum_remote_keys_created_total")
        return RemoteKeySigner(remote, created.ref, alg, jwk), remote_private(
            remote.kind, created.ref
        )

    async def reconcile_remote_keys(self, now: int) -> list[dict[str, str]]:
        """Retire every remote key of this cluster that the key set no longer names: keys the
        policy dropped (expired, nothing they signed is valid) and orphans of crashed leaders.

        Only the leader runs this, under its write lock, so it never races its own creation; a
        deposed leader's in-flight key is an orphan (its write will be fenced). Keys younger
        than a safety margin are left for the next pass, against clock skew with the backend.
        """
        remote = self.remote
        keyset = self.keyring.keyset
        if remote is None or keyset is None:
            return []
        named = {
            _ref_key(remote_ref(r.private, remote.kind, r.kid))
            for r in keyset.keys
            if is_remote(r.private)
        }
        margin = int(2 * self.backend_timeout * 1000) + self.timing.lease_ttl
        with trio.fail_after(self.backend_timeout):
            owned = await remote.owned_keys(self.config.store.prefix)
        retired = []
        for key in owned:
            if _ref_key(key.ref) in named:
                continue
            if key.created_at is not None and now - key.created_at < margin:
                continue
            with trio.fail_after(self.backend_timeout):
                await remote.retire(key.ref)
            self.metrics.inc("keyquorum_remote_keys_retired_total")
            log.info("retired remote key %s (no longer in the key set)", dict(key.ref))
            retired.append(dict(key.ref))
        return retired

    # ---- operator commands (admin permission; DESIGN.md §6) ----------------------------------

    async def admin_rotate(self, origin_key: tuple[PrivateKey, str] | None = None) -> KeyRecord:
        async with self._write_lock:
            self._require_writable()
            now = self.clock()
            keyset = self.keyring.keyset
            action = rotate_now(keyset, now, self.timing)
            what = "operator imported a key" if origin_key else "operator requested rotation"
            written = await self._commit(keyset, (action,), now, what=what, origin_key=origin_key)
        self.metrics.inc("keyquorum_admin_operations_total", op="rotate")
        return written.keys[-1]

    async def admin_rollback(self) -> KeySet:
        async with self._write_lock:
            self._require_writable()
            now = self.clock()
            keyset = self._require_keyset()
            what = "operator rollback"
            if self.secrets is not None:
                # Back to the version the secret store labels stable (the last known good key).
                with trio.fail_after(self.backend_timeout):
                    stable = await self.secrets.stable()
                kid = next(
                    (
                        r.kid
                        for r in keyset.keys
                        if is_secret(r.private)
                        and secret_ref(r.private, self.secrets.kind, r.kid) == stable
                    ),
                    None,
                )
                if kid is None:
                    raise PolicyRefusal(
                        "no key of the key set carries the secret store's stable label "
                        f"({stable}); nothing to roll back to"
                    )
                records = rollback_to(keyset, kid, now)
                what = f"operator rollback to the stable key {kid}"
            else:
                records = policy_rollback(keyset, now)
            written = await self._commit(keyset, (), now, what=what, records=records)
        self.metrics.inc("keyquorum_admin_operations_total", op="rollback")
        return written

    async def admin_revoke(self, kid: str) -> KeySet:
        async with self._write_lock:
            self._require_writable()
            now = self.clock()
            keyset = self._require_keyset()
            records, need_new = policy_revoke(keyset, kid, now)
            actions: tuple[Action, ...] = ()
            if need_new:
                actions = (evaluate(None, now, self.timing).actions[0],)
            written = await self._commit(
                keyset, actions, now, what=f"operator revoked {kid}", records=records
            )
        self.metrics.inc("keyquorum_admin_operations_total", op="revoke")
        return written

    def _require_writable(self) -> None:
        if not self._leading():
            leader = self.election.leader if self.election else None
            raise NotLeader(
                f"this agent ({self.node_id}) is not the rotation leader; run the command on "
                f"the leader ({leader or 'none elected yet'})"
            )
        if (why := self.can_write()) is not None:
            raise StoreError(f"cannot change the key set now: {why}")

    def _require_keyset(self) -> KeySet:
        if self.keyring.keyset is None:
            raise NotReady("no key set loaded yet")
        return self.keyring.keyset

    # ---- health ------------------------------------------------------------------------------

    def health(self) -> tuple[str, list[str]]:
        """("ok" | "degraded" | "unavailable", reasons)."""
        reasons = list(self.problems.values())
        if self.election is not None and self.election.problem:
            reasons.append(f"cluster: {self.election.problem}")
        try:
            choice = self.keyring.choice(self.clock())
        except NotReady as exc:
            return "unavailable", [str(exc), *reasons]
        if choice.signer.kid != choice.preferred:
            reasons.insert(
                0, f"signing with {choice.signer.kid}: {choice.preferred} is not unwrapped yet"
            )
        return ("degraded" if reasons else "ok"), reasons

    def _update_ready(self) -> None:
        if not self.ready.is_set():
            try:
                self.keyring.current(self.clock())
            except NotReady:
                return
            self.ready.set()
            log.info("agent %s ready to sign", self.node_id)

    def _problem(self, area: str, message: str) -> None:
        if self.problems.get(area) != message:
            log.warning("%s", message)
        self.problems[area] = message

    def _clear(self, area: str) -> None:
        if self.problems.pop(area, None) is not None:
            log.info("resolved: %s", area)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        self._publish()

    def role(self) -> tuple[str, str | None, int | None]:
        """("leader" | "follower", the leader's node id, the leader's term if this agent leads)."""
        if self.election is None:
            return "leader", self.node_id, None
        seen = self.election.leadership()
        return ("leader" if seen.mine else "follower"), seen.leader, seen.term


class NotLeader(StoreError):
    """An operator command reached an agent that does not lead; the message names the leader."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("keyquorum")
    except Exception:  # noqa: BLE001 - a missing distribution only hides the version
        return "unknown"


class _Backoff:
    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap, self.current = first, cap, first

    def next(self) -> float:
        value = self.current
        self.current = min(self.cap, self.current * 2)
        return value

    def reset(self) -> None:
        self.current = self.first


@contextlib.contextmanager
def unwrap_single() -> Iterator[None]:
    """Re-raise a lone exception out of a nursery's ExceptionGroup, so callers can catch
    SocketInUse or a configuration error by its own type."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    import grp

    return grp.getgrnam(group).gr_gid


def _ref_key(ref: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(ref.items()))
