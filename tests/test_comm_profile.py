"""The idle spans of training communication (gemini.workload.comm_profile): the
pure parts here; a real job's profile in tests/test_comm_profile_e2e.py."""

from __future__ import annotations

import pytest

from gemini.workload.comm_profile import idle_spans, summarise


def test_idle_spans_are_the_gaps_between_communications_in_order() -> None:
    # Iteration [0, 10]: all-reduces at [2, 3] and [5, 7].
    assert idle_spans(0.0, 10.0, [(5.0, 7.0), (2.0, 3.0)]) == [2.0, 2.0, 3.0]


def test_overlapping_buckets_merge_and_outside_parts_are_ignored() -> None:
    # Two buckets in flight at once make one busy stretch; a communication
    # left over from before the iteration, or running past it, is clipped.
    busy = [(-1.0, 1.0), (2.0, 4.0), (3.0, 5.0), (9.0, 12.0)]
    # The trailing span is always there (zero here): the planner's last span.
    assert idle_spans(0.0, 10.0, busy) == [1.0, 4.0, 0.0]


def test_an_iteration_without_communication_is_one_span() -> None:
    assert idle_spans(1.0, 4.0, []) == [3.0]
    # Communication up to the very end leaves a zero-length last span.
    assert idle_spans(0.0, 2.0, [(1.0, 2.0)]) == [1.0, 0.0]


def test_summary_averages_position_by_position_over_the_common_shape() -> None:
    samples = [
        (10.0, [2.0, 2.0, 3.0]),
        (10.0, [2.2, 1.8, 3.0]),
        (10.0, [4.0, 3.0]),  # two communications merged: a different shape, left out
        (10.0, [1.8, 2.2, 3.0]),
    ]
    p = summarise(samples)
    assert p is not None
    assert p.profiled == 4 and p.iterations == 3
    assert p.spans_s == pytest.approx([2.0, 2.0, 3.0])
    assert p.idle_s == pytest.approx(7.0)
    assert p.comm_s == pytest.approx(3.0)
    assert p.iter_s == pytest.approx(10.0)
    # The first two spans vary by 0.2 around 2 (population std 0.163); the
    # total does not vary at all.
    assert p.span_cv == pytest.approx([0.0816, 0.0816, 0.0], abs=1e-4)
    assert p.idle_cv == pytest.approx(0.0)


def test_no_samples_no_profile() -> None:
    assert summarise([]) is None
