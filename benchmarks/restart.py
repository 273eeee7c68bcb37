"""Restart: how much of a recovery is detection, and how much is bringing processes back.

Every job here is ``gemini.experiment.run`` with ``make run``'s config (gpt_tiny,
4 nodes x 1 rank, ``backend=replicated``) and one injected failure at a fixed
step and node; the jobs differ only in how a failed generation comes back:

* **process** — ``cluster.restart=process cluster.standby_nodes=0
  cluster.warm_spares=false``: every trainer of the next generation is a new
  interpreter (torch imported again) and a lost node a new process tree, as
  before restarts in place existed: the reference, in the same run;
* **in place** — the defaults: survivors stay in their processes
  (``cluster.restart=in_place``), a lost node's index is taken over by a
  warm standby node (``cluster.standby_nodes=1``) and a killed rank comes
  back on its node's warm spare (``cluster.warm_spares=true``);
* **in place, nothing pre-started** — ``cluster.standby_nodes=0
  cluster.warm_spares=false``: what restarting in place alone gives.

For each job it prints ``recovery_s``, ``detect_s``, their difference (what
the restart machinery adds to detection), every phase
(``gemini.recovery.PHASES``) and how each rank came back (in place, spare,
standby, fresh). Jobs of one scenario must end with the same
``state_digest`` whatever the restart: the digest column shows it.

Scenarios and the targets they are checked against (printed as met or not):

1. ``make run``'s hardware failure: ``recovery_s <= detect_s + 2 s``;
2. a software failure (one trainer killed): ``recovery_s <= detect_s + 1.5 s``;
3. a hang (one trainer SIGSTOPped): detected within ``hang_timeout_s + 1 s``;
4. the hardware failure on 8 nodes instead of 4: ``recovery_s`` grows by <= 1.2x.

Run from the repository root::

    .venv/bin/python -m benchmarks.restart                 # every scenario (~8 min here)
    .venv/bin/python -m benchmarks.restart --save r.json   # keep the measurements
    .venv/bin/python -m benchmarks.restart --from r.json --markdown   # the README's table

Compare numbers only within one run of this script: the machine is shared.
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

from gemini.recovery import PHASES

AT_STEP = 40
NODE = 1
HANG_TIMEOUT_S = 10.0
BASE = ["model=gpt_tiny", "cluster.nodes=4", "backend=replicated", "train.steps=70"]
MODES = {
    "process": ["cluster.restart=process", "cluster.standby_nodes=0", "cluster.warm_spares=false"],
    "in place": [],
    "in place, nothing pre-started": ["cluster.standby_nodes=0", "cluster.warm_spares=false"],
}
SCENARIOS: dict[str, tuple[list[str], list[str]]] = {
    # name: (failure overrides, restart modes)
    "hardware": (
        ["failure=hardware_once"],
        ["process", "in place", "in place, nothing pre-started"],
    ),
    "software": (
        ["failure=software_once"],
        ["process", "in place", "in place, nothing pre-started"],
    ),
    "hang": (
        ["failure=hang_once", f"cluster.hang_timeout_s={HANG_TIMEOUT_S:g}"],
        ["process", "in place"],
    ),
    "hardware, 8 nodes": (["failure=hardware_once", "cluster.nodes=8"], ["in place"]),
}
TARGETS = {"hardware": 2.0, "software": 1.5}
"""Scenario -> most seconds ``recovery_s`` may exceed ``detect_s`` by (in place)."""


def measure(a: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gemini-restart-") as scratch:
        tmp = a.outputs or scratch
        for name, (failure, modes) in SCENARIOS.items():
            for mode in modes:
                overrides = [
                    *BASE,
                    *failure,
                    f"failure.at_step={AT_STEP}",
                    f"failure.node={NODE}",
                    *MODES[mode],
                ]
                summary = run_job(overrides, Path(tmp), f"{name}-{mode}".replace(" ", "_"))
                recs = summary["recoveries"]
                rows.append(
                    {
                        "scenario": name,
                        "mode": mode,
                        "overrides": overrides,
                        "outcome": summary["outcome"],
                        "digest": summary["state_digest"],
                        "startup_s": summary.get("startup_s"),
                        "recovery": recs[0] if len(recs) == 1 else None,
                        "recoveries": len(recs),
                    }
                )
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows}


def _s(x: Any) -> str:
    return "-" if x is None else f"{float(x):.2f}"


def how_ranks_came_back(rec: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for how in rec.get("rank_restart", {}).values():
        counts[how] = counts.get(how, 0) + 1
    return ", ".join(f"{n} {how}" for how, n in sorted(counts.items()))


def checks(results: dict[str, Any]) -> list[str]:
    """Each target, met or not, from the measurements."""
    out = []
    by = {(r["scenario"], r["mode"]): r for r in results["rows"]}

    def rec(scenario: str, mode: str) -> dict[str, Any] | None:
        row = by.get((scenario, mode))
        return None if row is None else row["recovery"]

    for scenario, limit in TARGETS.items():
        r = rec(scenario, "in place")
        if r is None:
            continue
        extra = r["recovery_s"] - r["detect_s"]
        met = "met" if extra <= limit else "NOT met"
        out.append(
            f"{scenario}: recovery {r['recovery_s']:.2f} s = detect {r['detect_s']:.2f} s "
            f"+ {extra:.2f} s (target + {limit:g} s: {met})"
        )
    hang = rec("hang", "in place")
    if hang is not None:
        met = "met" if hang["detect_s"] <= HANG_TIMEOUT_S + 1.0 else "NOT met"
        out.append(
            f"hang: detected after {hang['detect_s']:.2f} s (target <= hang_timeout_s "
            f"{HANG_TIMEOUT_S:g} + 1 s: {met})"
        )
    four, eight = rec("hardware", "in place"), rec("hardware, 8 nodes", "in place")
    if four is not None and eight is not None:
        ratio = eight["recovery_s"] / four["recovery_s"]
        met = "met" if ratio <= 1.2 else "NOT met"
        out.append(
            f"4 -> 8 nodes: recovery {four['recovery_s']:.2f} s -> {eight['recovery_s']:.2f} s, "
            f"x{ratio:.2f} (target <= x1.2: {met})"
        )
    for scenario in {r["scenario"] for r in results["rows"]}:
        digests = {r["digest"] for r in results["rows"] if r["scenario"] == scenario}
        if len(digests) > 1:
            out.append(f"{scenario}: the restart modes ended in DIFFERENT states: {digests}")
    return out


def table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["failure", "restart", "recovery s", "detect s", "recovery - detect s"]
    header += [p[:-2] for p in PHASES if p != "detect_s"] + ["ranks came back", "digest"]
    rows = []
    for row in results["rows"]:
        rec = row["recovery"] or {}
        extra = rec["recovery_s"] - rec["detect_s"] if rec else None
        rows.append(
            [row["scenario"], row["mode"], _s(rec.get("recovery_s")), _s(rec.get("detect_s")),
             _s(extra)]
            + [_s(rec.get(p)) for p in PHASES if p != "detect_s"]
            + [how_ranks_came_back(rec), str(row["digest"])[:12]]
        )  # fmt: skip
    return header, rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_saved_results_args(ap, "print the table as Markdown (the README's)")
    ap.add_argument("--outputs", help="keep every job's directory (and logs) under this one")
    a = ap.parse_args(argv)
    results = measured_or_saved(a, measure)
    print(f"\nRestart after a failure — {results['machine']}, {results['date']}")
    print("gpt_tiny, 4 nodes x 1 rank (unless said), replicated m=2, failure at step "
          f"{AT_STEP} on node {NODE}")  # fmt: skip
    header, rows = table(results)
    if a.markdown:
        print(markdown(header, rows))
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print()
    for line in checks(results):
        print(line)


if __name__ == "__main__":
    main()
