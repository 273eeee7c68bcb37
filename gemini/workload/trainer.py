"""A trainer rank: rendezvous, restore if the plan says so, train, checkpoint, report.

Started by its node's worker agent as ``python -m gemini.workload.trainer``.
Each launch belongs to a *generation*; ranks of one generation rendezvous
under their own store prefix, so a relaunch after a failure never meets the
stale keys of the one before. Metrics leave through a reporter thread with
its own store connection, so the training loop never waits on the network.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gemini.checkpoint.backend import (
    BackendContext,
    CheckpointBackend,
    SnapshotTiming,
    make_backend,
)
from gemini.cluster.job import JobSpec
from gemini.cluster.store import Store
from gemini.config import GeminiConfig, config_hash


class Reporter:
    """Ships per-step records to the store off the hot path (a thread, batched)."""

    def __init__(self, job: JobSpec, rank: int, gen: int, period_s: float = 0.2) -> None:
        self.rank, self.gen, self.period_s = rank, gen, period_s
        self.q: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.store = Store.from_address(job.store)
        self.thread = threading.Thread(target=self._run, name="reporter", daemon=True)
        self.thread.start()

    def put(self, record: dict[str, Any]) -> None:
        self.q.put(record)

    def _flush(self, batch: list[dict[str, Any]]) -> None:
        if not batch:
            return
        self.store.append(f"metrics/{self.rank}", "".join(_json_line(r) for r in batch))
        self.store.set(f"progress/{self.rank}", str(batch[-1]["step"]))

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

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=10)


def _json_line(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record) + "\n"


def pick_device(cfg: GeminiConfig, local_rank: int) -> torch.device:
    want = cfg.cluster.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# How long the ranks of a generation may take to start (a cold interpreter on a
# replaced node, torch imported on a loaded host) before they rendezvous.
LAUNCH_TIMEOUT_S = 180.0


def wait_for_generation(store: Store, gen: int, world: int) -> None:
    """Wait until every rank of ``gen`` has started.

    ``init_process_group`` gives the others only the collective timeout to
    show up, which a rank on a freshly replaced node (no warm spare, imports
    to pay) can exceed; the recovery would then fail for nothing. If a rank
    never comes, the root stops the generation and the agent ends this one.
    """
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for r in range(world):
        if not store.wait_for(f"trainer/{gen}/{r}", max(0.0, deadline - time.monotonic())):
            raise RuntimeError(
                f"rank {r} of generation {gen} did not start in {LAUNCH_TIMEOUT_S:.0f} s"
            )


def train(job: JobSpec, node: int, rank: int, local_rank: int, gen: int) -> int:
    """Run one rank of one generation to the end of training (or its death)."""
    from gemini.checkpoint.cadence import make_cadence
    from gemini.workload.state import TrainState

    cfg = job.cfg
    torch.set_num_threads(cfg.cluster.threads_per_rank)
    store = Store.from_address(job.store)
    store.set_json(f"trainer/{gen}/{rank}", {"pid": os.getpid(), "node": node})
    plan = store.get_json(f"ctl/plan/{gen}")
    world = job.world_size
    device = pick_device(cfg, local_rank)
    wait_for_generation(store, gen, world)
    # Wall-clock milestones (gemini.recovery.MILESTONES): the root cuts the
    # restart into phases along the slowest rank's path.
    milestones = {"t_rdzv_start": time.time()}
    t_rdzv = time.perf_counter()
    pg_store = dist.PrefixStore(f"gen{gen}/pg", store.raw)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=pg_store,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=cfg.cluster.collective_timeout_s),
    )
    rendezvous_s = time.perf_counter() - t_rdzv
    milestones["t_rdzv_end"] = time.time()
    state = TrainState(cfg, rank, world, device)
    ctx = BackendContext(job, node, rank, local_rank, world, config_hash(cfg), generation=gen)
    backend: CheckpointBackend = make_backend(ctx)
    b = cfg.backend
    cadence = make_cadence(
        b.cadence, every_n=b.every_n, overhead_bound_pct=b.overhead_bound_pct, mtbf_s=b.mtbf_s
    )

    start_step = int(plan.get("start_step", 0))
    ready: dict[str, Any] = {"rendezvous_s": rendezvous_s, "start_step": start_step}
    ready.update(milestones)
    if backend.enabled:
        ready.update(backend.prepare(state))
    if start_step > 0:
        source = plan["sources"][str(rank)]
        ready["t_retrieve_start"] = time.time()
        try:
            got = backend.retrieve(start_step, source)
        except Exception as e:
            # The root excludes this source, and only this one, from its next plan.
            store.set_json(
                f"restore_failed/{gen}/{rank}",
                {"step": start_step, "source": source, "error": f"{type(e).__name__}: {e}"},
            )
            raise
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
    ready["t"] = time.time()
    store.set(f"progress/{rank}", str(state.step))
    store.set_json(f"ready/{gen}/{rank}", ready)
    reporter = Reporter(job, rank, gen)
    replay_until = int(plan.get("replay_until", 0))
    samples = cfg.train.micro_batch * world
    adaptive = b.cadence != "every_n"
    persist_every_s = b.persist_every_s if hasattr(backend, "persist_interval") else 0.0
    gen_iters: list[float] = []
    try:
        for step in range(state.step + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            loss = state.forward_backward()
            stall = 0.0
            timing: SnapshotTiming | None = None
            if backend.busy:
                # The in-flight copy reads the parameters: it must finish
                # before the optimizer changes them.
                t_w = time.perf_counter()
                timing = backend.wait()
                stall += time.perf_counter() - t_w
            state.optimizer_step()
            if backend.enabled and cadence.should_checkpoint(step):
                t_s = time.perf_counter()
                backend.snapshot(step, state)
                stall += time.perf_counter() - t_s
            iter_s = time.perf_counter() - t0
            # Stall is what this iteration itself waited (wait + snapshot
            # calls); a snapshot's own stall_s spans two iterations.
            compute_s = max(0.0, iter_s - stall)
            cost = None if timing is None else backend.checkpoint_cost(timing)
            if adaptive:
                # Ranks must checkpoint the same steps, or no step is complete
                # everywhere: feed every policy the same (slowest) timings.
                agreed = torch.tensor([compute_s, -1.0 if cost is None else cost], device=device)
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
                compute_s, c = float(agreed[0]), float(agreed[1])
                cost = None if c < 0 else c
            cadence.observe(step, compute_s, cost)
            gen_iters.append(compute_s)
            if persist_every_s > 0 and len(gen_iters) == 3:
                # The persistent tier's period in steps, agreed on by all ranks.
                t_iter = torch.tensor([sum(gen_iters) / 3], device=device)
                dist.all_reduce(t_iter, op=dist.ReduceOp.MAX)
                backend.persist_interval = max(1, math.ceil(persist_every_s / float(t_iter)))  # type: ignore[attr-defined]
            rec: dict[str, Any] = {
                "step": step,
                "gen": gen,
                "t": time.time(),
                "loss": loss,
                "iter_time_s": iter_s,
                "throughput_samples_s": samples / iter_s if iter_s > 0 else 0.0,
                "ckpt_stall_s": stall,
                "replay": step <= replay_until,
            }
            if cost is not None:
                rec["ckpt_time_s"] = cost
            if timing is not None:
                rec.update(
                    ckpt_step=timing.step,
                    ckpt_local_s=timing.local_s,
                    ckpt_replicate_s=timing.replicate_s,
                    ckpt_persist_s=timing.persist_s,
                    ckpt_bytes=timing.bytes,
                )
            reporter.put(rec)
        last = backend.wait()
        if last is not None:
            reporter.put(
                {
                    "step": state.step,
                    "gen": gen,
                    "t": time.time(),
                    "ckpt_step": last.step,
                    "ckpt_local_s": last.local_s,
                    "ckpt_replicate_s": last.replicate_s,
                    "ckpt_persist_s": last.persist_s,
                    "ckpt_bytes": last.bytes,
                    "ckpt_stall_s": last.stall_s,
                    "final_wait": True,
                }
            )
        digest = state.digest()
        store.set_json(f"final/{gen}/{rank}", {"digest": digest, "step": state.step})
        # Everyone has reported before anyone tears the group down.
        dist.barrier()
    finally:
        reporter.close()
        backend.close()
    dist.destroy_process_group()
    return 0


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
        help="import everything, then wait for the generation number on stdin",
    )
    a = p.parse_args(argv)
    # The agent stops a generation with SIGTERM: exit at once, quietly.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    gen = a.gen
    if a.standby:
        # A warm spare: the interpreter and torch are loaded while the current
        # generation trains, so a restart after a failure skips the imports.
        # It loads at idle priority, so that it takes only CPU the trainers
        # leave unused; a host that would not let it return to normal
        # priority gets no spare (exit 75 tells the agent to stop making them).
        if not _set_idle(True):
            return SPARE_UNSUPPORTED
        import gemini.checkpoint.disk
        import gemini.checkpoint.memory
        import gemini.cluster.transport
        import gemini.workload.state  # noqa: F401

        line = sys.stdin.readline()
        if not line.strip():
            return 0  # the agent closed our stdin: not needed any more
        _set_idle(False)
        gen = int(line)
    return train(JobSpec.load(a.job), a.node, a.rank, a.local_rank, gen)


if __name__ == "__main__":
    sys.exit(main())
