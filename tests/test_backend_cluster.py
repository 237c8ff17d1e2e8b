"""Three agents on a 3-member etcd rotating through a real backend server, which goes away.

For each backend: the cluster rotates under load; the backend server is then SIGSTOPped (every
call hangs until its deadline) across a due rotation; signing goes on with the loaded keys, the
leader reports the rotation as postponed and why; once the server is back, rotation resumes.
Zero failed signs throughout, and every signature verifies against the JWKS a verifier holds.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from cluster_tools import (
    Node,
    kids_of,
    leader_of,
    make_nodes,
    sign_everywhere,
    start_nodes,
    wait_until,
)
from servers import AWS_ENV, MotoServer, OpenBaoServer

from agent.client import AgentError, Client
from agent.demo import LoadReport
from agent.keyset import KeySet, parse_keyset
from consensus.etcd import EtcdStore
from consensus.etcd_client import EtcdClient
from consensus.local_etcd import LocalEtcd

pytestmark = [pytest.mark.slow, pytest.mark.etcd]


@dataclass
class BackendUnderTest:
    backend: dict[str, object]  # the [backend] table every node gets
    env: dict[str, str]  # extra environment for the agent processes
    server: Any  # has pause() and resume()


@contextmanager
def aws_kms(workdir: Path) -> Iterator[BackendUnderTest]:
    import boto3

    with MotoServer(workdir / "moto") as server:
        kms = boto3.client(
            "kms",
            endpoint_url=server.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # moto accepts any credentials
        )
        arn = kms.create_key(Description="keyquorum cluster KEK")["KeyMetadata"]["Arn"]
        kms.create_alias(AliasName="alias/keyquorum", TargetKeyId=arn)
        backend = {
            "kind": "aws-kms",
            "key_id": "alias/keyquorum",
            "region": "us-east-1",
            "endpoint_url": server.url,
            "timeout": 2.0,
            "attempt_timeout": 0.5,
        }
        yield BackendUnderTest(backend, dict(AWS_ENV), server)


@contextmanager
def vault_transit(workdir: Path) -> Iterator[BackendUnderTest]:
    with OpenBaoServer(workdir / "bao") as server:
        server.transit_key("keyquorum")
        token = server.token_with_policy(
            "keyquorum-agent",
            'path "transit/encrypt/keyquorum" { capabilities = ["update"] }\n'
            'path "transit/decrypt/keyquorum" { capabilities = ["update"] }\n'
            'path "transit/keys/keyquorum" { capabilities = ["read"] }\n',
        )
        token_file = workdir / "bao-token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        backend = {
            "kind": "vault-transit",
            "address": server.url,
            "key_name": "keyquorum",
            "token_file": str(token_file),
            "timeout": 2.0,
            "attempt_timeout": 0.5,
        }
        yield BackendUnderTest(backend, {}, server)


class _FaultSwitch:
    """pause/resume for an in-process fake: every request answers 503 while paused."""

    def __init__(self, fake: Any) -> None:
        self.fake = fake

    def pause(self) -> None:
        self.fake.fail(503)

    def resume(self) -> None:
        self.fake.heal()


@contextmanager
def gcp_kms(workdir: Path) -> Iterator[BackendUnderTest]:
    from fakes.gcp_kms import FakeCloudKms

    with FakeCloudKms() as fake:
        name = "projects/p/locations/global/keyRings/r/cryptoKeys/keyquorum"
        fake.create_key(name)
        backend = {
            "kind": "gcp-kms",
            "key_name": name,
            "endpoint": fake.endpoint,
            "timeout": 2.0,
            "attempt_timeout": 0.5,
        }
        yield BackendUnderTest(backend, {}, _FaultSwitch(fake))


BACKENDS = {"aws-kms": aws_kms, "vault-transit": vault_transit, "gcp-kms": gcp_kms}


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_cluster_rotates_through_the_backend_and_rides_out_its_outage(
    kind: str, etcd3: LocalEtcd, short_tmp: Path
) -> None:
    with ExitStack() as stack:
        under_test = stack.enter_context(BACKENDS[kind](short_tmp))
        prefix = f"/keyquorum/{kind}-{uuid.uuid4().hex[:8]}"
        nodes = make_nodes(short_tmp, etcd3, backend=under_test.backend, prefix=prefix)
        start_nodes(stack, nodes, {n.name: under_test.env for n in nodes})
        leader = wait_until(lambda: leader_of(nodes), 10, "a leader")
        outage: dict[str, float] = {}
        seen: dict[str, Any] = {}

        def through_outage(signatures: list[Any]) -> bool:
            """Drive the scenario from the load's progress; stop once rotation resumed."""
            now = time.monotonic()
            if "start" not in outage and len(kids_of(signatures)) >= 2:
                outage["start"] = now  # one rotation went through the backend: cut it off
                under_test.server.pause()
            elif "start" in outage and "end" not in outage and now - outage["start"] > 9.0:
                seen["leader"] = leader_status(nodes)
                outage["end"] = now
                under_test.server.resume()
            elif "end" in outage:
                return len(kids_of(signatures, after=outage["end"] + 1.0)) >= 2
            return False

        try:
            report: LoadReport = sign_everywhere(nodes, 90.0, until=through_outage)
        finally:
            under_test.server.resume()
        assert "end" in outage, f"the scenario did not reach the outage: {report.kids()}"
        assert report.failures == [], report.failures[:5]
        assert report.unverifiable(max_age=1.0, validity=1.0) == []
        # During the outage the leader said the rotation was postponed, naming the backend.
        problems = " ".join(seen["leader"]["health"]["reasons"])
        assert "rotation postponed" in problems, seen["leader"]["health"]
        during = kids_of(report.signatures, after=outage["start"] + 1.0) - kids_of(
            report.signatures, after=outage["end"]
        )
        print(
            f"\n{kind}: {len(report.signatures)} signatures, {len(report.kids())} keys, "
            f"outage {outage['end'] - outage['start']:.1f}s, 0 failed; "
            f"leader {leader.name}; keys signing only during the outage: {len(during)}"
        )


