"""The socket API of DESIGN.md §5: request validation, access checks and responses.

Every handler validates its input completely before acting, answers bad input with a 400 that
names the field, and never echoes request bodies into logs (they may hold key material, e.g. an
imported PEM). Access is decided from the connection's SO_PEERCRED credentials against the
configured policy (permissions: sign, jwt, admin).
"""

from __future__ import annotations

import binascii
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from agent import framing
from agent.crypto import (
    ALGORITHMS,
    Signer,
    SigningKey,
    b64url_decode,
    b64url_encode,
    encode_jwt_async,
    load_pem_private_key,
)
from agent.httpd import ApiError, Peer, Request, Response, json_response
from agent.keyring import Keyring, NotReady
from agent.metrics import Metrics
from agent.policy import (
    KeyState,
    PolicyRefusal,
    key_state,
    signing_key,
)
from agent.timing import SECOND
from backends.base import BackendError
from consensus.store import StoreError

T = TypeVar("T")
STARTUP_WAIT = 10.0  # seconds a request made during start-up waits for the first key
PARALLEL_BATCH = 16  # Ed25519 batches at least this long sign on two threads

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.daemon import Agent

Handler = Callable[[Request], Awaitable[Response]]

# Claims the agent sets itself; a caller may narrow `exp` but never extend it past the cap.
_RESERVED_CLAIMS = frozenset({"iat"})


class SigningContext(Protocol):
    """What the signing endpoints need of an agent: the agent itself, or a worker process's
    mirror of its keyring (`agent.workers`)."""

    config: AgentConfig
    keyring: Keyring
    metrics: Metrics
    ready: trio.Event
    problems: dict[str, str]
    clock: Callable[[], int]


