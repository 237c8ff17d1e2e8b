"""The framed protocol: the codec on its own, then the agent answering it on its socket.

Malformed frames get the HTTP API's error codes and messages, never crash the server, and never
cost the requests around them their answers.
"""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import pytest
import trio
from helpers import QUIET_KEYS
from hypothesis import given
from hypothesis import strategies as st
from test_agent import config_for, post, raw_request, running

from agent import framing
from agent.client import AgentError, AsyncClient, Client
from agent.crypto import verify_signature
from agent.httpd import Peer, UnixHttpServer

# ---- the codec ----------------------------------------------------------------------------------

frames = st.lists(
    st.tuples(st.sampled_from(sorted(framing.OPS)), st.integers(0, 2**32 - 1), st.binary()),
    max_size=6,
)


@given(frames, st.lists(st.integers(1, 40), min_size=1))
def test_frames_split_anywhere_decode_to_what_was_sent(
    sent: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    data = framing.PREAMBLE + b"".join(framing.encode_request(*f) for f in sent)
    decoder = framing.RequestDecoder(max_frame=1 << 20)
    got: list[tuple[int, int, bytes]] = []
    offset, turn = 0, 0
    while offset < len(data):
        step = cuts[turn % len(cuts)]
        decoder.feed(data[offset : offset + step])
        offset, turn = offset + step, turn + 1
        while (frame := decoder.next()) is not None:
            assert isinstance(frame, framing.Frame)
            got.append((frame.op, frame.id, frame.body))
    assert got == sent
    assert not decoder.pending


def test_an_oversized_frame_is_skipped_and_the_next_one_decodes() -> None:
    decoder = framing.RequestDecoder(max_frame=8)
    decoder.feed(framing.PREAMBLE + framing.encode_request(framing.SIGN, 7, b"x" * 100)[:30])
    assert decoder.next() == framing.Oversized(7, 100)
    decoder.feed(b"x" * 79 + framing.encode_request(framing.SIGN, 8, b"ok"))
    assert decoder.next() == framing.Frame(framing.SIGN, 8, b"ok")


@pytest.mark.parametrize(
    "data",
    [b"\x00KX\x01", b"\x00KQ\x02", framing.PREAMBLE + struct.pack(">I", 3) + b"abc"],
    ids=["wrong magic", "unknown version", "length too short for op and id"],
)
def test_a_frame_that_loses_the_boundary_is_a_fatal_400(data: bytes) -> None:
    decoder = framing.RequestDecoder(max_frame=1024)
    decoder.feed(data)
    with pytest.raises(framing.FramingError) as info:
        decoder.next()
    assert info.value.fatal and info.value.status == 400 and info.value.code == "bad_frame"


@pytest.mark.parametrize(
    "body",
    [b"", struct.pack(">I", 0), struct.pack(">II", 2, 1) + b"a", struct.pack(">II", 1, 1) + b"ab"],
    ids=["no count", "empty batch", "truncated", "trailing bytes"],
)
def test_a_malformed_batch_is_a_400_that_names_the_problem(body: bytes) -> None:
    with pytest.raises(framing.FramingError) as info:
        framing.decode_batch(body, limit=16)
    assert info.value.status == 400 and not info.value.fatal and info.value.message


def test_batches_and_answers_round_trip() -> None:
    payloads = [b"", b"a", b"x" * 300]
    assert framing.decode_batch(framing.encode_batch(payloads), limit=3) == payloads
    sigs = [b"s" * 64, b"t" * 64]
    assert framing.decode_signed_batch(framing.encode_signed_batch("kid", "ES256", sigs)) == (
        "kid",
        "ES256",
        sigs,
    )
    headers, body = framing.decode_called(
        framing.encode_called((("cache-control", "max-age=5"),), b"{}")
    )
    assert headers == {"cache-control": "max-age=5"} and body == b"{}"


# ---- the agent answering it -----------------------------------------------------------------


async def framed_exchange(path: Path, data: bytes) -> list[tuple[int, int, bytes]]:
    """Send raw bytes on one connection; every answer until the agent closes or goes quiet."""
    stream = await trio.open_unix_socket(str(path))
    decoder = framing.ResponseDecoder()
    answers = []
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(1.0):
            while chunk := await stream.receive_some(65536):
                decoder.feed(chunk)
                while (answer := decoder.next()) is not None:
                    answers.append(answer)
    return answers


def error_of(body: bytes) -> dict[str, str]:
    return dict(json.loads(body)["error"])


async def test_pipelined_frames_with_a_bad_one_in_the_middle_are_all_answered_in_order(
    short_tmp: Path,
) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config), AsyncClient(config.socket.path) as client:
        jwks = await client.jwks()
        data = framing.PREAMBLE + b"".join(
            [
                framing.encode_request(framing.SIGN, 1, b"first"),
                framing.encode_request(99, 2, b"no such op"),
                framing.encode_request(framing.SIGN_BATCH, 3, b"\x00"),
                framing.encode_request(framing.CALL, 4, b"garbage"),
                framing.encode_request(framing.SIGN, 5, b"last"),
            ]
        )
        answers = await framed_exchange(config.socket.path, data)
        assert [(i, s) for i, s, _ in answers] == [(1, 200), (2, 404), (3, 400), (4, 400), (5, 200)]
        assert error_of(answers[1][2])["code"] == "unknown_op"
        assert error_of(answers[2][2])["code"] == "bad_request"
        for (_, _, body), payload in ((answers[0], b"first"), (answers[4], b"last")):
            kid, _, signature = framing.decode_signed(body)
            key = next(k for k in jwks["keys"] if k["kid"] == kid)
            assert verify_signature(key, payload, signature)


