"""A small etcd v3 client over the JSON gateway (`/v3/...`), with httpx on trio.

Why not the `etcd3` package: it does not import with current protobuf and has had no release since
2020 (DESIGN.md §4, shared/notes/etcd-client.md); Patroni talks to the same gateway.
Gateway facts handled here (measured on etcd 3.4 and 3.5):
- keys and values are base64; 64-bit numbers (revisions, lease ids, TTLs) are JSON strings;
- fields at their default value are omitted: no `succeeded` when false, no `kvs` when empty,
  no `TTL` when keeping alive a lost lease, no `type` for a PUT event — all still HTTP 200;
- streams (watch) are chunked NDJSON `{"result": ...}`; errors can arrive inside a 200 stream as
  `{"error": {...}}`; a watch from a compacted revision answers `canceled: true` with
  `compact_revision` and leaves the stream open;
- httpx's default read timeout would kill idle watches, so watch streams read without one.
Every unary call has a deadline and fails over across endpoints; errors become StoreUnavailable
(retry) or StoreError (a request etcd refused).
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import trio

from consensus.store import StoreError, StoreUnavailable

Target = Literal["CREATE", "MOD", "VERSION", "VALUE", "LEASE"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def range_end_for_prefix(prefix: bytes) -> bytes:
    """The etcd range end that covers every key starting with `prefix`."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


@dataclass(frozen=True, slots=True)
class KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> KV:
        return cls(
            key=_unb64(raw.get("key")),
            value=_unb64(raw.get("value")),
            create_revision=int(raw.get("create_revision", 0)),
            mod_revision=int(raw.get("mod_revision", 0)),
            version=int(raw.get("version", 0)),
            lease=int(raw.get("lease", 0)),
        )


@dataclass(frozen=True, slots=True)
class Compare:
    """One txn condition: `target` of `key` EQUAL to `value` (an int, or bytes for VALUE)."""

    key: bytes
    target: Target
    value: int | bytes
    result: Literal["EQUAL", "NOT_EQUAL", "GREATER", "LESS"] = "EQUAL"

    def to_json(self) -> dict[str, Any]:
        field_name = {
            "CREATE": "create_revision",
            "MOD": "mod_revision",
            "VERSION": "version",
            "VALUE": "value",
            "LEASE": "lease",
        }[self.target]
        value = _b64(self.value) if isinstance(self.value, bytes) else str(self.value)
        return {
            "key": _b64(self.key),
            "target": self.target,
            "result": self.result,
            field_name: value,
        }