class SigningApi:
    """The hot path: sign and JWT, over HTTP and over the framed protocol (`fast`)."""

    def __init__(self, agent: SigningContext) -> None:
        self.agent = agent
        # Access decisions by (uid, gid, groups, permission): the policy is fixed for the
        # agent's lifetime, and the framed hot path should not re-walk it on every request.
        self._decisions: dict[tuple[int, int, frozenset[int], str], bool] = {}
        self._thread: ThreadPoolExecutor | None = None  # for batches that sign in parallel

    async def counted(self, handler: Handler, request: Request) -> Response:
        """Answer `request` with `handler`, counting the answer in keyquorum_requests_total."""
        metrics = self.agent.metrics
        try:
            response = await handler(request)
        except ApiError as exc:
            metrics.inc("keyquorum_requests_total", path=request.path, code=str(exc.status))
            raise
        metrics.inc("keyquorum_requests_total", path=request.path, code=str(response.status))
        return response

    # ---- the framed protocol's ops ------------------------------------------------------------

    async def fast(self, op: int, body: bytes, peer: Peer) -> bytes:
        """The body of the 200 answer to a framed SIGN, SIGN_BATCH or JWT (agent.framing)."""
        path = "/v1/jwt" if op == framing.JWT else "/v1/sign"
        try:
            if op == framing.SIGN:
                self._allow_peer(peer, "sign", path)
                signer = await self._signer()
                signature = await self._sign_one(signer, body)
                answer = framing.encode_signed(signer.kid, signer.alg, signature)
            elif op == framing.SIGN_BATCH:
                self._allow_peer(peer, "sign", path)
                payloads = framing.decode_batch(body, self.agent.config.socket.max_batch)
                signer = await self._signer()
                signatures = await self._sign_many(signer, payloads)
                answer = framing.encode_signed_batch(signer.kid, signer.alg, signatures)
            elif op == framing.JWT:
                response = await self.jwt(Request("POST", path, "", (), body, peer))
                answer = response.body
            else:
                raise ApiError(404, "unknown_op", f"no such framed operation: {op}")
        except (ApiError, framing.FramingError) as exc:
            self.agent.metrics.inc("keyquorum_requests_total", path=path, code=str(exc.status))
            raise
        self.agent.metrics.inc("keyquorum_requests_total", path=path, code="200")
        return answer

    def sign_now(self, op: int, body: bytes, peer: Peer) -> bytes | None:
        """`fast` for what needs no waiting: SIGN or SIGN_BATCH with a key held in memory by
        a ready agent. None: not such a request; take `fast`. Errors raise as from `fast`."""
        agent = self.agent
        if (op != framing.SIGN and op != framing.SIGN_BATCH) or not agent.ready.is_set():
            return None
        try:
            signer = agent.keyring.current(agent.clock())
        except NotReady:
            return None  # `fast` says why, with the metrics
        if type(signer) is not Signer:
            return None
        try:
            self._allow_peer(peer, "sign", "/v1/sign")
            if op == framing.SIGN:
                answer = framing.encode_signed(
                    signer.kid, signer.alg, self._sign_in_memory(signer, body)
                )
            else:
                payloads = framing.decode_batch(body, agent.config.socket.max_batch)
                signatures = self._sign_many_in_memory(signer, payloads)
                answer = framing.encode_signed_batch(signer.kid, signer.alg, signatures)
        except (ApiError, framing.FramingError) as exc:
            agent.metrics.inc("keyquorum_requests_total", path="/v1/sign", code=str(exc.status))
            raise
        agent.metrics.inc("keyquorum_requests_total", path="/v1/sign", code="200")
        return answer

    # ---- signing -------------------------------------------------------------------------------

    async def sign(self, request: Request) -> Response:
        self._allow(request, "sign")
        body = _json_object(request, allowed={"payload", "payloads"})
        if ("payload" in body) == ("payloads" in body):
            raise ApiError(400, "bad_request", "give exactly one of 'payload' or 'payloads'")
        signer = await self._signer()
        if "payload" in body:
            payload = _b64_field(body["payload"], "payload")
            signature = await self._sign_one(signer, payload)
            return json_response(
                {"kid": signer.kid, "alg": signer.alg, "signature": b64url_encode(signature)}
            )
        payloads = body["payloads"]
        if not isinstance(payloads, list) or not payloads:
            raise ApiError(
                400, "bad_request", "'payloads' must be a non-empty list of base64url strings"
            )
        limit = self.agent.config.socket.max_batch
        if len(payloads) > limit:
            raise ApiError(
                413, "too_large", f"batch of {len(payloads)} exceeds socket.max_batch={limit}"
            )
        data = [_b64_field(p, f"payloads[{i}]") for i, p in enumerate(payloads)]
        signatures = await self._sign_many(signer, data)
        return json_response(
            {
                "kid": signer.kid,
                "alg": signer.alg,
                "signatures": [b64url_encode(s) for s in signatures],
            }
        )

    async def _sign_one(self, signer: SigningKey, payload: bytes) -> bytes:
        if type(signer) is Signer:  # in memory: no await on the hot path
            return self._sign_in_memory(signer, payload)
        metrics = self.agent.metrics
        started = time.perf_counter()
        try:
            signature = await _remote_guard(signer.sign_async(payload))
        finally:
            metrics.observe("keyquorum_sign_seconds", time.perf_counter() - started, alg=signer.alg)
        metrics.inc("keyquorum_signatures_total", alg=signer.alg, kid=signer.kid)
        return signature

    def _sign_in_memory(self, signer: Signer, payload: bytes) -> bytes:
        metrics = self.agent.metrics
        started = time.perf_counter()
        signature = signer.sign(payload)
        metrics.observe("keyquorum_sign_seconds", time.perf_counter() - started, alg=signer.alg)
        metrics.inc("keyquorum_signatures_total", alg=signer.alg, kid=signer.kid)
        return signature

    async def _sign_many(self, signer: SigningKey, payloads: list[bytes]) -> list[bytes]:
        if type(signer) is Signer:
            return self._sign_many_in_memory(signer, payloads)
        signatures = [await _remote_guard(signer.sign_async(p)) for p in payloads]
        self.agent.metrics.inc(
            "keyquorum_signatures_total", len(payloads), alg=signer.alg, kid=signer.kid
        )
        return signatures

    def _sign_many_in_memory(self, signer: Signer, payloads: list[bytes]) -> list[bytes]:
        sign = signer.sign
        if signer.alg == "EdDSA" and len(payloads) >= PARALLEL_BATCH:
            # Ed25519 signing releases the GIL: a helper thread signs the first half while this
            # one signs the rest (a thread hand-off costs about one signature).
            half = len(payloads) // 2
            first = self._helper().submit(lambda: [sign(p) for p in payloads[:half]])
            rest = [sign(p) for p in payloads[half:]]
            signatures = first.result() + rest
        else:
            signatures = [sign(p) for p in payloads]
        self.agent.metrics.inc(
            "keyquorum_signatures_total", len(payloads), alg=signer.alg, kid=signer.kid
        )
        return signatures

    def close(self) -> None:
        """Stop the batch-signing helper thread (if one was started)."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    def _helper(self) -> ThreadPoolExecutor:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="keyquorum-sign")
        return self._thread

    async def jwt(self, request: Request) -> Response:
        self._allow(request, "jwt")
        body = _json_object(request, allowed={"claims", "ttl_seconds"})
        claims = body.get("claims")
        if not isinstance(claims, dict):
            raise ApiError(400, "bad_request", "'claims' must be a JSON object")
        config = self.agent.config
        cap = config.keys.timing.max_token_ttl // SECOND
        ttl = body.get("ttl_seconds", config.jwt.default_ttl // SECOND)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            raise ApiError(400, "bad_request", "'ttl_seconds' must be a positive integer")
        ttl = min(ttl, cap)
        reserved = _RESERVED_CLAIMS & claims.keys()
        if reserved:
            raise ApiError(400, "bad_request", f"claims {sorted(reserved)} are set by the agent")
        now_ms = self.agent.clock()
        iat = now_ms // 1000
        exp = iat + ttl
        if "exp" in claims:
            wanted = claims["exp"]
            if not isinstance(wanted, int) or isinstance(wanted, bool):
                raise ApiError(400, "bad_request", "'exp' must be an integer NumericDate")
            if wanted > iat + cap:
                raise ApiError(
                    400,
                    "exp_beyond_cap",
                    f"'exp' {wanted} is beyond the cap of keys.max_token_ttl={cap}s "
                    f"(latest allowed {iat + cap})",
                )
            if wanted <= iat:
                raise ApiError(400, "bad_request", "'exp' is not in the future")
            exp = wanted
        issuer = config.jwt.issuer
        if issuer is not None:
            if claims.get("iss", issuer) != issuer:
                raise ApiError(
                    403, "forbidden", f"this agent issues tokens only for iss={issuer!r}"
                )
            claims["iss"] = issuer
        if config.jwt.audience is not None:
            claims.setdefault("aud", config.jwt.audience)
        signer = await self._signer()
        token = await _remote_guard(encode_jwt_async(signer, {**claims, "iat": iat, "exp": exp}))
        self.agent.metrics.inc("keyquorum_jwts_total", kid=signer.kid)
        return json_response({"token": token, "kid": signer.kid, "expires_at": exp})

    # ---- helpers ------------------------------------------------------------------------------

    async def _signer(self) -> SigningKey:
        """The current signer. While the agent is still starting (never ready yet, no problem
        known: say, requests queued on a socket systemd held open across a restart), wait for
        its first key a little instead of failing at once."""
        agent = self.agent
        if not agent.ready.is_set() and not agent.problems:
            with trio.move_on_after(STARTUP_WAIT):
                while not agent.ready.is_set() and not agent.problems:
                    with trio.move_on_after(0.1):
                        await agent.ready.wait()
        try:
            return agent.keyring.current(agent.clock())
        except NotReady as exc:
            agent.metrics.inc("keyquorum_sign_unavailable_total")
            raise ApiError(503, "not_ready", f"cannot sign now: {exc}") from None

    def _allow(self, request: Request, permission: str) -> None:
        self._allow_peer(request.peer, permission, request.path)

    def _allow_peer(self, peer: Peer, permission: str, path: str) -> None:
        key = (peer.uid, peer.gid, peer.groups, permission)
        allowed = self._decisions.get(key)
        if allowed is None:
            rule = getattr(self.agent.config.access, permission)
            allowed = self._decisions[key] = bool(rule.allows(peer.uid, peer.gid, peer.groups))
        if not allowed:
            self._refused(peer, permission, path)
            raise ApiError(
                403,
                "forbidden",
                f"uid {peer.uid} (gid {peer.gid}, pid {peer.pid}) lacks the '{permission}' "
                f"permission; grant it under [access.{permission}] in the agent config",
            )

    def _refused(self, peer: Peer, permission: str, path: str) -> None:
        """Hook: the full API audits refused admin requests."""


class Api(SigningApi):
    """Every endpoint of DESIGN.md §5, on the agent itself."""

    agent: Agent

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/sign"): self.sign,
            ("POST", "/v1/jwt"): self.jwt,
            ("GET", "/v1/jwks"): self.jwks,
            ("GET", "/v1/status"): self.status,
            ("GET", "/healthz"): self.healthz,
            ("GET", "/metrics"): self.metrics,
            ("POST", "/v1/admin/rotate"): self.rotate,
            ("POST", "/v1/admin/rollback"): self.rollback,
            ("POST", "/v1/admin/revoke"): self.revoke,
            ("POST", "/v1/admin/import"): self.import_pem,
        }
        self.paths = {path for _, path in self.routes}

    async def handle(self, request: Request) -> Response:
        handler = self.routes.get((request.method, request.path))
        metrics = self.agent.metrics
        if handler is None:
            metrics.inc("keyquorum_requests_total", path="other", code="404")
            if request.path in self.paths:
                raise ApiError(
                    405, "method_not_allowed", f"{request.method} {request.path} is not supported"
                )
            raise ApiError(404, "not_found", f"no such endpoint: {request.path}")
        return await self.counted(handler, request)

    # ---- reading ----------------------------------------------------------------------------

    async def jwks(self, request: Request) -> Response:
        try:
            document, max_age = self.agent.jwks_view()
        except NotReady as exc:
            raise ApiError(503, "stale", str(exc)) from None
        return json_response(document, headers=(("cache-control", f"public, max-age={max_age}"),))

    async def healthz(self, request: Request) -> Response:
        state, reasons = self.agent.health()
        status = 503 if state == "unavailable" else 200
        return json_response({"status": state, "reasons": reasons}, status=status)

    async def status(self, request: Request) -> Response:
        return json_response(status_document(self.agent))

    async def metrics(self, request: Request) -> Response:
        return Response(200, render_metrics(self.agent).encode(), "text/plain; version=0.0.4")

    # ---- administration -------------------------------------------------------------------

    async def rotate(self, request: Request) -> Response:
        self._allow(request, "admin")
        _json_object(request, allowed=set())
        record = await self._admin(request, "rotate", self.agent.admin_rotate())
        return json_response(
            {"created": record.kid, "alg": record.alg, "status": status_document(self.agent)}
        )

    async def rollback(self, request: Request) -> Response:
        self._allow(request, "admin")
        _json_object(request, allowed=set())
        await self._admin(request, "rollback", self.agent.admin_rollback())
        return json_response({"status": status_document(self.agent)})

    async def revoke(self, request: Request) -> Response:
        self._allow(request, "admin")
        body = _json_object(request, allowed={"kid"})
        kid = body.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ApiError(400, "bad_request", "'kid' must be a non-empty string")
        await self._admin(request, "revoke", self.agent.admin_revoke(kid), kid=kid)
        return json_response({"revoked": kid, "status": status_document(self.agent)})

    async def import_pem(self, request: Request) -> Response:
        self._allow(request, "admin")
        body = _json_object(request, allowed={"pem", "alg"})
        pem, alg = body.get("pem"), body.get("alg")
        if not isinstance(pem, str) or not pem:
            raise ApiError(400, "bad_request", "'pem' must be a PEM-encoded private key string")
        if alg is not None and alg not in ALGORITHMS:
            raise ApiError(
                400,
                "unknown_algorithm",
                f"unknown algorithm {alg!r}; use one of {', '.join(sorted(ALGORITHMS))}",
            )
        try:
            key, alg = load_pem_private_key(pem.encode(), alg)
        except ValueError as exc:
            raise ApiError(400, "bad_key", f"cannot import the key: {exc}") from None
        record = await self._admin(
            request, "import", self.agent.admin_rotate(origin_key=(key, alg)), alg=alg
        )
        return json_response(
            {"imported": record.kid, "alg": record.alg, "status": status_document(self.agent)}
        )

    async def _admin(
        self, request: Request, action: str, operation: Awaitable[Any], **details: Any
    ) -> Any:
        """Run an operator command and audit it, whatever its outcome."""
        audit = self.agent.audit
        actor = _actor(request)
        try:
            result = await operation
        except PolicyRefusal as exc:
            audit.record(f"admin_{action}", actor, outcome="refused", reason=str(exc), **details)
            raise ApiError(409, "refused", str(exc)) from None
        except (StoreError, BackendError, NotReady) as exc:
            audit.record(f"admin_{action}", actor, outcome="failed", reason=str(exc), **details)
            raise ApiError(503, "unavailable", str(exc)) from None
        except ApiError as exc:
            audit.record(f"admin_{action}", actor, outcome="failed", reason=exc.message, **details)
            raise
        if hasattr(result, "kid"):
            details["kid"] = result.kid
        audit.record(f"admin_{action}", actor, outcome="done", **details)
        return result

    def _refused(self, peer: Peer, permission: str, path: str) -> None:
        if permission == "admin":
            actor = {"uid": peer.uid, "gid": peer.gid, "pid": peer.pid}
            self.agent.audit.record("admin_forbidden", actor, outcome="forbidden", path=path)


def _json_object(request: Request, *, allowed: set[str]) -> dict[str, Any]:
    body = request.body
    if not body.strip():
        if not allowed:
            return {}
        raise ApiError(400, "bad_request", "the request body must be a JSON object")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "bad_json", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "bad_request", "the request body must be a JSON object")
    unknown = set(value) - allowed
    if unknown:
        raise ApiError(
            400, "unknown_field", f"unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    return value


def _b64_field(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise ApiError(400, "bad_request", f"'{name}' must be a base64url string")
    try:
        return b64url_decode(value)
    except (ValueError, binascii.Error) as exc:
        raise ApiError(
            400, "bad_base64", f"'{name}' is not valid base64url (no padding): {exc}"
        ) from None


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return (
        datetime.fromtimestamp(ms / 1000, tz=UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def status_document(agent: Agent) -> dict[str, Any]:
    now = agent.clock()
    keyset = agent.keyring.keyset
    state, reasons = agent.health()
    member = agent.member_view(now)
    keys = []
    for record in keyset.keys if keyset else ():
        keys.append(
            {
                "kid": record.kid,
                "alg": record.alg,
                "state": str(key_state(keyset, record, now)) if keyset else None,
                "origin": record.origin,
                "created_at": iso(record.created_at),
                "activate_at": iso(record.activate_at),
                "deactivate_at": iso(record.deactivate_at),
                "expires_at": iso(record.expires_at),
                "withdrawn": record.withdrawn,
                "loaded": record.kid in agent.keyring.signers,
                "endorsement": record.endorsement,
            }
        )
    plan = agent.last_plan
    role, leader, term = agent.role()
    return {
        "node_id": agent.node_id,
        "now": iso(now),
        "role": role,
        "leader": leader,
        "term": term,
        "health": {"status": state, "reasons": reasons},
        "signing_kid": member.signing,
        "generation": keyset.generation if keyset else None,
        "revision": agent.revision,
        "last_change": dict(keyset.last_change) if keyset else None,
        "plan": {"reason": plan.reason, "next_check_at": iso(plan.next_check_at)} if plan else None,
        "members": [
            {"node_id": m.node_id, "loaded": sorted(m.loaded), "signing": m.signing}
            for m in agent.members(now).values()
        ],
        "keys": keys,
        "store": agent.store.description,
        "backend": agent.wrapper.describe(),
    }


def render_metrics(agent: Agent) -> str:
    """The Prometheus page: the agent's counters and histograms, and gauges read off its state."""
    now = agent.clock()
    keyset = agent.keyring.keyset
    gauges: list[tuple[str, Mapping[str, str], float, str]] = []

    def gauge(name: str, value: float, text: str, **labels: str) -> None:
        gauges.append((name, labels, value, text))

    counts: dict[str, int] = {s.value: 0 for s in KeyState}
    for record in keyset.keys if keyset else ():
        counts[key_state(keyset, record, now).value] += 1  # type: ignore[arg-type]
    for state_name, count in counts.items():
        gauge("keyquorum_keys", count, "Keys in the key set by state.", state=state_name)
    state, _ = agent.health()
    gauge("keyquorum_can_sign", 0 if state == "unavailable" else 1, "1 if this node can sign.")
    gauge("keyquorum_degraded", 1 if state == "degraded" else 0, "1 if degraded (see status).")
    role, _, term = agent.role()
    gauge("keyquorum_is_leader", 1 if role == "leader" else 0, "1 if this node leads.")
    gauge("keyquorum_term", float(term or 0), "The leader's term (etcd create revision).")
    gauge("keyquorum_keyset_generation", keyset.generation if keyset else 0, "Key-set generation.")
    gauge("keyquorum_keys_loaded", len(agent.keyring.signers), "Keys unwrapped on this node.")
    signing = signing_key(keyset, now)
    if signing is not None:
        gauge(
            "keyquorum_signing_key_age_seconds",
            (now - signing.created_at) / 1000,
            "Age of the key that signs now.",
            kid=signing.kid,
        )
    pending = [
        r.activate_at
        for r in (keyset.keys if keyset else ())
        if r.activate_at is not None and r.activate_at > now and r.withdrawn is None
    ]
    if pending:
        gauge(
            "keyquorum_next_activation_seconds",
            (min(pending) - now) / 1000,
            "Seconds until the next key activates.",
        )
    expiries = [r.expires_at for r in (keyset.keys if keyset else ()) if r.expires_at > now]
    if expiries:
        gauge(
            "keyquorum_next_expiry_seconds",
            (min(expiries) - now) / 1000,
            "Seconds until the next key leaves the JWKS.",
        )
    server = getattr(agent, "server", None)
    if server is not None:
        gauge("keyquorum_connections_active", server.connections_active, "Open socket clients.")
    return agent.metrics.render(gauges)


def _actor(request: Request) -> dict[str, Any]:
    peer = request.peer
    return {"uid": peer.uid, "gid": peer.gid, "pid": peer.pid}


async def _remote_guard(signing: Awaitable[T]) -> T:
    """A key held by a KMS/HSM signs over the network: its failure is a 503, said plainly."""
    try:
        return await signing
    except BackendError as exc:
        raise ApiError(
            503, "backend_unavailable", f"the key backend could not sign: {exc}"
        ) from None
