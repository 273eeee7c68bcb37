"""Every checkpoint backend, end to end, leaves training exactly as it was.

Whole jobs through ``gemini.experiment.run`` (root agent, node launchers,
worker agents, trainer ranks: real processes and sockets) with configs
composed from ``conf/`` as the CLI composes them. A backend or a cadence
decides only *when and where* copies are made, so every run must end with
the same ``state_digest`` as ``backend=none``, and report what its
checkpoints cost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose_config

from gemini.checkpoint import format as fmt
from gemini.checkpoint.disk import storage_complete_steps
from gemini.checkpoint.slot import list_segments
from gemini.cluster.job import JobSpec
from gemini.cluster.processes import run_processes
from gemini.config import config_hash, to_schema
from gemini.experiment import run
from gemini.workload.state import TrainState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.usefixtures("no_leftovers")]

RunJob = Callable[..., Any]
"""conftest's ``run_job(*overrides, tracking_uri=None) -> (summary, job_dir)``."""

NODES = 4
STEPS = 12
# What every run of this file shares with its reference. Backend and failure
# are always named by the test: their defaults are not this file's to assume.
CLUSTER = (
    "model=gpt_tiny",
    "train.parallel=ddp",
    f"cluster.nodes={NODES}",
    "cluster.ranks_per_node=1",
    f"train.steps={STEPS}",
)


def job(run_job: RunJob, *overrides: str) -> tuple[dict[str, Any], Path]:
    """One job with this file's cluster; it must complete and leave nothing behind."""
    summary, job_dir = run_job(*CLUSTER, *overrides)
    assert summary["outcome"] == "completed", summary.get("reason")
    assert summary["steps"] == STEPS
    assert_left_nothing(summary["run_id"])
    return summary, job_dir


def assert_left_nothing(run_id: str) -> None:
    assert run_processes(run_id) == [], "processes of the run outlived it"
    assert list_segments(f"gemini-{run_id}") == [], "shared memory outlived the run"


@pytest.fixture(scope="module")
def reference_digest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The failure-free, checkpoint-free run: what every backend must reproduce."""
    outputs = tmp_path_factory.mktemp("reference")
    cfg = compose_config(
        [*CLUSTER, "backend=none", "failure=none", "tracking=off", "progress=false",
         f"paths.outputs={outputs}"]
    )  # fmt: skip
    summary = run(to_schema(cfg), job_dir=outputs / "job")
    assert summary["outcome"] == "completed"
    assert summary["checkpoints"] == 0 and summary["ckpt_local_s"] is None
    assert_left_nothing(summary["run_id"])
    digest = summary["state_digest"]
    assert isinstance(digest, str) and len(digest) == 64
    return digest


@functools.cache
def checkpoint_bytes() -> int:
    """Bytes of one step's checkpoint over all ranks: DDP ranks each hold the full state."""
    cfg = to_schema(compose_config([*CLUSTER, "backend=none", "failure=none", "tracking=off"]))
    _, nbytes = fmt.layout(TrainState(cfg, 0, 1, torch.device("cpu")).checkpoint_spec())
    return NODES * nbytes


def assert_checkpoint_costs(summary: dict[str, Any], *, replicated: bool) -> None:
    assert summary["checkpoints"] >= 1
    # A stall is waited inside its iteration, so it cannot exceed it.
    assert summary["ckpt_stall_s"] is not None
    assert 0 <= summary["ckpt_stall_s"] <= summary["iter_time_s"]
    assert summary["ckpt_local_s"] is not None and summary["ckpt_local_s"] > 0
    assert summary["ckpt_bytes"] == checkpoint_bytes()
    if replicated:
        assert summary["ckpt_replicate_s"] is not None and summary["ckpt_replicate_s"] > 0
    else:
        assert not summary["ckpt_replicate_s"]


@pytest.mark.parametrize(
    ("overrides", "replicated"),
    [
        pytest.param(("backend=disk",), False, id="disk"),
        pytest.param(("backend=memory",), False, id="memory"),
        pytest.param(
            ("backend=replicated", "backend.replication.placement=group"),
            True,
            id="replicated-m2-group",
        ),
        pytest.param(
            ("backend=replicated", "backend.replication.placement=ring"),
            True,
            id="replicated-m2-ring",
        ),
        pytest.param(
            (
                "backend=replicated",
                "backend.replication.factor=3",
                "backend.replication.placement=group",
            ),
            True,
            id="replicated-m3-mixed",
        ),
    ],
)
def test_a_backend_does_not_change_training(
    overrides: tuple[str, ...], replicated: bool, reference_digest: str, run_job: RunJob
) -> None:
    summary, _ = job(run_job, *overrides, "failure=none")
    assert summary["state_digest"] == reference_digest
    assert summary["recoveries"] == [] and summary["failures_injected"] == []
    assert_checkpoint_costs(summary, replicated=replicated)


def test_every_iteration_checkpoints_every_iteration(
    reference_digest: str, run_job: RunJob
) -> None:
    summary, _ = job(run_job, "backend=memory", "backend.every_n=1", "failure=none")
    assert summary["state_digest"] == reference_digest
    # The timing of step s's checkpoint is known at step s + 1 (it overlaps
    # that step's forward/backward); the last one is waited for at the end.
    assert summary["checkpoints"] == STEPS
    # The rate counts the checkpoints timed inside the loop (steps 1 to STEPS - 1).
    per_hour = (STEPS - 1) / summary["wall_s"] * 3600
    assert summary["checkpoints_per_hour"] == pytest.approx(per_hour)


def test_every_n_checkpoints_every_nth_step(reference_digest: str, run_job: RunJob) -> None:
    summary, _ = job(run_job, "backend=memory", "backend.every_n=3", "failure=none")
    assert summary["state_digest"] == reference_digest
    assert summary["checkpoints"] == STEPS // 3  # steps 3, 6, 9 and 12
    assert_checkpoint_costs(summary, replicated=False)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(("backend.cadence=highfreq",), id="highfreq"),
        pytest.param(
            ("backend.cadence=checkfreq", "backend.overhead_bound_pct=50"), id="checkfreq"
        ),
        # A short assumed MTBF, so that Young/Daly's interval fits in a short run.
        pytest.param(("backend.cadence=young_daly", "backend.mtbf_s=2.0"), id="young_daly"),
    ],
)
def test_a_measured_cadence_takes_checkpoints_all_ranks_can_restore(
    overrides: tuple[str, ...], reference_digest: str, run_job: RunJob
) -> None:
    summary, job_dir = job(run_job, "backend=disk", *overrides, "failure=none")
    assert summary["state_digest"] == reference_digest
    assert_checkpoint_costs(summary, replicated=False)
    assert summary["checkpoints"] < STEPS  # measured policies skip steps
    # Ranks decide on their own clocks; a checkpoint is only useful if every
    # rank took it at the same step.
    spec = JobSpec.load(job_dir / "job.json")
    complete = storage_complete_steps(
        spec.cfg, job_dir, spec.run_id, NODES, config_hash=config_hash(spec.cfg)
    )
    assert complete, "no step on storage has every rank's checkpoint"
