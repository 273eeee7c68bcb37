"""The recovery planner (``gemini.recovery.plan_recovery``): a pure function, no cluster.

It decides the one step every rank resumes from and, per rank, where that
step is read from: its own node's memory, a holder's memory, or storage.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini.lineage import Timeline
from gemini.recovery import MILESTONES, PHASES, Plan, plan_recovery, restart_phases

# 4 nodes x 1 rank: rank r lives on node r.
FOUR = {r: r for r in range(4)}


def group_memory(steps: list[int], dead: tuple[int, ...] = ()) -> dict[int, dict[int, list[int]]]:
    """Inventory of m=2 group placement on 4 nodes ({0,1}, {2,3}) with ``dead`` nodes gone."""
    partner = {0: 1, 1: 0, 2: 3, 3: 2}
    return {
        node: {node: list(steps), partner[node]: list(steps)}
        for node in range(4)
        if node not in dead
    }


def kinds(plan: Plan) -> dict[int, str]:
    return {r: s["kind"] for r, s in plan.sources.items()}


def test_all_ranks_resume_from_the_newest_step_that_every_rank_has() -> None:
    memory = {0: {0: [7, 6]}, 1: {1: [6, 5]}, 2: {2: [7, 6]}, 3: {3: [7, 6]}}
    plan = plan_recovery(FOUR, memory, storage=[])
    assert plan.step == 6
    assert kinds(plan) == {r: "local" for r in range(4)}
    assert "6" in plan.reason


def test_a_software_failure_restores_every_rank_from_its_own_memory() -> None:
    plan = plan_recovery(FOUR, group_memory([9, 8]), storage=[4])
    assert plan.step == 9
    assert plan.sources == {r: {"kind": "local", "node": r, "generation": 0} for r in range(4)}
    assert plan.source_counts() == {"local": 4}


def test_a_lost_node_is_restored_from_a_peer_before_storage() -> None:
    plan = plan_recovery(FOUR, group_memory([9, 8], dead=(1,)), storage=[9])
    assert plan.step == 9
    assert plan.sources[1] == {"kind": "peer", "node": 0, "generation": 0}
    assert kinds(plan) == {0: "local", 1: "peer", 2: "local", 3: "local"}
    assert plan.source_counts() == {"local": 3, "peer": 1}


def test_local_memory_is_preferred_over_a_peer_and_storage_for_the_same_step() -> None:
    memory = {0: {0: [3], 1: [3]}, 1: {1: [3], 0: [3]}}
    plan = plan_recovery({0: 0, 1: 1}, memory, storage=[3])
    assert plan.sources == {
        0: {"kind": "local", "node": 0, "generation": 0},
        1: {"kind": "local", "node": 1, "generation": 0},
    }


def test_among_several_holders_the_lowest_node_is_chosen() -> None:
    # Ring m=3: rank 0 is held by nodes 1 and 2; node 0 is gone.
    memory = {1: {1: [5], 0: [5]}, 2: {2: [5], 0: [5], 1: [5]}, 3: {3: [5], 2: [5]}}
    plan = plan_recovery(FOUR, memory, storage=[])
    assert plan.step == 5
    assert plan.sources[0] == {"kind": "peer", "node": 1, "generation": 0}


def test_a_rank_with_no_copy_of_the_newest_step_forces_an_older_common_step() -> None:
    # Node 1 was lost; its holder (node 0) had received step 8 but not yet step 9.
    memory = {0: {0: [9, 8], 1: [8, 7]}, 2: {2: [9, 8], 3: [9, 8]}, 3: {3: [9, 8], 2: [9, 8]}}
    plan = plan_recovery(FOUR, memory, storage=[])
    assert plan.step == 8
    assert plan.sources[1] == {"kind": "peer", "node": 0, "generation": 0}
    assert all(s["kind"] == "local" for r, s in plan.sources.items() if r != 1)


def test_a_rank_with_no_copy_in_memory_falls_back_to_storage_for_everyone() -> None:
    # Nodes 0 and 1 (a whole m=2 group) lost together: ranks 0 and 1 exist
    # only on storage, at a step the survivors no longer hold in memory.
    plan = plan_recovery(FOUR, group_memory([12, 11], dead=(0, 1)), storage=[10, 5])
    assert plan.step == 10
    assert plan.source_counts() == {"storage": 4}
    assert all(s == {"kind": "storage", "node": -1, "generation": 0} for s in plan.sources.values())


def test_storage_serves_only_the_ranks_memory_cannot() -> None:
    memory = {2: {2: [10], 3: [10]}, 3: {3: [10], 2: [10]}}
    plan = plan_recovery(FOUR, memory, storage=[10])
    assert plan.step == 10
    assert kinds(plan) == {0: "storage", 1: "storage", 2: "local", 3: "local"}


def test_nothing_anywhere_restarts_every_rank_from_scratch() -> None:
    plan = plan_recovery(FOUR, {}, storage=[])
    assert plan.step == 0
    assert plan.sources == {r: {"kind": "scratch", "node": -1} for r in range(4)}
    assert "step 0" in plan.reason
    assert plan.to_json()["start_step"] == 0


def test_no_step_common_to_all_ranks_restarts_from_scratch() -> None:
    memory = {0: {0: [4]}, 1: {1: [3]}}
    plan = plan_recovery({0: 0, 1: 1}, memory, storage=[])
    assert plan.step == 0
    assert plan.source_counts() == {"scratch": 2}


def test_an_excluded_source_is_skipped_for_the_next_holder_of_the_same_step() -> None:
    memory = {1: {1: [5], 0: [5]}, 2: {2: [5], 0: [5], 1: [5]}, 3: {3: [5], 2: [5]}}
    plan = plan_recovery(FOUR, memory, storage=[], excluded=[(0, 5, "peer", 1)])
    assert plan.step == 5
    assert plan.sources[0] == {"kind": "peer", "node": 2, "generation": 0}


def test_excluding_the_only_copy_of_a_step_falls_back_to_an_older_step() -> None:
    memory = {0: {0: [6, 5], 1: [6, 5]}, 1: {1: [6, 5], 0: [6, 5]}}
    plan = plan_recovery({0: 0, 1: 1}, memory, storage=[], excluded=[(1, 6, "local", 1)])
    # Rank 1's step 6 is still held by node 0: a peer copy of the same step wins
    # over rolling everyone back.
    assert plan.step == 6
    assert plan.sources[1] == {"kind": "peer", "node": 0, "generation": 0}
    bad = [(1, 6, "local", 1), (1, 6, "peer", 0)]
    plan = plan_recovery({0: 0, 1: 1}, memory, storage=[], excluded=bad)
    assert plan.step == 5
    assert plan.sources == {
        0: {"kind": "local", "node": 0, "generation": 0},
        1: {"kind": "local", "node": 1, "generation": 0},
    }


def test_an_excluded_storage_step_is_not_planned() -> None:
    plan = plan_recovery({0: 0}, {}, storage=[8, 4], excluded=[(0, 8, "storage", -1)])
    assert plan.step == 4
    assert plan.sources == {0: {"kind": "storage", "node": -1, "generation": 0}}


def test_inventory_of_ranks_outside_the_job_is_ignored() -> None:
    memory = {0: {0: [3], 7: [9]}, 1: {1: [3]}}
    plan = plan_recovery({0: 0, 1: 1}, memory, storage=[])
    assert plan.step == 3
    assert set(plan.sources) == {0, 1}


def test_a_job_without_ranks_plans_nothing() -> None:
    plan = plan_recovery({}, {}, storage=[3])
    assert plan.step == 0 and plan.sources == {}


def test_plan_json_carries_step_sources_and_reason() -> None:
    plan = plan_recovery(FOUR, group_memory([4], dead=(3,)), storage=[])
    js = plan.to_json()
    assert js["start_step"] == 4
    assert js["sources"]["3"] == {"kind": "peer", "node": 2, "generation": 0}
    assert set(js["sources"]) == {"0", "1", "2", "3"}
    assert js["reason"] == plan.reason


# -- timelines: what a rollback abandoned is never planned ----------------------
def rolled_back() -> Timeline:
    """Generation 1 trained to step 9 and failed; generation 2 restored step 4 from storage."""
    return Timeline({1: 0, 2: 4})


def test_a_newer_step_left_by_an_abandoned_timeline_is_never_planned() -> None:
    # Generation 2 rolled back to step 4 and reached step 6; the survivors
    # still hold generation 1's steps 9 and 8, which the current timeline never
    # reached. Without the generation tags they would be the newest common step.
    memory = {n: {n: [(9, 1), (6, 2)]} for n in range(4)}
    plan = plan_recovery(FOUR, memory, storage=[(4, 1)], failed_step=6, timeline=rolled_back())
    assert plan.step == 6
    assert all(s["generation"] == 2 for s in plan.sources.values())
    assert plan.lost_steps == 0


def test_a_stale_step_at_or_below_the_failed_step_is_still_refused() -> None:
    # Generation 1's step 6 is as new as generation 2's, but it is not the
    # state generation 2 trained from step 4: only generation 2's copy counts.
    memory = {0: {0: [(6, 1), (5, 2)]}, 1: {1: [(6, 2), (5, 2)]}}
    plan = plan_recovery({0: 0, 1: 1}, memory, storage=[], failed_step=6, timeline=rolled_back())
    assert plan.step == 5
    assert plan.lost_steps == 1


def test_steps_the_abandoned_timeline_shares_with_the_current_one_stay_usable() -> None:
    memory = {n: {n: [(9, 1), (3, 1)]} for n in range(4)}
    plan = plan_recovery(FOUR, memory, storage=[], failed_step=5, timeline=rolled_back())
    assert plan.step == 3
    assert plan.sources[0] == {"kind": "local", "node": 0, "generation": 1}
    assert plan.lost_steps == 2


def test_no_step_above_the_failed_step_is_planned_even_untagged() -> None:
    memory = {n: {n: [9, 7]} for n in range(4)}
    plan = plan_recovery(FOUR, memory, storage=[8], failed_step=7)
    assert plan.step == 7
    assert plan.lost_steps == 0
    plan = plan_recovery(FOUR, memory, storage=[8, 2], failed_step=6)
    assert plan.step == 2 and plan.lost_steps == 4


def test_lost_steps_is_exact_not_clamped() -> None:
    memory = {n: {n: [(5, 1)]} for n in range(4)}
    assert plan_recovery(FOUR, memory, storage=[], failed_step=8).lost_steps == 3
    assert plan_recovery(FOUR, {}, storage=[], failed_step=8).lost_steps == 8
    assert plan_recovery(FOUR, memory, storage=[]).lost_steps is None


def test_a_restart_from_scratch_abandons_everything_before_it() -> None:
    line = Timeline({1: 0, 2: 0})
    assert not line.valid(1, 1)
    assert line.valid(1, 2) and line.valid(0, 1)
    memory = {n: {n: [(4, 1)]} for n in range(4)}
    assert plan_recovery(FOUR, memory, storage=[(4, 1)], timeline=line).step == 0


def test_a_timeline_is_rebuilt_from_the_published_plans() -> None:
    line = Timeline.from_plans({1: {"start_step": 0}, 2: {"start_step": 7}, 3: {"start_step": 5}})
    assert line.valid(5, 1) and not line.valid(6, 1) and not line.valid(6, 2)
    assert line.valid(9, 3)
    with pytest.raises(ValueError, match="generation 2"):
        line.add(2, 6)


# -- properties over random inventories -------------------------------------------
Inventory = tuple[dict[int, int], dict[int, dict[int, list[int]]], list[int]]
"""rank -> node, live node -> {source rank: verified steps}, storage steps."""
_steps = st.lists(st.integers(min_value=1, max_value=6), max_size=3, unique=True)


@st.composite
def inventories(draw: st.DrawFn) -> Inventory:
    nodes = draw(st.integers(min_value=1, max_value=4))
    rank_node = {r: r for r in range(nodes)}
    live = draw(st.lists(st.sampled_from(range(nodes)), unique=True))
    memory = {
        n: draw(st.dictionaries(st.sampled_from(range(nodes)), _steps, max_size=nodes))
        for n in live
    }
    storage = draw(_steps)
    return rank_node, memory, storage


def available(
    rank: int,
    step: int,
    rank_node: Mapping[int, int],
    memory: Mapping[int, Mapping[int, list[int]]],
    storage: list[int],
) -> set[str]:
    out = {"storage"} if step in storage else set()
    for holder, per in memory.items():
        if step in per.get(rank, []):
            out.add("local" if rank_node[rank] == holder else "peer")
    return out


@settings(max_examples=300, deadline=None)
@given(inventories())
def test_the_plan_is_the_newest_common_step_with_the_best_source_per_rank(
    inv: Inventory,
) -> None:
    rank_node, memory, storage = inv
    plan = plan_recovery(rank_node, memory, storage)
    common = [
        s
        for s in range(1, 7)
        if all(available(r, s, rank_node, memory, storage) for r in rank_node)
    ]
    assert plan.step == max(common, default=0)
    if plan.step == 0:
        assert all(s["kind"] == "scratch" for s in plan.sources.values())
        return
    rank_of = {"local": 0, "peer": 1, "storage": 2}
    for r, src in plan.sources.items():
        have = available(r, plan.step, rank_node, memory, storage)
        assert src["kind"] in have
        assert rank_of[src["kind"]] == min(rank_of[k] for k in have)
        if src["kind"] != "storage":
            assert plan.step in memory[src["node"]][r]


@st.composite
def timelines(draw: st.DrawFn) -> tuple[Timeline, list[tuple[int, int]]]:
    """Generations 1..g with random starts, and random (step, generation) copies."""
    gens = draw(st.integers(min_value=1, max_value=4))
    starts = {1: 0, **{g: draw(st.integers(min_value=0, max_value=6)) for g in range(2, gens + 1)}}
    copies = draw(
        st.lists(
            st.tuples(st.integers(min_value=1, max_value=8), st.integers(1, gens)),
            max_size=6,
            unique=True,
        )
    )
    return Timeline(starts), copies


@settings(max_examples=300, deadline=None)
@given(timelines(), st.integers(min_value=0, max_value=8))
def test_the_plan_stays_on_the_timeline_and_below_the_failed_step(
    drawn: tuple[Timeline, list[tuple[int, int]]], failed_step: int
) -> None:
    line, copies = drawn
    memory = {n: {n: copies} for n in range(2)}
    plan = plan_recovery(
        {0: 0, 1: 1}, memory, storage=copies, failed_step=failed_step, timeline=line
    )
    assert 0 <= plan.step <= failed_step
    assert plan.lost_steps == failed_step - plan.step
    usable = [s for s, g in copies if s <= failed_step and line.valid(s, g)]
    assert plan.step == max(usable, default=0)
    for src in plan.sources.values():
        if plan.step:
            assert line.valid(plan.step, src["generation"])


def test_restart_phases_follow_the_slowest_rank_and_add_up() -> None:
    # Rank 0 restores from local memory and then waits in the warm-up
    # collective for rank 1, which fetches from a peer: that wait is rank 1's
    # retrieval, not rank 0's load, and must not be counted twice.
    readies = {
        0: {
            "t_rdzv_start": 10.0,
            "t_rdzv_end": 11.0,
            "t_retrieve_start": 11.5,
            "t_retrieve_end": 11.6,
            "t": 13.0,
        },
        1: {
            "t_rdzv_start": 10.2,
            "t_rdzv_end": 11.0,
            "t_retrieve_start": 11.8,
            "t_retrieve_end": 12.8,
            "t": 13.0,
        },
    }
    ph = restart_phases(9.0, readies)
    assert ph == pytest.approx(
        {
            "takeover_s": 0.0,
            "restart_s": 2.0,
            "rendezvous_s": 0.8,
            "alloc_s": 0.0,
            "retrieve_s": 1.0,
            "load_s": 0.2,
        }
    )
    assert sum(ph.values()) == pytest.approx(13.0 - 9.0)
    assert set(MILESTONES) == set(readies[0]) | {"t_alloc_start", "t_alloc_end"}


def test_alloc_is_its_own_phase_cut_from_the_restart() -> None:
    # Both ranks map their slots after the rendezvous; rank 1's holder was a
    # replaced node whose agent the root waited 0.7 s for before launching.
    readies = {
        0: {"t_rdzv_start": 10.0, "t_rdzv_end": 11.0, "t_alloc_start": 11.2,
            "t_alloc_end": 11.3, "t_retrieve_start": 11.4, "t_retrieve_end": 11.5, "t": 12.0},
        1: {"t_rdzv_start": 10.2, "t_rdzv_end": 11.0, "t_alloc_start": 11.2,
            "t_alloc_end": 11.6, "t_retrieve_start": 11.7, "t_retrieve_end": 11.9, "t": 12.0},
    }  # fmt: skip
    ph = restart_phases(8.0, readies, alloc_before_s=0.7)
    # restart: 8.0 -> 10.2 less the 0.7 s of allocation, + 11.0 -> 11.2, + 11.6 -> 11.7
    assert ph == pytest.approx(
        {
            "takeover_s": 0.0,
            "restart_s": 1.8,
            "rendezvous_s": 0.8,
            "alloc_s": 1.1,
            "retrieve_s": 0.2,
            "load_s": 0.1,
        }
    )
    assert sum(ph.values()) == pytest.approx(12.0 - 8.0)
    assert set(PHASES) >= set(ph)
    # The root's wait can never be longer than the span it is cut from.
    assert restart_phases(8.0, readies, alloc_before_s=99.0)["restart_s"] == pytest.approx(0.3)
    # A standby's takeover the root waited 0.5 s for is cut from the restart too.
    took = restart_phases(8.0, readies, alloc_before_s=0.7, takeover_s=0.5)
    assert (took["takeover_s"], took["restart_s"]) == pytest.approx((0.5, 1.3))
    assert sum(took.values()) == pytest.approx(12.0 - 8.0)


def test_restart_phases_of_a_restart_from_scratch_have_no_retrieval() -> None:
    readies = {0: {"t_rdzv_start": 5.0, "t_rdzv_end": 5.5, "t": 7.0}}
    ph = restart_phases(4.0, readies)
    assert ph == pytest.approx(
        {
            "takeover_s": 0.0,
            "restart_s": 2.5,
            "rendezvous_s": 0.5,
            "alloc_s": 0.0,
            "retrieve_s": 0.0,
            "load_s": 0.0,
        }
    )
    assert restart_phases(4.0, {}) == {
        "takeover_s": 0.0,
        "restart_s": 0.0,
        "rendezvous_s": 0.0,
        "alloc_s": 0.0,
        "retrieve_s": 0.0,
        "load_s": 0.0,
    }
