"""A deterministic discrete-event simulation of a keyquorum cluster.

What runs is the project's own code wherever the agent decides something: the rotation policy
(`agent.policy.evaluate`, `apply_plan_edits`, `vouched_max_age`, `published_keys`), the keyring
(`agent.keyring.Keyring`: which key signs, the fallback to a loaded key), the key-set document
(`KeySet.evolve`, `dump_keyset`, `parse_keyset` — agents read the bytes etcd holds, so a corrupt
write is refused exactly as in the daemon) and the timing relations (`agent.timing.Timing`). Around
them this module models the daemon's trio loops (agent/daemon.py, consensus/election.py) with the
same periods: a lease kept alive every TTL/3 and counted from when the keepalive was sent, a
campaign on the leader key, a watch, a confirming re-read every min(check_interval, grace/8), a
loader that unwraps what the keyring misses, and a leader step whose KMS call and compare-and-swap
are separate events (a pause can fall between them).

The world: a 3-member etcd (revisions, leases that expire up to 500 ms late and get their full TTL
back whenever etcd elects a leader, txn compares, watches with delays, quorum), a KMS (latency,
outages, throttling, per-node network cuts), per-node clocks with bounded skew, verifiers that
fetch a JWKS from some agent and cache it for the max-age that agent advertised, and a client on
every node signing every 50-150 ms. Time is integer milliseconds; one seed replays a run exactly.

The online checker asserts DESIGN.md §9 as the run goes:
  availability   every live, started agent can sign at every request (liveness);
  verifiability  every token verifies at any time of its life against any JWKS a verifier may
                 still hold, and every signing kid is published from jwks_max_age + skew before its
                 first use until max_token_ttl + skew after its last (safety);
  fencing        etcd accepts no key-set write from an agent that is not the current term (safety);
  sealed         no key-set document in etcd carries private key material in the clear (safety);
  progress       once every fault has healed, a leader exists and a due rotation happens (liveness).
Liveness is owed only while the faults so far fit the budget that the timing relations buy
(`Budget`): a liveness failure beyond it is recorded with the bound it exceeded, not raised.
`Bugs` plants known mistakes so the tests can show that the checker catches each of them.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from agent.crypto import b64url_encode, jwk_thumbprint
from agent.keyring import Keyring, NotReady
from agent.keyset import (
    _PRIVATE_JWK_MEMBERS,
    KeyRecord,
    KeySet,
    KeySetInvalid,
    dump_keyset,
    parse_keyset,
)
from agent.policy import (
    CreateKey,
    Drop,
    KeyState,
    MemberView,
    apply_plan_edits,
    evaluate,
    key_state,
    published_keys,
    vouched_max_age,
)
from agent.timing import SECOND, Timing

R = TypeVar("R")
KMS_DEADLINE = 10 * SECOND  # backends.calls.DEFAULT_DEADLINE
SEALED_SCHEME = "sim-sealed-v1"
START = 600 * SECOND  # true time when a run begins (clocks skewed back still read positive)


@dataclass(frozen=True)
class Bugs:
    """Planted mistakes; a simulation that catches none of them proves nothing."""

    no_fencing: bool = False  # key-set writes do not compare the leader's term
    no_overrun: bool = False  # a key stops signing exactly when its successor is due to start
    early_pruning: bool = False  # the leader drops a key once it is retired, not at expiry
    no_grace: bool = False  # new keys activate as soon as they are created
    leak: bool = False  # the leader writes the private key into the key set in the clear


class Violation(AssertionError):
    pass


@dataclass
class FakeSigner:
    """What the keyring holds once a record is unwrapped (signing itself is not simulated)."""

    kid: str
    alg: str = "EdDSA"

    def sign(self, data: bytes) -> bytes:
        return self.kid.encode() + data


# ---- the fault budget ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    kind: str
    start: int
    end: int
    node: str | None = None
    disrupts_rotation: bool = False  # it stops the leader's work (outage, leader loss)
    cost: int = 0  # how much of the ride-through it uses up (length plus recovery)


@dataclass(frozen=True)
class Budget:
    """What the timing relations promise to survive (DESIGN.md §2, §9; agent/timing.py).

    Rotation disruptions — etcd quorum loss, a KMS outage, a corrupt key-set document, losing the
    leader (crash, pause or partition) — each cost their length plus the recovery after them
    (a new lease and election, one check interval); within any key lifetime their costs together
    must fit `Timing.ride_through()`: how long the active key still signs after its successor was
    due, less the grace the successor needs. A node's own troubles (cut from etcd or the KMS) must
    each fit the same ride-through. Clocks stay within max_clock_skew of each other, and etcd
    requests take under lease_ttl / 3 (the keepalive period).
    """

    timing: Timing

    @property
    def ride_through(self) -> int:
        return self.timing.ride_through()

    @property
    def failover(self) -> int:
        """Losing the leader: its lease runs out (late by up to one etcd sweep, and given a full
        TTL again if etcd elects a leader meanwhile), a successor wins, one check interval."""
        return 2 * self.timing.lease_ttl + self.timing.check_interval + 500

    @property
    def message_delay(self) -> int:
        return self.timing.lease_ttl // 3

    def recovery(self, kind: str) -> int:
        """What a rotation disruption costs after it ends."""
        t = self.timing
        if kind == "etcd quorum loss":
            return t.lease_ttl + t.check_interval + 500
        return t.check_interval

    def used(self, faults: list[Fault], now: int, node: str | None = None) -> int:
        """The ride-through spent in the last key lifetime, as of `now`: every rotation
        disruption, plus the troubles of `node` itself (cut from etcd or the KMS)."""
        since = now - self.timing.key_ttl
        return sum(
            f.cost
            for f in faults
            if f.end > since and (f.disrupts_rotation or (node is not None and f.node == node))
        )

    def remaining(
        self, faults: list[Fault], now: int, nodes: list[str], node: str | None = None
    ) -> int:
        """How much more a fault of `node` (None: a rotation disruption) may cost."""
        affected = [node] if node is not None else nodes
        return self.ride_through - max(self.used(faults, now, n) for n in affected)

    def exceeded(
        self, faults: list[Fault], now: int, skews: dict[str, int], delay: int
    ) -> list[str]:
        """The bounds the faults so far have broken (empty: liveness is owed)."""
        out = []
        nodes: list[str | None] = [None]
        nodes += sorted({f.node for f in faults if f.node is not None})
        for node in nodes:
            used = self.used(faults, now, node)
            if used > self.ride_through:
                kinds = sorted({f.kind for f in faults if f.disrupts_rotation or f.node == node})
                out.append(
                    f"faults ({', '.join(kinds)}) cost {used / SECOND:g} s of ride-through in "
                    f"one key lifetime{' on ' + node if node else ''} > ride-through "
                    f"{self.ride_through / SECOND:g} s"
                )
        if skews and max(skews.values()) - min(skews.values()) > self.timing.max_clock_skew:
            spread = max(skews.values()) - min(skews.values())
            out.append(
                f"clock skew {spread / SECOND:g} s > max_clock_skew "
                f"{self.timing.max_clock_skew / SECOND:g} s"
            )
        if delay > self.message_delay:
            out.append(f"etcd message delay {delay} ms > lease_ttl / 3 ({self.message_delay} ms)")
        return out


# ---- simulated etcd ------------------------------------------------------------------------------


@dataclass
class SimKV:
    value: object
    create_revision: int
    mod_revision: int
    lease: int


@dataclass
class SimEtcd:
    """A 3-member etcd as the agents see it: one linearizable store while a quorum is up."""

    now: Callable[[], int]
    revision: int = 0
    kv: dict[str, SimKV] = field(default_factory=dict)
    leases: dict[int, int] = field(default_factory=dict)  # id -> expiry (true time)
    lease_ttls: dict[int, int] = field(default_factory=dict)
    next_lease: int = 1
    member_down_until: list[int] = field(default_factory=lambda: [0, 0, 0])
    leader: int | None = 0

    @property
    def up(self) -> bool:
        return sum(1 for t in self.member_down_until if self.now() >= t) >= 2

    def members_up(self) -> list[int]:
        return [i for i, t in enumerate(self.member_down_until) if self.now() >= t]

    def elect(self, rng: random.Random) -> None:
        """etcd's own leader changes (or comes back after quorum loss): every lease is given its
        full TTL again (etcd-io/etcd#9395)."""
        up = self.members_up()
        if len(up) < 2:
            self.leader = None
            return
        self.leader = rng.choice(up)
        for lease in self.leases:
            self.leases[lease] = self.now() + self.lease_ttls[lease]

    def grant(self, ttl: int) -> int:
        lease = self.next_lease
        self.next_lease += 1
        self.leases[lease] = self.now() + ttl
        self.lease_ttls[lease] = ttl
        return lease

    def keepalive(self, lease: int) -> bool:
        if lease not in self.leases:
            return False
        self.leases[lease] = self.now() + self.lease_ttls[lease]
        return True

    def expire_leases(self) -> None:
        """Checked in batches by the leader, like etcd: a lease lives at least its TTL."""
        if not self.up or self.leader is None:
            return
        for lease, expiry in list(self.leases.items()):
            if self.now() >= expiry:
                del self.leases[lease]
                for key in [k for k, v in self.kv.items() if v.lease == lease]:
                    del self.kv[key]
                    self.revision += 1

    def put(self, key: str, value: object, lease: int) -> None:
        self.revision += 1
        old = self.kv.get(key)
        create = old.create_revision if old else self.revision
        self.kv[key] = SimKV(value, create, self.revision, lease)

    def txn(
        self, compares: list[tuple[str, str, int]], puts: list[tuple[str, object, int]]
    ) -> bool:
        for key, target, expected in compares:
            current = self.kv.get(key)
            got = (
                0
                if current is None
                else (current.create_revision if target == "CREATE" else current.mod_revision)
            )
            if got != expected:
                return False
        self.revision += 1
        for key, value, lease in puts:
            old = self.kv.get(key)
            create = old.create_revision if old else self.revision
            self.kv[key] = SimKV(value, create, self.revision, lease)
        return True


# ---- agents and verifiers ------------------------------------------------------------------------


@dataclass
class SimAgent:
    node: str
    skew: int
    incarnation: int = 0
    keyring: Keyring = field(default_factory=Keyring)
    revision: int = 0
    bad_revision: int = 0
    confirmed_at: int | None = None  # local clock
    lease: int = 0
    lease_valid_until: int = 0  # true time (the agent measures it on its monotonic clock)
    term: int | None = None
    alive: bool = True
    paused_until: int = 0
    partitioned_until: int = 0
    kms_cut_until: int = 0
    started: bool = False
    owed_from: int = 0
    busy: bool = False  # a leader step (KMS call + txn) is in flight
    loading: set[str] = field(default_factory=set)


@dataclass
class Cache:
    kids: frozenset[str]
    fetched_at: int  # verifier's local clock
    max_age: int  # ms
    source: str
    generation: int


@dataclass
class SimVerifier:
    name: str
    skew: int
    cache: Cache | None = None


class Cluster:
    KEYSET = "keyset"
    LEADER = "leader"

    def __init__(
        self,
        timing: Timing,
        *,
        nodes: int = 3,
        verifiers: int = 2,
        seed: int = 0,
        bugs: Bugs = Bugs(),
        watch_delay: int = 50,
        kms_latency: int = 20,
    ) -> None:
        self.timing = timing
        self.budget = Budget(timing)
        self.random = random.Random(seed)  # noqa: S311 - a seeded, replayable simulation
        self.seed = seed
        self.bugs = bugs
        self.time = START
        self.events: list[tuple[int, int, Callable[[], None]]] = []
        self.seq = 0
        self.etcd = SimEtcd(lambda: self.time)
        self.watch_delay = watch_delay  # upper bound of one watch delivery's delay
        self.message_delay = 5  # upper bound of one etcd round trip
        self.kms_latency = kms_latency
        self.kms_down_until = 0
        self.kms_throttle_until = 0
        self.kms_throttle_rate = 0.0
        self.faults: list[Fault] = []
        self.excused: list[tuple[int, str, list[str]]] = []
        self.trap_pause: int | None = None  # pause the next leader between its KMS call and txn
        self.keys_created = 0
        self.signatures = 0
        self.verifications = 0
        self.events_run = 0
        self.fenced = 0
        self.sign_log: dict[str, int] = {}  # kid -> latest exp of a token it signed
        self.published_at: dict[str, int] = {}  # kid -> true time its record was first written
        self.bootstrap_kid: str | None = None
        self._parsed: dict[int, KeySet | KeySetInvalid] = {}
        skew = timing.max_clock_skew
        self.agents = {
            f"n{i}": SimAgent(f"n{i}", self.random.randint(-skew // 2, skew // 2))
            for i in range(1, nodes + 1)
        }
        self.verifiers = [
            SimVerifier(f"v{i}", self.random.randint(-skew // 2, skew // 2))
            for i in range(1, verifiers + 1)
        ]
        for agent in self.agents.values():
            self.at(START + self.random.randint(0, 200), self._booter(agent))
        self.at(START + 500, self.lease_sweep)
        self.at(START + 1000, self.check_retention)
        self.at(START + 1000, self.check_progress)

    def _booter(self, agent: SimAgent) -> Callable[[], None]:
        return lambda: self.boot(agent)

    # ---- scheduling ----------------------------------------------------------------------------

    def at(self, when: int, action: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (max(when, self.time), self.seq, action))

    def on(self, agent: SimAgent, delay: int, action: Callable[[], None]) -> None:
        """Run `action` as `agent` after `delay`: dropped if it crashed meanwhile, held while it
        is paused (a stopped process runs nothing, then carries on where it was)."""
        incarnation = agent.incarnation

        def run() -> None:
            if not agent.alive or agent.incarnation != incarnation:
                return
            if self.time < agent.paused_until:
                self.at(agent.paused_until, run)
                return
            action()

        self.at(self.time + delay, run)

    def run_until(self, end: int) -> None:
        while self.events and self.events[0][0] <= end:
            when, _, action = heapq.heappop(self.events)
            self.time = when
            self.events_run += 1
            action()
        self.time = max(self.time, end)

    def run_for(self, ms: int) -> None:
        self.run_until(self.time + ms)

    def local(self, agent: SimAgent | SimVerifier) -> int:
        return self.time + agent.skew

    def usable(self, agent: SimAgent) -> bool:
        return agent.alive and self.time >= agent.paused_until

    def reaches_etcd(self, agent: SimAgent) -> bool:
        return self.etcd.up and self.time >= agent.partitioned_until

    def kms_call(self, agent: SimAgent) -> int | None:
        """One backend operation as `backends.calls.with_retries` makes it: throttled attempts
        are retried after a jittered, doubling backoff within the call's deadline. Returns how
        long the call takes, or None if it fails (unreachable, or out of time)."""
        if self.time < self.kms_down_until or self.time < agent.kms_cut_until:
            return None
        took, backoff = self.kms_latency, 50
        while self.time + took < self.kms_throttle_until:
            if self.random.random() >= self.kms_throttle_rate:
                break
            took += self.random.randint(0, backoff) + self.kms_latency
            backoff = min(2 * backoff, 2 * SECOND)
            if took > KMS_DEADLINE:
                return None
        return took

    def rpc(
        self,
        agent: SimAgent,
        op: Callable[[], R],
        reply: Callable[[R], None],
        failed: Callable[[], None] | None = None,
    ) -> None:
        """An etcd request: applied when sent if etcd is reachable, answered a delay later."""
        if not self.reaches_etcd(agent):
            if failed is not None:
                self.on(agent, 4 * self.budget.message_delay, failed)
            return
        result = op()
        self.on(agent, self.random.randint(0, self.message_delay), lambda: reply(result))

    # ---- the checker ---------------------------------------------------------------------------

    def liveness_failure(self, message: str) -> None:
        skews = {a.node: a.skew for a in self.agents.values()}
        skews.update({v.name: v.skew for v in self.verifiers})
        exceeded = self.budget.exceeded(self.faults, self.time, skews, self.message_delay)
        if exceeded:
            if len(self.excused) < 100:
                self.excused.append((self.time, message, exceeded))
            return
        raise Violation(f"{message}\n{self.history()}")

    def safety_failure(self, message: str) -> None:
        skews = {a.node: a.skew for a in self.agents.values()}
        skews.update({v.name: v.skew for v in self.verifiers})
        spread = max(skews.values()) - min(skews.values())
        if spread > self.timing.max_clock_skew:  # verifiability rests on the skew bound alone
            self.excused.append((self.time, message, [f"clock skew {spread} ms"]))
            return
        raise Violation(f"{message}\n{self.history()}")

    def verifiability_failure(self, kid: str, message: str) -> None:
        """A key the policy activated without a grace period (bootstrap, or an emergency when
        nothing could sign) trades verifier caches for availability on purpose: that is a
        liveness failure, owed only within the budget. Any other is a safety failure."""
        record = self._last_good.get(kid) if self._last_good else None
        rushed = record is not None and (
            record.activate_at is not None
            and record.activate_at < record.created_at + self.timing.grace_period
        )
        if rushed and self.bootstrap_kid != kid:
            self.liveness_failure(message + " (it activated before its grace period was over)")
        else:
            self.safety_failure(message)

    def describe(self, agent: SimAgent) -> str:
        """The agent's key set as it sees it, relative to its own clock."""
        now = self.local(agent)
        lines = [
            f"  {agent.node} (skew {agent.skew} ms, revision {agent.revision}, started "
            f"{agent.started}, loading {sorted(k[:8] for k in agent.loading)}, KMS cut for "
            f"{max(0, agent.kms_cut_until - self.time)} ms, KMS down for "
            f"{max(0, self.kms_down_until - self.time)} ms) holds:"
        ]
        for r in agent.keyring.keyset.keys if agent.keyring.keyset else ():
            activate = "-" if r.activate_at is None else f"{r.activate_at - now:+}"
            lines.append(
                f"    {r.kid[:8]} created {r.created_at - now:+} activate {activate} deactivate "
                f"{r.deactivate_at - now:+} expires {r.expires_at - now:+} "
                f"{'loaded' if r.kid in agent.keyring.signers else 'NOT loaded'}"
            )
        return "\n".join(lines)

    def history(self) -> str:
        lines = [f"  seed {self.seed}; faults so far:"]
        lines += [
            f"    {f.kind}{' of ' + f.node if f.node else ''} t={f.start}..{f.end}"
            for f in self.faults[-12:]
        ]
        return "\n".join(lines)

    def check_sealed(self, data: bytes) -> None:
        """S3: only sealed private halves reach etcd (checked on the raw bytes, before any
        agent's parser would refuse the document)."""
        for record in json.loads(data).get("keys", []):
            jwk, private = record.get("jwk", {}), record.get("private", {})
            leaked = sorted(_PRIVATE_JWK_MEMBERS & jwk.keys())
            scheme = private.get("scheme")
            if leaked or scheme != SEALED_SCHEME or "pkcs8" in private:
                raise Violation(
                    f"t={self.time}: sealed: key {record.get('kid')} reached etcd with private "
                    f"material in the clear (jwk members {leaked}, scheme {scheme!r})"
                )

    def check_published(self, kid: str, why: str) -> None:
        """`kid` is in the JWKS of every agent, the one with the clock furthest ahead included."""
        doc = self.current_keyset()
        ahead = self.time + max(a.skew for a in self.agents.values())
        if doc is None or kid not in {r.kid for r in published_keys(doc, ahead)}:
            self.safety_failure(f"t={self.time}: verifiability: {kid} not published ({why})")

    def check_retention(self) -> None:
        """Every kid stays published while a token it signed can still be accepted somewhere
        (by the verifier whose clock is furthest behind)."""
        behind = self.time + min(v.skew for v in self.verifiers)
        for kid, exp in list(self.sign_log.items()):
            if behind < exp:
                self.check_published(kid, f"a token it signed is valid until {exp}")
            else:
                del self.sign_log[kid]
        self.at(self.time + 250, self.check_retention)

    def check_progress(self) -> None:
        """Once every fault has healed for long enough, someone leads and rotation is on time."""
        self.at(self.time + SECOND, self.check_progress)
        healed = max((f.end for f in self.faults), default=START)
        allowance = self.budget.failover + 2 * self.timing.check_interval + 4 * self.kms_latency
        if self.time < healed + allowance:
            return
        if not self.etcd.up or any(not self.usable(a) for a in self.agents.values()):
            return
        leader = self.etcd.kv.get(self.LEADER)
        if leader is None:
            self.liveness_failure(
                f"t={self.time}: progress: no leader {self.time - healed} ms after the last "
                f"fault healed\n  etcd leader {self.etcd.leader}, up {self.etcd.members_up()}, "
                f"leases {self.etcd.leases}\n"
                + "\n".join(
                    f"  {a.node}: lease {a.lease} valid {a.lease_valid_until - self.time:+} term "
                    f"{a.term} partitioned {a.partitioned_until - self.time:+} paused "
                    f"{a.paused_until - self.time:+} alive {a.alive} inc {a.incarnation}"
                    for a in self.agents.values()
                )
            )
            return
        doc = self.current_keyset()
        if doc is None:
            return
        live = [r for r in doc.keys if r.withdrawn is None and self.time < r.deactivate_at]
        if not live:
            self.liveness_failure(f"t={self.time}: progress: no key can sign after healing")
            return
        newest = max(live, key=lambda r: r.created_at)
        due = newest.expires_at - self.timing.rotation_threshold
        if (
            newest.activate_at is not None
            and newest.activate_at <= self.time
            and self.time > max(due, healed) + allowance
        ):
            self.liveness_failure(
                f"t={self.time}: progress: rotation was due at {due} and no successor of "
                f"{newest.kid[:8]} exists {self.time - max(due, healed)} ms later"
            )

    def current_keyset(self) -> KeySet | None:
        current = self.etcd.kv.get(self.KEYSET)
        if current is None:
            return None
        parsed = self.parse(current.value, current.mod_revision)
        if isinstance(parsed, KeySetInvalid):
            return self._last_good
        return parsed

    _last_good: KeySet | None = None
    _last_good_bytes: bytes = b""

    def parse(self, value: object, revision: int) -> KeySet | KeySetInvalid:
        """The daemon's parser over the bytes in etcd, memoized by revision (same bytes)."""
        parsed = self._parsed.get(revision)
        if parsed is None:
            assert isinstance(value, bytes)
            try:
                parsed = parse_keyset(value)
            except KeySetInvalid as exc:
                parsed = exc
            self._parsed[revision] = parsed
        return parsed

    # ---- etcd housekeeping ----------------------------------------------------------------------

    def lease_sweep(self) -> None:
        self.etcd.expire_leases()
        self.at(self.time + 500, self.lease_sweep)

    # ---- agent behaviour ------------------------------------------------------------------------

    def boot(self, agent: SimAgent) -> None:
        agent.incarnation += 1
        agent.keyring = Keyring()
        agent.revision = 0
        agent.bad_revision = 0
        agent.confirmed_at = None
        agent.term = None
        agent.lease = 0
        agent.lease_valid_until = 0
        agent.started = False
        agent.busy = False
        agent.loading = set()
        self.keepalive(agent)
        self.confirm(agent)
        self.loader(agent)
        self.leader_loop(agent)
        self.client(agent)

    def keepalive(self, agent: SimAgent) -> None:
        """consensus/election.py: keep the lease (or get a new one), publish the member report,
        campaign; leadership lasts while the last keepalive, counted from its sending, holds."""
        ttl = self.timing.lease_ttl
        self.on(agent, ttl // 3, lambda: self.keepalive(agent))
        sent = self.time
        report = self.member(agent)

        def op() -> tuple[bool, int, int | None]:
            renewed = bool(agent.lease) and self.etcd.keepalive(agent.lease)
            lease = agent.lease if renewed else self.etcd.grant(ttl)
            self.etcd.put(f"members/{agent.node}", report, lease)
            leader = self.etcd.kv.get(self.LEADER)
            if leader is None and self.etcd.txn(
                [(self.LEADER, "CREATE", 0)], [(self.LEADER, agent.node, lease)]
            ):
                leader = self.etcd.kv[self.LEADER]
            term = (
                leader.create_revision
                if leader is not None and leader.value == agent.node and leader.lease == lease
                else None
            )
            return (renewed, lease, term)

        def reply(result: tuple[bool, int, int | None]) -> None:
            renewed, lease, term = result
            if not renewed:
                agent.term = None
            agent.lease = lease
            agent.lease_valid_until = sent + ttl
            was_leader = agent.term is not None
            agent.term = term
            if term is not None and not was_leader:
                self.on(agent, 0, lambda: self.leader_step(agent))

        self.rpc(agent, op, reply)

    def leading(self, agent: SimAgent) -> bool:
        return agent.term is not None and self.time < agent.lease_valid_until

    def confirm(self, agent: SimAgent) -> None:
        """daemon._confirm_loop and the first read: re-read the key set, confirming the view."""
        period = min(self.timing.check_interval, self.timing.grace_period // 8)
        self.on(agent, period, lambda: self.confirm(agent))
        sent = self.local(agent)

        def op() -> tuple[object, int] | None:
            current = self.etcd.kv.get(self.KEYSET)
            return None if current is None else (current.value, current.mod_revision)

        def reply(result: tuple[object, int] | None) -> None:
            if result is not None:
                value, revision = result
                self.absorb(agent, value, revision)
            agent.confirmed_at = sent

        self.rpc(agent, op, reply)

    def absorb(self, agent: SimAgent, value: object, revision: int) -> None:
        """daemon._absorb: adopt a newer valid document; keep the last good one otherwise."""
        if revision <= agent.revision:
            return
        parsed = self.parse(value, revision)
        if isinstance(parsed, KeySetInvalid):
            agent.bad_revision = revision
            return
        agent.revision = revision
        agent.bad_revision = 0
        agent.keyring.install(parsed, self.local(agent))
        self.load(agent)

    def loader(self, agent: SimAgent) -> None:
        self.on(agent, self.timing.check_interval // 2, lambda: self.loader(agent))
        self.load(agent)

    def load(self, agent: SimAgent) -> None:
        """daemon._loader_loop: unwrap what the keyring misses (through this node's KMS path)."""
        for record in agent.keyring.missing(self.local(agent)):
            kid = record.kid
            if kid in agent.loading:
                continue
            took = self.kms_call(agent)
            if took is None:
                continue
            agent.loading.add(kid)

            def done(kid: str = kid) -> None:
                agent.loading.discard(kid)
                if any(r.kid == kid for r in agent.keyring.missing(self.local(agent))):
                    agent.keyring.add_signer(FakeSigner(kid))  # type: ignore[arg-type]
                self.mark_started(agent)

            self.on(agent, took, done)
        self.mark_started(agent)

    def mark_started(self, agent: SimAgent) -> None:
        """A (re)started agent is owed availability once it holds the key the policy names: the
        keyring's fallback to an older loaded key keeps a *running* agent signing when a new key
        will not load, but an agent that restarts moments before its fallback stops signing,
        with the KMS throttling, may briefly have neither (the daemon loads the named key first
        to keep that window short)."""
        if agent.started:
            return
        try:
            choice = agent.keyring.choice(self.local(agent))
        except NotReady:
            return
        agent.started = choice.signer.kid == choice.preferred

    def member(self, agent: SimAgent) -> MemberView:
        try:
            signing: str | None = agent.keyring.current(self.local(agent)).kid
        except NotReady:
            signing = None
        return MemberView(agent.node, agent.keyring.loaded, signing)

    def leader_loop(self, agent: SimAgent) -> None:
        delay = self.lead(agent)
        self.on(agent, delay, lambda: self.leader_loop(agent))

    def leader_step(self, agent: SimAgent) -> None:
        self.lead(agent)

    def lead(self, agent: SimAgent) -> int:
        """daemon.leader_step: evaluate the policy; create keys through the KMS, then write the
        next generation with a txn fenced by the term. Returns the delay to the next step."""
        interval = self.timing.check_interval
        if not self.leading(agent) or agent.busy or agent.bad_revision:
            return interval
        if not self.reaches_etcd(agent):
            return interval
        now = self.local(agent)
        keyset = agent.keyring.keyset
        members = {
            key.split("/", 1)[1]: kv.value
            for key, kv in self.etcd.kv.items()
            if key.startswith("members/") and kv.lease in self.etcd.leases
        }
        plan = evaluate(
            keyset,
            now,
            self.timing,
            members,  # type: ignore[arg-type]
            agent.keyring.seen,
        )
        delay = max(1, min(plan.next_check_at - now, interval))
        actions = plan.actions
        if self.bugs.early_pruning and keyset is not None:
            actions = actions + tuple(
                Drop(r.kid, "planted bug")
                for r in keyset.keys
                if key_state(keyset, r, now) == KeyState.RETIRED
            )
        if not actions:
            return delay
        creates = [a for a in actions if isinstance(a, CreateKey)]
        took = self.kms_call(agent) if creates else 0
        if took is None:
            return min(delay, 200)  # rotation postponed: the KMS is unreachable
        base = keyset or KeySet()
        records = list(apply_plan_edits(base, actions))
        new: list[str] = []
        for action in creates:
            record = self.new_record(action, now)
            records.append(record)
            new.append(record.kid)
        doc = base.evolve(records, at=now, by=agent.node, what=plan.reason)
        expected, fence = agent.revision, agent.term
        agent.busy = True

        def commit() -> None:
            if self.trap_pause is not None and creates:
                length, self.trap_pause = self.trap_pause, None
                self.pause(agent.node, length, targeted=True)
            self.on(agent, 0, lambda: self.commit(agent, expected, doc, fence, new))

        self.on(agent, took, commit)
        return delay

    def new_record(self, action: CreateKey, now: int) -> KeyRecord:
        self.keys_created += 1
        digest = hashlib.sha256(f"{self.seed}/{self.keys_created}".encode()).digest()
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(digest)}
        private: dict[str, object] = {"scheme": SEALED_SCHEME, "ct": b64url_encode(digest[:16])}
        if self.bugs.leak:
            jwk["d"] = b64url_encode(digest[16:])
        activate = action.activate_at
        if self.bugs.no_grace and activate is None:
            activate = now
        deactivate = action.deactivate_at
        if self.bugs.no_overrun:
            t = self.timing
            deactivate = now + t.key_ttl - t.rotation_threshold + t.grace_period
        return KeyRecord(
            kid=jwk_thumbprint(jwk),
            alg="EdDSA",
            jwk=jwk,
            private=private,
            created_at=action.created_at,
            activate_at=activate,
            deactivate_at=deactivate,
            expires_at=action.expires_at,
        )

    def commit(
        self, agent: SimAgent, expected: int, doc: KeySet, fence: int | None, new: list[str]
    ) -> None:
        compares = [(self.KEYSET, "MOD", expected)]
        if fence is not None and not self.bugs.no_fencing:
            compares.append((self.LEADER, "CREATE", fence))
        data = dump_keyset(doc)

        def op() -> tuple[bool, int | None]:
            leader = self.etcd.kv.get(self.LEADER)
            term = leader.create_revision if leader else None
            if not self.etcd.txn(compares, [(self.KEYSET, data, 0)]):
                return (False, term)
            revision = self.etcd.kv[self.KEYSET].mod_revision
            if term != fence:
                raise Violation(
                    f"t={self.time}: fencing: {agent.node} (term {fence}) wrote generation "
                    f"{doc.generation} while the leader term is {term}\n{self.history()}"
                )
            self.check_sealed(data)
            parsed = self.parse(data, revision)
            if isinstance(parsed, KeySetInvalid):
                raise Violation(f"t={self.time}: the leader wrote an invalid key set: {parsed}")
            self._last_good = parsed
            self._last_good_bytes = data
            for record in parsed.keys:
                self.published_at.setdefault(record.kid, self.time)
                if self.bootstrap_kid is None:
                    self.bootstrap_kid = record.kid
            self.broadcast(data, revision)
            return (True, revision)

        def reply(result: tuple[bool, int | None]) -> None:
            agent.busy = False
            ok, value = result
            if not ok:
                if value != fence:
                    self.fenced += 1
                    agent.term = None  # fenced out: step down at once
                return
            for kid in new:  # the leader created these keys: it holds them already
                agent.keyring.add_signer(FakeSigner(kid))  # type: ignore[arg-type]
            assert value is not None
            self.absorb(agent, data, value)

        def failed() -> None:
            agent.busy = False

        self.rpc(agent, op, reply, failed)

    def broadcast(self, data: bytes, revision: int) -> None:
        """The watch: every connected agent hears of the write a (random) delay later."""
        for other in self.agents.values():
            if other.alive and self.time >= other.partitioned_until:
                delay = self.random.randint(0, self.watch_delay)
                self.on(other, delay, self._deliver(other, data, revision))

    def _deliver(self, agent: SimAgent, data: bytes, revision: int) -> Callable[[], None]:
        return lambda: self.absorb(agent, data, revision)

    def client(self, agent: SimAgent) -> None:
        """A local application signing every 50-150 ms; checks availability, then hands the
        token to a verifier at a random moment of its life."""
        self.on(agent, self.random.randint(50, 150), lambda: self.client(agent))
        if not agent.started or self.time < agent.owed_from:
            return
        try:
            kid = agent.keyring.current(self.local(agent)).kid
        except NotReady as exc:
            self.liveness_failure(
                f"t={self.time}: availability: {agent.node} cannot sign: {exc}\n"
                + self.describe(agent)
            )
            return
        self.signatures += 1
        first_use = kid not in self.published_at or kid not in self.sign_log
        exp = self.local(agent) + self.timing.max_token_ttl
        self.sign_log[kid] = max(self.sign_log.get(kid, 0), exp)
        self.check_published(kid, f"{agent.node} signed with it")
        published = self.published_at.get(kid, self.time)
        if (
            first_use
            and kid != self.bootstrap_kid
            and self.time - published < self.timing.jwks_max_age
        ):
            self.verifiability_failure(
                kid,
                f"t={self.time}: verifiability: {kid[:8]} signs {self.time - published} ms after "
                f"it was published; a verifier's JWKS cache may be {self.timing.jwks_max_age} ms "
                "old",
            )
        verifier = self.random.choice(self.verifiers)
        signed = self.time
        self.at(
            self.time + self.random.randint(0, self.timing.max_token_ttl),
            lambda: self.verify(verifier, kid, agent.node, signed),
        )

    def verify(self, verifier: SimVerifier, kid: str, signer: str, signed: int) -> None:
        """A verifier checks a token against its cached JWKS (fetched again once stale)."""
        cache = verifier.cache
        now = self.local(verifier)
        if cache is None or now >= cache.fetched_at + cache.max_age:
            cache = self.fetch_jwks(verifier) or cache
        if cache is None or (now >= cache.fetched_at + cache.max_age and kid not in cache.kids):
            return  # no agent could serve a JWKS: the verifier would retry (not a signing fault)
        self.verifications += 1
        if kid not in cache.kids:
            self.verifiability_failure(
                kid,
                f"t={self.time}: verifiability: {verifier.name} cannot verify a token {signer} "
                f"signed with {kid[:8]} at t={signed}: the JWKS it fetched from {cache.source} "
                f"(generation {cache.generation}) {now - cache.fetched_at} ms ago, cacheable for "
                f"{cache.max_age} ms, lacks it",
            )

    def fetch_jwks(self, verifier: SimVerifier) -> Cache | None:
        order = list(self.agents.values())
        self.random.shuffle(order)
        for agent in order:
            if not self.usable(agent):
                continue
            keyset = agent.keyring.keyset
            local = self.local(agent)
            max_age = vouched_max_age(keyset, local, self.timing, agent.confirmed_at)
            if max_age is None:
                continue  # 503 stale: try the next node
            verifier.cache = Cache(
                frozenset(r.kid for r in published_keys(keyset, local)),
                self.local(verifier),
                max_age * SECOND,
                agent.node,
                keyset.generation if keyset else 0,
            )
            return verifier.cache
        return None

    # ---- faults ---------------------------------------------------------------------------------

    def record(self, kind: str, length: int, node: str | None = None, *, rotation: bool) -> None:
        cost = length + (self.budget.recovery(kind) if rotation else 0)
        self.faults.append(Fault(kind, self.time, self.time + length, node, rotation, cost))

    def is_leader(self, node: str) -> bool:
        return self.leader() == node

    def crash(self, node: str, downtime: int) -> None:
        """kill -9 and a restart `downtime` later: everything in memory is lost."""
        agent = self.agents[node]
        leading = self.is_leader(node)
        agent.alive = False
        agent.incarnation += 1
        if leading:
            self.faults.append(
                Fault(
                    "leader crash",
                    self.time,
                    self.time + min(downtime, self.budget.failover),
                    node,
                    True,
                    self.budget.failover,
                )
            )

        crashes = agent.incarnation

        def restart() -> None:
            if agent.incarnation == crashes:  # not crashed again (nor restarted) since
                agent.alive = True
                self.boot(agent)

        self.at(self.time + downtime, restart)

    def pause(self, node: str, length: int, *, targeted: bool = False) -> None:
        """SIGSTOP for `length`: nothing runs; whatever was in flight carries on at SIGCONT."""
        agent = self.agents[node]
        if self.is_leader(node):
            self.faults.append(
                Fault(
                    "leader pause" + (" before commit" if targeted else ""),
                    self.time,
                    self.time + min(length, self.budget.failover),
                    node,
                    True,
                    min(length, self.budget.failover) + self.timing.check_interval,
                )
            )
        agent.paused_until = max(agent.paused_until, self.time + length)
        # A stopped process serves nothing; once resumed it is owed again, as after a restart,
        # once it has caught up and can sign.
        agent.started = False
        catch_up = min(self.timing.check_interval, self.timing.grace_period // 8)
        agent.owed_from = agent.paused_until + catch_up + self.message_delay + self.kms_latency

    def partition(self, node: str, length: int) -> None:
        """The agent cannot reach etcd (it still serves its clients and reaches the KMS)."""
        agent = self.agents[node]
        leading = self.is_leader(node)
        agent.partitioned_until = max(agent.partitioned_until, self.time + length)
        if leading:
            self.faults.append(
                Fault(
                    "leader partition",
                    self.time,
                    self.time + min(length, self.budget.failover),
                    node,
                    True,
                    min(length, self.budget.failover) + self.timing.check_interval,
                )
            )
        self.record("etcd partition", length, node, rotation=False)

    def cut_kms(self, node: str, length: int) -> None:
        agent = self.agents[node]
        agent.kms_cut_until = max(agent.kms_cut_until, self.time + length)
        self.record("KMS cut", length, node, rotation=self.is_leader(node))

    def etcd_member_down(self, member: int, length: int) -> None:
        """One etcd member stops (minority loss); if it led etcd, etcd elects another leader."""
        self.etcd.member_down_until[member] = self.time + length
        if self.etcd.leader == member or not self.etcd.up:
            self.etcd.elect(self.random)
        self.at(self.time + length, self._etcd_recovered)
        rotation = not self.etcd.up
        self.record(
            "etcd quorum loss" if rotation else "etcd member loss", length, rotation=rotation
        )

    def _etcd_recovered(self) -> None:
        if self.etcd.up and self.etcd.leader is None:
            self.etcd.elect(self.random)

    def etcd_outage(self, length: int) -> None:
        """Quorum loss: two of the three members stop."""
        down = self.random.sample(range(3), 2)
        for member in down:
            self.etcd.member_down_until[member] = self.time + length
        self.etcd.leader = None
        self.at(self.time + length, self._etcd_recovered)
        self.record("etcd quorum loss", length, rotation=True)

    def etcd_leader_change(self) -> None:
        self.etcd.elect(self.random)

    def kms_outage(self, length: int) -> None:
        self.kms_down_until = self.time + length
        self.record("KMS outage", length, rotation=True)

    def kms_throttle(self, length: int, rate: float) -> None:
        """The KMS refuses a share of calls (429s); agents retry."""
        self.kms_throttle_until = self.time + length
        self.kms_throttle_rate = rate
        self.record("KMS throttling", length, rotation=rate >= 1.0)

    def skew_clock(self, name: str, skew: int) -> None:
        if name in self.agents:
            self.agents[name].skew = skew
        for verifier in self.verifiers:
            if verifier.name == name:
                verifier.skew = skew

    def delay_messages(self, watch: int, rpc: int) -> None:
        self.watch_delay = watch
        self.message_delay = rpc

    def corrupt_keyset(self, length: int) -> None:
        """An operator writes garbage over the key set and restores the last good one later."""
        current = self.etcd.kv.get(self.KEYSET)
        if current is None or not self.etcd.up:
            return
        garbage = b'{"schema": 1, "keys": "oops"}'
        self.etcd.put(self.KEYSET, garbage, 0)
        self.broadcast(garbage, self.etcd.revision)
        self.record("corrupt key set", length, rotation=True)

        def repair() -> None:
            if not self.etcd.up:
                self.at(self.time + 100, repair)
                return
            current = self.etcd.kv.get(self.KEYSET)
            if current is None or current.value != garbage:
                return  # repaired already (and maybe rotated since): nothing to restore
            good = self._last_good_bytes
            self.etcd.put(self.KEYSET, good, 0)
            self.broadcast(good, self.etcd.revision)

        self.at(self.time + length, repair)

    def leader(self) -> str | None:
        kv = self.etcd.kv.get(self.LEADER)
        return str(kv.value) if kv else None

    def next_activation(self) -> int | None:
        """True time of the next scheduled activation (the instant a target rule strikes at)."""
        doc = self.current_keyset()
        if doc is None:
            return None
        times = [r.activate_at for r in doc.keys if r.activate_at and r.activate_at > self.time]
        return min(times) if times else None

    def next_removal(self) -> int | None:
        """True time of the next expiry, when the leader removes a key."""
        doc = self.current_keyset()
        if doc is None:
            return None
        times = [r.expires_at for r in doc.keys if r.expires_at > self.time]
        return min(times) if times else None
