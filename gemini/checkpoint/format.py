"""The on-memory checkpoint format of one rank: flat tensor bytes + JSON manifest.

A rank's checkpoint is one flat byte buffer holding every tensor of its state
at an aligned offset, a JSON :class:`Manifest` that says where each tensor
lives (name, dtype, shape, offset, nbytes), the non-tensor state (``extra``:
data position, scheduler state, ...) and one checksum per fixed-size chunk of
the buffer. There is no pickle anywhere: a checkpoint received from a peer is
parsed and validated, never executed.

This module owns the layout (:func:`layout`), copying a state into a buffer
and back (:func:`write_state`, :func:`read_state`, zero-copy views via
``torch.frombuffer``), the checksums (:func:`checksum`, :func:`verify`, and
:func:`write_checksummed`, which copies and hashes in one pass) and
the manifest's (de)serialisation with validation. Where the buffer lives
(shared memory, a file, a socket) is somebody else's business.

Checksum choice, measured with ``benchmarks/hashes.py`` on a 2-core x86 machine
(AMD EPYC, 256 MiB in 4 MiB chunks, straight from a memoryview):
xxh3_64 31 GB/s (1.27x a torch memcpy of the same bytes, 24.6 GB/s),
xxh3_128 30.6, crc32c (hardware) 14.9, xxh64 10.2, zlib.crc32 4.1,
zlib.adler32 3.6. xxh3_64 wins clearly, so verifying a checkpoint costs less
than copying it; threads did not help (memory bound).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash

__all__ = [
    "CHECKSUM_ALGO",
    "DEFAULT_CHUNK_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "ChecksumError",
    "FormatError",
    "Manifest",
    "TensorEntry",
    "checksum",
    "layout",
    "make_manifest",
    "read_state",
    "verify",
    "write_checksummed",
    "write_state",
]

DEFAULT_CHUNK_BYTES = 4 << 20
"""Checksum granularity: small enough that a mismatch points at a few tensors,
large enough that per-call overhead is noise (1 MiB and 4 MiB hash equally
fast here) and a 100 GB shard needs only ~25k digests in the manifest."""

FORMAT_NAME = "gemini-ckpt"
FORMAT_VERSION = 2
"""Version 2 added ``generation``; version 1 manifests still read, as generation 0."""
READABLE_VERSIONS = (1, 2)
CHECKSUM_ALGO = "xxh3_64"

_HEX16 = re.compile(r"[0-9a-f]{16}")
# At most this many bad chunks are spelled out in a ChecksumError message.
_MAX_REPORTED_CHUNKS = 8

Buffer = memoryview | bytes | bytearray | torch.Tensor


class FormatError(Exception):
    """A manifest is malformed, or a state/buffer does not match its layout."""


class ChecksumError(FormatError):
    """The data does not match the manifest's checksums.

    ``chunk``, ``start``, ``end``, ``tensors``, ``expected`` and ``actual``
    describe the first bad chunk; ``bad_chunks`` lists every bad chunk index.
    """

    def __init__(
        self,
        message: str,
        *,
        chunk: int,
        start: int,
        end: int,
        tensors: list[str],
        expected: str,
        actual: str,
        bad_chunks: list[int],
    ) -> None:
        super().__init__(message)
        self.chunk = chunk
        self.start = start
        self.end = end
        self.tensors = tensors
        self.expected = expected
        self.actual = actual
        self.bad_chunks = bad_chunks


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in the flat buffer."""

    name: str
    dtype: str
    """torch dtype name without the ``torch.`` prefix, e.g. ``bfloat16``."""
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class Manifest:
    """Everything needed to interpret (and trust) one rank's flat buffer."""

    step: int
    rank: int
    world_size: int
    config_hash: str
    tensors: list[TensorEntry]
    data_nbytes: int
    chunk_bytes: int
    checksums: list[str]
    """One ``xxh3_64`` hex digest per ``chunk_bytes`` of ``buf[:data_nbytes]``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """JSON-able non-tensor state. JSON has no tuples: they come back as lists."""
    generation: int = 0
    """The generation (one launch of all ranks) that wrote this checkpoint. After a
    rollback a newer step written by an older generation belongs to an abandoned
    timeline (``gemini.lineage``); 0 = unknown (a version 1 manifest)."""

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "checksum_algo": CHECKSUM_ALGO,
            "step": self.step,
            "generation": self.generation,
            "rank": self.rank,
            "world_size": self.world_size,
            "config_hash": self.config_hash,
            "data_nbytes": self.data_nbytes,
            "chunk_bytes": self.chunk_bytes,
            "tensors": [[t.name, t.dtype, list(t.shape), t.offset, t.nbytes] for t in self.tensors],
            "checksums": self.checksums,
            "extra": self.extra,
        }
        try:
            # Compact: the manifest travels with every replica and lives in a
            # fixed-capacity shared-memory region.
            return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as e:
            raise FormatError(f"manifest field 'extra' is not JSON-serialisable: {e}") from e

    @classmethod
    def from_json(cls, raw: bytes | bytearray | memoryview) -> Manifest:
        try:
            doc = json.loads(bytes(raw))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"manifest is not valid JSON: {e}") from e
        if not isinstance(doc, dict):
            raise FormatError(f"manifest must be a JSON object, got {type(doc).__name__}")
        if doc.get("format") != FORMAT_NAME:
            raise FormatError(
                f"manifest field 'format' is {doc.get('format')!r}, not {FORMAT_NAME!r}"
            )
        version = doc.get("version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise FormatError(
                f"manifest field 'version' is {version!r}; this reader understands "
                f"versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        if doc.get("checksum_algo") != CHECKSUM_ALGO:
            raise FormatError(
                f"manifest field 'checksum_algo' is {doc.get('checksum_algo')!r}, "
                f"not {CHECKSUM_ALGO!r}"
            )
        step = _int_field(doc, "step")
        generation = _int_field(doc, "generation") if version >= 2 else 0
        rank = _int_field(doc, "rank")
        world_size = _int_field(doc, "world_size", minimum=1)
        if rank >= world_size:
            raise FormatError(f"manifest field 'rank' is {rank}, not < world_size {world_size}")
        config_hash = _field(doc, "config_hash", str)
        data_nbytes = _int_field(doc, "data_nbytes")
        chunk_bytes = _int_field(doc, "chunk_bytes", minimum=1)
        extra = _field(doc, "extra", dict)

        raw_tensors = _field(doc, "tensors", list)
        tensors = [_parse_entry(i, t) for i, t in enumerate(raw_tensors)]
        _check_entries(tensors, data_nbytes)

        checksums = _field(doc, "checksums", list)
        n_chunks = math.ceil(data_nbytes / chunk_bytes)
        if len(checksums) != n_chunks:
            raise FormatError(
                f"manifest field 'checksums' has {len(checksums)} digests; "
                f"data_nbytes {data_nbytes} / chunk_bytes {chunk_bytes} needs {n_chunks}"
            )
        for i, c in enumerate(checksums):
            if not isinstance(c, str) or not _HEX16.fullmatch(c):
                raise FormatError(f"manifest field 'checksums[{i}]' is {c!r}, not 16 hex digits")

        return cls(
            step=step,
            rank=rank,
            world_size=world_size,
            config_hash=config_hash,
            tensors=tensors,
            data_nbytes=data_nbytes,
            chunk_bytes=chunk_bytes,
            checksums=checksums,
            extra=extra,
            generation=generation,
        )


def _field(doc: Mapping[str, Any], key: str, typ: type) -> Any:
    if key not in doc:
        raise FormatError(f"manifest field {key!r} is missing")
    value = doc[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise FormatError(
            f"manifest field {key!r} must be {typ.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _int_field(doc: Mapping[str, Any], key: str, minimum: int = 0) -> int:
    value: int = _field(doc, key, int)
    if value < minimum:
        raise FormatError(f"manifest field {key!r} is {value}, must be >= {minimum}")
    return value


def _parse_entry(i: int, raw: Any) -> TensorEntry:
    where = f"tensors[{i}]"
    if not isinstance(raw, list) or len(raw) != 5:
        raise FormatError(
            f"manifest field {where!r} must be [name, dtype, shape, offset, nbytes], got {raw!r}"
        )
    name, dtype, shape, offset, nbytes = raw
    if not isinstance(name, str):
        raise FormatError(f"manifest field '{where}.name' must be str, got {name!r}")
    where = f"tensors[{i}] ({name!r})"
    if not isinstance(dtype, str):
        raise FormatError(f"manifest field '{where}.dtype' must be str, got {dtype!r}")
    try:
        dt = _dtype(dtype)
    except FormatError as e:
        raise FormatError(f"manifest field '{where}.dtype': {e}") from None
    if not isinstance(shape, list) or not all(_is_nonneg_int(d) for d in shape):
        raise FormatError(
            f"manifest field '{where}.shape' must be a list of ints >= 0, got {shape!r}"
        )
    for key, v in (("offset", offset), ("nbytes", nbytes)):
        if not _is_nonneg_int(v):
            raise FormatError(f"manifest field '{where}.{key}' must be an int >= 0, got {v!r}")
    expected = math.prod(shape) * dt.itemsize
    if nbytes != expected:
        raise FormatError(
            f"manifest field '{where}.nbytes' is {nbytes}, but shape {shape} of {dtype} "
            f"needs {expected}"
        )
    if offset % dt.itemsize:
        raise FormatError(
            f"manifest field '{where}.offset' {offset} is not a multiple of the "
            f"{dtype} item size {dt.itemsize}"
        )
    return TensorEntry(name, dtype, tuple(shape), offset, nbytes)


def _check_entries(entries: list[TensorEntry], data_nbytes: int) -> None:
    seen: set[str] = set()
    for i, e in enumerate(entries):
        if e.name in seen:
            raise FormatError(f"manifest field 'tensors[{i}].name' {e.name!r} is duplicated")
        seen.add(e.name)
        if e.offset + e.nbytes > data_nbytes:
            raise FormatError(
                f"manifest field 'tensors[{i}]' ({e.name!r}) spans bytes "
                f"[{e.offset}, {e.offset + e.nbytes}) beyond data_nbytes {data_nbytes}"
            )
    # Overlapping tensors would make a restore silently alias two states.
    ordered = sorted((e for e in entries if e.nbytes), key=lambda e: e.offset)
    for a, b in itertools.pairwise(ordered):
        if a.offset + a.nbytes > b.offset:
            raise FormatError(f"manifest field 'tensors': {a.name!r} overlaps {b.name!r}")


def _is_nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


@functools.cache
def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"unknown dtype {name!r}")
    if name.startswith(("qint", "quint")):
        # Quantized bytes mean nothing without their scale/zero-point.
        raise FormatError(f"quantized dtype {name!r} cannot be stored as raw bytes")
    try:
        # Only dtypes that can be reinterpreted from raw bytes can be stored flat.
        torch.empty(dt.itemsize, dtype=torch.uint8).view(dt)
    except (RuntimeError, TypeError) as e:
        raise FormatError(f"dtype {name!r} cannot be stored as raw bytes: {e}") from None
    return dt


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def layout(state: Mapping[str, torch.Tensor], align: int = 64) -> tuple[list[TensorEntry], int]:
    """Place every tensor of ``state`` in insertion order at an aligned offset.

    ``align`` (a power of two) defaults to a cache line so that copies into the
    buffer run at full speed; every offset is also a multiple of the tensor's
    item size, which ``Tensor.view(dtype)`` requires. Returns the entries and
    the total bytes (the end of the last tensor, unpadded).
    """
    if align < 1 or align & (align - 1):
        raise FormatError(f"align must be a power of two, got {align}")
    entries: list[TensorEntry] = []
    off = 0
    end = 0
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"state[{name!r}] is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided:
            raise FormatError(f"state[{name!r}] has layout {t.layout}; only dense tensors")
        dt = _dtype(_dtype_name(t.dtype))
        off = _align_up(end, max(align, dt.itemsize))
        nbytes = t.numel() * dt.itemsize
        entries.append(TensorEntry(name, _dtype_name(dt), tuple(t.shape), off, nbytes))
        end = off + nbytes
    return entries, end


def _as_memoryview(buf: Buffer) -> memoryview:
    """A flat byte memoryview of ``buf`` without copying."""
    if isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise FormatError("buffer tensor must be a contiguous CPU tensor")
        # numpy has no bfloat16; any tensor's bytes are reachable as uint8.
        arr: Any = buf.view(torch.uint8).reshape(-1).numpy()
        return memoryview(arr).cast("B")
    mv = memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def _as_uint8_tensor(buf: Buffer) -> torch.Tensor:
    """A flat uint8 tensor over ``buf``'s memory, without copying."""
    if isinstance(buf, torch.Tensor):
        if not buf.is_contiguous():
            raise FormatError("buffer tensor must be contiguous")
        return buf.view(torch.uint8).reshape(-1)
    mv = _as_memoryview(buf)
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if mv.readonly:
        # torch warns on read-only buffers; callers only read these (read_state
        # with copy=True, or copy=False documented as read-only views).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.frombuffer(mv, dtype=np.uint8))
    return torch.frombuffer(mv, dtype=torch.uint8)


