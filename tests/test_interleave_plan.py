"""Algorithm 2's planner (gemini.checkpoint.interleave.plan_chunks): its properties
over arbitrary spans, sizes and link models, and a worked example."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini.checkpoint.interleave import plan_chunks, transfer_s

spans = st.lists(
    st.one_of(st.just(0.0), st.floats(min_value=1e-4, max_value=5.0)), min_size=1, max_size=12
)


@st.composite
def plans(draw: st.DrawFn) -> dict:
    """Planner inputs, with at most a few thousand chunks per plan."""
    ckpt = draw(st.integers(min_value=0, max_value=1 << 30))
    copies = draw(st.integers(min_value=0, max_value=3))
    subbuffers = draw(st.integers(min_value=1, max_value=8))
    least = max(subbuffers, ckpt * max(copies, 1) // 2000)
    return {
        "spans_s": draw(spans),
        "ckpt_bytes": ckpt,
        "copies": copies,
        "buffer_bytes": draw(st.integers(min_value=least, max_value=max(least, 1 << 30))),
        "subbuffers": subbuffers,
        "bandwidth_Bps": draw(st.floats(min_value=1e6, max_value=50e9)),
        "alpha_s": draw(st.floats(min_value=0.0, max_value=5e-3)),
        "mu": draw(st.floats(min_value=0.05, max_value=1.0)),
    }


# Float sums of many chunk times may exceed an exact budget by rounding only.
EPS = 1e-9


@settings(max_examples=300, deadline=None)
@given(plans())
def test_every_byte_of_every_copy_is_planned_once(p: dict) -> None:
    plan = plan_chunks(**p)
    assert sum(n for _, n in plan.chunks) == p["copies"] * p["ckpt_bytes"]
    copies = plan.copies(p["ckpt_bytes"])
    assert len(copies) == (p["copies"] if p["ckpt_bytes"] else 0)
    for chunks in copies:
        # Each copy in order, without gaps or overlaps.
        assert [off for _, off, _ in chunks] == [
            sum(n for _, _, n in chunks[:i]) for i in range(len(chunks))
        ]
        assert sum(n for _, _, n in chunks) == p["ckpt_bytes"]


@settings(max_examples=300, deadline=None)
@given(plans())
def test_no_chunk_is_larger_than_a_sub_buffer_or_empty(p: dict) -> None:
    plan = plan_chunks(**p)
    limit = p["buffer_bytes"] // p["subbuffers"]
    assert all(0 < n <= limit for _, n in plan.chunks)


@settings(max_examples=300, deadline=None)
@given(plans())
def test_every_span_but_the_last_stays_within_mu_of_its_length(p: dict) -> None:
    plan = plan_chunks(**p)
    spans_s, mu = p["spans_s"], p["mu"]
    for k, span in enumerate(spans_s[:-1]):
        planned = sum(
            transfer_s(n, p["bandwidth_Bps"], p["alpha_s"]) for s, n in plan.chunks if s == k
        )
        assert planned == pytest.approx(plan.span_used_s[k])
        assert planned <= mu * span * (1 + EPS) + EPS
    # Spans are filled in order: chunks never go back to an earlier span.
    order = [s for s, _ in plan.chunks]
    assert order == sorted(order)


@settings(max_examples=300, deadline=None)
@given(plans())
def test_a_zero_length_span_gets_nothing_unless_it_is_the_last(p: dict) -> None:
    plan = plan_chunks(**p)
    last = len(p["spans_s"]) - 1
    for k, span in enumerate(p["spans_s"]):
        if span == 0.0 and k != last:
            assert all(s != k for s, _ in plan.chunks)


@settings(max_examples=300, deadline=None)
@given(plans())
def test_the_added_time_is_what_the_last_span_takes_beyond_its_length(p: dict) -> None:
    plan = plan_chunks(**p)
    last = p["spans_s"][-1]
    assert plan.added_s == pytest.approx(max(0.0, plan.span_used_s[-1] - last), abs=1e-12)
    # Nothing spills into the last span while an earlier one has room for a
    # whole chunk: greedy fill, span after span.
    if plan.added_s > 0:
        limit = p["buffer_bytes"] // p["subbuffers"]
        for k, span in enumerate(p["spans_s"][:-1]):
            room = p["mu"] * span - plan.span_used_s[k]
            assert room < transfer_s(min(limit, 1), p["bandwidth_Bps"], p["alpha_s"]) + EPS


def test_a_worked_example() -> None:
    # 1 GB/s link, no latency: spans of 1 s and 0.5 s at mu 0.8 hold 0.8 GB and
    # 0.4 GB. Two copies of 0.7 GB in 0.25 GB chunks: copy 0 takes 0.25 + 0.25 +
    # 0.2 (0.7 GB; 0.1 GB of span 0's budget left: one 0.1 GB chunk of copy 1),
    # then span 1 takes 0.25 + 0.15 (its 0.4 GB), and the last 0.2 GB spills
    # into span 1: 0.6 s of transfer in a 0.5 s span, 0.1 s added.
    gb = 10**9
    plan = plan_chunks(
        [1.0, 0.5],
        ckpt_bytes=7 * gb // 10,
        copies=2,
        buffer_bytes=gb,
        subbuffers=4,
        bandwidth_Bps=float(gb),
        alpha_s=0.0,
        mu=0.8,
    )
    assert plan.chunks == [
        (0, 250_000_000),
        (0, 250_000_000),
        (0, 200_000_000),
        (0, 100_000_000),
        (1, 250_000_000),
        (1, 150_000_000),
        (1, 200_000_000),
    ]
    assert plan.added_s == pytest.approx(0.1)
    assert plan.span_used_s == pytest.approx([0.8, 0.6])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("spans_s", []),
        ("spans_s", [1.0, -0.1]),
        ("subbuffers", 0),
        ("buffer_bytes", 2),
        ("bandwidth_Bps", 0.0),
        ("alpha_s", -1.0),
        ("mu", 0.0),
        ("mu", 1.5),
        ("copies", -1),
    ],
)
def test_bad_input_is_refused_naming_the_argument(key: str, value: object) -> None:
    args: dict = {
        "spans_s": [1.0],
        "ckpt_bytes": 100,
        "copies": 1,
        "buffer_bytes": 40,
        "subbuffers": 4,
        "bandwidth_Bps": 1e3,
        "alpha_s": 0.0,
        "mu": 0.9,
        key: value,
    }
    with pytest.raises(ValueError, match=key):
        plan_chunks(**args)
