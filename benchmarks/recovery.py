"""Recovery: wasted time of one hardware failure, Gemini (replicated) vs HighFreq (disk).

Each pair of jobs runs ``gemini.experiment.run`` on 4 nodes x 1 rank with the
same workload and the same injected failure (``failure=hardware_once`` at a
fixed step and node, late enough that several checkpoints were taken):

* ``replicated`` — every iteration into CPU memory, m=2 (Gemini);
* ``disk`` — ``cadence=highfreq``: as often as the storage allows, every
  ``ceil(t_ckpt / T_iter)`` iterations (the paper's HighFreq baseline).

It prints each job's ``wasted_s`` (recovery time + the checkpoint stalls paid
since the previous failure), each recovery phase's share of ``recovery_s``,
the phase that dominates, and ``wasted(disk) / wasted(replicated)``, which is
the paper's ">13x" (Fig. 10; measured there on 16 machines sharing a 20 Gbit/s
store). The pair runs twice:

a. **local disk** — this machine's own disk, uncapped. Here a ``torch.save`` +
   ``fsync`` of the checkpoint costs only a few times a ``clone()`` of it in
   RAM (measured and printed first), so the ratio is expected to be modest.
b. **emulated** — ``backend.bandwidth_gbps=1.25``: the paper's 20 Gbit/s
   aggregate store shared by 16 nodes, 1.25 Gbit/s per node, emulated by
   pacing every read and write of the disk backend. Labelled as emulated
   wherever it is printed.

Run from the repository root (``python benchmarks/recovery.py`` works too)::

    .venv/bin/python -m benchmarks.recovery            # full: gpt_small, 30 steps, fail at 22
    .venv/bin/python -m benchmarks.recovery --quick    # gpt_tiny, 14 steps, fail at 10

Compare numbers only within one run of this script: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

try:
    from benchmarks.checkpoint import compose, machine, markdown, run_job
except ModuleNotFoundError:  # run as a script, as `make bench` does: siblings are top level
    from checkpoint import compose, machine, markdown, run_job  # type: ignore[no-redef]
from gemini.timeline import PHASES

PAPER_SHARED_GBPS = 20.0
PAPER_NODES = 16


def save_vs_copy(model: str, repeat: int, base: Path) -> tuple[float, float]:
    """How much a persistent checkpoint to this machine's disk costs next to RAM copies.

    Returns the time of ``torch.save`` + ``fsync`` of a training state over the
    time of (1) ``clone()``-ing it (allocate + copy, a naive in-memory
    snapshot) and (2) copying it into preallocated, touched RAM
    (``format.write_state``, what gemini's memory snapshot does).
    """
    from gemini.checkpoint import format as fmt
    from gemini.workload.state import TrainState

    state = TrainState(compose([f"model={model}"]), 0, 1, torch.device("cpu"))
    state.forward_backward()
    state.optimizer_step()
    tensors = state.tensors()
    entries, nbytes = fmt.layout(tensors)
    flat = torch.ones(nbytes, dtype=torch.uint8)  # touched once, reused
    path = base / "save.pt"

    def save() -> float:
        os.sync()
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        dt = time.perf_counter() - t0
        path.unlink()
        return dt

    def clone() -> float:
        t0 = time.perf_counter()
        copies = {k: v.clone() for k, v in tensors.items()}
        dt = time.perf_counter() - t0
        del copies
        return dt

    def copy() -> float:
        t0 = time.perf_counter()
        fmt.write_state(tensors, entries, flat)
        return time.perf_counter() - t0

    fns = {"save": save, "clone": clone, "copy": copy}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for i in range(repeat):
        # Rotate the order so drift in other tenants' load falls on all alike.
        order = list(fns)[i % 3 :] + list(fns)[: i % 3]
        for k in order:
            times[k].append(fns[k]())
    med = {k: statistics.median(v) for k, v in times.items()}
    vs_clone, vs_copy = med["save"] / med["clone"], med["save"] / med["copy"]
    gbs = {k: nbytes / v / 1e9 for k, v in med.items()}
    print(
        f"local disk vs RAM, {model} state of {nbytes / 2**20:.0f} MiB, median of {repeat}: "
        f"torch.save+fsync {gbs['save']:.2f} GB/s, clone {gbs['clone']:.2f} GB/s, copy into "
        f"preallocated RAM {gbs['copy']:.2f} GB/s.\n"
        f"  A persistent checkpoint on this machine's local disk costs {vs_clone:.1f}x a clone "
        f"and {vs_copy:.1f}x a preallocated copy: not the gap between RAM and a remote store "
        "shared by many nodes, so expect a modest ratio in (a)."
    )
    return vs_clone, vs_copy


def one_pair(
    base: Path, common: list[str], bandwidth_gbps: float, label: str
) -> dict[str, dict[str, Any]]:
    print(f"{label}:", flush=True)
    rep = run_job(
        [
            *common,
            "backend=replicated",
            "backend.every_n=1",
            "backend.replication.factor=2",
        ],
        base,
        "replicated",
    )
    dsk = run_job(
        [
            *common,
            "backend=disk",
            "backend.cadence=highfreq",
            f"backend.bandwidth_gbps={bandwidth_gbps}",
        ],
        base,
        "disk",
    )
    return {"replicated": rep, "disk": dsk}


def recovery_of(summary: dict[str, Any], name: str) -> dict[str, Any]:
    """The recovery from the injected failure; any other one is reported, not used."""
    recs = summary.get("recoveries") or []
    injected = [r for r in recs if r.get("injected")]
    for r in recs:
        if not r.get("injected"):
            print(
                f"  WARNING ({name}): a failure nobody injected was detected and recovered: "
                f"{r.get('kind')} failure of {r.get('failed')} at step {r.get('failed_step')} "
                f"({r.get('reason')}); the injected failure's wasted_s counts stalls only "
                "since then"
            )
    if len(injected) != 1:
        raise RuntimeError(f"{name}: expected one injected failure's recovery, got {recs}")
    return dict(injected[0])


def shares(rec: dict[str, Any]) -> dict[str, float]:
    total = float(rec["recovery_s"])
    return {p: float(rec.get(p) or 0.0) / total for p in PHASES}


def report(pair: dict[str, dict[str, Any]], setting: str) -> tuple[float, list[list[str]]]:
    rows: list[list[str]] = []
    wasted: dict[str, float] = {}
    for name, summary in pair.items():
        rec = recovery_of(summary, name)
        sh = shares(rec)
        dom = max(sh, key=lambda p: sh[p])
        wasted[name] = float(rec["wasted_s"])
        stall = float(rec.get("ckpt_stall_since_last_s") or 0.0)
        print(
            f"  {name:<10} wasted {rec['wasted_s']:7.2f} s = recovery {rec['recovery_s']:.2f} s "
            f"+ checkpoint stalls {stall:.2f} s; {summary['checkpoints']} checkpoints in "
            f"{summary['steps']} steps; failed at step {rec.get('failed_step')}, restored "
            f"{rec.get('restored_step')} (lost {rec.get('lost_steps')}); sources "
            f"{rec.get('source_counts')}"
        )
        print(
            "             "
            + "  ".join(f"{p[:-2]} {rec.get(p) or 0:.2f}s ({sh[p] * 100:.0f}%)" for p in PHASES)
        )
        print(f"             dominated by {dom[:-2]} ({sh[dom] * 100:.0f} % of recovery_s)")
        rows.append(
            [
                setting,
                name,
                str(summary["checkpoints"]),
                f"{rec['wasted_s']:.1f}",
                f"{rec['recovery_s']:.1f}",
                f"{stall:.2f}",
                str(rec.get("lost_steps")),
                *(f"{sh[p] * 100:.0f}" for p in PHASES),
                f"{dom[:-2]}",
            ]
        )
    ratio = wasted["disk"] / wasted["replicated"]
    print(f"  wasted(disk) / wasted(replicated) = {ratio:.2f}  (paper: >= 13x)")
    return ratio, rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="gpt_tiny, 14 steps, failure at 10")
    ap.add_argument("--model", help="workload (default gpt_small; gpt_tiny with --quick)")
    ap.add_argument("--steps", type=int, help="training steps (default 30; 14 with --quick)")
    ap.add_argument("--at-step", type=int, help="failure step (default 22; 10 with --quick)")
    ap.add_argument("--node", type=int, default=1, help="node that fails")
    ap.add_argument(
        "--cap-gbps",
        type=float,
        default=PAPER_SHARED_GBPS / PAPER_NODES,
        help="(b)'s emulated per-node storage bandwidth, Gbit/s (default: the paper's "
        "20 Gbit/s shared by 16 nodes = 1.25)",
    )
    ap.add_argument(
        "--probe-model", default="gpt_small", help="state of the torch.save vs RAM-copy probe"
    )
    ap.add_argument("--dir", default=None, help="scratch dir (its disk is the 'local disk')")
    a = ap.parse_args(argv)
    q = a.quick
    model = a.model or ("gpt_tiny" if q else "gpt_small")
    steps = a.steps or (14 if q else 30)
    at_step = a.at_step or (10 if q else 22)
    cap = a.cap_gbps
    header = f"machine: {machine()}; mode: {'quick' if q else 'full'}"
    print(header)
    print(
        f"hardware failure of node {a.node} at step {at_step} of {steps}, {model}, "
        "4 nodes x 1 rank",
        flush=True,
    )
    common = [
        f"model={model}",
        "cluster.nodes=4",
        f"train.steps={steps}",
        "failure=hardware_once",
        f"failure.at_step={at_step}",
        f"failure.node={a.node}",
    ]
    with tempfile.TemporaryDirectory(prefix="gemini-recovery-bench-", dir=a.dir) as tmp:
        base = Path(tmp)
        vs_clone, vs_copy = save_vs_copy(a.probe_model, 5, base)
        local = one_pair(base, common, 0.0, "(a) local disk")
        ratio_a, rows_a = report(local, "(a) local disk")
        emulated = one_pair(
            base,
            common,
            cap,
            f"(b) emulated {cap} Gbit/s per node"
            + (
                f" ({PAPER_SHARED_GBPS:g} Gbit/s shared by {PAPER_NODES} nodes)"
                if cap == PAPER_SHARED_GBPS / PAPER_NODES
                else ""
            ),
        )
        ratio_b, rows_b = report(emulated, f"(b) emulated {cap} Gbit/s")
    mode = "quick" if q else "full"
    print(f"\n### Recovery from one hardware failure ({mode} mode)\n")
    print(
        f"Measured on {header.removeprefix('machine: ')}; {model}, 4 nodes x 1 rank, node "
        f"{a.node} fails at step {at_step} of {steps}. replicated = every iteration, m=2; "
        "disk = HighFreq cadence. Phase columns are % of recovery_s. (b) caps the disk "
        f"backend at an emulated {cap} Gbit/s per node. Here torch.save+fsync costs "
        f"{vs_clone:.1f}x a clone and {vs_copy:.1f}x a copy into preallocated RAM.\n"
    )
    print(
        markdown(
            [
                "setting",
                "backend",
                "ckpts",
                "wasted_s",
                "recovery_s",
                "stall_s",
                "lost steps",
                *(p[:-2] + " %" for p in PHASES),
                "dominant",
            ],
            rows_a + rows_b,
        )
    )
    print(
        f"\nwasted(disk) / wasted(replicated): (a) local disk {ratio_a:.2f}x, "
        f"(b) emulated {cap} Gbit/s {ratio_b:.2f}x (paper, 16 nodes and a real shared "
        "store: >= 13x)"
    )
    if q:
        print(
            "quick mode only checks that the benchmark runs: a gpt_tiny checkpoint is a few "
            "MiB, so both backends recover alike and these ratios are noise (mostly the "
            "restart phase). Quote the full mode."
        )


if __name__ == "__main__":
    main()