def _view(flat: torch.Tensor, e: TensorEntry) -> torch.Tensor:
    dt = _dtype(e.dtype)
    return flat[e.offset : e.offset + e.nbytes].view(dt).view(e.shape)


def _check_fits(flat: torch.Tensor, nbytes: int, what: str) -> None:
    if flat.numel() < nbytes:
        raise FormatError(f"{what}: buffer holds {flat.numel()} bytes, layout needs {nbytes}")


def _checked_sources(
    state: Mapping[str, torch.Tensor], entries: list[TensorEntry], flat: torch.Tensor, what: str
) -> list[tuple[TensorEntry, torch.Tensor]]:
    """Pair each entry with its tensor of ``state``, refusing any mismatch."""
    if len(entries) != len(state):
        raise FormatError(f"layout has {len(entries)} tensors, state has {len(state)}")
    _check_fits(flat, max((e.offset + e.nbytes for e in entries), default=0), what)
    pairs = []
    for e in entries:
        src = state.get(e.name)
        if src is None:
            raise FormatError(f"state has no tensor {e.name!r} named in the layout")
        if _dtype_name(src.dtype) != e.dtype or tuple(src.shape) != e.shape:
            raise FormatError(
                f"tensor {e.name!r} is {_dtype_name(src.dtype)}{list(src.shape)}, "
                f"layout says {e.dtype}{list(e.shape)}"
            )
        pairs.append((e, src))
    return pairs


