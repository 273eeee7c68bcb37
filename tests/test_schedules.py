"""Failure schedules: shape of each, determinism per seed, arrival statistics, validation."""

from __future__ import annotations

import itertools
import json
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini.schedules import (
    FAILURE_KINDS,
    SCHEDULES,
    FailureEvent,
    ScheduleError,
    build_schedule,
)


def groups_of(m: int, nodes: int) -> dict[int, list[int]]:
    """Disjoint groups of m consecutive nodes, as group placement makes when m | N."""
    return {n: list(range(n - n % m, n - n % m + m)) for n in range(nodes)}


def build(name: str, **kw: object) -> list[FailureEvent]:
    """A schedule with every argument the named one needs."""
    args: dict[str, object] = {"nodes": 8, "steps": 100, "seed": 0}
    if name in ("poisson", "weibull"):
        args["horizon_s"] = 3600.0
    if name == "two_in_group":
        args["group_of"] = groups_of(2, 8).__getitem__
    args.update(kw)
    return build_schedule(name, **args)  # type: ignore[arg-type]


# -- determinism -----------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_one_seed_gives_the_identical_schedule(name: str) -> None:
    a, b = build(name, seed=7), build(name, seed=7)
    assert a == b
    assert json.dumps([e.to_dict() for e in a]) == json.dumps([e.to_dict() for e in b])


@pytest.mark.parametrize("name", [s for s in SCHEDULES if s != "none"])
def test_different_seeds_give_different_schedules(name: str) -> None:
    schedules = {tuple(build(name, seed=seed)) for seed in range(10)}
    assert len(schedules) > 1


def test_schedule_does_not_depend_on_global_random_state() -> None:
    import random

    random.seed(1)
    a = build("poisson", seed=3)
    random.seed(2)
    assert build("poisson", seed=3) == a


# -- shapes ----------------------------------------------------------------


def test_none_is_empty() -> None:
    assert build("none") == []


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("software_once", "software"),
        ("hardware_once", "hardware"),
        ("kill_during_snapshot", "kill_during_snapshot"),
        ("corruption", "corruption"),
        ("hang_once", "hang"),
    ],
)
def test_one_off_schedules_hit_one_node_at_one_step(name: str, kind: str) -> None:
    (event,) = build(name, at_step=40, node=2)
    assert event == FailureEvent(kind, (2,), 40, None)
    assert event.describe().startswith(f"{kind} on node 2")
    assert event.describe().endswith("at step 40")


def test_a_follow_up_fires_after_the_recovery_counting_from_the_restored_step() -> None:
    plain = build("two_in_group", at_step=30, node=2)
    events = build("two_in_group", at_step=30, node=2, then="kill_during_snapshot", then_node=5)
    # The follow-up is appended; the rest of the schedule is untouched.
    assert events[:-1] == plain
    follow = events[-1]
    assert follow == FailureEvent("kill_during_snapshot", (5,), 2, None, 0, after_recovery=True)
    assert FailureEvent.from_dict(follow.to_dict()) == follow
    assert "2 steps after the previous recovery" in follow.describe()
    drawn = {build("hardware_once", seed=s, then="software")[-1].nodes for s in range(20)}
    assert len(drawn) > 1  # a seeded node when none is pinned
    assert build("hardware_once", then="none") == build("hardware_once")


@pytest.mark.parametrize(
    ("name", "kw", "key"),
    [
        ("hardware_once", {"then": "root_loss"}, "failure.then"),
        ("none", {"then": "hardware"}, "failure.then"),
        ("poisson", {"then": "hardware"}, "failure.then"),
        ("hardware_once", {"then": "software", "then_after_steps": 0}, "failure.then_after_steps"),
        ("hardware_once", {"then": "software", "then_node": 8}, "failure.node"),
    ],
)
def test_a_bad_follow_up_is_refused_naming_the_key(
    name: str, kw: dict[str, object], key: str
) -> None:
    with pytest.raises(ScheduleError) as info:
        build(name, **kw)
    assert info.value.key == key


def test_describe_reads_like_a_log_line() -> None:
    assert FailureEvent("hardware", (2,), 40, None).describe() == "hardware on node 2 at step 40"
    assert FailureEvent("hardware", (4, 5), None, 12.25).describe() == (
        "hardware on nodes 4, 5 at 12.2 s"
    )
    assert FailureEvent("software", (1,), 3, None, 2).describe() == (
        "software on node 1 (local rank 2) at step 3"
    )


