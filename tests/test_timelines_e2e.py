"""A rollback abandons a timeline: its newer copies must never be used, nor cost a slot.

Real jobs on four nodes (``replicated``, m=2, groups {0,1} and {2,3}). A whole
group is lost, and with it every copy of ranks 0 and 1: recovery rolls every
rank back, while nodes 2 and 3 still hold newer local and replica copies of
the timeline just abandoned. Two steps into the new timeline rank 2 is killed
half-way through a snapshot (``failure.then``). Its other slot must hold the
step before — the current timeline's, not a stale one that pushed it out — so
recovery reads every rank from its own memory, written by the new generation,
and the job ends in the failure-free run's state.

The rollback goes either to step 0 (no persistent tier) or to the newest step
on storage: the tier persists every ``backend.persist_every_n`` steps, fixed in
advance, so where the persisted and the stale steps lie does not depend on how
fast this machine trains (``persist_every_s`` would make it a step count
measured at run time). Dropping abandoned steps from storage itself is tested
on ``DiskStore`` (tests/test_disk.py).

Left in place, the stale copies count as the newest in every slot pair they
sit in, so each new step overwrites the current timeline's previous one: rank
2's own slot of the step before the kill is gone when the kill comes, and so
is the copy of rank 3's on node 2.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import compose_config

from gemini.config import to_schema
from gemini.experiment import run

NODES = 4
STEPS = 14
AT_STEP = 8
CLUSTER = (
    "model=gpt_tiny",
    "train.parallel=ddp",
    f"cluster.nodes={NODES}",
    "cluster.ranks_per_node=1",
    "cluster.heartbeat_s=0.5",
    "cluster.missed_beats=4",
    f"train.steps={STEPS}",
)


@pytest.fixture(scope="module")
def reference_digest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The failure-free run's final state, once for every test here."""
    outputs = tmp_path_factory.mktemp("reference")
    cfg = compose_config(
        [*CLUSTER, "backend=none", "failure=none", "tracking=off", "progress=false",
         "cluster.threads_per_rank=1", f"paths.outputs={outputs}"]
    )  # fmt: skip
    summary = run(to_schema(cfg), job_dir=outputs / "job")
    assert summary["outcome"] == "completed" and summary["recoveries"] == []
    return str(summary["state_digest"])


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("no_leftovers")
def test_a_failure_right_after_a_rollback_recovers_on_the_current_timeline_exactly(
    run_job: Any, reference_digest: str
) -> None:
    summary, _ = run_job(
        *CLUSTER,
        "backend=replicated",
        "backend.replication.factor=2",
        "backend.replication.placement=group",
        "backend.persist_every_s=0",
        "failure=two_in_group",
        f"failure.at_step={AT_STEP}",
        "failure.node=0",
        "failure.then=kill_during_snapshot",
        "failure.then_node=2",
        "failure.then_after_steps=2",
    )
    assert summary["outcome"] == "completed", summary["reason"]
    assert summary["state_digest"] == reference_digest
    rollback, again = summary["recoveries"]

    # 1. Both copies of ranks 0 and 1 are gone: every rank starts over.
    assert rollback["kind"] == "hardware" and rollback["dead_nodes"] == [0, 1]
    restored = rollback["restored_step"]
    assert restored == 0 and rollback["source_counts"] == {"scratch": NODES}
    assert rollback["failed_step"] >= AT_STEP
    assert rollback["lost_steps"] == rollback["failed_step"]
    # Nodes 2 and 3 held newer copies (their own and each other's): dropped.
    trimmed = rollback["trimmed"]
    assert set(trimmed) == {"2", "3"}, trimmed
    for node, per_rank in trimmed.items():
        assert set(per_rank) == {"2", "3"}, (node, per_rank)
        assert all(s > restored for steps in per_rank.values() for s in steps)

    # 2. Rank 2 dies writing step 2: its slot of step 1 is intact.
    assert again["kind"] == "software" and again["failed_ranks"] == [2]
    assert again["restored_step"] == 1
    assert again["restored_step"] <= again["failed_step"]
    assert again["lost_steps"] == again["failed_step"] - again["restored_step"]
    assert again["source_counts"] == {"local": NODES}
    # Every copy used was written by the generation the rollback started.
    assert {s["generation"] for s in again["sources"].values()} == {rollback["generation"]}


PERSIST_EVERY = 7
STORAGE_AT_STEP = 9


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("no_leftovers")
def test_a_failure_right_after_a_rollback_to_storage_recovers_on_the_current_timeline(
    run_job: Any, reference_digest: str
) -> None:
    summary, _ = run_job(
        *CLUSTER,
        "backend=replicated",
        "backend.replication.factor=2",
        "backend.replication.placement=group",
        f"backend.persist_every_n={PERSIST_EVERY}",
        "failure=two_in_group",
        f"failure.at_step={STORAGE_AT_STEP}",
        "failure.node=0",
        "failure.then=kill_during_snapshot",
        "failure.then_node=2",
        "failure.then_after_steps=2",
    )
    assert summary["outcome"] == "completed", summary["reason"]
    assert summary["state_digest"] == reference_digest
    rollback, again = summary["recoveries"]

    # 1. Both in-memory copies of ranks 0 and 1 are gone: every rank goes back
    # to the newest persisted step. Step 7 was persisted by every rank before
    # it wrote step 9 (that snapshot reuses the slot the tier reads), and the
    # next one, 14, is the last step.
    assert rollback["kind"] == "hardware" and rollback["dead_nodes"] == [0, 1]
    failed, restored = rollback["failed_step"], rollback["restored_step"]
    assert failed >= STORAGE_AT_STEP
    assert restored == PERSIST_EVERY, rollback["reason"]
    assert rollback["lost_steps"] == failed - restored >= 2
    sources = rollback["sources"]
    assert sources["0"]["kind"] == sources["1"]["kind"] == "storage", sources
    # Nodes 2 and 3 hold their last two steps, both newer: storage for all.
    assert rollback["source_counts"] == {"storage": NODES}, sources
    assert all(s["generation"] < rollback["generation"] for s in sources.values())
    # Their newer copies (their own and each other's) are dropped; storage has
    # nothing newer than the step it restores.
    trimmed = rollback["trimmed"]
    assert set(trimmed) == {"2", "3"}, trimmed
    for node, per_rank in trimmed.items():
        assert set(per_rank) == {"2", "3"}, (node, per_rank)
        assert all(restored < s <= failed for steps in per_rank.values() for s in steps)
    assert rollback["trimmed_storage"] == []

    # 2. Rank 2 dies writing the second step of the new timeline, where stale
    # copies of newer steps lay on nodes 2 and 3: its slot of the step before
    # is the new timeline's, intact.
    assert again["kind"] == "software" and again["failed_ranks"] == [2]
    assert again["restored_step"] == restored + 1
    assert again["restored_step"] <= again["failed_step"]
    assert again["lost_steps"] == again["failed_step"] - again["restored_step"]
    assert again["source_counts"] == {"local": NODES}
    # Every copy used was written by the generation the rollback started.
    assert {s["generation"] for s in again["sources"].values()} == {rollback["generation"]}
