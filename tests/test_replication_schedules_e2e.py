"""Whole jobs in every replication schedule: the same final state, and a peer restore
under the planned one.

Real jobs through ``gemini.experiment.run`` (root agent, worker agents,
trainers over gloo, the transport between nodes). Replication never touches
the training state, so every schedule ends with the failure-free digest of
``backend=none``; under ``interleave`` a lost node's rank comes back from the
copy its peer holds, sent chunk by chunk in the idle spans.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_recovery_e2e import References, RunJob, assert_detected_in_time, job, only_recovery

pytestmark = [pytest.mark.usefixtures("no_leftovers"), pytest.mark.slow, pytest.mark.timeout(600)]

PROFILE_STEPS = 5
# The profile ends after the generation's first 3 + PROFILE_STEPS steps: the
# failure comes once the plan is in force.
STEPS, AT_STEP = 16, 11


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(tmp_path_factory.mktemp("reference"))


def assert_planned(summary: dict[str, Any], mode: str) -> None:
    """Every rank fitted the link and planned; all share one interval."""
    plans = summary["interleave"]
    assert sorted(plans) == ["0", "1"]
    intervals = {p["interval"] for p in plans.values()}
    assert intervals == {summary["interleave_interval"]}
    for p in plans.values():
        assert p["mode"] == mode
        assert p["bandwidth_Bps"] > 0 and p["alpha_s"] >= 0
        assert p["chunks"] >= 1 and p["spans"] >= 2
        assert 1 <= p["needed_interval"] <= p["interval"]


def test_a_lost_node_under_interleave_comes_back_from_its_peer_exactly(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job,
        "backend=replicated",
        "backend.replication.factor=2",
        "backend.replication.schedule=interleave",
        f"backend.replication.profile_steps={PROFILE_STEPS}",
        "failure=hardware_once",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
        steps=STEPS,
    )
    assert summary["state_digest"] == reference.digest(STEPS)
    rec = only_recovery(summary, "hardware")
    assert rec["dead_nodes"] == [1]
    assert rec["rank_sources"]["1"] == "peer:0"
    assert rec["rank_sources"]["0"] == "local"
    assert_detected_in_time(rec)
    assert_planned(summary, "interleave")
    # Checkpoints are every interval steps once planned: the restored step
    # lies at most two intervals (one in flight, one complete) back.
    k = summary["interleave_interval"]
    assert AT_STEP - 2 * k - 1 <= rec["restored_step"] <= rec["failed_step"]
    assert summary["ckpt_replicate_s"] > 0 and summary["ckpt_local_s"] > 0


@pytest.mark.parametrize("mode", ["blocking", "naive", "interleave_nopipe", "interleave"])
def test_every_schedule_ends_with_the_failure_free_state(
    reference: References, run_job: RunJob, mode: str
) -> None:
    summary, _ = job(
        run_job,
        "backend=replicated",
        "backend.replication.factor=2",
        f"backend.replication.schedule={mode}",
        f"backend.replication.profile_steps={PROFILE_STEPS}",
        "failure=none",
        steps=STEPS,
    )
    assert summary["state_digest"] == reference.digest(STEPS)
    assert summary["ckpt_replicate_s"] > 0 and summary["ckpt_local_s"] > 0
    if mode.startswith("interleave"):
        assert_planned(summary, mode)
    else:
        assert "interleave" not in summary


def test_a_kill_during_a_snapshot_under_interleave_with_zero_recovers_exactly(
    reference: References, run_job: RunJob
) -> None:
    # ZeRO's parameter broadcast counts as communication in the profile; the
    # kill is armed once the plan is in force, so it lands in a planned
    # snapshot (every interval steps) and the other slot is the one restored.
    summary, _ = job(
        run_job,
        "train.parallel=zero",
        "backend=replicated",
        "backend.replication.factor=2",
        "backend.replication.schedule=interleave",
        f"backend.replication.profile_steps={PROFILE_STEPS}",
        "failure=kill_during_snapshot",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
        steps=STEPS,
    )
    assert summary["state_digest"] == reference.digest(STEPS, "train.parallel=zero")
    rec = only_recovery(summary, "software")
    (fired,) = rec["injected"]
    assert fired["kind"] == "kill_during_snapshot"
    k = summary["interleave_interval"]
    # It lands in the first snapshot at or after its step, which is planned.
    assert fired["step"] >= AT_STEP and fired["step"] % k == 0
    assert rec["failed_ranks"] == [1]
    assert rec["restored_step"] < fired["step"]
    assert_planned(summary, "interleave")


def test_an_adaptive_cadence_under_interleave_ends_with_the_failure_free_state(
    reference: References, run_job: RunJob
) -> None:
    # The cadence and the planned interval both gate a snapshot: a step is
    # checkpointed when the cadence picks it and it is a multiple of the interval.
    summary, _ = job(
        run_job,
        "backend=replicated",
        "backend.cadence=checkfreq",
        "backend.replication.factor=2",
        "backend.replication.schedule=interleave",
        f"backend.replication.profile_steps={PROFILE_STEPS}",
        "failure=none",
        steps=STEPS,
    )
    assert summary["state_digest"] == reference.digest(STEPS)
    assert summary["checkpoints"] >= 1
    assert_planned(summary, "interleave")
