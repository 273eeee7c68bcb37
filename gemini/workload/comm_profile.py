"""The idle spans of training communication: when, in an iteration, the network is free.

Gemini sends checkpoint traffic in the spans of each iteration in which
training sends nothing (``gemini.checkpoint.interleave``). To find them, the
``backend.replication.profile_steps`` steps of a generation, after its first
three, time their
gradient communication: a DDP communication hook marks when each bucket's
all-reduce starts and when it completes. With ``train.parallel=zero`` the
optimizer step, in which ZeRO broadcasts every rank's updated parameters,
counts as communication too. The complement of those intervals within an
iteration is its list of idle spans; averaged over the profiled iterations
they are the planner's input, and their normalised standard deviation says
how far the average can be trusted.

The hook does what DDP does without one (scale each bucket by the reciprocal
of the world size, then sum it over ranks), so a profiled run ends in the
same state, bit for bit, as one that is not. Scaling by ``1/world`` is not
dividing by ``world`` in floating point once the world is not a power of
two: DDP multiplies, so the hook must too.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist


def idle_spans(start: float, end: float, busy: list[tuple[float, float]]) -> list[float]:
    """The lengths of the gaps of ``[start, end]`` not covered by any ``busy`` interval,
    in order (a leading gap, the gaps between communications, a trailing gap).

    Overlapping busy intervals merge (several buckets in flight at once);
    parts outside ``[start, end]`` are ignored.
    """
    spans: list[float] = []
    t = start
    for b0, b1 in sorted((max(a, start), min(b, end)) for a, b in busy):
        if b1 <= b0:
            continue
        if b0 > t:
            spans.append(b0 - t)
        t = max(t, b1)
    spans.append(max(0.0, end - t))
    return spans


@dataclass(frozen=True)
class IdleProfile:
    """Idle spans averaged over the profiled iterations."""

    spans_s: list[float]
    """Mean length of each idle span, in iteration order."""
    span_cv: list[float]
    """Each span's normalised standard deviation (std / mean) over iterations."""
    idle_s: float
    """Mean idle time per iteration (all spans)."""
    idle_cv: float
    """Normalised standard deviation of the idle time per iteration."""
    comm_s: float
    """Mean time per iteration with training communication in flight."""
    iter_s: float
    """Mean profiled iteration time."""
    iterations: int
    """Iterations averaged: those with the most common number of spans."""
    profiled: int
    """Iterations profiled."""

    def record(self) -> dict[str, Any]:
        return asdict(self)


def _cv(xs: list[float]) -> float:
    m = statistics.fmean(xs)
    return statistics.pstdev(xs) / m if len(xs) > 1 and m > 0 else 0.0


def summarise(iterations: list[tuple[float, list[float]]]) -> IdleProfile | None:
    """Average ``(iteration time, idle spans)`` samples into a profile.

    Iterations whose number of spans differs from the most common one (a
    bucket that happened to finish before the next one started, merging two
    communications) cannot be averaged position by position and are left
    out; ``iterations`` says how many were kept. None without samples.
    """
    if not iterations:
        return None
    count = Counter(len(spans) for _, spans in iterations).most_common(1)[0][0]
    kept = [(it, spans) for it, spans in iterations if len(spans) == count]
    columns = list(zip(*(spans for _, spans in kept), strict=True))
    totals = [sum(spans) for _, spans in kept]
    iters = [it for it, _ in kept]
    return IdleProfile(
        spans_s=[statistics.fmean(c) for c in columns],
        span_cv=[_cv(list(c)) for c in columns],
        idle_s=statistics.fmean(totals),
        idle_cv=_cv(totals),
        comm_s=statistics.fmean(it - idle for it, idle in zip(iters, totals, strict=True)),
        iter_s=statistics.fmean(iters),
        iterations=len(kept),
        profiled=len(iterations),
    )


SKIP_STEPS = 3
"""Iterations of a generation not profiled: the first ones pay for lazy allocation
(and DDP rebuilds its buckets after the first), so they are not typical."""


class CommProfiler:
    """Times a rank's training communication for ``steps`` iterations, after the
    generation's first :data:`SKIP_STEPS`."""

    def __init__(self, steps: int, skip: int = SKIP_STEPS) -> None:
        self.steps, self.skip = steps, skip
        self.samples: list[tuple[float, list[float]]] = []
        self._busy: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        self._start: float | None = None
        self.recording = steps > 0
        self._seen = 0
        self.on_comm_done: Callable[[], None] | None = None
        """Called as each bucket's all-reduce completes, profiling or not (the
        interleaving sender's span signal)."""

    # -- the DDP communication hook ----------------------------------------------
    def install(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        """Time every gradient bucket's all-reduce of ``ddp`` (registered once, for
        the model's life: DDP cannot drop a hook; past the profile it only forwards)."""

        # Unannotated on purpose: DDP compares a hook's annotations with the
        # real types, and this module's annotations are strings.
        def hook(state, bucket):  # type: ignore[no-untyped-def]
            return self._reduce(bucket)

        ddp.register_comm_hook(None, hook)

    def _reduce(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        t0 = time.perf_counter()
        # DDP's own reduction: multiply by 1/world (its reducer does exactly
        # this while copying gradients into the bucket), then sum over ranks.
        buf = bucket.buffer()
        buf.mul_(1.0 / dist.get_world_size())
        fut = dist.all_reduce(buf, async_op=True).get_future()
        listener, recording = self.on_comm_done, self.recording
        if not recording and listener is None:
            return fut.then(lambda f: f.value()[0])

        # Only timing and signalling here: the reduced values pass through.
        def done(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            if recording:
                with self._lock:
                    self._busy.append((t0, time.perf_counter()))
            if listener is not None:
                listener()
            return f.value()[0]

        return fut.then(done)

    # -- iterations ----------------------------------------------------------------
    def begin(self) -> None:
        self._seen += 1
        if self.recording and self._seen > self.skip:
            self._start = time.perf_counter()

    def mark_busy(self, t0: float, t1: float) -> None:
        """Communication outside the hook (ZeRO's parameter broadcasts)."""
        if self.recording:
            with self._lock:
                self._busy.append((t0, t1))

    def end(self) -> IdleProfile | None:
        """Close the iteration; returns the profile once the last one is closed."""
        if not self.recording:
            return None
        end = time.perf_counter()
        with self._lock:
            busy, self._busy = self._busy, []
        if self._start is None:
            return None  # a skipped iteration
        self.samples.append((end - self._start, idle_spans(self._start, end, busy)))
        self._start = None
        if len(self.samples) < self.steps:
            return None
        self.recording = False
        return summarise(self.samples)
