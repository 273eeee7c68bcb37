"""Failures injected into whole jobs: every recovery path ends bitwise where no failure would.

Real jobs through ``gemini.experiment.run`` (root agent, node launchers,
worker agents, trainers, the injector). The correctness gate of every path is
the same: the job completes with the ``state_digest`` of the failure-free
run of the same model, cluster, steps and parallelism (the backend does not
change the digest, so ``backend=none`` is the reference). Each test also
checks where the state came back from, and that the job left no process and
no shared memory behind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import compose_config

from gemini.checkpoint.slot import list_segments
from gemini.cluster.processes import run_processes
from gemini.config import to_schema
from gemini.experiment import run
from gemini.recovery import PHASES, RECOVERY_METRICS

pytestmark = pytest.mark.usefixtures("no_leftovers")

RunJob = Callable[..., Any]
"""conftest's ``run_job(*overrides, tracking_uri=None) -> (summary, job_dir)``."""

NODES = 2
STEPS = 12
AT_STEP = 6
HEARTBEAT_S, MISSED_BEATS = 0.5, 4
DETECT_MARGIN_S = 2.0
# What every run of this file shares with its reference. Backend and failure
# are always named by the test: their defaults are not this file's to assume.
CLUSTER = (
    "model=gpt_tiny",
    "train.parallel=ddp",
    f"cluster.nodes={NODES}",
    "cluster.ranks_per_node=1",
    f"cluster.heartbeat_s={HEARTBEAT_S}",
    f"cluster.missed_beats={MISSED_BEATS}",
)

slow = pytest.mark.slow
timeout = pytest.mark.timeout(300)


def cluster(*overrides: str) -> list[str]:
    """This file's CLUSTER with ``overrides`` in place of the keys they name."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [*(c for c in CLUSTER if c.split("=", 1)[0] not in keys), *overrides]


def job(run_job: RunJob, *overrides: str, steps: int = STEPS, **kw: Any) -> tuple[Any, Path]:
    """One job with this file's cluster; it must complete and leave nothing behind."""
    summary, job_dir = run_job(*cluster(f"train.steps={steps}", *overrides), **kw)
    assert summary["outcome"] == "completed", summary.get("reason")
    assert summary["steps"] == steps
    assert_left_nothing(summary["run_id"])
    return summary, job_dir


def assert_left_nothing(run_id: str) -> None:
    assert run_processes(run_id) == [], "processes of the run outlived it"
    assert list_segments(f"gemini-{run_id}") == [], "shared memory outlived the run"


