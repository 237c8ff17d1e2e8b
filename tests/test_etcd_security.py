"""etcd with TLS client certificates and with user/password authentication, both real."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consensus.etcd import EtcdStore
from consensus.etcd_client import EtcdClient
from consensus.local_etcd import LocalEtcd, Tls, find_etcd
from consensus.store import StoreError, StoreUnavailable

pytestmark = pytest.mark.etcd


def _write(
    path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> tuple[Path, Path]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".pem")
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        usage = [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usage.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def tls_etcd(short_tmp: Path) -> Iterator[tuple[LocalEtcd, Path, tuple[Path, Path]]]:
    pki = short_tmp / "pki"
    pki.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("keyquorum test CA", ca_key, ca_key, None, ca=True)
    ca_path, _ = _write(pki / "ca", ca_key, ca)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _write(
        pki / "server", server_key, _cert("etcd", server_key, ca_key, ca.subject, server=True)
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _write(pki / "client", client_key, _cert("n1", client_key, ca_key, ca.subject))
    etcd = LocalEtcd(
        short_tmp / "etcd", size=1, tls=Tls(server[0], server[1], ca_path), probe_cert=client
    )
    try:
        yield etcd.start(), ca_path, client
    finally:
        etcd.stop()


async def test_tls_with_a_client_certificate_works_and_without_one_is_refused(
    tls_etcd: tuple[LocalEtcd, Path, tuple[Path, Path]],
) -> None:
    etcd, ca, (cert, key) = tls_etcd
    assert etcd.endpoints[0].startswith("https://")
    good = EtcdClient(etcd.endpoints, verify=str(ca), cert=(str(cert), str(key)), timeout=3)
    store = EtcdStore(good, "/keyquorum/tls")
    revision = await store.compare_and_swap(0, b"over tls")
    assert (await store.get()).revision == revision
    await store.aclose()
    anonymous = EtcdClient(etcd.endpoints, verify=str(ca), timeout=3)
    with pytest.raises(StoreUnavailable):
        await anonymous.get(b"/keyquorum/tls/keyset")
    await anonymous.aclose()
    untrusting = EtcdClient(etcd.endpoints, cert=(str(cert), str(key)), timeout=3)
    with pytest.raises(StoreUnavailable):  # the server's CA is not in the default trust store
        await untrusting.get(b"/keyquorum/tls/keyset")
    await untrusting.aclose()


@pytest.fixture
def auth_etcd(short_tmp: Path) -> Iterator[LocalEtcd]:
    etcd = LocalEtcd(short_tmp / "etcd", size=1).start()
    ctl = str(Path(find_etcd()).with_name("etcdctl"))
    try:
        for command in (
            ["user", "add", "root:rootpw"],
            ["user", "add", "kq:kqpw"],
            ["role", "add", "kq"],
            ["role", "grant-permission", "kq", "--prefix=true", "readwrite", "/keyquorum/"],
            ["user", "grant-role", "kq", "kq"],
            ["auth", "enable"],
        ):
            subprocess.run(
                [ctl, "--endpoints", etcd.endpoints[0], "--user", "root:rootpw", *command],
                check=True,
                capture_output=True,
                timeout=30,
            )
        yield etcd
    finally:
        etcd.stop()


@pytest.mark.parametrize(
    ("user", "password", "key", "error"),
    [
        ("kq", "kqpw", b"/keyquorum/auth/keyset", None),
        (None, None, b"/keyquorum/auth/keyset", "set store.username and store.password"),
        ("kq", "wrong", b"/keyquorum/auth/keyset", "authentication as 'kq' failed"),
        ("kq", "kqpw", b"/elsewhere/keyset", "grant the etcd user readwrite"),
    ],
)
async def test_user_password_auth_and_its_errors_name_the_fix(
    auth_etcd: LocalEtcd, user: str | None, password: str | None, key: bytes, error: str | None
) -> None:
    client = EtcdClient(auth_etcd.endpoints, username=user, password=password, timeout=3)
    try:
        if error is None:
            revision = await client.put(key, b"v")
            assert (await client.get(key)).mod_revision == revision  # type: ignore[union-attr]
        else:
            with pytest.raises(StoreError, match=error):
                await client.put(key, b"v")
    finally:
        await client.aclose()
