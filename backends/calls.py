"""Deadlines and retries for backend calls, shared by every provider module.

Provider SDKs (boto3, google-cloud, azure, python-pkcs11) block, so their calls run in a worker
thread that a trio cancellation abandons: the agent's own deadline always wins, even when an SDK
hangs on a half-open connection. `retry` re-runs a call while it fails with BackendUnavailable
(throttling, timeouts, a server that is down), with full-jitter exponential backoff, until the
call's deadline; any other BackendError ends it at once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from backends.base import BackendConfigError, BackendUnavailable

T = TypeVar("T")
log = logging.getLogger("keyquorum.backend")
DEFAULT_DEADLINE = 10.0
DEFAULT_ATTEMPT_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """How long one backend operation may take in all, and how each attempt is paced."""

    deadline: float = DEFAULT_DEADLINE  # seconds for the whole operation, retries included
    attempt_timeout: float = (
        DEFAULT_ATTEMPT_TIMEOUT  # seconds for one attempt (the SDK's own socket timeouts)
    )
    first_backoff: float = 0.05
    max_backoff: float = 2.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> CallPolicy:
        """`timeout` (whole operation) and `attempt_timeout` from a [backend] table."""
        deadline = _seconds(options, "timeout", DEFAULT_DEADLINE)
        attempt = _seconds(options, "attempt_timeout", min(DEFAULT_ATTEMPT_TIMEOUT, deadline))
        return cls(deadline=deadline, attempt_timeout=min(attempt, deadline))


def _seconds(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 300:
        raise BackendConfigError(
            f"backend.{name}: must be a number of seconds in (0, 300], got {value!r}"
        )
    return float(value)


async def in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking SDK call in a worker thread that cancellation abandons."""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def retry(operation: Callable[[], Awaitable[T]], *, what: str, policy: CallPolicy) -> T:
    """Run `operation` until it succeeds, fails permanently, or `policy.deadline` passes.

    On the deadline the last BackendUnavailable is re-raised with the attempt count, so the
    caller sees why (say, "connection refused") rather than a bare timeout.
    """
    attempts = 0
    last: BackendUnavailable | None = None
    backoff = policy.first_backoff
    with trio.move_on_after(policy.deadline) as scope:
        while True:
            attempts += 1
            try:
                with trio.fail_after(policy.attempt_timeout):
                    return await operation()
            except trio.TooSlowError:
                last = BackendUnavailable(
                    f"{what}: no answer within {policy.attempt_timeout:g}s",
                    "the backend may be down, overloaded or unreachable from this node",
                )
            except BackendUnavailable as exc:
                last = exc
            log.debug("%s: attempt %d failed: %s", what, attempts, last)
            await trio.sleep(random.uniform(0, backoff))  # noqa: S311 - jitter, not secrets
            backoff = min(backoff * 2, policy.max_backoff)
    assert scope.cancelled_caught
    if last is None:  # the deadline passed during the first attempt's setup
        last = BackendUnavailable(f"{what}: no answer within {policy.deadline:g}s")
    raise BackendUnavailable(
        f"{last.message} (gave up after {attempts} attempt{'s' * (attempts != 1)} in "
        f"{policy.deadline:g}s)",
        last.hint,
    ) from last
