"""Checksum throughput on this machine: which digest the checkpoint format uses.

Hashes a large buffer (default 256 MiB) in checkpoint-sized chunks straight
from a ``memoryview`` (no ``bytes`` copies, as ``gemini.checkpoint.format``
does) and prints GB/s per hash beside a plain memcpy of the same bytes, so the
ratio says how much a full verify costs relative to just copying the data.

Run: ``.venv/bin/python benchmarks/hashes.py [--mib 256] [--chunk-mib 4] [--repeat 3]``.
``crc32c`` is measured only if the optional package is importable.
"""

from __future__ import annotations

import argparse
import platform
import time
import zlib
from collections.abc import Callable

import numpy as np
import torch
import xxhash

HashFn = Callable[[memoryview], object]


def _hashes() -> dict[str, HashFn]:
    fns: dict[str, HashFn] = {
        "xxh3_64": lambda mv: xxhash.xxh3_64_intdigest(mv),
        "xxh3_128": lambda mv: xxhash.xxh3_128_intdigest(mv),
        "xxh64": lambda mv: xxhash.xxh64_intdigest(mv),
        "zlib.crc32": lambda mv: zlib.crc32(mv),
        "zlib.adler32": lambda mv: zlib.adler32(mv),
    }
    try:
        import crc32c  # optional: only for this comparison

        fns["crc32c"] = lambda mv: crc32c.crc32c(mv)
    except ImportError:
        pass
    return fns


def _best_of(fn: Callable[[], None], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="buffer size in MiB")
    ap.add_argument("--chunk-mib", type=int, default=4, help="chunk size hashed per call")
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings")
    args = ap.parse_args(argv)

    nbytes = args.mib << 20
    chunk = args.chunk_mib << 20
    # Random bytes so no hash gets a shortcut on zeros; both buffers are
    # touched before timing so page faults are not measured.
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    dst[:] = 0
    mv = memoryview(src).cast("B")
    src_t, dst_t = torch.from_numpy(src), torch.from_numpy(dst)

    def memcpy() -> None:
        dst_t.copy_(src_t)

    t_copy = _best_of(memcpy, args.repeat)
    copy_gbs = nbytes / t_copy / 1e9

    rows: list[tuple[str, float]] = [("memcpy (torch copy_)", copy_gbs)]
    for name, fn in _hashes().items():

        def run(fn: HashFn = fn) -> None:
            for off in range(0, nbytes, chunk):
                fn(mv[off : off + chunk])

        rows.append((name, nbytes / _best_of(run, args.repeat) / 1e9))

    print(
        f"# {platform.machine()} {platform.processor() or ''} torch threads="
        f"{torch.get_num_threads()} buffer={args.mib} MiB chunk={args.chunk_mib} MiB "
        f"best of {args.repeat}"
    )
    print(f"{'hash':<22}{'GB/s':>8}{'vs memcpy':>11}")
    for name, gbs in rows:
        print(f"{name:<22}{gbs:>8.2f}{gbs / copy_gbs:>11.2f}")


if __name__ == "__main__":
    main()
