"""A deterministic discrete-event simulation of a keyquorum cluster (first slice of issue 5).

Agents run the project's own pure core — `agent.policy.evaluate`, `agent.keyring.Keyring`,
`agent.keyset` edits — around a simulated etcd (revisions, leases that expire late and are reset
to their full TTL when etcd's leader changes, txn compares, delayed watches) and a simulated KMS.
Each node has its own clock offset (bounded skew). Time is integer milliseconds; one seed replays a
run exactly.

The online checker asserts DESIGN.md §9 as the run goes:
  availability   every live, started agent can sign at every client request;
  verifiability  every kid used to sign is in the published set at the signing instant and stays
                 there while the signature can be valid (max_token_ttl + skew);
  fencing        no key-set write is accepted from an agent that is not the current leader term.
Faults: crash-restart, pause, etcd leader change (lease reset), etcd outage, KMS outage.
`Bugs` plants known mistakes so tests can show the checker catches them.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.keyring import Keyring, NotReady
from agent.keyset import KeyRecord, KeySet
from agent.policy import (
    CreateKey,
    Drop,
    KeyState,
    MemberView,
    apply_plan_edits,
    evaluate,
    key_state,
    published_keys,
)
from agent.timing import Timing


@dataclass(frozen=True)
class Bugs:
    """Planted mistakes; a simulation that catches none of them proves nothing."""

    no_fencing: bool = False  # key-set writes do not compare the leader's term
    early_pruning: bool = False  # the leader drops a key once it is retired, not at expiry
    no_grace: bool = False  # new keys activate as soon as they are created


class Violation(AssertionError):
    pass


@dataclass
class FakeSigner:
    kid: str
    alg: str = "ES256"

    def sign(self, data: bytes) -> bytes:
        return self.kid.encode() + data


# ---- simulated etcd ------------------------------------------------------------------------------


@dataclass
class SimKV:
    value: object
    create_revision: int
    mod_revision: int
    lease: int


@dataclass
class SimEtcd:
    now: Callable[[], int]
    revision: int = 0
    kv: dict[str, SimKV] = field(default_factory=dict)
    leases: dict[int, int] = field(default_factory=dict)  # id -> expiry (true time)
    lease_ttls: dict[int, int] = field(default_factory=dict)
    next_lease: int = 1
    down_until: int = 0

    @property
    def up(self) -> bool:
        return self.now() >= self.down_until

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
        """Checked in batches, like etcd: a lease lives at least its TTL, often a bit longer."""
        for lease, expiry in list(self.leases.items()):
            if self.now() >= expiry:
                del self.leases[lease]
                for key in [k for k, v in self.kv.items() if v.lease == lease]:
                    del self.kv[key]
                    self.revision += 1

    def reset_leases(self) -> None:
        """etcd's own leader changed: every lease gets its full TTL again."""
        for lease in self.leases:
            self.leases[lease] = self.now() + self.lease_ttls[lease]

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


# ---- the cluster -------------------------------------------------------------------------------


@dataclass
class SimAgent:
    node: str
    skew: int
    keyring: Keyring = field(default_factory=Keyring)
    revision: int = 0
    lease: int = 0
    lease_valid_until: int = 0
    term: int | None = None
    alive: bool = True
    paused_until: int = 0
    started: bool = False
    pending_write: tuple[int, KeySet, int | None] | None = None  # (expected rev, doc, fence term)


