"""Recovery: wasted time of one hardware failure, Gemini (replicated) vs HighFreq (disk).

Each pair of jobs runs ``gemini.experiment.run`` on 4 nodes x 1 rank with the
same workload and the same injected failure (``failure=hardware_once`` at a
fixed step and node, late enough that several checkpoints were taken):

* ``replicated`` — every iteration into CPU memory, m=2 (Gemini);
* ``disk`` — ``cadence=highfreq``, ``persist=background``: snapshot to RAM,
  persist in the background, the next checkpoint once the previous one is
  stored, i.e. every ``ceil(t_ckpt / T_iter)`` iterations (the paper's
  HighFreq baseline).

For each job it prints three quantities:

* ``wasted_s`` — the run's metric: ``recovery_s`` (failure -> back at the
  failed step: detect, teardown, restart, rendezvous, retrieve, load, replay)
  plus the checkpoint stalls paid since the previous failure; each phase's
  share and the phase that dominates.
* ``ckpt_wasted_s`` — the part of it that depends on the checkpoint system:
  retrieve + load + replay (progress lost) + stalls. The rest (detection,
  teardown, restarting processes, rendezvous) is the same machinery for both
  backends.
* ``T_wasted`` — the paper's cost model (§2; Fig. 10, the ">13x"),
  ``t_ckpt + 1/(2f) + t_rtvl``, from this job's measurements: ``t_ckpt`` the
  mean time of one checkpoint from start to complete, ``1/f`` the mean
  training time between checkpoints, ``t_rtvl`` retrieve + load of this
  recovery. Unlike one failure at one fixed step, it is the expectation over
  failure times uniform between checkpoints.

The pair runs in three storage settings:

a. **local disk** — this machine's own disk, uncapped. Here a ``torch.save`` +
   ``fsync`` of the checkpoint costs only a few times a ``clone()`` of it in
   RAM (measured and printed first), so the ratio is expected to be modest.
b. **emulated 1.25 Gbit/s** — ``backend.bandwidth_gbps=1.25``: the paper's
   20 Gbit/s aggregate store shared by 16 nodes, each node's share, emulated
   by pacing every read and write of the disk backend.
c. **emulated, paper regime** — the cap at which a checkpoint takes 9 of this
   machine's iterations, the paper's HighFreq interval for GPT-2 100B
   (t_ckpt / T_iter = 9; T_iter measured by a probe job first). (b) fixes the
   bandwidth but not the regime: a simulated node here has a few GB/s of
   memory bandwidth for a 0.3 GB state, a p4d node TB/s of HBM for ~100 GB,
   so at 1.25 Gbit/s a checkpoint here costs only a few iterations.

All emulated settings are labelled as such wherever they are printed.

The workload is gpt_small with 16 tokens per rank per step (``micro_batch=1``,
``seq_len=16``): the step is then dominated, as a large model's is, by passes
over the parameters and optimizer state (all-reduce, AdamW) rather than by
the 2 cores' arithmetic on activations, so a checkpoint is long next to an
iteration, the regime the paper studies.

Run from the repository root (``python benchmarks/recovery.py`` works too)::

    .venv/bin/python -m benchmarks.recovery            # full: gpt_small, 40 steps, fail at 30
    .venv/bin/python -m benchmarks.recovery --quick    # gpt_tiny, 16 steps, fail at 12
    .venv/bin/python -m benchmarks.recovery --save r.json   # keep every job's summary
    .venv/bin/python -m benchmarks.recovery --from r.json --markdown   # the README's tables

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
    from benchmarks.checkpoint import (
        add_saved_results_args,
        compose,
        machine,
        markdown,
        measured_or_saved,
        run_job,
    )
except ModuleNotFoundError:  # run as a script, as `make bench` does: siblings are top level
    from checkpoint import (  # type: ignore[no-redef]
        add_saved_results_args,
        compose,
        machine,
        markdown,
        measured_or_saved,
        run_job,
    )
from gemini.recovery import PHASES

PAPER_SHARED_GBPS = 20.0
PAPER_NODES = 16
PAPER_INTERVAL = 9
"""HighFreq's interval for GPT-2 100B on 16 p4d nodes (Gemini §7): every 9 iterations."""


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
            "backend.persist=background",
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


def _num(d: dict[str, Any], key: str) -> float:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) else 0.0


