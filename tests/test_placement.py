"""Placement (Algorithm 1) and recovery probability (Corollary 1): pure, fast checks."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemini.checkpoint.placement import (
    PLACEMENTS,
    PlacementError,
    groups,
    held_by,
    holders,
    holders_of_all,
    recovery_probability,
    resolve_placement,
)

# (n, m) layouts covering m = 1, m = n, m | n and m not dividing n.
LAYOUTS = [(1, 1), (4, 1), (4, 4), (5, 5), (6, 2), (7, 2), (7, 3), (8, 3), (16, 2), (10, 4)]


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(("n", "m"), LAYOUTS)
def test_every_node_has_m_minus_1_distinct_other_holders(n: int, m: int, placement: str) -> None:
    for node, hs in holders_of_all(n, m, placement).items():
        assert len(hs) == m - 1
        assert len(set(hs)) == m - 1
        assert node not in hs
        assert all(0 <= h < n for h in hs)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(("n", "m"), LAYOUTS)
def test_held_by_is_the_inverse_of_holders(n: int, m: int, placement: str) -> None:
    table = holders_of_all(n, m, placement)
    for node in range(n):
        stored = held_by(node, n, m, placement)
        assert sorted(stored) == sorted(a for a in range(n) if node in table[a])
        # Balanced: every machine stores exactly m - 1 foreign checkpoints.
        assert len(stored) == m - 1


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_factor_one_keeps_only_the_local_copy(placement: str) -> None:
    assert holders_of_all(5, 1, placement) == {i: [] for i in range(5)}
    assert all(held_by(i, 5, 1, placement) == [] for i in range(5))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_factor_equal_to_nodes_replicates_everywhere(placement: str) -> None:
    for node, hs in holders_of_all(5, 5, placement).items():
        assert sorted(hs) == [i for i in range(5) if i != node]


def test_group_placement_replicates_within_consecutive_groups_nearest_first() -> None:
    assert groups(6, 2, "group") == [[0, 1], [2, 3], [4, 5]]
    assert holders_of_all(6, 2, "group") == {0: [1], 1: [0], 2: [3], 3: [2], 4: [5], 5: [4]}
    assert holders(1, 6, 3, "group") == [2, 0]
    assert holders(4, 6, 3, "group") == [5, 3]


def test_ring_placement_replicates_to_the_next_m_minus_1_machines() -> None:
    assert holders_of_all(5, 3, "ring") == {
        0: [1, 2],
        1: [2, 3],
        2: [3, 4],
        3: [4, 0],
        4: [0, 1],
    }
    assert held_by(0, 5, 3, "ring") == [4, 3]
    assert groups(5, 3, "ring") == []


def test_mixed_placement_enlarges_the_last_group_and_rings_inside_it() -> None:
    # n=7, m=3: one group of 3, then the last group of 3 + 7 % 3 = 4.
    assert groups(7, 3, "mixed") == [[0, 1, 2], [3, 4, 5, 6]]
    assert holders_of_all(7, 3, "mixed") == {
        0: [1, 2],
        1: [2, 0],
        2: [0, 1],
        3: [4, 5],
        4: [5, 6],
        5: [6, 3],
        6: [3, 4],
    }
    assert held_by(3, 7, 3, "mixed") == [6, 5]


def test_group_request_resolves_to_mixed_when_factor_does_not_divide_nodes() -> None:
    assert resolve_placement(8, 2, "group") == "group"
    assert resolve_placement(7, 2, "group") == "mixed"
    assert resolve_placement(7, 2, "mixed") == "mixed"
    assert resolve_placement(8, 2, "ring") == "ring"
    assert groups(7, 2, "group") == groups(7, 2, "mixed") == [[0, 1], [2, 3], [4, 5, 6]]
    assert holders_of_all(7, 2, "group") == holders_of_all(7, 2, "mixed")


def test_mixed_with_factor_dividing_nodes_lays_out_like_group() -> None:
    assert holders_of_all(12, 3, "mixed") == holders_of_all(12, 3, "group")
    assert groups(12, 3, "mixed") == groups(12, 3, "group")


@given(
    st.integers(min_value=1, max_value=40).flatmap(
        lambda n: st.tuples(
            st.just(n), st.integers(min_value=1, max_value=n), st.sampled_from(PLACEMENTS)
        )
    )
)
def test_holders_invariants_hold_for_any_layout(case: tuple[int, int, str]) -> None:
    n, m, placement = case
    table = holders_of_all(n, m, placement)
    assert sorted(table) == list(range(n))
    stores: dict[int, set[int]] = {i: set() for i in range(n)}
    for node, hs in table.items():
        assert len(hs) == len(set(hs)) == m - 1
        assert node not in hs
        assert hs == holders(node, n, m, placement)
        for h in hs:
            stores[h].add(node)
    for node in range(n):
        assert set(held_by(node, n, m, placement)) == stores[node]
    if resolve_placement(n, m, placement) != "ring":
        parts = groups(n, m, placement)
        assert sorted(i for g in parts for i in g) == list(range(n))
        assert all(len(g) == m for g in parts[:-1])
        assert len(parts[-1]) == m + n % m
        # Replicas never leave their group: a group's failure is self-contained.
        group_of = {i: gi for gi, g in enumerate(parts) for i in g}
        assert all(group_of[h] == group_of[node] for node, hs in table.items() for h in hs)


# --------------------------------------------------------------------------- probability


@pytest.mark.parametrize(("k", "expected"), [(2, 0.9333), (3, 0.8000)])
def test_paper_values_for_sixteen_machines_and_two_replicas(k: int, expected: float) -> None:
    for method in ("exact", "closed_form"):
        estimate = recovery_probability(16, 2, k, "group", method)
        assert estimate.value == pytest.approx(expected, abs=5e-5)
        assert estimate.exact
    assert recovery_probability(16, 2, 2, "group").value == pytest.approx(14 / 15)


CLOSED_FORM_CASES = [
    (n, m, k) for n, m in [(16, 2), (12, 3), (12, 4), (8, 4), (6, 6)] for k in range(n + 1)
]


@pytest.mark.parametrize(("n", "m", "k"), CLOSED_FORM_CASES)
def test_closed_form_equals_exact_below_2m_and_bounds_it_from_below_otherwise(
    n: int, m: int, k: int
) -> None:
    exact = recovery_probability(n, m, k, "group", "exact").value
    closed = recovery_probability(n, m, k, "group", "closed_form")
    assert closed.exact == (k < 2 * m)
    if closed.exact:
        assert closed.value == pytest.approx(exact, abs=1e-12)
    else:
        assert closed.value <= exact + 1e-12


def test_fewer_failures_than_replicas_always_recover() -> None:
    for placement in PLACEMENTS:
        for k in range(3):
            assert recovery_probability(10, 3, k, placement).value == 1.0


def test_all_machines_failing_never_recovers() -> None:
    for placement in PLACEMENTS:
        assert recovery_probability(6, 3, 6, placement).value == 0.0


@pytest.mark.parametrize(
    ("n", "m", "k", "placement"),
    [(16, 2, 2, "group"), (16, 2, 3, "ring"), (7, 3, 4, "mixed"), (12, 3, 6, "group")],
)
def test_monte_carlo_agrees_with_exact_within_four_standard_errors(
    n: int, m: int, k: int, placement: str
) -> None:
    exact = recovery_probability(n, m, k, placement).value
    estimate = recovery_probability(n, m, k, placement, "monte_carlo", trials=20_000, seed=1)
    assert not estimate.exact
    assert estimate.stderr == pytest.approx(
        math.sqrt(estimate.value * (1 - estimate.value) / 20_000)
    )
    assert abs(estimate.value - exact) <= 4 * estimate.stderr


def test_monte_carlo_is_deterministic_for_a_seed() -> None:
    first = recovery_probability(16, 2, 3, "ring", "monte_carlo", trials=5_000, seed=7)
    again = recovery_probability(16, 2, 3, "ring", "monte_carlo", trials=5_000, seed=7)
    assert first == again


@pytest.mark.parametrize(("n", "m"), [(16, 2), (12, 3), (12, 4), (10, 2), (8, 4)])
def test_ring_never_beats_group(n: int, m: int) -> None:
    for k in range(n + 1):
        ring = recovery_probability(n, m, k, "ring").value
        group = recovery_probability(n, m, k, "group").value
        assert ring <= group + 1e-12


def test_ring_is_strictly_worse_at_the_paper_setting() -> None:
    for k in (2, 3):
        assert (
            recovery_probability(16, 2, k, "ring").value
            < recovery_probability(16, 2, k, "group").value
        )


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "key"),
    [
        (lambda: holders(0, 4, 5, "group"), "replication.factor=5"),
        (lambda: holders(0, 4, 0, "group"), "replication.factor=0"),
        (lambda: holders(0, 0, 1, "ring"), "cluster.nodes=0"),
        (lambda: holders(0, 4, 2, "star"), "replication.placement='star'"),
        (lambda: holders(4, 4, 2, "ring"), "node=4"),
        (lambda: held_by(-1, 4, 2, "ring"), "node=-1"),
        (lambda: groups(4, 5, "mixed"), "replication.factor=5"),
        (lambda: resolve_placement(4, 2, "Group"), "replication.placement='Group'"),
        (lambda: recovery_probability(4, 2, 5, "group"), "k=5"),
        (lambda: recovery_probability(4, 2, -1, "group"), "k=-1"),
        (lambda: recovery_probability(4, 2, 2, "group", "guess"), "method='guess'"),
        (lambda: recovery_probability(8, 2, 2, "ring", "closed_form"), "method='closed_form'"),
        (lambda: recovery_probability(7, 2, 2, "group", "closed_form"), "method='closed_form'"),
        (lambda: recovery_probability(64, 2, 8, "group"), "method='exact'"),
        (lambda: recovery_probability(4, 2, 2, "group", "monte_carlo", trials=0), "trials=0"),
        (lambda: holders(0, 4.0, 2, "group"), "cluster.nodes=4.0"),  # type: ignore[arg-type]
        (lambda: holders(0, 4, True, "group"), "replication.factor=True"),
    ],
)
def test_bad_input_raises_a_one_line_error_naming_the_key(
    call: Callable[[], object], key: str
) -> None:
    with pytest.raises(PlacementError) as info:
        call()
    message = str(info.value)
    assert key in message
    assert "\n" not in message
    assert ": use" in message


def test_numpy_integers_are_accepted_as_sizes() -> None:
    # Sizes often come out of numpy arrays; the signature says int, the check admits __index__.
    assert holders(np.int64(1), np.int64(4), np.int32(2), "ring") == [2]  # type: ignore[arg-type]


def test_placement_error_is_a_value_error() -> None:
    with pytest.raises(
        ValueError, match=re.escape("exceeds cluster.nodes=4: use a factor between 1 and 4")
    ):
        resolve_placement(4, 5, "group")
