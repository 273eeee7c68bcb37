"""One job, one MLflow run, however often SLURM requeues it.

The controller opens the run as the job starts and leaves its id in the job
dir; a later attempt in the same job dir continues that run, and the end of
the job fills it in and ends it. Each test has its own sqlite store in
``tmp_path`` and reads it back with ``MlflowClient``; the SLURM facts come
from the environment, which the tests set as SLURM would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import TrackingServer, compose_config

from gemini.config import GeminiConfig, to_schema
from gemini.tracking import RUN_FILE, metric_names, open_job_run, record_job, slurm_tags

SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_PARTITION",
    "SLURM_RESTART_COUNT",
    "SUBMITIT_LOCAL_JOB_ID",
)


@pytest.fixture(autouse=True)
def not_under_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever runs the tests (a SLURM job in CI, say) does not leak into them."""
    for var in SLURM_VARS:
        monkeypatch.delenv(var, raising=False)


def cfg_of(uri: str, tmp_path: Path, *overrides: str) -> GeminiConfig:
    return to_schema(
        compose_config(
            [
                "backend=none",
                "failure=none",
                f"paths.outputs={tmp_path / 'outputs'}",
                f"tracking.uri={uri}",
                *overrides,
            ]
        )
    )


def client_of(uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(uri)


def runs_of(uri: str, experiment: str = "gemini") -> list[Any]:
    client = client_of(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    return list(client.search_runs([exp.experiment_id]))


def summary_of(outcome: str, requeues: int | None = None) -> dict[str, Any]:
    summary: dict[str, Any] = {"outcome": outcome, "steps": 4, "wall_s": 2.5}
    if requeues is not None:
        summary["requeues"] = requeues
    return summary


def finish(cfg: GeminiConfig, job_dir: Path, run_id: str | None, summary: dict[str, Any]) -> str:
    steps = [{"step": s, "t": 100.0 + s, "loss": 3.0 - s / 10} for s in (1, 2)]
    return record_job(
        cfg, job_dir, run_name="job", summary=summary, step_metrics=steps, recoveries=[],
        parent=None, run_id=run_id,
    )  # fmt: skip


def test_opening_a_job_run_creates_a_running_run_and_leaves_its_id_in_the_job_dir(
    tmp_path: Path, mlflow_uri: str
) -> None:
    cfg = cfg_of(mlflow_uri, tmp_path)
    job_dir = tmp_path / "job"
    rid = open_job_run(cfg, job_dir, run_name="job", parent=None, tags={"attempt_note": "first"})

    run = client_of(mlflow_uri).get_run(rid)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "job"
    assert run.data.tags["job_dir"] == str(job_dir)
    assert run.data.tags["attempt_note"] == "first"
    assert run.data.tags["git_sha"] and run.data.tags["backend"] == "none"
    assert "mlflow.parentRunId" not in run.data.tags
    assert json.loads((job_dir / RUN_FILE).read_text()) == {"run_id": rid, "uri": mlflow_uri}
    assert [p.name for p in job_dir.iterdir()] == [RUN_FILE], "no temporary file left behind"


def test_a_job_run_nests_under_the_parent_it_is_given(tmp_path: Path, mlflow_uri: str) -> None:
    cfg = cfg_of(mlflow_uri, tmp_path)
    parent = open_job_run(cfg, tmp_path / "sweep", run_name="sweep", parent=None)
    rid = open_job_run(cfg, tmp_path / "sweep" / "0", run_name="job", parent=parent)
    assert client_of(mlflow_uri).get_run(rid).data.tags["mlflow.parentRunId"] == parent


def test_a_requeued_attempt_continues_the_run_of_the_first_and_ends_it(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = cfg_of(mlflow_uri, tmp_path)
    job_dir = tmp_path / "job"
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    first = open_job_run(cfg, job_dir, run_name="job", parent=None)
    # The first attempt got as far as recording (a preemption after the job
    # ended is the worst case: every param and tag is there already).
    assert finish(cfg, job_dir, first, summary_of("error")) == first
    assert client_of(mlflow_uri).get_run(first).info.status == "FAILED"

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    second = open_job_run(cfg, job_dir, run_name="job", parent=None, tags={"attempt_note": "2"})
    assert second == first
    run = client_of(mlflow_uri).get_run(second)
    assert run.info.status == "RUNNING"
    assert run.data.tags["slurm_restart_count"] == "1"
    assert run.data.tags["attempt_note"] == "2"

    assert finish(cfg, job_dir, second, summary_of("completed", requeues=1)) == first
    (run,) = runs_of(mlflow_uri)
    assert run.info.run_id == first
    assert run.info.status == "FINISHED"
    assert run.data.tags["outcome"] == "completed"
    assert run.data.params["train.steps"] == str(cfg.train.steps)
    assert run.data.metrics["run/requeues"] == 1
    assert run.data.metrics["run/steps"] == 4
    assert set(run.data.metrics) <= set(metric_names())


def test_a_resumed_run_keeps_the_params_it_has_and_gains_the_missing_ones(
    tmp_path: Path, mlflow_uri: str
) -> None:
    from mlflow.entities import Param

    cfg = cfg_of(mlflow_uri, tmp_path, "train.steps=4")
    rid = open_job_run(cfg, tmp_path / "job", run_name="job", parent=None)
    # As if an earlier attempt had logged part of its params, one of them with
    # a value this attempt's config no longer has: MLflow refuses to change it.
    client_of(mlflow_uri).log_batch(rid, params=[Param("train.steps", "3")])
    finish(cfg, tmp_path / "job", rid, summary_of("completed"))
    run = client_of(mlflow_uri).get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "3"
    assert run.data.params["model.name"] == cfg.model.name


def test_a_run_file_naming_a_deleted_run_gets_a_fresh_run(tmp_path: Path, mlflow_uri: str) -> None:
    cfg = cfg_of(mlflow_uri, tmp_path)
    job_dir = tmp_path / "job"
    stale = open_job_run(cfg, job_dir, run_name="job", parent=None)
    client_of(mlflow_uri).delete_run(stale)

    fresh = open_job_run(cfg, job_dir, run_name="job", parent=None)
    assert fresh != stale
    assert client_of(mlflow_uri).get_run(fresh).info.status == "RUNNING"
    assert json.loads((job_dir / RUN_FILE).read_text())["run_id"] == fresh
    assert open_job_run(cfg, job_dir, run_name="job", parent=None) == fresh


def test_a_run_file_of_another_store_or_unreadable_gets_a_fresh_run(
    tmp_path: Path, mlflow_uri: str
) -> None:
    job_dir = tmp_path / "job"
    other_uri = f"sqlite:///{tmp_path / 'other.db'}"
    elsewhere = open_job_run(cfg_of(other_uri, tmp_path), job_dir, run_name="job", parent=None)

    cfg = cfg_of(mlflow_uri, tmp_path)
    here = open_job_run(cfg, job_dir, run_name="job", parent=None)
    assert here != elsewhere
    assert json.loads((job_dir / RUN_FILE).read_text()) == {"run_id": here, "uri": mlflow_uri}

    (job_dir / RUN_FILE).write_text('{"run_id": ')
    again = open_job_run(cfg, job_dir, run_name="job", parent=None)
    assert again not in (here, elsewhere)
    assert json.loads((job_dir / RUN_FILE).read_text())["run_id"] == again


def test_recording_without_a_run_id_still_creates_the_run(tmp_path: Path, mlflow_uri: str) -> None:
    cfg = cfg_of(mlflow_uri, tmp_path)
    rid = finish(cfg, tmp_path / "job", None, summary_of("completed"))
    (run,) = runs_of(mlflow_uri)
    assert run.info.run_id == rid and run.info.status == "FINISHED"
    assert "run/requeues" not in run.data.metrics, "only when the summary counts requeues"
    assert not (tmp_path / "job" / RUN_FILE).exists()


def test_slurm_tags_are_empty_outside_slurm() -> None:
    assert slurm_tags() == {}


def test_slurm_tags_name_the_job_its_nodes_partition_and_restarts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[01-02]")
    monkeypatch.setenv("SLURM_JOB_PARTITION", "gpu")
    assert slurm_tags() == {
        "slurm_job_id": "1234",
        "slurm_nodelist": "node[01-02]",
        "slurm_partition": "gpu",
        "slurm_restart_count": "0",
    }
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert slurm_tags()["slurm_restart_count"] == "2"


def test_an_array_task_is_tagged_by_its_array_job_and_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "1240")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    assert slurm_tags()["slurm_job_id"] == "1234_6"


def test_a_submitit_local_job_is_tagged_by_its_local_job_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "98765")
    assert slurm_tags() == {"submitit_local_job_id": "98765"}


def test_a_job_run_is_tagged_with_the_slurm_job_it_runs_in(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_PARTITION", "debug")
    rid = open_job_run(cfg_of(mlflow_uri, tmp_path), tmp_path / "job", run_name="j", parent=None)
    tags = client_of(mlflow_uri).get_run(rid).data.tags
    assert tags["slurm_job_id"] == "77" and tags["slurm_partition"] == "debug"


# -- through a tracking server -------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_requeued_job_continues_its_run_through_a_tracking_server(
    server: TrackingServer, tmp_path: Path
) -> None:
    cfg = cfg_of(server.uri, tmp_path, "tracking.experiment=requeue")
    job_dir = tmp_path / "job"
    first = open_job_run(cfg, job_dir, run_name="job", parent=None)
    assert finish(cfg, job_dir, first, summary_of("error")) == first
    second = open_job_run(cfg, job_dir, run_name="job", parent=None)
    assert second == first
    assert client_of(server.uri).get_run(second).info.status == "RUNNING"
    finish(cfg, job_dir, second, summary_of("completed", requeues=1))
    (run,) = runs_of(server.uri, "requeue")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["run/requeues"] == 1

    # A run deleted on the server is no run to continue.
    client_of(server.uri).delete_run(first)
    assert open_job_run(cfg, job_dir, run_name="job", parent=None) != first
