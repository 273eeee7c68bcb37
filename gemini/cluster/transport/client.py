"""The trainer's side: one reused, authenticated connection to one holder."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from gemini.cluster.transport.handshake import check_secret, client_handshake
from gemini.cluster.transport.wire import (
    DEFAULT_CHUNK_BYTES,
    DIGEST,
    HEADER,
    MAX_CHUNK_BYTES,
    MAX_CONTROL_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SUBBUFFERS,
    MSG_MORE,
    RANGE_PREFIX,
    TIMEOUTS,
    FrameType,
    GridHasher,
    PeerClosed,
    Refused,
    TransportError,
    byte_view,
    checksum,
    error_text,
    grid_chunks,
    int_field,
    pack_digests,
    pack_header,
    parse_json,
    recv_data,
    recv_frame,
    send_error,
    send_frame,
    send_json,
    set_timeout,
    source_step,
    tune,
)

_T = TypeVar("_T")
# Without the snapshot's digests a range is hashed and sent in pieces of this
# size, each hashed right before it leaves, while still in cache.
_SEND_PIECE = 1 << 20


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
        check_secret(secret)
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
        # The put in ranges open on the connection, if any: it owns the
        # stream until it finishes, so other requests wait for it to end.
        self._stream: PutStream | None = None

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
        if self._stream is not None:
            self._stream._state = "failed"  # its connection is gone
            self._stream = None
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
                tune(sock)  # before connect, so the window scale can use the buffers
                sock.settimeout(self._timeout_s)
                sock.connect(addr)
                set_timeout(sock, self._timeout_s)
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
        except TIMEOUTS:
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
            # Blocking socket (see set_timeout), so MSG_DONTWAIT returns at once.
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
            if self._stream is not None:
                raise RuntimeError(
                    f"{what}: {self._stream._what} is still open on this connection "
                    "(finish or abort it first)"
                )
            reused = self._sock is not None
            sock = self._ensure_connected()
            reused = reused and sock is self._sock
            self._replies = 0
            try:
                return fn(sock)
            except (PeerClosed, ConnectionResetError, BrokenPipeError) as e:
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
        if isinstance(e, Refused):
            raise e  # the peer said no at a point where the stream is in step
        # Anything else (KeyboardInterrupt mid-transfer included) leaves the
        # stream out of step.
        self._drop()
        where = f"{what} with {self.host}:{self.port}"
        if isinstance(e, TransportError):
            raise TransportError(f"{where}: {e}") from None
        if isinstance(e, TIMEOUTS):
            raise TransportError(f"{where}: no progress for {self._timeout_s}s") from None
        if isinstance(e, OSError):
            raise TransportError(f"{where}: {e}") from None
        raise e

    def _refused(self, what: str, payload: bytes) -> Refused:
        return Refused(f"{what} failed at {self.host}:{self.port}: {error_text(payload)}")

    def begin_put(
        self,
        source: int,
        step: int,
        manifest_json: bytes,
        data_len: int,
        *,
        checksums: Sequence[str | int] | None = None,
        checksum_bytes: int = DEFAULT_CHUNK_BYTES,
        subbuffers: int = 1,
        staging_bytes: int = 0,
    ) -> PutStream:
        """Open a put of ``data_len`` bytes whose ranges the caller sends later.

        Waits for the holder to reserve its slot (a refusal raises Refused
        and keeps the connection), sends the manifest, and returns the open
        :class:`PutStream`; until it ends, other calls on this client raise.

        Args:
            checksums: the xxh3_64 digests (hex, as a manifest holds them, or
                ints) of every ``checksum_bytes`` of the data, which the
                snapshot computed as it wrote the slot: sent at ``finish``
                instead of hashing the data again. None: each range is
                hashed as it is sent.
            subbuffers, staging_bytes: how the holder lands ranges (see
                ``transport.ranges``). ``staging_bytes == 0`` (the default):
                straight into its slot, any range size. Otherwise through
                ``subbuffers`` staging buffers of ``staging_bytes //
                subbuffers`` bytes, the most one range may carry; one
                sub-buffer receives and drains in turn, several overlap.
        """
        manifest = bytes(manifest_json)
        if data_len < 0:
            raise ValueError(f"data_len must be >= 0, got {data_len}")
        if checksum_bytes < 1:
            raise ValueError(f"checksum_bytes must be >= 1, got {checksum_bytes}")
        if not 1 <= subbuffers <= MAX_SUBBUFFERS:
            raise ValueError(f"subbuffers must be in [1, {MAX_SUBBUFFERS}], got {subbuffers}")
        if staging_bytes and staging_bytes < subbuffers:
            raise ValueError(
                f"staging_bytes={staging_bytes} leaves no byte for each of {subbuffers} sub-buffers"
            )
        n_chunks = grid_chunks(data_len, checksum_bytes)
        if n_chunks * DIGEST.size > MAX_CONTROL_BYTES:
            raise ValueError(
                f"{n_chunks} digests of {checksum_bytes}-byte chunks exceed the control "
                "frame limit: use larger checksum chunks"
            )
        digests = None
        if checksums is not None:
            if len(checksums) != n_chunks:
                raise ValueError(
                    f"{len(checksums)} checksums given; {data_len} bytes in "
                    f"{checksum_bytes}-byte chunks need {n_chunks}"
                )
            digests = [d if isinstance(d, int) else int(d, 16) for d in checksums]
        max_range = MAX_CHUNK_BYTES if not staging_bytes else staging_bytes // subbuffers
        what = f"put of {source_step(source, step)}"
        request = {
            "source": source,
            "step": step,
            "data_len": data_len,
            "manifest_len": len(manifest),
            "checksum_bytes": checksum_bytes,
            "subbuffers": subbuffers,
            "staging_bytes": staging_bytes,
        }

        def run(sock: socket.socket) -> PutStream:
            send_json(sock, FrameType.PUT_OPEN, request)
            ftype, payload = self._recv(sock, {FrameType.READY})
            if ftype == FrameType.ERROR:
                raise self._refused(what, payload)
            stream = PutStream(
                self, sock, what, data_len, digests, checksum_bytes, min(max_range, MAX_CHUNK_BYTES)
            )
            send_frame(sock, FrameType.MANIFEST, manifest)
            self._stream = stream
            return stream

        return self._exchange(what, run)

    def put(
        self,
        source: int,
        step: int,
        manifest_json: bytes,
        data: Any,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        *,
        checksums: Sequence[str | int] | None = None,
        checksum_bytes: int | None = None,
        subbuffers: int = 1,
        staging_bytes: int = 0,
    ) -> float:
        """Replicate one checkpoint in one call; returns seconds from request to the
        holder's acknowledgement, which it sends only after verifying every
        digest and committing. ``data`` is any C-contiguous buffer (sent in
        place, in ranges of ``chunk_bytes``, or of the staging sub-buffer's
        size if smaller). ``checksums``/``checksum_bytes``: the snapshot's
        digests, as for :meth:`begin_put` (without them the digest grid is
        ``chunk_bytes``)."""
        view = byte_view(data, writable=False, what="data")
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
        stream = self.begin_put(
            source,
            step,
            manifest_json,
            view.nbytes,
            checksums=checksums,
            checksum_bytes=checksum_bytes or chunk_bytes,
            subbuffers=subbuffers,
            staging_bytes=staging_bytes,
        )
        with stream:
            step_bytes = min(chunk_bytes, stream.max_range_bytes)
            for off in range(0, view.nbytes, step_bytes):
                stream.send_range(off, view[off : off + step_bytes])
            return stream.finish()

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
        dest_buf = None if into is None else byte_view(into, writable=True, what="into")
        what = f"get of {source_step(source, step)}"
        req: dict[str, Any] = {"source": source, "step": step}
        if chunk_bytes is not None:
            req["chunk_bytes"] = chunk_bytes

        def run(sock: socket.socket) -> tuple[bytes, memoryview | bytearray]:
            send_json(sock, FrameType.GET, req)
            ftype, payload = self._recv(sock, {FrameType.GET_BEGIN})
            if ftype == FrameType.ERROR:
                raise self._refused(what, payload)
            info = parse_json(FrameType.GET_BEGIN, payload)
            data_len = int_field(FrameType.GET_BEGIN, info, "data_len")
            manifest_len = int_field(
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
                raise TransportError(f"peer aborted the transfer: {error_text(manifest)}")
            if len(manifest) != manifest_len:
                raise TransportError(f"manifest of {len(manifest)} bytes, announced {manifest_len}")
            progress = [0]
            try:
                bad = recv_data(sock, dest, self._header_buf, progress)
            except TIMEOUTS:
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
                what_failed = source_step(source, step)
                raise TransportError(f"checksum mismatch in chunk {bad} of {what_failed}")
            return manifest, out

        return self._exchange(what, run)

    def list(self) -> dict[str, Any]:
        """The holder's inventory as JSON (integer keys arrive as strings)."""

        def run(sock: socket.socket) -> dict[str, Any]:
            send_frame(sock, FrameType.LIST)
            ftype, payload = self._recv(sock, {FrameType.LIST_REPLY})
            if ftype == FrameType.ERROR:
                raise self._refused("list", payload)
            return parse_json(FrameType.LIST_REPLY, payload)

        return self._exchange("list", run)


