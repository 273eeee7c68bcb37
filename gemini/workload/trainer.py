"""A trainer rank: rendezvous, restore if the plan says so, train, checkpoint, report.

Started by its node's worker agent as ``python -m gemini.workload.trainer``.
Each launch belongs to a *generation*; ranks of one generation rendezvous
under their own store prefix, so a relaunch after a failure never meets the
stale keys of the one before. Metrics leave through a reporter thread with
its own store connection, so the training loop never waits on the network.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from gemini.checkpoint.backend import (
    BackendContext,
    CheckpointBackend,
    SnapshotTiming,
    make_backend,
)
from gemini.cluster import keys
from gemini.cluster.agent import PARK_GRACE_S
from gemini.cluster.job import JobSpec
from gemini.cluster.store import Store
from gemini.config import GeminiConfig, config_hash

if TYPE_CHECKING:
    from gemini.workload.comm_profile import CommProfiler
    from gemini.workload.state import TrainState


class Reporter:
    """Ships per-step records to the store off the hot path (a thread, batched)."""

    def __init__(self, job: JobSpec, rank: int, gen: int, period_s: float = 0.2) -> None:
        self.rank, self.gen, self.period_s = rank, gen, period_s
        self.stopped = threading.Event()
        """Set once the root stopped this generation: the training loop leaves it
        at the next step (a rank blocked in a collective leaves when it raises)."""
        self.q: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.store = Store.for_job(job)
        self.thread = threading.Thread(target=self._run, name="reporter", daemon=True)
        self.thread.start()

    def put(self, record: dict[str, Any]) -> None:
        self.q.put(record)

    def _flush(self, batch: list[dict[str, Any]]) -> None:
        if not batch:
            return
        self.store.append(keys.metrics(self.rank), "".join(_json_line(r) for r in batch))
        self.store.set(keys.progress(self.rank), str(batch[-1]["step"]))

    def _run(self) -> None:
        done = False
        while not done:
            batch: list[dict[str, Any]] = []
            deadline = time.monotonic() + self.period_s
            while time.monotonic() < deadline:
                try:
                    item = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    break
                batch.append(item)
            self._flush(batch)
            # The same round trip rate as the flushes: at most one check per period.
            if not self.stopped.is_set() and self.store.exists(keys.stop(self.gen)):
                self.stopped.set()

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=10)


def _json_line(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record) + "\n"


def ranks_per_host(cfg: GeminiConfig) -> int:
    """Ranks that share one host's devices: with ``launcher=local`` every node is on this host."""
    c = cfg.cluster
    return c.nodes * c.ranks_per_node if c.launcher == "local" else c.ranks_per_node


def pick_device(cfg: GeminiConfig, rank: int, local_rank: int) -> torch.device:
    """The device this rank trains on: ``cluster.device``, or CUDA under ``auto`` when present.

    Ranks of one host take its GPUs round-robin (the simulated nodes of the
    local launcher all share this host's, so they count by global rank).
    """
    want = cfg.cluster.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        slot = rank if cfg.cluster.launcher == "local" else local_rank
        torch.cuda.set_device(slot % max(1, torch.cuda.device_count()))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def process_group_backend(cfg: GeminiConfig, device: torch.device) -> str:
    """The collective library: NCCL when every rank has a GPU of its own, else gloo.

    NCCL refuses two ranks on one GPU, which is what a simulated cluster on a
    one-GPU host has; gloo reduces CUDA tensors too (through host memory), so
    such a job still runs, only its collectives are slower.
    """
    if device.type == "cuda" and ranks_per_host(cfg) <= torch.cuda.device_count():
        return "nccl"
    return "gloo"


# How long the ranks of a generation may take to start (a cold interpreter on a
# replaced node, torch imported on a loaded host) before they rendezvous.
LAUNCH_TIMEOUT_S = 180.0


class Stopped(RuntimeError):
    """The root stopped this rank's generation: a failure elsewhere."""

    def __init__(self, gen: int) -> None:
        super().__init__(f"generation {gen} was stopped")


