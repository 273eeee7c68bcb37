"""Cadence policies on synthetic observations: intervals, determinism, validation."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini.checkpoint.cadence import (
    CADENCES,
    CadenceError,
    CadencePolicy,
    CheckFreq,
    EveryN,
    HighFreq,
    YoungDaly,
    make_cadence,
)


def drive(
    policy: CadencePolicy, steps: int, iter_s: float | list[float], ckpt_s: float
) -> list[int]:
    """Run the trainer's per-step protocol; return the steps that checkpointed."""
    taken = []
    for step in range(1, steps + 1):
        t_iter = iter_s[step - 1] if isinstance(iter_s, list) else iter_s
        take = policy.should_checkpoint(step)
        if take:
            taken.append(step)
        policy.observe(step, t_iter, ckpt_s if take else None)
    return taken


def gaps(steps: list[int]) -> set[int]:
    return {b - a for a, b in itertools.pairwise(steps)}


# -- every_n ---------------------------------------------------------------


def test_every_n_one_checkpoints_every_step_from_the_first() -> None:
    assert drive(make_cadence("every_n"), 10, 1.0, 5.0) == list(range(1, 11))


def test_every_n_checkpoints_on_multiples_of_n() -> None:
    assert drive(make_cadence("every_n", every_n=4), 17, 1.0, 5.0) == [4, 8, 12, 16]


def test_every_n_is_unaffected_by_a_rewind_after_recovery() -> None:
    policy = make_cadence("every_n", every_n=3)
    assert [s for s in range(1, 8) if policy.should_checkpoint(s)] == [3, 6]
    # Restored step 6, training resumes at 7 then a failure rewinds to 3.
    assert [s for s in range(4, 10) if policy.should_checkpoint(s)] == [6, 9]


# -- highfreq --------------------------------------------------------------


def test_highfreq_waits_out_warmup_then_measures_once() -> None:
    taken = drive(make_cadence("highfreq", warmup_steps=3), 4, 1.0, 9.0)
    assert taken == [4]


def test_highfreq_checkpoints_every_ceil_tckpt_over_titer() -> None:
    taken = drive(make_cadence("highfreq", warmup_steps=3), 60, 1.0, 9.0)
    assert taken[0] == 4
    assert gaps(taken) == {9}


def test_highfreq_rounds_a_fractional_ratio_up() -> None:
    taken = drive(make_cadence("highfreq", warmup_steps=0), 40, 2.0, 9.0)
    assert gaps(taken) == {5}  # ceil(4.5)


def test_highfreq_is_one_when_checkpoints_are_cheaper_than_an_iteration() -> None:
    taken = drive(make_cadence("highfreq", warmup_steps=0), 10, 1.0, 0.25)
    assert taken == list(range(1, 11))


def test_highfreq_float_noise_does_not_lengthen_the_interval() -> None:
    # 0.3 / 0.1 is 2.9999999999999996 and 0.9 / 0.3 is 3.0000000000000004 in floats.
    taken = drive(make_cadence("highfreq", warmup_steps=0), 30, 0.3, 0.9)
    assert gaps(taken) == {3}


def test_highfreq_ignores_warmup_iteration_times() -> None:
    # Slow first steps (allocator, kernel selection) must not shorten the interval.
    times = [100.0] * 3 + [1.0] * 60
    policy = HighFreq(warmup_steps=3)
    drive(policy, 63, times, 9.0)
    assert policy.t_iter_s == 1.0
    assert policy.interval_steps == 9


def test_highfreq_retunes_when_iterations_slow_down() -> None:
    policy = HighFreq(warmup_steps=0)
    drive(policy, 50, 1.0, 9.0)
    assert policy.interval_steps == 9
    for step in range(51, 51 + 2 * 20):
        take = policy.should_checkpoint(step)
        policy.observe(step, 3.0, 9.0 if take else None)
    assert policy.interval_steps == 3


# -- checkfreq -------------------------------------------------------------


def test_checkfreq_five_percent_bound_with_equal_times_is_every_20() -> None:
    policy = make_cadence("checkfreq", overhead_bound_pct=5.0, warmup_steps=0)
    taken = drive(policy, 100, 1.0, 1.0)
    assert gaps(taken) == {20}
    assert policy.describe()["overhead_pct"] == pytest.approx(5.0)


def test_checkfreq_picks_the_smallest_interval_within_the_bound() -> None:
    policy = CheckFreq(overhead_bound_pct=3.5, warmup_steps=0)
    drive(policy, 5, 2.0, 1.0)
    k = policy.interval_steps
    assert k is not None
    assert 1.0 / (k * 2.0) <= 0.035 < 1.0 / ((k - 1) * 2.0)


