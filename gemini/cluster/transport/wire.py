"""The transport's wire format: frames, their checksums and limits, socket I/O.

Every frame::

    magic "GMNI" | version u8 | type u8 | flags u16 (0) | length u64 | xxh3_64 u64
    followed by `length` payload bytes (network byte order throughout)

Exchanges after the handshake (``handshake``):

Put in ranges: ``PUT_OPEN{json}`` -> ``READY`` | ``ERROR``; then ``MANIFEST``,
``RANGE`` frames covering ``[0, data_len)`` in order and without gaps, sent
whenever the sender chooses, and ``FINISH{digests}`` -> ``ACK`` | ``ERROR``.
A ``RANGE`` payload is its offset (u64) followed by the bytes; its header
checksum covers the offset only: the bytes are verified against the
per-chunk digests (xxh3_64 of every ``checksum_bytes`` of the data, as the
snapshot's manifest holds them) that ``FINISH`` carries, so a sender reuses
digests it already has instead of hashing again. An ``ERROR`` frame in place
of a ``RANGE`` or ``FINISH`` abandons the put; the holder answers ``ERROR``.
Put in one stream (the first version's exchange, still served):
``PUT_BEGIN{json}`` -> ``READY`` | ``ERROR``; then ``MANIFEST`` and ``DATA``
frames covering exactly ``data_len`` bytes -> ``ACK`` | ``ERROR``.
Get: ``GET{json}`` -> ``GET_BEGIN{json}``, ``MANIFEST``, ``DATA``... | ``ERROR``.
List: ``LIST`` -> ``LIST_REPLY{json}`` | ``ERROR``.

Every payload's checksum is verified on receipt and every length is checked
against its frame type's limit before anything is allocated. Control payloads
are JSON and data payloads raw bytes: nothing received is ever unpickled.
The frame helpers are public so that tests (and tools) can speak the protocol
from a raw socket without a second implementation of it.
"""

from __future__ import annotations

import enum
import hashlib
import json
import socket
import struct
from typing import Any

import xxhash

MAGIC = b"GMNI"
VERSION = 1
#: magic, version, frame type, flags, payload length, xxh3_64 of the payload.
HEADER = struct.Struct("!4sBBHQQ")
NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
#: JSON control payloads never need more; a bigger claim is refused unread.
MAX_CONTROL_BYTES = 1 << 20
#: Default cap on a checkpoint manifest (a JSON list of tensors and offsets).
MAX_MANIFEST_BYTES = 64 << 20
#: Cap on one data frame. Data lands in the caller's buffer, so this bounds
#: work per frame rather than memory; senders use far smaller chunks.
MAX_CHUNK_BYTES = 1 << 30
DEFAULT_CHUNK_BYTES = 8 << 20
#: A RANGE frame's payload starts with the range's offset in the slot.
RANGE_PREFIX = struct.Struct("!Q")
#: One digest in a FINISH frame.
DIGEST = struct.Struct("!Q")
#: Most sub-buffers a ranged put may ask the holder to stage through.
MAX_SUBBUFFERS = 64
# 4 MiB is net.core.{r,w}mem_max on the measured machine; asking for more is
# silently clamped, and less than the loopback default would cost throughput.
_SOCKET_BUFFER_BYTES = 4 << 20
# Ask the kernel to hold a data frame's header until its payload follows, so
# header and payload leave in full segments (Linux only; 0 elsewhere).
MSG_MORE = getattr(socket, "MSG_MORE", 0)
# Control frames up to this size go out as one send, header and payload together.
_COALESCE_BYTES = 64 << 10
# What a blocked send/recv raises when its timeout expires: TimeoutError under
# Python's settimeout, EAGAIN (BlockingIOError) under SO_RCVTIMEO/SO_SNDTIMEO.
TIMEOUTS = (TimeoutError, BlockingIOError)


