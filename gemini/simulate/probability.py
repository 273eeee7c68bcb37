"""Fig. 9: the probability that k simultaneous failures leave every checkpoint in CPU memory.

Every number comes from ``gemini.checkpoint.placement.recovery_probability``;
this module only chooses, per (N, m, k, placement), which of its methods can
answer: exact enumeration where C(N, k) is small enough, Corollary 1's closed
form where it applies (group placement with m | N), and Monte Carlo always,
so the three can be drawn together where they overlap.
"""

from __future__ import annotations

import math
from typing import Any

from gemini.checkpoint.placement import (
    EXACT_ENUMERATION_LIMIT,
    recovery_probability,
    resolve_placement,
)

FIG9_COLUMNS = ("N", "m", "k", "placement", "method", "probability", "exact")


def placements_for(n: int, m: int, requested: list[str]) -> list[str]:
    """The distinct placements Algorithm 1 lays out for ``requested`` at N = ``n``.

    ``group`` becomes ``mixed`` where m does not divide N; ``mixed`` where it
    does lays out exactly as ``group``, so it is drawn once, as ``group``.
    """
    out: list[str] = []
    for name in requested:
        resolved = resolve_placement(n, m, name)
        if resolved == "mixed" and n % m == 0:
            resolved = "group"
        if resolved not in out:
            out.append(resolved)
    return out


def methods_for(n: int, m: int, k: int, placement: str, exact_limit: int) -> list[str]:
    """Which methods can answer (N, m, k, placement) within the enumeration cap.

    Enumeration marks C(N, k) sets of N machines with m copies each: its cost
    is those cells, capped by ``exact_limit``.
    """
    methods = []
    sets = math.comb(n, k)
    if sets <= EXACT_ENUMERATION_LIMIT and sets * n * m <= exact_limit:
        methods.append("exact")
    if placement == "group" and n % m == 0:
        methods.append("closed_form")
    methods.append("monte_carlo")
    return methods


def fig9_rows(
    nodes: list[int],
    m: int,
    ks: list[int],
    placements: list[str],
    *,
    exact_limit: int,
    trials: int,
    seed: int,
) -> list[dict[str, Any]]:
    """One row per (N, k, placement, method): ``FIG9_COLUMNS``; k > N is left out."""
    rows: list[dict[str, Any]] = []
    for n in nodes:
        for k in ks:
            if k > n:
                continue
            for placement in placements_for(n, m, placements):
                for method in methods_for(n, m, k, placement, exact_limit):
                    est = recovery_probability(n, m, k, placement, method, trials=trials, seed=seed)
                    rows.append(
                        {
                            "N": n,
                            "m": m,
                            "k": k,
                            "placement": placement,
                            "method": method,
                            "probability": est.value,
                            "exact": est.exact,
                        }
                    )
    return rows


def memory_probability(
    n: int, m: int, k: int, placement: str, *, exact_limit: int, trials: int, seed: int
) -> float:
    """P(every checkpoint keeps a copy in memory | k machines lost): for Fig. 15's draws.

    The cheapest exact answer ``recovery_probability`` has, else its Monte
    Carlo estimate.
    """
    if k < m:
        # Each checkpoint has m copies on m distinct machines: fewer than m
        # failures cannot take all of them, whatever the placement (Corollary
        # 1's first case). Saves an enumeration of N sets at N = 10,000.
        return 1.0
    resolved = resolve_placement(n, m, placement)
    methods = methods_for(n, m, k, resolved, exact_limit)
    # The closed form is exact below 2m failures, and O(1).
    method = "closed_form" if "closed_form" in methods and k < 2 * m else methods[0]
    return recovery_probability(n, m, k, resolved, method, trials=trials, seed=seed).value
