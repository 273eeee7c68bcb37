"""How a committed slot reaches its holders: ``backend.replication.schedule``.

The replicated backend hands every committed slot to a :class:`ReplicaSender`.
Two implementations:

* :class:`ImmediateSender` — each copy whole, holder after holder, as soon as
  the local commit is done, in the copy thread. ``naive`` runs it in the
  background (it overlaps the next forward/backward, unplanned); ``blocking``
  makes the trainer wait for it before the next step. It also times its puts,
  which is how the link is probed (:class:`LinkFit`).
* :class:`InterleavedSender` — executes a :class:`~gemini.checkpoint.interleave.ChunkPlan`
  (Algorithm 2): the chunks planned for idle span ``i`` leave when span ``i``
  of the iteration begins. The training loop and the DDP communication hook
  say when spans begin (:class:`SpanClock`); a thread of the sender's own
  sends, over the chunk-level put: one put opened per holder per checkpoint,
  one range per chunk, finished after its last chunk.

The planned modes (``interleave``, ``interleave_nopipe``) need the
generation's idle profile and the link's fit; until both exist they send as
``naive`` does.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gemini.checkpoint.interleave import ChunkPlan, plan_chunks

if TYPE_CHECKING:
    from gemini.checkpoint.backend import SnapshotTiming
    from gemini.cluster.transport import PutStream, TransportClient

MU = 0.8
"""Share of each idle span the planner fills: the spans jitter from one
iteration to the next (``span_cv`` in the profile), and a chunk that runs past
its span competes with the all-reduce that follows it."""

MAX_INTERVAL = 64
"""Most iterations one checkpoint's replicas may be spread over (the interval
growth stops there; the plan then overflows its last span)."""

PROBE_PUTS = 4
"""Puts to the first holder whose timings the link fit uses."""


@dataclass
class Replica:
    """One committed slot to replicate."""

    source: int
    """The rank whose checkpoint it is."""
    step: int
    manifest_json: bytes
    data: Any
    """The slot's committed bytes (a read-only view of shared memory)."""
    checksums: list[str]
    checksum_bytes: int
    timing: SnapshotTiming
    """Where the sender writes ``replicate_s``: commit to the last holder's acknowledgement."""
    first_iteration: int = 0
    """The iteration (:attr:`SpanClock.iteration`) whose span 0 the plan starts at:
    the one after the snapshot was taken."""


class ReplicaSender(Protocol):
    """Gets a committed slot to its holders."""

    def send(self, replica: Replica) -> None:
        """Start (or do) sending ``replica``; called in the copy thread after the commit.

        Returns once the copy thread is no longer needed: after the last
        acknowledgement (immediate), or at once (interleaved).
        """
        ...

    def settle(self) -> None:
        """Block until the last ``send``'s replicas are complete on every holder;
        raise what went wrong sending them."""
        ...

    def close(self) -> None:
        """Stop; a put still open is aborted (its holder keeps its previous copy)."""
        ...


class LinkFit:
    """The cost model ``f(s) = alpha + s / B`` fitted to real puts over the link.

    The samples are the first puts this rank sends to one holder (the
    ``naive`` puts of the steps before the profile exists): each gives two
    points, the put's opening round trip (no data: what any put costs before
    its first byte) and the whole put, bytes against seconds from request to
    the holder's acknowledgement. Least squares over them: the slope is
    ``1/B``, the intercept ``alpha``. Fitting a per-put intercept makes
    ``alpha`` an upper bound of what one chunk of an open put costs (a range
    is one header, no round trip), which keeps the plan on the safe side.
    """

    def __init__(self, limit: int = PROBE_PUTS) -> None:
        self.limit = limit
        self.samples: list[tuple[int, float]] = []
        self.puts = 0
        self._lock = threading.Lock()

    @property
    def wants_more(self) -> bool:
        return self.puts < self.limit

    def add_put(self, open_s: float, nbytes: int, total_s: float) -> None:
        with self._lock:
            if self.puts >= self.limit:
                return
            self.puts += 1
            self.samples += [(0, open_s), (nbytes, total_s)]

    def fit(self) -> tuple[float, float] | None:
        """``(alpha_s, bandwidth_Bps)``, or None without two distinct sizes or with a
        slope that says nothing (a put no slower than its opening)."""
        with self._lock:
            pts = list(self.samples)
        return least_squares(pts)


