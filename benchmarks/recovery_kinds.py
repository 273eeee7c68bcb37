"""Recovery, failure kind by failure kind: where the state came from, what it cost, and exactness.

One job per row through ``gemini.experiment.run`` (real processes, sockets,
shared memory), all with the same workload and one injected failure at the
same step and node, plus one failure-free job of the same workload: the
reference digest every row must end with (the backend does not change the
digest, so ``backend=none`` is the reference of all of them).

For each row it prints where every rank was restored from, the steps lost,
``recovery_s`` (failure -> back at the failed step), its ``detect_s``,
``restart_s`` and ``alloc_s`` phases (``gemini.recovery.PHASES``), how the ranks came
back (in place, spare, standby, fresh), and whether the job ended with the
reference's state digest.

    .venv/bin/python -m benchmarks.recovery_kinds                      # every row (~8 min here)
    .venv/bin/python -m benchmarks.recovery_kinds --only hardware-replicated,hardware-disk
    .venv/bin/python -m benchmarks.recovery_kinds --save k.json       # keep every summary
    .venv/bin/python -m benchmarks.recovery_kinds --from k.json --markdown   # the README table

Times on a shared 2-core machine are noisy: quote them as measured, with the
machine line the script prints.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks.checkpoint import (
        add_saved_results_args,
        machine,
        markdown,
        measured_or_saved,
        run_job,
    )
except ModuleNotFoundError:  # run as a script: siblings are top level
    from checkpoint import (  # type: ignore[no-redef]
        add_saved_results_args,
        machine,
        markdown,
        measured_or_saved,
        run_job,
    )

SCENARIOS: dict[str, tuple[str, list[str]]] = {
    "software-replicated": (
        "software, replicated (default: in place, warm spare)",
        ["backend=replicated", "failure=software_once"],
    ),
    "software-replicated-process": (
        "software, replicated, `cluster.restart=process`, no spares",
        [
            "backend=replicated",
            "failure=software_once",
            "cluster.restart=process",
            "cluster.warm_spares=false",
        ],
    ),
    "hardware-replicated": (
        "hardware, replicated m=2",
        ["backend=replicated", "backend.replication.factor=2", "failure=hardware_once"],
    ),
    "hardware-disk": (
        "hardware, disk (every 5 steps)",
        ["backend=disk", "backend.cadence=every_n", "backend.every_n=5", "failure=hardware_once"],
    ),
    "two-in-group": (
        "two nodes of one group, replicated m=2 + persistent tier",
        ["backend=replicated", "backend.persist_every_s=0.5", "failure=two_in_group"],
    ),
    "corruption": (
        "corrupted newest replica + hardware failure",
        ["backend=replicated", "failure=corruption"],
    ),
    "kill-during-snapshot": (
        "kill during a snapshot, replicated",
        ["backend=replicated", "failure=kill_during_snapshot"],
    ),
    "root-loss": ("root agent loss, replicated", ["backend=replicated", "failure=root_loss"]),
}
"""Row name -> (label, overrides on top of the common workload)."""


def workload(a: argparse.Namespace) -> list[str]:
    return [
        f"model={a.model}",
        f"cluster.nodes={a.nodes}",
        "cluster.ranks_per_node=1",
        f"train.steps={a.steps}",
        f"failure.at_step={a.at_step}",
        f"failure.node={a.node}",
    ]


def measure(a: argparse.Namespace) -> dict[str, Any]:
    names = list(SCENARIOS) if not a.only else a.only.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"--only: unknown rows {unknown}; choose from {', '.join(SCENARIOS)}")
    mach = machine()
    common = workload(a)
    print(f"machine: {mach}", flush=True)
    results: dict[str, Any] = {
        "measured": time.strftime("%Y-%m-%d"),
        "machine": mach,
        "workload": " ".join(common),
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="gemini-recovery-kinds-", dir=a.dir) as tmp:
        base = Path(tmp)
        ref = run_job([*common, "backend=none", "failure=none"], base, "reference")
        results["reference_digest"] = ref["state_digest"]
        for name in names:
            label, overrides = SCENARIOS[name]
            summary = run_job([*common, *overrides], base, name)
            results["rows"].append({"name": name, "label": label, "summary": summary})
    return results


def _sources(rec: dict[str, Any]) -> str:
    counts = rec.get("source_counts") or {}
    if rec.get("kind") == "root_loss":
        return "(training carries on; a new root is elected)"
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items())) or "-"


def _came_back(rec: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for how in (rec.get("rank_restart") or {}).values():
        counts[how] = counts.get(how, 0) + 1
    return ", ".join(f"{how} ×{n}" for how, n in sorted(counts.items())) or "-"


def _s(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{float(v):.1f} s" if v >= 0.1 else f"{float(v):.2f} s"


def table(results: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    for row in results["rows"]:
        s = row["summary"]
        recs = s.get("recoveries") or []
        ok = s.get("outcome") == "completed"
        same = s.get("state_digest") == results["reference_digest"]
        exact = "yes" if ok and same else f"**no** ({s.get('outcome')})"
        if not recs:
            rows.append([row["label"], "(no recovery)", "-", "-", "-", "-", "-", "-", "-", exact])
            continue
        # Several recoveries (a failure during a recovery): each one's figures.
        rows.append(
            [
                row["label"],
                "; ".join(_sources(r) for r in recs),
                ", ".join(str(r.get("lost_steps")) for r in recs),
                ", ".join(_s(r.get("recovery_s")) for r in recs),
                ", ".join(_s(r.get("detect_s")) for r in recs),
                ", ".join(_s(r.get("takeover_s")) for r in recs),
                ", ".join(_s(r.get("restart_s")) for r in recs),
                ", ".join(_s(r.get("alloc_s")) for r in recs),
                "; ".join(_came_back(r) for r in recs),
                exact,
            ]
        )
    head = (
        f"Measured {results['measured']} on {results['machine']}; every row: "
        f"`{results['workload']}` plus the row's failure and backend.\n\n"
    )
    return head + markdown(
        [
            "failure, backend",
            "restored from",
            "lost steps",
            "recovery (failure → back at the failed step)",
            "of which detect",
            "takeover",
            "restart",
            "alloc",
            "ranks came back",
            "ends with the failure-free state digest",
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--model", default="gpt_tiny")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--at-step", type=int, default=10, help="step of the injected failure")
    ap.add_argument("--node", type=int, default=1, help="node that fails")
    ap.add_argument("--only", help=f"comma-separated rows (default all: {', '.join(SCENARIOS)})")
    ap.add_argument("--dir", default=None, help="scratch dir for the jobs")
    add_saved_results_args(ap, "print only the README's table")
    a = ap.parse_args(argv)
    results = measured_or_saved(a, measure)
    if not a.markdown:
        print("\n### Recovery by failure kind\n")
    print(table(results))


if __name__ == "__main__":
    main()
