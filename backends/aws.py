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

import datetime
from collections.abc import Mapping
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.crypto import b64url_decode, b64url_encode
from backends.base import (
    BackendConfigError,
    BackendDenied,
    BackendError,
    BackendUnavailable,
    RemoteKey,
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
                raise _translate(
                    exc,
                    what,
                    "kms:Encrypt" if wrapping else "kms:Decrypt",
                    missing_is_config=wrapping,
                ) from None
            return result

        return await retry(attempt, what=what, policy=self.policy)

    def describe(self) -> str:
        return f"AWS KMS key {self.key_id}"

    def __repr__(self) -> str:
        return f"AwsKmsWrapper(key_id={self.key_id!r})"


def _translate(
    exc: Exception, what: str, permission: str, *, missing_is_config: bool
) -> BackendError:
    """One place mapping botocore's exceptions to the backend error hierarchy."""
    wrapping = missing_is_config
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "")).strip() or code
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
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
            if wrapping:
                return BackendConfigError(
                    f"{what}: {code}: {message}",
                    "backend.key_id must name a SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key",
                )
            return BackendDenied(f"{what}: {code}: {message}")
        if code in _THROTTLED or status == 429 or status >= 500:
            return BackendUnavailable(f"{what}: KMS is throttling or failing ({code or status})")
        return BackendDenied(f"{what}: {code}: {message}")
    return translate_transport(exc, what, "KMS")


def translate_transport(exc: Exception, what: str, service: str) -> BackendError:
    """botocore's errors that are not a service's answer: credentials, region, the network."""
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
        return BackendUnavailable(f"{what}: cannot reach {service} ({type(exc).__name__})")
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
    policy = CallPolicy.from_options(options)
    return AwsKmsWrapper(_kms_client(options, policy), key_id, policy)


def _kms_client(options: Mapping[str, Any], policy: CallPolicy) -> Any:
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
        return session.client("kms", endpoint_url=endpoint_url, config=config)
    except botocore.exceptions.BotoCoreError as exc:
        raise _translate(exc, "aws-kms setup", "", missing_is_config=True) from None


# ---- remote signing: one KMS key per rotation (backend.mode = "remote") ----------------------

# JWS alg -> (KMS KeySpec, SigningAlgorithm, hash for DIGEST messages, EC coordinate size)
_SPECS: dict[str, tuple[str, str, Any, int]] = {
    "ES256": ("ECC_NIST_P256", "ECDSA_SHA_256", hashes.SHA256, 32),
    "ES384": ("ECC_NIST_P384", "ECDSA_SHA_384", hashes.SHA384, 48),
    "RS256": ("RSA_2048", "RSASSA_PKCS1_V1_5_SHA_256", hashes.SHA256, 0),
    "PS256": ("RSA_2048", "RSASSA_PSS_SHA_256", hashes.SHA256, 0),
}
PREFIX_TAG = "keyquorum:prefix"
RAW_LIMIT = 4096  # kms:Sign takes 1 B to 4 KiB of RAW message; others are sent hashed
_SIGNER_OPTIONS = frozenset(
    {"region", "endpoint_url", "profile", "timeout", "attempt_timeout", "deletion_window_days"}
)


