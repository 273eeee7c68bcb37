"""Authenticated, checksummed socket transport for replicated checkpoints.

This module owns the wire protocol between a trainer and the worker agents
that hold copies of its per-step checkpoint: the frame format, the mutual
challenge-response handshake, the put/get/list exchanges, the server that an
agent runs (:class:`TransportServer`) and the client a trainer uses
(:class:`TransportClient`). What an agent does with the bytes (shared-memory
slots, which step is complete) lives behind the :class:`Handler` and
:class:`PutTarget` protocols and is implemented elsewhere.

Security rules kept here: every connection proves knowledge of the run secret
in both directions before any request is read, and must finish doing so within
a few seconds (an unauthenticated peer holds a connection slot no longer; at
most half the slots are unauthenticated, the oldest of them given up to a
newcomer); every frame's payload carries
an xxh3_64 checksum that the receiver verifies; lengths are checked against
per-frame limits before anything is allocated; control payloads are JSON and
data payloads raw bytes, so nothing received is ever unpickled. There is no
encryption and no per-frame MAC: the secret authenticates who connects, the
checksums catch corruption; neither hides nor protects the bytes from someone
who can read or rewrite packets on the network.

Data path: the sender checksums and sends slices of the caller's buffer in
place; the receiver reads each chunk straight into the destination buffer
(the holder's shared-memory slot, or the caller's ``into``) and checksums it
as it lands. A bad chunk in a put is reported after the rest of the put has
been drained into the slot being aborted, so the connection stays usable.

Wire format, every frame::

    magic "GMNI" | version u8 | type u8 | flags u16 (0) | length u64 | xxh3_64 u64
    followed by `length` payload bytes (network byte order throughout)

Handshake (client proves first, then the server proves back)::

    C->S HELLO(client nonce)   S->C CHALLENGE(server nonce)
    C->S PROOF(mac_client)     S->C AUTH_OK(mac_server) | ERROR + close

Put: ``PUT_BEGIN{json}`` -> ``READY`` | ``ERROR``; then ``MANIFEST`` and
``DATA`` frames covering exactly ``data_len`` bytes -> ``ACK`` | ``ERROR``.
Get: ``GET{json}`` -> ``GET_BEGIN{json}``, ``MANIFEST``, ``DATA``... | ``ERROR``.
List: ``LIST`` -> ``LIST_REPLY{json}`` | ``ERROR``.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import json
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, Protocol, TypeVar

import xxhash

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "HEADER",
    "MAGIC",
    "MAX_CHUNK_BYTES",
    "MAX_CONTROL_BYTES",
    "MAX_MANIFEST_BYTES",
    "MIN_SECRET_BYTES",
    "NONCE_BYTES",
    "VERSION",
    "FrameType",
    "Handler",
    "PutTarget",
    "TransportClient",
    "TransportError",
    "TransportServer",
    "auth_mac",
    "checksum",
    "client_handshake",
    "pack_header",
    "recv_frame",
    "send_frame",
    "server_handshake",
]

log = logging.getLogger(__name__)

MAGIC = b"GMNI"
VERSION = 1
#: magic, version, frame type, flags, payload length, xxh3_64 of the payload.
HEADER = struct.Struct("!4sBBHQQ")
NONCE_BYTES = 32
_MAC_BYTES = hashlib.sha256().digest_size
#: JSON control payloads never need more; a bigger claim is refused unread.
MAX_CONTROL_BYTES = 1 << 20
#: Default cap on a checkpoint manifest (a JSON list of tensors and offsets).
MAX_MANIFEST_BYTES = 64 << 20
#: Cap on one data frame. Data lands in the caller's buffer, so this bounds
#: work per frame rather than memory; senders use far smaller chunks.
MAX_CHUNK_BYTES = 1 << 30
DEFAULT_CHUNK_BYTES = 8 << 20
#: A run secret shorter than this is refused: HMAC is only as strong as its key.
MIN_SECRET_BYTES = 16
# 4 MiB is net.core.{r,w}mem_max on the measured machine; asking for more is
# silently clamped, and less than the loopback default would cost throughput.
_SOCKET_BUFFER_BYTES = 4 << 20
# Ask the kernel to hold a data frame's header until its payload follows, so
# header and payload leave in full segments (Linux only; 0 elsewhere).
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
# Control frames up to this size go out as one send, header and payload together.
_COALESCE_BYTES = 64 << 10
_AUTH_LABEL = b"gemini-transport/1 "
# How often the server's accept loop wakes to hang up on late handshakes.
_TICK_S = 0.25

_T = TypeVar("_T")
# What a blocked send/recv raises when its timeout expires: TimeoutError under
# Python's settimeout, EAGAIN (BlockingIOError) under SO_RCVTIMEO/SO_SNDTIMEO.
_TIMEOUTS = (TimeoutError, BlockingIOError)


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
    GET = 20
    GET_BEGIN = 21
    LIST = 30
    LIST_REPLY = 31


_AUTH_FRAMES = {FrameType.HELLO, FrameType.CHALLENGE, FrameType.PROOF, FrameType.AUTH_OK}


class TransportError(Exception):
    """Any failure of the transport: auth, framing, checksum, peer loss, refusal.

    The message says what failed, for which source and step, and how far the
    transfer got; callers decide whether to retry another holder.
    """


class _PeerClosed(TransportError):
    """The peer closed the connection cleanly before the first byte of a frame."""


class _Refused(TransportError):
    """The peer answered with an ERROR frame at a point where both sides are
    still in step, so the connection stays usable."""


class PutTarget(Protocol):
    """Where one incoming checkpoint is written (one shared-memory slot).

    Exactly one of :meth:`commit` (returning normally) or :meth:`abort` is
    called for every target that ``begin_put`` hands out; a commit that raises
    is followed by ``abort``. Until then the transport owns the buffer.
    """

    def buffer(self) -> memoryview:
        """A writable, C-contiguous view of at least ``data_len`` bytes."""
        ...

    def commit(self, manifest_json: bytes) -> None:
        """All data arrived and verified: make this the complete checkpoint."""
        ...

    def abort(self, reason: str) -> None:
        """The transfer failed; the buffer holds garbage and must not be used."""
        ...


class Handler(Protocol):
    """What a worker agent exposes to its peers. Called from one thread per
    connection, so implementations must be thread-safe."""

    def begin_put(self, source: int, step: int, data_len: int, manifest_len: int) -> PutTarget:
        """Reserve a slot for ``source``'s checkpoint of ``step``; raise to refuse."""
        ...

    def get(self, source: int, step: int | None) -> tuple[bytes, memoryview] | None:
        """The (manifest, data) of a complete checkpoint (newest when ``step`` is
        None), or None. The view must stay unchanged until the send finishes;
        a concurrent overwrite shows up as a checksum error at the receiver."""
        ...

    def list(self) -> dict[Any, Any]:
        """A JSON-able inventory, e.g. ``{source: [steps]}``. JSON turns integer
        keys into strings on the client side."""
        ...


