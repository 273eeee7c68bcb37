"""The trainer's side: one reused, authenticated connection to one holder."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from gemini.cluster.transport.handshake import check_secret, client_handshake
from gemini.cluster.transport.wire import (
    DEFAULT_CHUNK_BYTES,
    HEADER,
    MAX_CHUNK_BYTES,
    MAX_MANIFEST_BYTES,
    TIMEOUTS,
    FrameType,
    PeerClosed,
    Refused,
    TransportError,
    byte_view,
    error_text,
    int_field,
    parse_json,
    recv_data,
    recv_frame,
    send_data,
    send_frame,
    send_json,
    set_timeout,
    source_step,
    tune,
)

_T = TypeVar("_T")


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
        view = byte_view(data, writable=False, what="data")
        manifest = bytes(manifest_json)
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
        what = f"put of {source_step(source, step)}"
        total = view.nbytes

        def run(sock: socket.socket) -> float:
            t0 = time.perf_counter()
            send_json(
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
                send_data(sock, view, chunk_bytes, progress)
            except TIMEOUTS:
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
