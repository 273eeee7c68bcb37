"""The holder's side of a put in ranges: where each range's bytes land and when they are hashed.

Two ways to land a range, chosen by the sender when it opens the put:

* **direct** (``staging_bytes == 0``, the default): ``recv_into`` the slot
  itself, and hash each piece the kernel hands over right after it lands,
  while it is still in cache. One copy per byte (the kernel's, socket buffer
  to slot) and one cached read for the hash. Receiving and hashing take
  turns on one thread, but the kernel keeps filling the socket buffer while
  the thread hashes, so the link does not wait: the socket buffer is the
  second buffer of the pipeline.
* **staged** (``staging_bytes > 0``): ``subbuffers`` staging buffers of
  ``staging_bytes // subbuffers`` bytes each; a range is received whole into
  one of them, then *drained*: copied into the slot and hashed piece by
  piece. With one sub-buffer the drain runs on the receiving thread after
  the range arrived, so receive and drain never overlap (the "no
  pipelining" ablation); with two or more a drain thread empties one
  sub-buffer while the next range is received into another. The copy
  releases the interpreter lock (numpy) and so does the hash (xxhash), so
  the two threads really run at once when a core is free.

Staging costs a second copy of every byte, so on a host-memory slot it is
never cheaper than direct; it exists because the interleaving planner sizes
chunks from a receiver's staging buffers (``plan_chunks(buffer_bytes,
subbuffers)``) and to measure exactly that trade-off.
"""

from __future__ import annotations

import queue
import socket
import threading

import numpy as np

from gemini.cluster.transport.wire import GridHasher, TransportError

# Pieces a drain copies and then hashes: small enough to still be in cache
# (L2) when hashed right after the copy.
_DRAIN_PIECE = 256 << 10


class StagingPool:
    """One connection's staging buffers, kept from put to put.

    Allocated on the first staged put and reused while later puts ask for
    the same shape, so only the first put faults their pages in.
    """

    def __init__(self) -> None:
        self._bufs: list[np.ndarray] = []

    def get(self, count: int, nbytes: int) -> list[np.ndarray]:
        if len(self._bufs) != count or (self._bufs and self._bufs[0].nbytes != nbytes):
            self._bufs = []  # drop the old ones before allocating the new
            self._bufs = [np.empty(nbytes, dtype=np.uint8) for _ in range(count)]
        return self._bufs


class RangeReceiver:
    """Lands one put's ranges in ``dest`` and hashes them on the digest grid.

    The server reads each RANGE frame's header and offset and checks them;
    this class only moves and hashes the bytes. :meth:`close` must be called
    in every case (it stops the drain thread); :meth:`drained` waits until
    every received byte is in ``dest`` and hashed.
    """

    def __init__(
        self,
        dest: memoryview,
        grid_bytes: int,
        *,
        subbuffers: int = 1,
        staging: list[np.ndarray] | None = None,
        thread_name: str = "gemini-transport-drain",
    ) -> None:
        self.dest = dest
        self.hasher = GridHasher(dest.nbytes, grid_bytes)
        self.received = 0
        """Bytes received from the socket (staged: not necessarily drained yet)."""
        self._staging = staging
        self._next = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._dest_np = np.frombuffer(dest, dtype=np.uint8) if staging else None
        if staging is not None and len(staging) != subbuffers:
            raise ValueError(f"{len(staging)} staging buffers for {subbuffers} sub-buffers")
        if staging is not None and subbuffers > 1:
            # One token per sub-buffer: receiving into one takes it, its drain
            # gives it back. Drains run in order, so the sub-buffer whose turn
            # comes next round-robin is the one freed first.
            self._free = threading.Semaphore(subbuffers)
            self._jobs: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._drain_loop, name=thread_name, daemon=True)
            self._thread.start()

    @property
    def sub_bytes(self) -> int | None:
        """Largest range this receiver takes (None: any, received straight into the slot)."""
        return None if self._staging is None else self._staging[0].nbytes

    def receive(self, sock: socket.socket, offset: int, n: int) -> None:
        """Read the next ``n`` payload bytes from ``sock``: the range at ``offset``."""
        self._raise_drain_error()
        if self._staging is None:
            self._recv_direct(sock, offset, n)
            return
        idx = self._next
        self._next = (idx + 1) % len(self._staging)
        if self._thread is not None:
            # Wait for this sub-buffer's previous range to be drained.
            while not self._free.acquire(timeout=0.5):
                self._raise_drain_error()
        buf = self._staging[idx].data[:n]
        got = 0
        while got < n:
            k = sock.recv_into(buf[got:], n - got)
            if k == 0:
                raise TransportError(f"peer closed mid-range after {offset + got} bytes")
            got += k
            self.received = offset + got
        if self._thread is None:
            self._drain(idx, offset, n)  # one sub-buffer: receive, then drain, in turn
        else:
            self._jobs.put((idx, offset, n))

    def _recv_direct(self, sock: socket.socket, offset: int, n: int) -> None:
        dest, hasher = self.dest, self.hasher
        pos, end = offset, offset + n
        while pos < end:
            k = sock.recv_into(dest[pos:end], end - pos)
            if k == 0:
                raise TransportError(f"peer closed mid-range after {pos} bytes")
            # Hash what just landed while it is still in cache.
            hasher.update(dest[pos : pos + k])
            pos += k
            self.received = pos

    def _drain(self, idx: int, offset: int, n: int) -> None:
        assert self._staging is not None and self._dest_np is not None
        src = self._staging[idx]
        for p in range(0, n, _DRAIN_PIECE):
            q = min(p + _DRAIN_PIECE, n)
            np.copyto(self._dest_np[offset + p : offset + q], src[p:q])
            self.hasher.update(src[p:q].data)

    def _drain_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if self._error is None:  # after a failure, only hand tokens back
                    self._drain(*job)
            except BaseException as e:
                self._error = e
            finally:
                self._free.release()

    def _raise_drain_error(self) -> None:
        if self._error is not None:
            raise TransportError(f"draining a range into the slot failed: {self._error}")

    def drained(self) -> list[int]:
        """Wait until every received range is in the slot; the digests of the data."""
        self.close()
        self._raise_drain_error()
        return self.hasher.digests

    def close(self) -> None:
        """Stop the drain thread (after the ranges already queued). Idempotent."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
