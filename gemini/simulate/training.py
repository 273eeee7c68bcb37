"""Fig. 15: the effective training time ratio of a long run that failures keep hitting.

The model, per system, per cluster size N and failure rate:

* Failures arrive over the run's wall-clock time ``T = days`` as a Poisson
  process (or a Weibull renewal process of the same mean rate). The machines
  keep failing while the job recovers, so arrivals do not pause.
* A failure is a software failure (share ``software_fraction``: the host and
  its CPU memory survive, no machine is replaced) or a hardware failure that
  takes one machine, or ``multi_node_count`` machines with probability
  ``multi_node_probability``.
* Where the job recovers from: Gemini from CPU memory (its own for a software
  failure; a holder's for a hardware failure, which succeeds with the
  placement's ``recovery_probability`` for k lost machines), else from its
  persistent checkpoint; HighFreq and Strawman always from storage.
* A failure at time t wastes the window ``[t - lost, t + downtime]``:
  ``downtime = detect + restart + retrieve(source) (+ replace, hardware)`` and
  ``lost`` the training since the newest *complete* checkpoint. Checkpoints
  start every ``interval`` of training and complete ``lag`` later, so with the
  failure a uniform phase ``phi`` into an interval, ``lost = phi + j * interval``
  with ``j = max(0, ceil((lag - phi) / interval))``; its mean is
  ``interval / 2 + lag`` (the paper's ``t_ckpt + 1/(2f)``; with retrieval,
  its ``T_wasted``).
* Overlapping windows (a failure during a recovery) are wasted once: the
  wasted time of a run is the length of the union of its windows within
  ``[0, T]``. Checkpoint stalls take a further share ``overhead = stall /
  interval`` of the rest.

``effective ratio = (T - |union of windows|) * (1 - overhead) / T``. With a
constant window c and Poisson rate r its expectation is about ``1 - r c``
(exactly ``1 - E|union| / T``, see ``tests/test_simulate.py``).

Everything is vectorised over all failures of all trials: a cell of 10,000
nodes, 30 days and 200 trials is a few numpy passes. The failures a cell
draws are shared by every system (common random numbers), so the systems are
compared on the same failures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gemini.simulate.config import CostConfig, FailureProcessConfig

FIG15_COLUMNS = (
    "system",
    "N",
    "failures_per_day",
    "rate_unit",
    "days",
    "effective_ratio",
    "failures",
    "from_memory",
    "from_storage",
    "cost_source",
)

DAY_S = 86400.0


@dataclass(frozen=True)
class Tier:
    """Recovering from one place: how old the checkpoint is and how long it takes to read."""

    interval_s: float
    """A checkpoint starts every this much training time."""
    lag_s: float
    """A checkpoint is complete this long after it starts (t_ckpt)."""
    retrieve_s: float
    """Reading every rank's checkpoint back."""


@dataclass(frozen=True)
class SystemModel:
    """How one system checkpoints and recovers."""

    name: str
    memory: Tier | None
    """Recovery from CPU memory; None for the storage-only baselines."""
    storage: Tier
    """Recovery from persistent storage."""
    overhead: float
    """Share of training time stalled by checkpoints."""


def system_model(name: str, c: CostConfig) -> SystemModel:
    """The checkpoint tiers and overhead of ``gemini``, ``highfreq`` or ``strawman``."""
    if name == "gemini":
        mem_interval = c.every_n * c.iter_time_s
        return SystemModel(
            name,
            Tier(mem_interval, c.memory_ckpt_s, c.retrieve_memory_s),
            Tier(c.persist_interval_s, c.storage_ckpt_s, c.retrieve_storage_s),
            c.memory_stall_s / mem_interval + c.storage_stall_s / c.persist_interval_s,
        )
    if name == "highfreq":
        # As often as storage allows: a checkpoint every ceil(t_ckpt / T_iter)
        # iterations (at least one).
        every = max(1, math.ceil(c.storage_ckpt_s / c.iter_time_s - 1e-9))
        interval = every * c.iter_time_s
        tier = Tier(interval, c.storage_ckpt_s, c.retrieve_storage_s)
        return SystemModel(name, None, tier, c.storage_stall_s / interval)
    if name == "strawman":
        tier = Tier(c.strawman_interval_s, c.storage_ckpt_s, c.retrieve_storage_s)
        return SystemModel(name, None, tier, c.storage_stall_s / c.strawman_interval_s)
    raise ValueError(f"system={name!r} has no model: use gemini, highfreq or strawman")


