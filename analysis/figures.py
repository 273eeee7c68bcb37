"""Figures from the MLflow store: the paper's Figs. 7, 14 and 9, in spirit.

Reading: :func:`load_runs` turns an experiment's runs into one pandas row per
job (its summary metrics, params and tags); :func:`load_step_metrics` gives
one metric's per-step history. Drawing: :func:`fig_iteration` (iteration time
and checkpoint stall per backend, Fig. 7), :func:`fig_recovery_phases` (one
stacked bar of recovery phases per job, Fig. 14) and
:func:`fig_recovery_probability` (recovery probability vs N for group and
ring placement, Fig. 9, from :func:`gemini.checkpoint.placement.recovery_probability`).
Every measured figure is titled with the host(s) its runs carry in their
``host`` tag; the analytic one says "analytic".

    .venv/bin/python -m analysis.figures --uri sqlite:///$PWD/outputs/mlflow.db --out figures/
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster or in CI

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from gemini.checkpoint.placement import recovery_probability
from gemini.recovery import PHASES

SUMMARY_PREFIX = "run/"
"""Per-job metrics are logged as ``run/<name>`` (gemini.tracking.record_job)."""


def _client(uri: str) -> Any:
    # mlflow costs ~1.5 s to import: only the loaders pay it.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    return MlflowClient(uri)


def load_runs(uri: str, experiment: str = "gemini", include_parents: bool = False) -> pd.DataFrame:
    """One row per job of ``experiment``: run_id, run_name, status, start_time, the job's
    summary metrics under their own names (``iter_time_s``, ``ckpt_stall_s``,
    ``mean_recovery_s``, ...), ``params.<key>`` and ``tags.<key>``.

    Sweep parent runs (tag ``kind=multirun``) hold no measurements and are left
    out unless ``include_parents``. An unknown experiment gives an empty frame.
    """
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame(columns=["run_id", "run_name", "status", "start_time"])
    rows = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        for r in page:
            tags = dict(r.data.tags)
            if tags.get("kind") == "multirun" and not include_parents:
                continue
            row: dict[str, object] = {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "status": r.info.status,
                "start_time": pd.to_datetime(r.info.start_time, unit="ms"),
            }
            for k, v in r.data.metrics.items():
                if k.startswith(SUMMARY_PREFIX):
                    row[k[len(SUMMARY_PREFIX) :]] = v
            row.update({f"params.{k}": v for k, v in r.data.params.items()})
            row.update({f"tags.{k}": v for k, v in tags.items() if not k.startswith("mlflow.")})
            rows.append(row)
        token = page.token
        if not token:
            break
    df = pd.DataFrame(rows)
    return df.sort_values("start_time", ignore_index=True) if len(df) else df


def load_step_metrics(uri: str, run_id: str, key: str) -> pd.DataFrame:
    """The history of one metric of one run: columns step, value, timestamp; sorted by step."""
    hist = _client(uri).get_metric_history(run_id, key)
    df = pd.DataFrame(
        {
            "step": [m.step for m in hist],
            "value": [m.value for m in hist],
            "timestamp": pd.to_datetime([m.timestamp for m in hist], unit="ms"),
        }
    )
    return df.sort_values("step", ignore_index=True)


def hosts_of(df: pd.DataFrame) -> str:
    """The hosts a set of runs was measured on, for a title."""
    hosts = sorted(set(df["tags.host"].dropna())) if "tags.host" in df else []
    return "measured on " + (", ".join(hosts) if hosts else "an unknown host")


def _backend(df: pd.DataFrame) -> pd.Series:
    for col in ("params.backend.name", "tags.backend"):
        if col in df:
            return df[col].fillna("?")
    return pd.Series(["?"] * len(df), index=df.index)


def fig_iteration(df: pd.DataFrame) -> Figure:
    """Fig. 7 in spirit: mean iteration time and checkpoint stall per backend."""
    if "iter_time_s" not in df:
        raise ValueError("no run has iter_time_s: nothing to draw")
    runs = df[df["iter_time_s"].notna()].copy()
    if runs.empty:
        raise ValueError("no run has iter_time_s: nothing to draw")
    runs["backend"] = _backend(runs)
    long = runs.melt(
        id_vars=["backend"],
        value_vars=[c for c in ("iter_time_s", "ckpt_stall_s") if c in runs],
        var_name="metric",
        value_name="seconds",
    )
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.barplot(data=long, x="backend", y="seconds", hue="metric", errorbar="sd", ax=ax)
    ax.set_ylabel("seconds per iteration (mean over steady steps)")
    ax.set_title(
        f"Iteration time and checkpoint stall per backend\n({hosts_of(runs)})", fontsize=10
    )
    fig.tight_layout()
    return fig


def fig_recovery_phases(df: pd.DataFrame) -> Figure:
    """Fig. 14 in spirit: one stacked bar of recovery phases per job that recovered."""
    cols = [f"mean_{p}" for p in PHASES]
    if "mean_recovery_s" not in df:
        raise ValueError("no run has a recovery: nothing to draw")
    runs = df[df["mean_recovery_s"].notna()].copy()
    if runs.empty:
        raise ValueError("no run has a recovery: nothing to draw")
    labels = [f"{b} · {str(n)[:24]}" for b, n in zip(_backend(runs), runs["run_name"], strict=True)]
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.45 * len(runs)))
    left = pd.Series(0.0, index=runs.index)
    for phase, col, color in zip(PHASES, cols, sns.color_palette("tab10"), strict=False):
        width = runs[col].fillna(0.0) if col in runs else pd.Series(0.0, index=runs.index)
        ax.barh(labels, width, left=left, color=color, label=phase.removesuffix("_s"))
        left += width
    ax.invert_yaxis()
    ax.set_xlabel("seconds after the failure (mean over a job's recoveries)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(f"Recovery phases per job\n({hosts_of(runs)})", fontsize=10)
    fig.tight_layout()
    return fig


def recovery_probability_data(
    ns: Iterable[int] = range(4, 65, 4), m: int = 2, ks: Iterable[int] = (2, 3)
) -> pd.DataFrame:
    """Fig. 9's numbers: P(every checkpoint survives k failures) for group and ring.

    Group uses Corollary 1's closed form, exact here because k < 2m for the
    paper's m=2, k=2,3 (a lower bound otherwise, and then ``exact`` is False);
    ring enumerates every failure set exactly.
    """
    rows = []
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
    return pd.DataFrame(rows)


def fig_recovery_probability(data: pd.DataFrame | None = None) -> Figure:
    """Fig. 9 in spirit: recovery probability vs N, group vs ring, one line per k."""
    data = recovery_probability_data() if data is None else data
    data = data.assign(failures=data["k"].map(lambda k: f"k={k}"))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.lineplot(
        data=data, x="N", y="probability", hue="failures", style="placement", marker="o", ax=ax
    )
    ax.set_xlabel("machines N")
    ax.set_ylabel("P(recover every checkpoint from CPU memory)")
    ms = ", ".join(str(v) for v in sorted(set(data["m"])))
    ax.set_title(f"Recovery probability, m={ms}, group vs ring (analytic)", fontsize=10)
    fig.tight_layout()
    return fig


def write_figures(uri: str, out: Path, experiment: str = "gemini") -> list[Path]:
    """Draw every figure the store has data for into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    df = load_runs(uri, experiment)
    written = []
    draws = {
        "iteration_time.png": lambda: fig_iteration(df),
        "recovery_phases.png": lambda: fig_recovery_phases(df),
        "recovery_probability.png": fig_recovery_probability,
    }
    for name, draw in draws.items():
        try:
            fig = draw()
        except ValueError as e:
            print(f"skipping {name}: {e}")
            continue
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
        print(f"wrote {out / name}")
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", required=True, help="MLflow tracking URI, e.g. sqlite:////abs/db")
    ap.add_argument("--out", required=True, type=Path, help="directory for the PNG files")
    ap.add_argument("--experiment", default="gemini", help="MLflow experiment name")
    a = ap.parse_args(argv)
    write_figures(a.uri, a.out, a.experiment)


if __name__ == "__main__":
    main()