def test_root_loss_hits_the_root_agent_not_a_node() -> None:
    (event,) = build("root_loss", at_step=10)
    assert event.kind == "root_loss" and event.nodes == () and event.at_step == 10
    assert "root agent" in event.describe()


@pytest.mark.parametrize("steps", [2, 3, 4, 10, 100, 1001])
def test_default_step_is_in_the_middle_half_of_training(steps: int) -> None:
    for seed in range(30):
        (event,) = build("hardware_once", steps=steps, seed=seed)
        assert event.at_step is not None
        assert 1 <= event.at_step <= steps - 1
        if steps >= 8:
            assert steps // 4 <= event.at_step <= 3 * steps // 4


def test_default_node_is_drawn_over_the_whole_cluster() -> None:
    drawn = {build("hardware_once", seed=s)[0].nodes[0] for s in range(200)}
    assert drawn == set(range(8))


def test_software_failure_kills_the_chosen_local_rank_only() -> None:
    (sw,) = build("software_once", rank_in_node=3)
    (hw,) = build("hardware_once", rank_in_node=3)
    assert sw.rank_in_node == 3 and hw.rank_in_node == 0


def test_a_hang_stops_the_chosen_local_rank_only() -> None:
    (event,) = build("hang_once", rank_in_node=1, at_step=7, node=0)
    assert event == FailureEvent("hang", (0,), 7, None, 1)
    assert event.describe() == "hang on node 0 (local rank 1) at step 7"


def test_correlated_hits_k_consecutive_nodes_at_once() -> None:
    for seed in range(50):
        (event,) = build("correlated", k=3, seed=seed)
        first = event.nodes[0]
        assert event.nodes == (first, first + 1, first + 2)
        assert event.nodes[-1] < 8
        assert event.kind == "hardware"


def test_correlated_honours_a_pinned_first_node_and_kind() -> None:
    (event,) = build("correlated", k=2, node=6, kind="software", at_step=5)
    assert event == FailureEvent("software", (6, 7), 5, None)


def test_two_in_group_hits_two_members_of_one_group() -> None:
    groups = groups_of(4, 8)
    seen = set()
    for seed in range(100):
        (event,) = build("two_in_group", group_of=groups.__getitem__, seed=seed)
        a, b = event.nodes
        assert a < b and b in groups[a]
        seen.add(event.nodes)
    # Both groups and several pairs inside them come up across seeds.
    assert {groups[a][0] for a, _ in seen} == {0, 4}
    assert len(seen) > 4


def test_two_in_group_with_a_pinned_node_pairs_it_with_a_group_mate() -> None:
    groups = groups_of(2, 8)
    (event,) = build("two_in_group", group_of=groups.__getitem__, node=5)
    assert event.nodes == (4, 5)


def test_two_in_group_skips_groups_too_small_to_lose_two() -> None:
    # Mixed placement shape: a singleton beside a group of three.
    groups = {0: [0], 1: [1, 2, 3], 2: [1, 2, 3], 3: [1, 2, 3]}
    for seed in range(20):
        (event,) = build("two_in_group", nodes=4, group_of=groups.__getitem__, seed=seed)
        assert set(event.nodes) <= {1, 2, 3}


def test_two_in_group_refuses_a_placement_without_a_pair() -> None:
    with pytest.raises(ScheduleError, match="2 members"):
        build("two_in_group", nodes=3, group_of=lambda n: [n])


def test_two_in_group_needs_the_placement() -> None:
    with pytest.raises(ScheduleError, match="group_of"):
        build_schedule("two_in_group", nodes=4, steps=10, seed=0)


# -- random arrivals -------------------------------------------------------


@pytest.mark.parametrize("name", ["poisson", "weibull"])
def test_arrivals_are_ordered_within_the_horizon_and_capped(name: str) -> None:
    events = build(name, mtbf_s=60.0, horizon_s=3600.0, max_events=8)
    assert len(events) == 8
    times = [e.at_time_s for e in events]
    assert all(t is not None for t in times)
    assert times == sorted(times)  # type: ignore[type-var]
    assert all(e.at_step is None and len(e.nodes) == 1 for e in events)
    few = build(name, mtbf_s=600.0, horizon_s=60.0, max_events=8)
    assert all(e.at_time_s is not None and e.at_time_s <= 60.0 for e in few)


