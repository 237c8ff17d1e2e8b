"""AWS Secrets Manager secret store: each private key is one version of one secret per cluster.

Theory of operation. The secret (`secret_name`) is created on first use with a placeholder
value that carries AWSCURRENT and the tag keyquorum=managed. Every key is then added with
PutSecretValue and explicit `VersionStages=["keyquorum-live-<VersionId>"]`, so:

- AWSCURRENT never moves. Moving it implicitly (PutSecretValue without VersionStages) would
  pin the newest key (AWSCURRENT can be moved but never removed, so `destroy` could not
  deprecate it), and emulators built on moto replace every label of the previously current
  version with AWSPREVIOUS, losing `stable`. Nothing here reads AWSCURRENT: reads name an
  exact VersionId, so the placeholder is what a bare `get-secret-value` shows.
- Each live key's version keeps its own `keyquorum-live-*` label. Secrets Manager treats a
  version without any label as deprecated and deletes deprecated versions once a secret has
  more than about 100 versions (never one under 24 hours old); the label keeps a key the key
  set still names from being collected, however many probe versions `keyquorum backend check`
  adds meanwhile.
- The ClientRequestToken (which becomes the VersionId) is fixed before the first attempt, so
  a retry after a lost answer returns the version already made instead of making another.
- `stable` is a staging label moved with UpdateSecretVersionStage. Real AWS refuses to attach
  a label that another version holds unless RemoveFromVersionId names that holder (moto does
  not check), so its holder is looked up first with DescribeSecret's VersionIdsToStages.
- Secrets Manager cannot delete a single version. `destroy` removes every label from it (the
  live label, `stable`, AWSPREVIOUS if someone moved AWSCURRENT): the version is then
  deprecated and AWS deletes it once more than ~100 versions exist. Until then GetSecretValue
  with its VersionId still returns it to anyone allowed to read the secret. The one label it
  cannot remove is AWSCURRENT, held only by a key added as the first value of a secret created
  outside keyquorum without a value.

IAM: secretsmanager:CreateSecret and TagResource (first use only), PutSecretValue,
GetSecretValue, DescribeSecret, UpdateSecretVersionStage on the secret; with `kms_key_id`,
kms:GenerateDataKey and kms:Decrypt on that key. `kms_key_id` applies only when the secret is
created; an existing secret keeps its key.

boto3 blocks: each call runs in an abandonable worker thread with botocore's retries off and
socket timeouts of `attempt_timeout`, under backends.calls.retry (backends/aws.py's pattern).
"""

from __future__ import annotations

import contextlib
import functools
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from backends.aws import _CREDENTIALS, _THROTTLED, translate_transport
from backends.base import BackendConfigError, BackendDenied, BackendError, BackendUnavailable
from backends.calls import CallPolicy, in_thread, retry

KIND = "aws-secrets"
STABLE = "stable"
LIVE_PREFIX = "keyquorum-live-"
MANAGED_TAG = {"Key": "keyquorum", "Value": "managed"}
PLACEHOLDER = (
    '{"keyquorum": "no key in this version: each signing key is a version labelled '
    'keyquorum-live-<VersionId>"}'
)
_OPTIONS = frozenset(
    {
        "secret_name",
        "region",
        "endpoint_url",
        "profile",
        "kms_key_id",
        "timeout",
        "attempt_timeout",
    }
)
_NAME = re.compile(r"[A-Za-z0-9/_+=.@-]{1,512}")
_VERSION_ID = re.compile(r"[A-Za-z0-9-]{32,64}")


class _NotFound(BackendDenied):
    """ResourceNotFoundException: no such secret (or version); callers decide what it means."""


class _Exists(BackendDenied):
    """ResourceExistsException: the secret exists already (or a token was reused)."""


