"""GCP Secret Manager as the secret store (backend.kind = "gcp-secrets").

Theory of operation. Each private key is one version of a single secret per cluster, named in
full by `backend.secret_name` (projects/P/secrets/S). `add_version` calls AddSecretVersion with
the value and its CRC32C; the first call of a cluster finds no secret and creates it (automatic
replication, label keyquorum=managed) before adding. The key set stores only the version's
reference, `{"version": "projects/P/secrets/S/versions/N"}`, always spelled with the configured
secret name: Secret Manager answers with the project NUMBER in its resource names, so the number
N is taken from its answer and the rest from the configuration, and references compare equal
however they were obtained. `read` accesses exactly the version named (never an alias, never
`latest`) and checks the payload's CRC32C.

The `stable` label is a version alias on the secret (`version_aliases = {"stable": N}`), moved
with UpdateSecret (update mask `version_aliases`). UpdateSecret replaces the whole alias map, so
`set_stable` reads the secret first, changes only `stable`, and sends the secret's etag: if
someone changed the aliases in between, Secret Manager refuses and the read-modify-write starts
over. `destroy` calls DestroySecretVersion; a version already destroyed (or gone) counts as done.

Calls go through the google-cloud-secret-manager SDK's REST transport with its retries off and
socket timeouts at the attempt timeout, paced by backends.calls.retry, exactly like the Cloud KMS
backends whose helpers (lazy client, endpoint and credentials checks, CRC32C, error translation
for credentials, throttling and transport) this module shares: both SDKs are in the `gcp` extra.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import trio
from google.api_core import exceptions as api_exceptions
from google.auth.credentials import Credentials
from google.cloud import secretmanager_v1 as secretmanager

from backends.base import BackendConfigError, BackendDenied, BackendError, BackendUnavailable
from backends.calls import CallPolicy
from backends.gcp import (
    ApiCall,
    LazyClient,
    api_endpoint,
    corrupted,
    crc32c,
    error_fields,
    int64_checksum,
    is_status,
    load_credentials,
    run_api_call,
    said,
    translate_common,
)

KIND = "gcp-secrets"
SERVICE = "Secret Manager"
STABLE = "stable"
MANAGED_LABEL = {"keyquorum": "managed"}
_OPTIONS = frozenset({"secret_name", "endpoint", "credentials_file", "timeout", "attempt_timeout"})
_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
_SECRET_NAME = re.compile(
    r"projects/(?P<project>[a-z0-9][a-z0-9.:-]{0,62})/secrets/(?P<secret>[A-Za-z0-9_-]{1,255})"
)
_MAX_VALUE = 64 * 1024  # Secret Manager's payload limit
T = TypeVar("T")

_ADD = ApiCall(
    "add a version to", "secretmanager.versions.add", "roles/secretmanager.secretVersionAdder"
)
_CREATE = ApiCall("create the secret", "secretmanager.secrets.create", "roles/secretmanager.admin")
_ACCESS = ApiCall("read", "secretmanager.versions.access", "roles/secretmanager.secretAccessor")
_GET = ApiCall("read the aliases of", "secretmanager.secrets.get", "roles/secretmanager.viewer")
_UPDATE = ApiCall(
    "move the stable alias of", "secretmanager.secrets.update", "roles/secretmanager.admin"
)
_DESTROY = ApiCall(
    "destroy", "secretmanager.versions.destroy", "roles/secretmanager.secretVersionManager"
)
_STATE = ApiCall(
    "read the state of", "secretmanager.versions.get", "roles/secretmanager.secretVersionManager"
)


class GcpSecretStore:
    """Keeps each key as a version of one Secret Manager secret (see the module docstring)."""

    __slots__ = ("_clients", "_project", "_secret_id", "policy", "secret_name")
    kind = KIND

    def __init__(
        self,
        secret_name: str,
        *,
        endpoint: str | None,
        credentials: Credentials | None,
        policy: CallPolicy,
    ) -> None:
        match = _SECRET_NAME.fullmatch(secret_name)
        assert match is not None, secret_name
        self.secret_name = secret_name
        self._project, self._secret_id = match["project"], match["secret"]
        self.policy = policy
        self._clients = LazyClient(
            secretmanager.SecretManagerServiceClient,
            endpoint=endpoint,
            credentials=credentials,
            scopes=_SCOPES,
        )

    async def add_version(self, value: bytes) -> dict[str, str]:
        if len(value) > _MAX_VALUE:
            raise BackendDenied(f"{SERVICE} stores at most {_MAX_VALUE} bytes per version")
        until = trio.current_time() + self.policy.deadline
        number = await self._call(_ADD, self.secret_name, lambda: self._add(value), until)
        if number is None:  # the cluster's first key: create the secret, then add
            await self._call(_CREATE, self.secret_name, self._create, until)
            number = await self._call(_ADD, self.secret_name, lambda: self._add(value), until)
            if number is None:
                raise BackendUnavailable(
                    f"{SERVICE}: {self.secret_name} vanished right after it was created",
                    "someone is deleting the secret; retried on the next attempt",
                )
        return {"version": self._version_name(number)}

    async def read(self, ref: Mapping[str, str]) -> bytes:
        version = self._ref_version(ref)
        return await self._call(_ACCESS, version, lambda: self._access(version))

    async def set_stable(self, ref: Mapping[str, str]) -> None:
        number = int(self._ref_version(ref).rsplit("/", 1)[1])
        until = trio.current_time() + self.policy.deadline
        while True:
            current = await self._call(_GET, self.secret_name, self._aliases, until)
            if current is None:
                raise BackendDenied(
                    f"{SERVICE} has no secret {self.secret_name} to label",
                    "the secret holding the cluster's keys was deleted",
                )
            aliases, etag = current
            if aliases.get(STABLE) == number:
                return
            wanted = {**aliases, STABLE: number}
            if await self._call(
                _UPDATE, self.secret_name, functools.partial(self._set_aliases, wanted, etag), until
            ):
                return
            if trio.current_time() >= until:  # the aliases kept changing under us
                raise BackendUnavailable(
                    f"{SERVICE}: the aliases of {self.secret_name} changed during every attempt "
                    f"to move {STABLE!r} within {self.policy.deadline:g}s"
                )

    async def stable(self) -> dict[str, str] | None:
        current = await self._call(_GET, self.secret_name, self._aliases)
        number = current[0].get(STABLE) if current is not None else None
        return {"version": self._version_name(number)} if number else None

    async def destroy(self, ref: Mapping[str, str]) -> None:
        version = self._ref_version(ref)
        await self._call(_DESTROY, version, lambda: self._destroy(version))

    def describe(self) -> str:
        return f"GCP Secret Manager secret {self.secret_name}"

    def close(self) -> None:
        """Close the SDK client's connections; the next call opens new ones."""
        self._clients.close()

    def __repr__(self) -> str:
        return (
            f"GcpSecretStore(secret_name={self.secret_name!r}, endpoint={self._clients.endpoint!r})"
        )

    def _version_name(self, number: int) -> str:
        return f"{self.secret_name}/versions/{number}"

    def _ref_version(self, ref: Mapping[str, str]) -> str:
        """The version a reference names, if it is a numbered version of the configured secret;
        anything else (another secret, an alias, `latest`) is refused without a call."""
        version = ref.get("version")
        if not (
            isinstance(version, str)
            and version.startswith(f"{self.secret_name}/versions/")
            and re.fullmatch(r"[1-9][0-9]{0,18}", version.rsplit("/", 1)[1])
        ):
            raise BackendDenied(
                f"secret version {version!r} is not a version of {self.secret_name}",
                "backend.secret_name must be the secret this key set was created with",
            )
        return version

    async def _call(
        self, call: ApiCall, resource: str, fn: Callable[[], T], until: float | None = None
    ) -> T:
        return await run_api_call(
            fn,
            service=SERVICE,
            call=call,
            resource=resource,
            translate=_translate,
            policy=self.policy,
            until=until,
        )

    # ---- blocking SDK calls, run in a worker thread --------------------------------------------

    def _add(self, value: bytes) -> int | None:
        """Add a version; its number, or None if the secret does not exist yet."""
        try:
            response = self._clients.get().add_secret_version(
                request=secretmanager.AddSecretVersionRequest(
                    parent=self.secret_name,
                    payload=secretmanager.SecretPayload(data=value, data_crc32c=crc32c(value)),
                ),
                retry=None,
                timeout=self.policy.attempt_timeout,
            )
        except api_exceptions.NotFound:
            return None
        if not response.client_specified_payload_checksum:
            raise corrupted(SERVICE, "addSecretVersion", "did not confirm the payload's checksum")
        return self._number_of(response.name)

    def _create(self) -> None:
        secret = secretmanager.Secret(
            replication=secretmanager.Replication(automatic=secretmanager.Replication.Automatic()),
            labels=MANAGED_LABEL,
        )
        try:
            self._clients.get().create_secret(
                request=secretmanager.CreateSecretRequest(
                    parent=f"projects/{self._project}", secret_id=self._secret_id, secret=secret
                ),
                retry=None,
                timeout=self.policy.attempt_timeout,
            )
        except api_exceptions.Conflict as exc:
            if not is_status(exc, "ALREADY_EXISTS"):  # another node created it first: fine
                raise

    def _access(self, version: str) -> bytes:
        response = self._clients.get().access_secret_version(
            request=secretmanager.AccessSecretVersionRequest(name=version),
            retry=None,
            timeout=self.policy.attempt_timeout,
        )
        data = bytes(response.payload.data)
        if int64_checksum(response.payload.data_crc32c) != crc32c(data):
            raise corrupted(SERVICE, "accessSecretVersion", "returned data failing its checksum")
        if self._number_of(response.name) != int(version.rsplit("/", 1)[1]):
            raise BackendDenied(
                f"{SERVICE} answered a read of {version} with {response.name!r}",
                "check backend.endpoint: it does not behave like Secret Manager",
            )
        return data

    def _aliases(self) -> tuple[dict[str, int], str] | None:
        """The secret's version aliases and etag; None if the secret does not exist yet."""
        try:
            secret = self._clients.get().get_secret(
                request=secretmanager.GetSecretRequest(name=self.secret_name),
                retry=None,
                timeout=self.policy.attempt_timeout,
            )
        except api_exceptions.NotFound:
            return None
        return {k: int(v) for k, v in secret.version_aliases.items()}, secret.etag

    def _set_aliases(self, aliases: dict[str, int], etag: str) -> bool:
        """Replace the alias map if the secret still has `etag`; False if it changed since."""
        try:
            self._clients.get().update_secret(
                request=secretmanager.UpdateSecretRequest(
                    secret=secretmanager.Secret(
                        name=self.secret_name, version_aliases=aliases, etag=etag
                    ),
                    update_mask={"paths": ["version_aliases"]},
                ),
                retry=None,
                timeout=self.policy.attempt_timeout,
            )
        except (api_exceptions.Conflict, api_exceptions.BadRequest) as exc:
            status, message = error_fields(exc)
            if status == "ABORTED" or (status == "FAILED_PRECONDITION" and "etag" in message):
                return False
            raise
        return True

    def _destroy(self, version: str) -> None:
        client = self._clients.get()
        try:
            client.destroy_secret_version(
                request=secretmanager.DestroySecretVersionRequest(name=version),
                retry=None,
                timeout=self.policy.attempt_timeout,
            )
        except api_exceptions.NotFound:
            return  # nothing left to destroy
        except api_exceptions.BadRequest as exc:
            if not is_status(exc, "FAILED_PRECONDITION"):
                raise
            try:
                state = client.get_secret_version(
                    request=secretmanager.GetSecretVersionRequest(name=version),
                    retry=None,
                    timeout=self.policy.attempt_timeout,
                )
            except api_exceptions.NotFound:
                return
            # With delayed destruction on the secret, a destroyed version is first DISABLED with
            # a scheduled destroy time.
            if state.state != secretmanager.SecretVersion.State.DESTROYED and not (
                state.state == secretmanager.SecretVersion.State.DISABLED
                and state.scheduled_destroy_time
            ):
                raise

    def _number_of(self, name: str) -> int:
        """The version number in a name Secret Manager returned, after checking it is a version
        of our secret (in whatever project spelling: id or number)."""
        match = re.fullmatch(
            r"projects/[^/]+/secrets/(?P<secret>[^/]+)/versions/(?P<number>[1-9][0-9]{0,18})",
            name,
        )
        if match is None or match["secret"] != self._secret_id:
            raise BackendDenied(
                f"{SERVICE} answered with {name!r}, not a version of {self.secret_name}",
                "check backend.endpoint: it does not behave like Secret Manager",
            )
        return int(match["number"])


