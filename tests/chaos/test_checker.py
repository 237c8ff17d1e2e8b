"""The offline checker catches what it must (a checker that cannot fail proves nothing)."""

from __future__ import annotations

import base64

from checker import check

from agent.crypto import Signer, generate_private_key


def signed_events(tamper: bool = False) -> list[dict[str, object]]:
    signer = Signer.from_private_key(generate_private_key("ES256"), "ES256")
    signature = signer.sign(b"m")
    if tamper:
        signature = bytes([signature[0] ^ 1]) + signature[1:]
    return [
        {"type": "jwks", "t0": 0.0, "t": 0.01, "node": "n1", "keys": [signer.jwk], "max_age": 1},
        {"type": "sign", "t0": 0.5, "t": 0.51, "node": "n1", "ok": True, "kid": signer.kid,
         "payload": base64.b64encode(b"m").decode(),
         "signature": base64.b64encode(signature).decode()},
        {"type": "jwks", "t0": 0.9, "t": 0.91, "node": "n2", "keys": [signer.jwk], "max_age": 1},
    ]  # fmt: skip


def test_a_clean_log_passes() -> None:
    assert check(signed_events(), []).ok


def test_a_bad_signature_is_unverifiable() -> None:
    verdict = check(signed_events(tamper=True), [])
    assert any("unverifiable" in v for v in verdict.violations)


def test_a_failed_sign_counts_only_outside_the_agent_s_own_downtime() -> None:
    fault = {"type": "fault", "kind": "kill", "down": ["n1"]}
    events = [
        {**fault, "phase": "start", "t": 1.0},
        {"type": "sign", "t0": 1.5, "t": 1.5, "node": "n1", "ok": False, "error": "x"},
        {**fault, "phase": "end", "t": 2.0},
        {"type": "sign", "t0": 1.6, "t": 1.6, "node": "n2", "ok": False, "error": "x"},
    ]
    # A request sent just before the fault began and failed because of it is excused too.
    events.append({"type": "sign", "t0": 0.99, "t": 1.2, "node": "n1", "ok": False, "error": "y"})
    verdict = check(events, [])
    assert verdict.summary["failed_all"] == 3 and verdict.summary["failed_outside"] == 1
    assert "n2" in verdict.violations[0]


def test_two_leaders_in_one_term_and_two_writers_of_a_generation_are_caught() -> None:
    status = {"type": "status", "role": "leader", "term": 7, "t": 1.0}
    audit = '{"event": "key_created", "generation": 4, "node": "%s"}'
    dump = [{"key": f"/p/audit/{i}", "value": audit % n} for i, n in enumerate(("n1", "n2"))]
    verdict = check([{**status, "node": "n1"}, {**status, "node": "n2"}], dump)
    assert any("term 7" in v for v in verdict.violations)
    assert any("generation 4" in v for v in verdict.violations)


def test_private_material_in_etcd_is_caught() -> None:
    dump = [{"key": "/p/x", "value": "-----BEGIN PRIVATE KEY-----"}]
    assert any("private key material" in v for v in check([], dump).violations)


def test_a_snapshot_is_judged_by_its_own_max_age() -> None:
    fetched, signed, _ = signed_events()
    late = {**signed, "t0": 1.5, "t": 1.51}  # signed 1.5 s after n1's fetch
    stale = {"type": "jwks", "t0": 1.0, "t": 1.01, "node": "n3", "keys": [], "max_age": 0}
    assert check([fetched, late], []).ok  # n1's view (max-age 1) expired before 1.5
    verdict = check([fetched, late, {**stale, "max_age": 1}], [])
    assert any("missing from the JWKS n3" in v for v in verdict.violations)
    assert check([fetched, late, stale], []).ok  # max-age 0: not used after its fetch
