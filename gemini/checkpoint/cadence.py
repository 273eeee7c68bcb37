"""When to checkpoint: the cadence policies the trainer consults once per step.

Gemini (Wang et al., SOSP 2023, §3) checkpoints every iteration into CPU
memory, because its wasted time per failure, ``t_ckpt + 1/(2f) + t_rtvl``, is
smallest when the interval ``1/f`` reaches its lower bound
``max(t_ckpt, T_iter)``. The baselines it is compared against, and the
classic alternatives, checkpoint less often:

* ``every_n`` — a fixed interval; ``every_n=1`` is Gemini's default.
* ``highfreq`` — the paper's HighFreq baseline: as often as storage allows,
  every ``ceil(t_ckpt / T_iter)`` iterations (every 9 for GPT-2 100B).
* ``checkfreq`` — CheckFreq (Mohan et al., FAST'21): the most frequent
  interval whose overhead ``t_ckpt / (k * T_iter)`` stays within a bound.
* ``young_daly`` — Young (1974) / Daly (2006): the interval
  ``sqrt(2 * C * MTBF)`` that minimises expected lost work, in steps.

This module owns only the *decision*. The policies are pure (no torch, no
clock): the trainer feeds them the times it measured, and the same sequence
of observations always gives the same checkpoint steps. A policy decides
*when* checkpoints happen and never touches the model state, so the choice of
cadence cannot break exact resume.

Protocol of use, once per completed optimizer step ``step`` (1-based)::

    take = policy.should_checkpoint(step)
    ckpt_s = checkpoint(step) if take else None
    policy.observe(step, iter_time_s, ckpt_s)
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from gemini.config import GeminiConfig

CADENCES = ("every_n", "highfreq", "checkfreq", "young_daly")

# Samples in each moving average. Gemini profiles ~20 iterations before it
# plans (Algorithm 2); the same window smooths out a one-off slow step (a GC
# pause, a page-cache flush) without lagging far behind a real change.
WINDOW = 20

# Relative slack before rounding an interval up: a ratio that is an integer in
# exact arithmetic (9 s / 1 s) must not become 10 because a float average came
# out at 9.000000000000002.
_ROUND_SLACK = 1e-9


class CadenceError(ValueError):
    """A refused cadence setting or observation: key, value and what to do."""

    def __init__(self, key: str, value: object, fix: str) -> None:
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")


@runtime_checkable
class CadencePolicy(Protocol):
    """Decides, step by step, whether the trainer takes a checkpoint now."""

    def should_checkpoint(self, step: int) -> bool:
        """Whether to checkpoint the state after optimizer step ``step`` (1-based).

        Asking twice for the same step gives the same answer.
        """
        ...

    def observe(self, step: int, iter_time_s: float, ckpt_time_s: float | None) -> None:
        """Record step ``step``'s iteration time (without checkpoint stall) and,
        when a checkpoint was taken, its blocking-equivalent cost."""
        ...

    def describe(self) -> dict[str, float | int | str]:
        """Current interval and the measurements behind it, for logging."""
        ...


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise CadenceError("step", step, "steps are counted from 1 (completed optimizer steps)")


def _check_time(key: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CadenceError(key, value, "pass the measured time in seconds as a float")
    if not math.isfinite(value) or value < 0:
        raise CadenceError(key, value, "must be a finite number of seconds >= 0")


def _ceil(x: float) -> int:
    """``ceil(x)``, tolerant of float noise just above an integer; at least 1."""
    return max(1, math.ceil(x * (1.0 - _ROUND_SLACK)))


class EveryN:
    """Checkpoint after every ``n``-th step: steps n, 2n, 3n, ...

    ``n=1`` is Gemini's per-iteration cadence. Stateless in the step, so a
    rewind after recovery (steps counted again from the restored step) needs
    no special care.
    """

    name = "every_n"

    def __init__(self, n: int = 1) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise CadenceError("backend.every_n", n, "must be an integer >= 1 (1 = every step)")
        self.n = n

    def should_checkpoint(self, step: int) -> bool:
        _check_step(step)
        return step % self.n == 0

    def observe(self, step: int, iter_time_s: float, ckpt_time_s: float | None) -> None:
        # Nothing to tune; still validate so a caller bug surfaces under every policy.
        _check_step(step)
        _check_time("iter_time_s", iter_time_s)
        if ckpt_time_s is not None:
            _check_time("ckpt_time_s", ckpt_time_s)

    def describe(self) -> dict[str, float | int | str]:
        return {"cadence": self.name, "interval_steps": self.n}


class _Measured:
    """Shared machinery of the policies tuned online from measured times.

    The interval ``k`` is recomputed from moving averages of the iteration
    time ``T_iter`` and the checkpoint cost ``t_ckpt``. A checkpoint is due
    once ``k`` steps have passed since the last one. Until both averages
    exist the policy checkpoints at every eligible step (after
    ``warmup_steps``): with the protocol of use above that is exactly one
    checkpoint, at step ``warmup_steps + 1``, which provides ``t_ckpt``.

    Iteration times of the warm-up steps are ignored, as CheckFreq's profiler
    does: the first iterations pay one-off costs (allocator growth, kernel
    selection, cold caches) that would inflate ``T_iter``.
    """

    name = ""

    def __init__(self, warmup_steps: int) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise CadenceError(
                "backend.warmup_steps", warmup_steps, "must be an integer >= 0 (steps not timed)"
            )
        self.warmup_steps = warmup_steps
        self._iter: deque[float] = deque(maxlen=WINDOW)
        self._ckpt: deque[float] = deque(maxlen=WINDOW)
        self._last_ckpt_step: int | None = None

    # -- measurements ---------------------------------------------------
    @property
    def t_iter_s(self) -> float | None:
        """Moving average of the iteration time, or None before any sample."""
        return math.fsum(self._iter) / len(self._iter) if self._iter else None

    @property
    def t_ckpt_s(self) -> float | None:
        """Moving average of the checkpoint cost, or None before any sample."""
        return math.fsum(self._ckpt) / len(self._ckpt) if self._ckpt else None

    @property
    def interval_steps(self) -> int | None:
        """Steps between checkpoints now, or None while still measuring."""
        t_iter, t_ckpt = self.t_iter_s, self.t_ckpt_s
        if t_iter is None or t_ckpt is None:
            return None
        if t_iter <= 0.0:
            # A zero iteration time (a clock too coarse) leaves no sensible
            # ratio; checkpointing every step is the conservative reading.
            return 1
        return self._interval(t_iter, t_ckpt)

    def _interval(self, t_iter: float, t_ckpt: float) -> int:
        raise NotImplementedError

    # -- protocol -------------------------------------------------------
    def should_checkpoint(self, step: int) -> bool:
        _check_step(step)
        last = self._last_ckpt_step
        if last is not None and step == last:
            return True  # asked again for the same step
        if last is not None and step < last:
            # Training rewound to a restored checkpoint: the state before
            # ``step`` is the one just restored, so count from there.
            last = self._last_ckpt_step = step - 1
        if step <= self.warmup_steps:
            return False
        k = self.interval_steps
        due = k is None or last is None or step - last >= k
        if due:
            self._last_ckpt_step = step
        return due

    def observe(self, step: int, iter_time_s: float, ckpt_time_s: float | None) -> None:
        _check_step(step)
        _check_time("iter_time_s", iter_time_s)
        if step > self.warmup_steps:
            self._iter.append(float(iter_time_s))
        if ckpt_time_s is not None:
            _check_time("ckpt_time_s", ckpt_time_s)
            self._ckpt.append(float(ckpt_time_s))

    def describe(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {"cadence": self.name}
        k, t_iter, t_ckpt = self.interval_steps, self.t_iter_s, self.t_ckpt_s
        # Keys appear only once measured: a NaN placeholder would compare
        # unequal to itself and pollute logged params.
        if k is not None:
            out["interval_steps"] = k
        if t_iter is not None:
            out["t_iter_s"] = t_iter
        if t_ckpt is not None:
            out["t_ckpt_s"] = t_ckpt
        if k is not None and t_iter is not None and t_ckpt is not None and t_iter > 0:
            out["overhead_pct"] = 100.0 * t_ckpt / (k * t_iter)
        if self._last_ckpt_step is not None:
            out["last_ckpt_step"] = self._last_ckpt_step
        return out


class HighFreq(_Measured):
    """The paper's HighFreq baseline: every ``ceil(t_ckpt / T_iter)`` iterations.

    A checkpoint to remote storage runs in the background, and the next one
    cannot start before it finishes, so storage bandwidth caps the frequency
    at one checkpoint per ``t_ckpt`` seconds (Gemini §2.2, §7: every 9
    iterations for GPT-2 100B on p4d).
    """

    name = "highfreq"

    def _interval(self, t_iter: float, t_ckpt: float) -> int:
        return _ceil(t_ckpt / t_iter)


class CheckFreq(_Measured):
    """CheckFreq (Mohan et al., FAST'21): the most frequent interval within an overhead bound.

    The smallest ``k`` with ``t_ckpt / (k * T_iter) <= overhead_bound_pct / 100``,
    re-tuned as measurements arrive (CheckFreq profiles online and adapts).
    """

    name = "checkfreq"

    def __init__(self, overhead_bound_pct: float = 5.0, warmup_steps: int = 3) -> None:
        ok = isinstance(overhead_bound_pct, (int, float)) and not isinstance(
            overhead_bound_pct, bool
        )
        if not ok or not math.isfinite(overhead_bound_pct) or not 0 < overhead_bound_pct <= 100:
            raise CadenceError(
                "backend.overhead_bound_pct",
                overhead_bound_pct,
                "must be a percentage in (0, 100], e.g. 5.0",
            )
        super().__init__(warmup_steps)
        self.overhead_bound_pct = float(overhead_bound_pct)

    def _interval(self, t_iter: float, t_ckpt: float) -> int:
        # k >= t_ckpt * 100 / (bound * T_iter); multiply before dividing so
        # 1 s / (5 % of 1 s) is exactly 20, not 20.000000000000004.
        return _ceil(t_ckpt * 100.0 / (self.overhead_bound_pct * t_iter))

    def describe(self) -> dict[str, float | int | str]:
        return {**super().describe(), "overhead_bound_pct": self.overhead_bound_pct}


class YoungDaly(_Measured):
    """Young/Daly: checkpoint every ``sqrt(2 * C * MTBF)`` seconds of work.

    Young's first-order optimum (Young, CACM 1974; Daly, FGCS 2006, shows it
    is within a few percent of the higher-order one while ``C << MTBF``),
    with ``C`` the measured checkpoint cost, converted to steps with the
    measured ``T_iter`` and rounded to the nearest step, at least 1.
    """

    name = "young_daly"

    def __init__(self, mtbf_s: float = 3600.0, warmup_steps: int = 3) -> None:
        ok = isinstance(mtbf_s, (int, float)) and not isinstance(mtbf_s, bool)
        if not ok or not math.isfinite(mtbf_s) or mtbf_s <= 0:
            raise CadenceError(
                "backend.mtbf_s", mtbf_s, "must be a positive number of seconds, e.g. 3600"
            )
        super().__init__(warmup_steps)
        self.mtbf_s = float(mtbf_s)

    def _interval(self, t_iter: float, t_ckpt: float) -> int:
        interval_s = math.sqrt(2.0 * t_ckpt * self.mtbf_s)
        # Nearest rather than up: the optimum is flat, and rounding up would
        # bias every interval towards less frequent checkpoints.
        return max(1, math.floor(interval_s / t_iter + 0.5))

    def describe(self) -> dict[str, float | int | str]:
        return {**super().describe(), "mtbf_s": self.mtbf_s}


def make_cadence(
    name: str,
    *,
    every_n: int = 1,
    overhead_bound_pct: float = 5.0,
    mtbf_s: float = 3600.0,
    warmup_steps: int = 3,
) -> CadencePolicy:
    """The policy called ``name`` (one of :data:`CADENCES`), configured.

    Only the arguments the named policy uses are validated, so a default
    that is meaningless for it cannot refuse a run.
    """
    if name == "every_n":
        return EveryN(every_n)
    if name == "highfreq":
        return HighFreq(warmup_steps)
    if name == "checkfreq":
        return CheckFreq(overhead_bound_pct, warmup_steps)
    if name == "young_daly":
        return YoungDaly(mtbf_s, warmup_steps)
    raise CadenceError("backend.cadence", name, f"use one of {', '.join(CADENCES)}")


def cadence_for(cfg: GeminiConfig) -> CadencePolicy:
    """The policy ``cfg.backend`` asks for: what each trainer builds, and what
    ``gemini.config.validate`` builds once before anything starts."""
    b = cfg.backend
    return make_cadence(
        b.cadence, every_n=b.every_n, overhead_bound_pct=b.overhead_bound_pct, mtbf_s=b.mtbf_s
    )
