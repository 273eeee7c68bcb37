"""Each failure kind, schedule and layout that the harness accepts ends exact.

Real jobs, as in tests/test_recovery_e2e.py (whose cluster, reference digests
and checks this file reuses): a job with an injected failure must complete
with the ``state_digest`` of the failure-free run of the same model, cluster,
steps and parallelism. Here the failures and layouts that file does not
cover: a Weibull schedule, a correlated failure of two nodes with three
replicas, ZeRO's sharded optimizer, two ranks per node, ring and mixed
placement, a software failure of two nodes at once, and a kill during a
snapshot under a cadence that skips the armed step. Combinations that
cannot be made exact are refused before start (tests/test_failure_kinds.py,
tests/test_bad_input.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from test_recovery_e2e import (
    AT_STEP,
    STEPS,
    References,
    RunJob,
    job,
    only_recovery,
)

from gemini.checkpoint.placement import holders

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftovers")]
# A reference run and a failure run on a loaded 2-core host took up to 270 s here.
timeout = pytest.mark.timeout(600)

THREE_NODES = "cluster.nodes=3"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(tmp_path_factory.mktemp("reference"))


def hardware_failure_of(node: int) -> tuple[str, ...]:
    return ("failure=hardware_once", f"failure.at_step={AT_STEP}", f"failure.node={node}")


def assert_restored_from(rec: dict[str, Any], sources: dict[int, str]) -> None:
    for rank, source in sources.items():
        assert rec["rank_sources"][str(rank)] == source, rec["rank_sources"]


@timeout
def test_a_weibull_failure_recovers_exactly(reference: References, run_job: RunJob) -> None:
    # Seed 16 draws one hardware failure of node 1, 0.5 s into training: a
    # Weibull schedule runs on wall time, so 40 steps keep training going past it.
    steps = 40
    summary, _ = job(
        run_job,
        "backend=replicated",
        "failure=weibull",
        "failure.kind=hardware",
        "failure.mtbf_s=2",
        "failure.max_events=1",
        "failure.seed=16",
        steps=steps,
    )
    assert summary["state_digest"] == reference.digest(steps)
    assert [f["nodes"] for f in summary["failures_injected"]] == [[1]]
    rec = only_recovery(summary, "hardware")
    assert rec["dead_nodes"] == [1]
    assert_restored_from(rec, {1: "peer:0"})


@timeout
def test_a_correlated_failure_of_two_nodes_with_three_replicas_recovers_exactly(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job,
        THREE_NODES,
        "backend=replicated",
        "backend.replication.factor=3",
        "failure=correlated",
        "failure.kind=hardware",
        "failure.k=2",
        "failure.node=0",
        f"failure.at_step={AT_STEP}",
    )
    assert summary["state_digest"] == reference.digest(STEPS, THREE_NODES)
    rec = only_recovery(summary, "hardware")
    assert sorted(rec["dead_nodes"]) == [0, 1]
    # m=3 on 3 nodes: the survivor holds a copy of every rank's checkpoint.
    assert_restored_from(rec, {0: "peer:2", 1: "peer:2", 2: "local"})


@timeout
def test_a_correlated_software_failure_kills_every_node_s_rank_and_recovers_exactly(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job,
        "backend=memory",
        "failure=correlated",
        "failure.kind=software",
        "failure.k=2",
        "failure.node=0",
        f"failure.at_step={AT_STEP}",
    )
    assert summary["state_digest"] == reference.digest()
    assert [f["nodes"] for f in summary["failures_injected"]] == [[0, 1]]
    rec = only_recovery(summary, "software")
    assert rec["dead_nodes"] == []
    # The nodes survive a software failure: each rank reads its own memory.
    assert rec["source_counts"] == {"local": 2}


@pytest.mark.parametrize("placement", ["ring", "mixed"])
@timeout
def test_a_hardware_failure_under_ring_and_mixed_placement_recovers_exactly(
    reference: References, run_job: RunJob, placement: str
) -> None:
    # m=2 does not divide 3 nodes: mixed makes one group of three replicating
    # as a ring inside it; ring replicates to the next node of the cluster.
    failed = 2
    summary, _ = job(
        run_job,
        THREE_NODES,
        "backend=replicated",
        "backend.replication.factor=2",
        f"backend.replication.placement={placement}",
        *hardware_failure_of(failed),
    )
    assert summary["state_digest"] == reference.digest(STEPS, THREE_NODES)
    rec = only_recovery(summary, "hardware")
    (holder,) = holders(failed, 3, 2, placement)
    assert_restored_from(rec, {failed: f"peer:{holder}"})


@timeout
def test_zero_recovers_its_sharded_optimizer_from_a_hardware_failure_exactly(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(run_job, "train.parallel=zero", "backend=replicated", *hardware_failure_of(1))
    assert summary["state_digest"] == reference.digest(STEPS, "train.parallel=zero")
    rec = only_recovery(summary, "hardware")
    assert_restored_from(rec, {0: "local", 1: "peer:0"})


@timeout
def test_two_ranks_per_node_recover_from_the_loss_of_a_node_exactly(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job, "cluster.ranks_per_node=2", "backend=replicated", *hardware_failure_of(1)
    )
    assert summary["state_digest"] == reference.digest(STEPS, "cluster.ranks_per_node=2")
    rec = only_recovery(summary, "hardware")
    assert rec["dead_nodes"] == [1]
    # Both ranks of node 1 come back from node 0's memory.
    assert_restored_from(rec, {0: "local", 1: "local", 2: "peer:0", 3: "peer:0"})


@timeout
def test_a_kill_during_a_snapshot_lands_in_the_next_snapshot_of_a_sparser_cadence(
    reference: References, run_job: RunJob
) -> None:
    # Armed at step 4 while every third step is checkpointed: the kill lands
    # in the snapshot of step 6, so step 3's slot is the newest complete one.
    summary, _ = job(
        run_job,
        "backend=memory",
        "backend.every_n=3",
        "failure=kill_during_snapshot",
        "failure.at_step=4",
        "failure.node=1",
    )
    assert summary["state_digest"] == reference.digest()
    rec = only_recovery(summary, "software")
    # The trainer records its own injection (only it knows when it is mid-copy).
    (fired,) = rec["injected"]
    assert fired["kind"] == "kill_during_snapshot" and fired["step"] == 6
    assert rec["failed_ranks"] == [1]
    assert rec["restored_step"] == 3