class AwsSecretsStore:
    """Keeps keys as versions of one Secrets Manager secret, labelled live and `stable`."""

    kind = KIND

    def __init__(
        self, client: Any, secret_name: str, policy: CallPolicy, kms_key_id: str | None = None
    ) -> None:
        self._client = client
        self.secret_name = secret_name
        self.policy = policy
        self.kms_key_id = kms_key_id

    async def add_version(self, value: bytes) -> dict[str, str]:
        token = str(uuid.uuid4())  # the VersionId; the same on every retry: idempotent

        def put() -> dict[str, Any]:
            result: dict[str, Any] = self._client.put_secret_value(
                SecretId=self.secret_name,
                ClientRequestToken=token,
                SecretBinary=value,
                VersionStages=[LIVE_PREFIX + token],
            )
            return result

        what = f"secretsmanager:PutSecretValue on {self.secret_name}"
        try:
            answer = await self._call(what, put)
        except _NotFound:
            await self._create()
            answer = await self._call(what, put)
        version = answer.get("VersionId")
        if version != token:
            raise BackendUnavailable(f"{what}: the answer names version {version!r}, not ours")
        return {"version": token}

    async def _create(self) -> None:
        """Create the secret holding only the placeholder (AWSCURRENT stays there)."""
        if self.secret_name.startswith("arn:"):
            raise BackendConfigError(
                f"backend.secret_name: no secret {self.secret_name}",
                "an ARN can only name an existing secret; give a name to let keyquorum create it",
            )
        token = str(uuid.uuid4())
        kwargs: dict[str, Any] = {
            "Name": self.secret_name,
            "ClientRequestToken": token,
            "Description": "keyquorum signing keys: one version per key (keyquorum-live-*)",
            "SecretString": PLACEHOLDER,
            "Tags": [MANAGED_TAG],
        }
        if self.kms_key_id:
            kwargs["KmsKeyId"] = self.kms_key_id
        with contextlib.suppress(_Exists):  # another leader created it first: fine
            await self._call(
                f"secretsmanager:CreateSecret {self.secret_name}",
                lambda: self._client.create_secret(**kwargs),
            )

    async def read(self, ref: Mapping[str, str]) -> bytes:
        version = _version_of(ref)
        answer = await self._call(
            f"secretsmanager:GetSecretValue of {self.secret_name} version {version}",
            lambda: self._client.get_secret_value(SecretId=self.secret_name, VersionId=version),
        )
        if answer.get("VersionId") != version:
            raise BackendDenied(
                f"secretsmanager:GetSecretValue of {self.secret_name} version {version} "
                f"answered with version {answer.get('VersionId')!r}"
            )
        binary = answer.get("SecretBinary")
        if isinstance(binary, bytes):
            return binary
        string = answer.get("SecretString")
        if isinstance(string, str):
            return string.encode()
        raise BackendDenied(f"version {version} of {self.secret_name} holds no value")

    async def set_stable(self, ref: Mapping[str, str]) -> None:
        version = _version_of(ref)
        holder = _holder(await self._stages(), STABLE)
        if holder == version:
            return
        kwargs = {
            "SecretId": self.secret_name,
            "VersionStage": STABLE,
            "MoveToVersionId": version,
        }
        if holder is not None:  # real AWS refuses to move a held label without naming its holder
            kwargs["RemoveFromVersionId"] = holder
        await self._call(
            f"secretsmanager:UpdateSecretVersionStage of {self.secret_name} (stable -> {version})",
            lambda: self._client.update_secret_version_stage(**kwargs),
        )

    async def stable(self) -> dict[str, str] | None:
        try:
            stages = await self._stages()
        except _NotFound:
            return None  # no secret yet: no key was ever added
        holder = _holder(stages, STABLE)
        return None if holder is None else {"version": holder}

    async def destroy(self, ref: Mapping[str, str]) -> None:
        """Deprecate the version: remove its labels (AWS deletes it later; see the module)."""
        version = _version_of(ref)
        try:
            stages = await self._stages()
        except _NotFound:
            return  # no secret: nothing left to destroy
        for label in stages.get(version, []):
            if label == "AWSCURRENT":  # can only be moved, never removed
                continue
            await self._call(
                f"secretsmanager:UpdateSecretVersionStage of {self.secret_name} "
                f"({label} off {version})",
                functools.partial(
                    self._client.update_secret_version_stage,
                    SecretId=self.secret_name,
                    VersionStage=label,
                    RemoveFromVersionId=version,
                ),
            )

    async def _stages(self) -> dict[str, list[str]]:
        """VersionId -> staging labels, for the versions that have any (DescribeSecret)."""
        answer = await self._call(
            f"secretsmanager:DescribeSecret of {self.secret_name}",
            lambda: self._client.describe_secret(SecretId=self.secret_name),
        )
        stages = answer.get("VersionIdsToStages") or {}
        return {str(v): [str(label) for label in labels] for v, labels in stages.items()}

    async def _call(self, what: str, fn: Callable[[], Any]) -> dict[str, Any]:
        permission = what.split(" ", 1)[0]

        async def attempt() -> dict[str, Any]:
            try:
                result: dict[str, Any] = await in_thread(fn)
            except Exception as exc:  # noqa: BLE001 - every SDK error is translated here
                raise _translate(exc, what, permission, self.secret_name) from None
            return result

        return await retry(attempt, what=what, policy=self.policy)

    def close(self) -> None:
        """Close the client's connection pool (tests; the agent keeps one store for life)."""
        self._client.close()

    def describe(self) -> str:
        return f"AWS Secrets Manager secret {self.secret_name} (one version per key)"

    def __repr__(self) -> str:
        return f"AwsSecretsStore(secret_name={self.secret_name!r})"