@dataclass
class FailureDraws:
    """Every failure of every trial of one cell, with the uniforms that decide its fate."""

    trials: int
    horizon_s: float
    trial: np.ndarray
    """Index of the trial each failure belongs to."""
    t: np.ndarray
    """Wall-clock time of each failure, seconds into the run."""
    hardware: np.ndarray
    """True where the failure loses machines (not a software failure)."""
    machines: np.ndarray
    """Machines lost (0 for software failures)."""
    u_memory: np.ndarray
    """Uniform deciding whether memory survives a hardware failure."""
    u_phase: np.ndarray
    """Uniform phase of the failure within its checkpoint interval."""


def _arrival_times(
    rng: np.random.Generator,
    rate_per_s: float,
    horizon_s: float,
    trials: int,
    process: str,
    shape: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(trial index, time) of every failure; sorted by trial."""
    if rate_per_s <= 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0)
    mean = rate_per_s * horizon_s
    if process == "poisson":
        # Given their count, a Poisson process's arrivals are i.i.d. uniform.
        counts = rng.poisson(mean, trials)
        trial = np.repeat(np.arange(trials), counts)
        return trial, rng.uniform(0.0, horizon_s, trial.size)
    # Weibull gaps of mean 1/rate, cumulated until every trial passes the horizon.
    scale = 1.0 / (rate_per_s * math.gamma(1.0 + 1.0 / shape))
    block = int(mean + 6.0 * math.sqrt(mean) + 16)
    times = np.cumsum(scale * rng.weibull(shape, (trials, block)), axis=1)
    while times[:, -1].min() < horizon_s:
        more = np.cumsum(scale * rng.weibull(shape, (trials, block)), axis=1)
        times = np.concatenate([times, more + times[:, -1:]], axis=1)
    keep = times < horizon_s
    trial = np.nonzero(keep)[0]
    return trial, times[keep]


def draw_failures(
    rng: np.random.Generator,
    rate_per_day: float,
    days: float,
    f: FailureProcessConfig,
) -> FailureDraws:
    """The failures of ``f.trials`` runs of ``days`` at ``rate_per_day`` (whole cluster)."""
    horizon = days * DAY_S
    trial, t = _arrival_times(
        rng, rate_per_day / DAY_S, horizon, f.trials, f.process, f.weibull_shape
    )
    size = t.size
    hardware = rng.random(size) >= f.software_fraction
    multi = rng.random(size) < f.multi_node_probability
    machines = np.where(hardware, np.where(multi, f.multi_node_count, 1), 0)
    return FailureDraws(
        f.trials, horizon, trial, t, hardware, machines, rng.random(size), rng.random(size)
    )


def covered_s(
    trial: np.ndarray, start: np.ndarray, end: np.ndarray, trials: int, horizon_s: float
) -> np.ndarray:
    """Per trial, the length of the union of the windows ``[start, end]`` within the run."""
    s = np.clip(start, 0.0, horizon_s)
    e = np.clip(end, 0.0, horizon_s)
    # Shift each trial into a span of its own so that one running maximum over
    # all windows, sorted by start, never carries a window into the next trial.
    offset = trial * (2.0 * horizon_s + 1.0)
    s = s + offset
    e = e + offset
    order = np.argsort(s, kind="stable")
    s, e, tr = s[order], e[order], trial[order]
    reach = np.maximum.accumulate(e) if e.size else e
    before = np.concatenate(([-np.inf], reach[:-1]))
    gained = np.maximum(0.0, e - np.maximum(s, before))
    return np.bincount(tr, weights=gained, minlength=trials)


def lost_training_s(tier_interval: np.ndarray, lag: np.ndarray, u_phase: np.ndarray) -> np.ndarray:
    """Training since the newest complete checkpoint, for a failure ``u_phase`` into an interval."""
    phi = u_phase * tier_interval
    behind = np.maximum(0.0, np.ceil((lag - phi) / tier_interval))
    return phi + behind * tier_interval


def simulate_system(
    model: SystemModel,
    draws: FailureDraws,
    c: CostConfig,
    memory_ok: dict[int, float],
) -> dict[str, float]:
    """Mean effective ratio, failures and recovery sources over the trials of one cell.

    ``memory_ok[k]``: probability that a hardware failure of k machines leaves
    every checkpoint a copy in CPU memory (placement.recovery_probability).
    """
    n = draws.t.size
    if model.memory is None:
        from_memory = np.zeros(n, dtype=bool)
    else:
        p = np.ones(n)
        for k, prob in memory_ok.items():
            p[draws.machines == k] = prob
        # Software failures keep the host's own copy; hardware ones need a holder.
        from_memory = ~draws.hardware | (draws.u_memory < p)
    mem = model.memory or model.storage
    sto = model.storage
    interval = np.where(from_memory, mem.interval_s, sto.interval_s)
    lag = np.where(from_memory, mem.lag_s, sto.lag_s)
    retrieve = np.where(from_memory, mem.retrieve_s, sto.retrieve_s)
    downtime = c.detect_s + c.restart_s + retrieve + np.where(draws.hardware, c.replace_s, 0.0)
    lost = lost_training_s(interval, lag, draws.u_phase)
    wasted = covered_s(
        draws.trial, draws.t - lost, draws.t + downtime, draws.trials, draws.horizon_s
    )
    ratio = (draws.horizon_s - wasted) / draws.horizon_s * max(0.0, 1.0 - model.overhead)
    per_trial = float(draws.trials)
    return {
        "effective_ratio": float(ratio.mean()),
        "failures": n / per_trial,
        "from_memory": float(np.count_nonzero(from_memory)) / per_trial,
        "from_storage": float(n - np.count_nonzero(from_memory)) / per_trial,
    }


def cluster_rate(rate: float, n: int, unit: str) -> float:
    """Failures per day of the whole cluster of ``n`` machines."""
    return rate * n if unit == "node" else rate


def fig15_rates(rates: list[float], f: FailureProcessConfig) -> list[tuple[float, str]]:
    """The (rate, unit) pairs Fig. 15 simulates: ``rates`` in ``f.rate_unit``, then
    ``f.per_node_per_day`` per machine (Fig. 15b) unless it is off or already listed."""
    pairs = [(r, f.rate_unit) for r in rates]
    extra = f.per_node_per_day
    listed = any(u == "node" and math.isclose(r, extra, rel_tol=1e-9) for r, u in pairs)
    if extra > 0 and not listed:
        pairs.append((extra, "node"))
    return pairs


def fig15_rows(
    nodes: list[int],
    m: int,
    rates: list[float],
    days: float,
    f: FailureProcessConfig,
    c: CostConfig,
    *,
    seed: int,
    memory_ok: dict[tuple[int, int], float],
    cost_sources: dict[str, str],
) -> list[dict[str, Any]]:
    """One row per (system, N, rate): ``FIG15_COLUMNS``, the rates of :func:`fig15_rates`.

    ``failures_per_day`` of a row is the cluster's rate simulated; ``rate_unit``
    says what the configured rate counted (the rate per machine of a ``node`` row
    is ``failures_per_day / N``). ``memory_ok[(N, k)]``: see :func:`simulate_system`;
    ``cost_sources[system]`` says where that system's costs came from.
    """
    models = {s: system_model(s, c) for s in f.systems if s != "ideal"}
    rows: list[dict[str, Any]] = []
    for n in nodes:
        ok = {k: p for (nn, k), p in memory_ok.items() if nn == n}
        for i, (rate, unit) in enumerate(fig15_rates(rates, f)):
            per_day = cluster_rate(rate, n, unit)
            # One stream per (seed, N, rate): the same failures for every system.
            # The per-machine rate comes last, so the listed rates keep their streams.
            rng = np.random.default_rng([seed, n, i])
            draws = draw_failures(rng, per_day, days, f)
            for system in f.systems:
                if system == "ideal":
                    result = {
                        "effective_ratio": 1.0,
                        "failures": 0.0,
                        "from_memory": 0.0,
                        "from_storage": 0.0,
                    }
                    source = "none"
                else:
                    result = simulate_system(models[system], draws, c, ok)
                    source = cost_sources.get(system, "config")
                rows.append(
                    {
                        "system": system,
                        "N": n,
                        "failures_per_day": per_day,
                        "rate_unit": unit,
                        "days": days,
                        **result,
                        "cost_source": source,
                    }
                )
    return rows
