"""The simulator's configuration: a dataclass schema with per-field docs and its checks.

``conf/simulate.yaml`` extends :class:`SimulateConfig` (registered as
``base_simulate``); :func:`check` refuses what a type cannot (ranges, choices)
with a :class:`gemini.config.ConfigError` naming the key, the value and the
fix, before anything is written.

The defaults are the paper's setting (Wang et al., SOSP 2023): 16 to 1000
machines, m = 2, GPT-2 100B on p4d instances (62 s iterations, 400 Gbit/s
NICs), remote storage of 20 Gbit/s aggregate, Strawman checkpointing every
3 h and HighFreq every 9 iterations. Where a cost is derived rather than
quoted, the field's docstring says how.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from gemini.config import ConfigError, PathsConfig, TrackingConfig, default_outputs

FIGURES = ("fig9", "fig11", "fig15")
SYSTEMS = ("gemini", "highfreq", "strawman", "ideal")
"""``ideal``: no failure and no checkpoint cost (effective ratio 1), the reference line."""
RATE_UNITS = ("cluster", "node")
PROCESSES = ("poisson", "weibull")

OPT_FAILURES_PER_NODE_PER_DAY = 0.0134
"""Failures per machine per day in OPT-175B's training logs, the rate of the paper's
Fig. 15b (about 0.91 of the time trains at 1,000 instances)."""

MAX_FAILURE_DRAWS = 50_000_000
"""Most failures one (system, N, rate) cell may draw over all trials (memory, ~1 GB)."""


@dataclass
class ProbabilityConfig:
    """Fig. 9: probability that k simultaneous machine failures leave every checkpoint in memory."""

    ks: list[int] = field(default_factory=lambda: [2, 3])
    """Simultaneous failures k; rows with k > N are left out."""
    placements: list[str] = field(default_factory=lambda: ["group", "ring"])
    """Placements compared. ``group`` is Algorithm 1: it becomes ``mixed`` where m does
    not divide N (``gemini.checkpoint.placement.resolve_placement``)."""
    exact_limit: int = 200_000_000
    """Enumerate exactly only where C(N, k) x N x m, the cells the enumeration marks, is at
    most this (2e8: about a second; N = 128 with k = 3 is 8.7e7, N = 1000 with k = 2
    is 1e9); above it only the closed form (group, m | N) and Monte Carlo are drawn.
    ``placement`` itself refuses more than ``EXACT_ENUMERATION_LIMIT`` sets."""
    monte_carlo_trials: int = 10_000
    """Failure sets drawn per Monte Carlo row; a row costs about trials x N x m cells
    (about 3 s at N = 10,000)."""


@dataclass
class CheckpointTimeConfig:
    """Fig. 11: time of one checkpoint, remote storage vs Gemini's CPU memory."""

    net_gbps: list[float] = field(default_factory=lambda: [100.0, 400.0])
    """Each machine's NIC, Gbit/s (p3dn: 100, p4d: 400)."""
    storage_gbps: float = 20.0
    """Aggregate bandwidth of the remote persistent storage, Gbit/s, shared by all machines."""
    ckpt_gb: float = 75.0
    """Checkpoint bytes per machine, GB (1e9): GPT-2 100B's ~1.2 TB of model states
    (12 bytes per parameter: fp32 weights and two Adam moments) over 16 machines."""
    local_gbps: float = 0.0
    """GPU-to-CPU copy of the local replica, Gbit/s, added to Gemini's time;
    0 = not modelled (it overlaps training in the paper's design)."""