class FrameType(enum.IntEnum):
    """Frame types of protocol version 1."""

    HELLO = 1
    CHALLENGE = 2
    PROOF = 3
    AUTH_OK = 4
    ERROR = 5
    PUT_BEGIN = 10
    READY = 11
    MANIFEST = 12
    DATA = 13
    ACK = 14
    PUT_OPEN = 15
    RANGE = 16
    FINISH = 17
    GET = 20
    GET_BEGIN = 21
    LIST = 30
    LIST_REPLY = 31


AUTH_FRAMES = {FrameType.HELLO, FrameType.CHALLENGE, FrameType.PROOF, FrameType.AUTH_OK}


class TransportError(Exception):
    """Any failure of the transport: auth, framing, checksum, peer loss, refusal.

    The message says what failed, for which source and step, and how far the
    transfer got; callers decide whether to retry another holder.
    """


class PeerClosed(TransportError):
    """The peer closed the connection cleanly before the first byte of a frame."""


class Refused(TransportError):
    """The peer answered with an ERROR frame at a point where both sides are
    still in step, so the connection stays usable."""


def checksum(buf: Any) -> int:
    """xxh3_64 of any buffer-protocol object, read in place (no copy)."""
    return xxhash.xxh3_64_intdigest(buf)


def pack_header(ftype: int, length: int, csum: int, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ftype, flags, length, csum)


def send_frame(sock: socket.socket, ftype: int, payload: Any = b"") -> None:
    """Send one frame; ``payload`` is any bytes-like object, sent without copying."""
    view = memoryview(payload).cast("B")
    header = pack_header(ftype, view.nbytes, checksum(view))
    if view.nbytes <= _COALESCE_BYTES:
        sock.sendall(header + view.tobytes())
    else:
        sock.sendall(header, MSG_MORE)
        sock.sendall(view)


def send_json(sock: socket.socket, ftype: int, obj: dict[str, Any]) -> None:
    send_frame(sock, ftype, json.dumps(obj, separators=(",", ":")).encode())


def send_error(sock: socket.socket, message: str) -> None:
    send_json(sock, FrameType.ERROR, {"error": message[:4096]})


