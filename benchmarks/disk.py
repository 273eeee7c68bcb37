"""What crash-safe checkpoint writes cost on top of the raw disk, and what the cap emulates.

Part 1 writes the same N MiB (default 512) two ways in one run, alternating
the order every repetition so page-cache and writeback drift cancel out:

* ``raw``   — ``os.write`` of the whole buffer to a new file + ``fsync`` + close;
* ``store`` — ``DiskStore.write``: temp name, write, fsync, fadvise(DONTNEED),
  rename, fsync dir, then the manifest the same way (what ``backend=disk`` does).

It prints the median time of each and ``ratio = raw / store`` (store throughput
as a fraction of raw throughput); the target is ``>= 0.8``. The store can come
out ahead (ratio > 1): it streams, starting write-back of each 16 MiB piece as
soon as it is written and recycling the same page-cache pages, where the raw
write dirties the whole file in fresh pages and flushes it all at the fsync.

Part 2 writes and reads back M MiB (default 64) through a DiskStore with an
*emulated* bandwidth cap (``bandwidth_gbps``, 1 Gbit/s = 1e9 bit/s) and prints
the achieved rate beside the cap: it should sit just under the cap (the cap is
a ceiling; fsync and open/rename come on top).

Run: ``.venv/bin/python benchmarks/disk.py [--mib 512] [--repeat 5] [--dir PATH]
[--cap-mib 64] [--caps 1,4]``. ``--dir`` must be on the filesystem to measure
(default: a temporary directory under ``$TMPDIR``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gemini.checkpoint import format as fmt
from gemini.checkpoint.disk import DiskStore


def _payload(nbytes: int, chunk_bytes: int) -> tuple[fmt.Manifest, torch.Tensor]:
    # Random bytes so no layer below (compression, dedup) gets a shortcut;
    # the buffer is touched here so page faults are not measured later.
    data = torch.from_numpy(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8))
    state = {"data": data}
    manifest = fmt.make_manifest(
        state,
        step=0,
        rank=0,
        world_size=1,
        config_hash="bench",
        extra={},
        buf=data,
        chunk_bytes=chunk_bytes,
    )
    return manifest, data


def _raw_write(path: Path, mv: memoryview) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off = 0
        while off < mv.nbytes:
            off += os.write(fd, mv[off:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def _store_write(store: DiskStore, step: int, manifest: fmt.Manifest, data: torch.Tensor) -> float:
    manifest.step = step
    t0 = time.perf_counter()
    store.write(0, step, manifest, data)
    return time.perf_counter() - t0


def _settle() -> None:
    # Start each measurement with no dirty pages from the previous one.
    os.sync()


def overhead(base: Path, mib: int, repeat: int, chunk_bytes: int) -> float:
    nbytes = mib << 20
    manifest, data = _payload(nbytes, chunk_bytes)
    mv = memoryview(data.numpy()).cast("B")
    store = DiskStore(base / "store", "bench", keep_last=1)
    raw_dir = base / "raw"
    raw_dir.mkdir(parents=True)
    raw_s: list[float] = []
    store_s: list[float] = []
    # One unmeasured round of each warms the allocator, the directories and the disk.
    _raw_write(raw_dir / "warm.bin", mv)
    (raw_dir / "warm.bin").unlink()
    _store_write(store, 0, manifest, data)
    shutil.rmtree(store.run_dir, ignore_errors=True)
    for i in range(1, repeat + 1):
        order = ("raw", "store") if i % 2 else ("store", "raw")
        for which in order:
            _settle()
            if which == "raw":
                raw_s.append(_raw_write(raw_dir / f"rep{i}.bin", mv))
                (raw_dir / f"rep{i}.bin").unlink()
            else:
                store_s.append(_store_write(store, i, manifest, data))
                shutil.rmtree(store.run_dir, ignore_errors=True)
            # Each file is deleted (untimed) right after its write, so both
            # writers start with the same free page cache: the raw file's clean
            # cached pages would otherwise make the next writer fault in fresh
            # pages, which on this VM (a balloon device) costs more than the
            # write itself and would be charged to whoever comes second.
    raw_med, store_med = statistics.median(raw_s), statistics.median(store_s)
    paired = [r / s for r, s in zip(raw_s, store_s, strict=True)]
    print(f"part 1: {mib} MiB, {repeat} alternating repetitions, dir {base}")
    print(f"  raw write+fsync    median {raw_med:.3f} s  ({nbytes / raw_med / 1e9:.2f} GB/s)")
    print(f"  DiskStore.write    median {store_med:.3f} s  ({nbytes / store_med / 1e9:.2f} GB/s)")
    print(f"  per-repetition raw/store: {', '.join(f'{r:.2f}' for r in paired)}")
    ratio = raw_med / store_med
    verdict = "meets" if ratio >= 0.8 else "MISSES"
    print(f"  ratio raw/store (medians) = {ratio:.2f}  [{verdict} target >= 0.8]")
    return ratio


def capped(base: Path, mib: int, caps: list[float], chunk_bytes: int) -> None:
    nbytes = mib << 20
    manifest, data = _payload(nbytes, chunk_bytes)
    into = torch.zeros(nbytes, dtype=torch.uint8)
    print(f"part 2: {mib} MiB through DiskStore with an EMULATED bandwidth cap")
    for i, cap in enumerate(caps, start=1):
        store = DiskStore(base / f"cap{i}", "bench", bandwidth_gbps=cap)
        _settle()
        w = _store_write(store, 1, manifest, data)
        t0 = time.perf_counter()
        store.read(0, 1, into=into)
        r = time.perf_counter() - t0
        for what, s in (("write", w), ("read ", r)):
            gbps = nbytes * 8 / s / 1e9
            print(
                f"  cap {cap:5.2f} Gbit/s (emulated)  {what} {s:6.3f} s  "
                f"achieved {gbps:5.2f} Gbit/s = {gbps / cap:.2f} x cap"
            )
        shutil.rmtree(store.root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512, help="part 1 checkpoint size, MiB")
    ap.add_argument("--repeat", type=int, default=5, help="part 1 repetitions of each")
    ap.add_argument("--cap-mib", type=int, default=64, help="part 2 checkpoint size, MiB")
    ap.add_argument("--caps", default="1,4", help="part 2 caps, Gbit/s, comma separated")
    ap.add_argument("--chunk-mib", type=int, default=4, help="checksum chunk, MiB")
    ap.add_argument("--dir", default=None, help="where to write (the filesystem measured)")
    args = ap.parse_args(argv)

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.platform()}")
    with tempfile.TemporaryDirectory(prefix="gemini-disk-bench-", dir=args.dir) as tmp:
        base = Path(tmp)
        chunk = args.chunk_mib << 20
        overhead(base / "overhead", args.mib, args.repeat, chunk)
        capped(base, args.cap_mib, [float(c) for c in args.caps.split(",")], chunk)


if __name__ == "__main__":
    main()
