"""Reading the MLflow store into pandas.

:func:`load_runs` gives one row per job run of an experiment: ``run_id``,
``run_name``, ``status``, ``start_time``, ``parent_run_id`` (the sweep's
parent run, if any), each ``run/<name>`` summary metric under its own name
(``iter_time_s``, ``ckpt_stall_s``, ``mean_wasted_s``, ``mean_detect_s``, ...),
every config value as ``params.<key>`` (strings, as MLflow stores them) and
every tag as ``tags.<key>`` (``host``, ``cpu_cores``, ``ram_gib``, ``gpu``,
``backend``, ``sweep``, ``outcome``, ...). Runs that are not jobs (tag
``kind`` = ``multirun``, ``report`` or ``simulation``) are left out.

:func:`load_simulation` reads the newest simulation run's CSV artifacts
(``fig9.csv``, ``fig11.csv``, ``fig15.csv``); :func:`load_step_metrics` one
metric's per-step history. :func:`select` picks a figure's runs: those of the
newest sweep tagged with its name, else those a predicate accepts (a user's
own runs). :func:`machine_of` and :func:`dates_of` say where and when a set
of runs was measured, for captions and tables.

A store that does not exist is never created: every reader raises
:class:`StoreError` instead, with the reason in one line.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

SUMMARY_PREFIX = "run/"
"""Per-job metrics are logged as ``run/<name>`` (gemini.tracking.record_job)."""
NON_JOB_KINDS = ("multirun", "report", "simulation")
"""Values of the ``kind`` tag of runs that hold no job's measurements."""
SIM_TABLES = ("fig9", "fig11", "fig15")
"""The CSV artifacts (``<name>.csv``) a simulation run carries."""


class StoreError(ValueError):
    """The store cannot be read: missing, unreachable or without the experiment."""


