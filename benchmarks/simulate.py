"""How long the cluster-scale simulator takes for 10,000 nodes and a 30-day run (aim: < 10 s).

Times ``gemini.simulate.simulate`` on Fig. 15 alone (every system, failure
rates 1, 2, 4 and 8 per day, 200 trials of 30 days) at N = 10,000, then the
same with a per-node failure rate (OPT-175B's ~0.0134 per machine-day: 134
failures a day at this size), with Weibull failures, and with half the
failures taking two machines (whose memory odds come from
``placement.recovery_probability``). Prints the best of ``--repeat`` runs of
each, the failures drawn, Gemini's effective ratio, and whether it meets the
aim.

Run: ``.venv/bin/python benchmarks/simulate.py [--nodes 10000] [--days 30] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import platform
import time

from gemini.simulate import SimulateConfig, simulate
from gemini.simulate.config import OPT_FAILURES_PER_NODE_PER_DAY

AIM_S = 10.0


def case(nodes: int, days: float, name: str) -> SimulateConfig:
    cfg = SimulateConfig(nodes=[nodes], days=days, figures=["fig15"])
    # Each case times only the rates it names: no per-machine rows beside them.
    cfg.failures.per_node_per_day = 0.0
    if name == "per-node rate":
        cfg.failures.rate_unit = "node"
        cfg.failures_per_day = [OPT_FAILURES_PER_NODE_PER_DAY]
    elif name == "weibull":
        cfg.failures.process = "weibull"
    elif name == "two-machine failures":
        cfg.failures.multi_node_probability = 0.5
    return cfg


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings")
    args = ap.parse_args(argv)

    print(f"# {platform.processor() or platform.machine()}, N={args.nodes}, {args.days:g} days")
    header = f"{'case':<22} {'best s':>8} {'failures/run':>13} {'gemini ratio':>13}"
    print(f"{header}  aim < {AIM_S:g} s")
    for name in ("cluster rates 1-8/day", "per-node rate", "weibull", "two-machine failures"):
        cfg = case(args.nodes, args.days, name)
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            rows = simulate(cfg).fig15
            best = min(best, time.perf_counter() - t0)
        gemini = [r for r in rows if r["system"] == "gemini"]
        worst = min(gemini, key=lambda r: r["effective_ratio"])
        print(
            f"{name:<22} {best:>8.2f} {worst['failures']:>13.1f} "
            f"{worst['effective_ratio']:>13.3f}  {'met' if best < AIM_S else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