def cost_model(summary: dict[str, Any], rec: dict[str, Any]) -> dict[str, float]:
    """The paper's ``T_wasted = t_ckpt + 1/(2f) + t_rtvl`` from one job's measurements."""
    t_iter = _num(summary, "iter_time_s")
    t_ckpt = _num(summary, "ckpt_time_s")
    # 1/f: training time between checkpoints. Steps over checkpoints counts
    # the measuring checkpoints of the first steps too, so it errs short.
    interval = t_iter * summary["steps"] / max(1, int(summary["checkpoints"]))
    t_rtvl = _num(rec, "retrieve_s") + _num(rec, "load_s")
    return {
        "t_iter": t_iter,
        "t_ckpt": t_ckpt,
        "interval": interval,
        "t_rtvl": t_rtvl,
        "T_wasted": t_ckpt + interval / 2 + t_rtvl,
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def analyse(pair: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per backend of one pair: the recovery and the quantities the tables show."""
    out: dict[str, dict[str, Any]] = {}
    for name, summary in pair.items():
        rec = recovery_of(summary, name)
        sh = shares(rec)
        stall = _num(rec, "ckpt_stall_since_last_s")
        ckpt = _num(rec, "retrieve_s") + _num(rec, "load_s") + _num(rec, "replay_s") + stall
        out[name] = {
            "summary": summary,
            "rec": rec,
            "shares": sh,
            "dominant": max(sh, key=lambda p: sh[p]),
            "stall": stall,
            "wasted": float(rec["wasted_s"]),
            "alloc": _num(rec, "alloc_s"),
            "ckpt": ckpt,
            "ckpt_alloc": ckpt + _num(rec, "alloc_s"),
            **cost_model(summary, rec),
        }
    d, r = out["disk"], out["replicated"]
    out["ratios"] = {
        "wasted": _ratio(d["wasted"], r["wasted"]),
        "ckpt": _ratio(d["ckpt"], r["ckpt"]),
        "ckpt_alloc": _ratio(d["ckpt_alloc"], r["ckpt_alloc"]),
        "model": _ratio(d["T_wasted"], r["T_wasted"]),
    }
    return out


def report(pair: dict[str, dict[str, Any]]) -> None:
    """Print one pair's recoveries phase by phase."""
    got = analyse(pair)
    for name in pair:
        g = got[name]
        summary, rec, sh, dom = g["summary"], g["rec"], g["shares"], g["dominant"]
        print(
            f"  {name:<10} wasted {rec['wasted_s']:7.2f} s = recovery {rec['recovery_s']:.2f} s "
            f"+ checkpoint stalls {g['stall']:.2f} s; {summary['checkpoints']} checkpoints in "
            f"{summary['steps']} steps; failed at step {rec.get('failed_step')}, restored "
            f"{rec.get('restored_step')} (lost {rec.get('lost_steps')}); sources "
            f"{rec.get('source_counts')}"
        )
        print(
            "             "
            + "  ".join(f"{p[:-2]} {rec.get(p) or 0:.2f}s ({sh[p] * 100:.0f}%)" for p in PHASES)
        )
        print(f"             dominated by {dom[:-2]} ({sh[dom] * 100:.0f} % of recovery_s)")
        per_rank = {
            k: {r: round(float(v), 2) for r, v in (rec.get(f"rank_{k}_s") or {}).items()}
            for k in ("retrieve", "load", "warm_up")
        }
        print(
            f"             per rank (s): retrieve {per_rank['retrieve']}, load {per_rank['load']} "
            f"of which DDP warm-up backward {per_rank['warm_up']}"
        )
        print(
            f"             checkpoint-dependent: retrieve + load + replay + stalls = "
            f"{g['ckpt']:.2f} s; with the slot allocation (alloc) {g['ckpt_alloc']:.2f} s"
        )
        print(
            f"             cost model: t_ckpt {g['t_ckpt']:.2f} s + 1/(2f) "
            f"{g['interval'] / 2:.2f} s + t_rtvl {g['t_rtvl']:.2f} s = T_wasted "
            f"{g['T_wasted']:.2f} s (T_iter {g['t_iter']:.2f} s, t_ckpt/T_iter "
            f"{g['t_ckpt'] / g['t_iter'] if g['t_iter'] else 0:.1f})"
        )
    rt = got["ratios"]
    print(
        f"  disk / replicated: wasted_s {rt['wasted']:.2f}x, checkpoint-dependent "
        f"{rt['ckpt']:.2f}x ({rt['ckpt_alloc']:.2f}x with alloc), cost-model T_wasted "
        f"{rt['model']:.2f}x (paper: >= 13x)"
    )


def readme_tables(results: dict[str, Any]) -> str:
    """The README's section: the two tables, from a saved or fresh set of results."""
    rows: list[list[str]] = []
    ratio_rows: list[list[str]] = []
    for setting in results["settings"]:
        got = analyse(setting["pair"])
        label = setting["label"]
        for name in ("replicated", "disk"):
            g = got[name]
            rows.append(
                [
                    label,
                    name,
                    f"{g['wasted']:.1f} s",
                    f"{g['alloc']:.2f} s",
                    f"{g['ckpt']:.2f} s",
                    f"{g['ckpt_alloc']:.2f} s",
                    f"{g['T_wasted']:.2f} s",
                    str(g["rec"].get("lost_steps")),
                    f"{g['dominant'][:-2]} {g['shares'][g['dominant']] * 100:.0f} %",
                ]
            )
        rt = got["ratios"]
        ratio_rows.append(
            [label, *(f"{rt[k]:.2f}x" for k in ("wasted", "ckpt", "ckpt_alloc", "model"))]
        )
    first = markdown(
        [
            "storage",
            "backend",
            "wasted_s",
            "alloc_s",
            "checkpoint-dependent part",
            "… with alloc",
            "cost model T_wasted",
            "lost steps",
            "dominant phase",
        ],
        rows,
    )
    second = markdown(
        [
            "disk / replicated",
            "wasted_s",
            "checkpoint-dependent part",
            "… with alloc",
            'cost model (the paper\'s ">13×" quantity)',
        ],
        ratio_rows,
    )
    return (
        f"Measured {results['measured']} on {results['machine']}; {results['workload']}.\n\n"
        f"{first}\n\n{second}"
    )


def full_report(results: dict[str, Any]) -> None:
    """Everything the benchmark prints after measuring (also from ``--from``)."""
    print(results["probe_line"])
    if "probe_c" in results:
        print(results["probe_c"])
    for setting in results["settings"]:
        print(f"{setting['label']}:")
        report(setting["pair"])
    print(f"\n### Recovery from one hardware failure ({results['mode']} mode)\n")
    print(
        "replicated = every iteration, m=2; disk = HighFreq cadence, background persist. "
        "Checkpoint-dependent part = retrieve + load + replay + stalls; alloc_s = setting up "
        "the slots of the new generation (a memory backend's own restart cost). Emulated "
        "settings cap the disk backend's bandwidth per node.\n"
    )
    print(readme_tables(results))
    print("\n(the paper, 16 nodes and a real shared store: disk / replicated >= 13x in T_wasted)")
    if results["mode"] == "quick":
        print(
            "quick mode only checks that the benchmark runs: a gpt_tiny checkpoint is a few "
            "MiB, so both backends recover alike and these ratios are noise (mostly the "
            "restart phase). Quote the full mode."
        )


def probe(base: Path, common: list[str], model: str) -> tuple[float, int]:
    """This machine's T_iter for the workload (no checkpoints) and one rank's state bytes."""
    from gemini.checkpoint import format as fmt
    from gemini.workload.state import TrainState

    workload = [o for o in common if not o.startswith(("failure", "train.steps"))]
    s = run_job([*workload, "backend=none", "failure=none", "train.steps=12"], base, "probe")
    state = TrainState(compose([f"model={model}"]), 0, 1, torch.device("cpu"))
    state.forward_backward()
    state.optimizer_step()
    nbytes = fmt.layout(state.tensors())[1]
    return float(s["iter_time_s"]), nbytes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="gpt_tiny, 16 steps, failure at 12")
    ap.add_argument("--model", help="workload (default gpt_small; gpt_tiny with --quick)")
    ap.add_argument("--micro-batch", type=int, default=1, help="train.micro_batch (default 1)")
    ap.add_argument("--seq-len", type=int, default=16, help="train.seq_len (default 16)")
    ap.add_argument("--steps", type=int, help="training steps (default 40; 16 with --quick)")
    ap.add_argument("--at-step", type=int, help="failure step (default 30; 12 with --quick)")
    ap.add_argument("--node", type=int, default=1, help="node that fails")
    ap.add_argument(
        "--cap-gbps",
        type=float,
        default=PAPER_SHARED_GBPS / PAPER_NODES,
        help="(b)'s emulated per-node storage bandwidth, Gbit/s (default: the paper's "
        "20 Gbit/s shared by 16 nodes = 1.25)",
    )
    ap.add_argument(
        "--interval",
        type=int,
        default=PAPER_INTERVAL,
        help="(c): emulate the cap at which a checkpoint takes this many iterations "
        "(default 9, the paper's HighFreq interval)",
    )
    ap.add_argument("--settings", default="abc", help="which storage settings to run (default abc)")
    ap.add_argument(
        "--probe-model", default="gpt_small", help="state of the torch.save vs RAM-copy probe"
    )
    ap.add_argument("--dir", default=None, help="scratch dir (its disk is the 'local disk')")
    add_saved_results_args(ap, "print only the README's tables (with --from too)")
    a = ap.parse_args(argv)
    results = measured_or_saved(a, measure)
    if a.markdown:
        print(readme_tables(results))
    else:
        full_report(results)


def measure(a: argparse.Namespace) -> dict[str, Any]:
    """Run the jobs; returns every summary, so the tables can be printed again later."""
    q = a.quick
    model = a.model or ("gpt_tiny" if q else "gpt_small")
    steps = a.steps or (16 if q else 40)
    at_step = a.at_step or (12 if q else 30)
    cap = a.cap_gbps
    mach = machine()
    print(f"machine: {mach}; mode: {'quick' if q else 'full'}")
    workload = (
        f"{model}, micro_batch {a.micro_batch} x seq_len {a.seq_len}, 4 nodes x 1 rank, "
        f"hardware failure of node {a.node} at step {at_step} of {steps}"
    )
    print(workload, flush=True)
    common = [
        f"model={model}",
        "cluster.nodes=4",
        f"train.micro_batch={a.micro_batch}",
        f"train.seq_len={a.seq_len}",
        f"train.steps={steps}",
        "failure=hardware_once",
        f"failure.at_step={at_step}",
        f"failure.node={a.node}",
    ]
    results: dict[str, Any] = {
        "measured": time.strftime("%Y-%m-%d"),
        "machine": mach,
        "mode": "quick" if q else "full",
        "workload": workload,
        "settings": [],
    }
    with tempfile.TemporaryDirectory(prefix="gemini-recovery-bench-", dir=a.dir) as tmp:
        base = Path(tmp)
        vs_clone, vs_copy = save_vs_copy(a.probe_model, 5, base)
        results["probe_line"] = (
            f"Here torch.save+fsync costs {vs_clone:.1f}x a clone and {vs_copy:.1f}x a copy "
            "into preallocated RAM."
        )
        settings: list[tuple[str, str, float]] = []
        if "a" in a.settings:
            settings.append(("a", "(a) local disk", 0.0))
        if "b" in a.settings:
            shared = (
                f" ({PAPER_SHARED_GBPS:g} Gbit/s shared by {PAPER_NODES} nodes)"
                if cap == PAPER_SHARED_GBPS / PAPER_NODES
                else ""
            )
            settings.append(("b", f"(b) emulated {cap:g} Gbit/s per node{shared}", cap))
        if "c" in a.settings:
            t_iter, nbytes = probe(base, common, model)
            cap_c = round(nbytes * 8 / (a.interval * t_iter) / 1e9, 3)
            results["probe_c"] = (
                f"probe: T_iter {t_iter:.3f} s without checkpoints, {nbytes / 2**20:.0f} MiB "
                f"per rank -> (c) caps storage at {cap_c} Gbit/s per node (emulated), where "
                f"a checkpoint takes {a.interval} iterations"
            )
            print(results["probe_c"], flush=True)
            settings.append(
                (
                    "c",
                    f"(c) emulated {cap_c:g} Gbit/s per node, t_ckpt = {a.interval} T_iter",
                    cap_c,
                )
            )
        for key, label, gbps in settings:
            pair = one_pair(base, common, gbps, label)
            results["settings"].append({"key": key, "label": label, "gbps": gbps, "pair": pair})
    return results


if __name__ == "__main__":
    main()
