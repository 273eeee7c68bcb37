"""One simulation, start to end: costs, tables, CSVs in the run dir, a console summary, MLflow.

The CSVs are the simulator's interface: ``fig9.csv``, ``fig11.csv`` and
``fig15.csv`` with exactly the columns of ``FIG9_COLUMNS``, ``FIG11_COLUMNS``
and ``FIG15_COLUMNS``, written into the Hydra run dir and logged as artifacts
of an MLflow run tagged ``kind=simulation`` (the report reads them from there).
"""

from __future__ import annotations

import csv
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gemini.config import ConfigError, GeminiConfig, flatten
from gemini.simulate import FIG9_COLUMNS, FIG11_COLUMNS, FIG15_COLUMNS, Tables, simulate
from gemini.simulate.config import CostConfig, SimulateConfig, check_costs
from gemini.simulate.costs import cost_sources, costs_from_mlflow

CSV_COLUMNS = {"fig9": FIG9_COLUMNS, "fig11": FIG11_COLUMNS, "fig15": FIG15_COLUMNS}
METRIC_PREFIX = "sim/"


def tracking_uri(cfg: SimulateConfig) -> str:
    """The store the simulation records into: the main app's rule (``gemini.tracking``)."""
    from gemini.tracking import tracking_uri as gemini_uri

    return gemini_uri(GeminiConfig(tracking=cfg.tracking, paths=cfg.paths))


def costs_uri(cfg: SimulateConfig) -> str:
    """Where measured costs are read: ``costs.uri``, else the tracking store."""
    return cfg.costs.uri or tracking_uri(cfg)


def resolve_costs(cfg: SimulateConfig) -> tuple[CostConfig, set[str], str]:
    """The configured costs with the measured ones in; a measurement out of range is refused."""
    costs, measured, label = costs_from_mlflow(cfg.costs, costs_uri(cfg))
    try:
        check_costs(costs)
    except ConfigError as e:
        where = "costs.from_run" if cfg.costs.from_run else "costs.from_experiment"
        given = cfg.costs.from_run or cfg.costs.from_experiment
        raise ConfigError(where, given, f"it measured {e.key}={e.value!r}: {e.fix}") from e
    return costs, measured, label


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_tables(tables: Tables, out_dir: Path) -> list[Path]:
    """The CSV of every figure computed, in ``out_dir``."""
    written = []
    for name, columns in CSV_COLUMNS.items():
        rows = getattr(tables, name)
        if rows:
            path = out_dir / f"{name}.csv"
            write_csv(path, rows, columns)
            written.append(path)
    return written


def headline_metrics(tables: Tables) -> dict[str, float]:
    """A few numbers to compare runs by in MLflow's table (the CSVs hold the rest)."""
    out: dict[str, float] = {}
    for placement in sorted({r["placement"] for r in tables.fig9}):
        rows = [r for r in tables.fig9 if r["placement"] == placement]
        exact = [r["probability"] for r in rows if r["exact"]]
        # The least the placement guarantees over the grid: exact where known.
        out[f"{METRIC_PREFIX}p_{placement}_min"] = min(exact or [r["probability"] for r in rows])
    if tables.fig11:
        reductions = [r["reduction"] for r in tables.fig11]
        out[f"{METRIC_PREFIX}reduction_min"] = min(reductions)
        out[f"{METRIC_PREFIX}reduction_max"] = max(reductions)
    if tables.fig15:
        cluster = [r for r in tables.fig15 if r["rate_unit"] == "cluster"]
        node = [r for r in tables.fig15 if r["rate_unit"] == "node"]
        # Fig. 15a's cells where there are any (a run of per-machine rates alone
        # keeps its metric under the old name), and Fig. 15b's beside them.
        out.update(_hardest(cluster or node, ""))
        out.update(_hardest(node, "_per_node"))
    return out


def _hardest(rows: list[dict[str, Any]], suffix: str) -> dict[str, float]:
    """``sim/ratio_<system><suffix>`` of the hardest cell: the largest N at its highest rate."""
    if not rows:
        return {}
    worst_n = max(r["N"] for r in rows)
    at_n = [r for r in rows if r["N"] == worst_n]
    worst_rate = max(r["failures_per_day"] for r in at_n)
    return {
        f"{METRIC_PREFIX}ratio_{r['system']}{suffix}": r["effective_ratio"]
        for r in at_n
        if r["failures_per_day"] == worst_rate
    }


