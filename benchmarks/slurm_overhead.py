"""The same job locally and under SLURM: iteration time and recovery phases side by side.

Two runs of one 4-node job (replicated, one hardware failure of node 1 at the
same step) through the real console script, one after the other:

* **local** — ``gemini cluster=local ...``: the controller starts every node
  as a process tree on this host and restarts the failed one in place.
* **slurm** — ``gemini -m hydra/launcher=slurm cluster=slurm ...``: one SLURM
  job of nodes + 1 standby tasks (all on this host: ``tasks_per_host=0``);
  task 0 is the controller and node 0, the standby takes the failed node over.
  ``--launcher submitit_local`` runs the same tasks without a scheduler.

It prints, per run: the command's wall time (submission, queueing and
start-up included), the job's own wall time, the steady iteration time and
throughput, and every recovery phase (``gemini.recovery.PHASES``), then
SLURM / local for each. Both runs must end with the same state digest (it
says so): the launcher changes where processes run, never what they compute.
Needs ``make slurm-up`` (and ``SLURM_CONF``, which ``scripts/slurm.sh env``
prints) for ``--launcher slurm``.

    .venv/bin/python -m benchmarks.slurm_overhead                    # ~4 min here
    .venv/bin/python -m benchmarks.slurm_overhead --save s.json
    .venv/bin/python -m benchmarks.slurm_overhead --from s.json --markdown   # the README table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks.checkpoint import add_saved_results_args, machine, markdown, measured_or_saved
except ModuleNotFoundError:  # run as a script: siblings are top level
    from checkpoint import (  # type: ignore[no-redef]
        add_saved_results_args,
        machine,
        markdown,
        measured_or_saved,
    )

from gemini.recovery import PHASES

GEMINI = Path(sys.executable).with_name("gemini")


def workload(a: argparse.Namespace) -> list[str]:
    return [
        f"model={a.model}",
        f"cluster.nodes={a.nodes}",
        "backend=replicated",
        "failure=hardware_once",
        f"failure.node={a.node}",
        f"failure.at_step={a.at_step}",
        f"train.steps={a.steps}",
        "tracking=off",
        "progress=false",
    ]


def run(args: list[str], outputs: Path) -> tuple[dict[str, Any], float]:
    """Run the console script; (the job's summary.json, the command's wall time)."""
    env = {**os.environ, "GEMINI_OUTPUTS": str(outputs), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([str(GEMINI), *args], env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"gemini {' '.join(args)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    (path,) = list(outputs.rglob("summary.json"))
    return json.loads(path.read_text()), wall


def measure(a: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": machine(),
        "measured": time.strftime("%Y-%m-%d"),
        "workload": " ".join(workload(a)),
        "launcher": a.launcher,
        "runs": {},
    }
    scratch = Path(tempfile.mkdtemp(prefix="slurm-overhead-"))
    local_args = ["cluster=local", *workload(a)]
    slurm_args = ["-m", f"hydra/launcher={a.launcher}"]
    if a.launcher == "slurm":
        slurm_args.append("hydra.launcher.tasks_per_host=0")
    slurm_args += ["cluster=slurm", *workload(a)]
    for name, args in (("local", local_args), ("slurm", slurm_args)):
        print(f"running {name}: gemini {' '.join(args)}", flush=True)
        summary, wall = run(args, scratch / name)
        results["runs"][name] = {"summary": summary, "command_s": wall, "command": args}
    return results


def _s(v: Any) -> str:
    return f"{v:.2f} s" if isinstance(v, (int, float)) else "-"


def table(results: dict[str, Any]) -> str:
    local, slurm = results["runs"]["local"], results["runs"]["slurm"]

    def rec(run: dict[str, Any]) -> dict[str, Any]:
        recs = run["summary"].get("recoveries") or [{}]
        return dict(recs[0])

    rows: list[tuple[str, Any, Any]] = [
        ("command wall time (submit → result)", local["command_s"], slurm["command_s"]),
        ("job wall time", local["summary"]["wall_s"], slurm["summary"]["wall_s"]),
        (
            "iteration time (steady mean)",
            local["summary"]["iter_time_s"],
            slurm["summary"]["iter_time_s"],
        ),
    ]
    for phase in (*PHASES, "recovery_s"):
        rows.append((phase.removesuffix("_s"), rec(local).get(phase), rec(slurm).get(phase)))
    out = []
    for label, lv, sv in rows:
        ratio = f"{sv / lv:.2f}" if isinstance(lv, (int, float)) and lv and sv is not None else "-"
        out.append([label, _s(lv), _s(sv), ratio])
    same = local["summary"]["state_digest"] == slurm["summary"]["state_digest"]
    takeovers = slurm["summary"].get("cluster_layout", {}).get("takeovers", [])
    onto = ", ".join(
        f"node {t['node']} → task {t['task']}{' (standby)' if t.get('standby') else ''}"
        for t in takeovers
    )
    head = (
        f"Measured {results['measured']} on {results['machine']}; both: "
        f"`{results['workload']}`; SLURM through `hydra/launcher={results['launcher']}`, "
        f"every task on this host; failed node taken over: {onto or '-'}; "
        f"same final state digest: {'yes' if same else 'NO'}.\n\n"
    )
    return head + markdown(["", "local", results["launcher"], "ratio"], out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--model", default="gpt_tiny")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--at-step", type=int, default=12, help="step of the hardware failure")
    ap.add_argument("--node", type=int, default=1, help="node that fails")
    ap.add_argument("--launcher", default="slurm", choices=("slurm", "submitit_local"))
    add_saved_results_args(ap, "print only the README's table")
    a = ap.parse_args(argv)
    results = measured_or_saved(a, measure)
    if not a.markdown:
        print("\n### Local vs SLURM\n")
    print(table(results))


if __name__ == "__main__":
    main()