def leader_status(nodes: list[Node]) -> dict[str, Any]:
    leader = leader_of(nodes)
    assert leader is not None
    return leader.status()


def test_cluster_rotates_through_a_softhsm_token(etcd3: LocalEtcd, short_tmp: Path) -> None:
    """PKCS#11: every node opens the same SoftHSM2 token (one token directory on this machine,
    as nodes would each reach one network HSM) and wraps with an AES key that never leaves it."""
    from softhsm import create_token, missing

    if missing():
        pytest.skip(missing() or "")
    token = create_token(short_tmp / "hsm")
    pin_file = short_tmp / "hsm" / "pin"
    pin_file.write_text(token.pin)
    pin_file.chmod(0o600)
    backend = {
        "kind": "pkcs11",
        "module": token.module,
        "token_label": token.label,
        "pin_file": str(pin_file),
        "key_label": "keyquorum-kek",
        "create_key": True,
    }
    prefix = f"/keyquorum/hsm-{uuid.uuid4().hex[:8]}"
    nodes = make_nodes(short_tmp, etcd3, backend=backend, prefix=prefix)
    env = {"SOFTHSM2_CONF": str(token.conf)}
    with ExitStack() as stack:
        start_nodes(stack, nodes[:1], {"n1": env})  # n1 creates the token's KEK ...
        start_nodes(stack, nodes[1:], {n.name: env for n in nodes[1:]})  # ... the others find it
        wait_until(lambda: leader_of(nodes), 10, "a leader")
        report = sign_everywhere(nodes, 60.0, until=lambda sigs: len(kids_of(sigs)) >= 3)
    assert report.failures == [], report.failures[:5]
    assert report.unverifiable(max_age=1.0, validity=1.0) == []
    assert len(report.kids()) >= 3
    sealed = [r.private for r in stored_keyset(etcd3, prefix).keys]
    assert all(p["wrapper"] == "pkcs11" for p in sealed)
    print(f"\npkcs11 (SoftHSM2): {len(report.signatures)} signatures, {len(report.kids())} keys")