def least_squares(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Fit ``t = alpha + s / B`` to ``(s, t)`` points: ``(alpha >= 0, B)`` or None."""
    if len(points) < 2:
        return None
    n = len(points)
    ms = sum(s for s, _ in points) / n
    mt = sum(t for _, t in points) / n
    var = sum((s - ms) ** 2 for s, _ in points)
    if var <= 0:
        return None
    slope = sum((s - ms) * (t - mt) for s, t in points) / var
    if not slope > 0:
        return None
    alpha = max(0.0, mt - slope * ms)
    return alpha, 1.0 / slope


ClientFor = Callable[[int], "TransportClient"]
"""A node's transport client (created once, kept)."""


def _send_whole(client: TransportClient, r: Replica, range_bytes: int, fit: LinkFit | None) -> None:
    t0 = time.perf_counter()
    stream = client.begin_put(
        r.source,
        r.step,
        r.manifest_json,
        r.data.nbytes,
        checksums=r.checksums,
        checksum_bytes=r.checksum_bytes,
    )
    open_s = time.perf_counter() - t0
    with stream:
        step = min(range_bytes, stream.max_range_bytes)
        for off in range(0, r.data.nbytes, step):
            stream.send_range(off, r.data[off : off + step])
        stream.finish()
    if fit is not None:
        fit.add_put(open_s, r.data.nbytes, time.perf_counter() - t0)


class ImmediateSender:
    """Every copy whole, holder after holder, in the calling (copy) thread."""

    def __init__(
        self, holders: list[int], client_for: ClientFor, range_bytes: int, fit: LinkFit | None
    ) -> None:
        self.holders, self.client_for = holders, client_for
        self.range_bytes = range_bytes
        self.fit = fit

    def send(self, replica: Replica) -> None:
        t0 = time.perf_counter()
        for i, h in enumerate(self.holders):
            # The snapshot's own digests travel with the put: the holder
            # verifies against them, and nothing here hashes the slot again.
            probe = self.fit if i == 0 and self.fit is not None and self.fit.wants_more else None
            _send_whole(self.client_for(h), replica, self.range_bytes, probe)
        replica.timing.replicate_s = time.perf_counter() - t0

    def settle(self) -> None:
        return None

    def close(self) -> None:
        return None


class SpanClock:
    """Which idle span of which iteration has begun, as the training loop sees it.

    ``begin_iteration`` (the loop, at the start of a step) starts span 0; each
    completed gradient all-reduce (the communication hook) starts the next
    span, up to the one before last; ``busy_over`` (the loop, once the
    iteration's last communication is done) starts the last span, the tail
    of the iteration. Several buckets in flight at once complete as several
    signals where the profile saw one merged busy interval: the clamp keeps
    those chunks in the spans before the tail, never in a later iteration.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.iteration = 0
        self.span = 0
        self.spans = 1
        """Idle spans per iteration (the profile's count)."""

    def begin_iteration(self) -> None:
        with self.cond:
            self.iteration += 1
            self.span = 0
            self.cond.notify_all()

    def comm_done(self) -> None:
        with self.cond:
            if self.span < self.spans - 2:
                self.span += 1
                self.cond.notify_all()

    def busy_over(self) -> None:
        with self.cond:
            self.span = self.spans - 1
            self.cond.notify_all()

    def position(self, first_iteration: int) -> int:
        """Spans begun since span 0 of ``first_iteration`` (-1 before it); hold ``cond``."""
        if self.iteration < first_iteration:
            return -1
        return (self.iteration - first_iteration) * self.spans + self.span


@dataclass
class Schedule:
    """A plan for this rank's checkpoints, the same for every checkpoint of a generation."""

    plan: ChunkPlan
    ckpt_bytes: int
    interval: int
    """Iterations the plan spans (its spans are the profile's, repeated)."""
    staging_bytes: int
    subbuffers: int


def plan_for(
    spans_s: list[float],
    ckpt_bytes: int,
    copies: int,
    buffer_bytes: int,
    bandwidth_Bps: float,
    alpha_s: float,
    interval: int,
) -> ChunkPlan:
    """Algorithm 2 over ``interval`` iterations' worth of the profile's spans."""
    return plan_chunks(
        list(spans_s) * interval,
        ckpt_bytes,
        copies,
        buffer_bytes,
        1,
        bandwidth_Bps,
        alpha_s,
        MU,
    )


def needed_interval(
    spans_s: list[float],
    ckpt_bytes: int,
    copies: int,
    buffer_bytes: int,
    bandwidth_Bps: float,
    alpha_s: float,
) -> int:
    """The fewest iterations whose idle spans carry every copy without lengthening
    the last one (the plan's ``added_s`` is 0); :data:`MAX_INTERVAL` at most."""
    for k in range(1, MAX_INTERVAL + 1):
        plan = plan_for(spans_s, ckpt_bytes, copies, buffer_bytes, bandwidth_Bps, alpha_s, k)
        if plan.added_s <= 0:
            return k
    return MAX_INTERVAL


class InterleavedSender:
    """Executes a :class:`Schedule`: each chunk leaves when its span begins.

    One thread of its own sends (the signals come from the training thread
    and from the communication hook, neither of which may block on the
    network). ``settle`` lets whatever is still planned for later spans go
    at once and waits for the last acknowledgement.
    """

    def __init__(
        self,
        holders: list[int],
        client_for: ClientFor,
        schedule: Schedule,
        clock: SpanClock,
        fallback: ImmediateSender,
    ) -> None:
        self.holders, self.client_for = holders, client_for
        self.schedule, self.clock = schedule, clock
        self.fallback = fallback
        self.sent: list[tuple[int, int, int, int]] = []
        """``(holder, span, offset, bytes)`` of every range sent, in order (for tests)."""
        self._job: Replica | None = None
        self._flush = False
        self._closing = False
        self._done = threading.Event()
        self._done.set()
        self._error: BaseException | None = None
        self._t_commit = 0.0
        self._thread = threading.Thread(target=self._run, name="replica-sender", daemon=True)
        self._thread.start()

    def send(self, replica: Replica) -> None:
        if replica.data.nbytes != self.schedule.ckpt_bytes:
            # Not the size the plan was made for: send it whole, unplanned.
            self.fallback.send(replica)
            return
        with self.clock.cond:
            self._done.clear()
            self._error = None
            self._flush = False
            self._t_commit = time.perf_counter()
            self._job = replica
            self.clock.cond.notify_all()

    def settle(self) -> None:
        with self.clock.cond:
            self._flush = True
            self.clock.cond.notify_all()
        self._done.wait()
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        with self.clock.cond:
            self._closing = True
            self.clock.cond.notify_all()
        # The thread leaves at its next wait for a span, aborting the put it
        # has open (the holder keeps its previous copy), or after the range it
        # is sending.
        self._thread.join(timeout=30)

    def _wait_for(self, job: Replica, span: int) -> bool:
        """Until ``span`` has begun (or a flush lets everything go); False when closing."""
        with self.clock.cond:
            while not self._closing and not self._flush:
                if self.clock.position(job.first_iteration) >= span:
                    break
                self.clock.cond.wait()
            return not self._closing

    def _run(self) -> None:
        while True:
            with self.clock.cond:
                while self._job is None and not self._closing:
                    self.clock.cond.wait()
                if self._closing:
                    return
                job = self._job
                assert job is not None
            try:
                self._execute(job)
            except BaseException as e:  # raised in the training thread by settle
                self._error = e
            finally:
                with self.clock.cond:
                    self._job = None
                # No view of the slot may outlive the put: the slot is unmapped at close.
                job = None
                self._done.set()

    def _execute(self, job: Replica) -> None:
        s = self.schedule
        for h, chunks in zip(self.holders, s.plan.copies(s.ckpt_bytes), strict=True):
            client = self.client_for(h)
            stream: PutStream | None = None
            try:
                for span, off, n in chunks:
                    if not self._wait_for(job, span):
                        return  # closing: the holder aborts the unfinished put
                    if stream is None:
                        # Opened with the first chunk: the holder reserves its
                        # slot only when the data is about to come.
                        stream = client.begin_put(
                            job.source,
                            job.step,
                            job.manifest_json,
                            s.ckpt_bytes,
                            checksums=job.checksums,
                            checksum_bytes=job.checksum_bytes,
                            subbuffers=s.subbuffers,
                            staging_bytes=s.staging_bytes,
                        )
                    stream.send_range(off, job.data[off : off + n])
                    self.sent.append((h, span, off, n))
                if stream is not None:
                    stream.finish()
            finally:
                if stream is not None and stream.open:
                    stream.abort("the sender stopped")
        # From the commit (the hand-over) to the last acknowledgement, as the
        # immediate sender times it: waits for spans included.
        job.timing.replicate_s = time.perf_counter() - self._t_commit


def schedule_record(
    mode: str,
    fit: tuple[float, float] | None,
    spans_s: list[float],
    needed: int,
    schedule: Schedule | None,
) -> dict[str, Any]:
    """What a rank reports about its plan (``interleave`` in the summary)."""
    rec: dict[str, Any] = {"mode": mode, "spans": len(spans_s), "needed_interval": needed}
    if fit is not None:
        rec.update(alpha_s=fit[0], bandwidth_Bps=fit[1])
    if schedule is not None:
        rec.update(
            interval=schedule.interval,
            chunks=len(schedule.plan.chunks),
            added_s=schedule.plan.added_s,
            planned_s=math.fsum(schedule.plan.span_used_s),
        )
    return rec
