"""The real trio shell (agent.daemon) under trio's autojump MockClock: days of default-timed
rotation in a second of real time, with the agent's wall clock tied to trio's clock."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from helpers import write_config

from agent.config import load_config
from agent.daemon import Agent
from agent.keyring import NotReady
from agent.policy import published_keys
from agent.timing import HOUR, MINUTE
from backends.local import LocalKekWrapper
from consensus.memory import MemoryStore
from consensus.store import StoreUnavailable, Versioned

T0 = 1_800_000_000_000


class FlakyStore(MemoryStore):
    """A memory store that is unreachable while `down` says so (writes, reads and watches)."""

    def __init__(self) -> None:
        super().__init__()
        self.down: tuple[float, float] = (0.0, 0.0)
        self.refused = 0

    def _check(self) -> None:
        start, end = self.down
        if start <= trio.current_time() < end:
            self.refused += 1
            raise StoreUnavailable("simulated store outage")

    async def get(self) -> Versioned:
        self._check()
        return await super().get()

    async def compare_and_swap(self, expected_revision: int, value: bytes) -> int:
        self._check()
        return await super().compare_and_swap(expected_revision, value)


def run_agent_for(
    short_tmp: Path, hours: int, probe_every: int, store: MemoryStore | None = None
) -> tuple[list[str], int]:
    """Run an agent with the default timings (24 h keys, 6 h threshold, 2 h grace, 1 min checks)
    for `hours` of trio time; probe signing every `probe_every` ms. Returns (kids used, probes)."""
    config = load_config(
        write_config(short_tmp, keys={"check_interval": "1m", "key_ttl": "24h",
                                      "rotation_threshold": "6h", "grace_period": "2h",
                                      "jwks_max_age": "10m", "max_clock_skew": "30s",
                                      "max_token_ttl": "1h", "outage_budget": "1h",
                                      "lease_ttl": "10s"}),
        env={},
    )  # fmt: skip
    used: list[str] = []
    probes = 0

    async def main() -> None:
        nonlocal probes
        agent = Agent(
            config,
            store or MemoryStore(),
            LocalKekWrapper.open(config.state_dir / "kek"),
            clock=lambda: T0 + int(trio.current_time() * 1000),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            with trio.fail_after(60):
                await agent.ready.wait()
            end = trio.current_time() + hours * 3600
            while trio.current_time() < end:
                now = agent.clock()
                try:
                    kid = agent.keyring.current(now).kid
                except NotReady as exc:
                    raise AssertionError(
                        f"cannot sign at +{(now - T0) / HOUR:.2f} h: {exc}"
                    ) from None
                assert kid in {r.kid for r in published_keys(agent.keyring.keyset, now)}
                if not used or used[-1] != kid:
                    used.append(kid)
                probes += 1
                await trio.sleep(probe_every / 1000)
            agent.shutdown()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return used, probes


def test_default_timings_rotate_daily_for_three_days_without_a_gap(short_tmp: Path) -> None:
    used, probes = run_agent_for(short_tmp, hours=72, probe_every=5 * MINUTE)
    # One key per 18 h (24 h TTL - 6 h threshold), each signing after a 2 h grace: 4-5 keys.
    assert len(used) >= 4, used
    assert probes >= 72 * 12


def test_a_store_outage_at_the_rotation_threshold_is_ridden_out_and_rotation_resumes(
    short_tmp: Path,
) -> None:
    store = FlakyStore()
    # The first successor is due 18 h in; the store is down from 17.9 h for 55 min (< 1 h budget).
    store.down = (17.9 * 3600, 17.9 * 3600 + 55 * 60)
    used, _ = run_agent_for(short_tmp, hours=40, probe_every=5 * MINUTE, store=store)
    assert store.refused > 0  # the leader did try, and was refused, during the outage
    assert len(used) >= 2, used
