"""One checkpoint backend interface; the implementations differ only in ``_hooks``.

The trainer drives a backend once per step:

1. ``snapshot(step, state)`` — start checkpointing the state just produced by
   the optimizer step (may return before the copy is done: it overlaps the
   next forward/backward);
2. ``wait()`` — called before the next optimizer step changes the parameters,
   and at the end: finishes and commits the in-flight snapshot and returns its
   timings;
3. ``retrieve(rank, step, source)`` — on restart, the state of a rank.

Public methods validate and time; the ``_``-prefixed hooks do the
backend-specific work (as torchtitan's checkpointer does). Every backend
reports the same timings so that experiments differ only by config.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gemini.checkpoint.senders import SpanClock
    from gemini.cluster.job import JobSpec
    from gemini.workload.state import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which and why."""


@dataclass
class SnapshotTiming:
    """What one checkpoint of one rank cost."""

    step: int
    stall_s: float = 0.0
    """How long training waited on this checkpoint."""
    local_s: float = 0.0
    """Copy into local memory / onto storage."""
    replicate_s: float = 0.0
    """Sending the remote copies."""
    persist_s: float = 0.0
    """Writing the persistent tier (storage), if any this step."""
    bytes: int = 0
    """Bytes of this rank's checkpoint."""
    replicating: bool = False
    """Set when :meth:`CheckpointBackend.wait` returns with the replicas still on
    their way (a planned schedule spreads them over the following iterations):
    ``replicate_s`` is final only once :meth:`CheckpointBackend.settle`
    returns this timing."""


@dataclass
class Retrieved:
    """A rank's state read back from a checkpoint."""

    step: int
    tensors: dict[str, torch.Tensor]
    extra: dict[str, Any]
    source: str
    """``local``, ``peer:<node>`` or ``storage``."""
    bytes: int
    retrieve_s: float


@dataclass
class BackendContext:
    """Where a rank's backend lives: which job, node, rank."""

    job: JobSpec
    node: int
    rank: int
    local_rank: int
    world_size: int
    config_hash: str
    extras: dict[str, Any] = field(default_factory=dict)
    generation: int = 0
    """The launch this rank belongs to; every checkpoint it writes carries it."""


