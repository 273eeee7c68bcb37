"""A cluster-scale model of what one machine cannot run: Figs. 9, 11 and 15 of the paper.

``gemini-simulate`` (``gemini.simulate.cli``) computes three tidy tables for
cluster sizes N up to 10,000 machines:

``fig9``  (``probability``)
    recovery probability vs N for group / ring / mixed placement and k
    simultaneous failures, exact, closed form and Monte Carlo side by side,
    all from ``gemini.checkpoint.placement.recovery_probability``.
``fig11`` (``checkpoint_time``)
    checkpoint time vs N and NIC bandwidth, remote storage of a fixed aggregate
    bandwidth vs Gemini's copies to peers' CPU memory.
``fig15`` (``training``)
    effective training time ratio vs failure rate and N, simulating the
    failures of many training runs, with per-failure costs configured or
    measured by ``gemini`` runs in MLflow (``costs``).

:func:`simulate` is the whole computation, with no files and no MLflow;
``gemini.simulate.record`` writes the CSVs and the MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gemini.simulate.checkpoint_time import FIG11_COLUMNS, fig11_rows
from gemini.simulate.config import CostConfig, SimulateConfig
from gemini.simulate.probability import FIG9_COLUMNS, fig9_rows, memory_probability
from gemini.simulate.training import FIG15_COLUMNS, fig15_rows

__all__ = [
    "FIG9_COLUMNS",
    "FIG11_COLUMNS",
    "FIG15_COLUMNS",
    "SimulateConfig",
    "Tables",
    "memory_ok_table",
    "simulate",
]


@dataclass
class Tables:
    """The rows of each figure computed (a figure not asked for has none)."""

    fig9: list[dict[str, Any]] = field(default_factory=list)
    fig11: list[dict[str, Any]] = field(default_factory=list)
    fig15: list[dict[str, Any]] = field(default_factory=list)


def memory_ok_table(cfg: SimulateConfig) -> dict[tuple[int, int], float]:
    """P(memory survives k lost machines) for every (N, k) Fig. 15 can draw."""
    f = cfg.failures
    ks = {1} | ({f.multi_node_count} if f.multi_node_probability > 0 else set())
    p = cfg.probability
    return {
        (n, k): memory_probability(
            n,
            cfg.factor,
            k,
            f.placement,
            exact_limit=p.exact_limit,
            trials=p.monte_carlo_trials,
            seed=cfg.seed,
        )
        for n in cfg.nodes
        for k in sorted(ks)
    }


def simulate(
    cfg: SimulateConfig,
    costs: CostConfig | None = None,
    cost_sources: dict[str, str] | None = None,
) -> Tables:
    """Every table ``cfg.figures`` asks for; ``costs`` replaces ``cfg.costs`` (measured ones)."""
    tables = Tables()
    if "fig9" in cfg.figures:
        p = cfg.probability
        tables.fig9 = fig9_rows(
            cfg.nodes,
            cfg.factor,
            p.ks,
            p.placements,
            exact_limit=p.exact_limit,
            trials=p.monte_carlo_trials,
            seed=cfg.seed,
        )
    if "fig11" in cfg.figures:
        c = cfg.checkpoint
        tables.fig11 = fig11_rows(
            cfg.nodes,
            cfg.factor,
            c.net_gbps,
            storage_gbps=c.storage_gbps,
            ckpt_gb=c.ckpt_gb,
            local_gbps=c.local_gbps,
        )
    if "fig15" in cfg.figures:
        tables.fig15 = fig15_rows(
            cfg.nodes,
            cfg.factor,
            cfg.failures_per_day,
            cfg.days,
            cfg.failures,
            costs or cfg.costs,
            seed=cfg.seed,
            memory_ok=memory_ok_table(cfg),
            cost_sources=cost_sources or {},
        )
    return tables
