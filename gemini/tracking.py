"""MLflow: one run per job, a parent run per multirun, params, tags, metrics, artifacts.

The store defaults to an sqlite file under outputs/ with an absolute path, so
every job of a sweep and ``mlflow ui`` see the same store whatever the working
directory; ``tracking.uri=http://host:port`` records through a tracking server
instead (``make mlflow-server``), whose ``/health`` the config check probes
before a job starts. A multirun's experiment and parent run are created by a
Hydra callback when the sweep starts, before its first job; the parent's id
is left in the sweep dir, where each job (in this process, or on another
machine sharing the filesystem) finds it. Only the controller records: the
trainers and agents of a job never talk to the tracking store.

A job's run is opened when the job starts (:func:`open_job_run`) and its id
left in the job dir, so that an attempt SLURM requeues into the same job dir
continues the same run instead of starting a second one; :func:`record_job`
fills it in when the attempt ends.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gemini.config import REPO_ROOT, GeminiConfig, flatten, is_server_uri
from gemini.recovery import RECOVERY_METRICS

PARENT_FILE = "mlflow_parent_run_id"
RUN_FILE = "mlflow_run.json"
"""In a job dir: the run :func:`open_job_run` opened for it, and the store it is in."""

STEP_METRICS = (
    "iter_time_s",
    "throughput_samples_s",
    "loss",
    "ckpt_stall_s",
    "ckpt_time_s",
    "ckpt_local_s",
    "ckpt_replicate_s",
    "ckpt_persist_s",
    "ckpt_bytes",
)
"""Per-step metrics (MLflow step = training step), as ``experiment.collect`` aggregates them."""
RECOVERY_LOGGED = (
    *RECOVERY_METRICS,
    "failed_step",
    "restored_step",
    "replace_s",
    "ckpt_prepare_s",
    "retrieve_bytes",
    "ckpt_stall_since_last_s",
)
"""Per-recovery metrics, logged as ``recovery/<name>`` (MLflow step = the recovery's index).
Wall-clock instants (``t_inject``, ``t_ready``, ...) stay in ``summary.json``."""
RUN_METRICS = (
    "steps",
    "wall_s",
    "startup_s",
    "iter_time_s",
    "throughput_samples_s",
    "final_loss",
    "world_size",
    "nodes",
    "ckpt_stall_s",
    "ckpt_local_s",
    "ckpt_replicate_s",
    "ckpt_persist_s",
    "ckpt_time_s",
    "ckpt_bytes",
    "checkpoints",
    "checkpoints_per_hour",
    "generations",
    "requeues",
    "idle_s",
    "idle_cv",
    "comm_s",
    "interleave_interval",
    *(f"mean_{k}" for k in RECOVERY_METRICS),
)
"""Run-level metrics, logged as ``run/<name>`` from ``summary.json``."""


def metric_names() -> list[str]:
    """Every MLflow metric name a job can log (docs/design.md lists each one)."""
    return [
        *STEP_METRICS,
        *(f"recovery/{k}" for k in RECOVERY_LOGGED),
        *(f"run/{k}" for k in RUN_METRICS),
    ]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metric_rows(
    step_metrics: list[dict[str, Any]],
    recoveries: list[dict[str, Any]],
    summary: dict[str, Any],
) -> list[tuple[str, float, int, int]]:
    """(name, value, timestamp ms, step) of every metric a job logs: the declared names only."""
    rows: list[tuple[str, float, int, int]] = []
    for rec in step_metrics:
        ts = int(rec.get("t", 0) * 1000)
        for k in STEP_METRICS:
            if _number(rec.get(k)):
                rows.append((k, float(rec[k]), ts, int(rec["step"])))
    for i, rec in enumerate(recoveries):
        for k in RECOVERY_LOGGED:
            if _number(rec.get(k)):
                rows.append((f"recovery/{k}", float(rec[k]), 0, i))
    for k in RUN_METRICS:
        if _number(summary.get(k)):
            rows.append((f"run/{k}", float(summary[k]), 0, 0))
    return rows


def tracking_uri(cfg: GeminiConfig) -> str:
    if is_server_uri(cfg.tracking.uri):
        # The client appends "/api/...": a trailing slash would double it.
        return cfg.tracking.uri.rstrip("/")
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return f"sqlite:///{Path(cfg.paths.outputs).resolve() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    """How to browse the store at ``uri``: a server is its own UI."""
    if is_server_uri(uri):
        return f"{uri} (the tracking server's UI)"
    return f"mlflow ui --backend-store-uri {uri}"


def _mlflow() -> Any:
    # mlflow's import costs ~1.5 s: pay it only when recording.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    return mlflow


def mlflow_client(cfg: GeminiConfig) -> Any:
    """A client of ``cfg``'s tracking store."""
    return _mlflow().MlflowClient(tracking_uri(cfg))


def client_at(uri: str) -> Any:
    """A client of the tracking store at ``uri``."""
    return _mlflow().MlflowClient(uri)


def artifact_location(uri: str) -> str | None:
    """Artifacts beside an sqlite store (``<db dir>/mlartifacts``).

    MLflow's default is ``./mlruns`` of whichever working directory first
    created the experiment: artifacts would land wherever ``gemini`` was
    started. A server (http URI) chooses its own.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix) :]).resolve().parent / "mlartifacts").as_uri()


def _experiment_id(mlflow: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if new; either way tagged so that MLflow's
    UI opens it as a training experiment, with a view of the key metrics
    (:mod:`gemini.mlflow_view`)."""
    from gemini.mlflow_view import missing_tags

    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        try:
            return str(
                mlflow.create_experiment(
                    name, artifact_location=artifact_location(uri), tags=missing_tags({})
                )
            )
        except Exception:  # another job of the sweep created it first
            exp = mlflow.get_experiment_by_name(name)
    client = mlflow.MlflowClient(uri)
    for key, value in missing_tags(exp.tags).items():
        client.set_experiment_tag(exp.experiment_id, key, value)
    return str(exp.experiment_id)


def browse_hint(uri: str, experiment_id: str) -> str:
    """How to see an experiment's runs: its link, after ``mlflow ui`` for a store."""
    from gemini.mlflow_view import experiment_url

    link = experiment_url(uri, experiment_id)
    return link if is_server_uri(uri) else f"{ui_command(uri)}\n  then open {link}"


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        # Without a commit, rev-parse fails but still echoes "HEAD" on stdout.
        return (out.stdout.strip() if out.returncode == 0 else "") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def host_tags(cfg: GeminiConfig) -> dict[str, str]:
    import psutil
    import torch

    return {
        "git_sha": git_sha(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "torch_version": torch.__version__,
        "cpu_cores": str(os.cpu_count()),
        "ram_gib": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "backend": cfg.backend.name,
        "failure_schedule": cfg.failure.name,
        "model": cfg.model.name,
        "parallel": cfg.train.parallel,
    }


SWEEP_TAG = "sweep"
"""Run tag: the ``+sweep=NAME`` config a job or multirun was composed with."""


def sweep_name(choices: Any = None) -> str | None:
    """The ``sweep`` group's choice among Hydra's runtime ``choices``; None without one.

    Without ``choices``, those of the running job: ``HydraConfig`` is set in the
    process that runs it, locally and in a submitit task alike.
    """
    if choices is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            choices = HydraConfig.get().runtime.choices
        except ValueError:  # not under Hydra
            return None
    name = choices.get("sweep") if choices is not None else None
    return str(name) if name else None


JOB_TAGS = ("backend", "failure_schedule", "model", "parallel")
"""Tags of :func:`host_tags` that describe one job: a multirun's parent run has none."""


class MultirunParentCallback(Callback):
    """Hydra callback: a parent MLflow run that every job of the multirun nests under,
    and the table comparing the jobs when the multirun ends
    (:func:`gemini.multirun_table.end_multirun`)."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.uri: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from gemini.config import to_schema

        plain = OmegaConf.to_container(config, resolve=False)
        assert isinstance(plain, dict)
        hydra_cfg = config.hydra
        try:
            cfg = to_schema(config)
        except Exception:
            return  # the jobs will report the config error themselves
        if not cfg.tracking.enabled:
            return
        mlflow = _mlflow()
        self.uri = tracking_uri(cfg)
        client = mlflow.MlflowClient(self.uri)
        mlflow.set_tracking_uri(self.uri)
        exp_id = _experiment_id(mlflow, cfg.tracking.experiment, self.uri)
        sweep_dir = Path(str(hydra_cfg.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = list(hydra_cfg.overrides.task)
        sweep = sweep_name(hydra_cfg.runtime.choices)
        run = client.create_run(
            exp_id,
            run_name=f"sweep {sweep + ' ' if sweep else ''}{sweep_dir.name}",
            tags={
                "kind": "multirun",
                "sweep_dir": str(sweep_dir),
                "overrides": " ".join(overrides),
                # The machine's facts; what each job ran is its own run's.
                **{k: v for k, v in host_tags(cfg).items() if k not in JOB_TAGS},
                **({SWEEP_TAG: sweep} if sweep else {}),
            },
        )
        self.run_id = run.info.run_id
        (sweep_dir / PARENT_FILE).write_text(f"{self.run_id}\n{self.uri}\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from gemini.multirun_table import end_multirun

        end_multirun(config)


def slurm_tags() -> dict[str, str]:
    """The SLURM facts of the current job, as MLflow tags; empty outside SLURM.

    Read from the environment SLURM sets in every task rather than asked of
    submitit, so the controller needs no executor object to tag its run.
    Under submitit's local executor there is no SLURM job, only the local
    job's id.
    """
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        local = env.get("SUBMITIT_LOCAL_JOB_ID")
        return {"submitit_local_job_id": local} if local else {}
    job_id = env["SLURM_JOB_ID"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        # An array task's own SLURM_JOB_ID is a number squeue never shows;
        # <array job>_<task> is the name sacct and squeue know it by.
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    tags = {"slurm_job_id": job_id, "slurm_restart_count": env.get("SLURM_RESTART_COUNT", "0")}
    for tag, var in (
        ("slurm_nodelist", "SLURM_JOB_NODELIST"),
        ("slurm_partition", "SLURM_JOB_PARTITION"),
    ):
        if env.get(var):
            tags[tag] = env[var]
    return tags


def parent_run_id(sweep_dir: str | None) -> str | None:
    if not sweep_dir:
        return None
    f = Path(sweep_dir) / PARENT_FILE
    return f.read_text().split()[0] if f.exists() else None


def _job_tags(
    cfg: GeminiConfig, job_dir: Path, parent: str | None, tags: dict[str, str] | None
) -> dict[str, str]:
    out = {**host_tags(cfg), **(tags or {}), "job_dir": str(job_dir)}
    sweep = sweep_name()
    if sweep:
        out[SWEEP_TAG] = sweep
    if parent:
        out["mlflow.parentRunId"] = parent
    return out


def _resumable(client: Any, run_id: str, exp_id: str) -> bool:
    """Whether ``run_id`` is a live run of experiment ``exp_id`` in ``client``'s store."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:  # never there, or garbage-collected since
        return False
    # A deleted run still answers get_run until gc, but refuses every write.
    return bool(run.info.lifecycle_stage == "active" and run.info.experiment_id == exp_id)


def _write_run_file(job_dir: Path, run_id: str, uri: str) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id, "uri": uri}) + "\n")
    # A requeue can kill the controller at any instant: a half-written file
    # would cost the next attempt its run, so it appears whole or not at all.
    os.replace(tmp, job_dir / RUN_FILE)


