"""The agent's metrics in the Prometheus text format: counters, gauges and latency histograms.

Counters and histograms accumulate here as the agent works; gauges (key ages, health, term)
are computed from the agent's state when `/metrics` is read (agent/api.py). Every family has a
HELP and TYPE line, so Prometheus and its linters read the page without guessing.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]

# Latency buckets (seconds): 50 µs (a local ECDSA signature) to 10 s (a backend deadline).
BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
           0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip

HELP: dict[str, tuple[str, str]] = {
    "keyquorum_requests_total": ("counter", "Socket API requests by path and status code."),
    "keyquorum_signatures_total": ("counter", "Signatures made, by algorithm and kid."),
    "keyquorum_jwts_total": ("counter", "JWTs issued, by kid."),
    "keyquorum_sign_seconds": ("histogram", "Time to make one signature (remote: a KMS call)."),
    "keyquorum_sign_unavailable_total": ("counter", "Sign requests refused: no usable key."),
    "keyquorum_store_seconds": ("histogram", "Key-set store (etcd/file) call latency by op."),
    "keyquorum_store_errors_total": ("counter", "Key-set store failures."),
    "keyquorum_backend_seconds": ("histogram", "Key backend (KMS/HSM) call latency by op."),
    "keyquorum_backend_errors_total": ("counter", "Key backend failures by op."),
    "keyquorum_keyset_invalid_total": ("counter", "Invalid key-set documents seen."),
    "keyquorum_unwrap_errors_total": ("counter", "Keys this node failed to unwrap."),
    "keyquorum_rotation_errors_total": ("counter", "Leader passes that had to postpone."),
    "keyquorum_fenced_writes_total": ("counter", "Writes refused because the term was over."),
    "keyquorum_keyset_writes_total": ("counter", "Key-set generations this node wrote."),
    "keyquorum_keys_created_total": ("counter", "Keys this node created as leader."),
    "keyquorum_remote_keys_created_total": ("counter", "KMS/HSM keys created for rotations."),
    "keyquorum_remote_keys_retired_total": ("counter", "KMS/HSM keys scheduled for deletion."),
    "keyquorum_admin_operations_total": ("counter", "Operator commands, by operation."),
    "keyquorum_leader_changes_total": ("counter", "Leadership changes this node has seen."),
    "keyquorum_audit_events_total": ("counter", "Audit events recorded, by event."),
}


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(BUCKETS, value)
        if index < len(BUCKETS):
            self.counts[index] += 1
        self.total += value
        self.count += 1


@dataclass
class Metrics:
    """Counters and histograms; `render` adds the gauges the caller computed."""

    counters: dict[tuple[str, Labels], float] = field(default_factory=dict)
    histograms: dict[tuple[str, Labels], Histogram] = field(default_factory=dict)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counters[key] = self.counters.get(key, 0.0) + amount

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        histogram = self.histograms.get(key)
        if histogram is None:
            histogram = self.histograms[key] = Histogram()
        histogram.observe(seconds)

    @contextmanager
    def timed(self, name: str, **labels: str) -> Iterator[None]:
        """Observe how long the block took (also when it raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe(name, time.perf_counter() - started, **labels)

    def render(self, gauges: list[tuple[str, Mapping[str, str], float, str]]) -> str:
        """The whole page: counters, histograms, and `gauges` as (name, labels, value, help)."""
        lines: list[str] = []
        families: dict[str, list[str]] = {}
        for (name, labels), value in sorted(self.counters.items()):
            families.setdefault(name, []).append(f"{name}{_labels(labels)} {value:g}")
        for (name, labels), histogram in sorted(self.histograms.items()):
            series = families.setdefault(name, [])
            cumulative = 0
            for bound, count in zip(BUCKETS, histogram.counts, strict=True):
                cumulative += count
                series.append(f"{name}_bucket{_labels((*labels, ('le', f'{bound:g}')))} "
                              f"{cumulative}")  # fmt: skip
            series.append(f"{name}_bucket{_labels((*labels, ('le', '+Inf')))} {histogram.count}")
            series.append(f"{name}_sum{_labels(labels)} {histogram.total:.6g}")
            series.append(f"{name}_count{_labels(labels)} {histogram.count}")
        for name in sorted(families):
            kind, text = HELP.get(name, ("untyped", name))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *families[name]]
        seen: set[str] = set()
        for name, gauge_labels, value, text in gauges:
            if name not in seen:
                lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
                seen.add(name)
            lines.append(f"{name}{_labels(tuple(gauge_labels.items()))} {value:g}")
        return "\n".join(lines) + "\n"


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
