"""A FAKE of Secret Manager's REST API (v1, global secrets), for tests: Google ships no emulator.

It is not Google's service. It serves what keyquorum calls, on 127.0.0.1, in the wire format of
the real REST API (JSON, camelCase, bytes as base64, int64 as strings, enums as numbers when the
client asks, Google's JSON error shape): createSecret, getSecret, updateSecret (version aliases,
labels; an `etag` that does not match is ABORTED), addSecretVersion (with `dataCrc32c` checked and
`clientSpecifiedPayloadChecksum` reported), accessSecretVersion (by number, alias or `latest`,
with the payload's CRC32C), getSecretVersion and destroySecretVersion (a second destroy is a
FAILED_PRECONDITION; a destroyed version's data is gone and reading it is FAILED_PRECONDITION).

Like the real service, it names resources by project NUMBER in its answers when a number is
known for the project id used in the request (`project_numbers`), so a client must not compare
the names it gets back with the ones it sent.

Test controls: `secret`, `version_state`, `aliases`, `set_alias`, `stale_etags`, `delete_secret`,
and from `GoogleApiFake`: `fail(code, times)` (such as a 503 outage or 403), `lose_answers`,
`corrupt(times)` (wrong payload checksums), `heal`, `request_count`, `calls`. Use it as a context
manager.
"""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fakes.gcp_kms import (
    ApiError,
    GoogleApiFake,
    Route,
    bytes_field,
    check_crc,
    crc32c,
    failed_precondition,
    json_object,
    timestamp,
)

_STATES = {"ENABLED": 1, "DISABLED": 2, "DESTROYED": 3}
_SEGMENT = r"[^/:]+"
_PROJECT = rf"projects/(?P<project>{_SEGMENT})"
_SECRET = rf"{_PROJECT}/secrets/(?P<secret>{_SEGMENT})"
_VERSION = rf"{_SECRET}/versions/(?P<version>{_SEGMENT})"
_SECRET_ID = re.compile(r"[a-zA-Z0-9_-]{1,255}")
_ALIAS = re.compile(r"[a-zA-Z][a-zA-Z0-9_-]{0,62}")


@dataclass
class _Version:
    number: int
    data: bytes | None
    create_time: str
    checksummed: bool
    state: str = "ENABLED"
    destroy_time: str | None = None


@dataclass
class _Secret:
    secret_id: str
    project: str  # as the project is named in answers (its number when known)
    create_time: str
    replication: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    versions: dict[int, _Version] = field(default_factory=dict)
    etag: str = ""

    @property
    def name(self) -> str:
        return f"projects/{self.project}/secrets/{self.secret_id}"

    def touch(self) -> None:
        self.etag = f'"{secrets.token_hex(8)}"'