def wait_for_generation(store: Store, gen: int, world: int) -> None:
    """Wait until every rank of ``gen`` has started.

    ``init_process_group`` gives the others only the collective timeout to
    show up, which a rank on a freshly replaced node (no warm spare, imports
    to pay) can exceed; the recovery would then fail for nothing. If a rank
    never comes, the root stops the generation and this one leaves it.
    """
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for r in range(world):
        while not store.exists(keys.trainer(gen, r)):
            if store.exists(keys.stop(gen)):
                raise Stopped(gen)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"rank {r} of generation {gen} did not start in {LAUNCH_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.05)


@dataclass
class Rank:
    """Who this process is in the job, once the process group is up."""

    job: JobSpec
    node: int
    rank: int
    local_rank: int
    gen: int
    """The generation (launch) this rank belongs to."""
    world: int
    device: torch.device
    store: Store
    plan: dict[str, Any]
    """The root's recovery plan for this generation (``start_step``, ``sources``...)."""


def rendezvous(
    job: JobSpec, node: int, rank: int, local_rank: int, gen: int
) -> tuple[Rank, dict[str, Any]]:
    """Announce this rank, wait for its generation, form the process group.

    Returns the rank and the first entries of its ``ready`` record: the
    rendezvous time and its wall-clock milestones (gemini.recovery.MILESTONES),
    along which the root cuts a restart into phases.
    """
    cfg = job.cfg
    store = Store.for_job(job)
    store.set_json(keys.trainer(gen, rank), {"pid": os.getpid(), "node": node})
    plan = store.get_json(keys.plan(gen))
    device = pick_device(cfg, rank, local_rank)
    me = Rank(job, node, rank, local_rank, gen, job.world_size, device, store, plan)
    wait_for_generation(store, gen, me.world)
    t_rdzv_start = time.time()
    t_rdzv = time.perf_counter()
    dist.init_process_group(
        process_group_backend(cfg, device),
        store=dist.PrefixStore(keys.pg_prefix(gen), store.raw),
        rank=rank,
        world_size=me.world,
        timeout=timedelta(seconds=cfg.cluster.collective_timeout_s),
    )
    ready = {"rendezvous_s": time.perf_counter() - t_rdzv}
    ready.update(t_rdzv_start=t_rdzv_start, t_rdzv_end=time.time())
    return me, ready


class RetrieveFailed(RuntimeError):
    """The planned source of this rank's step could not be read."""

    def __init__(self, step: int, source: dict[str, Any], error: Exception) -> None:
        self.step, self.source = step, source
        self.error = f"{type(error).__name__}: {error}"
        super().__init__(f"step {step} from {source}: {self.error}")

    def report(self) -> dict[str, Any]:
        """What the root needs to exclude this source, and only this one, from its next plan."""
        return {"step": self.step, "source": self.source, "error": self.error}


def restore(state: TrainState, backend: CheckpointBackend, plan: dict[str, Any]) -> dict[str, Any]:
    """Prepare checkpoint memory and, if the recovery plan says so, load its step.

    Returns what the ``ready`` record reports about it (timings, source, bytes).
    """
    start_step = int(plan.get("start_step", 0))
    ready: dict[str, Any] = {"start_step": start_step}
    if backend.enabled:
        ready.update(backend.prepare(state))
    if start_step > 0:
        source = plan["sources"][str(state.rank)]
        ready["t_retrieve_start"] = time.time()
        try:
            got = backend.retrieve(start_step, source)
        except Exception as e:
            raise RetrieveFailed(start_step, source, e) from e
        ready["t_retrieve_end"] = time.time()
        t_load = time.perf_counter()
        state.load(got.tensors, got.extra)
        t_warm = time.perf_counter()
        state.warm_up_buckets()
        ready.update(
            retrieve_s=got.retrieve_s,
            load_s=time.perf_counter() - t_load,
            warm_up_s=time.perf_counter() - t_warm,
            source=got.source,
            bytes=got.bytes,
        )
        del got  # may alias the checkpoint's memory: state.load copied it out
    return ready