# --------------------------------------------------------------------------
# Frame helpers. Public so that tests (and tools) can speak the protocol from
# a raw socket without a second implementation of it.
# --------------------------------------------------------------------------


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
        sock.sendall(header, _MSG_MORE)
        sock.sendall(view)


def _send_json(sock: socket.socket, ftype: int, obj: dict[str, Any]) -> None:
    send_frame(sock, ftype, json.dumps(obj, separators=(",", ":")).encode())


def _send_error(sock: socket.socket, message: str) -> None:
    _send_json(sock, FrameType.ERROR, {"error": message[:4096]})


def _recv_exact_into(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view`` from the socket; returns fewer bytes only if the peer closed."""
    got, want = 0, view.nbytes
    while got < want:
        n = sock.recv_into(view[got:], want - got)
        if n == 0:
            break
        got += n
    return got


def _recv_header(
    sock: socket.socket, buf: bytearray, *, eof_ok: bool = False
) -> tuple[FrameType, int, int] | None:
    """Read and validate one header; returns (type, length, checksum).

    Returns None only when ``eof_ok`` and the peer closed cleanly before the
    first byte (the normal end of a connection between requests).
    """
    got = _recv_exact_into(sock, memoryview(buf))
    if got < HEADER.size:
        if got == 0 and eof_ok:
            return None
        raise (_PeerClosed if got == 0 else TransportError)(
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
    if ftype in _AUTH_FRAMES:
        return max(NONCE_BYTES, _MAC_BYTES)
    if ftype == FrameType.MANIFEST:
        return MAX_MANIFEST_BYTES
    if ftype == FrameType.DATA:
        return MAX_CHUNK_BYTES
    return MAX_CONTROL_BYTES


def _recv_payload(sock: socket.socket, ftype: FrameType, length: int, csum: int) -> bytes:
    payload = bytearray(length)
    got = _recv_exact_into(sock, memoryview(payload))
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
    header = _recv_header(sock, bytearray(HEADER.size))
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
    return ftype, _recv_payload(sock, ftype, length, csum)


def _error_text(payload: bytes) -> str:
    try:
        obj = json.loads(payload)
        return str(obj["error"]) if isinstance(obj, dict) and "error" in obj else repr(obj)[:200]
    except (ValueError, UnicodeDecodeError):
        return f"unreadable ERROR frame of {len(payload)} bytes"


def _parse_json(ftype: FrameType, payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise TransportError(f"bad {ftype.name} frame: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise TransportError(f"bad {ftype.name} frame: expected a JSON object")
    return obj


def _int_field(ftype: FrameType, obj: dict[str, Any], key: str, *, maximum: int = 1 << 62) -> int:
    value = obj.get(key)
    # bool is an int subclass; `true` is not a step number.
    if type(value) is not int or not 0 <= value <= maximum:
        raise TransportError(
            f"bad {ftype.name} frame: {key!r} must be an integer in [0, {maximum}], got {value!r}"
        )
    return value


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes | bytearray) or len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"secret must be bytes of at least {MIN_SECRET_BYTES} bytes "
            "(e.g. secrets.token_bytes(32) shared by the run)"
        )


def auth_mac(secret: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """HMAC-SHA256 proof for ``role`` (b"client" or b"server").

    The role label keeps one side's proof from being reflected back as the
    other's; both nonces make every proof fresh for this connection.
    """
    msg = _AUTH_LABEL + role + b" " + client_nonce + server_nonce
    return hmac.new(secret, msg, hashlib.sha256).digest()


def client_handshake(sock: socket.socket, secret: bytes) -> None:
    """Prove the run secret to the server and check that it proves it back."""
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    send_frame(sock, FrameType.HELLO, client_nonce)
    ftype, server_nonce = recv_frame(sock, {FrameType.CHALLENGE})
    if ftype == FrameType.ERROR:
        raise TransportError(
            f"auth failed: server refused the handshake: {_error_text(server_nonce)}"
        )
    if len(server_nonce) != NONCE_BYTES:
        raise TransportError(f"auth failed: server nonce of {len(server_nonce)} bytes")
    send_frame(sock, FrameType.PROOF, auth_mac(secret, b"client", client_nonce, server_nonce))
    ftype, proof = recv_frame(sock, {FrameType.AUTH_OK})
    if ftype == FrameType.ERROR:
        raise TransportError(
            f"auth failed: server refused our proof ({_error_text(proof)}; wrong run secret?)"
        )
    expected = auth_mac(secret, b"server", client_nonce, server_nonce)
    if not hmac.compare_digest(proof, expected):
        raise TransportError("auth failed: server did not prove the run secret")


def server_handshake(sock: socket.socket, secret: bytes) -> None:
    """Check the client's proof of the run secret, then prove it back."""
    # No ERROR frames from an unauthenticated peer: only 32-byte frames are
    # read before it proves the secret.
    _, client_nonce = recv_frame(sock, {FrameType.HELLO}, accept_error=False)
    if len(client_nonce) != NONCE_BYTES:
        raise TransportError(f"auth failed: client nonce of {len(client_nonce)} bytes")
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    send_frame(sock, FrameType.CHALLENGE, server_nonce)
    _, proof = recv_frame(sock, {FrameType.PROOF}, accept_error=False)
    expected = auth_mac(secret, b"client", client_nonce, server_nonce)
    if not hmac.compare_digest(proof, expected):
        # Tell the peer why before hanging up; its error then names the cause.
        with contextlib.suppress(OSError):
            _send_error(sock, "auth failed")
        raise TransportError("auth failed: client did not prove the run secret")
    send_frame(sock, FrameType.AUTH_OK, auth_mac(secret, b"server", client_nonce, server_nonce))


def _byte_view(buf: Any, *, writable: bool, what: str) -> memoryview:
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


def _set_timeout(sock: socket.socket, seconds: float | None) -> None:
    """Bound how long one send or receive may block without progress.

    Kernel-side SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket, not
    ``settimeout``: Python implements the latter with a poll() before every
    recv/send, which costs measurable CPU at GB/s. A timeout then surfaces as
    BlockingIOError (see ``_TIMEOUTS``).
    """
    sock.settimeout(None)
    usec = 0 if seconds is None else max(1, round(seconds * 1e6))
    timeval = struct.pack("ll", usec // 1_000_000, usec % 1_000_000)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except OSError:  # a platform without them: fall back to Python's timeout
        sock.settimeout(seconds)


def _tune(sock: socket.socket) -> None:
    # Frames are sent whole; Nagle would only delay the small control replies.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, opt) < _SOCKET_BUFFER_BYTES:
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER_BYTES)
        except OSError:
            pass


def _send_data(
    sock: socket.socket, view: memoryview, chunk_bytes: int, progress: list[int]
) -> None:
    """Send ``view`` as DATA frames; ``progress[0]`` tracks bytes handed to the kernel."""
    total = view.nbytes
    for off in range(0, total, chunk_bytes):
        part = view[off : off + chunk_bytes]
        sock.sendall(pack_header(FrameType.DATA, part.nbytes, checksum(part)), _MSG_MORE)
        sock.sendall(part)
        progress[0] = off + part.nbytes


def _recv_data(
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
        header = _recv_header(sock, header_buf)
        assert header is not None
        ftype, length, csum = header
        if ftype != FrameType.DATA:
            if ftype == FrameType.ERROR:
                raise TransportError(
                    f"peer aborted the transfer: {_error_text(_recv_small(sock, length, csum))}"
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


def _recv_small(sock: socket.socket, length: int, csum: int) -> bytes:
    if length > MAX_CONTROL_BYTES:
        raise TransportError(f"ERROR frame of {length} bytes exceeds the control limit")
    return _recv_payload(sock, FrameType.ERROR, length, csum)


def _what(source: int, step: int | None) -> str:
    return f"source {source} step {'newest' if step is None else step}"


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


class TransportServer:
    """Serves puts, gets and lists of checkpoints to authenticated peers.

    One background thread accepts; each connection gets its own thread (a node
    talks to a handful of peers). Anything a peer does wrong (bad secret,
    garbled or truncated frames, a bad checksum, stalling past
    ``io_timeout_s``) ends that connection or that transfer only, with one
    logged line; the server keeps serving everyone else.

    The port is bound at construction, so :attr:`port` is valid before
    :meth:`start` (pass ``port=0`` for an ephemeral one).
    """

    def __init__(
        self,
        secret: bytes,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        io_timeout_s: float = 30.0,
        handshake_timeout_s: float = 5.0,
        idle_timeout_s: float | None = 300.0,
        max_connections: int = 64,
        max_manifest_bytes: int = MAX_MANIFEST_BYTES,
        send_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        """
        Args:
            io_timeout_s: longest a peer may stall inside a transfer before
                its connection is dropped.
            handshake_timeout_s: longest a peer may take, from accept, to
                prove the run secret; until then it holds a connection slot.
            idle_timeout_s: longest an authenticated connection may sit idle
                between requests (None: until the peer or :meth:`close` ends
                it). Trainers reuse one connection per holder for every step
                and reconnect once when they find it closed.
            max_connections: connections beyond this are closed on accept, so
                a misbehaving peer cannot exhaust threads. At most half of
                them may be still unauthenticated; when they are all taken the
                oldest is hung up on for the newcomer, so peers that flood the
                port without the secret cannot keep one that has it out.
            max_manifest_bytes: largest manifest a put may announce.
            send_chunk_bytes: DATA frame size used when answering gets.
        """
        _check_secret(secret)
        for name, value in (
            ("io_timeout_s", io_timeout_s),
            ("handshake_timeout_s", handshake_timeout_s),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self._secret = bytes(secret)
        self._handler = handler
        self._io_timeout_s = io_timeout_s
        self._handshake_timeout_s = handshake_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._max_connections = max_connections
        self._max_unauthenticated = max(1, max_connections // 2)
        # Connections still in the handshake, with their deadline; the accept
        # loop hangs up on those past it (it wakes at least every _TICK_S).
        self._pending: dict[socket.socket, float] = {}
        # Connections the server hung up on, and why (for the one log line).
        self._hung_up: dict[socket.socket, str] = {}
        self._max_manifest_bytes = max_manifest_bytes
        self._send_chunk_bytes = max(1, min(send_chunk_bytes, MAX_CHUNK_BYTES))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        # Every connection thread not yet joined: one that already left
        # _conns may still be running its last lines when close() is called.
        self._threads: set[threading.Thread] = set()
        self._accept_thread: threading.Thread | None = None
        self._listener = socket.create_server((host, port), backlog=64)
        # Set before accept so connections inherit the buffers and the window
        # scale negotiated in the handshake can use them.
        _tune(self._listener)
        # Fallback wake-up for the accept loop where shutdown() does not
        # interrupt accept(); on Linux close() is immediate.
        self._listener.settimeout(_TICK_S)
        self.host: str = host
        self.port: int = self._listener.getsockname()[1]

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> TransportServer:
        if self._stop.is_set():
            raise RuntimeError("TransportServer was closed; create a new one")
        if self._accept_thread is None:
            self._accept_thread = threading.Thread(
                target=self._accept_loop, name=f"gemini-transport-accept-{self.port}", daemon=True
            )
            self._accept_thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, end every connection, join all threads. Idempotent."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            threads = list(self._threads)
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self._accept_thread is not None:
            threads.append(self._accept_thread)
        deadline = time.monotonic() + timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning(
                    "transport server %d: thread %s did not stop within %.1fs",
                    self.port,
                    t.name,
                    timeout_s,
                )

    def __enter__(self) -> TransportServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            self._reap_handshakes()
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stop.is_set():
                    break
                # EMFILE and friends: back off rather than spin.
                log.warning("transport server %d: accept failed: %s", self.port, e)
                time.sleep(0.1)
                continue
            with self._lock:
                why = (
                    "closing"
                    if self._stop.is_set()
                    else "too many connections"
                    if len(self._conns) >= self._max_connections
                    else None
                )
                if why is not None:
                    log.warning(
                        "transport server %d: refusing connection from %s:%s (%s)",
                        self.port,
                        peer[0],
                        peer[1],
                        why,
                    )
                    conn.close()
                    continue
                if len(self._pending) >= self._max_unauthenticated:
                    oldest = min(self._pending, key=self._pending.__getitem__)
                    self._hang_up(oldest, "still unauthenticated when a newer peer needed the slot")
                self._pending[conn] = time.monotonic() + self._handshake_timeout_s
                thread = threading.Thread(
                    target=self._serve,
                    args=(conn, f"{peer[0]}:{peer[1]}"),
                    name=f"gemini-transport-conn-{self.port}-{peer[1]}",
                    daemon=True,
                )
                self._conns[conn] = thread
                self._threads = {t for t in self._threads if t.is_alive()}
                self._threads.add(thread)
            thread.start()

    def _reap_handshakes(self) -> None:
        """Hang up on connections that have not proved the secret in time."""
        now = time.monotonic()
        with self._lock:
            late = [c for c, deadline in self._pending.items() if now >= deadline]
            for conn in late:
                self._hang_up(conn, f"no authentication within {self._handshake_timeout_s:.1f}s")

    def _hang_up(self, conn: socket.socket, why: str) -> None:
        """End an unauthenticated connection (caller holds the lock)."""
        del self._pending[conn]
        self._hung_up[conn] = why
        # The serving thread's blocked recv returns; it closes the socket.
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)

    def _serve(self, conn: socket.socket, peer: str) -> None:
        idle = False
        try:
            _tune(conn)
            _set_timeout(conn, min(self._io_timeout_s, self._handshake_timeout_s))
            server_handshake(conn, self._secret)
            with self._lock:
                if self._pending.pop(conn, None) is None:  # reaped meanwhile
                    raise TransportError("handshake not finished in time")
            header_buf = bytearray(HEADER.size)
            while not self._stop.is_set():
                idle = True
                _set_timeout(conn, self._idle_timeout_s)
                header = _recv_header(conn, header_buf, eof_ok=True)
                idle = False
                if header is None:
                    break
                _set_timeout(conn, self._io_timeout_s)
                ftype, length, csum = header
                if ftype not in (FrameType.PUT_BEGIN, FrameType.GET, FrameType.LIST):
                    raise TransportError(f"unexpected {ftype.name} frame between requests")
                if length > MAX_CONTROL_BYTES:
                    raise TransportError(
                        f"{ftype.name} frame of {length} bytes exceeds the control limit"
                    )
                payload = _recv_payload(conn, ftype, length, csum)
                if ftype == FrameType.PUT_BEGIN:
                    self._serve_put(conn, _parse_json(ftype, payload), header_buf)
                elif ftype == FrameType.GET:
                    self._serve_get(conn, _parse_json(ftype, payload))
                else:
                    self._serve_list(conn)
        except (TransportError, OSError, *_TIMEOUTS) as e:
            self._log_end(conn, peer, e, idle)
        except Exception:
            # A bug here (or in the handler) must cost one connection, not the agent.
            log.exception("transport server %d: unexpected error serving %s", self.port, peer)
        finally:
            with self._lock:
                self._conns.pop(conn, None)
                self._pending.pop(conn, None)
                self._hung_up.pop(conn, None)
            conn.close()

    def _log_end(self, conn: socket.socket, peer: str, e: BaseException, idle: bool) -> None:
        """One line on why a connection ended (nothing when the server is closing)."""
        with self._lock:
            why = self._hung_up.get(conn)
            if why is None and conn in self._pending and isinstance(e, _TIMEOUTS):
                why = f"no authentication within {self._handshake_timeout_s:.1f}s"
        if why is not None:
            log.warning("transport server %d: closing connection from %s: %s", self.port, peer, why)
        elif idle and isinstance(e, _TIMEOUTS):
            log.info(
                "transport server %d: closing connection from %s: idle for %.0fs",
                self.port,
                peer,
                self._idle_timeout_s or 0.0,
            )
        elif isinstance(e, _TIMEOUTS):
            log.warning(
                "transport server %d: closing connection from %s: no progress within the "
                "timeout (io %.1fs, idle %s)",
                self.port,
                peer,
                self._io_timeout_s,
                self._idle_timeout_s,
            )
        elif not self._stop.is_set():
            log.warning("transport server %d: closing connection from %s: %s", self.port, peer, e)

    def _serve_put(self, conn: socket.socket, req: dict[str, Any], header_buf: bytearray) -> None:
        ft = FrameType.PUT_BEGIN
        source = _int_field(ft, req, "source")
        step = _int_field(ft, req, "step")
        data_len = _int_field(ft, req, "data_len")
        manifest_len = _int_field(ft, req, "manifest_len")
        what = _what(source, step)
        if manifest_len > self._max_manifest_bytes:
            _send_error(
                conn,
                f"manifest of {manifest_len} bytes exceeds the "
                f"{self._max_manifest_bytes}-byte limit",
            )
            return
        try:
            target = self._handler.begin_put(source, step, data_len, manifest_len)
        except Exception as e:
            _send_error(conn, f"refused by the holder: {e}")
            return
        done = False

        def abort(reason: str) -> None:
            nonlocal done
            done = True
            try:
                target.abort(reason)
            except Exception:
                log.exception("transport server %d: abort of %s raised", self.port, what)

        try:
            try:
                dest = _byte_view(target.buffer(), writable=True, what="PutTarget.buffer()")
                if dest.nbytes < data_len:
                    raise ValueError(f"slot holds {dest.nbytes} bytes, put needs {data_len}")
            except Exception as e:
                reason = f"holder's slot unusable: {e}"
                abort(reason)
                _send_error(conn, reason)
                return
            send_frame(conn, FrameType.READY)
            # From here the client streams without waiting, so every error
            # below either drains the stream or ends the connection.
            progress = [0]
            try:
                ftype, manifest = recv_frame(conn, {FrameType.MANIFEST}, max_len=manifest_len)
                if ftype == FrameType.ERROR:
                    raise TransportError(f"peer aborted the transfer: {_error_text(manifest)}")
                if len(manifest) != manifest_len:
                    raise TransportError(
                        f"manifest of {len(manifest)} bytes, announced {manifest_len}"
                    )
                bad = _recv_data(conn, dest[:data_len], header_buf, progress)
            except _TIMEOUTS:
                raise TransportError(
                    f"put of {what} failed: peer stalled for {self._io_timeout_s}s mid-transfer "
                    f"after {progress[0]} of {data_len} bytes"
                ) from None
            except OSError as e:  # reset by a crashed peer, typically
                raise TransportError(
                    f"put of {what} failed: peer closed mid-transfer after {progress[0]} of "
                    f"{data_len} bytes ({e.strerror or e})"
                ) from None
            except TransportError as e:
                raise TransportError(f"put of {what} failed: {e}") from None
            if bad is not None:
                reason = f"checksum mismatch in chunk {bad} of {what}"
                abort(reason)
                log.warning("transport server %d: %s", self.port, reason)
                _send_error(conn, reason)
                return
            try:
                target.commit(manifest)
                done = True
            except Exception as e:
                reason = f"commit failed: {e}"
                abort(reason)
                _send_error(conn, reason)
                return
            _send_json(conn, FrameType.ACK, {"source": source, "step": step, "bytes": data_len})
        except BaseException as e:
            if not done:
                abort(str(e) if isinstance(e, TransportError) else f"put of {what} failed: {e}")
            raise

    def _serve_get(self, conn: socket.socket, req: dict[str, Any]) -> None:
        ft = FrameType.GET
        source = _int_field(ft, req, "source")
        step = None if req.get("step") is None else _int_field(ft, req, "step")
        chunk_bytes = self._send_chunk_bytes
        if req.get("chunk_bytes") is not None:
            chunk_bytes = max(64 << 10, _int_field(ft, req, "chunk_bytes", maximum=MAX_CHUNK_BYTES))
        what = _what(source, step)
        try:
            found = self._handler.get(source, step)
            if found is None:
                _send_error(conn, f"no checkpoint of {what} here")
                return
            manifest, data = found
            view = _byte_view(data, writable=False, what="Handler.get() data")
            manifest = bytes(manifest)
            if len(manifest) > MAX_MANIFEST_BYTES:
                raise ValueError(f"manifest of {len(manifest)} bytes exceeds the wire limit")
        except Exception as e:
            _send_error(conn, f"holder failed: {e}")
            return
        _send_json(
            conn,
            FrameType.GET_BEGIN,
            {"source": source, "data_len": view.nbytes, "manifest_len": len(manifest)},
        )
        send_frame(conn, FrameType.MANIFEST, manifest)
        _send_data(conn, view, chunk_bytes, [0])

    def _serve_list(self, conn: socket.socket) -> None:
        try:
            body = json.dumps(self._handler.list(), separators=(",", ":")).encode()
            if len(body) > MAX_CONTROL_BYTES:
                raise ValueError(f"inventory of {len(body)} bytes exceeds the control limit")
        except Exception as e:
            _send_error(conn, f"holder failed: {e}")
            return
        send_frame(conn, FrameType.LIST_REPLY, body)


# --------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------


class TransportClient:
    """A trainer's connection to one holder. Not for concurrent use from
    several threads at once (calls are serialised by a lock).

    The connection is opened on first use and reused for every later call, so
    per-step replication pays the handshake once. After a failure that leaves
    the stream out of step it is dropped and the next call reconnects. A
    reused connection the server has closed meanwhile (its idle timeout, a
    restart) is replaced transparently, once: the request is sent again only
    when the server provably never answered it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes,
        timeout_s: float = 30.0,
        *,
        max_data_bytes: int = 1 << 40,
    ) -> None:
        """
        Args:
            timeout_s: longest any single socket operation may block
                (connect, a send, a receive); not a bound on a whole transfer.
            max_data_bytes: largest checkpoint :meth:`get` will allocate for
                when no ``into`` buffer is given.
        """
        _check_secret(secret)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.host, self.port = host, port
        self._secret = bytes(secret)
        self._timeout_s = timeout_s
        self._max_data_bytes = max_data_bytes
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._header_buf = bytearray(HEADER.size)
        # Frames received in the current exchange: 0 means the server never
        # answered, so the request may be sent again on a fresh connection.
        self._replies = 0

    def __enter__(self) -> TransportClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def connect(self) -> None:
        """Open and authenticate the connection now rather than on first use."""
        with self._lock:
            self._ensure_connected()

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _open(self) -> socket.socket:
        err: OSError | None = None
        for family, kind, proto, _, addr in socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        ):
            sock = socket.socket(family, kind, proto)
            try:
                _tune(sock)  # before connect, so the window scale can use the buffers
                sock.settimeout(self._timeout_s)
                sock.connect(addr)
                _set_timeout(sock, self._timeout_s)
                return sock
            except OSError as e:
                sock.close()
                err = e
        raise TransportError(f"cannot connect to {self.host}:{self.port}: {err}")

    def _ensure_connected(self) -> socket.socket:
        if self._sock is not None and not self._peer_gone(self._sock):
            return self._sock
        self._drop()
        sock = self._open()
        try:
            client_handshake(sock, self._secret)
        except _TIMEOUTS:
            sock.close()
            raise TransportError(
                f"auth failed: {self.host}:{self.port} did not answer the "
                f"handshake within {self._timeout_s}s"
            ) from None
        except (TransportError, OSError) as e:
            sock.close()
            msg = str(e) if isinstance(e, TransportError) else f"auth failed: {e}"
            raise TransportError(f"{msg} ({self.host}:{self.port})") from None
        self._sock = sock
        return sock

    @staticmethod
    def _peer_gone(sock: socket.socket) -> bool:
        """True if a reused connection was closed by the server (restart, idle
        timeout) or holds unexpected bytes, so a request would fail."""
        try:
            # Blocking socket (see _set_timeout), so MSG_DONTWAIT returns at once.
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True  # b"" (peer closed) or stray bytes: either way start afresh

    def _recv(
        self, sock: socket.socket, expect: set[FrameType], max_len: int | None = None
    ) -> tuple[FrameType, bytes]:
        """``recv_frame``, counting replies (see ``_exchange``)."""
        frame = recv_frame(sock, expect, max_len)
        self._replies += 1
        return frame

    def _exchange(self, what: str, fn: Callable[[socket.socket], _T]) -> _T:
        with self._lock:
            reused = self._sock is not None
            sock = self._ensure_connected()
            reused = reused and sock is self._sock
            self._replies = 0
            try:
                return fn(sock)
            except (_PeerClosed, ConnectionResetError, BrokenPipeError) as e:
                if not (reused and self._replies == 0):
                    return self._fail(what, e)
                # Closed while idle (the server's idle timeout raced our
                # check): nothing was answered, so nothing was done. Once more.
                self._drop()
                return self._attempt(what, fn)
            except BaseException as e:
                return self._fail(what, e)

    def _attempt(self, what: str, fn: Callable[[socket.socket], _T]) -> _T:
        sock = self._ensure_connected()
        self._replies = 0
        try:
            return fn(sock)
        except BaseException as e:
            return self._fail(what, e)

    def _fail(self, what: str, e: BaseException) -> NoReturn:
        """Raise ``e`` as the caller should see it, dropping a connection out of step."""
        if isinstance(e, _Refused):
            raise e  # the peer said no at a point where the stream is in step
        # Anything else (KeyboardInterrupt mid-transfer included) leaves the
        # stream out of step.
        self._drop()
        where = f"{what} with {self.host}:{self.port}"
        if isinstance(e, TransportError):
            raise TransportError(f"{where}: {e}") from None
        if isinstance(e, _TIMEOUTS):
            raise TransportError(f"{where}: no progress for {self._timeout_s}s") from None
        if isinstance(e, OSError):
            raise TransportError(f"{where}: {e}") from None
        raise e

    def _refused(self, what: str, payload: bytes) -> _Refused:
        return _Refused(f"{what} failed at {self.host}:{self.port}: {_error_text(payload)}")

    def put(
        self,
        source: int,
        step: int,
        manifest_json: bytes,
        data: Any,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> float:
        """Replicate one checkpoint; returns seconds from request to the
        holder's acknowledgement, which it sends only after verifying every
        chunk and committing. ``data`` is any C-contiguous buffer (sent in
        place)."""
        view = _byte_view(data, writable=False, what="data")
        manifest = bytes(manifest_json)
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
        what = f"put of {_what(source, step)}"
        total = view.nbytes

        def run(sock: socket.socket) -> float:
            t0 = time.perf_counter()
            _send_json(
                sock,
                FrameType.PUT_BEGIN,
                {
                    "source": source,
                    "step": step,
                    "data_len": total,
                    "manifest_len": len(manifest),
                },
            )
            ftype, payload = self._recv(sock, {FrameType.READY})
            if ftype == FrameType.ERROR:
                raise self._refused(what, payload)
            progress = [0]
            try:
                send_frame(sock, FrameType.MANIFEST, manifest)
                _send_data(sock, view, chunk_bytes, progress)
            except _TIMEOUTS:
                raise TransportError(
                    f"peer stalled for {self._timeout_s}s mid-transfer after "
                    f"{progress[0]} of {total} bytes"
                ) from None
            except OSError as e:
                raise TransportError(
                    f"peer closed mid-transfer after {progress[0]} of {total} bytes ({e})"
                ) from None
            ftype, payload = self._recv(sock, {FrameType.ACK})
            if ftype == FrameType.ERROR:
                raise self._refused(what, payload)
            return time.perf_counter() - t0

        return self._exchange(what, run)

    def get(
        self,
        source: int,
        step: int | None = None,
        into: Any = None,
        chunk_bytes: int | None = None,
    ) -> tuple[bytes, memoryview | bytearray]:
        """Fetch a complete checkpoint (the newest when ``step`` is None).

        Returns (manifest_json, data). With ``into`` (a writable buffer at least
        as large as the checkpoint) the data is received straight into it and
        returned as a view of its first ``data_len`` bytes; otherwise into a new
        bytearray. Every chunk's checksum is verified; on any failure ``into``
        holds garbage.
        """
        dest_buf = None if into is None else _byte_view(into, writable=True, what="into")
        what = f"get of {_what(source, step)}"
        req: dict[str, Any] = {"source": source, "step": step}
        if chunk_bytes is not None:
            req["chunk_bytes"] = chunk_bytes

        def run(sock: socket.socket) -> tuple[bytes, memoryview | bytearray]:
            _send_json(sock, FrameType.GET, req)
            ftype, payload = self._recv(sock, {FrameType.GET_BEGIN})
            if ftype == FrameType.ERROR:
                raise self._refused(what, payload)
            info = _parse_json(FrameType.GET_BEGIN, payload)
            data_len = _int_field(FrameType.GET_BEGIN, info, "data_len")
            manifest_len = _int_field(
                FrameType.GET_BEGIN, info, "manifest_len", maximum=MAX_MANIFEST_BYTES
            )
            out: memoryview | bytearray
            if dest_buf is not None:
                if dest_buf.nbytes < data_len:
                    raise TransportError(
                        f"into holds {dest_buf.nbytes} bytes, the checkpoint needs {data_len}"
                    )
                out = dest_buf[:data_len]
                dest = out
            else:
                if data_len > self._max_data_bytes:
                    raise TransportError(
                        f"checkpoint of {data_len} bytes exceeds "
                        f"max_data_bytes={self._max_data_bytes}"
                    )
                out = bytearray(data_len)
                dest = memoryview(out)
            ftype, manifest = self._recv(sock, {FrameType.MANIFEST}, max_len=manifest_len)
            if ftype == FrameType.ERROR:
                raise TransportError(f"peer aborted the transfer: {_error_text(manifest)}")
            if len(manifest) != manifest_len:
                raise TransportError(f"manifest of {len(manifest)} bytes, announced {manifest_len}")
            progress = [0]
            try:
                bad = _recv_data(sock, dest, self._header_buf, progress)
            except _TIMEOUTS:
                raise TransportError(
                    f"peer stalled for {self._timeout_s}s mid-transfer after "
                    f"{progress[0]} of {data_len} bytes"
                ) from None
            except OSError as e:
                raise TransportError(
                    f"peer closed mid-transfer after {progress[0]} of {data_len} bytes "
                    f"({e.strerror or e})"
                ) from None
            if bad is not None:
                raise TransportError(f"checksum mismatch in chunk {bad} of {_what(source, step)}")
            return manifest, out

        return self._exchange(what, run)

    def list(self) -> dict[str, Any]:
        """The holder's inventory as JSON (integer keys arrive as strings)."""

        def run(sock: socket.socket) -> dict[str, Any]:
            send_frame(sock, FrameType.LIST)
            ftype, payload = self._recv(sock, {FrameType.LIST_REPLY})
            if ftype == FrameType.ERROR:
                raise self._refused("list", payload)
            return _parse_json(FrameType.LIST_REPLY, payload)

        return self._exchange("list", run)