class AwsKmsSigner:
    """Creates an asymmetric KMS key per rotation, tagged with the cluster prefix, and signs
    with kms:Sign; unused keys are scheduled for deletion (kms:ScheduleKeyDeletion).

    ECDSA signatures come back DER-encoded and are converted to JWS's raw r||s. Messages over
    4 KiB are hashed here and sent as DIGEST (the signature is the same either way).
    """

    kind = "aws-kms"

    def __init__(self, client: Any, policy: CallPolicy, deletion_window_days: int = 7) -> None:
        self._client = client
        self.policy = policy
        self.deletion_window_days = deletion_window_days

    def supports(self, alg: str) -> bool:
        return alg in _SPECS

    async def create_key(self, alg: str, prefix: str) -> RemoteKey:
        spec = _SPECS[alg][0]
        created = await self._call(
            "kms:CreateKey",
            lambda: self._client.create_key(
                KeyUsage="SIGN_VERIFY",
                KeySpec=spec,
                Description=f"keyquorum signing key ({alg}) for {prefix}",
                Tags=[{"TagKey": PREFIX_TAG, "TagValue": prefix}],
            ),
        )
        metadata = created["KeyMetadata"]
        ref = {"key_arn": str(metadata["Arn"])}
        return RemoteKey(ref, await self.public_key(ref), _millis(metadata.get("CreationDate")))

    async def public_key(self, ref: Mapping[str, str]) -> bytes:
        arn = ref["key_arn"]
        response = await self._call(
            f"kms:GetPublicKey of {arn}", lambda: self._client.get_public_key(KeyId=arn)
        )
        try:
            key = serialization.load_der_public_key(response["PublicKey"])
        except (KeyError, ValueError):
            raise BackendDenied(f"kms:GetPublicKey of {arn} returned no usable key") from None
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    async def sign(self, ref: Mapping[str, str], alg: str, data: bytes) -> bytes:
        _, algorithm, hash_type, size = _SPECS[alg]
        arn = ref["key_arn"]
        if 0 < len(data) <= RAW_LIMIT:
            message, message_type = data, "RAW"
        else:
            digest = hashes.Hash(hash_type())
            digest.update(data)
            message, message_type = digest.finalize(), "DIGEST"
        response = await self._call(
            f"kms:Sign with {arn}",
            lambda: self._client.sign(
                KeyId=arn,
                Message=message,
                MessageType=message_type,
                SigningAlgorithm=algorithm,
            ),
        )
        signature = response["Signature"]
        if size:  # ECDSA: DER -> r||s
            r, s = decode_dss_signature(signature)
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        return bytes(signature)

    async def owned_keys(self, prefix: str) -> list[RemoteKey]:
        """Keys tagged with this prefix and not already pending deletion. (One ListResourceTags
        per key in the account and region: fine for a dedicated account or a few hundred keys.)
        """
        owned = []
        for arn in await self._all_key_arns():
            tags = await self._call(
                f"kms:ListResourceTags of {arn}",
                lambda arn=arn: self._client.list_resource_tags(KeyId=arn),
            )
            if not any(
                t.get("TagKey") == PREFIX_TAG and t.get("TagValue") == prefix
                for t in tags.get("Tags", [])
            ):
                continue
            metadata = (
                await self._call(
                    f"kms:DescribeKey of {arn}",
                    lambda arn=arn: self._client.describe_key(KeyId=arn),
                )
            )["KeyMetadata"]
            if metadata.get("KeyState") in ("PendingDeletion", "PendingReplicaDeletion"):
                continue
            owned.append(
                RemoteKey(
                    {"key_arn": str(metadata["Arn"])}, b"", _millis(metadata.get("CreationDate"))
                )
            )
        return owned

    async def _all_key_arns(self) -> list[str]:
        arns: list[str] = []
        marker: str | None = None
        while True:
            kwargs = {"Marker": marker} if marker else {}
            page = await self._call(
                "kms:ListKeys", lambda kwargs=kwargs: self._client.list_keys(**kwargs)
            )
            arns.extend(str(k["KeyArn"]) for k in page.get("Keys", []))
            marker = page.get("NextMarker")
            if not page.get("Truncated") or not marker:
                return arns

    async def retire(self, ref: Mapping[str, str]) -> None:
        arn = ref["key_arn"]
        # By key id, not ARN: the same key for KMS (the client is in the key's account and
        # region), and moto's ScheduleKeyDeletion only finds keys by id.
        key_id = arn.rsplit("/", 1)[-1]
        await self._call(
            f"kms:ScheduleKeyDeletion of {arn}",
            lambda: self._client.schedule_key_deletion(
                KeyId=key_id, PendingWindowInDays=self.deletion_window_days
            ),
        )

    async def _call(self, what: str, fn: Any) -> dict[str, Any]:
        permission = what.split(" ", 1)[0]

        async def attempt() -> dict[str, Any]:
            try:
                result: dict[str, Any] = await in_thread(fn)
            except Exception as exc:  # noqa: BLE001 - every SDK error is translated here
                raise _translate(exc, what, permission, missing_is_config=False) from None
            return result

        return await retry(attempt, what=what, policy=self.policy)

    def describe(self) -> str:
        return "AWS KMS (one asymmetric key per rotation)"

    def __repr__(self) -> str:
        return "AwsKmsSigner()"


def _millis(value: Any) -> int | None:
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1000)
    return None


def build_signer(options: Mapping[str, Any]) -> AwsKmsSigner:
    """Options: region, endpoint_url, profile, timeout, attempt_timeout, deletion_window_days."""
    if "key_id" in options:
        raise BackendConfigError(
            "backend.key_id: not used with mode = 'remote' (the leader creates a KMS key per "
            "rotation)",
            "remove backend.key_id, or use mode = 'wrap' to wrap keys under that KMS key",
        )
    unknown = set(options) - _SIGNER_OPTIONS
    if unknown:
        raise BackendConfigError(
            f"backend: unknown setting(s) {', '.join(sorted(unknown))} for aws-kms remote keys",
            f"remote aws-kms takes {', '.join(sorted(_SIGNER_OPTIONS))}",
        )
    window = options.get("deletion_window_days", 7)
    if isinstance(window, bool) or not isinstance(window, int) or not 7 <= window <= 30:
        raise BackendConfigError(
            f"backend.deletion_window_days: KMS allows 7 to 30 days, not {window!r}"
        )
    policy = CallPolicy.from_options(options)
    return AwsKmsSigner(_kms_client(options, policy), policy, window)
