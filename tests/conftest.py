"""Shared fixtures: short temp dirs (Unix socket paths are limited to 107 bytes)."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import AWS_ENV, MotoServer, OpenBaoServer

from consensus.local_etcd import LocalEtcd


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kq-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd1() -> Iterator[LocalEtcd]:
    """One single-member etcd for the whole session; tests isolate themselves by prefix."""
    workdir = Path(tempfile.mkdtemp(prefix="kq-etcd-", dir="/tmp"))
    cluster = LocalEtcd(workdir, size=1)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def etcd3(short_tmp: Path) -> Iterator[LocalEtcd]:
    """A fresh 3-member etcd cluster on loopback for one test."""
    cluster = LocalEtcd(short_tmp / "etcd", size=3)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def unique_prefix(request: pytest.FixtureRequest) -> str:
    return f"/keyquorum-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto server (AWS KMS, Secrets Manager) for the session; tests use their own keys."""
    workdir = Path(tempfile.mkdtemp(prefix="kq-moto-", dir="/tmp"))
    try:
        with MotoServer(workdir) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Dummy AWS credentials in the environment (moto accepts any), never real ones."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return dict(AWS_ENV)


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBaoServer]:
    """A real OpenBao dev server for the session; tests use their own transit keys."""
    workdir = Path(tempfile.mkdtemp(prefix="kq-bao-", dir="/tmp"))
    try:
        with OpenBaoServer(workdir) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