@pytest.mark.parametrize("name", ["poisson", "weibull"])
def test_mean_inter_arrival_is_mtbf(name: str) -> None:
    mtbf = 600.0
    gaps: list[float] = []
    for seed in range(100):
        events = build(name, seed=seed, mtbf_s=mtbf, horizon_s=1e9, max_events=200)
        times = [0.0] + [e.at_time_s for e in events if e.at_time_s is not None]
        gaps.extend(b - a for a, b in itertools.pairwise(times))
    assert len(gaps) == 20_000
    # Standard error of the mean is mtbf * cv / sqrt(n): 0.7% for the
    # exponential (cv = 1), ~1% for Weibull(0.7) (cv ~ 1.46); allow 5 sigma.
    assert statistics.fmean(gaps) == pytest.approx(mtbf, rel=0.05)


def test_poisson_inter_arrivals_are_memoryless() -> None:
    # Exponential: the coefficient of variation is 1; Weibull(0.7) is burstier.
    def cv(name: str) -> float:
        events = build(name, seed=1, mtbf_s=1.0, horizon_s=1e9, max_events=20_000)
        times = [0.0] + [e.at_time_s for e in events if e.at_time_s is not None]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return statistics.pstdev(gaps) / statistics.fmean(gaps)

    assert cv("poisson") == pytest.approx(1.0, abs=0.05)
    assert cv("weibull") > 1.3


def test_arrivals_spread_over_the_nodes() -> None:
    events = build("poisson", mtbf_s=1.0, horizon_s=1e6, max_events=400)
    assert {e.nodes[0] for e in events} == set(range(8))


def test_arrivals_need_a_horizon() -> None:
    with pytest.raises(ScheduleError, match=r"failure.horizon_s"):
        build_schedule("poisson", nodes=4, steps=10, seed=0)


# -- events ----------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    name=st.sampled_from(SCHEDULES),
    pairs=st.integers(1, 32),
    steps=st.integers(2, 10_000),
    seed=st.integers(0, 2**32),
)
def test_every_event_round_trips_and_stays_in_range(
    name: str, pairs: int, steps: int, seed: int
) -> None:
    nodes = 2 * pairs
    groups = groups_of(2, nodes)
    events = build(name, nodes=nodes, steps=steps, seed=seed, group_of=groups.__getitem__)
    for e in events:
        assert FailureEvent.from_dict(json.loads(json.dumps(e.to_dict()))) == e
        assert e.kind in FAILURE_KINDS
        assert all(0 <= n < nodes for n in e.nodes)
        if e.at_step is not None:
            assert 1 <= e.at_step <= steps - 1


def test_event_needs_exactly_one_trigger() -> None:
    with pytest.raises(ScheduleError, match="exactly one"):
        FailureEvent("hardware", (0,), 3, 1.0)
    with pytest.raises(ScheduleError, match="exactly one"):
        FailureEvent("hardware", (0,), None, None)


def test_event_refuses_an_unknown_kind_and_a_rootless_root_loss() -> None:
    with pytest.raises(ScheduleError, match=r"failure.kind"):
        FailureEvent("meteor", (0,), 3, None)
    with pytest.raises(ScheduleError, match="root agent"):
        FailureEvent("root_loss", (0,), 3, None)
    with pytest.raises(ScheduleError, match="root agent"):
        FailureEvent("hardware", (), 3, None)


# -- validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kw", "key"),
    [
        ("earthquake", {}, "failure.name"),
        ("hardware_once", {"node": 8}, "failure.node"),
        ("hardware_once", {"node": -1}, "failure.node"),
        ("hardware_once", {"at_step": 0}, "failure.at_step"),
        ("hardware_once", {"at_step": 100}, "failure.at_step"),
        ("hardware_once", {"steps": 1}, "train.steps"),
        ("correlated", {"k": 9}, "failure.k"),
        ("correlated", {"k": 0}, "failure.k"),
        ("correlated", {"k": 3, "node": 6}, "failure.node"),
        ("poisson", {"mtbf_s": 0.0}, "failure.mtbf_s"),
        ("weibull", {"mtbf_s": -1.0}, "failure.mtbf_s"),
        ("weibull", {"weibull_shape": 0.0}, "failure.weibull_shape"),
        ("poisson", {"max_events": 0}, "failure.max_events"),
        ("poisson", {"horizon_s": math.nan}, "failure.horizon_s"),
        ("poisson", {"kind": "meteor"}, "failure.kind"),
        ("hardware_once", {"nodes": 0}, "cluster.nodes"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(
    name: str, kw: dict[str, object], key: str
) -> None:
    with pytest.raises(ScheduleError) as err:
        build(name, **kw)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}=")
    assert "\n" not in str(err.value)


def test_unused_k_does_not_refuse_a_one_node_run() -> None:
    assert build("hardware_once", nodes=1, k=2)[0].nodes == (0,)
