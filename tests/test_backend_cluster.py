"""Three agents on a 3-member etcd rotating through a real backend server, which goes away.

For each backend: the cluster rotates under load; the backend server is then SIGSTOPped (every
call hangs until its deadline) across a due rotation; signing goes on with the loaded keys, the
leader reports the rotation as postponed and why; once the server is back, rotation resumes.
Zero failed signs throughout, and every signature verifies against the JWKS a verifier holds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
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

from agent.demo import LoadReport
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


BACKENDS = {"aws-kms": aws_kms, "vault-transit": vault_transit}


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