class FakeSecretManager(GoogleApiFake):
    """In-memory secrets and versions behind a loopback HTTP server (see the module docstring)."""

    thread_name = "fake-secret-manager"

    def __init__(self, project_numbers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.project_numbers = dict(project_numbers or {})
        self._secrets: dict[tuple[str, str], _Secret] = {}  # (project number or id, secret id)
        self._stale_left = 0

    # ---- test controls ------------------------------------------------------------------------

    def secret(self, name: str) -> dict[str, Any]:
        """The secret as getSecret would answer (names use the project number)."""
        with self._lock:
            self.int_enums = False
            return self._secret_json(self._find(name))

    def version_state(self, name: str) -> str:
        match = re.fullmatch(_VERSION, name)
        assert match, name
        with self._lock:
            return self._find(name).versions[int(match["version"])].state

    def aliases(self, name: str) -> dict[str, int]:
        with self._lock:
            return dict(self._find(name).aliases)

    def set_alias(self, name: str, alias: str, number: int) -> None:
        """Point an alias at a version behind keyquorum's back (as an operator would)."""
        with self._lock:
            secret = self._find(name)
            secret.aliases[alias] = number
            secret.touch()

    def stale_etags(self, times: int) -> None:
        """Let another writer change the secret just before each of the next `times` updates."""
        with self._lock:
            self._stale_left = times

    def delete_secret(self, name: str) -> None:
        with self._lock:
            secret = self._find(name)
            del self._secrets[(secret.project, secret.secret_id)]

    def _canonical(self, project: str) -> str:
        return self.project_numbers.get(project, project)

    def _find(self, name: str) -> _Secret:
        match = re.match(_SECRET, name)
        assert match, name
        return self._secrets[(self._canonical(match["project"]), match["secret"])]

    # ---- routing ------------------------------------------------------------------------------

    _ROUTES: ClassVar[list[tuple[str, re.Pattern[str], str, str]]] = [
        # (HTTP verb, path, API method, permission); method M is served by `_M` below
        ("POST", re.compile(rf"/v1/(?P<name>{_PROJECT})/secrets"),
         "createSecret", "secretmanager.secrets.create"),
        ("GET", re.compile(rf"/v1/(?P<name>{_SECRET})"),
         "getSecret", "secretmanager.secrets.get"),
        ("PATCH", re.compile(rf"/v1/(?P<name>{_SECRET})"),
         "updateSecret", "secretmanager.secrets.update"),
        ("POST", re.compile(rf"/v1/(?P<name>{_SECRET}):addVersion"),
         "addSecretVersion", "secretmanager.versions.add"),
        ("GET", re.compile(rf"/v1/(?P<name>{_VERSION}):access"),
         "accessSecretVersion", "secretmanager.versions.access"),
        ("GET", re.compile(rf"/v1/(?P<name>{_VERSION})"),
         "getSecretVersion", "secretmanager.versions.get"),
        ("POST", re.compile(rf"/v1/(?P<name>{_VERSION}):destroy"),
         "destroySecretVersion", "secretmanager.versions.destroy"),
    ]  # fmt: skip

    def route(self, verb: str, path: str, query: dict[str, list[str]]) -> Route:
        for route_verb, pattern, method, permission in self._ROUTES:
            match = pattern.fullmatch(path) if route_verb == verb else None
            if match is not None:
                handler = getattr(self, f"_{method}")
                parts = match.groupdict()
                return Route(
                    method,
                    permission,
                    match["name"],
                    lambda query, body, handler=handler, parts=parts: handler(parts, query, body),
                )
        raise ApiError(404, f"The requested URL {path} was not found.")

    def denied_message(self, route: Route) -> str:
        return (
            f"Permission '{route.permission}' denied for resource '{route.resource}' (or it may "
            "not exist)."
        )

    # ---- rendering ----------------------------------------------------------------------------

    def _secret_json(self, secret: _Secret) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "name": secret.name,
            "replication": secret.replication,
            "createTime": secret.create_time,
            "etag": secret.etag,
        }
        if secret.labels:
            answer["labels"] = dict(secret.labels)
        if secret.aliases:
            answer["versionAliases"] = {k: str(v) for k, v in secret.aliases.items()}
        return answer

    def _version_json(self, secret: _Secret, version: _Version) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "name": f"{secret.name}/versions/{version.number}",
            "createTime": version.create_time,
            "state": _STATES[version.state] if self.int_enums else version.state,
            "replicationStatus": {"automatic": {}},
            "etag": f'"{version.number}-{version.state.lower()}"',
            "clientSpecifiedPayloadChecksum": version.checksummed,
        }
        if version.destroy_time:
            answer["destroyTime"] = version.destroy_time
        return answer

    # ---- the API ------------------------------------------------------------------------------

    def _secret(self, parts: dict[str, str]) -> _Secret:
        project = self._canonical(parts["project"])
        secret = self._secrets.get((project, parts["secret"]))
        if secret is None:
            raise ApiError(404, f"Secret [projects/{project}/secrets/{parts['secret']}] not found.")
        return secret

    def _version(self, parts: dict[str, str]) -> tuple[_Secret, _Version]:
        secret = self._secret(parts)
        wanted = parts["version"]
        if wanted == "latest":
            number = max((n for n, v in secret.versions.items() if v.state == "ENABLED"), default=0)
        elif wanted.isdigit():
            number = int(wanted)
        else:
            number = secret.aliases.get(wanted, 0)
        version = secret.versions.get(number)
        if version is None:
            raise ApiError(404, f"Secret Version [{secret.name}/versions/{wanted}] not found.")
        return secret, version

    def _createSecret(
        self, parts: dict[str, str], query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        project = self._canonical(parts["project"])
        secret_id = query.get("secretId", [""])[0]
        if not _SECRET_ID.fullmatch(secret_id):
            raise ApiError(400, f"Invalid secret id {secret_id!r}.")
        request = json_object(body)
        replication = request.get("replication")
        if not isinstance(replication, dict) or len(replication) != 1:
            raise ApiError(400, "Secret.replication is required.")
        if (project, secret_id) in self._secrets:
            raise ApiError(
                409,
                f"Secret [projects/{project}/secrets/{secret_id}] already exists.",
                "ALREADY_EXISTS",
            )
        secret = _Secret(secret_id, project, timestamp(), replication)
        secret.labels = dict(request.get("labels") or {})
        secret.touch()
        self._secrets[(project, secret_id)] = secret
        return self._secret_json(secret)

    def _getSecret(
        self, parts: dict[str, str], query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        return self._secret_json(self._secret(parts))

    def _updateSecret(
        self, parts: dict[str, str], query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        secret = self._secret(parts)
        request = json_object(body)
        mask = {p for m in query.get("updateMask", []) for p in m.split(",") if p}
        if not mask or not mask <= {"versionAliases", "labels"}:
            raise ApiError(400, f"Unsupported update mask {sorted(mask)}.")
        if self._stale_left > 0:
            self._stale_left -= 1
            secret.touch()
        if request.get("etag") and request["etag"] != secret.etag:
            raise ApiError(409, "The etag provided does not match the secret's etag.")
        aliases: dict[str, int] = {}
        if "versionAliases" in mask:
            for alias, value in (request.get("versionAliases") or {}).items():
                number = int(value)
                if not _ALIAS.fullmatch(alias) or alias == "latest":
                    raise ApiError(400, f"Invalid version alias {alias!r}.")
                version = secret.versions.get(number)
                if version is None:
                    raise ApiError(400, f"Version {number} of {secret.name} does not exist.")
                if version.state == "DESTROYED":
                    raise failed_precondition(f"Version {number} of {secret.name} is destroyed.")
                aliases[alias] = number
            secret.aliases = aliases
        if "labels" in mask:
            secret.labels = dict(request.get("labels") or {})
        secret.touch()
        return self._secret_json(secret)

    def _addSecretVersion(
        self, parts: dict[str, str], query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        secret = self._secret(parts)
        payload = json_object(body).get("payload")
        if not isinstance(payload, dict):
            raise ApiError(400, "payload is required.")
        data = bytes_field(payload, "data")
        check_crc(payload, "data", data)
        number = max(secret.versions, default=0) + 1
        version = _Version(number, data, timestamp(), "dataCrc32c" in payload)
        secret.versions[number] = version
        return self._version_json(secret, version)

    def _accessSecretVersion(
        self, parts: dict[str, str], query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        secret, version = self._version(parts)
        if version.state != "ENABLED" or version.data is None:
            raise failed_precondition(
                f"Secret Version [{secret.name}/versions/{version.number}] is in "
                f"{version.state} state."
            )
        return {
            "name": f"{secret.name}/versions/{version.number}",
            "payload": {
                "data": base64.b64encode(version.data).decode(),
                "dataCrc32c": str(crc32c(version.data)),
            },
        }

    def _getSecretVersion(
        self, parts: dict[str, str], query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        secret, version = self._version(parts)
        return self._version_json(secret, version)

    def _destroySecretVersion(
        self, parts: dict[str, str], query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        secret, version = self._version(parts)
        if version.state == "DESTROYED":
            raise failed_precondition(
                f"SecretVersion [{secret.name}/versions/{version.number}] is already in "
                "DESTROYED state."
            )
        version.state, version.data, version.destroy_time = "DESTROYED", None, timestamp()
        return self._version_json(secret, version)