async def test_a_frame_that_loses_the_boundary_is_answered_after_the_ones_before_it(
    short_tmp: Path,
) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config), AsyncClient(config.socket.path) as client:
        data = (
            framing.PREAMBLE
            + framing.encode_request(framing.SIGN, 1, b"before")
            + struct.pack(">I", 2)
            + b"zz"
        )
        answers = await framed_exchange(config.socket.path, data)
        assert [(i, s) for i, s, _ in answers] == [(1, 200), (0, 400)]
        assert "too short" in error_of(answers[1][2])["message"]
        # Another connection, and the client's own, are unaffected.
        assert (await client.sign(b"after")).signature


async def test_an_oversized_frame_gets_413_and_the_connection_goes_on(short_tmp: Path) -> None:
    config = config_for(
        short_tmp, keys=QUIET_KEYS, sections={"socket": {"max_request_bytes": 1024}}
    )
    async with running(config):
        data = framing.PREAMBLE + b"".join(
            [
                framing.encode_request(framing.SIGN, 1, b"x" * 5000),
                framing.encode_request(framing.SIGN, 2, b"small"),
            ]
        )
        answers = await framed_exchange(config.socket.path, data)
        assert [(i, s) for i, s, _ in answers] == [(1, 413), (2, 200)]
        assert error_of(answers[0][2])["code"] == "too_large"


async def test_a_client_that_hangs_up_mid_frame_costs_nobody_else_anything(
    short_tmp: Path,
) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config), AsyncClient(config.socket.path) as client:
        stream = await trio.open_unix_socket(str(config.socket.path))
        await stream.send_all(framing.PREAMBLE + framing.encode_request(framing.SIGN, 1, b"x")[:7])
        await stream.aclose()
        assert (await client.sign(b"still signing")).signature


async def test_framed_errors_carry_the_http_apis_codes_and_messages(short_tmp: Path) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS, sections={"socket": {"max_batch": 2}})
    async with running(config):
        claims = json.dumps({"claims": {"sub": "a", "iat": 1}}).encode()
        cases = [
            (framing.JWT, claims, "/v1/jwt", claims),
            (framing.JWT, b"{nope", "/v1/jwt", b"{nope"),
            (framing.SIGN_BATCH, framing.encode_batch([b"a"] * 3), "/v1/sign",
             json.dumps({"payloads": ["YQ"] * 3}).encode()),
        ]  # fmt: skip
        for op, body, path, http_body in cases:
            answers = await framed_exchange(
                config.socket.path, framing.PREAMBLE + framing.encode_request(op, 1, body)
            )
            status, document = await raw_request(config.socket.path, post(path, http_body))
            assert answers[0][1] == status >= 400
            assert json.loads(answers[0][2]) == document


async def test_one_async_client_shared_by_many_tasks_pipelines_their_requests(
    short_tmp: Path,
) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS)
    async with running(config), AsyncClient(config.socket.path) as client:
        jwks = await client.jwks()
        results: dict[int, bytes] = {}

        async def task(n: int) -> None:
            for i in range(20):
                result = await client.sign(f"{n}/{i}".encode())
                key = next(k for k in jwks["keys"] if k["kid"] == result.kid)
                assert verify_signature(key, f"{n}/{i}".encode(), result.signature)
                results[n * 100 + i] = result.signature

        async with trio.open_nursery() as nursery:
            for n in range(16):
                nursery.start_soon(task, n)
        assert len(results) == 320
        token = await client.jwt({"sub": "x"})
        assert token.kid in {k["kid"] for k in jwks["keys"]}


def test_the_sync_client_speaks_both_protocols_and_gets_the_same_answers(short_tmp: Path) -> None:
    config = config_for(short_tmp, keys=QUIET_KEYS)

    async def main() -> None:
        async with running(config):
            await trio.to_thread.run_sync(check)

    def check() -> None:
        with (
            Client(config.socket.path) as framed,
            Client(config.socket.path, protocol="http") as http,
        ):
            for client in (framed, http):
                jwks, max_age = client.jwks_with_max_age()
                assert max_age is not None and max_age > 0
                result = client.sign(b"hello")
                key = next(k for k in jwks["keys"] if k["kid"] == result.kid)
                assert verify_signature(key, b"hello", result.signature)
                batch = client.sign_batch([b"a", b"b"])
                assert len(batch.signatures) == 2
                assert client.jwt({"sub": "s"}, ttl_seconds=5).kid == result.kid
                assert client.status()["node_id"]
                assert "keyquorum_signatures_total" in client.metrics()
                with pytest.raises(AgentError) as info:
                    client.revoke("no-such-kid")
                assert info.value.status == 409 or info.value.status == 404
            assert framed.protocol == "framed" and http.protocol == "http"

    trio.run(main)


