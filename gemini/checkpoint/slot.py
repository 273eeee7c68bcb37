"""Two in-memory checkpoint slots of one source rank, in POSIX shared memory.

This module owns the shared-memory segment that holds one source rank's
checkpoints on one node: who creates it (the node's worker agent, which
outlives the trainer), how others attach (the trainer writes, a network
receiver fills a replica, recovery reads), and the commit protocol that makes
a crash mid-write harmless.

Segment layout (all offsets page aligned, integers little endian)::

    [segment header, 1 page][slot 0: header page | manifest | data][slot 1: ...]

Each slot is EMPTY, WRITING or COMPLETE. A writer first marks the slot that
does *not* hold the newest complete step as WRITING, fills its data, then
commits: manifest bytes, then header fields with digests of the manifest and
of the header itself, and the state word COMPLETE last. A writer killed at any
point therefore leaves that slot not COMPLETE (or COMPLETE with everything
before it in place) and never touches the other slot; a reader checks both
digests, so it never trusts a partial manifest.

One writer per segment at a time; there are no locks. Readers may run while a
writer works on the *other* slot; a reader racing with the writer reusing the
slot it reads is detected by the commit sequence number (seqlock style) and
reported as :class:`SlotError`.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
import xxhash

from gemini.checkpoint import format as fmt

__all__ = [
    "COMPLETE",
    "EMPTY",
    "SHM_DIR",
    "WRITING",
    "SlotError",
    "SlotHeader",
    "SlotSet",
    "list_segments",
    "manifest_capacity_for",
    "shm_available_bytes",
    "shm_name",
    "slot_bytes",
    "standby_prefix",
    "unlink_prefix",
]

# Why plain files under /dev/shm opened with os.open + mmap, and not
# multiprocessing.shared_memory.SharedMemory: on Python < 3.13 every
# SharedMemory, created *or merely opened*, registers with the process's
# resource_tracker, which unlinks the segment when that process exits -- and
# the tracker is a separate process that does this even when its owner was
# SIGKILLed. A crashing trainer would thereby delete the agent's checkpoint,
# i.e. turn a software failure into a hardware one. Unregistering afterwards
# is racy and private API; track=False exists only on 3.13+. Files under
# /dev/shm are what shm_open creates on Linux anyway, and their lifetime is
# exactly what we manage: until unlink() / unlink_prefix().
SHM_DIR = Path(os.environ.get("GEMINI_SHM_DIR", "/dev/shm"))

PAGE = mmap.PAGESIZE
EMPTY = 0
# Multi-byte distinct values: a torn write of the state word cannot read as
# COMPLETE unless all of it was written.
WRITING = 0x57524954  # "WRIT"
COMPLETE = 0x434F4D50  # "COMP"
_STATE_NAMES = {EMPTY: "EMPTY", WRITING: "WRITING", COMPLETE: "COMPLETE"}

_SEG_MAGIC = b"GEMSEG01"
_SLOT_MAGIC = b"GEMSLOT1"
_VERSION = 1
_N_SLOTS = 2

# Segment header: magic, version, n_slots, manifest_capacity, data_capacity,
# slot_stride, created_unix_ns, digest of everything before it.
_SEG_FMT = struct.Struct("<8sIIQQQQQ")
# Slot header, split so the state word can be written on its own, last:
# magic, version, state | step, seq, manifest_len, data_len, manifest_digest,
# header_digest (of the five fields before it and the state COMPLETE).
_SLOT_HEAD = struct.Struct("<8sII")
_SLOT_BODY = struct.Struct("<qQQQQQ")
_STATE_OFF = 12  # offset of the state word inside the slot header
_BODY_OFF = _SLOT_HEAD.size
_BODY_FIELDS = struct.Struct("<qQQQQ")
_NAME_MAX = 255


class SlotError(Exception):
    """A slot segment is absent, malformed, too small, or in the wrong state."""


@dataclass(frozen=True)
class SlotHeader:
    """A snapshot of one slot's header (cheap to read, no manifest parsing)."""

    idx: int
    state: int
    step: int
    seq: int
    """Commit sequence number, increasing across both slots of a segment."""
    manifest_len: int
    data_len: int
    manifest_digest: int
    valid: bool
    """COMPLETE and the header digest matches."""

    @property
    def state_name(self) -> str:
        return _STATE_NAMES.get(self.state, f"0x{self.state:08x}")