def summary_lines(tables: Tables) -> list[str]:
    """The short console tables: one line per N (and k or rate)."""
    lines: list[str] = []
    if tables.fig9:
        lines.append("Fig. 9  recovery probability (exact where known, else Monte Carlo)")
        cells: dict[tuple[int, int], dict[str, float]] = {}
        for r in tables.fig9:
            cell = cells.setdefault((r["N"], r["k"]), {})
            if r["exact"] or r["placement"] not in cell:
                cell[r["placement"]] = r["probability"]
        for (n, k), by in cells.items():
            text = "  ".join(f"{p} {v:.4f}" for p, v in sorted(by.items()))
            lines.append(f"  N={n:<6} k={k}  {text}")
    if tables.fig11:
        lines.append("Fig. 11 checkpoint time, storage vs Gemini")
        for r in tables.fig11:
            lines.append(
                f"  N={r['N']:<6} NIC {r['net_gbps']:g} Gbit/s  storage {r['t_storage_s']:.1f} s"
                f"  gemini {r['t_gemini_s']:.2f} s  reduction {r['reduction']:.0f}x"
            )
    if tables.fig15:
        lines.append("Fig. 15 effective training time ratio (failures per day of the cluster)")
        grid: dict[tuple[int, float, str], dict[str, float]] = {}
        for r in tables.fig15:
            key = (r["N"], r["failures_per_day"], r["rate_unit"])
            grid.setdefault(key, {})[r["system"]] = r["effective_ratio"]
        # A per-machine row says the rate it was given beside the cluster's.
        labels = {
            (n, rate, unit): f"{rate:.4g}/day ({rate / n:.3g}/machine)"
            if unit == "node"
            else f"{rate:g}/day"
            for n, rate, unit in grid
        }
        width = max(len(label) for label in labels.values())
        for (n, rate, unit), by in grid.items():
            text = "  ".join(f"{s} {v:.3f}" for s, v in by.items())
            lines.append(f"  N={n:<6} {labels[n, rate, unit]:<{width}}  {text}")
    return lines


def log_run(
    cfg: SimulateConfig,
    out_dir: Path,
    files: list[Path],
    metrics: dict[str, float],
    cost_label: str,
) -> str:
    """One MLflow run tagged ``kind=simulation``: config as params, CSVs as artifacts."""
    from mlflow.entities import Metric, Param, RunTag

    from gemini.tracking import _experiment_id, _mlflow, git_sha

    mlflow = _mlflow()
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp_id = _experiment_id(mlflow, cfg.tracking.experiment, uri)
    tags = {
        "kind": "simulation",
        "git_sha": git_sha(),
        "host": socket.gethostname(),
        "cost_source": cost_label,
        "run_dir": str(out_dir),
    }
    rid = str(client.create_run(exp_id, run_name=f"simulate-{out_dir.name}", tags=tags).info.run_id)
    params = flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))  # type: ignore[arg-type]
    plist = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(plist), 100):
        client.log_batch(rid, params=plist[i : i + 100])
    ts = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
    for path in files:
        client.log_artifact(rid, str(path))
    hydra_dir = out_dir / ".hydra"
    if hydra_dir.is_dir():
        client.log_artifacts(rid, str(hydra_dir), artifact_path=".hydra")
    client.log_batch(rid, tags=[RunTag("outcome", "completed")])
    client.set_terminated(rid, status="FINISHED")
    return rid


def run(cfg: SimulateConfig, out_dir: Path) -> tuple[Tables, str | None]:
    """Simulate, write the CSVs into ``out_dir``, print, record; returns the tables and run id."""
    t0 = time.perf_counter()
    costs, measured, label = resolve_costs(cfg)
    tables = simulate(cfg, costs, cost_sources(measured, label, cfg.failures.systems))
    wall = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_tables(tables, out_dir)
    metrics = {**headline_metrics(tables), f"{METRIC_PREFIX}wall_s": wall}
    if cfg.progress:
        print("\n".join(summary_lines(tables)))
        print(f"tables in {out_dir} ({wall:.1f} s)")
    run_id = None
    if cfg.tracking.enabled:
        run_id = log_run(cfg, out_dir, files, metrics, label)
        if cfg.progress:
            print(f"MLflow run {run_id} in {tracking_uri(cfg)}")
    return tables, run_id