def sqlite_path(uri: str) -> Path | None:
    """The file of an ``sqlite:///`` URI (None for any other kind of store)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def client(uri: str) -> Any:
    """An MlflowClient of ``uri``; refuses an sqlite file that does not exist.

    MlflowClient would create an empty store there: a mistyped path would
    then read as "no runs" and leave a stray database behind.
    """
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise StoreError(f"no store at {path} (the file does not exist)")
    # mlflow costs ~1.5 s to import: only the loaders pay it.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with warnings.catch_warnings():
        # mlflow imports tqdm.auto, which warns in a Jupyter kernel without ipywidgets;
        # no progress bar is shown (above), so the warning would only clutter a notebook.
        warnings.filterwarnings("ignore", message="IProgress not found")
        from mlflow import MlflowClient

    return MlflowClient(uri)


def _experiment_id(mlflow_client: Any, experiment: str) -> str | None:
    exp = mlflow_client.get_experiment_by_name(experiment)
    return None if exp is None else str(exp.experiment_id)


def _runs(mlflow_client: Any, experiment_ids: list[str], filter_string: str = "") -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = mlflow_client.search_runs(
            experiment_ids, filter_string, max_results=1000, page_token=token
        )
        out.extend(page)
        token = page.token
        if not token:
            return out


def load_runs(uri: str, experiment: str = "gemini", include_non_jobs: bool = False) -> pd.DataFrame:
    """One row per job run of ``experiment``, oldest first (see the module docstring).

    An unknown experiment gives an empty frame; a missing sqlite file raises
    :class:`StoreError`.
    """
    c = client(uri)
    exp_id = _experiment_id(c, experiment)
    if exp_id is None:
        return pd.DataFrame(columns=["run_id", "run_name", "status", "start_time"])
    rows = []
    for r in _runs(c, [exp_id]):
        tags = dict(r.data.tags)
        if tags.get("kind") in NON_JOB_KINDS and not include_non_jobs:
            continue
        row: dict[str, object] = {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "status": r.info.status,
            "start_time": pd.to_datetime(r.info.start_time, unit="ms"),
            "parent_run_id": tags.get("mlflow.parentRunId"),
        }
        for k, v in r.data.metrics.items():
            if k.startswith(SUMMARY_PREFIX):
                row[k[len(SUMMARY_PREFIX) :]] = v
        row.update({f"params.{k}": v for k, v in r.data.params.items()})
        row.update({f"tags.{k}": v for k, v in tags.items() if not k.startswith("mlflow.")})
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values("start_time", ignore_index=True) if len(df) else df


def load_step_metrics(uri: str, run_id: str, key: str) -> pd.DataFrame:
    """The history of one metric of one run: columns step, value, timestamp; sorted by step."""
    hist = client(uri).get_metric_history(run_id, key)
    df = pd.DataFrame(
        {
            "step": [m.step for m in hist],
            "value": [m.value for m in hist],
            "timestamp": pd.to_datetime([m.timestamp for m in hist], unit="ms"),
        }
    )
    return df.sort_values("step", ignore_index=True)


@dataclass
class Simulation:
    """The newest simulation run (tag ``kind=simulation``) and its tables."""

    run_id: str
    """Its MLflow run id."""
    start_time: pd.Timestamp
    """When it ran."""
    tags: dict[str, str]
    """Its tags (machine facts where the simulator logged them)."""
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    """``fig9``, ``fig11``, ``fig15``: each CSV artifact it carries, read by pandas."""
    source: str = ""
    """How captions name it; empty = ``simulation run <id>`` (one computed in a
    notebook, :func:`gemini.analysis.modelled.simulation_of`, says so instead)."""


def _find_artifact(c: Any, run_id: str, name: str, path: str | None = None) -> str | None:
    """The artifact path of the file called ``name`` (at the root or in a folder)."""
    for a in c.list_artifacts(run_id, path):
        if a.is_dir:
            found = _find_artifact(c, run_id, name, a.path)
            if found:
                return found
        elif Path(a.path).name == name:
            return str(a.path)
    return None


def load_simulation(uri: str, experiment: str = "gemini") -> Simulation | None:
    """The newest ``kind=simulation`` run and its CSV tables; None where there is none.

    Looked for in ``experiment`` first, then in every experiment of the
    store: a simulation depends on no machine, so one logged elsewhere in the
    same store still serves.
    """
    c = client(uri)
    exp_id = _experiment_id(c, experiment)
    everywhere = [str(e.experiment_id) for e in c.search_experiments()]
    for ids in ([exp_id] if exp_id else [], everywhere):
        if not ids:
            continue
        runs = _runs(c, ids, "tags.kind = 'simulation'")
        if runs:
            break
    else:
        return None
    newest = max(runs, key=lambda r: r.info.start_time)
    sim = Simulation(
        run_id=newest.info.run_id,
        start_time=pd.to_datetime(newest.info.start_time, unit="ms"),
        tags={k: v for k, v in newest.data.tags.items() if not k.startswith("mlflow.")},
    )
    with tempfile.TemporaryDirectory(prefix="gemini-report-") as tmp:
        for name in SIM_TABLES:
            path = _find_artifact(c, sim.run_id, f"{name}.csv")
            if path is None:
                continue
            local = c.download_artifacts(sim.run_id, path, tmp)
            sim.tables[name] = pd.read_csv(local)
    return sim


# -- picking and describing runs ---------------------------------------------


def column(df: pd.DataFrame, name: str, default: object = None) -> pd.Series:
    """``df[name]``, or a column of ``default`` where no run has it."""
    if name in df:
        return df[name]
    return pd.Series([default] * len(df), index=df.index, dtype=object)


def numeric(df: pd.DataFrame, name: str) -> pd.Series:
    """``df[name]`` as floats (params are strings in MLflow); NaN where absent."""
    return pd.to_numeric(column(df, name), errors="coerce").astype(float)


def select(
    runs: pd.DataFrame, sweep: str, fallback: Callable[[pd.DataFrame], pd.Series]
) -> tuple[pd.DataFrame, str]:
    """A figure's runs, and how they were chosen (for the caption).

    The runs tagged ``sweep=<sweep>``, of the newest such sweep only (one
    sweep, one machine, one moment: timings compare only within it); where
    no run carries the tag, the runs ``fallback`` accepts, so that a user's
    own runs still draw.
    """
    if runs.empty:
        return runs, "no runs"
    tagged = runs[column(runs, "tags.sweep") == sweep]
    if not tagged.empty:
        newest = tagged.sort_values("start_time").iloc[-1]
        parent = newest.get("parent_run_id")
        if isinstance(parent, str) and parent:
            tagged = tagged[tagged["parent_run_id"] == parent]
        return tagged, f"sweep {sweep}, {len(tagged)} runs"
    mask = fallback(runs).fillna(False).astype(bool)
    chosen = runs[mask]
    return chosen, f"{len(chosen)} runs selected by their params (no run is tagged sweep={sweep})"


def _machine(tags: dict[str, Any]) -> str:
    host = tags.get("host") or "an unknown host"
    facts = []
    if tags.get("cpu_cores"):
        facts.append(f"{tags['cpu_cores']} cores")
    if tags.get("ram_gib"):
        facts.append(f"{tags['ram_gib']} GiB RAM")
    gpu = tags.get("gpu")
    if gpu:
        facts.append("no GPU" if gpu == "none" else str(gpu))
    return f"{host} ({', '.join(facts)})" if facts else str(host)


def machine_of(df: pd.DataFrame) -> str:
    """The machine(s) a set of runs was measured on: host (cores, RAM, GPU); "; " between."""
    if df.empty:
        return "no machine"
    keys = ("host", "cpu_cores", "ram_gib", "gpu")
    seen = []
    for _, row in df.iterrows():
        tags = {k: row.get(f"tags.{k}") for k in keys}
        line = _machine({k: v for k, v in tags.items() if isinstance(v, str)})
        if line not in seen:
            seen.append(line)
    return "; ".join(seen)


def machine_of_tags(tags: dict[str, str]) -> str:
    """The machine named by one run's tags (``host``, ``cpu_cores``, ``ram_gib``, ``gpu``)."""
    return _machine(tags)


def dates_of(df: pd.DataFrame) -> str:
    """The day(s) a set of runs started: ``2026-12-05`` or ``2026-12-04 to 2026-12-05``."""
    if df.empty or "start_time" not in df:
        return "no date"
    days = sorted({t.strftime("%Y-%m-%d") for t in pd.to_datetime(df["start_time"])})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"