class Cluster:
    KEYSET = "keyset"
    LEADER = "leader"

    def __init__(
        self,
        timing: Timing,
        *,
        nodes: int = 3,
        seed: int = 0,
        bugs: Bugs = Bugs(),
        watch_delay: int = 50,
        kms_latency: int = 20,
    ) -> None:
        self.timing = timing
        self.random = random.Random(seed)  # noqa: S311 - a seeded, replayable simulation
        self.bugs = bugs
        self.time = 0
        self.events: list[tuple[int, int, Callable[[], None]]] = []
        self.seq = 0
        self.etcd = SimEtcd(lambda: self.time)
        self.watch_delay = watch_delay
        self.kms_latency = kms_latency
        self.kms_down_until = 0
        self.keys_created = 0
        self.signatures = 0
        self.events_run = 0
        self.writes = 0
        self.sign_log: dict[str, int] = {}  # kid -> last true time it signed
        skew = timing.max_clock_skew
        self.agents = {
            f"n{i}": SimAgent(f"n{i}", self.random.randint(-skew // 2, skew // 2))
            for i in range(1, nodes + 1)
        }
        self.published_at: dict[str, int] = {}  # kid -> true time its record was first written
        for agent in self.agents.values():
            self.at(self.random.randint(0, 200), self._booter(agent))
        self.at(500, self.lease_sweep)
        self.at(1000, self.check_retention)

    def _booter(self, agent: SimAgent) -> Callable[[], None]:
        return lambda: self.boot(agent)

    # ---- scheduling --------------------------------------------------------------------------

    def at(self, when: int, action: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (max(when, self.time), self.seq, action))

    def run_until(self, end: int) -> None:
        while self.events and self.events[0][0] <= end:
            when, _, action = heapq.heappop(self.events)
            self.time = when
            self.events_run += 1
            action()
        self.time = end

    def local(self, agent: SimAgent) -> int:
        return self.time + agent.skew

    def usable(self, agent: SimAgent) -> bool:
        return agent.alive and self.time >= agent.paused_until

    # ---- etcd housekeeping ----------------------------------------------------------------

    def lease_sweep(self) -> None:
        self.etcd.expire_leases()
        self.at(self.time + 500, self.lease_sweep)

    # ---- agent behaviour -----------------------------------------------------------------------

    def boot(self, agent: SimAgent) -> None:
        agent.keyring = Keyring()
        agent.revision = 0
        agent.term = None
        agent.lease = 0
        agent.started = False
        agent.pending_write = None
        self.tick(agent)
        self.client(agent)

    def tick(self, agent: SimAgent) -> None:
        """One pass of the agent's loops: lease, follow the store, load keys, lead."""
        self.at(self.time + self.timing.check_interval // 2, lambda: self.tick(agent))
        if not self.usable(agent):
            return
        if agent.pending_write is not None:  # a write decided before a pause goes out now
            expected, doc, fence = agent.pending_write
            agent.pending_write = None
            self.write(agent, expected, doc, fence)
        if not self.etcd.up:
            return
        ttl = self.timing.lease_ttl
        if agent.lease and self.etcd.keepalive(agent.lease):
            agent.lease_valid_until = self.time + ttl
        else:
            agent.lease = self.etcd.grant(ttl)
            agent.lease_valid_until = self.time + ttl
            agent.term = None
        self.follow(agent)
        self.load(agent)
        self.campaign(agent)
        if agent.term is not None and self.time < agent.lease_valid_until:
            self.lead(agent)

    def follow(self, agent: SimAgent) -> None:
        current = self.etcd.kv.get(self.KEYSET)
        if current is None or current.mod_revision <= agent.revision:
            return
        doc = current.value
        assert isinstance(doc, KeySet)
        revision = current.mod_revision

        def deliver() -> None:
            if self.usable(agent) and revision > agent.revision:
                agent.revision = revision
                agent.keyring.install(doc, self.local(agent))

        self.at(self.time + self.watch_delay, deliver)

    def load(self, agent: SimAgent) -> None:
        if self.time < self.kms_down_until:
            return
        for record in agent.keyring.missing(self.local(agent)):
            kid = record.kid

            def done(kid: str = kid) -> None:
                if self.usable(agent):
                    agent.keyring.add_signer(FakeSigner(kid))  # type: ignore[arg-type]

            self.at(self.time + self.kms_latency, done)
        try:
            agent.keyring.current(self.local(agent))
            agent.started = True
        except NotReady:
            pass
        self.etcd.kv[f"members/{agent.node}"] = SimKV(self.member(agent), 0, 0, agent.lease)

    def member(self, agent: SimAgent) -> MemberView:
        try:
            signing: str | None = agent.keyring.current(self.local(agent)).kid
        except NotReady:
            signing = None
        return MemberView(agent.node, agent.keyring.loaded, signing)

    def campaign(self, agent: SimAgent) -> None:
        leader = self.etcd.kv.get(self.LEADER)
        if agent.term is not None and (leader is None or leader.create_revision != agent.term):
            agent.term = None
        if leader is None and self.etcd.txn(
            [(self.LEADER, "CREATE", 0)], [(self.LEADER, agent.node, agent.lease)]
        ):
            agent.term = self.etcd.kv[self.LEADER].create_revision

    def lead(self, agent: SimAgent) -> None:
        now = self.local(agent)
        keyset = agent.keyring.keyset
        members = {
            key.split("/", 1)[1]: kv.value
            for key, kv in self.etcd.kv.items()
            if key.startswith("members/") and kv.lease in self.etcd.leases
        }
        plan = evaluate(keyset, now, self.timing, members)  # type: ignore[arg-type]
        actions = plan.actions
        if self.bugs.early_pruning and keyset is not None:
            actions = actions + tuple(
                Drop(r.kid, "planted bug")
                for r in keyset.keys
                if key_state(keyset, r, now) == KeyState.RETIRED
            )
        if not actions:
            return
        base = keyset or KeySet()
        records = list(apply_plan_edits(base, actions))
        for action in actions:
            if isinstance(action, CreateKey):
                self.keys_created += 1
                activate = action.activate_at
                if self.bugs.no_grace and activate is None:
                    activate = now
                records.append(
                    KeyRecord(
                        kid=f"k{self.keys_created}",
                        alg="ES256",
                        jwk={"kty": "EC"},
                        private={"scheme": "sim"},
                        created_at=action.created_at,
                        activate_at=activate,
                        deactivate_at=action.deactivate_at,
                        expires_at=action.expires_at,
                    )
                )
        doc = base.evolve(records, at=now, by=agent.node, what=plan.reason)
        self.write(agent, agent.revision, doc, agent.term)

    def write(self, agent: SimAgent, expected: int, doc: KeySet, fence: int | None) -> None:
        compares = [(self.KEYSET, "MOD", expected)]
        if fence is not None and not self.bugs.no_fencing:
            compares.append((self.LEADER, "CREATE", fence))
        if not self.etcd.up:
            return
        leader = self.etcd.kv.get(self.LEADER)
        if self.etcd.txn(compares, [(self.KEYSET, doc, 0)]):
            self.writes += 1
            if leader is None or leader.create_revision != fence:
                raise Violation(
                    f"t={self.time}: fencing: {agent.node} (term {fence}) wrote generation "
                    f"{doc.generation} while the leader term is "
                    f"{leader.create_revision if leader else None}"
                )
            agent.revision = self.etcd.kv[self.KEYSET].mod_revision
            agent.keyring.install(doc, self.local(agent))
            for record in doc.keys:
                self.published_at.setdefault(record.kid, self.time)
        else:
            current = self.etcd.kv.get(self.LEADER)
            if current is None or current.create_revision != fence:
                agent.term = None  # fenced out: step down

    def client(self, agent: SimAgent) -> None:
        """A local application signing every 50-150 ms; checks availability and verifiability."""
        self.at(self.time + self.random.randint(50, 150), lambda: self.client(agent))
        if not self.usable(agent) or not agent.started:
            return
        try:
            kid = agent.keyring.current(self.local(agent)).kid
        except NotReady as exc:
            raise Violation(
                f"t={self.time}: availability: {agent.node} cannot sign: {exc}"
            ) from None
        self.signatures += 1
        first_use = kid not in self.sign_log
        self.sign_log[kid] = self.time
        self.check_published(kid, f"{agent.node} signed with it")
        published = self.published_at.get(kid, self.time)
        if first_use and kid != "k1" and self.time - published < self.timing.jwks_max_age:
            raise Violation(
                f"t={self.time}: verifiability: {kid} signs {self.time - published} ms after it "
                f"was published; a verifier's JWKS cache may be {self.timing.jwks_max_age} ms old"
            )

    def check_published(self, kid: str, why: str) -> None:
        current = self.etcd.kv.get(self.KEYSET)
        doc = current.value if current else None
        assert doc is None or isinstance(doc, KeySet)
        if kid not in {r.kid for r in published_keys(doc, self.time)}:
            raise Violation(f"t={self.time}: verifiability: {kid} not published ({why})")

    def check_retention(self) -> None:
        """Every kid stays published while something it signed can still be valid."""
        keep = self.timing.max_token_ttl + self.timing.max_clock_skew
        for kid, last in self.sign_log.items():
            if self.time < last + keep:
                self.check_published(kid, f"it signed at {last}")
        self.at(self.time + 100, self.check_retention)

    # ---- faults ----------------------------------------------------------------------------------

    def crash(self, node: str, downtime: int) -> None:
        agent = self.agents[node]
        agent.alive = False

        def restart() -> None:
            agent.alive = True
            self.boot(agent)

        self.at(self.time + downtime, restart)

    def pause(self, node: str, length: int) -> None:
        """SIGSTOP: the agent freezes; a write it had decided goes out when it resumes."""
        agent = self.agents[node]
        if agent.term is not None and agent.keyring.keyset is not None:
            doc = agent.keyring.keyset.evolve(
                agent.keyring.keyset.keys, at=self.local(agent), by=node, what="held write"
            )
            agent.pending_write = (agent.revision, doc, agent.term)
        agent.paused_until = self.time + length
        agent.started = False  # availability is owed again once it has caught up

    def etcd_outage(self, length: int) -> None:
        self.etcd.down_until = self.time + length

    def etcd_leader_change(self) -> None:
        self.etcd.reset_leases()

    def kms_outage(self, length: int) -> None:
        self.kms_down_until = self.time + length

    def leader(self) -> str | None:
        kv = self.etcd.kv.get(self.LEADER)
        return str(kv.value) if kv else None