def write_state(state: Mapping[str, torch.Tensor], entries: list[TensorEntry], buf: Buffer) -> None:
    """Copy every tensor of ``state`` into ``buf`` at its entry's offset.

    Each destination is a typed view into ``buf`` and the copy is one
    ``copy_``, so this runs at memcpy speed, handles non-contiguous sources and
    device-to-host copies, and allocates nothing.
    """
    flat = _as_uint8_tensor(buf)
    pairs = _checked_sources(state, entries, flat, "write_state")
    with torch.no_grad():
        for e, src in pairs:
            if e.nbytes:
                _view(flat, e).copy_(src)


_PIECE_BYTES = 512 << 10
"""Copy granularity of :func:`write_checksummed`. A piece is hashed right after
it is copied, while it is still in the core's L2 cache (1 MiB here): hashing
from cache ran at 50-68 GB/s against 24 GB/s from DRAM. 512 KiB measured best
among 256 KiB-2 MiB for a gpt_small state (snapshot/copy_ 0.86 vs 0.70 for a
copy followed by a separate checksum pass)."""


def _host_bytes(t: torch.Tensor) -> np.ndarray | None:
    """``t``'s bytes as a flat uint8 array without copying, or None if it has none.

    None for tensors whose memory is not a plain dense host array: another
    device, non-contiguous, or with a lazy conjugate/negation bit.
    """
    if t.device.type != "cpu" or not t.is_contiguous() or t.is_conj() or t.is_neg():
        return None
    arr: np.ndarray = t.detach().reshape(-1).view(torch.uint8).numpy()
    return arr


