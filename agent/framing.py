"""The compact framed protocol on the agent's socket: a sans-I/O codec (no sockets, no clock).

HTTP/1.1 (DESIGN.md §5) stays the socket's compatible API; this protocol is the fast path the
project's own clients use. Both share one Unix socket and are told apart by the connection's
first byte: an HTTP request starts with an ASCII method letter, a framed connection with the
preamble `00 4b 51 01` (NUL, "KQ", version 1). Integers are big-endian.

    request   u32 length | u8 op | u32 id | body          (length counts op, id and body)
    response  u32 length | u32 id | u16 status | body     (length counts id, status and body)

Responses come back in request order, each echoing its request's id, so a client may pipeline.
`status` is the HTTP status the same request would get; on an error (status >= 400) the body is
the HTTP API's JSON error document `{"error": {"code", "message"}}`, byte for byte.

    op 1 SIGN        body: the payload                     200: kid, alg, signature
    op 2 SIGN_BATCH  body: u32 n, then n x (u32 len, data) 200: kid, alg, u32 n, n x (u16 len, sig)
    op 3 JWT         body: the JSON of POST /v1/jwt        200: the JSON of its response
    op 4 CALL        body: method SP target LF json-body   200 or any: u16 hlen, headers, body
where kid and alg are each u8 length + ASCII, and a CALL reaches any HTTP endpoint (jwks,
status, admin, ...) with its answer's headers as `name: value` lines (CRLF-terminated).

A frame whose op is unknown or whose body is malformed gets an error answer and the connection
goes on; a frame longer than the limit has its body skipped (413) and the connection goes on. A
wrong preamble or a length too short to hold op and id loses the frame boundary: the server
answers with id 0 and closes the connection. Requests before the bad one are answered first.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

PREAMBLE = b"\x00KQ\x01"
FIRST_BYTE = PREAMBLE[0]
VERSION = PREAMBLE[3]

SIGN = 1
SIGN_BATCH = 2
JWT = 3
CALL = 4
OPS = {SIGN: "sign", SIGN_BATCH: "sign_batch", JWT: "jwt", CALL: "call"}

_REQUEST_HEAD = struct.Struct(">IBI")  # length, op, id
_RESPONSE_HEAD = struct.Struct(">IIH")  # length, id, status
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


class FramingError(Exception):
    """A request the framed protocol cannot carry: `status`/`code`/`message` as in the HTTP
    API. `fatal`: the frame boundary is lost and the connection must close after answering."""

    def __init__(self, status: int, code: str, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fatal = fatal


@dataclass(frozen=True, slots=True)
class Frame:
    op: int
    id: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Oversized:
    """A well-formed frame over the limit; its body was skipped, its id is answered with 413."""

    id: int
    length: int


# ---- requests: the server decodes, the client encodes ------------------------------------------


class RequestDecoder:
    """Bytes in, frames out. `max_frame` bounds the body a frame may carry."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._preamble = False
        self._skip = 0  # bytes of an oversized frame still to discard

    def feed(self, data: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buffer += data

    def next(self) -> Frame | Oversized | None:
        """The next complete frame, None if more bytes are needed; FramingError if fatal."""
        buffer = self._buffer
        if not self._preamble:
            if len(buffer) < len(PREAMBLE):
                seen = min(len(buffer), 3)
                if bytes(buffer[:seen]) != PREAMBLE[:seen]:
                    raise _bad_preamble(buffer)
                return None
            if buffer[:3] != PREAMBLE[:3]:
                raise _bad_preamble(buffer)
            if buffer[3] != VERSION:
                raise FramingError(
                    400,
                    "bad_frame",
                    f"framed protocol version {buffer[3]} is not supported (this agent speaks "
                    f"version {VERSION})",
                    fatal=True,
                )
            del buffer[: len(PREAMBLE)]
            self._preamble = True
        if len(buffer) < _REQUEST_HEAD.size:
            if len(buffer) >= 4 and _U32.unpack_from(buffer)[0] < 5:
                raise _short_frame(_U32.unpack_from(buffer)[0])
            return None
        length, op, ident = _REQUEST_HEAD.unpack_from(buffer)
        if length < 5:
            raise _short_frame(length)
        if length - 5 > self.max_frame:
            available = len(buffer) - 4
            if available >= length:
                del buffer[: 4 + length]
            else:
                self._skip = length - available
                buffer.clear()
            return Oversized(ident, length - 5)
        if len(buffer) < 4 + length:
            return None
        body = bytes(buffer[_REQUEST_HEAD.size : 4 + length])
        del buffer[: 4 + length]
        return Frame(op, ident, body)

    @property
    def pending(self) -> bool:
        """True if part of a frame (or preamble) has arrived but not all of it."""
        return bool(self._buffer) or self._skip > 0


def _bad_preamble(buffer: bytearray) -> FramingError:
    return FramingError(
        400,
        "bad_frame",
        f"a framed connection starts with {PREAMBLE!r}; got {bytes(buffer[:4])!r}",
        fatal=True,
    )


def _short_frame(length: int) -> FramingError:
    return FramingError(
        400,
        "bad_frame",
        f"frame length {length} is too short to hold an op and an id (at least 5)",
        fatal=True,
    )


def encode_request(op: int, ident: int, body: bytes) -> bytes:
    return _REQUEST_HEAD.pack(len(body) + 5, op, ident) + body


def encode_batch(payloads: list[bytes]) -> bytes:
    parts = [_U32.pack(len(payloads))]
    for payload in payloads:
        parts.append(_U32.pack(len(payload)))
        parts.append(payload)
    return b"".join(parts)


def decode_batch(body: bytes, limit: int) -> list[bytes]:
    """The payloads of a SIGN_BATCH body; FramingError (not fatal) if malformed."""
    if len(body) < 4:
        raise FramingError(400, "bad_request", "a batch body starts with a u32 payload count")
    (count,) = _U32.unpack_from(body)
    if count == 0:
        raise FramingError(400, "bad_request", "a batch needs at least one payload")
    if count > limit:
        raise FramingError(413, "too_large", f"batch of {count} exceeds socket.max_batch={limit}")
    payloads = []
    offset = 4
    for index in range(count):
        if offset + 4 > len(body):
            raise FramingError(400, "bad_request", f"batch body ends before payload {index}")
        (size,) = _U32.unpack_from(body, offset)
        offset += 4
        if offset + size > len(body):
            raise FramingError(400, "bad_request", f"payload {index} runs past the batch body")
        payloads.append(body[offset : offset + size])
        offset += size
    if offset != len(body):
        raise FramingError(400, "bad_request", "bytes left over after the last batch payload")
    return payloads


def encode_call(method: str, target: str, body: bytes) -> bytes:
    return f"{method} {target}\n".encode("ascii") + body


def decode_call(body: bytes) -> tuple[str, str, bytes]:
    line, newline, rest = body.partition(b"\n")
    method, space, target = line.partition(b" ")
    if not newline or not space or not method or not target.startswith(b"/"):
        raise FramingError(
            400, "bad_request", "a CALL body is 'METHOD /path' and a newline, then the JSON body"
        )
    try:
        return method.decode("ascii"), target.decode("ascii"), rest
    except UnicodeDecodeError:
        raise FramingError(400, "bad_request", "a CALL's method and path must be ASCII") from None


# ---- responses: the server encodes, the client decodes -----------------------------------------


def encode_response(ident: int, status: int, body: bytes) -> bytes:
    return _RESPONSE_HEAD.pack(len(body) + 6, ident, status) + body


def encode_error(ident: int, status: int, code: str, message: str) -> bytes:
    document = {"error": {"code": code, "message": message}}
    return encode_response(ident, status, json.dumps(document, separators=(",", ":")).encode())


def _short(text: str) -> bytes:
    data = text.encode("ascii")
    return bytes((len(data),)) + data


def encode_signed(kid: str, alg: str, signature: bytes) -> bytes:
    return _short(kid) + _short(alg) + signature


def encode_signed_batch(kid: str, alg: str, signatures: list[bytes]) -> bytes:
    parts = [_short(kid), _short(alg), _U32.pack(len(signatures))]
    for signature in signatures:
        parts.append(_U16.pack(len(signature)))
        parts.append(signature)
    return b"".join(parts)


def encode_called(headers: tuple[tuple[str, str], ...], body: bytes) -> bytes:
    block = "".join(f"{name}: {value}\r\n" for name, value in headers).encode("latin-1")
    return _U16.pack(len(block)) + block + body


class ResponseDecoder:
    """Bytes in, (id, status, body) out, for clients."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next(self) -> tuple[int, int, bytes] | None:
        buffer = self._buffer
        if len(buffer) < _RESPONSE_HEAD.size:
            return None
        length, ident, status = _RESPONSE_HEAD.unpack_from(buffer)
        if length < 6:
            raise ValueError(f"malformed response frame (length {length})")
        if len(buffer) < 4 + length:
            return None
        body = bytes(buffer[_RESPONSE_HEAD.size : 4 + length])
        del buffer[: 4 + length]
        return ident, status, body

    def starts_like_http(self) -> bool:
        """An agent that predates the framed protocol answers the preamble with HTTP 400."""
        return bytes(self._buffer[:5]) == b"HTTP/"


def _read_short(body: bytes, offset: int) -> tuple[str, int]:
    size = body[offset]
    end = offset + 1 + size
    return body[offset + 1 : end].decode("ascii"), end


def decode_signed(body: bytes) -> tuple[str, str, bytes]:
    kid, offset = _read_short(body, 0)
    alg, offset = _read_short(body, offset)
    return kid, alg, body[offset:]


def decode_signed_batch(body: bytes) -> tuple[str, str, list[bytes]]:
    kid, offset = _read_short(body, 0)
    alg, offset = _read_short(body, offset)
    (count,) = _U32.unpack_from(body, offset)
    offset += 4
    signatures = []
    for _ in range(count):
        (size,) = _U16.unpack_from(body, offset)
        offset += 2
        signatures.append(body[offset : offset + size])
        offset += size
    return kid, alg, signatures


def decode_called(body: bytes) -> tuple[dict[str, str], bytes]:
    (size,) = _U16.unpack_from(body)
    headers: dict[str, str] = {}
    for line in body[2 : 2 + size].decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(": ")
        if colon:
            headers[name.lower()] = value
    return headers, body[2 + size :]
