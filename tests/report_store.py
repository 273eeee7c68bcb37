"""A small store made by real jobs, shared by the tests of gemini-report and of the
analysis notebooks, and a simulation run logged as the simulator logs one.

:func:`build_job_store` runs three real jobs (mlp, 2 nodes): no checkpoint,
replicated, and replicated through a software failure; then logs a simulation
run (tag ``kind=simulation``, CSV artifacts) with the real MlflowClient. The
``job_store`` fixture (session-scoped, re-exported by conftest.py) builds it
once for every test module that reads it; those tests are slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest


def log_simulation(uri: str, tables: dict[str, pd.DataFrame], tmp: Path) -> str:
    """A simulation run as the simulator logs one: tag kind=simulation, CSV artifacts."""
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("gemini")
    exp_id = exp.experiment_id if exp else c.create_experiment("gemini", (tmp / "art").as_uri())
    run = c.create_run(exp_id, tags={"kind": "simulation", "host": "simbox", "cpu_cores": "2"})
    for name, df in tables.items():
        df.to_csv(tmp / f"{name}.csv", index=False)
        c.log_artifact(run.info.run_id, str(tmp / f"{name}.csv"))
    c.set_terminated(run.info.run_id)
    return str(run.info.run_id)


def sim_tables() -> dict[str, pd.DataFrame]:
    """Small Fig. 9, 11 and 15 tables with the simulator's columns."""
    from gemini.analysis import recovery_probability_data

    fig9 = recovery_probability_data([8, 16])[["N", "m", "k", "placement", "method"]]
    fig9 = fig9.assign(probability=recovery_probability_data([8, 16])["probability"], exact=True)
    mc = fig9.assign(method="monte_carlo", exact=False, probability=fig9["probability"] - 0.01)
    fig11 = pd.DataFrame(
        [
            {"N": n, "net_gbps": g, "storage_gbps": 20, "ckpt_bytes": 1e12,
             "t_storage_s": 400.0 * n / 16, "t_gemini_s": 400.0 / (g / 10 * 16 / n),
             "reduction": g / 10 * 16 / n * n / 16 * 16}
            for n in (16, 64) for g in (100, 400)
        ]
    )  # fmt: skip
    fig15 = pd.DataFrame(
        [
            {"system": s, "N": n, "failures_per_day": f, "days": 7,
             "effective_ratio": r - n / 50000 - f / 100, "failures": 3, "from_memory": 2,
             "from_storage": 1, "cost_source": "model"}
            for s, r in (("Gemini", 0.93), ("HighFreq", 0.8))
            for n, f in ((16, 2), (128, 2), (1000, 2), (16, 4), (16, 8))
        ]
    )  # fmt: skip
    return {"fig9": pd.concat([fig9, mc]), "fig11": fig11, "fig15": fig15}


@dataclass(frozen=True)
class JobStore:
    """A store that real jobs recorded into."""

    root: Path
    """GEMINI_OUTPUTS of the jobs: the store is root/mlflow.db (the default) and each job's
    run dir is root/job<i>."""
    uri: str
    """The store's tracking URI."""


JOBS = [("none", "none", 4), ("replicated", "none", 4), ("replicated", "software_once", 6)]
"""(backend, failure, steps) of each job."""


def build_job_store(root: Path) -> JobStore:
    """The jobs of :data:`JOBS` into ``root``'s default store, then a simulation run."""
    from conftest import assert_nothing_left, compose_config

    from gemini.experiment import run

    uri = f"sqlite:///{root / 'mlflow.db'}"
    for i, (backend, failure, steps) in enumerate(JOBS):
        cfg = compose_config(
            [
                f"paths.outputs={root}",
                "progress=false",
                "model=mlp",
                "cluster.nodes=2",
                f"train.steps={steps}",
                f"backend={backend}",
                # No idle-span profile: Fig. 8 then has no data and must say so.
                "backend.replication.profile_steps=0",
                f"failure={failure}",
            ]
        )
        run(cfg, job_dir=root / f"job{i}")
        assert_nothing_left(root / f"job{i}")
    log_simulation(uri, sim_tables(), root)
    return JobStore(root, uri)


@pytest.fixture(scope="session")
def job_store(tmp_path_factory: pytest.TempPathFactory) -> JobStore:
    """:func:`build_job_store`, once per session."""
    return build_job_store(tmp_path_factory.mktemp("store"))