class CadenceAgreement:
    """The per-step decision to checkpoint, the same on every rank.

    Ranks must checkpoint the same steps, or no step is complete everywhere:
    adaptive policies are fed the slowest rank's timings (an all-reduce per
    step); ``every_n`` needs no agreement. The persistent tier's period in
    steps is agreed on the same way, once, after three steps (unless
    ``backend.persist_every_n`` fixes it in advance).
    """

    def __init__(self, cfg: GeminiConfig, backend: CheckpointBackend, device: torch.device) -> None:
        from gemini.checkpoint.cadence import cadence_for

        b = cfg.backend
        # Built once already by gemini.config.validate before the job started.
        self.policy = cadence_for(cfg)
        self.backend, self.device = backend, device
        self.adaptive = b.cadence != "every_n"
        self.persist_every_s = b.persist_every_s if backend.persists_periodically else 0.0
        if backend.persists_periodically and b.persist_every_n > 0:
            # Fixed in advance, the same on every rank: nothing to measure or agree on.
            backend.persist_interval = b.persist_every_n
        self.iters: list[float] = []

    def should_checkpoint(self, step: int) -> bool:
        # The interval is agreed on by every rank (trainer.agree_on_plan): the
        # same steps everywhere.
        return (
            self.backend.enabled
            and self.policy.should_checkpoint(step)
            and step % self.backend.checkpoint_interval == 0
        )

    def observe(self, step: int, compute_s: float, cost: float | None) -> float | None:
        """Feed the policy this step's timings; returns the (agreed) checkpoint cost."""
        if self.adaptive:
            agreed = torch.tensor([compute_s, -1.0 if cost is None else cost], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            compute_s, c = float(agreed[0]), float(agreed[1])
            cost = None if c < 0 else c
        self.policy.observe(step, compute_s, cost)
        self.iters.append(compute_s)
        if self.persist_every_s > 0 and len(self.iters) == 3:
            t_iter = torch.tensor([sum(self.iters) / 3], device=self.device)
            dist.all_reduce(t_iter, op=dist.ReduceOp.MAX)
            period = max(1, math.ceil(self.persist_every_s / float(t_iter)))
            self.backend.persist_interval = period
        return cost


def _timing_record(timing: SnapshotTiming) -> dict[str, Any]:
    return {
        "ckpt_step": timing.step,
        "ckpt_local_s": timing.local_s,
        "ckpt_replicate_s": timing.replicate_s,
        "ckpt_persist_s": timing.persist_s,
        "ckpt_bytes": timing.bytes,
    }


def train_step(
    state: TrainState,
    backend: CheckpointBackend,
    cadence: CadenceAgreement,
    step: int,
    profiler: CommProfiler | None = None,
) -> dict[str, Any]:
    """One optimizer step, and the checkpoint if the cadence says so; returns its record.

    ``profiler`` times the step's training communication (its first steps).
    """
    t0 = time.perf_counter()
    clock = backend.span_clock
    if clock is not None:
        clock.begin_iteration()  # span 0 of this iteration
    if profiler is not None:
        profiler.begin()
    loss = state.forward_backward()
    if clock is not None and not state.zero:
        clock.busy_over()  # every gradient all-reduce is done: the iteration's tail
    stall = 0.0
    timing: SnapshotTiming | None = None
    if backend.busy:
        # The in-flight copy reads the parameters: it must finish before the
        # optimizer changes them.
        t_w = time.perf_counter()
        timing = backend.wait()
        stall += time.perf_counter() - t_w
        if timing is not None and timing.replicating:
            timing = None  # reported once its replicas are complete (settle)
    t_opt = time.perf_counter()
    state.optimizer_step()
    if profiler is not None and state.zero:
        # ZeRO's step ends in a broadcast of every rank's updated parameters.
        profiler.mark_busy(t_opt, time.perf_counter())
    if clock is not None and state.zero:
        clock.busy_over()
    if cadence.should_checkpoint(step):
        t_s = time.perf_counter()
        # A planned schedule's replicas of the last snapshot must be complete
        # before the next one starts: what is left of them goes now.
        settled = backend.settle()
        timing = settled or timing
        backend.snapshot(step, state)
        stall += time.perf_counter() - t_s
    iter_s = time.perf_counter() - t0
    # Stall is what this iteration itself waited (wait + snapshot calls); a
    # snapshot's own stall_s spans two iterations.
    compute_s = max(0.0, iter_s - stall)
    cost = None if timing is None else backend.checkpoint_cost(timing)
    cost = cadence.observe(step, compute_s, cost)
    samples = state.cfg.train.micro_batch * state.world_size
    rec: dict[str, Any] = {
        "step": step,
        "t": time.time(),
        "loss": loss,
        "iter_time_s": iter_s,
        "throughput_samples_s": samples / iter_s if iter_s > 0 else 0.0,
        "ckpt_stall_s": stall,
    }
    if cost is not None:
        rec["ckpt_time_s"] = cost
    if timing is not None:
        rec.update(_timing_record(timing))
    profile = profiler.end() if profiler is not None else None
    if profile is not None:
        rec["idle_profile"] = profile.record()
        if backend.plans_replication:
            rec["interleave"] = agree_on_plan(backend, profile.spans_s, cadence.device)
    return rec


def agree_on_plan(
    backend: CheckpointBackend, spans_s: list[float], device: torch.device
) -> dict[str, Any]:
    """Plan the replicas into the idle spans with a checkpoint interval every rank shares.

    Each rank computes the interval its own replicas need; the largest wins
    (an all-reduce), so that every rank checkpoints the same steps and the
    newest complete checkpoint is one step on every rank. Every rank reaches
    this at the same step: the profile ends after the same count of steps.
    """
    need = torch.tensor([backend.interval_needed(spans_s)], device=device)
    dist.all_reduce(need, op=dist.ReduceOp.MAX)
    return backend.adopt_plan(spans_s, int(need.item()))


def comm_profiler(cfg: GeminiConfig, state: TrainState) -> CommProfiler | None:
    """A profiler of the idle spans, installed on the model, where the run wants one:
    ``replicated`` (the backend that interleaves), more than one rank."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gemini.workload.comm_profile import CommProfiler

    steps = cfg.backend.replication.profile_steps
    if cfg.backend.name != "replicated" or steps <= 0 or not isinstance(state.model, DDP):
        return None
    profiler = CommProfiler(steps)
    profiler.install(state.model)
    return profiler


def finish(me: Rank, state: TrainState, backend: CheckpointBackend, reporter: Reporter) -> None:
    """Commit the last snapshot, publish this rank's final digest, wait for everyone."""
    last = backend.wait()
    if last is not None and last.replicating:
        last = None
    last = backend.settle() or last
    if last is not None:
        rec = {"step": state.step, "gen": me.gen, "t": time.time(), **_timing_record(last)}
        reporter.put({**rec, "ckpt_stall_s": last.stall_s, "final_wait": True})
    me.store.set_json(keys.final(me.gen, me.rank), {"digest": state.digest(), "step": state.step})
    # Everyone has reported before anyone tears the group down.
    dist.barrier()


@dataclass(frozen=True)
class Identity:
    """Which rank of the job a trainer process is: fixed at its start, or handed to
    a pre-started one (a warm spare, a standby node's trainer) when it takes over."""

    node: int
    rank: int
    local_rank: int


@dataclass
class Kept:
    """What a process carries from one generation to the next."""

    module: torch.nn.Module | None = None
    """The model it trained (or, for a spare, built while it waited): a
    generation that restores a checkpoint loads into it instead of building
    one, as a survivor restarting in place keeps its model."""


def train(
    job: JobSpec, who: Identity, gen: int, how: str = "fresh", kept: Kept | None = None
) -> int:
    """Run one rank of one generation to the end of training (or its failure).

    ``how`` says how this process came to the generation (``fresh``, ``spare``,
    ``in_place``), for the recovery record. On a failure the exception leaves
    with the process group still up: :func:`leave_generation` tears it down.
    ``kept`` carries the model across generations of one process.
    """
    from gemini.workload.state import TrainState

    cfg = job.cfg
    kept = Kept() if kept is None else kept
    torch.set_num_threads(cfg.cluster.threads_per_rank)
    me, ready = rendezvous(job, who.node, who.rank, who.local_rank, gen)
    ready["restart"] = how
    backend: CheckpointBackend | None = None
    reporter: Reporter | None = None
    failed = True
    try:
        # A generation that starts from step 0 needs the seeded initial
        # weights (and the RNG state building them leaves): it builds anew.
        reuse = kept.module if int(me.plan.get("start_step", 0)) > 0 else None
        ready["model_reused"] = reuse is not None
        state = TrainState(cfg, who.rank, me.world, me.device, module=reuse)
        kept.module = state.module
        # Before the restore's warm-up backward: DDP takes a hook only before
        # its buckets start reducing.
        profiler = comm_profiler(cfg, state)
        ctx = BackendContext(
            job, who.node, who.rank, who.local_rank, me.world, config_hash(cfg), generation=gen
        )
        backend = make_backend(ctx)
        if profiler is not None and backend.span_clock is not None:
            # Each completed all-reduce begins the next idle span.
            profiler.on_comm_done = backend.span_clock.comm_done
        try:
            ready.update(restore(state, backend, me.plan), t=time.time())
        except RetrieveFailed as e:
            me.store.set_json(keys.restore_failed(gen, who.rank), e.report())
            raise
        me.store.set(keys.progress(who.rank), str(state.step))
        me.store.set_json(keys.ready(gen, who.rank), ready)
        reporter = Reporter(job, who.rank, gen)
        cadence = CadenceAgreement(cfg, backend, me.device)
        replay_until = int(me.plan.get("replay_until", 0))
        for step in range(state.step + 1, cfg.train.steps + 1):
            if reporter.stopped.is_set():
                raise Stopped(gen)
            rec = train_step(state, backend, cadence, step, profiler)
            reporter.put({**rec, "gen": gen, "replay": step <= replay_until})
        finish(me, state, backend, reporter)
        failed = False
    finally:
        if reporter is not None:
            reporter.close()
        if backend is not None:
            # A failed generation does not wait for storage: a survivor that
            # restarts in place leaves a write in flight, as a dead rank does.
            backend.close(abandon=failed and cfg.cluster.restart == "in_place")
    dist.destroy_process_group()
    return 0


TEARDOWN_TIMEOUT_S = 3.0
"""How long a failed generation's process-group teardown may take before the
process gives up restarting in place (its agent then starts a fresh one)."""

LEAVE_DEADLINE_S = PARK_GRACE_S
"""How long leaving a failed generation may take in all (teardown, freeing what the
generation built) before the process dumps its threads' stacks into its log and
exits 1: as long as its agent waits for a stopped generation's ranks to park, so
that the agent replaces it at once."""


def release_process_group(timeout_s: float = TEARDOWN_TIMEOUT_S) -> str | None:
    """Destroy this process's default process group, on a thread, with a deadline.
    None when done, else why not (failed, timed out)."""
    outcome: list[BaseException | None] = []

    def teardown() -> None:
        try:
            if dist.is_initialized():
                # NCCL's destroy can block on a dead peer: abort the
                # communicators first.
                if dist.get_backend() == "nccl":
                    with contextlib.suppress(Exception):
                        dist.distributed_c10d._abort_process_group()
                if dist.is_initialized():
                    dist.destroy_process_group()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    # On a thread, with a deadline: a destroy that waits for work a dead peer
    # never completes would otherwise keep this process from ever parking.
    worker = threading.Thread(target=teardown, name="teardown", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        return "timed out"
    return None if outcome[0] is None else f"failed: {outcome[0]}"


def free_failed_generation(deadline_s: float = LEAVE_DEADLINE_S) -> str | None:
    """Destroy the process group and free what the failed generation built (its
    optimizer, backend, DDP wrapper; the model stays in :class:`Kept`), or exit.

    Freeing a gloo group runs its destructor, which waits for every collective
    still queued on it; after a failure one can wait on a peer that is alive but
    waiting too, until the collective timeout. Done before parking, a process
    whose peers wait for its sockets to close tells them at once; and a watchdog
    that needs no interpreter lock bounds the wait: past ``deadline_s`` it dumps
    every thread's stack into the log and exits 1, and the agent gives the rank
    to a warm spare or a fresh process instead of to one that cannot take it.
    None when freed, else why the teardown failed.
    """
    faulthandler.dump_traceback_later(deadline_s, exit=True)
    try:
        why = release_process_group()
        if why is None:
            gc.collect()
        return why
    finally:
        faulthandler.cancel_dump_traceback_later()


@dataclass(frozen=True)
class Left:
    """Why a generation was left: what :func:`leave_generation` reports, kept apart
    from the exception, whose traceback holds the failed generation's frames."""

    error: str
    """``Type: message`` of what ended it."""
    stopped: bool
    """The root stopped it (:class:`Stopped`), rather than a broken collective."""

    @classmethod
    def of(cls, e: BaseException) -> Left:
        return cls(f"{type(e).__name__}: {e}", isinstance(e, Stopped))


def leave_generation(job: JobSpec, who: Identity, gen: int, left: Left) -> bool:
    """After a failed generation: free what it built and tell the agent this process
    waits, alive, for the next generation (``parked``).

    False when the teardown itself failed: the process cannot be trusted to
    restart in place and must exit, so that its agent starts a fresh one.
    """
    t0 = time.perf_counter()
    kind = left.error.split(":", 1)[0]
    print(f"rank {who.rank}: leaving generation {gen} ({kind})", flush=True)
    why = free_failed_generation()
    if why is not None:
        print(f"rank {who.rank}: cannot restart in place: teardown {why}", flush=True)
        return False
    store = Store.for_job(job)
    # Whether the root's stop or its own broken collective ended the generation
    # (the flag is the reporter's to read: one reader per process says what
    # it refuses).
    stopped = left.stopped
    store.set_json(
        keys.parked(gen, who.rank),
        {
            # As the agent reports exits: -15 for a rank the root stopped, 1 for
            # one that failed by itself (a collective broken by a lost peer).
            "code": -15 if stopped else 1,
            "error": left.error[:500],
            "teardown_s": time.perf_counter() - t0,
            "pid": os.getpid(),
            "t": time.time(),
        },
    )
    store.incr(keys.parks(who.node))
    return True


def await_handover(default: Identity | None) -> tuple[int, Identity, str] | None:
    """Block until the agent hands this process a generation (a line on stdin).

    The line is JSON: ``{"gen": g, "how": ...}`` plus, for a process that has no
    identity yet (a warm spare, a standby node's trainer), ``node``, ``rank`` and
    ``local_rank``; ``how`` names the pool it came from (``in_place``, ``spare``,
    ``standby``). None when the agent closed stdin: the process is not needed.
    """
    line = sys.stdin.readline()
    if not line.strip():
        return None
    import json

    msg = json.loads(line)
    if "rank" in msg:
        who = Identity(int(msg["node"]), int(msg["rank"]), int(msg["local_rank"]))
    else:
        assert default is not None, "a handover without an identity to a process without one"
        who = default
    return int(msg["gen"]), who, str(msg.get("how", "spare"))


def serve(
    job: JobSpec, who: Identity, gen: int, how: str, module: torch.nn.Module | None = None
) -> int:
    """Train generation after generation in this process (``cluster.restart=in_place``).

    ``module``: a model built in advance (a spare's), trained if the first
    generation restores a checkpoint; later generations reuse the last one's.

    A failed generation is left (:func:`leave_generation`) and the process
    waits for the agent to hand it the next one; with ``restart=process`` it
    exits instead, as every trainer did before in-place restarts.
    """
    in_place = job.cfg.cluster.restart == "in_place"
    kept = Kept(module)
    while True:
        try:
            return train(job, who, gen, how, kept)
        except Exception as e:
            if not in_place:
                raise
            traceback.print_exc()
            left = Left.of(e)
        # Out of the except block: the exception and its traceback, which held
        # the failed generation's frames, are gone, so leaving frees them.
        if not leave_generation(job, who, gen, left):
            # Straight out: finalizers could block on the same broken state.
            os._exit(1)
        got = await_handover(who)
        if got is None:
            return 0
        gen, who, how = got
        print(f"rank {who.rank}: generation {gen} ({how})", flush=True)


SPARE_UNSUPPORTED = 75
"""Exit status of a spare on a host where idle priority is not reversible."""


def _set_idle(idle: bool) -> bool:
    """Move every thread of this process to SCHED_IDLE (or back to SCHED_OTHER).

    Going idle first checks that coming back is allowed (unprivileged
    processes may leave SCHED_IDLE only where RLIMIT_NICE permits), so a
    spare never becomes a trainer stuck at idle priority.
    """
    if not hasattr(os, "SCHED_IDLE"):
        return False
    param = os.sched_param(0)
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    try:
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, param)
            os.sched_setscheduler(0, os.SCHED_OTHER, param)
        for tid in os.listdir("/proc/self/task"):
            os.sched_setscheduler(int(tid), policy, param)
    except OSError:
        return False
    return True


def warm_up_imports() -> None:
    """Import now what a rank's first generation would otherwise import on its way
    to the first collective, where every other rank would wait for it."""
    import gemini.checkpoint.disk
    import gemini.checkpoint.memory
    import gemini.cluster.transport
    import gemini.workload.state  # noqa: F401

    # torch's optimizers import the compiler stack (~0.5 s) on first use.
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


def build_spare_model(cfg: GeminiConfig) -> torch.nn.Module:
    """The model, built as every rank builds it, for a spare to hold until it is needed."""
    from gemini.workload.models import build_model

    torch.set_num_threads(cfg.cluster.threads_per_rank)
    return build_model(cfg.model, cfg.train.seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--job", required=True)
    p.add_argument("--node", type=int, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--local-rank", type=int, required=True)
    p.add_argument("--gen", type=int, default=0, help="generation (0 with --standby)")
    p.add_argument(
        "--standby",
        action="store_true",
        help="import everything, then wait for a generation and an identity on stdin",
    )
    p.add_argument(
        "--announce",
        default="",
        help="with --standby: the store key to set once everything is imported",
    )
    a = p.parse_args(argv)
    # The agent stops a generation with SIGTERM: exit at once, quietly.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    gen, how = a.gen, "fresh"
    module: torch.nn.Module | None = None
    who = Identity(a.node, a.rank, a.local_rank)
    if a.standby:
        # A warm spare: the interpreter and torch are loaded while the current
        # generation trains, so a restart after a failure skips the imports.
        # It loads at idle priority, so that it takes only CPU the trainers
        # leave unused; a host that would not let it return to normal
        # priority gets no spare (exit 75 tells the agent to stop making them).
        if not _set_idle(True):
            return SPARE_UNSUPPORTED
        warm_up_imports()
        # The model too: a spare handed a generation that restores a
        # checkpoint loads into it instead of building one then.
        module = build_spare_model(JobSpec.load(a.job).cfg)
        # Back to normal priority before waiting: waiting costs no CPU, and a
        # process still at idle priority when it is handed a generation may
        # not get the CPU to even read it while the host is busy.
        _set_idle(False)
        if a.announce:
            Store.for_job(JobSpec.load(a.job)).set_json(
                a.announce, {"pid": os.getpid(), "t": time.time()}
            )
        got = await_handover(who)
        if got is None:
            return 0  # the agent closed our stdin: not needed any more
        gen, who, how = got
        print(f"rank {who.rank}: generation {gen} ({how}, pid {os.getpid()})", flush=True)
    job = JobSpec.load(a.job)
    # The hang watchdog's beat: a thread, so it beats while the main thread
    # waits in a collective (gloo releases the GIL) and stops only when the
    # whole process does (a SIGSTOP) or exits. A spare or a standby's trainer
    # starts it only once it has a rank, or it would beat for one it may never
    # take. A process restarting in place keeps its rank, and its beat.
    if job.cfg.cluster.hang_timeout_s <= 0:
        return serve(job, who, gen, how, module)
    from gemini.cluster.agent import Heartbeat

    beat = Heartbeat(job, f"rank{who.rank}", job.cfg.cluster.heartbeat_s).start()
    try:
        return serve(job, who, gen, how, module)
    finally:
        # Joined before the interpreter exits: a thread still inside a store
        # call at exit aborts the process (SIGABRT), which the root would
        # rightly take for a crash of a rank that had finished.
        beat.stop()


if __name__ == "__main__":
    sys.exit(main())
