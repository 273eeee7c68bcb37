"""Experiments on SLURM: ``cluster=slurm`` jobs submitted through the Hydra launchers.

Every test runs twice: through ``hydra/launcher=slurm`` against the real
single-node cluster of ``scripts/slurm.sh`` (marked ``slurm``: CI starts one,
``make slurm-up`` here), and through ``hydra/launcher=submitit_local``, the
same tasks without a scheduler (marked ``slow``). On this machine every task
shares one host, which ``hydra.launcher.tasks_per_host=0`` asks SLURM for.

They check what a user would: the jobs complete and land in MLflow through a
tracking server, with their parent; a hardware failure is recovered from a
peer's memory onto a standby task and ends exact; a forced timeout requeues
the job, which resumes from storage into the same MLflow run and ends in the
failure-free state; and nothing is left behind — no SLURM job, no process,
no shared memory.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    TrackingServer,
    compose_config,
    run_cli,
    start_cli,
)

STATE_DIR = Path(os.environ.get("GEMINI_SLURM_DIR") or "/tmp/gemini-slurm")
CONF = os.environ.get("SLURM_CONF") or str(STATE_DIR / "slurm.conf")
HAVE_SLURM = "SLURM_CONF" in os.environ or Path(CONF).is_file()

LAUNCHERS = [
    pytest.param(
        "slurm",
        marks=[
            pytest.mark.slurm,
            pytest.mark.skipif(not HAVE_SLURM, reason="no SLURM cluster set up (make slurm-up)"),
        ],
        id="slurm",
    ),
    pytest.param("submitit_local", marks=pytest.mark.slow, id="submitit_local"),
]

pytestmark = [pytest.mark.usefixtures("no_leftovers"), pytest.mark.timeout(900)]

# Two nodes and a standby: the smallest job with a peer to recover from and a
# spare to recover onto.
SMALL = ["cluster=slurm", "cluster.nodes=2", "model=mlp", "progress=false"]


def launcher_args(launcher: str) -> list[str]:
    args = ["-m", f"hydra/launcher={launcher}", "hydra.launcher.timeout_min=10"]
    if launcher == "slurm":
        # One host here: every task of a job on it (a real cluster: one per node).
        args += ["hydra.launcher.tasks_per_host=0"]
    return args


def slurm_env() -> dict[str, str]:
    return {"SLURM_CONF": CONF} if HAVE_SLURM else {}


def squeue() -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i %T"],
        env={**os.environ, **slurm_env()},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.strip()]


def summaries(outputs: Path) -> list[dict[str, Any]]:
    """summary.json of every job under ``outputs``, in job order."""
    paths = sorted(
        (outputs / "multiruns").rglob("summary.json"), key=lambda p: p.parent.name.split("_")[0]
    )
    return [json.loads(p.read_text()) for p in paths]


def experiment_runs(server: TrackingServer, name: str) -> list[Any]:
    import mlflow

    client = mlflow.MlflowClient(server.uri)
    exp = client.get_experiment_by_name(name)
    assert exp is not None, f"no experiment {name!r}"
    return list(client.search_runs([exp.experiment_id]))


def own_segments(outputs: Path) -> list[str]:
    ids = {json.loads(p.read_text())["run_id"] for p in outputs.rglob("job.json")}
    return [n for n in os.listdir("/dev/shm") if any(f"-{i}-" in n for i in ids)]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_sweep_recovers_a_hardware_failure_onto_a_standby_task_and_ends_exact(
    launcher: str, server: TrackingServer, tmp_path: Path, outputs_dir: Path
) -> None:
    experiment = f"slurm-sweep-{launcher}"
    args = [
        *launcher_args(launcher),
        # One job after the other: the failure-free one is the other's reference.
        "hydra.launcher.array_parallelism=1",
        *SMALL,
        "backend=replicated",
        "failure=none,hardware_once",
        "failure.node=1",
        "failure.at_step=6",
        "train.steps=14",
        f"tracking.uri={server.uri}",
        f"tracking.experiment={experiment}",
    ]
    rc, out, err = run_cli(args, tmp_path, outputs=outputs_dir, timeout_s=840, env=slurm_env())
    assert rc == 0, f"{out}\n{err}"
    free, failed = summaries(outputs_dir)
    assert free["outcome"] == failed["outcome"] == "completed"
    (rec,) = failed["recoveries"]
    assert rec["kind"] == "hardware" and rec["rank_sources"]["1"].startswith("peer")
    (takeover,) = failed["cluster_layout"]["takeovers"]
    assert takeover == {**takeover, "node": 1, "from_task": 1, "task": 2, "standby": True}
    assert failed["state_digest"] == free["state_digest"]
    assert failed["exact"] == "yes"
    runs = experiment_runs(server, experiment)
    parents = [r for r in runs if r.data.tags.get("kind") == "multirun"]
    jobs = [r for r in runs if r.data.tags.get("kind") != "multirun"]
    assert len(parents) == 1 and len(jobs) == 2
    assert {r.data.tags.get("mlflow.parentRunId") for r in jobs} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in jobs)
    if launcher == "slurm":
        assert all(r.data.tags.get("slurm_job_id") for r in jobs)
        assert squeue() == []
    assert own_segments(outputs_dir) == []


def task_processes(outputs: Path) -> list[psutil.Process]:
    """The submitit_local tasks of this test's job (they run the Hydra job)."""
    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if "SUBMITIT_LOCAL_GLOBALID" in env and env.get("GEMINI_OUTPUTS") == str(outputs):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def force_timeout(launcher: str, outputs: Path) -> None:
    """What the scheduler does as a job's time runs out: USR2 to every task
    (submitit then finds the job timed out, as its time limit is short)."""
    if launcher == "slurm":
        (line,) = squeue()
        job_id = line.split()[0]
        subprocess.run(
            ["scancel", "--signal=USR2", job_id],
            env={**os.environ, **slurm_env()},
            check=True,
            timeout=30,
        )
    else:
        for p in task_processes(outputs):
            p.send_signal(signal.SIGUSR2)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_timed_out_job_requeues_resumes_from_storage_into_the_same_run_and_ends_exact(
    launcher: str, server: TrackingServer, tmp_path: Path, outputs_dir: Path
) -> None:
    experiment = f"slurm-requeue-{launcher}"
    common = [
        *launcher_args(launcher),
        "hydra.launcher.max_num_timeout=1",
        *SMALL,
        "backend=disk",
        "train.steps=40",
        f"tracking.uri={server.uri}",
        f"tracking.experiment={experiment}",
    ]
    proc = start_cli(
        common, tmp_path, outputs=outputs_dir, log_dir=tmp_path / "cli", env=slurm_env()
    )
    try:
        deadline = time.monotonic() + 300
        # Once a checkpoint beyond step 4 is complete on storage, time is up.
        while not list((outputs_dir / "multiruns").rglob("step_0000000[5-9]/rank_00001.json")):
            assert proc.poll() is None, (tmp_path / "cli" / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "no checkpoint reached storage"
            time.sleep(0.5)
        (run_file,) = (outputs_dir / "multiruns").rglob("mlflow_run.json")
        first_run = json.loads(run_file.read_text())["run_id"]
        force_timeout(launcher, outputs_dir)
        assert proc.wait(timeout=600) == 0, (tmp_path / "cli" / "stderr.txt").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    (summary,) = summaries(outputs_dir)
    assert summary["outcome"] == "completed"
    assert summary["requeues"] == 1
    root_log = next((outputs_dir / "multiruns").rglob("logs/root.log")).read_text()
    assert "requeued (attempt 2): newest step with every rank available" in root_log
    (run,) = [
        r for r in experiment_runs(server, experiment) if r.data.tags.get("kind") != "multirun"
    ]
    assert run.info.run_id == first_run, "the requeued job opened another MLflow run"
    assert run.data.metrics["run/requeues"] == 1
    assert run.info.status == "FINISHED"
    # The failure-free reference: the same job, left alone.
    ref_outputs = tmp_path / "reference"
    rc, out, err = run_cli(common, tmp_path, outputs=ref_outputs, timeout_s=600, env=slurm_env())
    assert rc == 0, f"{out}\n{err}"
    (reference,) = summaries(ref_outputs)
    assert reference["requeues"] == 0
    assert summary["state_digest"] == reference["state_digest"]
    if launcher == "slurm":
        assert squeue() == []
    assert own_segments(outputs_dir) == []


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_job_its_machine_cannot_hold_is_refused_by_task_0_in_one_line(
    launcher: str, tmp_path: Path, outputs_dir: Path
) -> None:
    # The submitting host does not check a SLURM job's machines (they may be
    # others): task 0 checks its own, and every task stops at its word.
    # Four nodes, four copies of each rank's slots, on one host: a model
    # whose slots outgrow this machine's /dev/shm, whatever its size.
    from gemini.checkpoint.memory import estimate_rank_bytes
    from gemini.checkpoint.slot import shm_available_bytes
    from gemini.config import to_schema

    per_rank = estimate_rank_bytes(to_schema(compose_config(["model=gpt_tiny"])))
    layers = math.ceil(3 * shm_available_bytes() / (4 * 4 * 2 * per_rank))
    args = [
        *launcher_args(launcher),
        *SMALL,
        "cluster.nodes=4",
        "model=gpt_tiny",
        f"model.n_layer={layers * compose_config(['model=gpt_tiny']).model.n_layer}",
        "backend=replicated",
        "backend.replication.factor=4",
    ]
    rc, out, err = run_cli(args, tmp_path, outputs=outputs_dir, timeout_s=300, env=slurm_env())
    assert rc == 2, f"{out}\n{err}"
    lines = [line for line in err.splitlines() if line.startswith("gemini:")]
    assert len(lines) == 1 and "backend.replication.factor=4" in lines[0], err
    assert "Traceback" not in err
    assert not list(outputs_dir.rglob("job.json")), "a store was started"
    if launcher == "slurm":
        assert squeue() == []
