"""The measured figures: the paper's Figs. 7, 8, 10, 12, 14 and 16, from job runs.

Each figure has three functions, which the report and the notebooks share:

- ``<name>_data(runs)``: the figure's runs (:func:`gemini.analysis.load.select`:
  its sweep's, else those whose params fit), one row per job with the
  columns it draws plus the runs' tags; ``attrs`` carry the caption's kind,
  machine, date and selection. Raises :class:`NoData` when nothing fits.
- ``fig_<name>(data)``: the matplotlib Figure, in the one style of
  :mod:`gemini.analysis.style`, bars = mean over runs, whiskers = sd.
- ``<name>_ours(data)``: the numbers that stand beside the paper's in
  :func:`gemini.analysis.report.paper_table`, keyed like
  :data:`gemini.analysis.paper.PAPER`'s ``quantity``; where they were taken
  (a model, a storage setting) is left in ``data.attrs["ours_at"]``.

============================  =========================  ======================
data / figure / ours          paper                      sweep
============================  =========================  ======================
``iteration_time``            Fig. 7 (overhead)          ``fig7_overhead``
``idle_spans``                Fig. 8 (idle vs traffic)   ``idle_spans``
``wasted_time``               Fig. 10 (wasted time)      ``fig10_wasted``
``checkpoint_frequency``      Fig. 12 (ckpts per hour)   ``fig12_frequency``
``recovery_timeline``         Fig. 14 (one failure)      ``fig14_timeline``
``interleave_ablation``       Fig. 16 (ablation)         ``interleave_ablation``
``backends_under_failure``    (a table; no paper value)  ``backends_under_failure``
============================  =========================  ======================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pandas as pd

from gemini.analysis import style
from gemini.analysis.load import column, dates_of, machine_of, numeric, select
from gemini.config import FailureConfig
from gemini.recovery import PHASES

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class NoData(ValueError):
    """A figure has nothing to draw; the message says what is missing."""


FAILURE_REPLACED = {"software_once": 0, "hardware_once": 1, "two_in_group": 2}
"""Failure schedule -> machines replaced (Fig. 10's x axis); ``correlated`` replaces
``failure.k`` (:func:`replaced_of`)."""
SCHEDULE_ORDER = ("none", "blocking", "naive", "interleave_nopipe", "interleave")
"""Fig. 16's columns, reference first."""


def system_of(runs: pd.DataFrame) -> pd.Series:
    """The paper's name for each run's checkpointing: ``Gemini (replicated)``,
    ``HighFreq (disk)`` (cadence highfreq), ``Strawman (disk)`` (disk with a
    longer interval: every_n > 1 or another cadence), ``disk, every step``,
    ``memory`` or ``none``."""
    backend = column(runs, "params.backend.name").fillna(column(runs, "tags.backend"))
    cadence = column(runs, "params.backend.cadence")
    every_n = numeric(runs, "params.backend.every_n").fillna(1)

    def name(b: Any, c: Any, n: float) -> str:
        if b == "replicated":
            return "Gemini (replicated)"
        if b == "disk" and c == "highfreq":
            return "HighFreq (disk)"
        if b == "disk":
            # Every step to disk is no baseline of the paper's: say what it is.
            return "disk, every step" if c == "every_n" and n <= 1 else "Strawman (disk)"
        return str(b) if isinstance(b, str) else "?"

    names = [name(*row) for row in zip(backend, cadence, every_n, strict=True)]
    return pd.Series(names, index=runs.index)


def _model(runs: pd.DataFrame) -> pd.Series:
    return column(runs, "params.model.name").fillna(column(runs, "tags.model")).fillna("?")


def _tagged(data: pd.DataFrame, runs: pd.DataFrame, how: str) -> pd.DataFrame:
    """``data`` with the caption's facts in ``attrs`` (pandas carries them through filters)."""
    data.attrs.update(kind="measured", machine=machine_of(runs), date=dates_of(runs), how=how)
    return data


def _facts(data: pd.DataFrame) -> tuple[str, str, str]:
    a = data.attrs
    return (
        a.get("machine") or machine_of(data),
        a.get("date") or dates_of(data),
        a.get("how", f"{len(data)} runs"),
    )


def _pick(
    runs: pd.DataFrame,
    sweep: str,
    fallback: Callable[[pd.DataFrame], pd.Series],
    needs: str,
    why: str,
) -> tuple[pd.DataFrame, str]:
    chosen, how = select(runs, sweep, fallback)
    chosen = chosen[chosen[needs].notna()] if needs in chosen else chosen.iloc[0:0]
    if chosen.empty:
        raise NoData(f"no run of sweep {sweep} and no run {why}")
    return chosen.copy(), how


def _finish(fig: Figure, data: pd.DataFrame, text: str, note: str = "") -> Figure:
    machine, date, how = _facts(data)
    style.title(fig, text)
    style.caption(fig, data.attrs.get("kind", "measured"), machine, date, f"{how}. {note}".strip())
    return fig


def replaced_of(runs: pd.DataFrame) -> pd.Series:
    """Machines each run's one-off failure replaced (NaN for other schedules)."""
    name = column(runs, "params.failure.name")
    k = numeric(runs, "params.failure.k").fillna(FailureConfig.k)
    return name.map(FAILURE_REPLACED).where(name != "correlated", k).astype(float)


def _one_off_failure(runs: pd.DataFrame) -> pd.Series:
    """Runs of a failure schedule that replaces a known number of machines: what Fig. 10
    and the backends table draw when the store holds no run of their sweep."""
    return replaced_of(runs).notna()


def _mean(data: pd.DataFrame, where: pd.Series, col: str) -> float:
    vals = pd.to_numeric(data.loc[where, col], errors="coerce").dropna()
    return float(vals.mean()) if len(vals) else float("nan")


# -- Fig. 7: iteration time with and without checkpoints -----------------------


def iteration_time_data(runs: pd.DataFrame) -> pd.DataFrame:
    """Fig. 7's runs: model, backend, iter_time_s, ckpt_stall_s per job without failures."""

    def fallback(df: pd.DataFrame) -> pd.Series:
        return column(df, "params.failure.name") == "none"

    chosen, how = _pick(runs, "fig7_overhead", fallback, "iter_time_s", "with iter_time_s")
    chosen["model"] = _model(chosen)
    chosen["backend"] = column(chosen, "params.backend.name").fillna("?")
    return _tagged(chosen, chosen, how)


def _models_by_size(data: pd.DataFrame, col: str = "iter_time_s") -> list[str]:
    # The slower a model's step, the larger it is: no size is logged per run.
    return list(data.groupby("model")[col].mean().sort_values().index)


def fig_iteration_time(data: pd.DataFrame) -> Figure:
    """Fig. 7: mean iteration time per model and backend (bars), sd whiskers."""
    import seaborn as sns

    if data.empty:
        raise NoData("no run to draw")
    fig, ax = style.new_figure()
    sns.barplot(
        data=data,
        x="model",
        y="iter_time_s",
        hue="backend",
        order=_models_by_size(data),
        errorbar="sd",
        ax=ax,
    )
    ax.set_xlabel("model")
    ax.set_ylabel("iteration time (s, mean of steady steps)")
    style.legend_outside(ax, "backend")
    return _finish(fig, data, "Fig. 7: iteration time with and without checkpoints")


def iteration_time_ours(data: pd.DataFrame) -> dict[str, float]:
    """Replicated / none iteration time and replicated's own, on the largest model run."""
    out: dict[str, float] = {}
    for model in reversed(_models_by_size(data)):
        here = data["model"] == model
        rep = _mean(data, here & (data["backend"] == "replicated"), "iter_time_s")
        none = _mean(data, here & (data["backend"] == "none"), "iter_time_s")
        if rep == rep:  # not NaN
            data.attrs["ours_at"] = f"model {model}"
            out["iter_time_largest"] = rep
            out["overhead_ratio"] = rep / none if none == none and none > 0 else float("nan")
            break
    return out


# -- Fig. 8: idle network time vs checkpoint traffic ----------------------------

IDLE_QUANTITIES = {
    "idle_s": "idle network time per iteration",
    "comm_s": "communication time per iteration",
    "ckpt_replicate_s": "one checkpoint's replica transfer",
}
"""Fig. 8's bars: metric -> legend label."""


def idle_spans_data(runs: pd.DataFrame) -> pd.DataFrame:
    """Fig. 8's runs: model, idle_s, comm_s, ckpt_replicate_s per job."""

    def fallback(df: pd.DataFrame) -> pd.Series:
        # Idle *network* time means something only behind a capped link of
        # the node's own: a profile on shared loopback is not Fig. 8.
        return numeric(df, "idle_s").notna() & (numeric(df, "params.cluster.link_gbps") > 0)

    chosen, how = _pick(
        runs, "idle_spans", fallback, "idle_s", "with idle_s (an idle profile) behind a capped link"
    )
    chosen["model"] = _model(chosen)
    return _tagged(chosen, chosen, how)


def fig_idle_spans(data: pd.DataFrame) -> Figure:
    """Fig. 8: per model, idle time vs communication vs one checkpoint's transfer."""
    import seaborn as sns

    cols = [c for c in IDLE_QUANTITIES if c in data]
    long = data.melt(id_vars=["model"], value_vars=cols, var_name="metric", value_name="s")
    long["quantity"] = long["metric"].map(IDLE_QUANTITIES)
    fig, ax = style.new_figure()
    sns.barplot(
        data=long,
        x="model",
        y="s",
        hue="quantity",
        order=_models_by_size(data, "comm_s" if "comm_s" in data else "idle_s"),
        errorbar="sd",
        ax=ax,
    )
    ax.set_ylabel("seconds per iteration")
    style.legend_outside(ax)
    return _finish(fig, data, "Fig. 8: idle network time vs checkpoint traffic")


def idle_spans_ours(data: pd.DataFrame) -> dict[str, float]:
    """Idle time, transfer time and their ratio on the largest model run."""
    largest = _models_by_size(data, "comm_s" if "comm_s" in data else "idle_s")[-1]
    here = data["model"] == largest
    data.attrs["ours_at"] = f"model {largest}"
    idle = _mean(data, here, "idle_s")
    traffic = _mean(data, here, "ckpt_replicate_s") if "ckpt_replicate_s" in data else float("nan")
    return {
        "idle_s": idle,
        "ckpt_traffic_s": traffic,
        "idle_over_traffic": idle / traffic if traffic and traffic == traffic else float("nan"),
    }


# -- Fig. 10: wasted time per failure -------------------------------------------


def _storage(runs: pd.DataFrame) -> pd.Series:
    bw = numeric(runs, "params.backend.bandwidth_gbps").fillna(0.0)
    return bw.map(lambda g: f"emulated {g:g} Gbit/s storage" if g > 0 else "local disk")


def wasted_time_data(runs: pd.DataFrame) -> pd.DataFrame:
    """Fig. 10's runs: system, replaced (0/1/2), storage, mean_wasted_s, iter_time_s."""

    chosen, how = _pick(
        runs, "fig10_wasted", _one_off_failure, "mean_wasted_s", "recovered from a one-off failure"
    )
    chosen["system"] = system_of(chosen)
    chosen["replaced"] = replaced_of(chosen).astype("Int64")
    chosen["storage"] = _storage(chosen)
    return _tagged(chosen, chosen, how)


def _wasted_bars(data: pd.DataFrame, x: str, xlabel: str, heading: str) -> Figure:
    import seaborn as sns

    panels = sorted(set(data["storage"])) if "storage" in data else [None]
    fig, axes = style.new_figure(width=4.2 * len(panels) + 2.2, height=4.0, ncols=len(panels))
    axes = list(axes) if len(panels) > 1 else [axes]
    hue_order = sorted(set(data["system"]))
    for ax, panel in zip(axes, panels, strict=True):
        part = data if panel is None else data[data["storage"] == panel]
        sns.barplot(
            data=part, x=x, y="mean_wasted_s", hue="system", hue_order=hue_order,
            errorbar="sd", ax=ax,
        )  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("wasted time per failure (s, log scale)")
        if panel is not None:
            ax.set_title(panel)
        if ax is not axes[-1]:
            legend = ax.get_legend()
            if legend is not None:
                legend.remove()
    style.legend_outside(axes[-1], "system")
    return _finish(fig, data, heading, "Wasted time: lost progress + checkpoint stall + recovery.")


def fig_wasted_time(data: pd.DataFrame) -> Figure:
    """Fig. 10: mean wasted time per failure by machines replaced, one panel per storage."""
    return _wasted_bars(data, "replaced", "machines replaced", "Fig. 10: wasted time per failure")


def wasted_time_ours(data: pd.DataFrame) -> dict[str, float]:
    """Each system's wasted time at the emulated storage if measured (else local disk)."""
    storages = sorted(set(data["storage"]))
    emulated = [s for s in storages if s.startswith("emulated")]
    storage = emulated[0] if emulated else storages[0]
    data.attrs["ours_at"] = f"{storage}, mean over 0/1/2 replaced"
    at = data["storage"] == storage
    system = data["system"]
    straw = _mean(data, at & (system == "Strawman (disk)"), "mean_wasted_s")
    high = _mean(data, at & (system == "HighFreq (disk)"), "mean_wasted_s")
    gem = _mean(data, at & (system == "Gemini (replicated)"), "mean_wasted_s")
    gem_iter = _mean(data, at & (system == "Gemini (replicated)"), "iter_time_s")
    return {
        "strawman_min": straw / 60,
        "highfreq_min": high / 60,
        "gemini_iters": gem / gem_iter if gem_iter and gem_iter == gem_iter else float("nan"),
        "highfreq_over_gemini": high / gem if gem else float("nan"),
    }


# -- Fig. 12: checkpoints per hour ----------------------------------------------


def checkpoint_frequency_data(runs: pd.DataFrame) -> pd.DataFrame:
    """Fig. 12's runs: system, cadence, checkpoints_per_hour."""

    def fallback(df: pd.DataFrame) -> pd.Series:
        return column(df, "params.backend.name").isin(["disk", "memory", "replicated"])

    chosen, how = _pick(
        runs, "fig12_frequency", fallback, "checkpoints_per_hour", "that checkpointed"
    )
    chosen["system"] = system_of(chosen)
    chosen["cadence"] = column(chosen, "params.backend.cadence").fillna("?")
    chosen["label"] = chosen["system"] + ", " + chosen["cadence"]
    return _tagged(chosen, chosen, how)


def fig_checkpoint_frequency(data: pd.DataFrame) -> Figure:
    """Fig. 12: checkpoints per hour per system and cadence (log scale)."""
    import seaborn as sns

    order = list(data.groupby("label")["checkpoints_per_hour"].mean().sort_values().index)
    fig, ax = style.new_figure()
    sns.barplot(
        data=data, x="label", y="checkpoints_per_hour", hue="system", order=order,
        errorbar="sd", ax=ax,
    )  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("system, cadence")
    ax.set_ylabel("checkpoints per hour (log scale)")
    ax.tick_params(axis="x", labelrotation=20)
    style.legend_outside(ax, "system")
    return _finish(fig, data, "Fig. 12: checkpoint frequency")


def checkpoint_frequency_ours(data: pd.DataFrame) -> dict[str, float]:
    """Gemini's checkpoints per hour over HighFreq's and over Strawman's."""
    cph = data.groupby("system")["checkpoints_per_hour"].mean()
    gem = cph.get("Gemini (replicated)", float("nan"))
    return {
        "gemini_over_highfreq": gem / cph.get("HighFreq (disk)", float("nan")),
        "gemini_over_strawman": gem / cph.get("Strawman (disk)", float("nan")),
    }


# -- Fig. 14: one failure's cost as a timeline ----------------------------------


def recovery_timeline_data(runs: pd.DataFrame) -> pd.DataFrame:
    """Fig. 14's runs: system and ``mean_<phase>`` of every recovery phase."""

    def fallback(df: pd.DataFrame) -> pd.Series:
        return numeric(df, "mean_recovery_s").notna()

    chosen, how = _pick(runs, "fig14_timeline", fallback, "mean_recovery_s", "that recovered")
    chosen["system"] = system_of(chosen)
    for phase in PHASES:
        chosen[f"mean_{phase}"] = numeric(chosen, f"mean_{phase}").fillna(0.0)
    return _tagged(chosen, chosen, how)


def fig_recovery_timeline(data: pd.DataFrame) -> Figure:
    """Fig. 14: one stacked bar per system, one colour per recovery phase (mean over runs)."""
    import seaborn as sns

    means = data.groupby("system")[[f"mean_{p}" for p in PHASES]].mean()
    fig, ax = style.new_figure(height=1.8 + 0.5 * len(means))
    left = pd.Series(0.0, index=means.index)
    for phase, color in zip(PHASES, sns.color_palette("colorblind", len(PHASES)), strict=True):
        width = means[f"mean_{phase}"]
        ax.barh(list(means.index), width, left=left, color=color, label=phase.removesuffix("_s"))
        left += width
    ax.invert_yaxis()
    ax.set_xlabel("seconds after the failure (mean over each system's runs)")
    style.legend_outside(ax, "phase")
    return _finish(fig, data, "Fig. 14: the cost of one failure, phase by phase")


def recovery_timeline_ours(data: pd.DataFrame) -> dict[str, float]:
    """Gemini's detection, retrieval + load, restart + rendezvous and takeover times."""
    gem = data["system"] == "Gemini (replicated)"
    if not gem.any():
        return {}

    data.attrs["ours_at"] = "Gemini (replicated)"

    def m(*phases: str) -> float:
        return sum(_mean(data, gem, f"mean_{p}") for p in phases)

    return {
        "detect_s": m("detect_s"),
        "retrieve_load_s": m("retrieve_s", "load_s"),
        "warmup_s": m("restart_s", "rendezvous_s"),
        "takeover_s": m("takeover_s"),
    }


# -- Fig. 16: the interleaving ablation -----------------------------------------


def interleave_ablation_data(runs: pd.DataFrame) -> pd.DataFrame:
    """Fig. 16's runs: schedule (``none`` for no checkpoint) and iter_time_s."""

    def fallback(df: pd.DataFrame) -> pd.Series:
        # Only an ablation: the runs of a setting (model, nodes, link) whose
        # replicated runs tried two schedules or more; one schedule is no comparison.
        backend = column(df, "params.backend.name")
        ok = (column(df, "params.failure.name") == "none") & backend.isin(["none", "replicated"])
        keys = ("params.model.name", "params.cluster.nodes", "params.cluster.link_gbps")
        setting = pd.Series("", index=df.index)
        for key in keys:  # a missing param is a value of its own, not a hole
            setting = setting + "/" + column(df, key).fillna("?").astype(str)
        schedule = column(df, "params.backend.replication.schedule")
        replicated = ok & (backend == "replicated")
        tried = schedule[replicated].groupby(setting[replicated]).nunique()
        return ok & setting.isin(set(tried[tried >= 2].index))

    chosen, how = _pick(
        runs,
        "interleave_ablation",
        fallback,
        "iter_time_s",
        "of an ablation (one setting, two replication schedules or more)",
    )
    backend = column(chosen, "params.backend.name")
    schedule = column(chosen, "params.backend.replication.schedule").fillna("?")
    chosen["schedule"] = schedule.where(backend != "none", "none")
    return _tagged(chosen, chosen, how)


def fig_interleave_ablation(data: pd.DataFrame) -> Figure:
    """Fig. 16: iteration time per replication schedule, with the no-checkpoint reference."""
    import seaborn as sns

    order = [s for s in SCHEDULE_ORDER if s in set(data["schedule"])]
    order += sorted(set(data["schedule"]) - set(order))
    fig, ax = style.new_figure()
    sns.barplot(
        data=data, x="schedule", y="iter_time_s", hue="schedule", order=order,
        hue_order=order, errorbar="sd", ax=ax,
    )  # fmt: skip
    ax.set_xlabel("replication schedule (none = no checkpoint)")
    ax.set_ylabel("iteration time (s, mean of steady steps)")
    ours = interleave_ablation_ours(data)
    for i, s in enumerate(order):
        pct = ours.get(f"{s}_pct")
        if pct is not None and pct == pct:
            ax.annotate(f"{pct:+.1f} %", (i, 0), xytext=(0, 3), textcoords="offset points",
                        ha="center", fontsize=7, color="white")  # fmt: skip
    style.legend_outside(ax, "schedule")
    return _finish(fig, data, "Fig. 16: traffic interleaving ablation")


def interleave_ablation_ours(data: pd.DataFrame) -> dict[str, float]:
    """Each schedule's iteration-time overhead over no checkpoint, percent."""
    means = data.groupby("schedule")["iter_time_s"].mean()
    base = means.get("none")
    if base is None or not base > 0:
        return {}
    data.attrs["ours_at"] = "vs no checkpoint (backend none)"
    return {f"{s}_pct": (t / base - 1) * 100 for s, t in means.items() if s != "none"}


# -- every backend under every failure kind -------------------------------------


def backends_under_failure_data(runs: pd.DataFrame) -> pd.DataFrame:
    """Every backend x failure kind: system, failure, outcome, recovery and wasted time."""

    chosen, how = _pick(
        runs, "backends_under_failure", _one_off_failure, "run_id", "with a one-off failure"
    )
    chosen["system"] = system_of(chosen)
    chosen["failure"] = column(chosen, "params.failure.name").fillna("?")
    chosen["outcome"] = column(chosen, "tags.outcome").fillna("?")
    chosen["storage"] = _storage(chosen)
    return _tagged(chosen, chosen, how)


def backends_under_failure_table(data: pd.DataFrame) -> pd.DataFrame:
    """One row per system and failure: runs, outcomes, mean recovery/wasted time, lost steps."""
    frame = data.assign(
        recovery_s=numeric(data, "mean_recovery_s"),
        wasted_s=numeric(data, "mean_wasted_s"),
        lost_steps=numeric(data, "mean_lost_steps"),
    )
    table = frame.groupby(["system", "failure"]).agg(
        runs=("run_id", "count"),
        outcomes=("outcome", lambda s: ", ".join(sorted(set(s)))),
        recovery_s=("recovery_s", "mean"),
        wasted_s=("wasted_s", "mean"),
        lost_steps=("lost_steps", "mean"),
    )
    return table.reset_index()


def fig_backends_under_failure(data: pd.DataFrame) -> Figure:
    """Wasted time per failure kind and system (Fig. 10's drawing, by failure kind)."""
    drawn = data[numeric(data, "mean_wasted_s").notna()]
    if drawn.empty:
        raise NoData("no run recovered: no wasted time to draw")
    return _wasted_bars(drawn, "failure", "failure kind", "Every backend under every failure kind")
