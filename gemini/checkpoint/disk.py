"""The ``disk`` backend: checkpoints on a shared filesystem, and the persistent tier.

This module owns everything that puts a checkpoint on storage and gets it back:

* :class:`DiskStore` — the on-storage layout, crash-safe writes, verified reads,
  listing of complete steps, pruning and the config check. The memory
  backends use it as their persistent tier (Gemini's "every few hours" copy).
* :class:`DiskBackend` — ``backend=disk``: the remote-storage baselines of the
  paper (Strawman, HighFreq) and CheckFreq-style background persistence.
* :func:`storage_complete_steps` — what the root agent can recover from storage.

Layout, one directory per step and one file pair per rank::

    <root>/<run_id>/step_<step:08d>/rank_<rank:05d>.bin    flat tensor bytes (format.py)
    <root>/<run_id>/step_<step:08d>/rank_<rank:05d>.json   manifest, with its own digest

A step is complete for a rank when its manifest exists: the data file is
written under a temporary name, fsynced and renamed into place (and the
directory fsynced) *before* the manifest goes through the same sequence. A
writer killed at any point therefore leaves no manifest for the step it was
writing, and never touches an older step. The manifest file is a JSON
envelope ``{"xxh3_64": <digest of the manifest bytes>, "manifest": {...}}``:
the chunk checksums inside the manifest protect the data, and the envelope's
digest protects the manifest itself (its ``extra`` — step, RNG, data position —
is covered by nothing else).

Storage bandwidth can be *emulated*: with ``bandwidth_gbps > 0`` reads and
writes are paced to that many Gbit/s (1 Gbit/s = 1e9 bit/s) with chunked I/O
and sleeps, which stands in for one node's share of a shared remote store
(the paper's 20 Gbps aggregate across 16 machines). Such numbers are
labelled "emulated" wherever they are reported (:meth:`DiskStore.describe`).
On this machine kind there is no NFS: a plain local directory stands in for
the shared filesystem; on a cluster ``backend.path`` is the real mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xxhash

from gemini.checkpoint import format as fmt
from gemini.checkpoint.backend import (
    BackendContext,
    CheckpointBackend,
    CheckpointError,
    Retrieved,
    SnapshotTiming,
)

if TYPE_CHECKING:
    from gemini.config import GeminiConfig
    from gemini.workload.state import TrainState

__all__ = [
    "DiskBackend",
    "DiskStore",
    "decode_manifest",
    "encode_manifest",
    "storage_checkpoints",
    "storage_complete_steps",
    "storage_dir",
    "trim_storage",
    "uses_storage",
]

PERSIST_MODES = ("blocking", "background")

_STEP_RE = re.compile(r"step_(\d{8})")
# Unthrottled I/O goes in pieces of this size: large enough that syscalls
# are noise, small enough that write-back of one piece overlaps copying the
# next (see _Writeback) and the page cache holds only a few pieces at a time.
_IO_CHUNK = 16 << 20
# Throttled I/O goes in pieces of about this many seconds at the cap, so the
# achieved rate follows the cap smoothly instead of in bursts.
_PACE_SLICE_S = 0.01
_PACE_MIN_CHUNK = 64 << 10
_PACE_MAX_CHUNK = 8 << 20

# The manifest envelope: fixed-width prefix so the digested bytes can be cut
# out exactly, and the whole file is still plain JSON (jq can read it).
_ENV_HEAD = b'{"xxh3_64":"'
_ENV_MID = b'","manifest":'
_ENV_BODY_AT = len(_ENV_HEAD) + 16 + len(_ENV_MID)

DataBuffer = memoryview | bytes | bytearray | torch.Tensor


# -- small helpers -------------------------------------------------------------
def _flat_view(data: DataBuffer, *, writable: bool = False) -> memoryview:
    """A flat byte memoryview over ``data`` without copying."""
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu" or not data.is_contiguous():
            raise CheckpointError("disk: a buffer tensor must be a contiguous CPU tensor")
        arr: Any = data.detach().reshape(-1).view(torch.uint8).numpy()
        mv = memoryview(arr)
    else:
        mv = memoryview(data)
    mv = mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
    if writable and mv.readonly:
        raise CheckpointError("disk: the buffer to read into is read-only")
    return mv


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding it is synced.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    # Without this a read right after a write is served from the page cache
    # at memory speed, and recovery-from-storage times would be fiction.
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux; the os module lacks it), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


class _Writeback:
    """Streams a file to storage piece by piece while it is being written.

    After each piece is written its write-back is started at once; the
    previous piece is then waited for and (with ``drop``) evicted. Copying
    piece k into the page cache thus overlaps the device writing piece k-1,
    the final fsync finds almost nothing left to flush, and the few page-cache
    pages in use are recycled warm instead of a whole checkpoint's worth being
    faulted in fresh. On this 2-core VM, 512 MiB (benchmarks/disk.py, medians
    of 7): 0.27 s against 0.30-0.32 s for one big write + fsync, whose times
    also scatter far more (0.27-1.1 s under load). Durability still comes from
    the final fsync, so where ``sync_file_range`` is missing or refused (some
    network filesystems) streaming is simply switched off.
    """

    def __init__(self, fd: int, *, drop: bool) -> None:
        self.fd, self.drop = fd, drop
        self.enabled = _SYNC_FILE_RANGE is not None
        self.prev: tuple[int, int] | None = None

    def _call(self, offset: int, length: int, flags: int) -> bool:
        if _SYNC_FILE_RANGE(self.fd, offset, length, flags) != 0:
            self.enabled = False
        return self.enabled

    def wrote(self, offset: int, length: int) -> None:
        if not self.enabled or length == 0 or not self._call(offset, length, _SFR_WRITE):
            return
        if self.prev is not None:
            p_off, p_len = self.prev
            if not self._call(p_off, p_len, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER):
                return
            if self.drop:
                _drop_cache(self.fd, p_off, p_len)
        self.prev = (offset, length)


class _Pacer:
    """Sleeps so that bytes moved never run ahead of ``gbps`` Gbit/s since the start."""

    def __init__(self, gbps: float) -> None:
        self.bytes_per_s = gbps * 1e9 / 8.0
        self.t0 = time.perf_counter()
        self.done = 0

    @property
    def chunk(self) -> int:
        return int(min(_PACE_MAX_CHUNK, max(_PACE_MIN_CHUNK, self.bytes_per_s * _PACE_SLICE_S)))

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        delay = self.t0 + self.done / self.bytes_per_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def encode_manifest(manifest: fmt.Manifest) -> bytes:
    """The manifest file's bytes: the JSON manifest wrapped with its own digest."""
    body = manifest.to_json()
    return _ENV_HEAD + xxhash.xxh3_64_hexdigest(body).encode() + _ENV_MID + body + b"}\n"