def recv_exact_into(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view`` from the socket; returns fewer bytes only if the peer closed."""
    got, want = 0, view.nbytes
    while got < want:
        n = sock.recv_into(view[got:], want - got)
        if n == 0:
            break
        got += n
    return got


def recv_header(
    sock: socket.socket, buf: bytearray, *, eof_ok: bool = False
) -> tuple[FrameType, int, int] | None:
    """Read and validate one header; returns (type, length, checksum).

    Returns None only when ``eof_ok`` and the peer closed cleanly before the
    first byte (the normal end of a connection between requests).
    """
    got = recv_exact_into(sock, memoryview(buf))
    if got < HEADER.size:
        if got == 0 and eof_ok:
            return None
        raise (PeerClosed if got == 0 else TransportError)(
            f"peer closed the connection after {got} of {HEADER.size} header bytes"
        )
    magic, version, ftype, flags, length, csum = HEADER.unpack(buf)
    if magic != MAGIC:
        raise TransportError(f"bad frame magic {magic!r}: not a gemini transport peer")
    if version != VERSION:
        raise TransportError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    if flags != 0:
        raise TransportError(f"unknown frame flags {flags:#x}")
    try:
        return FrameType(ftype), length, csum
    except ValueError:
        raise TransportError(f"unknown frame type {ftype}") from None


def _default_max_len(ftype: FrameType) -> int:
    if ftype in AUTH_FRAMES:
        return max(NONCE_BYTES, MAC_BYTES)
    if ftype == FrameType.MANIFEST:
        return MAX_MANIFEST_BYTES
    if ftype == FrameType.DATA:
        return MAX_CHUNK_BYTES
    return MAX_CONTROL_BYTES


def recv_payload(sock: socket.socket, ftype: FrameType, length: int, csum: int) -> bytes:
    payload = bytearray(length)
    got = recv_exact_into(sock, memoryview(payload))
    if got < length:
        raise TransportError(
            f"peer closed mid-frame after {got} of {length} bytes of a {ftype.name} frame"
        )
    if checksum(payload) != csum:
        raise TransportError(f"checksum mismatch in {ftype.name} frame")
    return bytes(payload)


def recv_frame(
    sock: socket.socket,
    expect: set[FrameType] | None = None,
    max_len: int | None = None,
    *,
    accept_error: bool = True,
) -> tuple[FrameType, bytes]:
    """Receive one whole frame, verified; an ERROR frame is accepted in place
    of any expected one unless ``accept_error`` is False.

    The length is checked against ``max_len`` (default: the type's limit)
    before any payload memory is allocated.
    """
    header = recv_header(sock, bytearray(HEADER.size))
    assert header is not None
    ftype, length, csum = header
    allowed = expect is None or ftype in expect or (accept_error and ftype == FrameType.ERROR)
    if not allowed:
        assert expect is not None
        names = "/".join(sorted(t.name for t in expect))
        raise TransportError(f"expected a {names} frame, got {ftype.name}")
    limit = _default_max_len(ftype) if max_len is None or ftype == FrameType.ERROR else max_len
    if length > limit:
        raise TransportError(f"{ftype.name} frame of {length} bytes exceeds the {limit}-byte limit")
    return ftype, recv_payload(sock, ftype, length, csum)


def error_text(payload: bytes) -> str:
    try:
        obj = json.loads(payload)
        return str(obj["error"]) if isinstance(obj, dict) and "error" in obj else repr(obj)[:200]
    except (ValueError, UnicodeDecodeError):
        return f"unreadable ERROR frame of {len(payload)} bytes"


def parse_json(ftype: FrameType, payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise TransportError(f"bad {ftype.name} frame: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise TransportError(f"bad {ftype.name} frame: expected a JSON object")
    return obj


def int_field(ftype: FrameType, obj: dict[str, Any], key: str, *, maximum: int = 1 << 62) -> int:
    value = obj.get(key)
    # bool is an int subclass; `true` is not a step number.
    if type(value) is not int or not 0 <= value <= maximum:
        raise TransportError(
            f"bad {ftype.name} frame: {key!r} must be an integer in [0, {maximum}], got {value!r}"
        )
    return value


def byte_view(buf: Any, *, writable: bool, what: str) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer, without copying."""
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    if writable and view.readonly:
        raise ValueError(f"{what} must be writable")
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except TypeError as e:
            raise ValueError(f"{what} cannot be viewed as bytes: {e}") from None
    return view


def set_timeout(sock: socket.socket, seconds: float | None) -> None:
    """Bound how long one send or receive may block without progress.

    Kernel-side SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket, not
    ``settimeout``: Python implements the latter with a poll() before every
    recv/send, which costs measurable CPU at GB/s. A timeout then surfaces as
    BlockingIOError (see ``TIMEOUTS``).
    """
    sock.settimeout(None)
    usec = 0 if seconds is None else max(1, round(seconds * 1e6))
    timeval = struct.pack("ll", usec // 1_000_000, usec % 1_000_000)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except OSError:  # a platform without them: fall back to Python's timeout
        sock.settimeout(seconds)


def tune(sock: socket.socket) -> None:
    # Frames are sent whole; Nagle would only delay the small control replies.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, opt) < _SOCKET_BUFFER_BYTES:
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER_BYTES)
        except OSError:
            pass


def send_data(sock: socket.socket, view: memoryview, chunk_bytes: int, progress: list[int]) -> None:
    """Send ``view`` as DATA frames; ``progress[0]`` tracks bytes handed to the kernel."""
    total = view.nbytes
    for off in range(0, total, chunk_bytes):
        part = view[off : off + chunk_bytes]
        sock.sendall(pack_header(FrameType.DATA, part.nbytes, checksum(part)), MSG_MORE)
        sock.sendall(part)
        progress[0] = off + part.nbytes


def recv_data(
    sock: socket.socket,
    dest: memoryview,
    header_buf: bytearray,
    progress: list[int],
) -> int | None:
    """Receive DATA frames until ``dest`` is full, straight into ``dest``.

    Returns the index of the first chunk whose checksum failed (the stream is
    still read to its end so the connection stays in step), or None.
    ``progress[0]`` tracks bytes received, for error messages.
    """
    total, received, chunk, bad = dest.nbytes, 0, 0, None
    hasher = xxhash.xxh3_64()
    while received < total:
        header = recv_header(sock, header_buf)
        assert header is not None
        ftype, length, csum = header
        if ftype != FrameType.DATA:
            if ftype == FrameType.ERROR:
                raise TransportError(
                    f"peer aborted the transfer: {error_text(recv_small(sock, length, csum))}"
                )
            raise TransportError(f"expected a DATA frame, got {ftype.name}")
        if not 0 < length <= min(total - received, MAX_CHUNK_BYTES):
            raise TransportError(
                f"DATA frame of {length} bytes with {total - received} bytes left to receive"
            )
        # Hash each piece as it lands, while it is still in cache, instead of
        # re-reading the whole chunk afterwards. Skipped once a chunk failed:
        # the rest is only drained.
        hasher.reset()
        got = 0
        while got < length:
            n = sock.recv_into(dest[received + got : received + length], length - got)
            if n == 0:
                raise TransportError(
                    f"peer closed mid-transfer after {received + got} of {total} bytes"
                )
            if bad is None:
                hasher.update(dest[received + got : received + got + n])
            got += n
            progress[0] = received + got
        if bad is None and hasher.intdigest() != csum:
            bad = chunk
        received += length
        chunk += 1
    return bad


class GridHasher:
    """xxh3_64 digests of consecutive ``grid_bytes`` chunks of a stream of ``total`` bytes.

    Fed pieces in order, of any sizes (a piece may straddle chunk
    boundaries), so that each piece is hashed right after it was received or
    copied, while it is still in cache, whatever the sender's range sizes.
    The digests equal those of ``format.checksum`` over the same bytes with
    the same chunk size.
    """

    def __init__(self, total: int, grid_bytes: int) -> None:
        if grid_bytes < 1:
            raise ValueError(f"grid_bytes must be >= 1, got {grid_bytes}")
        self.total, self.grid_bytes = total, grid_bytes
        self.digests: list[int] = []
        self.pos = 0
        self._boundary = min(grid_bytes, total)
        self._hasher = xxhash.xxh3_64()

    def update(self, piece: memoryview) -> None:
        if self.pos + piece.nbytes > self.total:
            raise ValueError(f"{self.pos + piece.nbytes} bytes hashed of a {self.total}-byte grid")
        while piece.nbytes:
            take = min(piece.nbytes, self._boundary - self.pos)
            self._hasher.update(piece[:take])
            self.pos += take
            piece = piece[take:]
            if self.pos == self._boundary:
                self.digests.append(self._hasher.intdigest())
                self._hasher.reset()
                self._boundary = min(self._boundary + self.grid_bytes, self.total)

    def chunk_span(self, i: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of chunk ``i``."""
        return i * self.grid_bytes, min((i + 1) * self.grid_bytes, self.total)


def grid_chunks(total: int, grid_bytes: int) -> int:
    """How many digests cover ``total`` bytes in ``grid_bytes`` chunks (last one short)."""
    return -(-total // grid_bytes)


def pack_digests(digests: list[int]) -> bytes:
    return struct.pack(f"!{len(digests)}Q", *digests)


def unpack_digests(payload: bytes) -> list[int]:
    if len(payload) % DIGEST.size:
        raise TransportError(f"bad FINISH frame: {len(payload)} bytes is not a list of digests")
    return list(struct.unpack(f"!{len(payload) // DIGEST.size}Q", payload))


def recv_small(sock: socket.socket, length: int, csum: int) -> bytes:
    if length > MAX_CONTROL_BYTES:
        raise TransportError(f"ERROR frame of {length} bytes exceeds the control limit")
    return recv_payload(sock, FrameType.ERROR, length, csum)


def source_step(source: int, step: int | None) -> str:
    return f"source {source} step {'newest' if step is None else step}"
