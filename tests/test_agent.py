"""The trio daemon in-process: real socket, real local KEK, in-memory or file store.

Each test starts an `Agent` in the test's own nursery, talks to it over its Unix socket with the
async client (or raw bytes for malformed HTTP), and stops it at the end.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import QUIET_KEYS, write_config

from agent.client import AgentError, AsyncClient
from agent.config import AgentConfig, load_config
from agent.crypto import decode_jwt, verify_signature
from agent.daemon import Agent
from agent.httpd import SocketInUse
from agent.keyset import dump_keyset, parse_keyset
from backends.local import LocalKekWrapper
from consensus.memory import MemoryStore
from consensus.store import KeySetStore


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def config_for(directory: Path, **kwargs: Any) -> AgentConfig:
    return load_config(write_config(directory, **kwargs), env={})


@asynccontextmanager
async def running(
    config: AgentConfig,
    store: KeySetStore | None = None,
    *,
    kek: Path | None = None,
    clock: Callable[[], int] | None = None,
    wait_ready: bool = True,
) -> AsyncIterator[Agent]:
    wrapper = LocalKekWrapper.open(kek or config.state_dir / "kek")
    kwargs: dict[str, Any] = {"clock": clock} if clock else {}
    agent = Agent(config, store or MemoryStore(), wrapper, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        if wait_ready:
            with trio.fail_after(10):
                await agent.ready.wait()
        try:
            yield agent
        finally:
            agent.shutdown()


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def raw_request(path: Path, data: bytes) -> tuple[int, dict[str, Any]]:
    """Send raw bytes, read one response; returns (status, JSON body)."""
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(data)
        buf = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                body += chunk
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body[:length] or b"{}")


def post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


# ---- signing ----------------------------------------------------------------------------------


async def test_fresh_agent_bootstraps_a_key_and_its_signatures_verify(short_tmp: Path) -> None:
    config = config_for(short_tmp)
    async with running(config) as agent, AsyncClient(config.socket.path) as client:
        result = await client.sign(b"hello")
        jwks = await client.jwks()
        (jwk,) = [k for k in jwks["keys"] if k["kid"] == result.kid]
        assert verify_signature(jwk, b"hello", result.signature)
        assert not verify_signature(jwk, b"hellO", result.signature)
        assert result.alg == "ES256"
        batch = await client.sign_batch([b"a", b"b", b"c"])
        assert batch.kid == result.kid
        assert all(
            verify_signature(jwk, p, s)
            for p, s in zip([b"a", b"b", b"c"], batch.signatures, strict=True)
        )
        ok, health = await client.healthz()
        assert ok and health["status"] == "ok"
        assert agent.keyring.keyset is not None and agent.keyring.keyset.generation == 1


async def test_jwt_has_kid_iat_and_an_exp_capped_at_max_token_ttl(short_tmp: Path) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config), AsyncClient(config.socket.path) as client:
        result = await client.jwt({"sub": "alice"}, ttl_seconds=3600)
        jwks = await client.jwks()
        claims = decode_jwt(result.token, jwks)
        assert claims["sub"] == "alice"
        assert claims["exp"] - claims["iat"] == 5  # keys.max_token_ttl in QUIET_KEYS
        assert result.expires_at == claims["exp"]
        header = json.loads(base64.urlsafe_b64decode(result.token.split(".")[0] + "=="))
        assert header["kid"] == result.kid


async def test_claims_that_push_exp_beyond_the_cap_are_refused(short_tmp: Path) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config), AsyncClient(config.socket.path) as client:
        far = trio.current_time()  # any number; what matters is the distance from now
        with pytest.raises(AgentError) as info:
            await client.jwt({"sub": "x", "exp": 2**40 + int(far)})
        assert info.value.status == 400 and "max_token_ttl" in info.value.message
        with pytest.raises(AgentError) as info:
            await client.jwt({"iat": 1})
        assert info.value.status == 400 and "set by the agent" in info.value.message


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, None),
        (post("/v1/sign", b"{not json"), 400, "bad_json"),
        (post("/v1/sign", b"[1, 2]"), 400, "bad_request"),
        (post("/v1/sign", b'{"payload": "a+b/"}'), 400, "bad_base64"),
        (post("/v1/sign", b'{"payload": 5}'), 400, "bad_request"),
        (post("/v1/sign", b'{"payload": "aGk", "extra": 1}'), 400, "unknown_field"),
        (post("/v1/sign", b'{"payloads": []}'), 400, "bad_request"),
        (post("/v1/sign", b'{"payload": "aGk", "payloads": ["aGk"]}'), 400, "bad_request"),
        (post("/v1/jwt", b'{"claims": "sub=alice"}'), 400, "bad_request"),
        (post("/v1/jwt", b'{"claims": {}, "ttl_seconds": "60"}'), 400, "bad_request"),
        (post("/v1/jwt", b'{"claims": {}, "ttl_seconds": -1}'), 400, "bad_request"),
        (post("/v1/nope", b"{}"), 404, "not_found"),
        (
            b"GET /v1/sign HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            405,
            "method_not_allowed",
        ),
        (post("/v1/admin/revoke", b'{"kid": ""}'), 400, "bad_request"),
        (post("/v1/admin/import", b'{"pem": "not a key"}'), 400, "bad_key"),
        (post("/v1/admin/import", b'{"pem": "x", "alg": "HS256"}'), 400, "unknown_algorithm"),
    ],
)
async def test_bad_requests_get_a_clear_json_error_and_the_agent_keeps_serving(
    short_tmp: Path, request_bytes: bytes, status: int, code: str | None
) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config) as agent, AsyncClient(config.socket.path) as client:
        generation = agent.keyring.keyset.generation  # type: ignore[union-attr]
        got, body = await raw_request(config.socket.path, request_bytes)
        assert got == status
        assert set(body["error"]) == {"code", "message"} and body["error"]["message"]
        if code is not None:
            assert body["error"]["code"] == code
        # Nothing lost, nothing changed: the agent still signs with the same key set.
        assert (await client.sign(b"still here")).signature
        assert agent.keyring.keyset.generation == generation  # type: ignore[union-attr]


async def test_oversize_body_is_refused_with_413(short_tmp: Path) -> None:
    config = config_for(
        short_tmp, keys=QUIET_KEYS, sections={"socket": {"max_request_bytes": 1024}}
    )
    async with running(config), AsyncClient(config.socket.path) as client:
        big = json.dumps({"payload": b64(b"x" * 4096)}).encode()
        got, body = await raw_request(config.socket.path, post("/v1/sign", big))
        assert got == 413 and body["error"]["message"]
        assert (await client.sign(b"small")).signature


async def test_batch_larger_than_max_batch_is_refused(short_tmp: Path) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS, sections={"socket": {"max_batch": 4}})
    async with running(config), AsyncClient(config.socket.path) as client:
        with pytest.raises(AgentError) as info:
            await client.sign_batch([b"x"] * 5)
        assert info.value.status == 413 and "max_batch" in info.value.message


async def test_caller_outside_the_access_policy_gets_403_naming_the_permission(
    short_tmp: Path,
) -> None:
    other = os.getuid() + 4242
    config = config_for(
        short_tmp,
        keys=QUIET_KEYS,
        sections={
            "access.sign": {"uids": [other]},
            "access.jwt": {"uids": [os.getuid()]},
            "access.admin": {"uids": [other]},
        },
    )
    async with running(config), AsyncClient(config.socket.path) as client:
        with pytest.raises(AgentError) as info:
            await client.sign(b"x")
        assert info.value.status == 403
        assert f"uid {os.getuid()}" in info.value.message and "'sign'" in info.value.message
        with pytest.raises(AgentError) as info:
            await client.rotate()
        assert info.value.status == 403 and "'admin'" in info.value.message
        assert (await client.jwt({"sub": "allowed"})).token  # jwt permission is granted


async def test_a_second_agent_on_the_same_socket_is_refused(short_tmp: Path) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config), AsyncClient(config.socket.path) as client:
        intruder = Agent(config, MemoryStore(), LocalKekWrapper.open(config.state_dir / "kek"))
        with pytest.raises(SocketInUse, match=str(config.socket.path)):
            await intruder.run()
        assert (await client.sign(b"first agent unaffected")).signature


async def test_socket_is_created_0660_and_removed_on_shutdown(short_tmp: Path) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config):
        assert config.socket.path.stat().st_mode & 0o777 == 0o660
    assert not config.socket.path.exists()


# ---- the store misbehaving --------------------------------------------------------------------


async def test_corrupt_key_set_document_is_reported_and_the_last_good_set_kept(
    short_tmp: Path,
) -> None:
    store = MemoryStore()
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config, store) as agent, AsyncClient(config.socket.path) as client:
        good = await store.get()
        kid = (await client.sign(b"before")).kid
        await store.compare_and_swap(
            good.revision, b'{"schema": 1, "generation": 9, "keys": [{"kid'
        )
        await wait_for(lambda: "keyset" in agent.problems)
        result = await client.sign(b"during")
        assert result.kid == kid
        ok, health = await client.healthz()
        assert ok and health["status"] == "degraded"
        assert any("invalid" in r and "keeping generation 1" in r for r in health["reasons"])
        with pytest.raises(AgentError) as info:
            await client.rotate()
        assert info.value.status == 503 and "invalid" in info.value.message
        # The operator puts a valid document back: the agent recovers by itself.
        bad = await store.get()
        assert good.value is not None
        await store.compare_and_swap(bad.revision, good.value)
        await wait_for(lambda: "keyset" not in agent.problems)
        ok, health = await client.healthz()
        assert health["status"] == "ok"


async def test_document_with_private_material_in_the_public_jwk_is_rejected(
    short_tmp: Path,
) -> None:
    store = MemoryStore()
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config, store) as agent:
        current = await store.get()
        assert current.value is not None
        doc = json.loads(current.value)
        doc["generation"] += 1
        doc["keys"][0]["jwk"]["d"] = "AAAA"
        await store.compare_and_swap(current.revision, json.dumps(doc).encode())
        await wait_for(lambda: "keyset" in agent.problems)
        assert "private members" in agent.problems["keyset"]


async def test_agent_restores_a_key_set_deleted_from_the_file_store(short_tmp: Path) -> None:
    from consensus.file import FileStore

    config = config_for(short_tmp, keys=QUIET_KEYS)
    store = FileStore(config.store.path, poll_interval=0.05)
    async with running(config, store) as agent, AsyncClient(config.socket.path) as client:
        kid = (await client.sign(b"x")).kid
        config.store.path.write_bytes(b"garbage that is not a store file")
        assert (await client.sign(b"still signing")).kid == kid
        await wait_for(lambda: agent.health()[0] == "degraded")
        config.store.path.unlink()
        await wait_for(lambda: config.store.path.exists() and agent.health()[0] == "ok")
        restored = await store.get()
        assert restored.value is not None
        assert parse_keyset(restored.value).get(kid) is not None
        assert (await client.sign(b"after")).kid == kid


async def test_wrong_kek_is_reported_and_nothing_is_signed_with_unknown_keys(
    short_tmp: Path,
) -> None:
    store = MemoryStore()
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config, store):
        pass
    other = short_tmp / "other"
    other.mkdir()
    config2 = config_for(other, keys=QUIET_KEYS)
    async with (
        running(config2, store, wait_ready=False) as agent,
        AsyncClient(config2.socket.path) as client,
    ):
        await wait_for(lambda: any(a.startswith("load:") for a in agent.problems))
        message = next(v for a, v in agent.problems.items() if a.startswith("load:"))
        assert "KEK" in message
        ok, health = await client.healthz()
        assert not ok and health["status"] == "unavailable"
        with pytest.raises(AgentError) as info:
            await client.sign(b"x")
        assert info.value.status == 503 and info.value.code == "not_ready"


async def test_key_set_in_the_store_holds_no_unwrapped_private_material(short_tmp: Path) -> None:
    from agent.crypto import private_key_to_pkcs8

    store = MemoryStore()
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config, store) as agent:
        document = (await store.get()).value
        assert document is not None
        for signer in agent.keyring.signers.values():
            key = getattr(signer, "_key", None) or getattr(signer, "private_key", None)
            if key is not None:
                der = private_key_to_pkcs8(key)
                assert der not in document and b64(der).encode() not in document
        parsed = parse_keyset(document)
        assert all(r.private["scheme"] == "envelope-v1" for r in parsed.keys)
        assert dump_keyset(parsed) == document or json.loads(dump_keyset(parsed)) == json.loads(
            document
        )


async def test_metrics_and_status_describe_the_agent(short_tmp: Path) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config), AsyncClient(config.socket.path) as client:
        await client.sign_batch([b"a", b"b"])
        await client.jwt({"sub": "m"})
        text = await client.metrics()
        assert 'keyquorum_keys{state="active"} 1' in text
        assert "keyquorum_can_sign 1" in text
        assert "keyquorum_signatures_total" in text and "keyquorum_jwts_total" in text
        assert 'keyquorum_requests_total{code="200",path="/v1/sign"} 1' in text
        status = await client.status()
        assert status["health"] == {"status": "ok", "reasons": []}
        assert status["role"] == "leader" and status["node_id"] == "n1"
        (key,) = status["keys"]
        assert key["state"] == "active" and key["loaded"] and key["kid"] == status["signing_kid"]
        jwks, max_age = await client.jwks_with_max_age()
        assert max_age == 1  # keys.jwks_max_age in the test timings
        assert [k["kid"] for k in jwks["keys"]] == [key["kid"]]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client under another uid")
@pytest.mark.skipif(
    shutil.which("curl") is None, reason="needs curl: the Python here is not readable by nobody"
)
def test_a_real_caller_under_another_uid_is_checked_by_its_credentials(short_tmp: Path) -> None:
    """A client process running as `nobody`/`nogroup` (curl, since the interpreter lives under
    /root): the socket's group may sign; only root may administer."""
    import grp
    import pwd
    import subprocess

    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    short_tmp.chmod(0o755)
    config = config_for(
        short_tmp,
        keys=QUIET_KEYS,
        sections={
            "socket": {"group": "nogroup", "mode": "0660"},
            "access.sign": {"groups": ["nogroup"]},
            "access.admin": {"uids": [0]},
        },
    )

    def as_nobody() -> None:
        os.setgroups([])
        os.setgid(nogroup)
        os.setuid(nobody)

    def curl(path: str, body: str) -> dict[str, Any]:
        result = subprocess.run(
            [
                "curl",
                "-s",
                "--unix-socket",
                str(config.socket.path),
                "-d",
                body,
                f"http://agent{path}",
            ],
            capture_output=True,
            timeout=30,
            preexec_fn=as_nobody,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with running(config):
            assert config.socket.path.stat().st_gid == nogroup
            signed = await trio.to_thread.run_sync(curl, "/v1/sign", '{"payload": "aGk"}')
            rotated = await trio.to_thread.run_sync(curl, "/v1/admin/rotate", "{}")
            return signed, rotated

    signed, rotated = trio.run(scenario)
    assert len(b64decode_url(signed["signature"])) == 64
    assert rotated["error"]["code"] == "forbidden"
    assert rotated["error"]["message"].startswith(f"uid {nobody} (gid {nogroup}")


def b64decode_url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def test_the_metrics_page_parses_as_prometheus_text_with_latency_histograms(
    short_tmp: Path,
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config), AsyncClient(config.socket.path) as client:
        for i in range(5):
            await client.sign(b"m%d" % i)
        await client.rotate()
        # The new key's activation is scheduled once every member holds it: soon after.
        with trio.fail_after(10):
            while "keyquorum_next_activation_seconds " not in (text := await client.metrics()):
                await trio.sleep(0.05)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    sign = families["keyquorum_sign_seconds"]
    assert sign.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in sign.samples}
    assert samples[("keyquorum_sign_seconds_count", None)] == 5
    assert samples[("keyquorum_sign_seconds_bucket", "+Inf")] == 5
    buckets = [s.value for s in sign.samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    assert families["keyquorum_signatures"].type == "counter"
    (signed,) = [s for s in families["keyquorum_signatures"].samples if s.name.endswith("_total")]
    assert signed.labels["alg"] == "ES256" and signed.value == 5
    store_ops = {s.labels["op"] for s in families["keyquorum_store_seconds"].samples}
    assert "compare_and_swap" in store_ops
    assert {s.labels["op"] for s in families["keyquorum_backend_seconds"].samples} == {"create"}
    for name in (
        "keyquorum_signing_key_age_seconds",
        "keyquorum_next_activation_seconds",
        "keyquorum_next_expiry_seconds",
        "keyquorum_term",
        "keyquorum_degraded",
    ):
        assert families[name].type == "gauge", name
    assert families["keyquorum_next_activation_seconds"].samples[0].value > 0


async def test_an_agent_that_cannot_confirm_its_view_stops_vouching_for_a_jwks(
    short_tmp: Path,
) -> None:
    """A partitioned agent cannot know keys created since it last read the store; they activate
    a grace period later at the earliest, so its JWKS max-age shrinks and then it refuses."""
    config = config_for(short_tmp, keys=QUIET_KEYS)  # grace 1.5 s, skew 0.2 s, max-age 1 s
    async with running(config) as agent, AsyncClient(config.socket.path) as client:
        _, max_age = await client.jwks_with_max_age()
        assert max_age in (0, 1)  # 1.5 - 0.4 s of budget, less up to ~0.2 s since the last read
        now = agent.clock()
        agent.confirmed_at = now - 1200  # budget 1.5 - 0.4 - 1.2 < 0: cannot vouch at all
        with pytest.raises(AgentError) as stale:
            await client.jwks_with_max_age()
        assert stale.value.status == 503 and stale.value.code == "stale"
        assert "fetch it from another node" in stale.value.message
        # Signing goes on: only the JWKS is withheld.
        assert (await client.sign(b"still signs")).signature
        # The next successful read of the store confirms the view again.
        with trio.fail_after(5):
            while agent.confirmed_at < now:
                await trio.sleep(0.01)
        assert (await client.jwks_with_max_age())[1] in (0, 1)