def put_op(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def range_op(key: bytes) -> dict[str, Any]:
    return {"request_range": {"key": _b64(key)}}


def delete_op(key: bytes) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[dict[str, Any]] = field(default_factory=list)

    def ranges(self) -> list[list[KV]]:
        """The KVs of each range response, in order (an empty list when a key is absent)."""
        out = []
        for response in self.responses:
            if "response_range" in response:
                out.append([KV.from_json(kv) for kv in response["response_range"].get("kvs", [])])
        return out


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    kv: KV


@dataclass(frozen=True, slots=True)
class WatchBatch:
    revision: int
    events: list[WatchEvent]


class WatchCompacted(StoreError):
    """The watch start revision was compacted away: re-read everything, then watch again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch revision compacted (oldest available {compact_revision})")
        self.compact_revision = compact_revision


class EtcdClient:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        verify: ssl.SSLContext | str | bool = True,
        cert: tuple[str, str] | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("store.endpoints: give at least one etcd endpoint URL")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._current = 0
        self._username, self._password = username, password
        self._token: str | None = None
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), verify=_tls_context(verify, cert), trust_env=False
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def describe(self) -> str:
        return "etcd " + ",".join(self.endpoints)

    # ---- transport ---------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    async def _authenticate(self, endpoint: str) -> None:
        if self._username is None or self._token is not None:
            return
        response = await self._http.post(
            f"{endpoint}/v3/auth/authenticate",
            json={"name": self._username, "password": self._password or ""},
        )
        if response.status_code != 200:
            raise StoreError(f"etcd authentication as {self._username!r} failed: {response.text}")
        self._token = response.json()["token"]

    async def call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST to the first endpoint that answers; fail over to the next on transport errors."""
        errors = []
        for step in range(len(self.endpoints)):
            index = (self._current + step) % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                with trio.fail_after(self.timeout):
                    await self._authenticate(endpoint)
                    response = await self._http.post(
                        f"{endpoint}{path}", json=body, headers=self._headers()
                    )
            except (httpx.TransportError, trio.TooSlowError) as exc:
                errors.append(f"{endpoint}: {type(exc).__name__} {exc}".strip())
                continue
            self._current = index
            doc = _json_or_error(response, path)
            if doc.get("code") == 16 or "invalid auth token" in str(doc.get("message", "")):
                self._token = None  # expired token: authenticate again on the next call
                raise StoreUnavailable(f"etcd rejected the auth token at {endpoint}; retrying")
            if "error" in doc or ("code" in doc and "message" in doc):
                message = doc.get("message") or doc.get("error")
                if doc.get("code") == 14 or "unavailable" in str(message).lower():
                    errors.append(f"{endpoint}: {message}")
                    continue
                raise StoreError(f"etcd {path} failed: {message}{_hint(str(message))}")
            return doc
        raise StoreUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    # ---- KV ------------------------------------------------------------------------------------

    async def range(self, key: bytes, *, prefix: bool = False) -> tuple[list[KV], int]:
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(range_end_for_prefix(key))
        doc = await self.call("/v3/kv/range", body)
        kvs = [KV.from_json(kv) for kv in doc.get("kvs", [])]
        return kvs, int(doc["header"]["revision"])

    async def get(self, key: bytes) -> KV | None:
        kvs, _ = await self.range(key)
        return kvs[0] if kvs else None

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        doc = await self.call("/v3/kv/put", put_op(key, value, lease)["request_put"])
        return int(doc["header"]["revision"])

    async def delete(self, key: bytes) -> int:
        doc = await self.call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(doc["header"]["revision"])

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Mapping[str, Any]],
        failure: Sequence[Mapping[str, Any]] = (),
    ) -> TxnResult:
        doc = await self.call(
            "/v3/kv/txn",
            {
                "compare": [c.to_json() for c in compares],
                "success": list(success),
                "failure": list(failure),
            },
        )
        return TxnResult(
            succeeded=bool(doc.get("succeeded", False)),
            revision=int(doc["header"]["revision"]),
            responses=list(doc.get("responses", [])),
        )

    # ---- leases --------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        doc = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        if doc.get("error"):
            raise StoreError(f"etcd lease grant failed: {doc['error']}")
        return int(doc["ID"]), int(doc.get("TTL", 0))

    async def lease_keepalive(self, lease: int) -> int:
        """Refresh the lease once; returns the TTL granted, 0 when the lease is gone."""
        doc = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(doc.get("result", {}).get("TTL", 0))

    async def lease_revoke(self, lease: int) -> None:
        await self.call("/v3/lease/revoke", {"ID": str(lease)})

    async def lease_time_to_live(self, lease: int) -> int:
        doc = await self.call("/v3/lease/timetolive", {"ID": str(lease)})
        return int(doc.get("TTL", -1))

    # ---- watch ---------------------------------------------------------------------------------

    async def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int = 0
    ) -> AsyncGenerator[WatchBatch, None]:
        """Batches of events after `start_revision`. Ends by raising: StoreUnavailable when the
        stream breaks, WatchCompacted when history is gone. The caller resumes from the last
        revision it saw + 1."""
        request: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            request["range_end"] = _b64(range_end_for_prefix(key))
        if start_revision:
            request["start_revision"] = str(start_revision)
        endpoint = self.endpoints[self._current]
        timeout = httpx.Timeout(self.timeout, read=None)
        try:
            await self._authenticate(endpoint)
            async with self._http.stream(
                "POST",
                f"{endpoint}/v3/watch",
                json={"create_request": request},
                headers=self._headers(),
                timeout=timeout,
            ) as response:
                if response.status_code != 200:
                    raise StoreUnavailable(f"etcd watch at {endpoint}: HTTP {response.status_code}")
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    doc = json.loads(line)
                    if "error" in doc:
                        raise StoreUnavailable(f"etcd watch at {endpoint} broke: {doc['error']}")
                    result = doc.get("result", {})
                    if result.get("canceled"):
                        if result.get("compact_revision"):
                            raise WatchCompacted(int(result["compact_revision"]))
                        raise StoreUnavailable(f"etcd canceled the watch: {result}")
                    events = [
                        WatchEvent(e.get("type", "PUT"), KV.from_json(e.get("kv", {})))
                        for e in result.get("events", [])
                    ]
                    if events:
                        yield WatchBatch(int(result["header"]["revision"]), events)
        except (httpx.TransportError, json.JSONDecodeError) as exc:
            self._current = (self._current + 1) % len(self.endpoints)
            raise StoreUnavailable(f"etcd watch at {endpoint} lost: {type(exc).__name__}") from None
        self._current = (self._current + 1) % len(self.endpoints)
        raise StoreUnavailable(f"etcd watch stream at {endpoint} ended")


def _tls_context(
    verify: ssl.SSLContext | str | bool, cert: tuple[str, str] | None
) -> ssl.SSLContext | bool:
    """TLS settings for httpx: a CA file and/or a client certificate become one SSL context."""
    if isinstance(verify, ssl.SSLContext) or (cert is None and not isinstance(verify, str)):
        return verify
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
        except (OSError, ssl.SSLError) as exc:
            raise StoreError(f"store.ca_file: cannot load the CA bundle {verify}: {exc}") from None
    if cert is not None:
        try:
            context.load_cert_chain(cert[0], cert[1])
        except (OSError, ssl.SSLError) as exc:
            raise StoreError(
                f"store.cert_file/store.key_file: cannot load the client certificate: {exc}"
            ) from None
    return context


def _hint(message: str) -> str:
    if "user name is empty" in message:
        return " (etcd has authentication enabled: set store.username and store.password)"
    if "permission denied" in message:
        return " (grant the etcd user readwrite on the store prefix: etcdctl role grant-permission)"
    return ""


def _json_or_error(response: httpx.Response, path: str) -> dict[str, Any]:
    try:
        doc = response.json()
    except ValueError:
        raise StoreUnavailable(
            f"etcd {path}: HTTP {response.status_code} with a non-JSON body"
        ) from None
    if not isinstance(doc, dict):
        raise StoreUnavailable(f"etcd {path}: unexpected answer {doc!r}")
    return doc