@settings(max_examples=200, deadline=None)
@given(
    t_iter=st.floats(1e-3, 1e3),
    t_ckpt=st.floats(1e-3, 1e3),
    bound=st.floats(0.1, 100.0),
)
def test_checkfreq_interval_is_minimal_within_the_bound(
    t_iter: float, t_ckpt: float, bound: float
) -> None:
    policy = CheckFreq(overhead_bound_pct=bound, warmup_steps=0)
    policy.observe(1, t_iter, t_ckpt)
    k = policy.interval_steps
    assert k is not None and k >= 1
    rel = 1e-6  # slack for float rounding at an exact boundary
    assert t_ckpt / (k * t_iter) <= bound / 100 * (1 + rel)
    if k > 1:
        assert t_ckpt / ((k - 1) * t_iter) > bound / 100 * (1 - rel)


# -- young_daly ------------------------------------------------------------


def test_young_daly_interval_is_sqrt_2_c_mtbf_in_steps() -> None:
    policy = make_cadence("young_daly", mtbf_s=3600.0, warmup_steps=0)
    taken = drive(policy, 600, 1.0, 10.0)
    assert math.sqrt(2 * 10 * 3600) == pytest.approx(268.33, abs=0.01)
    assert gaps(taken) == {268}
    assert policy.describe()["interval_steps"] == 268


def test_young_daly_is_at_least_one_step() -> None:
    policy = YoungDaly(mtbf_s=1.0, warmup_steps=0)
    drive(policy, 5, 100.0, 0.01)
    assert policy.interval_steps == 1


# -- shared behaviour ------------------------------------------------------


@pytest.mark.parametrize("name", CADENCES)
def test_same_observations_give_the_same_checkpoint_steps(name: str) -> None:
    times = [1.0 + 0.37 * ((7 * i) % 11) for i in range(300)]
    runs = [drive(make_cadence(name, every_n=3), 300, times, 6.5) for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0], "every policy checkpoints at least once in 300 steps"


@pytest.mark.parametrize("name", CADENCES)
def test_asking_twice_for_a_step_gives_the_same_answer(name: str) -> None:
    policy = make_cadence(name, every_n=2, warmup_steps=1)
    answers = []
    for step in range(1, 30):
        first = policy.should_checkpoint(step)
        assert policy.should_checkpoint(step) == first
        answers.append(first)
        policy.observe(step, 1.0, 3.0 if first else None)
    assert any(answers)


@pytest.mark.parametrize("name", CADENCES)
def test_every_policy_satisfies_the_protocol_and_describes_itself(name: str) -> None:
    policy = make_cadence(name)
    assert isinstance(policy, CadencePolicy)
    drive(policy, 30, 1.0, 2.0)
    info = policy.describe()
    assert info["cadence"] == name
    assert isinstance(info["interval_steps"], int) and info["interval_steps"] >= 1
    assert all(isinstance(v, (int, float, str)) for v in info.values())


def test_measured_policy_describes_no_interval_before_measuring() -> None:
    info = make_cadence("highfreq").describe()
    assert info == {"cadence": "highfreq"}


def test_measured_policy_counts_from_the_restored_step_after_a_rewind() -> None:
    policy = HighFreq(warmup_steps=0)
    taken = drive(policy, 30, 1.0, 5.0)
    assert taken == [1, 6, 11, 16, 21, 26]
    # A failure at step 30 finds step 26's checkpoint incomplete and restores
    # step 21; training resumes at 22, so the next checkpoint is 5 steps later.
    assert [s for s in range(22, 33) if policy.should_checkpoint(s)] == [26, 31]


def test_unmeasured_policy_keeps_asking_until_a_measurement_arrives() -> None:
    # A trainer that never reports a checkpoint time gets Gemini's rate, not none.
    policy = HighFreq(warmup_steps=2)
    assert [s for s in range(1, 7) if policy.should_checkpoint(s)] == [3, 4, 5, 6]


# -- validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "hourly"}, "backend.cadence"),
        ({"name": "every_n", "every_n": 0}, "backend.every_n"),
        ({"name": "every_n", "every_n": True}, "backend.every_n"),
        ({"name": "checkfreq", "overhead_bound_pct": 0.0}, "backend.overhead_bound_pct"),
        ({"name": "checkfreq", "overhead_bound_pct": 150.0}, "backend.overhead_bound_pct"),
        ({"name": "young_daly", "mtbf_s": 0.0}, "backend.mtbf_s"),
        ({"name": "young_daly", "mtbf_s": math.inf}, "backend.mtbf_s"),
        ({"name": "highfreq", "warmup_steps": -1}, "backend.warmup_steps"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(kwargs: dict[str, object], key: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(CadenceError) as err:
        make_cadence(name, **kwargs)  # type: ignore[arg-type]
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}=")
    assert "\n" not in str(err.value)


def test_settings_a_policy_does_not_use_are_not_validated() -> None:
    assert isinstance(make_cadence("every_n", mtbf_s=-1.0), EveryN)


@pytest.mark.parametrize("name", CADENCES)
def test_bad_observations_are_refused(name: str) -> None:
    policy = make_cadence(name)
    with pytest.raises(CadenceError, match="step"):
        policy.should_checkpoint(0)
    with pytest.raises(CadenceError, match="iter_time_s"):
        policy.observe(1, -1.0, None)
    with pytest.raises(CadenceError, match="ckpt_time_s"):
        policy.observe(1, 1.0, math.nan)