def _holder(stages: Mapping[str, list[str]], label: str) -> str | None:
    return next((version for version, labels in stages.items() if label in labels), None)


def _version_of(ref: Mapping[str, str]) -> str:
    version = ref.get("version")
    if not isinstance(version, str) or not _VERSION_ID.fullmatch(version):
        raise BackendDenied(
            f"the secret version reference {dict(ref)!r} names no Secrets Manager VersionId"
        )
    return version


def _translate(exc: Exception, what: str, permission: str, secret: str) -> BackendError:
    """One place mapping botocore's exceptions to the backend error hierarchy."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "")).strip() or code
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("AccessDeniedException", "AccessDenied"):
            return BackendDenied(
                f"{what}: access denied ({message})",
                f"grant {permission}"
                + (" and secretsmanager:TagResource" if permission.endswith("CreateSecret") else "")
                + f" on the secret {secret} to this node's IAM role (and allow it in the "
                "secret's resource policy, if it has one)",
            )
        if code in _CREDENTIALS:
            return BackendConfigError(
                f"{what}: AWS rejected the credentials ({code})",
                "check the node's AWS credentials (environment, backend.profile or instance role)",
            )
        if code == "ResourceNotFoundException":
            return _NotFound(
                f"{what}: no such secret or version ({message})",
                "check backend.secret_name and backend.region; a version without labels may "
                "have been deleted by Secrets Manager (it keeps about 100 versions)",
            )
        if code == "ResourceExistsException":
            return _Exists(f"{what}: {message}")
        if code == "DecryptionFailure":
            return BackendDenied(
                f"{what}: Secrets Manager cannot decrypt the secret with its KMS key ({message})",
                "grant kms:Decrypt on the secret's KMS key to this node's IAM role, and check "
                "that the key is enabled",
            )
        if code == "EncryptionFailure":
            return BackendDenied(
                f"{what}: Secrets Manager cannot encrypt with the secret's KMS key ({message})",
                "grant kms:GenerateDataKey on the key (backend.kms_key_id) and check it is an "
                "enabled symmetric key",
            )
        if code == "InvalidRequestException":
            return BackendDenied(
                f"{what}: {message}",
                f"if the secret is scheduled for deletion, restore it: aws secretsmanager "
                f"restore-secret --secret-id {secret}",
            )
        if code in _THROTTLED or code == "InternalServiceError" or status == 429 or status >= 500:
            return BackendUnavailable(
                f"{what}: Secrets Manager is throttling or failing ({code or status})"
            )
        return BackendDenied(f"{what}: {code}: {message}")
    return translate_transport(exc, what, "Secrets Manager")


def _string_option(options: Mapping[str, Any], name: str) -> str | None:
    value = options.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BackendConfigError(f"backend.{name}: must be a non-empty string")
    return value


def build_secret_store(options: Mapping[str, Any]) -> AwsSecretsStore:
    """Options: secret_name (required), region, endpoint_url, profile, kms_key_id, timeout,
    attempt_timeout."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for kind '{KIND}'",
            f"the {KIND} backend takes {', '.join(sorted(_OPTIONS))}",
        )
    name = options.get("secret_name")
    if not isinstance(name, str) or not (_NAME.fullmatch(name) or name.startswith("arn:")):
        raise BackendConfigError(
            f"backend.secret_name: required for kind '{KIND}': a secret name (letters, digits "
            f"and /_+=.@-, at most 512) or an existing secret's ARN, not {name!r}",
            "e.g. secret_name = 'keyquorum/prod/signing-keys'",
        )
    kms_key_id = _string_option(options, "kms_key_id")
    policy = CallPolicy.from_options(options)
    region = _string_option(options, "region")
    endpoint_url = _string_option(options, "endpoint_url")
    profile = _string_option(options, "profile")
    config = botocore.config.Config(
        connect_timeout=policy.attempt_timeout,
        read_timeout=policy.attempt_timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    try:
        session = boto3.session.Session(profile_name=profile, region_name=region)
        client = session.client("secretsmanager", endpoint_url=endpoint_url, config=config)
    except botocore.exceptions.BotoCoreError as exc:
        raise _translate(exc, f"{KIND} setup", "", name) from None
    return AwsSecretsStore(client, name, policy, kms_key_id)
