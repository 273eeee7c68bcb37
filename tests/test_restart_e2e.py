"""How a failed generation comes back: survivors in place, lost nodes onto standbys.

``cluster.restart=in_place`` (the default) keeps every surviving trainer
process: it leaves the failed step, tears its process group down and is
handed the next generation. ``cluster.standby_nodes`` (1 by default) are
nodes started warm with the job; a lost node's index is taken over by one and
the pool is refilled. Each path must still end bitwise where the failure-free
run ends (the references of tests/test_recovery_e2e.py), and say in its
recovery record how every rank came back.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_recovery_e2e import (
    AT_STEP,
    NODES,
    References,
    RunJob,
    job,
    only_recovery,
)

pytestmark = pytest.mark.usefixtures("no_leftovers")

slow = pytest.mark.slow
timeout = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(tmp_path_factory.mktemp("reference"))


def restarts(rec: dict[str, Any]) -> dict[int, str]:
    return {int(r): how for r, how in rec["rank_restart"].items()}


@timeout
def test_survivors_of_a_software_failure_restart_in_place_and_end_exact(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job,
        "backend=replicated",
        "failure=software_once",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
    )
    assert summary["state_digest"] == reference.digest()
    rec = only_recovery(summary, "software")
    # Rank 1 was killed: its node's warm spare took its place; rank 0 lived
    # through it and came back in the same process, from its own memory.
    assert restarts(rec) == {0: "in_place", 1: "spare"}
    assert rec["in_place_ranks"] == [0]
    # Both loaded into a model they held: the survivor's own, the spare's prebuilt.
    assert rec["model_reused_ranks"] == [0, 1]
    assert set(rec["rank_sources"].values()) == {"local"}
    assert rec["takeover_s"] == 0.0


@timeout
def test_a_lost_node_is_taken_over_by_a_warm_standby_and_the_job_ends_exact(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job,
        "backend=replicated",
        "failure=hardware_once",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
    )
    assert summary["state_digest"] == reference.digest()
    rec = only_recovery(summary, "hardware")
    # The standby's pre-started trainer is the lost node's rank; the survivor
    # restarted in place.
    assert restarts(rec) == {0: "in_place", 1: "standby"}
    assert rec["model_reused_ranks"] == [0, 1]
    # The standby had allocated and touched its slots while it waited.
    assert rec["pooled_slot_ranks"] == [1]
    assert rec["rank_sources"]["1"] == "peer:0"
    assert rec["takeover_s"] > 0
    layout = summary["cluster_layout"]
    assert layout["standby_nodes"] == 1
    assert [(t["node"], t["standby"]) for t in layout["takeovers"]] == [(1, 0)]


# -- slow ----------------------------------------------------------------------------
@slow
@timeout
def test_two_hardware_failures_use_the_standby_and_then_its_refill(
    reference: References, run_job: RunJob
) -> None:
    # The second failure hits the node the first standby became: the pool was
    # refilled after the first takeover, so the second is a standby's too.
    summary, _ = job(
        run_job,
        "backend=replicated",
        "failure=hardware_once",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
        "failure.then=hardware",
        "failure.then_node=1",
        "failure.then_after_steps=2",
        steps=16,
    )
    assert summary["state_digest"] == reference.digest(16)
    recs = summary["recoveries"]
    assert [r["kind"] for r in recs] == ["hardware", "hardware"]
    for rec in recs:
        assert restarts(rec) == {0: "in_place", 1: "standby"}
    takeovers = summary["cluster_layout"]["takeovers"]
    assert [(t["node"], t["standby"]) for t in takeovers] == [(1, 0), (1, 1)]


@slow
@timeout
def test_with_no_standby_a_lost_node_restarts_afresh_and_ends_exact(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job,
        "backend=replicated",
        "failure=hardware_once",
        f"failure.at_step={AT_STEP}",
        "failure.node=0",
        "cluster.standby_nodes=0",
        "cluster.warm_spares=false",
    )
    assert summary["state_digest"] == reference.digest()
    rec = only_recovery(summary, "hardware")
    assert restarts(rec) == {0: "fresh", 1: "in_place"}
    assert [t["standby"] for t in summary["cluster_layout"]["takeovers"]] == [None]


@slow
@timeout
@pytest.mark.parametrize("backend", ["memory", "disk"])
def test_restart_by_process_replaces_every_trainer_and_ends_exact(
    backend: str, reference: References, run_job: RunJob
) -> None:
    # The comparison setting: every rank of the next generation is a new process.
    summary, _ = job(
        run_job,
        f"backend={backend}",
        "failure=software_once",
        f"failure.at_step={AT_STEP}",
        "failure.node=0",
        "cluster.restart=process",
        "cluster.warm_spares=false",
    )
    assert summary["state_digest"] == reference.digest()
    rec = only_recovery(summary, "software")
    assert set(restarts(rec).values()) == {"fresh"}
    assert rec["in_place_ranks"] == []
    assert len(rec["rank_restart"]) == NODES
