"""MLflow records: one run per job with its config, machine facts, per-step metrics
and artifacts; a multirun nests its jobs under one parent run. Each test has its
own sqlite store in ``tmp_path`` and queries it with ``MlflowClient``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gemini.tracking import metric_names

pytestmark = pytest.mark.usefixtures("no_leftovers")

Cli = Callable[..., tuple[int, str, str]]

MACHINE_TAGS = ("git_sha", "host", "torch_version", "cpu_cores", "ram_gib")


def runs_of(uri: str, experiment: str = "gemini") -> list[Any]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    return list(client.search_runs([exp.experiment_id]))


def artifact_paths(uri: str, run_id: str, path: str | None = None) -> set[str]:
    import mlflow

    return {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id, path)}


@pytest.mark.timeout(300)
def test_a_run_records_config_machine_step_metrics_and_artifacts(
    gemini_cli: Cli, tmp_path: Path, outputs_dir: Path, mlflow_uri: str
) -> None:
    import mlflow
    import torch

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    rc, _, err = gemini_cli(
        ["train.steps=4", "cluster.nodes=2", "model=mlp", f"tracking.uri={mlflow_uri}"],
        cwd=cwd,
    )
    assert rc == 0, err
    assert list(cwd.iterdir()) == [], "no ./mlruns or anything else in the working directory"
    (job_dir,) = (outputs_dir / "runs").iterdir()
    summary = json.loads((job_dir / "summary.json").read_text())
    (run,) = runs_of(mlflow_uri)
    assert run.info.run_id == summary["mlflow_run_id"]
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["cluster.nodes"] == "2"
    assert params["train.steps"] == "4"
    assert params["model.name"] == "mlp"
    assert params["backend.replication.factor"] == "2"

    tags = run.data.tags
    for tag in MACHINE_TAGS:
        assert tags.get(tag), f"tag {tag} missing"
    assert tags["torch_version"] == torch.__version__
    assert tags["cpu_cores"] == str(os.cpu_count())
    assert float(tags["ram_gib"]) > 0
    assert tags["backend"] == "none"
    assert tags["failure_schedule"] == "none"
    assert tags["outcome"] == "completed"

    client = mlflow.MlflowClient(mlflow_uri)
    for metric in ("iter_time_s", "throughput_samples_s", "loss"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert sorted(m.step for m in history) == [1, 2, 3, 4], metric
        assert all(m.value > 0 for m in history), metric
    assert run.data.metrics["run/steps"] == 4
    # Every metric logged is one docs/design.md explains.
    assert set(run.data.metrics) <= set(metric_names())

    assert {".hydra", "summary.json"} <= artifact_paths(mlflow_uri, run.info.run_id)
    hydra_files = artifact_paths(mlflow_uri, run.info.run_id, ".hydra")
    assert {".hydra/config.yaml", ".hydra/overrides.yaml"} <= hydra_files
    # Artifacts live beside the sqlite store, whatever the working directory.
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert list((tmp_path / "mlartifacts").rglob("summary.json"))


@pytest.mark.timeout(420)
def test_a_multirun_nests_its_jobs_under_one_parent_run(
    gemini_cli: Cli, tmp_path: Path, outputs_dir: Path, mlflow_uri: str
) -> None:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    rc, _, err = gemini_cli(
        [
            "-m",
            "train.seed=0,1",
            "train.steps=2",
            "cluster.nodes=2",
            "model=mlp",
            f"tracking.uri={mlflow_uri}",
        ],
        cwd=cwd,
        timeout_s=400,
    )
    assert rc == 0, err
    assert list(cwd.iterdir()) == []
    runs = runs_of(mlflow_uri)
    parents = [r for r in runs if r.data.tags.get("kind") == "multirun"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.params["train.seed"] for c in children) == ["0", "1"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert len(runs) == 3
    (sweep_dir,) = (outputs_dir / "multiruns").iterdir()
    assert parent.data.tags["sweep_dir"] == str(sweep_dir)
