"""The holder's side: a server that accepts puts, gets and lists from authenticated peers.

What a holder does with the bytes lives behind :class:`Handler` and
:class:`PutTarget` (the node's shared-memory slots implement them). The server
bounds what any peer can cost it: a handshake deadline, at most half the
connection slots unauthenticated, an idle timeout, per-frame limits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from typing import Any, NoReturn, Protocol

from gemini.cluster.transport.handshake import check_secret, server_handshake
from gemini.cluster.transport.ranges import RangeReceiver, StagingPool
from gemini.cluster.transport.wire import (
    DEFAULT_CHUNK_BYTES,
    DIGEST,
    HEADER,
    MAX_CHUNK_BYTES,
    MAX_CONTROL_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SUBBUFFERS,
    RANGE_PREFIX,
    TIMEOUTS,
    FrameType,
    TransportError,
    byte_view,
    checksum,
    error_text,
    grid_chunks,
    int_field,
    parse_json,
    recv_data,
    recv_exact_into,
    recv_frame,
    recv_header,
    recv_payload,
    recv_small,
    send_data,
    send_error,
    send_frame,
    send_json,
    set_timeout,
    source_step,
    tune,
    unpack_digests,
)

log = logging.getLogger("gemini.cluster.transport")

# How often the server's accept loop wakes to hang up on late handshakes.
_TICK_S = 0.25
# After refusing a misbehaving put, how long to keep reading (and dropping)
# what the sender still streams, so that the refusal reaches it before the
# close: closing with unread bytes would reset the connection and could
# discard the ERROR frame on its way.
_LINGER_S = 1.0
#: Default cap on the staging buffers one ranged put may ask a holder for.
DEFAULT_MAX_STAGING_BYTES = 256 << 20


class _PutRefused(TransportError):
    """A put the holder refused mid-stream (bad range, bad frame): the sender
    has been told why; the connection is out of step and is closed."""


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


class _Reserved:
    """A slot a put is landing in: ended at most once, by a commit or an abort."""

    def __init__(self, target: PutTarget, port: int, what: str) -> None:
        self.target, self.port, self.what = target, port, what
        self.done = False

    def abort(self, reason: str) -> None:
        self.done = True
        try:
            self.target.abort(reason)
        except Exception:
            log.exception("transport server %d: abort of %s raised", self.port, self.what)


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
        max_staging_bytes: int = DEFAULT_MAX_STAGING_BYTES,
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
            max_staging_bytes: most staging memory (all sub-buffers together)
                one connection's put in ranges may ask for; 0 allows only
                puts received straight into the slot.
        """
        check_secret(secret)
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
        # Connections with a put under way (a slot reserved), and what it is:
        # abort_puts() ends them when their sender's generation is over.
        self._putting: dict[socket.socket, str] = {}
        self._max_manifest_bytes = max_manifest_bytes
        self._send_chunk_bytes = max(1, min(send_chunk_bytes, MAX_CHUNK_BYTES))
        self._max_staging_bytes = max_staging_bytes
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
        tune(self._listener)
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

    def abort_puts(self, why: str, timeout_s: float = 5.0) -> list[str]:
        """End every put under way, each with its connection, and wait until their
        targets are aborted; returns what they were (``source S step N``).

        For the holder's agent when a generation ends: a sender cut off by a
        partition never closes its connection (no reset crosses a link that is
        down), so its put would keep the source's slot reserved until the io
        timeout, longer than a new generation's trainer may wait to put the
        same source. Idle connections are left alone (a client that finds its
        connection closed reconnects once, but need not).
        """
        with self._lock:
            ended = dict(self._putting)
            threads = [self._conns[c] for c in ended if c in self._conns]
            for conn in ended:
                self._hung_up[conn] = why
                # The serving thread's blocked recv returns: it aborts the
                # target and closes the socket.
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return sorted(ended.values())

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
            tune(conn)
            set_timeout(conn, min(self._io_timeout_s, self._handshake_timeout_s))
            server_handshake(conn, self._secret)
            with self._lock:
                if self._pending.pop(conn, None) is None:  # reaped meanwhile
                    raise TransportError("handshake not finished in time")
            header_buf = bytearray(HEADER.size)
            staging = StagingPool()
            while not self._stop.is_set():
                idle = True
                set_timeout(conn, self._idle_timeout_s)
                header = recv_header(conn, header_buf, eof_ok=True)
                idle = False
                if header is None:
                    break
                set_timeout(conn, self._io_timeout_s)
                ftype, length, csum = header
                if ftype not in (
                    FrameType.PUT_OPEN,
                    FrameType.PUT_BEGIN,
                    FrameType.GET,
                    FrameType.LIST,
                ):
                    raise TransportError(f"unexpected {ftype.name} frame between requests")
                if length > MAX_CONTROL_BYTES:
                    raise TransportError(
                        f"{ftype.name} frame of {length} bytes exceeds the control limit"
                    )
                payload = recv_payload(conn, ftype, length, csum)
                if ftype in (FrameType.PUT_OPEN, FrameType.PUT_BEGIN):
                    try:
                        if ftype == FrameType.PUT_OPEN:
                            self._serve_put_ranges(
                                conn, parse_json(ftype, payload), header_buf, staging
                            )
                        else:
                            self._serve_put(conn, parse_json(ftype, payload), header_buf)
                    finally:
                        with self._lock:
                            self._putting.pop(conn, None)
                elif ftype == FrameType.GET:
                    self._serve_get(conn, parse_json(ftype, payload))
                else:
                    self._serve_list(conn)
        except (TransportError, OSError, *TIMEOUTS) as e:
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
            if why is None and conn in self._pending and isinstance(e, TIMEOUTS):
                why = f"no authentication within {self._handshake_timeout_s:.1f}s"
        if why is not None:
            log.warning("transport server %d: closing connection from %s: %s", self.port, peer, why)
        elif idle and isinstance(e, TIMEOUTS):
            log.info(
                "transport server %d: closing connection from %s: idle for %.0fs",
                self.port,
                peer,
                self._idle_timeout_s or 0.0,
            )
        elif isinstance(e, TIMEOUTS):
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

    def _reserve(
        self,
        conn: socket.socket,
        source: int,
        step: int,
        data_len: int,
        manifest_len: int,
        what: str,
    ) -> _Reserved | None:
        """The holder's slot for one put, or None once the sender has been told why not."""
        try:
            target = self._handler.begin_put(source, step, data_len, manifest_len)
        except Exception as e:
            send_error(conn, f"refused by the holder: {e}")
            return None
        with self._lock:
            self._putting[conn] = what
        return _Reserved(target, self.port, what)

    def _conclude(
        self,
        conn: socket.socket,
        reserved: _Reserved,
        mismatch: str | None,
        manifest: bytes,
        ack: dict[str, Any],
    ) -> None:
        """End a fully received put: abort on a checksum ``mismatch``, else commit and
        acknowledge; the sender hears why either way."""
        if mismatch is not None:
            reserved.abort(mismatch)
            log.warning("transport server %d: %s", self.port, mismatch)
            send_error(conn, mismatch)
            return
        try:
            reserved.target.commit(manifest)
            reserved.done = True
        except Exception as e:
            reason = f"commit failed: {e}"
            reserved.abort(reason)
            send_error(conn, reason)
            return
        send_json(conn, FrameType.ACK, ack)

    def _serve_put(self, conn: socket.socket, req: dict[str, Any], header_buf: bytearray) -> None:
        ft = FrameType.PUT_BEGIN
        source = int_field(ft, req, "source")
        step = int_field(ft, req, "step")
        data_len = int_field(ft, req, "data_len")
        manifest_len = int_field(ft, req, "manifest_len")
        what = source_step(source, step)
        if manifest_len > self._max_manifest_bytes:
            send_error(
                conn,
                f"manifest of {manifest_len} bytes exceeds the "
                f"{self._max_manifest_bytes}-byte limit",
            )
            return
        reserved = self._reserve(conn, source, step, data_len, manifest_len, what)
        if reserved is None:
            return
        target, abort = reserved.target, reserved.abort

        try:
            try:
                dest = byte_view(target.buffer(), writable=True, what="PutTarget.buffer()")
                if dest.nbytes < data_len:
                    raise ValueError(f"slot holds {dest.nbytes} bytes, put needs {data_len}")
            except Exception as e:
                reason = f"holder's slot unusable: {e}"
                abort(reason)
                send_error(conn, reason)
                return
            send_frame(conn, FrameType.READY)
            # From here the client streams without waiting, so every error
            # below either drains the stream or ends the connection.
            progress = [0]
            try:
                ftype, manifest = recv_frame(conn, {FrameType.MANIFEST}, max_len=manifest_len)
                if ftype == FrameType.ERROR:
                    raise TransportError(f"peer aborted the transfer: {error_text(manifest)}")
                if len(manifest) != manifest_len:
                    raise TransportError(
                        f"manifest of {len(manifest)} bytes, announced {manifest_len}"
                    )
                bad = recv_data(conn, dest[:data_len], header_buf, progress)
            except TIMEOUTS:
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
            mismatch = None if bad is None else f"checksum mismatch in chunk {bad} of {what}"
            self._conclude(
                conn,
                reserved,
                mismatch,
                manifest,
                {"source": source, "step": step, "bytes": data_len},
            )
        except BaseException as e:
            if not reserved.done:
                abort(str(e) if isinstance(e, TransportError) else f"put of {what} failed: {e}")
            raise

    def _serve_put_ranges(
        self,
        conn: socket.socket,
        req: dict[str, Any],
        header_buf: bytearray,
        staging: StagingPool,
    ) -> None:
        """A put in ranges (``PUT_OPEN``): the slot is complete only after ``FINISH``
        and a match of every digest; anything else aborts the target."""
        ft = FrameType.PUT_OPEN
        source = int_field(ft, req, "source")
        step = int_field(ft, req, "step")
        data_len = int_field(ft, req, "data_len")
        manifest_len = int_field(ft, req, "manifest_len")
        grid = int_field(ft, req, "checksum_bytes", maximum=1 << 40)
        subbuffers = int_field(ft, req, "subbuffers", maximum=MAX_SUBBUFFERS)
        staging_bytes = int_field(ft, req, "staging_bytes")
        what = source_step(source, step)
        # Refusals before READY keep the connection in step: the sender waits
        # for the answer before it sends anything else.
        problem = None
        if manifest_len > self._max_manifest_bytes:
            problem = (
                f"manifest of {manifest_len} bytes exceeds the "
                f"{self._max_manifest_bytes}-byte limit"
            )
        elif grid < 1 or subbuffers < 1:
            problem = f"checksum_bytes={grid} and subbuffers={subbuffers} must be >= 1"
        elif grid_chunks(data_len, grid) * DIGEST.size > MAX_CONTROL_BYTES:
            problem = f"{grid_chunks(data_len, grid)} digests of {grid}-byte chunks are too many"
        elif staging_bytes and not subbuffers <= staging_bytes <= self._max_staging_bytes:
            problem = (
                f"staging of {staging_bytes} bytes in {subbuffers} sub-buffers: this holder "
                f"stages at most {self._max_staging_bytes} bytes, at least 1 per sub-buffer"
            )
        if problem is not None:
            send_error(conn, f"refused by the holder: {problem}")
            return
        reserved = self._reserve(conn, source, step, data_len, manifest_len, what)
        if reserved is None:
            return
        target, abort = reserved.target, reserved.abort

        def refuse(reason: str) -> NoReturn:
            """Tell the sender why, abort, and end the (out of step) connection."""
            abort(reason)
            with contextlib.suppress(OSError, *TIMEOUTS):
                send_error(conn, reason)
                self._linger(conn)
            raise _PutRefused(reason)

        receiver: RangeReceiver | None = None
        try:
            try:
                dest = byte_view(target.buffer(), writable=True, what="PutTarget.buffer()")
                if dest.nbytes < data_len:
                    raise ValueError(f"slot holds {dest.nbytes} bytes, put needs {data_len}")
                bufs = None
                if staging_bytes:
                    bufs = staging.get(subbuffers, staging_bytes // subbuffers)
                receiver = RangeReceiver(
                    dest[:data_len],
                    grid,
                    subbuffers=subbuffers,
                    staging=bufs,
                    thread_name=f"gemini-transport-drain-{self.port}",
                )
            except Exception as e:
                reason = f"holder's slot unusable: {e}"
                abort(reason)
                send_error(conn, reason)
                return
            send_frame(conn, FrameType.READY)
            ftype, manifest = recv_frame(conn, {FrameType.MANIFEST}, max_len=manifest_len)
            if ftype == FrameType.ERROR:
                reason = f"put of {what} abandoned by the sender: {error_text(manifest)}"
                abort(reason)
                send_error(conn, reason)
                return
            if len(manifest) != manifest_len:
                refuse(f"manifest of {len(manifest)} bytes, announced {manifest_len}")
            prefix = bytearray(RANGE_PREFIX.size)
            sub_bytes = receiver.sub_bytes
            while True:
                header = recv_header(conn, header_buf)
                assert header is not None
                ftype, length, csum = header
                if ftype == FrameType.RANGE:
                    n = length - RANGE_PREFIX.size
                    if not 0 < n <= MAX_CHUNK_BYTES:
                        refuse(f"RANGE frame of {length} bytes in the put of {what}")
                    if recv_exact_into(conn, memoryview(prefix)) < RANGE_PREFIX.size:
                        raise TransportError("peer closed inside a RANGE frame's offset")
                    if checksum(prefix) != csum:
                        refuse(f"checksum mismatch in a RANGE frame's offset in the put of {what}")
                    (offset,) = RANGE_PREFIX.unpack(prefix)
                    if offset != receiver.received:
                        refuse(
                            f"range at offset {offset} in the put of {what}: the next range "
                            f"must start at {receiver.received} (ranges come in order, "
                            "without gaps or overlaps)"
                        )
                    if offset + n > data_len:
                        refuse(
                            f"range [{offset}, {offset + n}) overflows the {data_len}-byte "
                            f"put of {what}"
                        )
                    if sub_bytes is not None and n > sub_bytes:
                        refuse(
                            f"range of {n} bytes exceeds the {sub_bytes}-byte staging "
                            f"sub-buffer of the put of {what}"
                        )
                    receiver.receive(conn, offset, n)
                elif ftype == FrameType.FINISH:
                    want = grid_chunks(data_len, grid) * DIGEST.size
                    if length != want:
                        refuse(f"FINISH frame of {length} bytes, the put of {what} needs {want}")
                    theirs = unpack_digests(recv_payload(conn, ftype, length, csum))
                    break
                elif ftype == FrameType.ERROR:
                    text = error_text(recv_small(conn, length, csum))
                    reason = f"put of {what} abandoned by the sender: {text}"
                    abort(reason)
                    send_error(conn, reason)
                    return
                else:
                    refuse(
                        f"expected a RANGE or FINISH frame in the put of {what}, got {ftype.name}"
                    )
            # FINISH read whole: from here the connection stays in step.
            if receiver.received < data_len:
                reason = (
                    f"put of {what} finished after {receiver.received} of {data_len} bytes: "
                    "incomplete, not committed"
                )
                abort(reason)
                send_error(conn, reason)
                return
            ours = receiver.drained()
            pairs = enumerate(zip(ours, theirs, strict=True))
            bad = next((i for i, (a, b) in pairs if a != b), None)
            mismatch = None
            if bad is not None:
                start, end = receiver.hasher.chunk_span(bad)
                mismatch = f"checksum mismatch in chunk {bad} (bytes [{start}, {end})) of {what}"
            self._conclude(
                conn,
                reserved,
                mismatch,
                manifest,
                {"source": source, "step": step, "bytes": data_len},
            )
        except _PutRefused:
            raise
        except TIMEOUTS:
            got = 0 if receiver is None else receiver.received
            reason = (
                f"put of {what} failed: peer stalled for {self._io_timeout_s}s mid-put "
                f"after {got} of {data_len} bytes"
            )
            abort(reason)
            raise TransportError(reason) from None
        except (OSError, TransportError) as e:
            got = 0 if receiver is None else receiver.received
            detail = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
            reason = f"put of {what} failed after {got} of {data_len} bytes: {detail}"
            if not reserved.done:
                abort(reason)
            raise TransportError(reason) from None
        except BaseException as e:
            if not reserved.done:
                abort(f"put of {what} failed: {e}")
            raise
        finally:
            if receiver is not None:
                receiver.close()

    def _linger(self, conn: socket.socket) -> None:
        """Half-close, then drop whatever the peer still sends for a moment, so
        an ERROR frame just sent reaches it rather than being lost to a reset."""
        conn.shutdown(socket.SHUT_WR)
        set_timeout(conn, _LINGER_S)
        deadline = time.monotonic() + _LINGER_S
        sink = bytearray(1 << 16)
        while time.monotonic() < deadline and conn.recv_into(sink):
            pass

    def _serve_get(self, conn: socket.socket, req: dict[str, Any]) -> None:
        ft = FrameType.GET
        source = int_field(ft, req, "source")
        step = None if req.get("step") is None else int_field(ft, req, "step")
        chunk_bytes = self._send_chunk_bytes
        if req.get("chunk_bytes") is not None:
            chunk_bytes = max(64 << 10, int_field(ft, req, "chunk_bytes", maximum=MAX_CHUNK_BYTES))
        what = source_step(source, step)
        try:
            found = self._handler.get(source, step)
            if found is None:
                send_error(conn, f"no checkpoint of {what} here")
                return
            manifest, data = found
            view = byte_view(data, writable=False, what="Handler.get() data")
            manifest = bytes(manifest)
            if len(manifest) > MAX_MANIFEST_BYTES:
                raise ValueError(f"manifest of {len(manifest)} bytes exceeds the wire limit")
        except Exception as e:
            send_error(conn, f"holder failed: {e}")
            return
        send_json(
            conn,
            FrameType.GET_BEGIN,
            {"source": source, "data_len": view.nbytes, "manifest_len": len(manifest)},
        )
        send_frame(conn, FrameType.MANIFEST, manifest)
        send_data(conn, view, chunk_bytes, [0])

    def _serve_list(self, conn: socket.socket) -> None:
        try:
            body = json.dumps(self._handler.list(), separators=(",", ":")).encode()
            if len(body) > MAX_CONTROL_BYTES:
                raise ValueError(f"inventory of {len(body)} bytes exceeds the control limit")
        except Exception as e:
            send_error(conn, f"holder failed: {e}")
            return
        send_frame(conn, FrameType.LIST_REPLY, body)