def _translate(exc: BaseException, call: ApiCall, resource: str) -> BackendError:
    """The one place where SDK, google-auth and transport errors become ours."""
    common = translate_common(exc, SERVICE, f"{SERVICE}: {call.operation} {resource}")
    if common is not None:
        return common
    assert isinstance(exc, api_exceptions.GoogleAPICallError)
    status = error_fields(exc)[0]
    if isinstance(exc, api_exceptions.Forbidden):
        return BackendDenied(
            f"{SERVICE} denied the agent to {call.operation} {resource}: it lacks permission "
            f"{call.permission} ({said(exc)})",
            f"grant the agent's identity {call.role} (or another role with {call.permission}) "
            "on the secret or its project",
        )
    if isinstance(exc, api_exceptions.NotFound):
        if call is _CREATE:
            return BackendConfigError(
                f"backend.secret_name: {SERVICE} cannot create {resource} ({said(exc)})",
                "check the project in backend.secret_name and that the Secret Manager API is "
                "enabled in it",
            )
        return BackendDenied(
            f"{SERVICE} has no {resource} ({said(exc)})",
            "the key set names a secret version that no longer exists",
        )
    if status == "FAILED_PRECONDITION":
        return BackendDenied(
            f"{SERVICE} refused to {call.operation} {resource}: the version is destroyed or "
            f"disabled ({said(exc)})",
            "a destroyed version cannot be recovered; a disabled one can be enabled again "
            "(gcloud secrets versions enable)",
        )
    if call is _CREATE:
        return BackendConfigError(
            f"backend.secret_name: {SERVICE} refused to create {resource} ({said(exc)})",
            "check the secret name and any organization policy on replication",
        )
    return BackendDenied(f"{SERVICE} refused to {call.operation} {resource} ({said(exc)})")


def build_secret_store(options: Mapping[str, Any]) -> GcpSecretStore:
    """The registry's constructor: `secret_name` (required, projects/P/secrets/S), `endpoint`,
    `credentials_file`, `timeout`, `attempt_timeout`. Validates everything; makes no call."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for kind {KIND!r}",
            f"the {KIND} backend takes {', '.join(sorted(_OPTIONS))}",
        )
    secret_name = options.get("secret_name")
    if not isinstance(secret_name, str) or not _SECRET_NAME.fullmatch(secret_name):
        hint = "write projects/P/secrets/S (the secret, created on first use)"
        if isinstance(secret_name, str) and "/versions/" in secret_name:
            hint += "; not one of its versions"
        raise BackendConfigError(
            f"backend.secret_name: {secret_name!r} is not a Secret Manager secret name"
            if secret_name is not None
            else f"backend.secret_name: required for kind {KIND!r}",
            hint,
        )
    endpoint = api_endpoint(options.get("endpoint"))
    credentials = load_credentials(options.get("credentials_file"), endpoint, _SCOPES)
    return GcpSecretStore(
        secret_name,
        endpoint=endpoint,
        credentials=credentials,
        policy=CallPolicy.from_options(options),
    )