def stored_keyset(etcd: LocalEtcd, prefix: str) -> KeySet:
    async def read() -> KeySet:
        store = EtcdStore(EtcdClient(etcd.endpoints), prefix)
        try:
            current = await store.get()
        finally:
            await store.aclose()
        assert current.value is not None
        return parse_keyset(current.value)

    return trio.run(read)


def test_remote_kms_keys_sign_rotate_and_none_leaks_when_a_leader_dies_mid_creation(
    etcd3: LocalEtcd, short_tmp: Path
) -> None:
    """backend.mode = "remote" on AWS KMS (moto): a KMS key per rotation, signing in KMS.

    n1 leads with a 3 s hold between creating a key and writing the key set; the operator asks
    it to rotate and it is killed (-9) inside that hold, leaving a KMS key no key set names. The
    new leader retires that orphan, and when the cluster is stopped every KMS key it ever made
    is either named by the key set or scheduled for deletion: zero leaked.
    """
    import boto3

    prefix = f"/keyquorum/remote-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        server = stack.enter_context(MotoServer(short_tmp / "moto"))
        backend = {
            "kind": "aws-kms",
            "mode": "remote",
            "region": "us-east-1",
            "endpoint_url": server.url,
            "timeout": 2.0,
            "attempt_timeout": 1.0,
        }
        kms = boto3.client(
            "kms",
            endpoint_url=server.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # moto accepts any credentials
        )
        nodes = make_nodes(short_tmp, etcd3, backend=backend, prefix=prefix)
        n1 = nodes[0]
        agents = ExitStack()
        stack.enter_context(agents)
        start_nodes(agents, nodes[:1], {"n1": {**AWS_ENV, "KEYQUORUM_FAULT_COMMIT_DELAY": "3"}})
        start_nodes(agents, nodes[1:], {n.name: AWS_ENV for n in nodes[1:]})
        wait_until(lambda: n1.status()["role"] == "leader", 10, "n1 to lead")
        generation = n1.status()["generation"]
        scenario: dict[str, Any] = {}

        def crash_n1_mid_creation() -> None:
            def rotate() -> None:
                with contextlib.suppress(AgentError), Client(n1.socket, timeout=30) as client:
                    client.rotate()

            threading.Thread(target=rotate, daemon=True).start()
            log = n1.directory / "agent.log"
            holding = f"holding generation {generation + 1} "
            wait_until(lambda: holding in log.read_text(), 10, "n1 to hold its write")
            n1.process.kill()
            n1.process.wait()
            scenario["killed_at"] = time.monotonic()
            named = remote_arns(stored_keyset(etcd3, prefix))
            scenario["orphans"] = tagged_arns(kms, prefix) - named

        def done(signatures: list[Any]) -> bool:
            if "killed_at" not in scenario:
                if time.monotonic() - started > 2.0:
                    crash_n1_mid_creation()
                return False
            orphans = scenario["orphans"]
            retired = all(key_state(kms, arn) == "PendingDeletion" for arn in orphans)
            rotated = len(kids_of(signatures, after=scenario["killed_at"] + 3.0)) >= 2
            return retired and rotated

        started = time.monotonic()
        survivors = nodes[1:]
        report = sign_everywhere(survivors, 90.0, until=done)
        assert len(scenario.get("orphans", ())) == 1, scenario
        assert report.failures == [], report.failures[:5]
        assert report.unverifiable(max_age=1.0, validity=1.0) == []
        (orphan,) = scenario["orphans"]
        assert key_state(kms, orphan) == "PendingDeletion", "the orphan was not retired"
        agents.close()  # stop every agent: nothing creates keys any more
        keyset = stored_keyset(etcd3, prefix)
        assert all(r.private["scheme"] == "remote-v1" for r in keyset.keys)
        text = json.dumps([dict(r.private) for r in keyset.keys])
        assert "PRIVATE" not in text and "d" not in {k for r in keyset.keys for k in r.jwk}
        created = tagged_arns(kms, prefix)
        named = remote_arns(keyset)
        pending = {arn for arn in created if key_state(kms, arn) == "PendingDeletion"}
        leaked = created - named - pending
        print(
            f"\nremote aws-kms: {len(report.signatures)} signatures, {len(report.kids())} keys; "
            f"KMS keys created {len(created)}, named by the key set {len(named)}, "
            f"scheduled for deletion {len(pending)}, leaked {len(leaked)}"
        )
        assert leaked == set()
        assert named <= created