def write_checksummed(
    state: Mapping[str, torch.Tensor],
    entries: list[TensorEntry],
    buf: Buffer,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    piece_bytes: int = _PIECE_BYTES,
) -> list[str]:
    """:func:`write_state`, then :func:`checksum` of ``buf[:nbytes]``, in one pass.

    Returns the same digests as ``checksum(buf, nbytes, chunk_bytes)`` after
    ``write_state`` (``nbytes`` being the end of the last tensor), but copies
    host tensors piece by piece and hashes each piece while it is still in
    cache, so the checksum costs a fraction of a second read of the buffer.
    Padding between tensors is hashed as it lies in ``buf``, exactly as
    :func:`checksum` would. Tensors on another device or non-contiguous are
    copied whole with ``copy_`` and hashed after.
    """
    if chunk_bytes < 1 or piece_bytes < 1:
        raise FormatError(
            f"chunk_bytes and piece_bytes must be >= 1, got {chunk_bytes} and {piece_bytes}"
        )
    flat = _as_uint8_tensor(buf)
    if flat.device.type != "cpu":
        raise FormatError("write_checksummed: the buffer must be in host memory")
    pairs = _checked_sources(state, entries, flat, "write_checksummed")
    pairs.sort(key=lambda p: p[0].offset)
    nbytes = max((e.offset + e.nbytes for e, _ in pairs), default=0)
    dst = flat.numpy()
    mv = _as_memoryview(flat)
    sums: list[str] = []
    hasher = xxhash.xxh3_64()
    hashed = 0
    chunk_end = min(chunk_bytes, nbytes)

    def hash_upto(end: int) -> None:
        nonlocal hashed, chunk_end
        while hashed < end:
            upto = min(end, chunk_end)
            hasher.update(mv[hashed:upto])
            hashed = upto
            if hashed == chunk_end:
                sums.append(hasher.hexdigest())
                hasher.reset()
                chunk_end = min(chunk_end + chunk_bytes, nbytes)

    with torch.no_grad():
        for e, src in pairs:
            if not e.nbytes:
                continue
            host = _host_bytes(src)
            if host is None:
                _view(flat, e).copy_(src)
                hash_upto(e.offset + e.nbytes)
                continue
            for o in range(0, e.nbytes, piece_bytes):
                n = min(piece_bytes, e.nbytes - o)
                start = e.offset + o
                np.copyto(dst[start : start + n], host[o : o + n])
                hash_upto(start + n)
    hash_upto(nbytes)
    return sums


