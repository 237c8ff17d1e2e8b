"""The daemon's trio shell under the autojump MockClock, with in-memory fakes: what the simulator
models but does not run — a broken watch resuming from its revision, store calls that hang until
the shell's own timeouts fire, cancellation in the middle of a leader's write — and a few
Hypothesis examples of store outages inside the budget."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers import write_config
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig, load_config
from agent.daemon import Agent
from agent.keyring import NotReady
from agent.keyset import dump_keyset
from agent.policy import published_keys
from backends.local import LocalKekWrapper
from consensus.memory import MemoryStore
from consensus.store import StoreUnavailable, Versioned

T0 = 1_800_000_000_000
KEYS = {
    "key_ttl": "60s",
    "rotation_threshold": "30s",
    "grace_period": "6s",
    "check_interval": "1s",
    "jwks_max_age": "2s",
    "max_clock_skew": "1s",
    "max_token_ttl": "5s",
    "outage_budget": "10s",
    "lease_ttl": "3s",
}


class TroubledStore(MemoryStore):
    """A memory store with trouble in a window of trio time: `mode` "down" refuses every call,
    "hang" never answers (the caller's own timeout must fire)."""

    def __init__(self) -> None:
        super().__init__()
        self.window = (0.0, 0.0)
        self.mode = "down"
        self.calls_in_trouble = 0
        self.writes_attempted = 0

    def troubled(self) -> bool:
        start, end = self.window
        return start <= trio.current_time() < end

    async def _gate(self) -> None:
        if self.troubled():
            self.calls_in_trouble += 1
            if self.mode == "hang":
                await trio.sleep_forever()
            raise StoreUnavailable("simulated store trouble")

    async def get(self) -> Versioned:
        await self._gate()
        return await super().get()

    async def compare_and_swap(self, expected_revision: int, value: bytes) -> int:
        self.writes_attempted += 1
        await self._gate()
        return await super().compare_and_swap(expected_revision, value)

    async def watch(self, after_revision: int) -> AsyncGenerator[Versioned, None]:
        await self._gate()
        async with contextlib.aclosing(super().watch(after_revision)) as stream:
            async for versioned in stream:
                if self.troubled():  # the stream breaks; the agent must reconnect and resume
                    await self._gate()
                yield versioned

    async def write_behind_the_agents_back(self, value: bytes) -> int:
        """Another writer (an operator's `keyquorum` on another node) while the agent is cut off."""
        return await super().compare_and_swap(self._current.revision, value)


def agent_config(tmp: Path) -> AgentConfig:
    return load_config(write_config(tmp, keys=KEYS), env={})


def make_agent(config: AgentConfig, store: MemoryStore) -> Agent:
    return Agent(
        config,
        store,
        LocalKekWrapper.open(config.state_dir / "kek"),
        clock=lambda: T0 + int(trio.current_time() * 1000),
        backend_timeout=2.0,
    )


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    """The agent's whole shell in a nursery, once it is ready to sign; shut down on the way out."""
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        with trio.fail_after(30):
            await agent.ready.wait()
        yield agent
        agent.shutdown()


def autojump(main: Callable[[], Awaitable[None]]) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def sign_until(agent: Agent, end: float, every: float = 0.1) -> set[str]:
    """Probe the keyring the way the socket API does; every probe must find a published key.
    Returns the kids that signed."""
    kids = set()
    while trio.current_time() < end:
        now = agent.clock()
        try:
            kid = agent.keyring.current(now).kid
        except NotReady as exc:
            raise AssertionError(f"cannot sign at {trio.current_time():.1f} s: {exc}") from None
        assert kid in {r.kid for r in published_keys(agent.keyring.keyset, now)}
        kids.add(kid)
        await trio.sleep(every)
    return kids


def test_a_broken_watch_resumes_from_its_revision_and_misses_nothing(short_tmp: Path) -> None:
    config = agent_config(short_tmp)
    store = TroubledStore()

    async def main() -> None:
        async with running(make_agent(config, store)) as agent:
            keyset = agent.keyring.keyset
            assert keyset is not None
            store.window = (trio.current_time(), trio.current_time() + 4)
            await trio.sleep(1)
            # Written while the agent's watch and reads fail: it must still end up with it.
            revision = await store.write_behind_the_agents_back(
                dump_keyset(keyset.evolve(keyset.keys, at=agent.clock(), by="op", what="edit"))
            )
            await sign_until(agent, trio.current_time() + 3.5)
            assert store.calls_in_trouble > 0
            with trio.fail_after(5):  # backoff tops out at the check interval
                while agent.revision < revision:
                    await trio.sleep(0.05)
            assert agent.keyring.keyset is not None
            assert agent.keyring.keyset.last_change["by"] == "op"

    autojump(main)


def test_store_calls_that_hang_time_out_and_signing_goes_on(short_tmp: Path) -> None:
    """Reads, watches and the leader's compare-and-swap never answer for 8 s: the shell's own
    timeouts fire, signing never stops, the JWKS is withheld once the view is too old to vouch
    for, and once the store answers again the view is confirmed and rotation goes on."""
    config = agent_config(short_tmp)
    store = TroubledStore()
    store.mode = "hang"

    async def main() -> None:
        async with running(make_agent(config, store)) as agent:
            # From just before the first successor is due (30 s after the first key).
            start = trio.current_time() + 27
            store.window = (start, start + 8)
            await sign_until(agent, start + 6)
            with pytest.raises(NotReady, match="cannot vouch"):
                agent.jwks_view()  # unconfirmed for 6 s, grace 6 s - 2 s of skew
            await sign_until(agent, start + 60)
            assert store.calls_in_trouble > 0
            assert agent.confirmed_at is not None
            assert agent.confirmed_at > T0 + (start + 8) * 1000
            keyset = agent.keyring.keyset
            assert keyset is not None and len(keyset.keys) >= 2  # the successor was written
            agent.jwks_view()

    autojump(main)


def test_cancelled_in_the_middle_of_a_write_a_restarted_agent_carries_on(short_tmp: Path) -> None:
    """Shut down while the leader's compare-and-swap hangs: the agent exits at once, the store
    holds the last committed generation, and a new agent on the same store and KEK signs."""
    config = agent_config(short_tmp)
    store = TroubledStore()
    store.mode = "hang"

    async def main() -> None:
        async with running(make_agent(config, store)):
            before = await MemoryStore.get(store)
            attempted = store.writes_attempted
            store.window = (trio.current_time() + 29, 1e9)  # the successor's write hangs
            with trio.fail_after(60):
                while store.writes_attempted == attempted or not store.troubled():
                    await trio.sleep(0.5)
        assert (await MemoryStore.get(store)) == before  # nothing half-written
        store.window = (0.0, 0.0)
        async with running(make_agent(config, store)) as again:
            await sign_until(again, trio.current_time() + 40)
            keyset = again.keyring.keyset
            assert keyset is not None and keyset.generation > 1

    autojump(main)


@settings(max_examples=6, deadline=None)
@given(
    start=st.integers(20_000, 60_000),
    length=st.integers(1_000, 10_000),  # from a confirm period up to outage_budget
)
def test_store_outages_inside_the_budget_never_stop_signing(start: int, length: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kq-", dir="/tmp") as tmp:
        outage_inside_the_budget(Path(tmp), start, length)


def outage_inside_the_budget(tmp: Path, start: int, length: int) -> None:
    config = agent_config(tmp)
    store = TroubledStore()

    async def main() -> None:
        async with running(make_agent(config, store)) as agent:
            now = trio.current_time()
            store.window = (now + start / 1000, now + (start + length) / 1000)
            used = await sign_until(agent, now + 150, every=0.25)
            assert store.calls_in_trouble > 0
            assert len(used) >= 5  # a successor every 30 s: the outage did not stall rotation

    autojump(main)