@dataclass
class FailureProcessConfig:
    """Fig. 15: the failures that hit a training run."""

    rate_unit: str = "cluster"
    """What ``failures_per_day`` counts: ``cluster`` (failures per day of the whole
    cluster, whatever N: Fig. 15a) or ``node`` (failures per machine per day, so the
    cluster's rate grows with N: Fig. 15b; OPT-175B's logs give about 0.0134)."""
    per_node_per_day: float = OPT_FAILURES_PER_NODE_PER_DAY
    """Fig. 15b beside ``failures_per_day``: every N is also simulated at this many
    failures per machine per day (a cluster rate of N times it), in rows whose
    ``rate_unit`` is ``node``. The default is OPT-175B's logs, the paper's rate for
    its "about 0.91 at 1,000 instances"; 0 = off (only ``failures_per_day``). Left
    out where ``rate_unit=node`` and ``failures_per_day`` already holds it."""
    process: str = "poisson"
    """Inter-failure times: ``poisson`` (exponential) or ``weibull`` (same mean, shape
    ``weibull_shape``; a renewal process started at the run's start)."""
    weibull_shape: float = 0.7
    """Shape of the Weibull inter-failure times (< 1: failures come in bursts)."""
    trials: int = 200
    """Training runs simulated per (system, N, rate); the CSV has their mean."""
    placement: str = "group"
    """Replica placement of the simulated Gemini cluster (``group`` becomes ``mixed``
    where m does not divide N)."""
    software_fraction: float = 0.0
    """Share of failures that are software failures (the host survives: its own CPU
    memory has the checkpoint and no machine is replaced); the rest lose machines."""
    multi_node_probability: float = 0.0
    """Share of hardware failures that take ``multi_node_count`` machines at once
    (a rack, a switch); the others take one."""
    multi_node_count: int = 2
    """Machines a multi-node failure takes; the chance that they leave every checkpoint
    a copy in memory is ``placement.recovery_probability``."""
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    """Systems simulated side by side: ``gemini``, ``highfreq``, ``strawman``, ``ideal``."""


@dataclass
class CostConfig:
    """What one failure and one checkpoint cost. Measured runs can replace these values."""

    from_run: str = ""
    """Take the costs from this MLflow run id (a ``gemini`` run with a failure)."""
    from_experiment: str = ""
    """Take the costs from every run of this MLflow experiment: ``replicated`` runs give
    Gemini's, ``disk`` runs the storage baselines', means over runs."""
    uri: str = ""
    """Store to read ``from_run``/``from_experiment`` in; empty = ``tracking.uri``'s store."""
    iter_time_s: float = 62.0
    """T_iter: one training iteration (GPT-2 100B on 16 p4d, Fig. 7)."""
    detect_s: float = 15.0
    """Failure -> detected (Fig. 14: 15 s)."""
    restart_s: float = 253.0
    """Detected -> training again, retrieval excepted: teardown, restart, rendezvous,
    load and warm-up (Fig. 14: 253 s of warm-up)."""
    replace_s: float = 0.0
    """Waiting for a lost machine's replacement, paid by hardware failures only. 0 = a
    standby machine takes over at once, as the costs above assume; Fig. 14 measured
    4-7 min to replace a cloud instance without one."""
    retrieve_memory_s: float = 162.0
    """Retrieving every rank's checkpoint from CPU memory (Fig. 14: 162 s)."""
    retrieve_storage_s: float = 540.0
    """Retrieving it from remote storage: the same bytes as a storage checkpoint."""
    memory_ckpt_s: float = 62.0
    """t_ckpt of Gemini: a checkpoint completes in CPU memory one iteration after its
    step (it is sent during the next iteration's idle network time)."""
    storage_ckpt_s: float = 540.0
    """t_ckpt to remote storage. HighFreq checkpoints every ceil(t_ckpt / T_iter)
    iterations, 9 for GPT-2 100B: 540 s gives 9 x 62 s."""
    memory_stall_s: float = 0.0
    """Training time lost per Gemini checkpoint (interleaving hides it: Fig. 7)."""
    storage_stall_s: float = 81.0
    """Training time lost per storage checkpoint: HighFreq costs 14.5% of training time
    at an interval of 9 x 62 s = 558 s, i.e. 81 s per checkpoint. Strawman pays it every
    3 h, and so does Gemini for its persistent checkpoint."""
    every_n: int = 1
    """Gemini checkpoints to CPU memory every this many iterations."""
    strawman_interval_s: float = 10800.0
    """Strawman checkpoints to storage every 3 h."""
    persist_interval_s: float = 10800.0
    """Gemini's own persistent checkpoint, the last resort when every copy of some
    checkpoint is lost: every 3 h."""