def _round_page(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def slot_bytes(data_capacity: int, manifest_capacity: int) -> int:
    """Total segment size for two slots of these capacities plus headers."""
    if data_capacity < 0 or manifest_capacity < 1:
        raise SlotError(
            f"capacities must be data >= 0 and manifest >= 1, got {data_capacity}, "
            f"{manifest_capacity}"
        )
    return PAGE + _N_SLOTS * _slot_stride(data_capacity, manifest_capacity)


def _slot_stride(data_capacity: int, manifest_capacity: int) -> int:
    return PAGE + _round_page(manifest_capacity) + _round_page(data_capacity)


def manifest_capacity_for(
    n_tensors: int,
    data_capacity: int = 0,
    chunk_bytes: int = fmt.DEFAULT_CHUNK_BYTES,
    extra_bytes: int = 64 << 10,
) -> int:
    """A generous manifest capacity: tensor entries, one digest per chunk, extra state.

    Budgets 512 B per tensor entry (name, dtype, shape, offsets), 24 B per
    checksum and ``extra_bytes`` for the JSON non-tensor state; page rounded.
    """
    n_chunks = -(-data_capacity // chunk_bytes)
    return _round_page(4096 + 512 * n_tensors + 24 * n_chunks + extra_bytes)


def shm_name(run_id: str, node: int, source_rank: int, holder_kind: str) -> str:
    """Segment name of ``source_rank``'s slots held on ``node`` (kind e.g. local/peer)."""
    return _check_name(f"gemini-{run_id}-n{node}-r{source_rank}-{holder_kind}")


def standby_prefix(run_id: str, k: int) -> str:
    """Name prefix of the slots standby node ``k`` allocates before it has an index."""
    return _check_name(f"gemini-{run_id}-s{k}-")


def _check_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or len(name) > _NAME_MAX or "\0" in name:
        raise SlotError(
            f"bad segment name {name!r}: needs 1..{_NAME_MAX} chars, no '/', not starting with '.'"
        )
    return name


def shm_available_bytes() -> int:
    """Bytes still allocatable in the shared-memory filesystem."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def list_segments(prefix: str) -> list[str]:
    """Names of the segments in :data:`SHM_DIR` starting with ``prefix``, sorted."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def unlink_prefix(prefix: str) -> int:
    """Unlink every segment starting with ``prefix``; returns how many were removed.

    Memory is freed once the last process mapping a segment unmaps it.
    """
    if not prefix or "/" in prefix:
        # An empty prefix would wipe every segment of every user on the host.
        raise ValueError(f"refusing to unlink with prefix {prefix!r}")
    n = 0
    for name in list_segments(prefix):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / name)
            n += 1
    return n


def _prefault_new(mm: mmap.mmap) -> None:
    """Fault in every page of a new, all-zero mapping by writing zeros, without the GIL.

    ``MAP_POPULATE`` would do it inside mmap(), but CPython holds the GIL across
    that call: for the GiB-sized segments of a replicated run it froze every
    other thread of the worker agent, its heartbeat included, for seconds on a
    loaded machine, and the root declared a healthy node dead. torch releases
    the GIL in ``zero_``.
    """
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    buf.zero_()
    del buf  # the export must be gone before the mapping can ever be closed


def _digest(data: bytes | memoryview | mmap.mmap) -> int:
    return xxhash.xxh3_64_intdigest(data)


class SlotSet:
    """The two checkpoint slots of one source rank in one shared-memory segment."""

    touch_s: float
    """Seconds :meth:`create` spent allocating and touching the memory (0 otherwise)."""

    def __init__(
        self,
        name: str,
        mm: mmap.mmap,
        data_capacity: int,
        manifest_capacity: int,
        touch_s: float = 0.0,
    ) -> None:
        # Use create() / open(); this only wires up an already-mapped segment.
        self.name = name
        self.data_capacity = data_capacity
        self.manifest_capacity = manifest_capacity
        self.touch_s = touch_s
        self._stride = _slot_stride(data_capacity, manifest_capacity)
        self._mm: mmap.mmap | None = mm

    # ---- life cycle -------------------------------------------------------

    @classmethod
    def create(
        cls, name: str, data_capacity: int, manifest_capacity: int, touch: bool = True
    ) -> SlotSet:
        """Create a new segment with two EMPTY slots (fails if ``name`` exists).

        ``touch=True`` allocates every page now (``posix_fallocate``) and maps
        them in (:func:`_prefault_new`), so the first-touch cost is paid at start-up and a full
        /dev/shm fails here with a clear error rather than with SIGBUS in the
        middle of a checkpoint. ``touch=False`` leaves the file sparse.
        """
        _check_name(name)
        size = slot_bytes(data_capacity, manifest_capacity)
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SlotError(f"segment {name!r} already exists in {SHM_DIR}") from None
        t0 = time.perf_counter()
        try:
            try:
                if touch:
                    os.posix_fallocate(fd, 0, size)
                else:
                    os.ftruncate(fd, size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise SlotError(
                        f"segment {name!r} needs {size} bytes, {SHM_DIR} has "
                        f"{shm_available_bytes()} available"
                    ) from e
                raise
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            if touch:
                _prefault_new(mm)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        os.close(fd)  # the mapping keeps the memory; the fd is not needed
        touch_s = time.perf_counter() - t0 if touch else 0.0

        stride = _slot_stride(data_capacity, manifest_capacity)
        for i in range(_N_SLOTS):
            off = PAGE + i * stride
            _SLOT_HEAD.pack_into(mm, off, _SLOT_MAGIC, _VERSION, EMPTY)
            _SLOT_BODY.pack_into(mm, off + _BODY_OFF, -1, 0, 0, 0, 0, 0)
        # Segment header last: open() refuses a segment whose header is not
        # complete, so a creator dying half-way leaves nothing usable.
        fields = (
            _SEG_MAGIC,
            _VERSION,
            _N_SLOTS,
            manifest_capacity,
            data_capacity,
            stride,
            time.time_ns(),
        )
        body = struct.pack("<8sIIQQQQ", *fields)
        _SEG_FMT.pack_into(mm, 0, *fields, _digest(body))
        return cls(name, mm, data_capacity, manifest_capacity, touch_s)

    @classmethod
    def open(cls, name: str, populate: bool = False) -> SlotSet:
        """Attach an existing segment by name (SlotError if absent or malformed).

        ``populate=True`` pre-faults the whole mapping now (one ``MAP_POPULATE``
        call), which a writer wants so its first checkpoint does not pay page
        faults; a reader that only looks at headers does not.
        """
        _check_name(name)
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise SlotError(f"segment {name!r} does not exist in {SHM_DIR}") from None
        try:
            size = os.fstat(fd).st_size
            if size < PAGE:
                raise SlotError(f"segment {name!r} is {size} bytes, too small for a header")
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
            mm = mmap.mmap(fd, size, flags=flags)
        finally:
            os.close(fd)
        try:
            magic, version, n_slots, mcap, dcap, stride, created, dig = _SEG_FMT.unpack_from(mm, 0)
            if magic != _SEG_MAGIC:
                raise SlotError(f"segment {name!r} has bad magic {magic!r}")
            if version != _VERSION or n_slots != _N_SLOTS:
                raise SlotError(
                    f"segment {name!r} is version {version} with {n_slots} slots; "
                    f"expected version {_VERSION} with {_N_SLOTS}"
                )
            body = struct.pack("<8sIIQQQQ", magic, version, n_slots, mcap, dcap, stride, created)
            if _digest(body) != dig:
                raise SlotError(f"segment {name!r} header digest mismatch")
            if stride != _slot_stride(dcap, mcap) or size < slot_bytes(dcap, mcap):
                raise SlotError(
                    f"segment {name!r} is {size} bytes; its header needs {slot_bytes(dcap, mcap)}"
                )
        except BaseException:
            mm.close()
            raise
        return cls(name, mm, dcap, mcap)

    def close(self) -> None:
        """Unmap (idempotent). Leaves the segment in place for others."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        # Views handed out by data_view()/data_tensor() may still be alive;
        # unmapping under them would crash their users, so then the mapping
        # is left to be freed when the last view is garbage-collected.
        with contextlib.suppress(BufferError):
            mm.close()

    def rename(self, name: str) -> None:
        """Give the segment a new name (never over an existing one); the mapping,
        and what was touched, stays. How a standby node's slots, allocated
        before it knew its index, become the index's slots."""
        _check_name(name)
        try:
            # link() refuses an existing target, where rename() would replace it.
            os.link(SHM_DIR / self.name, SHM_DIR / name)
        except FileExistsError:
            raise SlotError(f"segment {name!r} already exists in {SHM_DIR}") from None
        os.unlink(SHM_DIR / self.name)
        self.name = name

    def unlink(self) -> None:
        """Remove the segment's name; memory is freed when the last mapping goes."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / self.name)

    def __enter__(self) -> SlotSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"SlotSet({self.name!r}, data_capacity={self.data_capacity}, "
            f"manifest_capacity={self.manifest_capacity})"
        )

    # ---- headers ----------------------------------------------------------

    @property
    def _m(self) -> mmap.mmap:
        if self._mm is None:
            raise SlotError(f"segment {self.name!r} is closed")
        return self._mm

    def _check_idx(self, idx: int) -> int:
        if idx not in (0, 1):
            raise SlotError(f"slot index must be 0 or 1, got {idx!r}")
        return PAGE + idx * self._stride

    def header(self, idx: int) -> SlotHeader:
        """Read slot ``idx``'s header (a few dozen bytes; no manifest parsing)."""
        off = self._check_idx(idx)
        m = self._m
        magic, version, state = _SLOT_HEAD.unpack_from(m, off)
        if magic != _SLOT_MAGIC or version != _VERSION:
            raise SlotError(
                f"slot {idx} of {self.name!r} has bad magic/version {magic!r}/{version}"
            )
        body = _SLOT_BODY.unpack_from(m, off + _BODY_OFF)
        step, seq, mlen, dlen, mdig, hdig = body
        valid = state == COMPLETE and _header_digest(*body[:5]) == hdig
        return SlotHeader(idx, state, step, seq, mlen, dlen, mdig, valid)

    def complete_steps(self) -> list[tuple[int, int]]:
        """``(step, slot idx)`` of every valid COMPLETE slot, newest first."""
        hs = [h for h in (self.header(0), self.header(1)) if h.valid]
        hs.sort(key=lambda h: (h.step, h.seq), reverse=True)
        return [(h.step, h.idx) for h in hs]

    def newest_complete(self) -> tuple[int, int] | None:
        steps = self.complete_steps()
        return steps[0] if steps else None

    def _set_state(self, idx: int, state: int) -> None:
        struct.pack_into("<I", self._m, self._check_idx(idx) + _STATE_OFF, state)

    # ---- writing ----------------------------------------------------------

    def begin_write(self, step: int, nbytes: int | None = None) -> int:
        """Mark the slot not holding the newest complete step WRITING; return its index.

        The slot is invalidated before anything else is written to it, so a
        crash from here on leaves it not COMPLETE. ``nbytes`` (the data size,
        if known) is checked against the capacity up front.
        """
        if nbytes is not None and nbytes > self.data_capacity:
            raise SlotError(
                f"checkpoint of step {step} is {nbytes} bytes; slots of {self.name!r} "
                f"hold {self.data_capacity}"
            )
        newest = self.newest_complete()
        idx = 0 if newest is None else 1 - newest[1]
        off = self._check_idx(idx)
        self._set_state(idx, WRITING)
        # Keep seq: commit derives the next one from both slots' maxima.
        seq = self.header(idx).seq
        _SLOT_BODY.pack_into(self._m, off + _BODY_OFF, step, seq, 0, 0, 0, 0)
        return idx

    receive_begin = begin_write
    """A network receiver's entry point: same slot choice, then ``recv_into(data_view(idx))``."""

    def data_view(self, idx: int) -> memoryview:
        """Writable view of slot ``idx``'s data region (``data_capacity`` bytes), no copy."""
        off = self._check_idx(idx) + PAGE + _round_page(self.manifest_capacity)
        return memoryview(self._m)[off : off + self.data_capacity]

    def data_tensor(self, idx: int) -> torch.Tensor:
        """The data region as a flat uint8 tensor over the shared memory, no copy."""
        if self.data_capacity == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.data_view(idx), dtype=torch.uint8)

    def _manifest_off(self, idx: int) -> int:
        return self._check_idx(idx) + PAGE

    def commit(self, idx: int, manifest: fmt.Manifest) -> None:
        """Publish slot ``idx`` (begun with :meth:`begin_write`) as COMPLETE with ``manifest``."""
        self._commit_bytes(idx, manifest, manifest.to_json())

    def commit_raw(self, idx: int, manifest_bytes: bytes, verify: bool = False) -> fmt.Manifest:
        """Parse and validate ``manifest_bytes`` (e.g. received from a peer), then commit.

        ``verify=True`` also checks the data against the manifest's checksums
        before publishing, so a corrupted transfer never becomes COMPLETE.
        """
        try:
            manifest = fmt.Manifest.from_json(manifest_bytes)
        except fmt.FormatError as e:
            raise SlotError(f"refusing to commit slot {idx} of {self.name!r}: {e}") from e
        if verify:
            fmt.verify(self.data_view(idx), manifest)
        self._commit_bytes(idx, manifest, bytes(manifest_bytes))
        return manifest

    def _commit_bytes(self, idx: int, manifest: fmt.Manifest, raw: bytes) -> None:
        h = self.header(idx)
        where = f"slot {idx} of {self.name!r}"
        if h.state != WRITING:
            raise SlotError(f"{where} is {h.state_name}; begin_write() it before commit")
        if manifest.step != h.step:
            raise SlotError(
                f"{where} was begun for step {h.step}, manifest is step {manifest.step}"
            )
        if manifest.data_nbytes > self.data_capacity:
            raise SlotError(
                f"{where}: data is {manifest.data_nbytes} bytes, capacity {self.data_capacity}"
            )
        if len(raw) > self.manifest_capacity:
            raise SlotError(
                f"{where}: manifest is {len(raw)} bytes, capacity {self.manifest_capacity} "
                f"(size it with manifest_capacity_for)"
            )
        m = self._m
        moff = self._manifest_off(idx)
        m[moff : moff + len(raw)] = raw
        other = self.header(1 - idx)
        seq = max(h.seq, other.seq) + 1
        fields = (h.step, seq, len(raw), manifest.data_nbytes, _digest(raw))
        _SLOT_BODY.pack_into(m, self._check_idx(idx) + _BODY_OFF, *fields, _header_digest(*fields))
        # The state word last: everything a reader checks is in place before it.
        self._set_state(idx, COMPLETE)

    def invalidate(self, idx: int) -> None:
        """Mark slot ``idx`` EMPTY (its data stays but is no longer trusted)."""
        self._set_state(idx, EMPTY)

    def invalidate_newer_than(self, step: int) -> list[int]:
        """Invalidate complete slots newer than ``step``; returns their indices.

        After a recovery rolls back to ``step``, a newer complete slot belongs
        to the abandoned timeline; left in place, it would count as "newest"
        and make the next :meth:`begin_write` overwrite the slot just restored.
        """
        dropped = [i for s, i in self.complete_steps() if s > step]
        for i in dropped:
            self.invalidate(i)
        return dropped

    # ---- reading ----------------------------------------------------------

    def read_manifest(self, idx: int) -> fmt.Manifest:
        """The manifest of COMPLETE slot ``idx``, after checking header and manifest digests."""
        return self._read_manifest(idx)[1]

    def _read_manifest(self, idx: int) -> tuple[SlotHeader, fmt.Manifest]:
        h = self.header(idx)
        where = f"slot {idx} of {self.name!r}"
        if h.state != COMPLETE:
            raise SlotError(f"{where} is {h.state_name} (step {h.step}), not COMPLETE")
        if not h.valid:
            raise SlotError(f"{where} is COMPLETE but its header digest does not match")
        if h.manifest_len > self.manifest_capacity or h.data_len > self.data_capacity:
            raise SlotError(f"{where}: header lengths exceed the capacities")
        moff = self._manifest_off(idx)
        raw = self._m[moff : moff + h.manifest_len]  # a copy: stable while we parse
        if _digest(raw) != h.manifest_digest:
            raise SlotError(f"{where}: manifest digest mismatch (partial or overwritten manifest)")
        self._check_unchanged(h)
        try:
            manifest = fmt.Manifest.from_json(raw)
        except fmt.FormatError as e:
            raise SlotError(f"{where}: {e}") from e
        if manifest.step != h.step or manifest.data_nbytes != h.data_len:
            raise SlotError(
                f"{where}: header says step {h.step} / {h.data_len} bytes, manifest says "
                f"step {manifest.step} / {manifest.data_nbytes} bytes"
            )
        return h, manifest

    def _check_unchanged(self, before: SlotHeader) -> None:
        now = self.header(before.idx)
        if not now.valid or now.seq != before.seq:
            raise SlotError(
                f"slot {before.idx} of {self.name!r} was rewritten while being read "
                f"(seq {before.seq} -> {now.seq}, now {now.state_name})"
            )

    def verify(self, idx: int) -> fmt.Manifest:
        """Check manifest and every data checksum of slot ``idx``; return the manifest.

        Raises :class:`~gemini.checkpoint.format.ChecksumError` naming the bad
        chunk and tensors, or :class:`SlotError` if the slot is not COMPLETE or
        was rewritten during the check.
        """
        h, manifest = self._read_manifest(idx)
        fmt.verify(self.data_view(idx), manifest)
        self._check_unchanged(h)
        return manifest

    def read_state(
        self,
        idx: int,
        out: Mapping[str, torch.Tensor] | None = None,
        verify: bool = True,
    ) -> tuple[fmt.Manifest, dict[str, torch.Tensor]]:
        """Verify (optionally) and copy out slot ``idx``'s state; safe against a racing writer."""
        h, manifest = self._read_manifest(idx)
        if verify:
            fmt.verify(self.data_view(idx), manifest)
        state = fmt.read_state(self.data_tensor(idx), manifest, out=out, copy=True)
        # Copies are only trustworthy if nobody started rewriting the slot meanwhile.
        self._check_unchanged(h)
        return manifest, state

    def view_state(
        self, idx: int, verify: bool = True
    ) -> tuple[fmt.Manifest, dict[str, torch.Tensor]]:
        """Verify (optionally) slot ``idx`` and return its tensors as views into the slot.

        No copy, no allocation: for a restore that copies the views into the
        live training state at once. The views alias the slot, so only a
        caller that knows nobody rewrites this slot meanwhile may use them (a
        trainer restoring its own slot: it is the slot's only writer, and its
        next snapshot goes to the other slot).
        """
        h, manifest = self._read_manifest(idx)
        if verify:
            fmt.verify(self.data_view(idx), manifest)
        state = fmt.read_state(self.data_tensor(idx), manifest, copy=False)
        self._check_unchanged(h)
        return manifest, state

    def raw_slot_view(self, idx: int) -> tuple[bytes, memoryview]:
        """Manifest bytes and data view (``data_nbytes`` long) of COMPLETE slot ``idx``.

        What a sender needs to ship a whole slot; the receiver does
        ``receive_begin`` / ``recv_into(data_view)`` / ``commit_raw``. Check
        ``header(idx).seq`` after sending if the local writer may be running.
        """
        h, _manifest = self._read_manifest(idx)
        moff = self._manifest_off(idx)
        return self._m[moff : moff + h.manifest_len], self.data_view(idx)[: h.data_len]


def _header_digest(step: int, seq: int, mlen: int, dlen: int, mdig: int) -> int:
    return _digest(_BODY_FIELDS.pack(step, seq, mlen, dlen, mdig) + struct.pack("<I", COMPLETE))
