"""Harness overhead: gemini's iteration time vs a bare torch.distributed loop.

Both sides train the same model (``gemini.workload.models.build_model``) on
the same synthetic batches (``gemini.workload.data.SyntheticData``) with the
same world size, threads per rank, DDP, AdamW and learning-rate schedule, on
gloo over a TCPStore:

* **bare** — ``world`` processes spawned here, nothing else: the loop a user
  would write by hand.
* **harness** — ``gemini.experiment.run`` with ``backend=none`` and tracking
  off: node launchers, worker agents with heartbeats, the root agent, the
  controller polling the store, and the trainers' metric reporters, all
  sharing the cores with the ranks.

Each side's iteration time is the mean over steady-state steps (the first
``--skip`` steps pay for lazy allocation, as ``summary.json`` skips them) of
the mean over ranks, measured around the same span: batch, forward, backward,
optimizer and schedule step. Runs alternate (bare, harness, bare, ...) so
both see the same machine; the ratio is harness / bare, target <= 1.05. As
a check that both trained the same thing, the last step's mean loss is shown.
Bare ranks run in sessions of their own as the harness's nodes do, so that
the kernel's per-session (autogroup) scheduling treats both alike when other
work shares the machine; numbers from an idle machine are still the ones to
quote.

    .venv/bin/python benchmarks/harness_overhead.py --model gpt_tiny --nodes 4 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from gemini.config import GeminiConfig

SKIP = 3  # as gemini.experiment.summarize: steps 1..3 are warm-up


def compose(args: argparse.Namespace, outputs: Path) -> GeminiConfig:
    """The harness's own config for this layout (the bare loop reads the same values)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gemini.cli import CONF
    from gemini.config import register_configs, to_schema

    register_configs()
    GlobalHydra.instance().clear()
    overrides = [
        f"model={args.model}",
        f"cluster.nodes={args.nodes}",
        f"cluster.ranks_per_node={args.ranks_per_node}",
        f"cluster.threads_per_rank={args.threads}",
        f"train.steps={args.steps}",
        "train.parallel=ddp",
        "backend=none",
        "failure=none",
        "tracking=off",
        "progress=false",
        f"paths.outputs={outputs}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    GlobalHydra.instance().clear()
    return to_schema(cfg)


# -- bare torch.distributed ---------------------------------------------------


def bare_rank(rank: int, world: int, port: int, cfg: GeminiConfig, out_dir: str) -> None:
    from gemini.workload.data import SyntheticData
    from gemini.workload.models import build_model
    from gemini.workload.state import adamw_options, lr_lambda

    t = cfg.train
    # Each harness node runs in a session of its own, and with the kernel's
    # autogroup scheduling a session is what gets a fair share of a busy CPU:
    # give every bare rank one too, or a loaded machine favours the harness.
    os.setsid()
    torch.set_num_threads(cfg.cluster.threads_per_rank)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    model = DDP(build_model(cfg.model, t.seed))
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=t.lr,
        weight_decay=t.weight_decay,
        betas=(0.9, 0.95),
        **adamw_options(t.optimizer_impl),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, t.steps))
    data = SyntheticData(cfg.model, t.seed, t.micro_batch, t.seq_len, rank, world)
    times, loss_value = [], 0.0
    for step in range(1, t.steps + 1):
        t0 = time.perf_counter()
        x, y = data.batch(step)
        loss = model(x, y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        times.append(time.perf_counter() - t0)
    dist.barrier()
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"times": times, "loss": loss_value}))


def run_bare(cfg: GeminiConfig, skip: int) -> tuple[float, float]:
    """(mean steady iteration time, last step's mean loss) of the bare loop."""
    world = cfg.cluster.nodes * cfg.cluster.ranks_per_node
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="bare-") as out:
        mp.start_processes(
            bare_rank,
            args=(world, store.port, cfg, out),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    del store
    per_step = [statistics.mean(r["times"][i] for r in ranks) for i in range(cfg.train.steps)]
    return statistics.mean(per_step[skip:]), statistics.mean(r["loss"] for r in ranks)


# -- the harness ---------------------------------------------------------------


def run_harness(cfg: GeminiConfig, job_dir: Path) -> tuple[float, float]:
    """(mean steady iteration time, last step's mean loss) from the harness's summary."""
    from gemini.experiment import run

    summary: dict[str, Any] = run(cfg, job_dir=job_dir)
    return float(summary["iter_time_s"]), float(summary["final_loss"])


# -- report ---------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="gpt_tiny")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--ranks-per-node", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeat", type=int, default=2, help="bare/harness pairs, alternating")
    a = p.parse_args()
    if a.steps <= SKIP + 1:
        p.error(f"--steps must be > {SKIP + 1} to leave steady-state steps")

    outputs = Path(tempfile.mkdtemp(prefix="harness-overhead-"))
    try:
        cfg = compose(a, outputs)
        world = cfg.cluster.nodes * cfg.cluster.ranks_per_node
        print(
            f"machine: {os.cpu_count()} cores, {cpu_model()}; torch {torch.__version__}; "
            f"load average {os.getloadavg()[0]:.2f} at start"
        )
        print(
            f"workload: {cfg.model.name}, {cfg.cluster.nodes} nodes x "
            f"{cfg.cluster.ranks_per_node} ranks = {world} gloo ranks, "
            f"{cfg.cluster.threads_per_rank} thread(s) each, micro-batch {cfg.train.micro_batch}, "
            f"{cfg.train.steps} steps (first {SKIP} skipped)"
        )
        rows = []
        for i in range(a.repeat):
            bare_t, bare_loss = run_bare(cfg, SKIP)
            harness_t, harness_loss = run_harness(cfg, outputs / f"job{i}")
            rows.append((bare_t, harness_t, bare_loss, harness_loss))
            print(
                f"  pair {i + 1}: bare {bare_t * 1e3:.1f} ms, harness {harness_t * 1e3:.1f} ms, "
                f"ratio {harness_t / bare_t:.3f}"
            )
    finally:
        shutil.rmtree(outputs, ignore_errors=True)

    bare = statistics.mean(r[0] for r in rows)
    harness = statistics.mean(r[1] for r in rows)
    ratio = harness / bare
    print()
    print(f"{'':<10} {'iteration (ms)':>15} {'final loss':>12}")
    print(f"{'bare':<10} {bare * 1e3:>15.1f} {rows[-1][2]:>12.4f}")
    print(f"{'harness':<10} {harness * 1e3:>15.1f} {rows[-1][3]:>12.4f}")
    verdict = "within" if ratio <= 1.05 else "over"
    print(f"ratio harness/bare: {ratio:.3f} ({verdict} the 1.05 target; {a.repeat} pair(s))")
    if len(rows) > 1:
        pairs = [r[1] / r[0] for r in rows]
        median = statistics.median(pairs)
        print(f"pair ratios: median {median:.3f}, range {min(pairs):.3f}-{max(pairs):.3f}")
    print(f"load average {os.getloadavg()[0]:.2f} at end: compare only ratios from one run")


if __name__ == "__main__":
    main()