@dataclass
class SimulateConfig:
    nodes: list[int] = field(default_factory=lambda: [16, 128, 1000])
    """Cluster sizes N simulated (every figure)."""
    factor: int = 2
    """m: copies of each checkpoint in CPU memory, the local one included."""
    failures_per_day: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    """Failure rates of Fig. 15, per day; ``failures.rate_unit`` says of what."""
    days: float = 30.0
    """Length of each simulated training run, days (wall-clock)."""
    seed: int = 0
    """Seed of every random draw: the same config gives the same CSVs."""
    figures: list[str] = field(default_factory=lambda: list(FIGURES))
    """Which tables to compute: ``fig9``, ``fig11``, ``fig15``."""
    probability: ProbabilityConfig = field(default_factory=ProbabilityConfig)
    checkpoint: CheckpointTimeConfig = field(default_factory=CheckpointTimeConfig)
    failures: FailureProcessConfig = field(default_factory=FailureProcessConfig)
    costs: CostConfig = field(default_factory=CostConfig)
    tracking: TrackingConfig = field(
        default_factory=lambda: TrackingConfig(experiment="gemini-simulate")
    )
    paths: PathsConfig = field(default_factory=PathsConfig)
    progress: bool = True
    """Print the short tables on the console."""


def register() -> None:
    """Register the schema so that conf/simulate.yaml is typed by it."""
    if not OmegaConf.has_resolver("gemini_outputs"):
        OmegaConf.register_new_resolver("gemini_outputs", default_outputs)
    ConfigStore.instance().store(name="base_simulate", node=SimulateConfig)


def list_keys(schema: type = SimulateConfig, prefix: str = "") -> set[str]:
    """Dotted keys whose value is a list (``nodes``, ``probability.ks``, ...)."""
    out: set[str] = set()
    for f in fields(schema):
        key = prefix + f.name
        default = f.default_factory() if callable(f.default_factory) else f.default
        if isinstance(default, list):
            out.add(key)
        elif is_dataclass(default):
            out |= list_keys(type(default), key + ".")
    return out


# --------------------------------------------------------------------------- checks


def _choices(key: str, values: list[str], allowed: tuple[str, ...]) -> None:
    for v in values:
        if v not in allowed:
            raise ConfigError(key, v, f"use one of {', '.join(allowed)}")


def _non_empty(key: str, values: list[Any]) -> None:
    if not values:
        raise ConfigError(key, values, "give at least one value, e.g. [16,128]")


def _finite_at_least(key: str, value: float, low: float, strict: bool = False) -> None:
    bad = not math.isfinite(value) or (value <= low if strict else value < low)
    if bad:
        raise ConfigError(key, value, f"use a number {'>' if strict else '>='} {low:g}")


