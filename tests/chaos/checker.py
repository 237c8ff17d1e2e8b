"""The offline checker: reads a chaos run's event log and says what went wrong, if anything.

Checks (DESIGN.md §9):
1. verifiability: every signature verifies against its key, and every JWKS a verifier fetched
   within one max-age before the signature (or while it was still valid after) contains the key;
2. availability: no failed sign request on an agent outside its own downtime (a fault that
   killed, stopped or restarted that very agent; plus a second for its clients to reconnect);
3. fencing: at most one agent claims leadership in any term, and no two agents wrote the same
   key-set generation (from the audit trail in etcd);
4. confidentiality: the etcd dump at the end holds only wrapped private keys.
It also computes the summary table the suite prints.
"""

from __future__ import annotations

import base64
import bisect
import itertools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.crypto import verify_signature

DOWNTIME_MARGIN = 1.0  # seconds after an agent is back in which its clients may still fail
# Base64 openings of PKCS#8 private keys (P-256, P-384, Ed25519, RSA) and PEM armour.
PRIVATE_MARKERS = (
    "MIGHAgEAMBMG",
    "MIG2AgEAMBAG",
    "MC4CAQAwBQYDK2Vw",
    "MIIEvAIBADAN",
    "MIIEvQIBADAN",
    "MIIEvgIBADAN",
    "PRIVATE KEY",
)


