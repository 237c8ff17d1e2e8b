"""The TCP listener for remote verifiers: JWKS with Cache-Control and ETag, discovery, HTTPS."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import QUIET_KEYS, write_config

from agent.client import Client
from agent.crypto import decode_jwt
from agent.demo import agent_process
from consensus.local_etcd import free_ports

pytestmark = pytest.mark.slow


def test_verifiers_get_the_jwks_with_cache_headers_and_discovery(short_tmp: Path) -> None:
    port = free_ports(1)[0]
    config = write_config(
        short_tmp,
        keys=QUIET_KEYS,
        sections={
            "jwks": {"listen": f"127.0.0.1:{port}", "metrics": True},
            "jwt": {"issuer": "https://kq.test"},
        },
    )
    base = f"http://127.0.0.1:{port}"
    with agent_process(config, short_tmp / "agent.sock"), Client(short_tmp / "agent.sock") as c:
        token = c.jwt({"sub": "alice"}, 5).token
        local_jwks, local_max_age = c.jwks_with_max_age()
        with httpx.Client(base_url=base, timeout=5) as http:
            response = http.get("/.well-known/jwks.json")
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/jwk-set+json"
            jwks = response.json()
            assert jwks == local_jwks
            assert response.headers["cache-control"] == f"public, max-age={local_max_age}"
            assert decode_jwt(token, jwks, now=time.time())["sub"] == "alice"
            etag = response.headers["etag"]
            again = http.get("/jwks.json", headers={"if-none-match": etag})
            assert again.status_code == 304 and again.content == b""
            assert again.headers["etag"] == etag
            # A rotation publishes a new key: the ETag changes and the full set is served.
            c.rotate()
            changed = http.get("/.well-known/jwks.json", headers={"if-none-match": etag})
            assert changed.status_code == 200 and len(changed.json()["keys"]) == 2
            assert changed.headers["etag"] != etag
            discovery = http.get("/.well-known/openid-configuration").json()
            assert discovery["issuer"] == "https://kq.test"
            assert discovery["jwks_uri"] == f"{base}/.well-known/jwks.json"
            assert discovery["id_token_signing_alg_values_supported"] == ["ES256"]
            assert http.get("/v1/sign").status_code == 404  # nothing but public keys here
            assert "keyquorum_can_sign 1" in http.get("/metrics").text
            assert http.post("/.well-known/jwks.json", content=b"{}").status_code == 405


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "jwks.pem", directory / "jwks-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


def test_the_jwks_is_served_over_https(short_tmp: Path) -> None:
    port = free_ports(1)[0]
    cert_file, key_file = self_signed(short_tmp)
    jwks = {
        "listen": f"127.0.0.1:{port}",
        "cert_file": str(cert_file),
        "key_file": str(key_file),
        "public_url": "https://keys.example.test",
    }
    config = write_config(short_tmp, keys=QUIET_KEYS, sections={"jwks": jwks})
    with agent_process(config, short_tmp / "agent.sock"):
        verify = ssl.create_default_context(cafile=str(cert_file))
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=verify) as http:
            assert len(http.get("/.well-known/jwks.json").json()["keys"]) == 1
            discovery = http.get("/.well-known/openid-configuration").json()
        assert discovery["jwks_uri"] == "https://keys.example.test/.well-known/jwks.json"
        assert discovery["issuer"] == "https://keys.example.test"
        assert http_status(f"https://127.0.0.1:{port}/metrics", verify) == 404  # not enabled
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the cert
            httpx.get(f"https://127.0.0.1:{port}/jwks.json", verify=True, timeout=5)


def test_a_port_in_use_or_a_bad_listen_address_stops_start_up_clearly(short_tmp: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(
            short_tmp, keys=QUIET_KEYS, sections={"jwks": {"listen": f"127.0.0.1:{port}"}}
        )
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert f"jwks.listen: cannot listen on 127.0.0.1:{port}" in result.stderr
    config = write_config(short_tmp, keys=QUIET_KEYS, sections={"jwks": {"listen": "8443"}})
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2 and "jwks.listen: '8443' is not host:port" in result.stderr


def http_status(url: str, verify: ssl.SSLContext) -> int:
    return httpx.get(url, verify=verify, timeout=5).status_code