class References:
    """Failure-free digests of this file's cluster, computed once per number of steps
    (and per change to the cluster: ``digest(steps, "cluster.nodes=3")``).

    The backend does not change the digest (tests/test_backends_e2e.py), so
    ``backend=none`` is the reference of every backend.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.digests: dict[tuple[int, tuple[str, ...]], str] = {}

    def digest(self, steps: int = STEPS, *changes: str) -> str:
        key = (steps, changes)
        if key not in self.digests:
            self.digests[key] = self._run(steps, changes, len(self.digests))
        return self.digests[key]

    def _run(self, steps: int, changes: tuple[str, ...], n: int) -> str:
        outputs = self.root / f"steps{steps}-{n}"
        cfg = compose_config(
            [*cluster(f"train.steps={steps}", *changes), "backend=none", "failure=none",
             "tracking=off", "progress=false", f"paths.outputs={outputs}"]
        )  # fmt: skip
        summary = run(to_schema(cfg), job_dir=outputs / "job")
        assert summary["outcome"] == "completed" and summary["recoveries"] == []
        assert_left_nothing(summary["run_id"])
        digest = summary["state_digest"]
        assert isinstance(digest, str) and len(digest) == 64
        return digest


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(tmp_path_factory.mktemp("reference"))


def only_recovery(summary: dict[str, Any], kind: str) -> dict[str, Any]:
    recs = summary["recoveries"]
    assert len(recs) == 1, recs
    rec = recs[0]
    assert rec["kind"] == kind
    for phase in ("detect_s", "teardown_s", "restart_s", "retrieve_s", "load_s", "recovery_s"):
        assert isinstance(rec[phase], (int, float)) and rec[phase] >= 0, (phase, rec)
    assert rec["wasted_s"] >= rec["recovery_s"]
    assert_phases_add_up(summary, rec)
    return rec


def assert_phases_add_up(summary: dict[str, Any], rec: dict[str, Any]) -> None:
    """The phases cover the recovery exactly; only memory backends pay an alloc phase."""
    assert sum(rec[p] for p in PHASES) == pytest.approx(rec["recovery_s"], abs=1e-6)
    # A lost root agent is replaced while the trainers train on: no generation
    # is launched, so no slots are set up.
    relaunched = rec["kind"] != "root_loss"
    if summary["backend"] in ("memory", "replicated") and relaunched:
        # Slots are set up for the new generation (mapped by every rank,
        # allocated and touched on a replaced node): not part of restart_s.
        assert rec["alloc_s"] > 0, rec
    else:
        assert rec["alloc_s"] == 0, rec


def assert_detected_in_time(rec: dict[str, Any]) -> None:
    limit = HEARTBEAT_S * MISSED_BEATS + DETECT_MARGIN_S
    assert rec["detect_s"] <= limit, f"detected after {rec['detect_s']:.2f} s > {limit} s"


# -- in the default suite -----------------------------------------------------------
@timeout
def test_software_failure_with_memory_resumes_from_local_memory_exactly(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job,
        "backend=memory",
        "failure=software_once",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
    )
    assert summary["state_digest"] == reference.digest()
    rec = only_recovery(summary, "software")
    assert rec["failed_ranks"] == [1] and rec["dead_nodes"] == []
    assert rec["source_counts"] == {"local": NODES}
    assert set(rec["rank_sources"].values()) == {"local"}
    # Per-iteration checkpoints: only the steps in flight are lost (the
    # killed rank's last copy may still have been running; progress is the
    # furthest rank's).
    assert AT_STEP - 2 <= rec["restored_step"] <= rec["failed_step"]
    assert rec["lost_steps"] <= 2


@timeout
def test_hardware_failure_with_replicated_resumes_from_a_peer_exactly(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job,
        "backend=replicated",
        "backend.replication.factor=2",
        "failure=hardware_once",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
    )
    assert summary["state_digest"] == reference.digest()
    rec = only_recovery(summary, "hardware")
    assert rec["dead_nodes"] == [1]
    assert rec["source_counts"].get("peer", 0) >= 1
    assert rec["rank_sources"]["1"] == "peer:0"
    assert rec["rank_sources"]["0"] == "local"
    assert rec["retrieve_bytes"] > 0
    assert AT_STEP - 2 <= rec["restored_step"] <= rec["failed_step"]
    assert_detected_in_time(rec)
    assert summary["ckpt_replicate_s"] is not None and summary["ckpt_replicate_s"] > 0


# -- slow ----------------------------------------------------------------------------
@slow
@timeout
def test_software_failure_with_replicated_resumes_from_local_memory_exactly(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job,
        "backend=replicated",
        "failure=software_once",
        f"failure.at_step={AT_STEP}",
        "failure.node=0",
        # The restarted generation runs on warm spares (pre-started trainers):
        # the exactness gate covers that path too.
        "cluster.warm_spares=true",
    )
    assert summary["state_digest"] == reference.digest()
    rec = only_recovery(summary, "software")
    assert rec["source_counts"] == {"local": NODES}


@slow
@timeout
def test_hardware_failure_with_disk_resumes_from_storage_and_is_tracked_in_mlflow(
    reference: References, run_job: RunJob, mlflow_uri: str
) -> None:
    summary, job_dir = job(
        run_job,
        "backend=disk",
        "failure=hardware_once",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
        "tracking.experiment=recovery-e2e",
        tracking_uri=mlflow_uri,
    )
    assert summary["state_digest"] == reference.digest()
    rec = only_recovery(summary, "hardware")
    assert rec["source_counts"] == {"storage": NODES}
    assert set(rec["rank_sources"].values()) == {"storage"}
    assert rec["restored_step"] >= 1
    assert_detected_in_time(rec)
    assert (job_dir / "recovery_timeline.png").is_file()

    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    got = client.get_run(summary["mlflow_run_id"])
    for phase in RECOVERY_METRICS:
        assert f"recovery/{phase}" in got.data.metrics, phase
    assert got.data.metrics["recovery/recovery_s"] == pytest.approx(rec["recovery_s"])
    assert "iter_time_s" in got.data.metrics and "ckpt_stall_s" in got.data.metrics
    assert got.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(got.info.run_id)}
    assert "recovery_timeline.png" in artifacts
    assert "summary.json" in artifacts


@slow
@timeout
def test_losing_a_whole_group_falls_back_to_persistent_storage_exactly(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job,
        "backend=replicated",
        "backend.replication.factor=2",
        # A period in steps, not seconds: on a loaded host a time period may
        # not have persisted anything by the failure, and the test would
        # restart from scratch instead of reading storage.
        "backend.persist_every_s=0",
        "backend.persist_every_n=2",
        "failure=two_in_group",
        f"failure.at_step={AT_STEP}",
    )
    assert summary["state_digest"] == reference.digest()
    rec = only_recovery(summary, "hardware")
    assert sorted(rec["dead_nodes"]) == [0, 1]
    # No memory copy of the group survived: every rank reads storage.
    assert rec["source_counts"] == {"storage": NODES}
    assert rec["restored_step"] >= 1, "the persistent tier held nothing: restarted from scratch"


@slow
@timeout
def test_a_corrupted_replica_is_skipped_and_recovery_is_still_exact(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job,
        "backend=replicated",
        "backend.replication.factor=2",
        "failure=corruption",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
    )
    assert summary["state_digest"] == reference.digest()
    fired = summary["failures_injected"]
    assert len(fired) == 1 and fired[0]["corrupted"], fired
    bad = fired[0]["corrupted"]
    assert bad["rank"] == 1 and bad["holder"] == 0
    rec = only_recovery(summary, "hardware")
    used = rec["sources"][str(bad["rank"])]
    # The damaged copy is never the source: an older step, or another holder.
    assert rec["restored_step"] < bad["step"] or used["node"] != bad["holder"]


@slow
@timeout
def test_a_kill_during_a_snapshot_resumes_from_the_previous_slot_exactly(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job,
        "backend=memory",
        "failure=kill_during_snapshot",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
    )
    assert summary["state_digest"] == reference.digest()
    rec = only_recovery(summary, "software")
    assert rec["failed_ranks"] == [1]
    # The half-written slot of AT_STEP is not complete; the one before is.
    assert rec["restored_step"] == AT_STEP - 1
    assert rec["source_counts"] == {"local": NODES}


@slow
@timeout
def test_losing_the_root_agent_elects_a_new_one_and_training_completes_exactly(
    reference: References, run_job: RunJob
) -> None:
    summary, job_dir = job(
        run_job, "backend=replicated", "failure=root_loss", f"failure.at_step={AT_STEP}"
    )
    assert summary["state_digest"] == reference.digest()
    assert list((job_dir / "logs").glob("root-epoch*.log")), "no root was elected"
    rec = only_recovery(summary, "root_loss")
    assert rec["lost_steps"] == 0
    assert summary["generations"] == 1  # the trainers never stopped


@slow
@pytest.mark.timeout(600)
def test_several_poisson_failures_each_recover_and_training_ends_exactly(
    reference: References, run_job: RunJob
) -> None:
    # Seed 21 draws two software failures of rank 1, 0.7 s and 4.8 s into
    # training. A Poisson schedule runs on wall time, so how the second lands
    # depends on the machine: after the first recovery (its own recovery) or
    # during it (folded into that recovery, whose restart it fails and re-plans).
    # 400 steps keep training running past both on an idle machine; warm
    # spares keep the first recovery short.
    steps = 400
    summary, _ = job(
        run_job,
        "backend=replicated",
        "failure=poisson",
        "failure.kind=software",
        "failure.mtbf_s=4",
        "failure.max_events=2",
        "failure.seed=21",
        "cluster.warm_spares=true",
        steps=steps,
    )
    assert summary["state_digest"] == reference.digest(steps)
    fired = summary["failures_injected"]
    assert [f["nodes"] for f in fired] == [[1], [1]]
    recs = summary["recoveries"]
    assert 1 <= len(recs) <= 2, recs
    assert all(r["failed_ranks"] in ([1], []) for r in recs), recs
    assert all(r["kind"] == "software" for r in recs)