@dataclass
class Verdict:
    violations: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def table(self) -> str:
        s = self.summary
        rows = [("faults injected", str(s["faults_total"]))]
        rows += [(f"  {kind}", str(n)) for kind, n in sorted(s["faults"].items())]
        rows += [
            ("signatures issued", f"{s['signatures']:,}"),
            ("failed signs (all)", str(s["failed_all"])),
            ("failed signs outside own downtime", str(s["failed_outside"])),
            ("unverifiable signatures", str(s["unverifiable"])),
            ("leader terms (elections)", str(s["terms"])),
            ("rotations (keys that signed - 1)", str(s["rotations"])),
            ("JWKS fetches", f"{s['jwks_fetches']:,}"),
        ]
        rows += [
            (f"max signing gap {node} (s)", f"{gap:.2f}")
            for node, gap in sorted(s["max_gap"].items())
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'chaos run':<{width}}  value", f"{'-' * width}  -----"]
        lines += [f"{name:<{width}}  {value}" for name, value in rows]
        return "\n".join(lines)


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def downtimes(events: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """node -> [(start, end)] of faults that took that very agent down."""
    open_faults: dict[tuple[str, str], float] = {}
    windows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for event in events:
        if event["type"] != "fault":
            continue
        for node in event["down"]:
            key = (event["kind"], node)
            if event["phase"] == "start":
                open_faults[key] = event["t"]
            else:
                windows[node].append((open_faults.pop(key), event["t"] + DOWNTIME_MARGIN))
    return windows


SIGNATURE_VALIDITY = 1.0  # seconds a signature stays valid (keys.max_token_ttl in the suite)


def unverifiable_signatures(
    signs: list[dict[str, Any]], snapshots: list[dict[str, Any]]
) -> list[str]:
    """Signatures that do not verify, or that some verifier could not have verified.

    Each snapshot is a verifier's JWKS, fetched over [t0, t] and cached for the max-age that
    came with it: a signature made while the verifier may still use it (sent after the fetch,
    before t0 + max_age) must find its key in it, and so must a signature made before the
    fetch that is still valid at it (within SIGNATURE_VALIDITY).
    """
    bad: list[str] = []
    jwk_by_kid = {k["kid"]: k for e in snapshots for k in e["keys"]}
    verified: dict[str, bool] = {}
    ordered = sorted(signs, key=lambda e: e["t0"])
    sent = [e["t0"] for e in ordered]
    for e in ordered:  # each signature, against its key
        jwk = jwk_by_kid.get(e["kid"])
        ok = jwk is not None and verify_signature(
            jwk, base64.b64decode(e["payload"]), base64.b64decode(e["signature"])
        )
        verified[e["kid"]] = verified.get(e["kid"], True) and ok
        if not ok:
            bad.append(f"signature by {e['kid']} at {e['t0']:.3f} does not verify")
    for snap in snapshots:  # each verifier's view, against what was signed around it
        kids = {k["kid"] for k in snap["keys"]}
        start = bisect.bisect_left(sent, snap["t0"] - SIGNATURE_VALIDITY)
        end = bisect.bisect_right(sent, snap["t0"] + (snap["max_age"] or 0))
        for e in ordered[start:end]:
            before = e["t"] <= snap["t0"]  # signed, then fetched: still valid at the fetch
            after = e["t0"] >= snap["t"]  # fetched, then signed: within the cache lifetime
            if (before or after) and e["kid"] not in kids:
                bad.append(
                    f"{e['kid']} (signed at {e['t0']:.3f} on {e['node']}) missing from the JWKS "
                    f"{snap['node']} served at {snap['t0']:.3f} (max-age {snap['max_age']})"
                )
                break
    return bad


def check(events: list[dict[str, Any]], etcd_dump: list[dict[str, str]]) -> Verdict:
    verdict = Verdict()
    signs = [e for e in events if e["type"] == "sign"]
    jwks = [e for e in events if e["type"] == "jwks"]
    ok = [e for e in signs if e["ok"]]

    # 1. verifiability, against what every verifier held
    unverifiable = unverifiable_signatures(ok, jwks)
    verdict.violations += [f"unverifiable: {u}" for u in unverifiable[:20]]

    # 2. availability outside the agent's own downtime
    windows = downtimes(events)
    failed = [e for e in signs if not e["ok"]]
    outside = [  # a request that overlapped the agent's own downtime is excused
        e
        for e in failed
        if not any(e["t0"] <= end and e["t"] >= start for start, end in windows.get(e["node"], []))
    ]
    verdict.violations += [
        f"failed sign on {e['node']} at {e['t0']:.3f} outside its downtime: {e['error']}"
        for e in outside[:20]
    ]

    # 3. fencing: one leader per term; one writer per generation
    claims: dict[int, set[str]] = defaultdict(set)
    for e in events:
        if e["type"] == "status" and e["role"] == "leader" and e["term"] is not None:
            claims[e["term"]].add(e["node"])
    for term, nodes in claims.items():
        if len(nodes) > 1:
            verdict.violations.append(f"term {term} claimed by {sorted(nodes)}")
    writers: dict[int, set[str]] = defaultdict(set)
    for kv in etcd_dump:
        if "/audit/" in kv["key"]:
            entry = json.loads(kv["value"])
            if entry["event"].startswith("key_") and "generation" in entry:
                writers[entry["generation"]].add(entry["node"])
    for generation, nodes in writers.items():
        if len(nodes) > 1:
            verdict.violations.append(f"generation {generation} written by {sorted(nodes)}")

    # 4. confidentiality of what etcd holds
    for kv in etcd_dump:
        text = kv["value"]
        if any(marker in text for marker in PRIVATE_MARKERS):
            verdict.violations.append(f"private key material in etcd at {kv['key']}")
        if kv["key"].endswith("/keyset"):
            for record in json.loads(text)["keys"]:
                if record["private"].get("scheme") != "envelope-v1" or "d" in record["jwk"]:
                    verdict.violations.append(f"key {record['kid']} is not wrapped in etcd")

    faults = Counter(e["kind"] for e in events if e["type"] == "fault" and e["phase"] == "start")
    by_node: dict[str, list[float]] = defaultdict(list)
    for e in ok:
        by_node[e["node"]].append(e["t"])
    gaps = {
        node: max((b - a for a, b in itertools.pairwise(ts)), default=0.0)
        for node, ts in by_node.items()
    }
    kids = {e["kid"] for e in ok}
    verdict.summary = {
        "faults": dict(faults),
        "faults_total": sum(faults.values()),
        "signatures": len(ok),
        "failed_all": len(failed),
        "failed_outside": len(outside),
        "unverifiable": len(unverifiable),
        "terms": len(claims),
        "rotations": max(0, len(kids) - 1),
        "jwks_fetches": len(jwks),
        "max_gap": gaps,
    }
    return verdict