def _digest(mv: memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(mv)


def checksum(buf: Buffer, nbytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[str]:
    """One xxh3_64 hex digest per ``chunk_bytes`` of ``buf[:nbytes]`` (last chunk short)."""
    if chunk_bytes < 1:
        raise FormatError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    mv = _as_memoryview(buf)
    if mv.nbytes < nbytes:
        raise FormatError(f"checksum: buffer holds {mv.nbytes} bytes, asked for {nbytes}")
    return [_digest(mv[o : min(o + chunk_bytes, nbytes)]) for o in range(0, nbytes, chunk_bytes)]


def _tensors_overlapping(entries: list[TensorEntry], start: int, end: int) -> list[str]:
    ordered = sorted((e for e in entries if e.nbytes), key=lambda e: e.offset)
    ends = [e.offset + e.nbytes for e in ordered]
    i = bisect.bisect_right(ends, start)
    names = []
    while i < len(ordered) and ordered[i].offset < end:
        names.append(ordered[i].name)
        i += 1
    return names


def verify(buf: Buffer, manifest: Manifest) -> None:
    """Check ``buf`` against ``manifest``'s checksums; raise :class:`ChecksumError` if not."""
    mv = _as_memoryview(buf)
    if mv.nbytes < manifest.data_nbytes:
        raise FormatError(
            f"verify: buffer holds {mv.nbytes} bytes, manifest says data_nbytes "
            f"{manifest.data_nbytes}"
        )
    actual = checksum(mv, manifest.data_nbytes, manifest.chunk_bytes)
    if len(actual) != len(manifest.checksums):
        raise FormatError(
            f"verify: manifest has {len(manifest.checksums)} checksums, "
            f"data has {len(actual)} chunks"
        )
    bad = [i for i, (a, b) in enumerate(zip(actual, manifest.checksums, strict=True)) if a != b]
    if not bad:
        return
    cb = manifest.chunk_bytes
    lines = []
    for i in bad[:_MAX_REPORTED_CHUNKS]:
        start, end = i * cb, min((i + 1) * cb, manifest.data_nbytes)
        names = _tensors_overlapping(manifest.tensors, start, end)
        lines.append(
            f"chunk {i} bytes [{start}, {end}): expected {CHECKSUM_ALGO} "
            f"{manifest.checksums[i]}, got {actual[i]}; tensors: "
            f"{', '.join(names) if names else '(padding only)'}"
        )
    if len(bad) > _MAX_REPORTED_CHUNKS:
        lines.append(f"... and {len(bad) - _MAX_REPORTED_CHUNKS} more bad chunks")
    first = bad[0]
    start, end = first * cb, min((first + 1) * cb, manifest.data_nbytes)
    raise ChecksumError(
        f"checksum mismatch in checkpoint of step {manifest.step} rank {manifest.rank}: "
        f"{len(bad)} of {len(actual)} chunks bad\n  " + "\n  ".join(lines),
        chunk=first,
        start=start,
        end=end,
        tensors=_tensors_overlapping(manifest.tensors, start, end),
        expected=manifest.checksums[first],
        actual=actual[first],
        bad_chunks=bad,
    )


def read_state(
    buf: Buffer,
    manifest: Manifest,
    out: Mapping[str, torch.Tensor] | None = None,
    copy: bool = True,
) -> dict[str, torch.Tensor]:
    """Rebuild the tensors of ``manifest`` from ``buf``.

    With ``out``, each tensor named in ``out`` is copied into that preallocated
    tensor (any device); a name in ``out`` missing from the manifest, or a
    shape/dtype mismatch, raises :class:`FormatError`. Tensors not in ``out``
    are returned as new tensors (``copy=True``) or as views into ``buf``
    (``copy=False``: they alias the buffer and must be treated as read-only if
    the buffer is). Does not verify checksums: call :func:`verify` first.
    """
    flat = _as_uint8_tensor(buf)
    _check_fits(flat, manifest.data_nbytes, "read_state")
    by_name = {e.name: e for e in manifest.tensors}
    if out is not None:
        missing = [n for n in out if n not in by_name]
        if missing:
            raise FormatError(f"checkpoint of step {manifest.step} has no tensor {missing[0]!r}")
    result: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for e in manifest.tensors:
            src = _view(flat, e)
            dst = out.get(e.name) if out is not None else None
            if dst is not None:
                if dst.dtype != src.dtype or tuple(dst.shape) != e.shape:
                    raise FormatError(
                        f"out[{e.name!r}] is {_dtype_name(dst.dtype)}{list(dst.shape)}, "
                        f"checkpoint has {e.dtype}{list(e.shape)}"
                    )
                dst.copy_(src)
                result[e.name] = dst
            else:
                result[e.name] = src.clone() if copy else src
    return result


def make_manifest(
    state: Mapping[str, torch.Tensor],
    *,
    step: int,
    rank: int,
    world_size: int,
    config_hash: str,
    extra: dict[str, Any],
    buf: Buffer,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    checksums: list[str] | None = None,
    generation: int = 0,
) -> Manifest:
    """The manifest of ``state`` already written into ``buf`` with ``layout(state)``.

    ``checksums``, if given, are the digests :func:`write_checksummed` returned
    for ``buf``; otherwise they are computed here.
    """
    entries, nbytes = layout(state)
    if checksums is None:
        checksums = checksum(buf, nbytes, chunk_bytes)
    elif len(checksums) != math.ceil(nbytes / chunk_bytes):
        raise FormatError(
            f"make_manifest: {len(checksums)} checksums given, "
            f"{nbytes} bytes in {chunk_bytes}-byte chunks need {math.ceil(nbytes / chunk_bytes)}"
        )
    return Manifest(
        step=step,
        rank=rank,
        world_size=world_size,
        config_hash=config_hash,
        tensors=entries,
        data_nbytes=nbytes,
        chunk_bytes=chunk_bytes,
        checksums=checksums,
        extra=extra,
        generation=generation,
    )