def _read_run_file(job_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((job_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def open_job_run(
    cfg: GeminiConfig,
    job_dir: Path,
    *,
    run_name: str,
    parent: str | None,
    tags: dict[str, str] | None = None,
) -> str:
    """Open the job's MLflow run as the job starts (RUNNING); returns its run id.

    The id is left in ``job_dir/mlflow_run.json``. A later attempt in the same
    job dir (SLURM requeued the job) finds it there and continues that run,
    set back to RUNNING with its tags brought up to date, so one job stays one
    run however often it is requeued. A file naming a run this store no longer
    has, or a run of another store or experiment, gets a fresh run.
    """
    mlflow = _mlflow()
    uri = tracking_uri(cfg)
    client = mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    exp_id = _experiment_id(mlflow, cfg.tracking.experiment, uri)
    all_tags = _job_tags(cfg, job_dir, parent, {**slurm_tags(), **(tags or {})})
    known = _read_run_file(job_dir)
    rid = known.get("run_id")
    if rid and known.get("uri") == uri and _resumable(client, rid, exp_id):
        from mlflow.entities import RunTag

        client.update_run(rid, status="RUNNING")
        client.log_batch(rid, tags=[RunTag(k, v) for k, v in all_tags.items()])
        return str(rid)
    rid = str(client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id)
    _write_run_file(job_dir, rid, uri)
    return rid


def record_job(
    cfg: GeminiConfig,
    job_dir: Path,
    *,
    run_name: str,
    summary: dict[str, Any],
    step_metrics: list[dict[str, Any]],
    recoveries: list[dict[str, Any]],
    parent: str | None,
    extra_tags: dict[str, str] | None = None,
    run_id: str | None = None,
) -> str:
    """Log one job as one MLflow run and end it; returns its run id.

    With ``run_id`` (from :func:`open_job_run`) it fills in and ends that run;
    without, it creates the run itself.
    """
    mlflow = _mlflow()
    from mlflow.entities import Metric, Param, RunTag

    uri = tracking_uri(cfg)
    client = mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    tags = _job_tags(cfg, job_dir, parent, extra_tags)
    logged: dict[str, str] = {}
    if run_id is None:
        exp_id = _experiment_id(mlflow, cfg.tracking.experiment, uri)
        rid = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    else:
        rid = run_id
        client.log_batch(rid, tags=[RunTag(k, v) for k, v in tags.items()])
        # An earlier attempt of a requeued job may have logged the params
        # already: MLflow refuses to log one again with another value (a
        # param is immutable), so only the missing ones are logged.
        logged = client.get_run(rid).data.params
    params = flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))  # type: ignore[arg-type]
    plist = [Param(k, str(v)[:6000]) for k, v in sorted(params.items()) if k not in logged]
    for i in range(0, len(plist), 100):
        client.log_batch(rid, params=plist[i : i + 100])
    metrics = [Metric(*row) for row in metric_rows(step_metrics, recoveries, summary)]
    for i in range(0, len(metrics), 900):
        client.log_batch(rid, metrics=metrics[i : i + 900])
    run_tags = [RunTag("outcome", str(summary.get("outcome", "")))]
    if summary.get("reason"):
        # MLflow caps tag values; the whole reason is in summary.json.
        run_tags.append(RunTag("reason", str(summary["reason"])[:5000]))
    client.log_batch(rid, tags=run_tags)
    for name in (".hydra", "summary.json", "logs"):
        path = job_dir / name
        if path.is_dir():
            client.log_artifacts(rid, str(path), artifact_path=name)
        elif path.exists():
            client.log_artifact(rid, str(path))
    for fig in sorted(job_dir.glob("*.png")):
        client.log_artifact(rid, str(fig))
    client.set_terminated(
        rid, status="FINISHED" if summary.get("outcome") == "completed" else "FAILED"
    )
    return str(rid)