class OldServer(UnixHttpServer):
    """An agent from before the framed protocol: the preamble is garbage HTTP to it."""

    async def _serve_framed(self, stream: trio.SocketStream, peer: Peer, first: bytes) -> None:
        body = b'{"error":{"code":"bad_http","message":"malformed HTTP request"}}'
        await stream.send_all(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )


async def test_clients_fall_back_to_http_when_the_agent_predates_framing(short_tmp: Path) -> None:
    from test_httpd import Toy

    server = OldServer(Toy(), short_tmp / "old.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with AsyncClient(short_tmp / "old.sock") as client:
            ok, body = await client.healthz()
            assert ok and body == {"status": "ok"} and client.protocol == "http"

        def sync() -> None:
            with Client(short_tmp / "old.sock") as client:
                assert client.healthz() == (True, {"status": "ok"})
                assert client.protocol == "http"

        await trio.to_thread.run_sync(sync)
        server.shutdown()


async def test_a_long_eddsa_batch_signs_on_two_threads_in_payload_order(short_tmp: Path) -> None:
    config = config_for(short_tmp, keys={**QUIET_KEYS, "algorithm": "EdDSA"})
    async with running(config), AsyncClient(config.socket.path) as client:
        jwks = await client.jwks()
        payloads = [f"payload {i}".encode() for i in range(40)]
        batch = await client.sign_batch(payloads)
        key = next(k for k in jwks["keys"] if k["kid"] == batch.kid)
        assert batch.alg == "EdDSA" and len(batch.signatures) == 40
        assert all(
            verify_signature(key, p, s) for p, s in zip(payloads, batch.signatures, strict=True)
        )
        assert any(t.name.startswith("keyquorum-sign") for t in threading.enumerate())
    # The helper thread stops with the agent.
    assert not any(t.name.startswith("keyquorum-sign") for t in threading.enumerate())


async def test_frames_needing_a_wait_amid_instant_ones_keep_their_order(short_tmp: Path) -> None:
    # After its first request a connection is answered by the server's reactor task, which
    # hands it back to the connection's own task for anything that must wait (a JWT, a CALL,
    # an error frame) and takes it again afterwards: answers must stay in request order.
    config = config_for(
        short_tmp, keys=QUIET_KEYS, sections={"socket": {"max_request_bytes": 1024}}
    )
    async with running(config):
        stream = await trio.open_unix_socket(str(config.socket.path))
        decoder = framing.ResponseDecoder()

        async def answers(count: int) -> list[tuple[int, int, bytes]]:
            got = []
            with trio.fail_after(5):
                while len(got) < count:
                    while (answer := decoder.next()) is not None:
                        got.append(answer)
                    if len(got) < count:
                        decoder.feed(await stream.receive_some(65536))
            return got

        async with stream:
            await stream.send_all(framing.PREAMBLE + framing.encode_request(framing.SIGN, 1, b"a"))
            assert [s for _, s, _ in await answers(1)] == [200]
            for round_ in range(3):
                base = 10 * (round_ + 1)
                await stream.send_all(
                    b"".join(
                        [
                            framing.encode_request(framing.SIGN, base + 1, b"b"),
                            framing.encode_request(framing.JWT, base + 2, b'{"claims":{}}'),
                            framing.encode_request(framing.SIGN_BATCH, base + 3,
                                                   framing.encode_batch([b"c", b"d"])),
                            framing.encode_request(framing.CALL, base + 4, b"GET /healthz\n"),
                            framing.encode_request(42, base + 5, b""),
                            framing.encode_request(framing.SIGN, base + 6, b"e" * 2000),
                            framing.encode_request(framing.SIGN, base + 7, b"f"),
                        ]
                    )
                )  # fmt: skip
                got = await answers(7)
                assert [(i - base, s) for i, s, _ in got] == [
                    (1, 200), (2, 200), (3, 200), (4, 200), (5, 404), (6, 413), (7, 200),
                ]  # fmt: skip
                assert "token" in json.loads(got[1][2])


@pytest.mark.parametrize("protocol", ["framed", "http"])
async def test_a_client_reconnects_once_when_the_agent_restarted(
    short_tmp: Path, protocol: str
) -> None:
    """The client's idle connection died with the agent: the next call retries on a new one."""
    config = config_for(short_tmp, keys=QUIET_KEYS)
    with Client(config.socket.path, protocol=protocol) as client:
        async with running(config):
            assert (await trio.to_thread.run_sync(client.sign, b"before")).signature
        async with running(config):
            assert (await trio.to_thread.run_sync(client.sign, b"after")).signature