def decode_manifest(raw: bytes, where: str | Path) -> fmt.Manifest:
    """Parse and check a manifest file's bytes; a FormatError names ``where``."""
    end = len(raw.rstrip(b"\n"))
    if (
        end <= _ENV_BODY_AT
        or not raw.startswith(_ENV_HEAD)
        or raw[_ENV_BODY_AT - len(_ENV_MID) : _ENV_BODY_AT] != _ENV_MID
        or raw[end - 1 : end] != b"}"
    ):
        raise fmt.FormatError(f"{where}: not a checkpoint manifest file (bad envelope)")
    expected = raw[len(_ENV_HEAD) : len(_ENV_HEAD) + 16].decode("ascii", "replace")
    body = raw[_ENV_BODY_AT : end - 1]
    actual = xxhash.xxh3_64_hexdigest(body)
    if actual != expected:
        raise fmt.FormatError(
            f"{where}: manifest digest mismatch (expected {fmt.CHECKSUM_ALGO} {expected}, "
            f"got {actual}): the manifest was modified or torn"
        )
    try:
        return fmt.Manifest.from_json(body)
    except fmt.FormatError as e:
        raise fmt.FormatError(f"{where}: {e}") from None


def storage_dir(cfg: GeminiConfig, job_dir: str | Path) -> Path:
    """The one rule for where the ``disk`` backend and the persistent tier
    write: ``backend.path`` if set, else ``<job_dir>/checkpoints``."""
    return Path(cfg.backend.path) if cfg.backend.path else Path(job_dir) / "checkpoints"


