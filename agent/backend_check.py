"""`keyquorum backend check`: prove the configured backend works end to end, or say what is wrong.

It needs no running agent: it reads the agent's config, builds the backend, seals a fresh probe
key (a real wrap), opens it again (a real unwrap), makes sure the backend refuses the probe under
another kid (the context binding), and then tries to open every key of the cluster's key set
that this node would load. Each step is timed; a failed step prints the backend's message and
hint. Nothing is written anywhere (not even a missing local KEK file): the probe exists only in
memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from agent.config import AgentConfig
from agent.crypto import generate_private_key, private_key_to_pkcs8, verify_signature
from agent.keyset import KeySetInvalid, parse_keyset
from backends.base import BackendDenied, BackendError, KeyWrapper, RemoteSigner, SecretStore
from backends.envelope import open_sealed, seal
from backends.registry import make_key_wrapper, make_remote_signer, make_secret_store
from backends.remote import RemoteKeySigner, jwk_of_pem
from backends.secret_keys import decode_value, encode_value, secret_ref


@dataclass
class Step:
    name: str
    ok: bool
    detail: str
    millis: float | None = None
    hint: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "ms": None if self.millis is None else round(self.millis, 2),
            "hint": self.hint,
        }


@dataclass
class Report:
    backend: str = ""
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "ok": self.ok,
            "steps": [s.as_dict() for s in self.steps],
        }

    def render(self) -> str:
        lines = [f"backend   {self.backend or '(not built)'}"]
        for step in self.steps:
            mark = "ok  " if step.ok else "FAIL"
            timing = f" ({step.millis:.1f} ms)" if step.millis is not None else ""
            lines.append(f"{mark}  {step.name}{timing}: {step.detail}")
            if step.hint:
                lines.append(f"      fix: {step.hint}")
        lines.append("backend check passed" if self.ok else "backend check FAILED")
        return "\n".join(lines)


async def _timed(fn: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = await fn()
    return result, (time.perf_counter() - started) * 1000


async def _step(
    report: Report,
    deadline: float,
    name: str,
    fn: Callable[[], Awaitable[Any]],
    ok_detail: str,
) -> Any:
    """Run one timed step, recording it; its result (True for None), or None when it failed."""
    try:
        with trio.fail_after(deadline):
            result, millis = await _timed(fn)
    except BackendError as exc:
        report.steps.append(Step(name, False, exc.message, hint=exc.hint))
        return None
    except trio.TooSlowError:
        report.steps.append(Step(name, False, f"no answer within {deadline:g}s"))
        return None
    report.steps.append(Step(name, True, ok_detail, millis))
    return True if result is None else result


async def check_backend(config: AgentConfig, *, with_keyset: bool = True) -> Report:
    """Run every step; a failed step stops the ones that depend on it."""
    from agent.factory import backend_deadline, build_store

    report = Report()
    if config.backend.mode == "remote":
        return await _check_remote(report, config, with_keyset=with_keyset)
    if config.backend.mode == "secret":
        return await _check_secret_store(report, config, with_keyset=with_keyset)
    options = dict(config.backend.options)
    if config.backend.kind == "local":
        options["create_kek"] = False  # a check must not mint a KEK the agent would then use
    try:
        wrapper: KeyWrapper = make_key_wrapper(config.backend.kind, options)
    except BackendError as exc:
        report.steps.append(Step("configure", False, exc.message, hint=exc.hint))
        return report
    report.backend = wrapper.describe()
    deadline = backend_deadline(wrapper)
    prefix = config.store.prefix
    probe_kid = f"keyquorum-probe-{os.urandom(6).hex()}"
    pkcs8 = private_key_to_pkcs8(generate_private_key("ES256"))

    def step(name: str, fn: Callable[[], Awaitable[Any]], ok_detail: str) -> Awaitable[Any]:
        return _step(report, deadline, name, fn, ok_detail)

    sealed = await step(
        "wrap",
        lambda: seal(wrapper, pkcs8, kid=probe_kid, prefix=prefix),
        "sealed a probe key (a fresh data key wrapped by the backend)",
    )
    if sealed is None:
        return report
    opened = await step(
        "unwrap",
        lambda: open_sealed(wrapper, sealed, kid=probe_kid, prefix=prefix),
        "opened the probe key",
    )
    if opened is None:
        return report
    if opened != pkcs8:
        report.steps.append(Step("unwrap", False, "the probe key came back different"))
        return report

    async def refuse_other_context() -> None:
        try:
            await open_sealed(wrapper, sealed, kid=probe_kid + "-moved", prefix=prefix)
        except BackendDenied:
            return
        raise BackendDenied(
            "the backend opened a key presented for another kid: context binding is not enforced",
            "report this: it is a bug in the backend module",
        )

    await step("binding", refuse_other_context, "the probe does not open under another kid")
    if with_keyset:
        await _check_keyset(report, config, wrapper, build_store, deadline)
    return report


async def _check_remote(report: Report, config: AgentConfig, *, with_keyset: bool) -> Report:
    """Remote mode: create a probe key in the KMS/HSM, sign and verify, retire it at once."""
    from agent.factory import backend_deadline, build_store

    try:
        signer = make_remote_signer(config.backend.kind, config.backend.options)
    except BackendError as exc:
        report.steps.append(Step("configure", False, exc.message, hint=exc.hint))
        return report
    report.backend = signer.describe()
    deadline = backend_deadline(signer)
    alg = config.keys.algorithm
    if not signer.supports(alg):
        report.steps.append(
            Step("configure", False, f"the {signer.kind} backend cannot hold {alg} keys")
        )
        return report

    def step(name: str, fn: Callable[[], Awaitable[Any]], ok_detail: str) -> Awaitable[Any]:
        return _step(report, deadline, name, fn, ok_detail)

    # A prefix no cluster uses, so no leader ever mistakes the probe for one of its keys.
    probe_prefix = f"{config.store.prefix}/backend-check"
    created = await step(
        "create", lambda: signer.create_key(alg, probe_prefix), f"created a probe {alg} key"
    )
    if created is None:
        return report
    try:
        signature = await step(
            "sign", lambda: signer.sign(created.ref, alg, b"keyquorum probe"), "signed a probe"
        )
        if signature is not None:
            jwk = jwk_of_pem(created.public_key_pem, alg)
            ok = verify_signature(jwk, b"keyquorum probe", signature)
            report.steps.append(
                Step(
                    "verify",
                    ok,
                    "the signature verifies against the key's public half"
                    if ok
                    else "the backend's signature does NOT verify (wrong encoding?)",
                )
            )
    finally:
        await step("retire", lambda: signer.retire(created.ref), "retired the probe key")
    if with_keyset:
        await _check_keyset(report, config, signer, build_store, deadline)
    return report


async def _check_secret_store(report: Report, config: AgentConfig, *, with_keyset: bool) -> Report:
    """Secret-store mode: add a probe version, read exactly it back, destroy it."""
    from agent.factory import backend_deadline, build_store

    try:
        secrets = make_secret_store(config.backend.kind, config.backend.options)
    except BackendError as exc:
        report.steps.append(Step("configure", False, exc.message, hint=exc.hint))
        return report
    report.backend = secrets.describe()
    deadline = backend_deadline(secrets)
    probe = encode_value("keyquorum-probe", "ES256", os.urandom(32))

    def step(name: str, fn: Callable[[], Awaitable[Any]], ok_detail: str) -> Awaitable[Any]:
        return _step(report, deadline, name, fn, ok_detail)

    ref = await step("add version", lambda: secrets.add_version(probe), "stored a probe version")
    if ref is None:
        return report
    value = await step("read", lambda: secrets.read(ref), "read exactly that version back")
    if value is not None and value != probe:
        report.steps.append(Step("read", False, "the version read back differs from the probe"))
    await step("destroy", lambda: secrets.destroy(ref), "destroyed the probe version")
    await step("stable label", secrets.stable, "read the stable label")
    if with_keyset:
        await _check_keyset(report, config, secrets, build_store, deadline)
    return report


async def _check_keyset(
    report: Report,
    config: AgentConfig,
    wrapper: KeyWrapper | RemoteSigner | SecretStore,
    build_store: Any,
    deadline: float,
) -> None:
    """Open every key of the stored key set, as this node's loader would."""
    store = build_store(config)
    try:
        with trio.fail_after(deadline):
            current = await store.get()
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the backend check stands
        report.steps.append(
            Step("key set", False, f"cannot read the key set from the store: {exc}")
        )
        return
    finally:
        await store.aclose()
    if current.value is None:
        report.steps.append(Step("key set", True, "no key set stored yet (a new cluster)"))
        return
    try:
        keyset = parse_keyset(current.value)
    except KeySetInvalid as exc:
        report.steps.append(Step("key set", False, f"the stored key set is invalid: {exc}"))
        return
    for record in keyset.keys:
        try:
            with trio.fail_after(deadline):
                started = time.perf_counter()
                if isinstance(wrapper, RemoteSigner):
                    await RemoteKeySigner.load(wrapper, record.private, record.alg, record.jwk)
                elif isinstance(wrapper, SecretStore):
                    ref = secret_ref(record.private, wrapper.kind, record.kid)
                    decode_value(await wrapper.read(ref), record.kid, record.alg)
                else:
                    await open_sealed(
                        wrapper, record.private, kid=record.kid, prefix=config.store.prefix
                    )
                millis = (time.perf_counter() - started) * 1000
        except BackendError as exc:
            report.steps.append(Step(f"key {record.kid}", False, exc.message, hint=exc.hint))
            continue
        except trio.TooSlowError:
            report.steps.append(Step(f"key {record.kid}", False, "no answer in time"))
            continue
        report.steps.append(Step(f"key {record.kid}", True, "this node can open it", millis))
