"""Traffic interleaving (the paper's Fig. 16): what each replication schedule adds to an iteration.

One job per mode through ``gemini.experiment.run`` (real processes, real
links), all with the same model, nodes, seed and link, and no failure:

* ``none`` — ``backend=none``: no checkpoint at all, the reference;
* ``blocking`` — every copy sent before the next step starts;
* ``naive`` — one background transfer per copy, unplanned, as soon as the
  local commit is done;
* ``interleave_nopipe`` — the chunks Algorithm 2 planned, each sent when its
  idle span begins, staged on the holder through one buffer;
* ``interleave`` — the same plan, pipelined on the holder.

With ``--network netns`` every node sits in a network namespace of its own
behind a veth link capped at ``--link-gbps`` in each direction, so the
checkpoint copies and the gradient all-reduces compete for the same link,
as on the paper's cluster; ``loopback`` runs the same jobs on the host's
loopback, where nothing but the CPU is shared. The planned modes send
naively until the generation's idle-span profile exists (its first 3 +
``--profile-steps`` steps), so each job's iteration time is the mean over
the steps after that (``summary.json``'s ``iter_times_s``); its overhead is
that over the ``none`` job's mean over the same steps. Every job must end
with the ``none`` job's state digest: replication does not touch training.

    .venv/bin/python -m benchmarks.interleave                   # both networks (~25 min here)
    .venv/bin/python -m benchmarks.interleave --network netns --link-gbps 2
    .venv/bin/python -m benchmarks.interleave --save i.json
    .venv/bin/python -m benchmarks.interleave --from i.json --markdown  # the README table

Times on a shared 2-core machine are noisy: quote them as measured, with the
machine line the script prints.
"""

from __future__ import annotations

import argparse
import statistics
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

MODES = ("blocking", "naive", "interleave_nopipe", "interleave")
"""``backend.replication.schedule`` values, in the order the paper expects their cost to fall."""
SKIP = 3
"""Steps every generation pays for lazy allocation before its profile starts."""


def workload(a: argparse.Namespace, network: str) -> list[str]:
    link = [f"cluster.link_gbps={a.link_gbps}"] if network == "netns" else []
    return [
        f"model={a.model}",
        f"cluster.nodes={a.nodes}",
        "cluster.ranks_per_node=1",
        f"cluster.network={network}",
        *link,
        f"train.steps={a.steps}",
        "failure=none",
    ]


def replicated(a: argparse.Namespace, mode: str) -> list[str]:
    return [
        "backend=replicated",
        f"backend.replication.factor={a.factor}",
        f"backend.replication.profile_steps={a.profile_steps}",
        f"backend.replication.schedule={mode}",
    ]


def measure(a: argparse.Namespace) -> dict[str, Any]:
    networks = ["netns", "loopback"] if a.network == "both" else [a.network]
    if "netns" in networks:
        from gemini.cluster.netns import NetnsError, check_available

        try:
            check_available()
        except NetnsError as e:
            if a.network == "netns":
                raise SystemExit(f"--network netns: {e}") from None
            print(f"emulated links unavailable ({e}): loopback only", flush=True)
            networks = ["loopback"]
    modes = list(MODES) if not a.only else a.only.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--only: unknown modes {unknown}; choose from {', '.join(MODES)}")
    mach = machine()
    print(f"machine: {mach}", flush=True)
    results: dict[str, Any] = {
        "measured": time.strftime("%Y-%m-%d"),
        "machine": mach,
        "settings": {
            "model": a.model,
            "nodes": a.nodes,
            "factor": a.factor,
            "steps": a.steps,
            "profile_steps": a.profile_steps,
            "link_gbps": a.link_gbps,
        },
        "networks": {},
    }
    with tempfile.TemporaryDirectory(prefix="gemini-interleave-", dir=a.dir) as tmp:
        base = Path(tmp)
        for network in networks:
            common = workload(a, network)
            rows = [{"mode": "none", "summary": run_job([*common, "backend=none"], base, "none")}]
            for mode in modes:
                summary = run_job([*common, *replicated(a, mode)], base, mode)
                rows.append({"mode": mode, "summary": summary})
            results["networks"][network] = {"workload": " ".join(common), "rows": rows}
    return results


def steady_iter_s(summary: dict[str, Any], skip: int) -> float | None:
    """Mean iteration time over the steps after the first ``skip``."""
    times = [t for t in (summary.get("iter_times_s") or [])[skip:] if isinstance(t, (int, float))]
    return statistics.fmean(times) if times else None


def _s(v: Any, digits: int = 3) -> str:
    return f"{float(v):.{digits}f} s" if isinstance(v, (int, float)) else "-"


def table(results: dict[str, Any]) -> str:
    st = results["settings"]
    skip = SKIP + int(st["profile_steps"])
    out = [
        f"Measured {results['measured']} on {results['machine']}; {st['model']}, "
        f"{st['nodes']} nodes, m={st['factor']}, {st['steps']} steps, iteration time "
        f"averaged over steps {skip + 1}-{st['steps']} (after the idle-span profile)."
    ]
    for network, res in results["networks"].items():
        rows = res["rows"]
        base = steady_iter_s(rows[0]["summary"], skip)
        digest = rows[0]["summary"].get("state_digest")
        lines: list[list[str]] = []
        for row in rows:
            s = row["summary"]
            it = steady_iter_s(s, skip)
            over = f"{(it / base - 1) * 100:+.1f} %" if it and base else "-"
            same = "yes" if s.get("state_digest") == digest and digest else "**no**"
            interval = s.get("interleave_interval")
            lines.append(
                [
                    f"`{row['mode']}`",
                    _s(it),
                    over,
                    _s(s.get("ckpt_replicate_s")),
                    _s(s.get("idle_s")),
                    _s(s.get("comm_s")),
                    str(interval) if interval is not None else "-",
                    same,
                ]
            )
        link = (
            f"each node's link capped at {st['link_gbps']} Gbit/s per direction"
            if network == "netns"
            else "shared loopback"
        )
        out.append(f"\n**{network}** ({link}):\n")
        out.append(
            markdown(
                [
                    "schedule",
                    "iteration",
                    "overhead vs none",
                    "replication per checkpoint",
                    "idle per iteration",
                    "communication per iteration",
                    "checkpoint interval",
                    "same final state as none",
                ],
                lines,
            )
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--model", default="gpt_small")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--factor", type=int, default=2, help="m: copies of each checkpoint")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--network", choices=("netns", "loopback", "both"), default="both")
    ap.add_argument("--link-gbps", type=float, default=2.0, help="cap of each link (netns)")
    ap.add_argument("--only", help=f"comma-separated modes (default all: {', '.join(MODES)})")
    ap.add_argument("--dir", default=None, help="scratch dir for the jobs")
    add_saved_results_args(ap, "print only the README's tables")
    a = ap.parse_args(argv)
    results = measured_or_saved(a, measure)
    if not a.markdown:
        print("\n### Traffic interleaving\n")
    print(table(results))


if __name__ == "__main__":
    main()