def remote_arns(keyset: KeySet) -> set[str]:
    return {r.private["ref"]["key_arn"] for r in keyset.keys}


def tagged_arns(kms: Any, prefix: str) -> set[str]:
    """Every KMS key (any state) tagged with the cluster prefix."""
    arns = set()
    for key in kms.list_keys()["Keys"]:
        tags = kms.list_resource_tags(KeyId=key["KeyArn"])["Tags"]
        if {"TagKey": "keyquorum:prefix", "TagValue": prefix} in tags:
            arns.add(key["KeyArn"])
    return arns


def key_state(kms: Any, arn: str) -> str:
    return str(kms.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"])


def test_remote_transit_keys_rotate_and_retired_ones_are_deleted(
    etcd3: LocalEtcd, short_tmp: Path
) -> None:
    """backend.mode = "remote" on OpenBao transit: a transit key per rotation; once a key has
    left the key set (expired) the leader deletes it, so the transit keys of the cluster are
    exactly the ones its key set names."""
    prefix = f"/keyquorum/transit-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        server = stack.enter_context(OpenBaoServer(short_tmp / "bao"))
        server.api("POST", "sys/mounts/transit", {"type": "transit"})
        token = server.token_with_policy(
            "keyquorum-remote",
            'path "transit/keys/keyquorum-*" { capabilities = ["create", "read", "update", '
            '"delete"] }\n'
            'path "transit/keys" { capabilities = ["list"] }\n'
            'path "transit/sign/keyquorum-*" { capabilities = ["update"] }\n',
        )
        token_file = short_tmp / "bao-token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        backend = {
            "kind": "vault-transit",
            "mode": "remote",
            "address": server.url,
            "token_file": str(token_file),
            "timeout": 2.0,
            "attempt_timeout": 1.0,
        }
        nodes = make_nodes(short_tmp, etcd3, backend=backend, prefix=prefix)
        start_nodes(stack, nodes)
        wait_until(lambda: leader_of(nodes), 10, "a leader")
        first_key: dict[str, str] = {}

        def transit_keys() -> set[str]:
            listing = server.api("GET", "transit/keys?list=true")
            return set(listing["data"]["keys"])

        def first_key_deleted(signatures: list[Any]) -> bool:
            if not first_key:
                first_key["name"] = sorted(transit_keys())[0]
            return len(kids_of(signatures)) >= 3 and first_key["name"] not in transit_keys()

        report = sign_everywhere(nodes, 120.0, until=first_key_deleted)
        assert report.failures == [], report.failures[:5]
        assert report.unverifiable(max_age=1.0, validity=1.0) == []
        assert first_key["name"] not in transit_keys(), "no expired key was ever retired"

        def leftovers() -> set[str]:
            named = {r.private["ref"]["key_name"] for r in stored_keyset(etcd3, prefix).keys}
            return transit_keys() - named

        wait_until(lambda: not leftovers(), 20, "every unnamed transit key to be retired")
        print(
            f"\nremote vault-transit: {len(report.signatures)} signatures, "
            f"{len(report.kids())} keys, 0 failed, 0 transit keys left unnamed"
        )
