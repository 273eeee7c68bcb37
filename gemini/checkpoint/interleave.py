"""Traffic interleaving: when to send a checkpoint's replicas (Gemini's Algorithm 2).

Training communication (DDP's gradient all-reduces) leaves *idle spans* in
every iteration: stretches of compute during which the network carries no
training traffic. Their pattern is stable from one iteration to the next, so
a profile of a few iterations predicts them. The planner cuts the replicas a
node sends into chunks that fit those spans, so that checkpoint traffic does
not compete with training traffic for the link.

The cost of sending ``s`` bytes is modelled as ``f(s) = alpha + s / B``
(``alpha`` a per-chunk latency, ``B`` the link's bandwidth, both fitted on
the real link). A chunk is at most ``buffer_bytes // subbuffers`` bytes: the
receiver stages chunks in ``subbuffers`` buffers of that size, one receiving
while the previous drains into the slot. Each span is filled, in order, up
to ``mu`` times its length (``mu`` < 1 leaves a margin for the spans'
jitter); whatever does not fit in any span goes into the last one, where it
lengthens the iteration by what it takes beyond the span.

This module is pure: no clocks, no sockets. The profiler measures the
spans, the sender executes the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkPlan:
    """Where each chunk of a checkpoint's replicas goes, and what it costs."""

    chunks: list[tuple[int, int]]
    """``(span index, bytes)`` in send order: copy after copy, each copy's
    bytes in order; no chunk straddles two copies."""
    added_s: float
    """Predicted time added to the iteration: how much longer than the last
    span its chunks take (0 when everything fits)."""
    span_used_s: list[float]
    """Predicted transfer time planned into each span."""

    def copies(self, ckpt_bytes: int) -> list[list[tuple[int, int, int]]]:
        """Each copy's chunks as ``(span index, offset, bytes)``."""
        out: list[list[tuple[int, int, int]]] = []
        offset = ckpt_bytes  # start a new copy at the first chunk
        for span, n in self.chunks:
            if offset >= ckpt_bytes:
                out.append([])
                offset = 0
            out[-1].append((span, offset, n))
            offset += n
        return out


def transfer_s(nbytes: int, bandwidth_Bps: float, alpha_s: float) -> float:
    """The cost model ``f(s) = alpha + s / B`` of sending one chunk."""
    return alpha_s + nbytes / bandwidth_Bps


def plan_chunks(
    spans_s: list[float],
    ckpt_bytes: int,
    copies: int,
    buffer_bytes: int,
    subbuffers: int,
    bandwidth_Bps: float,
    alpha_s: float,
    mu: float,
) -> ChunkPlan:
    """Algorithm 2: fill the idle spans with ``copies`` × ``ckpt_bytes`` of chunks.

    Greedy, span after span: as many chunks of ``buffer_bytes // subbuffers``
    bytes as fit in ``mu`` × the span, then one smaller chunk for the rest of
    the span's budget if any byte fits. What is left after the last span's
    budget is appended to the last span.
    """
    if not spans_s:
        raise ValueError("spans_s: at least one idle span is needed (the end of the iteration)")
    if any(not (s >= 0 and math.isfinite(s)) for s in spans_s):
        raise ValueError(f"spans_s={spans_s!r}: every span must be a finite length >= 0")
    if ckpt_bytes < 0 or copies < 0:
        raise ValueError(f"ckpt_bytes={ckpt_bytes}, copies={copies}: must be >= 0")
    if subbuffers < 1 or buffer_bytes < subbuffers:
        raise ValueError(
            f"buffer_bytes={buffer_bytes}, subbuffers={subbuffers}: need subbuffers >= 1 "
            "and at least one byte per sub-buffer"
        )
    if not (bandwidth_Bps > 0 and math.isfinite(bandwidth_Bps)):
        raise ValueError(f"bandwidth_Bps={bandwidth_Bps!r}: must be a finite rate > 0")
    if not (alpha_s >= 0 and math.isfinite(alpha_s)):
        raise ValueError(f"alpha_s={alpha_s!r}: must be a finite latency >= 0")
    if not 0 < mu <= 1:
        raise ValueError(f"mu={mu!r}: the share of each span to fill must be in (0, 1]")
    chunk = buffer_bytes // subbuffers
    # Bytes still to place in the current copy, copy after copy.
    pending = [ckpt_bytes] * copies if ckpt_bytes > 0 else []
    chunks: list[tuple[int, int]] = []
    used = [0.0] * len(spans_s)

    def take(span: int, limit: int) -> None:
        n = min(limit, pending[0])
        chunks.append((span, n))
        used[span] += transfer_s(n, bandwidth_Bps, alpha_s)
        pending[0] -= n
        if pending[0] == 0:
            pending.pop(0)

    for k, span in enumerate(spans_s):
        budget = mu * span
        while pending:
            left = budget - used[k]
            # The most bytes one chunk may carry in what is left of the budget.
            fits = math.floor((left - alpha_s) * bandwidth_Bps)
            if fits <= 0:
                break
            take(k, min(chunk, fits))
    last = len(spans_s) - 1
    while pending:
        take(last, chunk)
    return ChunkPlan(chunks, max(0.0, used[last] - spans_s[last]), used)
