"""AWS KMS key wrapper: data keys encrypted under a KMS key with the context as EncryptionContext.

`kms:Encrypt` and `kms:Decrypt` carry the kid and cluster prefix as the encryption context, so
KMS itself refuses to decrypt a data key presented with another record's context, and CloudTrail
logs which key record each call was for. The key ARN that encrypted a data key is recorded with
it: after the KMS key is re-pointed (an alias moved to a new key), older records still decrypt
with the key that wrapped them.

boto3 blocks, so each call runs in an abandonable worker thread (backends/calls.py); botocore's
own retries are off and its socket timeouts follow `attempt_timeout`, so the agent's deadline and
backoff are the only ones in play. Credentials come from boto3's usual chain (environment,
shared config `profile`, instance or task role); none is ever stored in the agent's config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from agent.crypto import b64url_decode, b64url_encode
from backends.base import (
    BackendConfigError,
    BackendDenied,
    BackendError,
    BackendUnavailable,
)
from backends.calls import CallPolicy, in_thread, retry

_OPTIONS = frozenset({"key_id", "region", "endpoint_url", "profile", "timeout", "attempt_timeout"})

# Error codes KMS returns for a key that exists but cannot be used now.
_KEY_STATE = {"DisabledException", "KMSInvalidStateException", "KeyUnavailableException"}
_THROTTLED = {
    "ThrottlingException",
    "LimitExceededException",
    "KMSInternalException",
    "DependencyTimeoutException",
    "InternalFailure",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeoutException",
}
_CREDENTIALS = {
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "ExpiredTokenException",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
}


class AwsKmsWrapper:
    """Wraps data keys with kms:Encrypt / kms:Decrypt under one configured KMS key."""

    kind = "aws-kms"

    def __init__(self, client: Any, key_id: str, policy: CallPolicy) -> None:
        self._client = client
        self.key_id = key_id
        self.policy = policy

    async def wrap_data_key(self, data_key: bytes, context: Mapping[str, str]) -> dict[str, str]:
        def call() -> dict[str, Any]:
            result: dict[str, Any] = self._client.encrypt(
                KeyId=self.key_id, Plaintext=data_key, EncryptionContext=dict(context)
            )
            return result

        response = await self._call(call, f"kms:Encrypt with {self.key_id}", wrapping=True)
        return {
            "key_arn": str(response["KeyId"]),
            "ciphertext": b64url_encode(response["CiphertextBlob"]),
        }

    async def unwrap_data_key(
        self, wrapped: Mapping[str, str], context: Mapping[str, str]
    ) -> bytes:
        kid = context.get("keyquorum:kid", "?")
        try:
            key_arn = wrapped["key_arn"]
            blob = b64url_decode(wrapped["ciphertext"])
            if not isinstance(key_arn, str) or not key_arn:
                raise ValueError("empty key ARN")
        except (KeyError, ValueError, TypeError):
            raise BackendDenied(
                f"the wrapped data key of {kid} is malformed (no KMS key ARN or ciphertext)"
            ) from None

        def call() -> dict[str, Any]:
            result: dict[str, Any] = self._client.decrypt(
                KeyId=key_arn, CiphertextBlob=blob, EncryptionContext=dict(context)
            )
            return result

        response = await self._call(call, f"kms:Decrypt of {kid} with {key_arn}", wrapping=False)
        plaintext = response["Plaintext"]
        if not isinstance(plaintext, bytes) or len(plaintext) != 32:
            raise BackendDenied(f"kms:Decrypt of {kid} returned no 32-byte data key")
        return plaintext

    async def _call(self, fn: Any, what: str, *, wrapping: bool) -> dict[str, Any]:
        async def attempt() -> dict[str, Any]:
            try:
                result: dict[str, Any] = await in_thread(fn)
            except BackendError:
                raise
            except Exception as exc:  # noqa: BLE001 - every SDK error is translated here
                raise _translate(exc, what, self.key_id, wrapping=wrapping) from None
            return result

        return await retry(attempt, what=what, policy=self.policy)

    def describe(self) -> str:
        return f"AWS KMS key {self.key_id}"

    def __repr__(self) -> str:
        return f"AwsKmsWrapper(key_id={self.key_id!r})"


def _translate(exc: Exception, what: str, key_id: str, *, wrapping: bool) -> BackendError:
    """One place mapping botocore's exceptions to the backend error hierarchy."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "")).strip() or code
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        permission = "kms:Encrypt" if wrapping else "kms:Decrypt"
        if code in ("AccessDeniedException", "AccessDenied"):
            return BackendDenied(
                f"{what}: access denied ({message})",
                f"grant {permission} on the key to this node's IAM role, and allow it in the "
                "key policy",
            )
        if code in _CREDENTIALS:
            return BackendConfigError(
                f"{what}: AWS rejected the credentials ({code})",
                "check the node's AWS credentials (environment, backend.profile or instance role)",
            )
        if code == "NotFoundException":
            if wrapping:
                return BackendConfigError(
                    f"{what}: no such KMS key ({message})",
                    "set backend.key_id to an existing key ARN, key id or alias/NAME in "
                    "backend.region",
                )
            return BackendDenied(
                f"{what}: the KMS key that wrapped this data key no longer exists ({message})",
                "a key scheduled for deletion can be restored with kms:CancelKeyDeletion",
            )
        if code in ("InvalidCiphertextException", "IncorrectKeyException"):
            return BackendDenied(
                f"{what}: KMS refused the ciphertext ({code}: tampered, or wrapped for another "
                "kid or cluster prefix)"
            )
        if code in _KEY_STATE:
            return BackendDenied(
                f"{what}: the KMS key cannot be used in its current state ({message})",
                "enable the key (kms:EnableKey) or cancel its scheduled deletion",
            )
        if code in ("ValidationException", "InvalidKeyUsageException", "InvalidArnException"):
            return (BackendConfigError if wrapping else BackendDenied)(
                f"{what}: {code}: {message}",
                "backend.key_id must name a SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key",
            )
        if code in _THROTTLED or status == 429 or status >= 500:
            return BackendUnavailable(f"{what}: KMS is throttling or failing ({code or status})")
        return BackendDenied(f"{what}: {code}: {message}")
    if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.NoRegionError):
        return BackendConfigError(
            f"{what}: {exc}",
            "give the node AWS credentials and set backend.region (or AWS_REGION)",
        )
    if isinstance(exc, botocore.exceptions.ProfileNotFound):
        return BackendConfigError(f"{what}: {exc}", "fix backend.profile")
    if isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError
        | botocore.exceptions.ConnectionError
        | botocore.exceptions.ReadTimeoutError
        | botocore.exceptions.ConnectTimeoutError
        | botocore.exceptions.HTTPClientError,
    ):
        return BackendUnavailable(f"{what}: cannot reach KMS ({type(exc).__name__})")
    return BackendUnavailable(f"{what}: unexpected {type(exc).__name__}: {exc}")