class CheckpointBackend(ABC):
    """Start a snapshot, wait/commit, list complete steps, retrieve, close."""

    name = "abstract"

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self._pending: SnapshotTiming | None = None
        self._deferred: SnapshotTiming | None = None
        self._closed = False

    @property
    def enabled(self) -> bool:
        return True

    @property
    def busy(self) -> bool:
        return self._pending is not None

    allocates = False
    """Whether ``prepare`` sets up checkpoint memory (slots) whose cost a restart pays."""

    persists_periodically = False
    """Whether a persistent tier is written every ``backend.persist_every_s``
    (or ``backend.persist_every_n`` steps) besides the checkpoints themselves:
    the trainer then agrees on that period in steps, or takes the fixed one,
    and sets :attr:`persist_interval`."""

    persist_interval = 0
    """Steps between writes to the persistent tier (0: not yet agreed, or none)."""

    def prepare(self, state: TrainState) -> dict[str, Any]:
        """Allocate what checkpoints need, once, before training (its cost is reported apart).

        A backend that allocates also returns the wall-clock milestones
        ``t_alloc_start``/``t_alloc_end`` (``gemini.recovery.MILESTONES``): a
        recovery reports that span as its own phase, ``alloc_s``.
        """
        t_wall = time.time()
        t0 = time.perf_counter()
        out = self._prepare(state)
        out["ckpt_prepare_s"] = time.perf_counter() - t0
        if self.allocates:
            out.update(t_alloc_start=t_wall, t_alloc_end=time.time())
        return out

    def snapshot(self, step: int, state: TrainState) -> None:
        """Start the checkpoint of ``step``; the previous one must have been waited for."""
        if self._closed:
            raise CheckpointError(f"{self.name}: snapshot after close")
        if self._pending is not None:
            raise CheckpointError(
                f"{self.name}: snapshot of step {step} while step {self._pending.step} is in flight"
            )
        if self._deferred is not None:
            raise CheckpointError(
                f"{self.name}: snapshot of step {step} while the replicas of step "
                f"{self._deferred.step} are in flight: settle() first"
            )
        t0 = time.perf_counter()
        timing = SnapshotTiming(step=step)
        self._snapshot(step, state, timing)
        timing.stall_s += time.perf_counter() - t0
        self._pending = timing

    def wait(self) -> SnapshotTiming | None:
        """Finish and commit the in-flight snapshot (None if there is none)."""
        if self._pending is None:
            return None
        timing, self._pending = self._pending, None
        t0 = time.perf_counter()
        self._wait(timing)
        timing.stall_s += time.perf_counter() - t0
        if timing.replicating:
            self._deferred = timing
        return timing

    checkpoint_interval = 1
    """Checkpoint only steps divisible by this (1: whenever the cadence says): a
    planned replication schedule grows it when one iteration's idle spans cannot
    carry the replicas; every rank agrees on the same value."""

    span_clock: SpanClock | None = None
    """The :class:`gemini.checkpoint.senders.SpanClock` a planned replication
    schedule follows (the training loop signals it), or None."""

    plans_replication = False
    """Whether the backend plans its replicas into idle spans once the profile exists:
    the trainer then calls :meth:`interval_needed` and :meth:`adopt_plan`."""

    def settle(self) -> SnapshotTiming | None:
        """Wait until the replicas of the last snapshot are complete on their holders.

        Returns that snapshot's timing if :meth:`wait` returned it unfinished
        (``replicating``), now with its ``replicate_s``; None otherwise. The
        trainer calls it before the next snapshot and at the end.
        """
        timing, self._deferred = self._deferred, None
        if timing is None:
            return None
        t0 = time.perf_counter()
        try:
            self._settle()
        except Exception as e:
            raise CheckpointError(
                f"{self.name}: replicating the snapshot of step {timing.step} failed: {e}"
            ) from e
        finally:
            timing.stall_s += time.perf_counter() - t0
            timing.replicating = False
        return timing

    def interval_needed(self, spans_s: list[float]) -> int:
        """The checkpoint interval this rank needs for its replicas to fit the idle spans."""
        return 1

    def adopt_plan(self, spans_s: list[float], interval: int) -> dict[str, Any]:
        """Plan with the interval every rank agreed on; returns what to report."""
        return {}

    def checkpoint_cost(self, timing: SnapshotTiming) -> float | None:
        """One checkpoint from start to complete (the paper's t_ckpt), or None if unknown.

        ``timing`` is what :meth:`wait` returned. The input of the cadence
        policies, and what ``ckpt_time_s`` reports.
        """
        return timing.local_s + timing.replicate_s + timing.persist_s

    def complete_steps(self) -> list[int]:
        """Steps of this rank with a complete checkpoint here, newest first."""
        return self._complete_steps()

    def retrieve(self, step: int, source: dict[str, Any] | None = None) -> Retrieved:
        """This rank's state at ``step`` from ``source`` (the recovery plan's choice)."""
        t0 = time.perf_counter()
        out = self._retrieve(step, source or {})
        out.retrieve_s = time.perf_counter() - t0
        if out.step != step:
            raise CheckpointError(f"{self.name}: asked for step {step}, got {out.step}")
        return out

    def close(self, abandon: bool = False) -> None:
        """Release the backend; a write to storage still in flight is finished first.

        ``abandon=True`` (its generation failed and the process restarts in
        place): such a write stops at its next chunk instead and removes what
        it wrote, as it would have in a process that died, so that a survivor
        never holds up the recovery for storage. The checkpoints already
        complete, in memory and in storage, are what the recovery plans from.
        """
        if not self._closed:
            self._closed = True
            self._close(abandon)

    # -- hooks ----------------------------------------------------------------
    @abstractmethod
    def _snapshot(self, step: int, state: TrainState, timing: SnapshotTiming) -> None: ...

    @abstractmethod
    def _wait(self, timing: SnapshotTiming) -> None: ...

    @abstractmethod
    def _complete_steps(self) -> list[int]: ...

    @abstractmethod
    def _retrieve(self, step: int, source: dict[str, Any]) -> Retrieved: ...

    def _prepare(self, state: TrainState) -> dict[str, Any]:
        return {}

    def _settle(self) -> None:
        return None

    def _close(self, abandon: bool) -> None:
        return None


class NoBackend(CheckpointBackend):
    """``backend=none``: never checkpoints, so a failure restarts from step 0."""

    name = "none"

    @property
    def enabled(self) -> bool:
        return False

    def _snapshot(self, step: int, state: TrainState, timing: SnapshotTiming) -> None:
        raise CheckpointError("backend=none takes no checkpoints")

    def _wait(self, timing: SnapshotTiming) -> None:
        return None

    def _complete_steps(self) -> list[int]:
        return []

    def _retrieve(self, step: int, source: dict[str, Any]) -> Retrieved:
        raise CheckpointError("backend=none has no checkpoint to retrieve")


def make_backend(ctx: BackendContext) -> CheckpointBackend:
    """The backend the config names."""
    name = ctx.job.cfg.backend.name
    if name == "none":
        return NoBackend(ctx)
    if name == "memory":
        from gemini.checkpoint.memory import MemoryBackend

        return MemoryBackend(ctx)
    if name == "replicated":
        from gemini.checkpoint.memory import ReplicatedBackend

        return ReplicatedBackend(ctx)
    if name == "disk":
        from gemini.checkpoint.disk import DiskBackend

        return DiskBackend(ctx)
    raise CheckpointError(f"backend.name={name!r} is not available yet")
