"""The computed figures: Fig. 9 (analytic, or simulated where a simulation ran) and the
simulated Figs. 11 and 15.

Fig. 9 is computed here from :mod:`gemini.checkpoint.placement` unless the
store holds a simulation run (tag ``kind=simulation``) with ``fig9.csv``
(columns N, m, k, placement, method, probability, exact); then exact
enumeration, the closed form and Monte Carlo are drawn together from it.
Figs. 11 and 15 come only from a simulation's ``fig11.csv`` (N, net_gbps,
storage_gbps, ckpt_bytes, t_storage_s, t_gemini_s, reduction) and
``fig15.csv`` (system, N, failures_per_day, rate_unit, days, effective_ratio,
failures, from_memory, from_storage, cost_source; a file without ``rate_unit``,
from before it, is all cluster rates). Functions follow
:mod:`gemini.analysis.figures`: ``<name>_data``, ``fig_<name>``, ``<name>_ours``.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING

import pandas as pd

from gemini.analysis import style
from gemini.analysis.figures import NoData
from gemini.analysis.load import SIM_TABLES, Simulation, machine_of_tags
from gemini.checkpoint.placement import recovery_probability
from gemini.simulate.config import OPT_FAILURES_PER_NODE_PER_DAY

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from gemini.simulate import Tables

SIM_COMMAND = "gemini-simulate"
"""What produces the simulated figures' data."""


def _sim_table(sim: Simulation | None, name: str) -> pd.DataFrame:
    if sim is None:
        raise NoData("no simulation run (tag kind=simulation) in the store")
    if name not in sim.tables or sim.tables[name].empty:
        if sim.source:
            raise NoData(f"{sim.source} has no {name} table")
        raise NoData(f"the newest simulation run ({sim.run_id[:8]}) has no {name}.csv")
    data = sim.tables[name].copy()
    data.attrs.update(
        kind="simulated",
        machine=machine_of_tags(sim.tags),
        date=sim.start_time.strftime("%Y-%m-%d"),
        how=sim.source or f"simulation run {sim.run_id[:8]}",
    )
    return data


def simulation_of(
    tables: Tables, source: str = "computed in this session by gemini.simulate"
) -> Simulation:
    """Tables that :func:`gemini.simulate.simulate` just computed, as a :class:`Simulation`
    (run id empty, this machine, now), so that the simulated figures draw them as they
    draw a logged run's CSVs. A figure not computed has no table."""
    tags = {"host": socket.gethostname(), "cpu_cores": str(os.cpu_count())}
    sim = Simulation(run_id="", start_time=pd.Timestamp.now(), tags=tags, source=source)
    for name in SIM_TABLES:
        rows = getattr(tables, name)
        if rows:
            sim.tables[name] = pd.DataFrame(rows)
    return sim


def _finish(fig: Figure, data: pd.DataFrame, text: str, note: str = "") -> Figure:
    a = data.attrs
    style.title(fig, text)
    style.caption(fig, a["kind"], a["machine"], a["date"], f"{a['how']}. {note}".strip())
    return fig


# -- Fig. 9: recovery probability -----------------------------------------------


def recovery_probability_data(
    ns: Iterable[int] = range(4, 65, 4), m: int = 2, ks: Iterable[int] = (2, 3)
) -> pd.DataFrame:
    """Fig. 9's numbers, computed: P(every checkpoint survives k failures), group and ring.

    Group uses Corollary 1's closed form, exact here because k < 2m for the
    paper's m=2, k=2,3 (a lower bound otherwise, and then ``exact`` is False);
    ring enumerates every failure set exactly. Columns N, k, m, placement,
    probability, method, exact; ``attrs`` say "analytic".
    """
    rows = []
    ks = list(ks)
    for n in ns:
        for k in ks:
            if k > n:
                continue
            for placement, method in (("group", "closed_form"), ("ring", "exact")):
                if placement == "group" and n % m:
                    continue
                est = recovery_probability(n, m, k, placement, method)
                rows.append(
                    {
                        "N": n,
                        "k": k,
                        "m": m,
                        "placement": placement,
                        "probability": est.value,
                        "method": est.method,
                        "exact": est.exact,
                    }
                )
    data = pd.DataFrame(rows)
    data.attrs.update(
        kind="analytic",
        machine=socket.gethostname(),
        date=dt.date.today().isoformat(),
        how="gemini.checkpoint.placement",
    )
    return data