def _string_option(options: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = options.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise BackendConfigError(
            f"backend.{name}: {'required for kind aws-kms; ' if required else ''}must be a "
            f"non-empty string",
            "for key_id: a key ARN, key id or alias/NAME" if name == "key_id" else "",
        )
    return value


def build(options: Mapping[str, Any]) -> AwsKmsWrapper:
    """Options: key_id (required), region, endpoint_url, profile, timeout, attempt_timeout."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for kind 'aws-kms'",
            f"the aws-kms backend takes {', '.join(sorted(_OPTIONS))}",
        )
    key_id = _string_option(options, "key_id", required=True)
    assert key_id is not None
    region = _string_option(options, "region")
    endpoint_url = _string_option(options, "endpoint_url")
    profile = _string_option(options, "profile")
    policy = CallPolicy.from_options(options)
    config = botocore.config.Config(
        connect_timeout=policy.attempt_timeout,
        read_timeout=policy.attempt_timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    try:
        session = boto3.session.Session(profile_name=profile, region_name=region)
        client = session.client("kms", endpoint_url=endpoint_url, config=config)
    except botocore.exceptions.BotoCoreError as exc:
        raise _translate(exc, "aws-kms setup", key_id, wrapping=True) from None
    return AwsKmsWrapper(client, key_id, policy)
