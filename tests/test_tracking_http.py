"""Jobs recording through a tracking server: ``tracking.uri=http://host:port``.

One real server per module, started as ``make mlflow-server`` starts it, over
a store in a temporary directory; jobs run through the console script and the
test reads back over HTTP with ``MlflowClient``. Each test has an experiment
of its own. When the module ends, SIGTERM must take the server's whole process
tree down. A server that does not answer is refused before start:
tests/test_bad_input.py has that case.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    TrackingServer,
    free_port,
)

from gemini.tracking_server import health_error

# Slow all of it: the server alone takes 15-30 s to start here, a job 40 s more
# (make test still covers the refusal, in test_bad_input, and the server itself).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftovers")]

Cli = Callable[..., tuple[int, str, str]]

# The cheapest job that still has two nodes to recover across.
SMALL = ["model=mlp", "cluster.nodes=2", "cluster.heartbeat_s=0.5"]


def client_of(server: TrackingServer) -> Any:
    import mlflow

    return mlflow.MlflowClient(server.uri)


def runs_in(server: TrackingServer, experiment: str) -> list[Any]:
    client = client_of(server)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} on {server.uri}"
    return list(client.search_runs([exp.experiment_id]))


def test_health_error_says_why_a_port_does_not_answer_and_nothing_when_it_does(
    server: TrackingServer,
) -> None:
    assert health_error(server.uri) is None
    assert health_error(server.uri + "/") is None
    why = health_error(f"http://127.0.0.1:{free_port()}")
    assert why and "refused" in why.lower()


@pytest.mark.timeout(300)
def test_a_job_records_params_metrics_tags_and_artifacts_through_the_server(
    server: TrackingServer, gemini_cli: Cli, tmp_path: Path, outputs_dir: Path
) -> None:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    rc, out, err = gemini_cli(
        [*SMALL, "train.steps=4", f"tracking.uri={server.uri}", "tracking.experiment=one-job"],
        cwd=cwd,
    )
    assert rc == 0, err
    assert list(cwd.iterdir()) == [], "nothing in the working directory"
    (job_dir,) = (outputs_dir / "runs").iterdir()
    summary = json.loads((job_dir / "summary.json").read_text())

    (run,) = runs_in(server, "one-job")
    assert run.info.run_id == summary["mlflow_run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.uri"] == server.uri
    assert run.data.params["cluster.nodes"] == "2"
    tags = run.data.tags
    assert tags["gemini.state_digest"] == summary["state_digest"]
    assert tags["outcome"] == "completed"
    assert tags["git_sha"] and tags["host"]
    client = client_of(server)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert run.data.metrics["run/steps"] == 4

    # Artifacts go up through the server, into the store it was started over:
    # the job needs no filesystem in common with it.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {".hydra", "summary.json"}
    assert list((server.store.parent / "mlartifacts").rglob("summary.json"))
    # Nothing went to the default sqlite store.
    assert not (outputs_dir / "mlflow.db").exists()
    assert not (outputs_dir / "mlartifacts").exists()
    assert server.uri in out, "the results point at the server to browse"


@pytest.mark.timeout(420)
def test_a_sweep_creates_its_experiment_and_parent_run_once_before_its_jobs(
    server: TrackingServer, gemini_cli: Cli, tmp_path: Path, outputs_dir: Path
) -> None:
    rc, _, err = gemini_cli(
        [
            "-m",
            "failure=none,hardware_once",
            "failure.at_step=3",
            "backend=replicated",
            "train.steps=6",
            *SMALL,
            f"tracking.uri={server.uri}",
            "tracking.experiment=sweep",
        ],
        cwd=tmp_path,
        timeout_s=400,
    )
    assert rc == 0, err
    client = client_of(server)
    assert [e.name for e in client.search_experiments() if e.name == "sweep"] == ["sweep"]
    exp = client.get_experiment_by_name("sweep")
    runs = runs_in(server, "sweep")
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "multirun"]
    children = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
        key=lambda r: r.info.start_time,
    )
    assert len(runs) == 3 and len(children) == 2, [r.data.tags for r in runs]
    assert parent.info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children)
    # The experiment, then the parent, then the first job.
    assert exp.creation_time <= parent.info.start_time <= children[0].info.start_time
    (sweep_dir,) = (outputs_dir / "multiruns").iterdir()
    assert parent.data.tags["sweep_dir"] == str(sweep_dir)

    reference, failed = children
    assert reference.data.params["failure.name"] == "none"
    assert failed.data.params["failure.name"] == "hardware_once"
    assert failed.data.metrics["recovery/recovery_s"] > 0
    assert failed.data.metrics["run/generations"] >= 1
    # The verdict was looked up through the server too.
    assert failed.data.tags["gemini.exact"] == "yes"
    assert failed.data.tags["gemini.exact_reference"] == reference.info.run_id
    assert failed.data.tags["gemini.state_digest"] == reference.data.tags["gemini.state_digest"]