def recovery_probability_sim_data(sim: Simulation | None) -> pd.DataFrame:
    """Fig. 9 from a simulation's ``fig9.csv``: exact, closed form and Monte Carlo."""
    return _sim_table(sim, "fig9")


def fig_recovery_probability(data: pd.DataFrame | None = None) -> Figure:
    """Fig. 9: recovery probability vs N, one panel per k, placement by colour, method by
    line style (analytic by default)."""
    import seaborn as sns

    data = recovery_probability_data() if data is None else data
    ks = sorted(set(data["k"]))
    fig, axes = style.new_figure(width=3.4 * len(ks) + 2.0, ncols=len(ks))
    axes = list(axes) if len(ks) > 1 else [axes]
    for ax, k in zip(axes, ks, strict=True):
        sns.lineplot(
            data=data[data["k"] == k], x="N", y="probability", hue="placement",
            style="method", markers=True, errorbar=None, ax=ax,
        )  # fmt: skip
        ax.set_title(f"k = {k} simultaneous failures")
        ax.set_xlabel("machines N")
        ax.set_ylabel("P(every checkpoint in CPU memory)")
        if ax is not axes[-1] and ax.get_legend() is not None:
            ax.get_legend().remove()
    style.legend_outside(axes[-1])
    ms = ", ".join(str(v) for v in sorted(set(data["m"])))
    return _finish(fig, data, f"Fig. 9: recovery probability, m = {ms}, group vs ring")


def recovery_probability_ours(data: pd.DataFrame) -> dict[str, float]:
    """Group placement's probability at N=16, m=2, k=2 and 3 (exact before closed form
    before Monte Carlo)."""
    out: dict[str, float] = {}
    rank = {"exact": 0, "closed_form": 1, "monte_carlo": 2}
    for k in (2, 3):
        rows = data[
            (data["placement"] == "group") & (data["N"] == 16) & (data["m"] == 2) & (data["k"] == k)
        ]
        if len(rows):
            best = rows.assign(r=rows["method"].map(rank).fillna(9)).sort_values("r").iloc[0]
            out[f"group_k{k}_n16"] = float(best["probability"])
            data.attrs["ours_at"] = f"method {best['method']}"
    return out


# -- Fig. 11: checkpoint-time reduction -----------------------------------------


def checkpoint_reduction_data(sim: Simulation | None) -> pd.DataFrame:
    """Fig. 11 from a simulation's ``fig11.csv``."""
    return _sim_table(sim, "fig11")


def fig_checkpoint_reduction(data: pd.DataFrame) -> Figure:
    """Fig. 11: checkpoint time to storage / to CPU memory vs N, one line per bandwidth."""
    import seaborn as sns

    data = data.assign(
        network=data["net_gbps"].map(lambda g: f"{g:g} Gbit/s"),
        storage=data["storage_gbps"].map(lambda g: f"{g:g} Gbit/s"),
    )
    fig, ax = style.new_figure()
    sns.lineplot(
        data=data, x="N", y="reduction", hue="network",
        style="storage" if data["storage"].nunique() > 1 else None,
        markers=True, errorbar=None, ax=ax,
    )  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("machines N")
    ax.set_ylabel("checkpoint time, storage / Gemini (x, log scale)")
    style.legend_outside(ax)
    return _finish(fig, data, "Fig. 11: checkpoint-time reduction")


def _nearest(values: pd.Series, target: float) -> float:
    return float(values.iloc[(values - target).abs().argsort().iloc[0]])


def checkpoint_reduction_ours(data: pd.DataFrame) -> dict[str, float]:
    """The reduction at N nearest 16 and storage nearest 20 Gbit/s, at 100 and 400 Gbit/s."""
    out: dict[str, float] = {}
    at = data[data["N"] == _nearest(data["N"], 16)]
    at = at[at["storage_gbps"] == _nearest(at["storage_gbps"], 20)]
    if len(at):
        data.attrs["ours_at"] = (
            f"N={at['N'].iloc[0]:g}, storage {at['storage_gbps'].iloc[0]:g} Gbit/s"
        )
    for gbps in (100, 400):
        rows = at[at["net_gbps"] == gbps]
        if len(rows):
            out[f"reduction_{gbps}"] = float(rows["reduction"].mean())
    return out


# -- Fig. 15: effective training time -------------------------------------------