def uses_storage(cfg: GeminiConfig) -> bool:
    """Whether a run writes to storage at all: the ``disk`` backend, or a
    memory backend with a persistent tier (``backend.persist_every_s`` or
    ``backend.persist_every_n``)."""
    b = cfg.backend
    tier = b.persist_every_s > 0 or b.persist_every_n > 0
    return b.name == "disk" or (b.name in ("memory", "replicated") and tier)


# -- the store ------------------------------------------------------------------
class WriteAbandoned(CheckpointError):
    """A write stopped half-way because its generation failed (``DiskStore.abandon``)."""


class DiskStore:
    """Layout: ``<root>/<run_id>/step_<step:08d>/rank_<rank:05d>.bin`` (+ ``.json`` manifest).

    A step is complete for a rank when its manifest exists (the manifest is
    renamed into place last). One writer per (rank, step) at a time; readers
    and other ranks' writers may run concurrently.
    """

    def __init__(
        self,
        root: Path,
        run_id: str,
        *,
        bandwidth_gbps: float = 0.0,
        keep_last: int = 2,
        drop_cache: bool = True,
    ) -> None:
        if not run_id or run_id in (".", "..") or "/" in run_id or "\0" in run_id:
            raise CheckpointError(f"disk: run_id {run_id!r} must be one path component")
        if not bandwidth_gbps >= 0:  # also refuses NaN
            raise CheckpointError(
                f"backend.bandwidth_gbps={bandwidth_gbps!r}: must be >= 0 (0 = no cap)"
            )
        if keep_last < 1:
            raise CheckpointError(f"backend.keep_last={keep_last!r}: must keep at least 1")
        self.root = Path(root)
        self.run_id = run_id
        self.run_dir = self.root / run_id
        self.bandwidth_gbps = float(bandwidth_gbps)
        self.keep_last = int(keep_last)
        self.drop_cache = drop_cache
        self.abandon = threading.Event()
        """Set when the writer's generation failed: a write in flight stops at its
        next chunk (:class:`WriteAbandoned`), leaving no file behind."""

    # -- paths ------------------------------------------------------------
    def step_dir(self, step: int) -> Path:
        return self.run_dir / f"step_{step:08d}"

    def data_path(self, rank: int, step: int) -> Path:
        return self.step_dir(step) / f"rank_{rank:05d}.bin"

    def manifest_path(self, rank: int, step: int) -> Path:
        return self.step_dir(step) / f"rank_{rank:05d}.json"

    def describe(self) -> dict[str, str | float | int | bool]:
        """Where and how this store writes; the bandwidth is labelled emulated or real."""
        emulated = self.bandwidth_gbps > 0
        return {
            "root": str(self.root),
            "run_id": self.run_id,
            "keep_last": self.keep_last,
            "bandwidth_gbps": self.bandwidth_gbps,
            "bandwidth_emulated": emulated,
            "bandwidth": (
                f"emulated cap {self.bandwidth_gbps:g} Gbit/s (1e9 bit/s) per node"
                if emulated
                else "real device speed (not emulated)"
            ),
        }

    # -- writing ----------------------------------------------------------
    def write(self, rank: int, step: int, manifest: fmt.Manifest, data: DataBuffer) -> float:
        """Persist ``data[:manifest.data_nbytes]`` and its manifest; returns seconds taken."""
        t0 = time.perf_counter()
        if manifest.step != step or manifest.rank != rank:
            raise CheckpointError(
                f"disk: manifest of step {manifest.step} rank {manifest.rank} "
                f"written as step {step} rank {rank}"
            )
        mv = _flat_view(data)
        n = manifest.data_nbytes
        if mv.nbytes < n:
            raise CheckpointError(
                f"disk: buffer holds {mv.nbytes} bytes, manifest says data_nbytes {n}"
            )
        self._make_step_dir(step)
        man_path = self.manifest_path(rank, step)
        if man_path.exists():
            # Rewriting a step (training rewound after a recovery): withdraw the
            # old manifest first, so a crash below cannot leave it describing
            # half-replaced data.
            man_path.unlink()
            _fsync_dir(man_path.parent)
        self._write_file(self.data_path(rank, step), mv[:n], pace=True)
        self._write_file(man_path, memoryview(encode_manifest(manifest)), pace=False)
        return time.perf_counter() - t0

    def _make_step_dir(self, step: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.step_dir(step).mkdir()
        except FileExistsError:
            return
        # The new directory entry must survive a crash too, or the files
        # renamed into it below could vanish with it.
        _fsync_dir(self.run_dir)

    def _write_file(self, path: Path, mv: memoryview, *, pace: bool) -> None:
        # A fixed temporary name per file: a retry after a crash simply
        # truncates what the dead writer left.
        tmp = path.with_name(f".{path.name}.tmp")
        pacer = _Pacer(self.bandwidth_gbps) if pace and self.bandwidth_gbps > 0 else None
        chunk = pacer.chunk if pacer else _IO_CHUNK
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            writeback = _Writeback(fd, drop=self.drop_cache)
            off, n = 0, mv.nbytes
            while off < n:
                if self.abandon.is_set():
                    raise WriteAbandoned(f"disk: write of {path.name} abandoned at byte {off}")
                k = os.write(fd, mv[off : off + chunk])
                writeback.wrote(off, k)
                off += k
                if pacer:
                    pacer.advance(k)
            os.fsync(fd)
            if self.drop_cache:
                _drop_cache(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    # -- reading ----------------------------------------------------------
    def read_manifest(self, rank: int, step: int) -> fmt.Manifest:
        """The checked manifest of a complete (rank, step); CheckpointError if there is none."""
        path = self.manifest_path(rank, step)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(
                f"disk: no complete checkpoint of rank {rank} at step {step}: {path} does not exist"
            ) from None
        manifest = decode_manifest(raw, path)
        if manifest.step != step or manifest.rank != rank:
            raise fmt.FormatError(
                f"{path}: manifest is of step {manifest.step} rank {manifest.rank}, "
                f"its place says step {step} rank {rank}"
            )
        return manifest

    def read(
        self, rank: int, step: int, into: DataBuffer | None = None
    ) -> tuple[fmt.Manifest, memoryview]:
        """The verified checkpoint of (rank, step): its manifest and a view of its bytes.

        Reads into ``into`` when given (it must hold ``data_nbytes``), else into
        a new buffer. Every chunk checksum is verified; a mismatch raises
        :class:`~gemini.checkpoint.format.ChecksumError` naming the file, the
        chunk and its tensors.
        """
        manifest = self.read_manifest(rank, step)
        n = manifest.data_nbytes
        path = self.data_path(rank, step)
        if into is None:
            # np.empty: no zero-fill pass; the read itself touches every page.
            arr: Any = np.empty(n, dtype=np.uint8)
            buf = memoryview(arr)
        else:
            buf = _flat_view(into, writable=True)
            if buf.nbytes < n:
                raise CheckpointError(f"disk: buffer holds {buf.nbytes} bytes, {path} needs {n}")
        view = buf[:n]
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below, fd needed for fadvise
        except FileNotFoundError:
            raise fmt.FormatError(f"{path}: data file missing though its manifest exists") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != n:
                raise fmt.FormatError(
                    f"{path}: holds {size} bytes, its manifest says {n} (truncated or replaced)"
                )
            pacer = _Pacer(self.bandwidth_gbps) if self.bandwidth_gbps > 0 else None
            chunk = pacer.chunk if pacer else _IO_CHUNK
            off = 0
            while off < n:
                k = f.readinto(view[off : off + chunk])
                if not k:
                    raise fmt.FormatError(f"{path}: ended after {off} of {n} bytes")
                if self.drop_cache:
                    # The bytes now live in the caller's buffer; a second copy
                    # in the page cache only competes with training for RAM.
                    _drop_cache(f.fileno(), off, k)
                off += k
                if pacer:
                    pacer.advance(k)
        try:
            fmt.verify(view, manifest)
        except fmt.ChecksumError as e:
            raise fmt.ChecksumError(
                f"{path}: {e}",
                chunk=e.chunk,
                start=e.start,
                end=e.end,
                tensors=e.tensors,
                expected=e.expected,
                actual=e.actual,
                bad_chunks=e.bad_chunks,
            ) from None
        return manifest, view

    # -- listing and pruning ----------------------------------------------
    def _steps(self) -> list[int]:
        """Every step directory, complete or not, newest first."""
        try:
            entries = list(os.scandir(self.run_dir))
        except FileNotFoundError:
            return []
        steps = []
        for e in entries:
            m = _STEP_RE.fullmatch(e.name)
            if m and e.is_dir(follow_symlinks=False):
                steps.append(int(m.group(1)))
        return sorted(steps, reverse=True)

    def _manifests_in(self, step: int) -> set[str]:
        try:
            return {n for n in os.listdir(self.step_dir(step)) if n.endswith(".json")}
        except FileNotFoundError:  # pruned meanwhile
            return set()

    def rank_steps(self, rank: int) -> list[int]:
        """Complete steps of ``rank``, newest first."""
        name = self.manifest_path(rank, 0).name
        return [s for s in self._steps() if name in self._manifests_in(s)]

    def complete_steps(self, world_size: int) -> list[int]:
        """Steps complete for every rank ``0..world_size-1``, newest first."""
        need = {self.manifest_path(r, 0).name for r in range(world_size)}
        return [s for s in self._steps() if need <= self._manifests_in(s)]

    def prune(self, world_size: int) -> list[int]:
        """Delete step dirs older than the ``keep_last`` newest complete steps; returns them.

        A step newer than those is never deleted, even if incomplete: some
        rank may still be writing it.
        """
        keep = self.complete_steps(world_size)[: self.keep_last]
        if not keep:
            return []
        oldest_kept = keep[-1]
        removed = []
        for step in self._steps():
            if step >= oldest_kept:
                continue
            # Rename first: the step disappears from every listing atomically,
            # however long the delete takes or wherever it is interrupted.
            trash = self.run_dir / f".trash-step_{step:08d}-{os.getpid()}"
            try:
                os.rename(self.step_dir(step), trash)
            except FileNotFoundError:  # another pruner got there first
                continue
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(step)
        # Leftovers of a pruner that died mid-delete: already out of every listing.
        for stale in self.run_dir.glob(".trash-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        return removed

    def drop_newer_than(self, step: int) -> list[int]:
        """Delete every step directory above ``step``, complete or not; returns them.

        After a recovery restored ``step``, a newer step on storage was written
        by the timeline the rollback abandoned (or was being written when it
        ended): it must never be planned, nor count among the ``keep_last``
        newest when pruning. Only call this while no rank is writing.
        """
        dropped = []
        for s in self._steps():
            if s <= step:
                continue
            trash = self.run_dir / f".trash-step_{s:08d}-{os.getpid()}"
            try:
                os.rename(self.step_dir(s), trash)
            except FileNotFoundError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
            dropped.append(s)
        return dropped

    def clear_partial_writes(self) -> list[Path]:
        """Delete the temporary files of writers that died mid-file; returns them.

        A writer killed inside :meth:`_write_file` leaves its ``.<name>.tmp``
        behind. A retry of the same step would truncate it, but after a
        rollback that step may never be written again, and the file would
        outlive the run. Only call this while no rank is writing.
        """
        cleared = []
        for step in self._steps():
            for tmp in self.step_dir(step).glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    cleared.append(tmp)
        return cleared

    def generation(self, step: int, world_size: int) -> int:
        """The oldest generation that wrote a rank's checkpoint of ``step`` (0 = unknown)."""
        return min(self.read_manifest(r, step).generation for r in range(world_size))

    def check_config(self, config_hash: str, step: int, rank: int) -> None:
        """Refuse a stored checkpoint written by another config (layout, world size, seed)."""
        stored = self.read_manifest(rank, step).config_hash
        if stored != config_hash:
            raise CheckpointError(
                f"checkpoint at {self.manifest_path(rank, step)} was written by another "
                f"config (hash {stored}, this run {config_hash}): point backend.path "
                "elsewhere or delete it"
            )


def storage_complete_steps(
    cfg: GeminiConfig,
    job_dir: str | Path,
    run_id: str,
    world_size: int,
    *,
    config_hash: str | None = None,
) -> list[int]:
    """Steps on storage complete for every rank, newest first (for recovery planning).

    With ``config_hash``, the newest step's rank-0 manifest is checked first
    and a checkpoint of another config is refused with a CheckpointError.
    """
    store = DiskStore(storage_dir(cfg, job_dir), run_id, drop_cache=False)
    steps = store.complete_steps(world_size)
    if steps and config_hash is not None:
        store.check_config(config_hash, steps[0], 0)
    return steps


def storage_checkpoints(
    cfg: GeminiConfig,
    job_dir: str | Path,
    run_id: str,
    world_size: int,
    *,
    config_hash: str | None = None,
) -> list[tuple[int, int]]:
    """``(step, generation)`` of every step complete on storage, newest first.

    The generation is the oldest that wrote any rank's part of the step: the
    one that decides whether the step is on the current timeline. A step
    pruned while being listed is left out.
    """
    store = DiskStore(storage_dir(cfg, job_dir), run_id, drop_cache=False)
    out = []
    for step in storage_complete_steps(cfg, job_dir, run_id, world_size, config_hash=config_hash):
        try:
            out.append((step, store.generation(step, world_size)))
        except CheckpointError:
            continue
    return out


def trim_storage(cfg: GeminiConfig, job_dir: str | Path, run_id: str, step: int) -> list[int]:
    """Storage's share of a recovery's trim; returns the steps dropped.

    Every step above ``step`` goes (:meth:`DiskStore.drop_newer_than`), and
    so does every temporary file a writer killed by the failure left in the
    steps that stay (:meth:`DiskStore.clear_partial_writes`). Only call this
    while no rank is writing: between the teardown and the next launch.
    """
    store = DiskStore(storage_dir(cfg, job_dir), run_id)
    dropped = store.drop_newer_than(step)
    store.clear_partial_writes()
    return dropped


# -- the backend --------------------------------------------------------------
class DiskBackend(CheckpointBackend):
    """``backend=disk``: every checkpoint goes to the shared filesystem.

    ``persist=blocking`` copies the state into a RAM staging buffer, then
    checksums, writes and fsyncs it, all inside ``snapshot`` (the paper's
    remote-storage baselines). ``persist=background`` (CheckFreq) copies into
    the staging buffer in a thread that overlaps the next forward/backward,
    ``wait`` joins only that copy, and the write continues in the thread; the
    next ``snapshot`` first waits for it (that wait is stall). In that mode
    ``timing.persist_s`` is filled in by the thread when the write ends, i.e.
    after ``wait`` returned it: :attr:`last_persisted` holds the timing of
    the newest checkpoint whose write has finished.
    """

    name = "disk"

    def __init__(self, ctx: BackendContext, *, root: Path | None = None) -> None:
        super().__init__(ctx)
        b = ctx.job.cfg.backend
        self.persist = b.persist
        if self.persist not in PERSIST_MODES:
            raise CheckpointError(
                f"backend.persist={self.persist!r}: use one of {', '.join(PERSIST_MODES)}"
            )
        self.chunk_bytes = b.chunk_mb << 20
        self.store = DiskStore(
            Path(root) if root is not None else storage_dir(ctx.job.cfg, ctx.job.job_dir),
            ctx.job.storage_run,
            bandwidth_gbps=b.bandwidth_gbps,
            keep_last=b.keep_last,
        )
        self._staging: torch.Tensor | None = None
        self._worker: threading.Thread | None = None
        self._copy_done = threading.Event()
        self._error: BaseException | None = None
        self.last_persisted: SnapshotTiming | None = None
        """Timing of the newest checkpoint whose write to storage has finished."""

    def describe(self) -> dict[str, str | float | int | bool]:
        return {"backend": self.name, "persist": self.persist, **self.store.describe()}

    # -- hooks ------------------------------------------------------------
    def _snapshot(self, step: int, state: TrainState, timing: SnapshotTiming) -> None:
        # The previous background write reads the staging buffer: it must end
        # before the buffer is refilled. The public method counts this as stall.
        self._join_worker()
        tensors = state.tensors()
        extra = state.extra()  # now, not in the thread: RNG and step of this step
        entries, nbytes = fmt.layout(tensors)
        buf = self._staging_for(nbytes)
        timing.bytes = nbytes
        if self.persist == "blocking":
            t0 = time.perf_counter()
            fmt.write_state(tensors, entries, buf)
            timing.local_s = time.perf_counter() - t0
            timing.persist_s = self._persist(step, entries, nbytes, extra, buf)
            self.last_persisted = timing
            return
        self._copy_done.clear()
        self._worker = threading.Thread(
            target=self._background,
            args=(step, tensors, entries, nbytes, extra, buf, timing),
            name=f"gemini-disk-persist-{step}",
            daemon=True,
        )
        self._worker.start()

    def _wait(self, timing: SnapshotTiming) -> None:
        if self.persist == "background":
            # Only the copy: after it the optimizer may change the parameters.
            self._copy_done.wait()
            self._raise_if_failed()

    def checkpoint_cost(self, timing: SnapshotTiming) -> float | None:
        """A background persist finishes after wait(): cost it with the newest
        finished one, and until one has finished there is no measurement. The
        copy alone would understate t_ckpt many times over and keep HighFreq's
        interval short until that sample left the policy's moving average."""
        if self.persist == "background" and timing.persist_s == 0.0:
            late = self.last_persisted
            return None if late is None else timing.local_s + late.persist_s
        return super().checkpoint_cost(timing)

    def _complete_steps(self) -> list[int]:
        return self.store.rank_steps(self.ctx.rank)

    def _retrieve(self, step: int, source: dict[str, Any]) -> Retrieved:
        self._join_worker()
        self.store.check_config(self.ctx.config_hash, step, self.ctx.rank)
        manifest, view = self.store.read(self.ctx.rank, step)
        # Views, not copies: the buffer is ours alone and TrainState.load copies
        # out of it, so a clone here would only double memory and time.
        tensors = fmt.read_state(view, manifest, copy=False)
        return Retrieved(
            step=manifest.step,
            tensors=tensors,
            extra=manifest.extra,
            source="storage",
            bytes=manifest.data_nbytes,
            retrieve_s=0.0,
        )

    def _close(self, abandon: bool) -> None:
        try:
            if abandon:
                self.store.abandon.set()
                with contextlib.suppress(CheckpointError):
                    self._join_worker()
            else:
                self._join_worker()  # the last checkpoint must reach storage
        finally:
            self._staging = None

    # -- internals --------------------------------------------------------
    def _staging_for(self, nbytes: int) -> torch.Tensor:
        if self._staging is None or self._staging.numel() < nbytes:
            # Allocated once with the exact size and touched now: first-touch
            # page faults cost 4-30x a copy into warm memory (MACHINE.md).
            self._staging = torch.zeros(nbytes, dtype=torch.uint8)
        return self._staging

    def _persist(
        self,
        step: int,
        entries: list[fmt.TensorEntry],
        nbytes: int,
        extra: dict[str, Any],
        buf: torch.Tensor,
    ) -> float:
        """Checksum the staged bytes, write them and (rank 0) prune; returns seconds."""
        t0 = time.perf_counter()
        manifest = fmt.Manifest(
            step=step,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            config_hash=self.ctx.config_hash,
            tensors=entries,
            data_nbytes=nbytes,
            chunk_bytes=self.chunk_bytes,
            checksums=fmt.checksum(buf, nbytes, self.chunk_bytes),
            extra=extra,
            generation=self.ctx.generation,
        )
        self.store.write(self.ctx.rank, step, manifest, buf)
        if self.ctx.rank == 0:
            self.store.prune(self.ctx.world_size)
        return time.perf_counter() - t0

    def _background(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        entries: list[fmt.TensorEntry],
        nbytes: int,
        extra: dict[str, Any],
        buf: torch.Tensor,
        timing: SnapshotTiming,
    ) -> None:
        try:
            t0 = time.perf_counter()
            fmt.write_state(tensors, entries, buf)
            timing.local_s = time.perf_counter() - t0
        except BaseException as e:
            self._error = e
            return
        finally:
            self._copy_done.set()
        try:
            timing.persist_s = self._persist(step, entries, nbytes, extra, buf)
            self.last_persisted = timing
        except BaseException as e:
            self._error = e

    def _join_worker(self) -> None:
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        err, self._error = self._error, None
        if err is not None:
            raise CheckpointError(f"disk: background checkpoint failed: {err}") from err