class PutStream:
    """One put in ranges, open on a client's connection (:meth:`TransportClient.begin_put`).

    The sender decides when each range leaves: the interleaving sender sends
    planned chunks as idle spans of training communication begin, possibly
    from another thread than the one that began the put, with pauses
    between them. Ranges go in order and without gaps; nothing is waited
    for between them (the holder answers once, at :meth:`finish`), so a
    range costs its bytes and one header.

    The holder's copy is complete only once :meth:`finish` returns: it
    verifies every digest first. A stream that is aborted, dropped with its
    connection, or never finished leaves no complete replica (the holder
    aborts the target; its previous complete copy stays as it was). Used as a
    context manager, a stream not finished at exit is aborted.
    """

    def __init__(
        self,
        client: TransportClient,
        sock: socket.socket,
        what: str,
        data_len: int,
        digests: list[int] | None,
        checksum_bytes: int,
        max_range_bytes: int,
    ) -> None:
        self._client, self._sock, self._what = client, sock, what
        self.data_len = data_len
        self.max_range_bytes = max_range_bytes
        """Largest range :meth:`send_range` takes (the holder's sub-buffer, if staged)."""
        self._digests = digests
        # Without the snapshot's digests, hash each range on its way out.
        self._hasher = None if digests is not None else GridHasher(data_len, checksum_bytes)
        self._sent = 0
        self._state = "open"
        self._t0 = time.perf_counter()

    @property
    def sent(self) -> int:
        """Bytes handed to the kernel so far: where the next range starts."""
        return self._sent

    @property
    def open(self) -> bool:
        return self._state == "open"

    def __enter__(self) -> PutStream:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.open:
            self.abort("never finished" if exc is None else f"sender failed: {exc}")

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self._what} is already {self._state}")

    def send_range(self, offset: int, data: Any) -> None:
        """Send ``data`` as the slot's bytes at ``offset``: the next range, in order.

        ``data`` is any C-contiguous buffer, sent in place. A range that does
        not start where the previous one ended, is empty, runs past
        ``data_len`` or exceeds :attr:`max_range_bytes` raises ValueError
        before anything is sent (the stream stays usable). A transport
        failure raises TransportError and ends the stream.
        """
        view = byte_view(data, writable=False, what="range")
        n = view.nbytes
        with self._client._lock:
            self._check_open()
            if offset != self._sent:
                raise ValueError(
                    f"range at offset {offset}: the next range of {self._what} must start at "
                    f"{self._sent} (ranges go in order, without gaps or overlaps)"
                )
            if n == 0:
                raise ValueError(f"empty range at offset {offset} of {self._what}")
            if offset + n > self.data_len:
                raise ValueError(
                    f"range [{offset}, {offset + n}) overflows the {self.data_len}-byte "
                    f"{self._what}"
                )
            if n > self.max_range_bytes:
                raise ValueError(
                    f"range of {n} bytes exceeds the {self.max_range_bytes}-byte limit of "
                    f"{self._what} (the holder's staging sub-buffer or the frame limit)"
                )
            sock = self._sock
            try:
                self._holder_objection(sock)
                prefix = RANGE_PREFIX.pack(offset)
                header = pack_header(FrameType.RANGE, len(prefix) + n, checksum(prefix))
                sock.sendall(header + prefix, MSG_MORE)
                if self._hasher is None:
                    sock.sendall(view)
                else:
                    # Hash each piece right before it leaves, while in cache.
                    for p in range(0, n, _SEND_PIECE):
                        piece = view[p : p + _SEND_PIECE]
                        self._hasher.update(piece)
                        sock.sendall(piece, MSG_MORE if p + _SEND_PIECE < n else 0)
            except BaseException as e:
                self._fail(e)
            self._sent += n

    def finish(self) -> float:
        """Ask the holder to verify every digest and commit; returns seconds
        since :meth:`TransportClient.begin_put`. Only a normal return means the
        holder holds a complete replica. Refused (a checksum mismatch, an
        incomplete put, a failed commit) keeps the connection for later calls.
        """
        with self._client._lock:
            self._check_open()
            if self._sent != self.data_len:
                raise ValueError(
                    f"finish of {self._what} after {self._sent} of {self.data_len} bytes: "
                    "send the rest first, or abort"
                )
            digests = self._digests if self._hasher is None else self._hasher.digests
            assert digests is not None
            try:
                send_frame(self._sock, FrameType.FINISH, pack_digests(digests))
                ftype, payload = recv_frame(self._sock, {FrameType.ACK})
            except BaseException as e:
                self._fail(e)
            self._end("refused" if ftype == FrameType.ERROR else "finished")
            if ftype == FrameType.ERROR:
                raise self._client._refused(self._what, payload)
            return time.perf_counter() - self._t0

    def abort(self, reason: str = "abandoned by the sender") -> None:
        """Abandon the put: the holder aborts its target. Idempotent; never raises
        for a connection already gone (the holder aborts on its own then)."""
        with self._client._lock:
            if not self.open:
                return
            try:
                send_error(self._sock, reason)
                recv_frame(self._sock, {FrameType.ERROR}, accept_error=True)
            except Exception:
                self._client._drop()
            self._end("aborted")

    def _holder_objection(self, sock: socket.socket) -> None:
        """Raise what the holder said if it already refused the put mid-stream
        (it answers nothing else before FINISH)."""
        try:
            # Blocking socket (see set_timeout), so MSG_DONTWAIT returns at once.
            if not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                raise TransportError("the holder closed the connection")
        except BlockingIOError:
            return
        _, payload = recv_frame(sock, {FrameType.ERROR})
        raise TransportError(f"refused by the holder: {error_text(payload)}")

    def _end(self, state: str) -> None:
        self._state = state
        if self._client._stream is self:
            self._client._stream = None

    def _fail(self, e: BaseException) -> NoReturn:
        """End the stream on a transport failure; the dropped connection makes
        the holder abort its target."""
        self._end("failed")
        sent = f"after {self._sent} of {self.data_len} bytes"
        if isinstance(e, OSError) and not isinstance(e, TIMEOUTS):
            # The holder may have said why before it hung up.
            with contextlib.suppress(Exception):
                self._sock.settimeout(0.5)
                _, payload = recv_frame(self._sock, {FrameType.ERROR})
                e = TransportError(f"refused by the holder: {error_text(payload)}")
        try:
            self._client._fail(self._what, e)
        except TransportError as err:
            raise TransportError(f"{err} ({sent})") from None