def effective_time_data(sim: Simulation | None) -> pd.DataFrame:
    """Fig. 15 from a simulation's ``fig15.csv``."""
    return _sim_table(sim, "fig15")


def _by_unit(data: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cluster-rate rows, per-machine rows) of a ``fig15.csv``. A file older than the
    ``rate_unit`` column has no per-machine rows: all of it is drawn as before."""
    if "rate_unit" not in data:
        return data, data.iloc[0:0]
    node = data["rate_unit"] == "node"
    return data[~node], data[node]


def _per_machine(rows: pd.DataFrame) -> pd.Series:
    """Failures per machine per day of per-machine rows (rounded: N x r / N is not r)."""
    return (rows["failures_per_day"] / rows["N"]).round(12)


def fig_effective_time(data: pd.DataFrame) -> Figure:
    """Fig. 15: effective training time ratio vs N and vs failures per day, one line per
    system.

    vs N (Fig. 15b): at a rate per machine, so the cluster's rate grows with N, where
    the table has such rows (``rate_unit`` ``node``; the rate nearest OPT-175B's where
    it has several); else at the most common cluster rate. vs failures per day
    (Fig. 15a): the cluster-rate rows at the most common N (every row where there are
    only per-machine ones).
    """
    import seaborn as sns

    cluster, node = _by_unit(data)
    if len(node):
        # One rate per machine: OPT-175B's where several were simulated.
        rate = _nearest(_per_machine(node), OPT_FAILURES_PER_NODE_PER_DAY)
        by_n = node[_per_machine(node) == rate]
        n_title = f"{rate:.3g} failures per machine per day"
    else:
        base_rate = cluster["failures_per_day"].mode().iloc[0]
        by_n = cluster[cluster["failures_per_day"] == base_rate]
        n_title = f"failures per day = {base_rate:g}"
        if by_n["N"].nunique() < 2:  # the rate grows with N: draw every row
            by_n = cluster
    by_rate = cluster if len(cluster) else data
    base_n = by_rate["N"].mode().iloc[0]
    panels = [
        (by_n, "N", "machines N", n_title),
        (by_rate[by_rate["N"] == base_n], "failures_per_day", "failures per day of the cluster",
         f"N = {base_n:g}"),
    ]  # fmt: skip
    fig, axes = style.new_figure(width=9.0, ncols=2)
    hue_order = sorted(set(data["system"]))
    for ax, (part, x, xlabel, subtitle) in zip(axes, panels, strict=True):
        sns.lineplot(
            data=part, x=x, y="effective_ratio", hue="system", hue_order=hue_order,
            marker="o", errorbar=None, ax=ax,
        )  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.set_ylabel("effective training time ratio")
        ax.set_title(subtitle)
        ax.set_ylim(0, 1.02)
    if axes[0].get_legend() is not None:
        axes[0].get_legend().remove()
    style.legend_outside(axes[1], "system")
    return _finish(fig, data, "Fig. 15: effective training time at scale")


def effective_time_ours(data: pd.DataFrame) -> dict[str, float]:
    """Gemini's effective ratio at the N nearest 1000: at a rate per machine where the
    table has one (the paper's 0.91 is at OPT-175B's, the rate nearest it), else at the
    most common failure rate there, else the mean over rates."""
    gem = data[data["system"].str.lower().str.contains("gemini")]
    if gem.empty:
        return {}
    cluster, node = _by_unit(gem)
    if len(node):
        at = node[node["N"] == _nearest(node["N"], 1000)]
        per_machine = _per_machine(at)
        rate = _nearest(per_machine, OPT_FAILURES_PER_NODE_PER_DAY)
        at = at[per_machine == rate]
        data.attrs["ours_at"] = f"N={at['N'].iloc[0]:g}, {rate:.3g} failures per machine per day"
        return {"effective_ratio_n1000": float(at["effective_ratio"].mean())}
    at = cluster[cluster["N"] == _nearest(cluster["N"], 1000)]
    rate = data["failures_per_day"].mode().iloc[0]
    if (at["failures_per_day"] == rate).any():
        at = at[at["failures_per_day"] == rate]
    rates = ", ".join(f"{r:g}" for r in sorted(set(at["failures_per_day"])))
    data.attrs["ours_at"] = f"N={at['N'].iloc[0]:g}, failures/day {rates}"
    return {"effective_ratio_n1000": float(at["effective_ratio"].mean())}