def check(cfg: SimulateConfig) -> None:
    """Refuse every value the simulation would fail on, naming the key and the fix."""
    from gemini.checkpoint.placement import PLACEMENTS

    _non_empty("nodes", cfg.nodes)
    _finite_at_least("factor", cfg.factor, 1)
    for n in cfg.nodes:
        if n < cfg.factor:
            raise ConfigError(
                "nodes", n, f"every N must hold factor={cfg.factor} copies: use N >= {cfg.factor}"
            )
    _finite_at_least("days", cfg.days, 0, strict=True)
    _non_empty("figures", cfg.figures)
    _choices("figures", cfg.figures, FIGURES)

    p = cfg.probability
    if "fig9" in cfg.figures:
        _non_empty("probability.ks", p.ks)
        _non_empty("probability.placements", p.placements)
    for k in p.ks:
        _finite_at_least("probability.ks", k, 0)
    _choices("probability.placements", p.placements, PLACEMENTS)
    _finite_at_least("probability.exact_limit", p.exact_limit, 0)
    _finite_at_least("probability.monte_carlo_trials", p.monte_carlo_trials, 1)

    c = cfg.checkpoint
    if "fig11" in cfg.figures:
        _non_empty("checkpoint.net_gbps", c.net_gbps)
    for b in c.net_gbps:
        _finite_at_least("checkpoint.net_gbps", b, 0, strict=True)
    _finite_at_least("checkpoint.storage_gbps", c.storage_gbps, 0, strict=True)
    _finite_at_least("checkpoint.ckpt_gb", c.ckpt_gb, 0, strict=True)
    _finite_at_least("checkpoint.local_gbps", c.local_gbps, 0)

    f = cfg.failures
    if "fig15" in cfg.figures:
        _non_empty("failures_per_day", cfg.failures_per_day)
        _non_empty("failures.systems", f.systems)
    for r in cfg.failures_per_day:
        _finite_at_least("failures_per_day", r, 0)
    _choices("failures.rate_unit", [f.rate_unit], RATE_UNITS)
    _finite_at_least("failures.per_node_per_day", f.per_node_per_day, 0)
    _choices("failures.process", [f.process], PROCESSES)
    _choices("failures.placement", [f.placement], PLACEMENTS)
    _choices("failures.systems", f.systems, SYSTEMS)
    _finite_at_least("failures.weibull_shape", f.weibull_shape, 0, strict=True)
    _finite_at_least("failures.trials", f.trials, 1)
    for name in ("software_fraction", "multi_node_probability"):
        value = getattr(f, name)
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ConfigError(f"failures.{name}", value, "use a share between 0 and 1")
    _finite_at_least("failures.multi_node_count", f.multi_node_count, 1)
    if f.multi_node_probability > 0 and f.multi_node_count > min(cfg.nodes):
        raise ConfigError(
            "failures.multi_node_count",
            f.multi_node_count,
            f"a failure cannot take more machines than the smallest N={min(cfg.nodes)}",
        )
    if "fig15" in cfg.figures:
        _check_draws(cfg)
    check_costs(cfg.costs)


def _check_draws(cfg: SimulateConfig) -> None:
    largest = max(cfg.nodes)
    listed = max(cfg.failures_per_day) * (largest if cfg.failures.rate_unit == "node" else 1)
    per_node = cfg.failures.per_node_per_day * largest
    per_day = max(listed, per_node)
    draws = per_day * cfg.days * cfg.failures.trials
    if draws > MAX_FAILURE_DRAWS:
        # Name the per-machine rate where it, not the listed rates, is the largest.
        lower = ", or a lower failures.per_node_per_day" if per_node > listed else ""
        raise ConfigError(
            "failures.trials",
            cfg.failures.trials,
            f"{draws:.3g} failures to draw for the largest rate, more than "
            f"{MAX_FAILURE_DRAWS:.0e}: use fewer trials or days{lower}",
        )


def check_costs(c: CostConfig) -> None:
    """Cost values are durations >= 0; the iteration and the intervals are > 0."""
    if c.from_run and c.from_experiment:
        raise ConfigError(
            "costs.from_experiment", c.from_experiment, "give costs.from_run or this, not both"
        )
    for name in ("iter_time_s", "strawman_interval_s", "persist_interval_s"):
        _finite_at_least(f"costs.{name}", getattr(c, name), 0, strict=True)
    for name in (
        "detect_s",
        "restart_s",
        "replace_s",
        "retrieve_memory_s",
        "retrieve_storage_s",
        "memory_ckpt_s",
        "storage_ckpt_s",
        "memory_stall_s",
        "storage_stall_s",
    ):
        _finite_at_least(f"costs.{name}", getattr(c, name), 0)
    _finite_at_least("costs.every_n", c.every_n, 1)
