"""Per-failure and per-checkpoint costs measured by ``gemini`` runs, read back from MLflow.

``costs.from_run=<id>`` reads one run, ``costs.from_experiment=<name>`` every
run of an experiment (simulations excepted). Each run is classed by its
``backend.name`` param: a ``replicated`` run measures Gemini (recovery from
CPU memory), a ``disk`` run the storage baselines. From its summary metrics
(``run/<name>``, see ``gemini.tracking``):

==========================  ===============================================
cost                        measured as (means over the runs of its class)
==========================  ===============================================
``iter_time_s``             ``run/iter_time_s`` (replicated runs; disk runs
                            minus their stall, when there is no replicated one)
``detect_s``                ``run/mean_detect_s``
``restart_s``               ``run/mean_recovery_s`` less detection, retrieval
                            and replay: teardown, takeover, restart,
                            rendezvous, allocation and load
``retrieve_memory_s``       replicated runs' ``run/mean_retrieve_s``
``retrieve_storage_s``      disk runs' ``run/mean_retrieve_s``
``memory_ckpt_s``           replicated runs' ``run/ckpt_time_s``
``storage_ckpt_s``          disk runs' ``run/ckpt_time_s``
``memory_stall_s``          replicated runs' ``run/ckpt_stall_s`` (a mean per
                            step) x ``run/steps`` / ``run/checkpoints``
``storage_stall_s``         the same of disk runs
==========================  ===============================================

Replay (``run/mean_replay_s``) is not taken: the lost training is modelled
from the simulated interval and lag. Replacing a machine (``replace_s``) and
the intervals stay as configured: a local run replaces no cloud instance.
Values a run does not have stay as configured too; ``cost_source`` in
fig15.csv says, per system, whether its costs were measured, configured or
both.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from statistics import mean
from typing import Any

from gemini.config import ConfigError
from gemini.simulate.config import CostConfig

RUN = "run/"
"""Prefix of the run-level summary metrics (``gemini.tracking.RUN_METRICS``)."""

MEMORY_FIELDS = ("retrieve_memory_s", "memory_ckpt_s", "memory_stall_s")
STORAGE_FIELDS = ("retrieve_storage_s", "storage_ckpt_s", "storage_stall_s")
COMMON_FIELDS = ("iter_time_s", "detect_s", "restart_s")

SYSTEM_FIELDS = {
    "gemini": (*COMMON_FIELDS, *MEMORY_FIELDS, *STORAGE_FIELDS),
    "highfreq": (*COMMON_FIELDS, *STORAGE_FIELDS),
    "strawman": (*COMMON_FIELDS, *STORAGE_FIELDS),
}
"""The measurable costs each system's simulation uses."""

_BACKEND_CLASS = {"replicated": "memory", "disk": "storage"}


def _metric(metrics: dict[str, float], name: str) -> float | None:
    v = metrics.get(RUN + name)
    return float(v) if v is not None else None


def measured_values(metrics: dict[str, float], backend: str) -> dict[str, float]:
    """The costs one run measured (its class decides which), by ``CostConfig`` field."""
    kind = _BACKEND_CLASS.get(backend)
    if kind is None:
        return {}
    out: dict[str, float] = {}
    iter_time = _metric(metrics, "iter_time_s")
    stall = _metric(metrics, "ckpt_stall_s")
    steps = _metric(metrics, "steps")
    checkpoints = _metric(metrics, "checkpoints")
    ckpt = _metric(metrics, "ckpt_time_s")
    retrieve = _metric(metrics, "mean_retrieve_s")
    if iter_time is not None:
        # A disk run's steps include its blocking writes: what training alone
        # takes is the step less the stall.
        out["iter_time_s"] = iter_time - (stall or 0.0) if kind == "storage" else iter_time
    if ckpt is not None:
        out[f"{kind}_ckpt_s"] = ckpt
    if stall is not None and steps and checkpoints:
        out[f"{kind}_stall_s"] = stall * steps / checkpoints
    if retrieve is not None:
        out[f"retrieve_{kind}_s"] = retrieve
    detect = _metric(metrics, "mean_detect_s")
    recovery = _metric(metrics, "mean_recovery_s")
    replay = _metric(metrics, "mean_replay_s") or 0.0
    if detect is not None:
        out["detect_s"] = detect
    if recovery is not None and detect is not None and retrieve is not None:
        out["restart_s"] = max(0.0, recovery - detect - retrieve - replay)
    return out


def combine(runs: list[tuple[str, dict[str, float]]]) -> dict[str, float]:
    """Means over runs of each measured cost; common costs from replicated runs first.

    ``runs``: (backend name, ``measured_values``) per run.
    """
    by_field: dict[str, dict[str, list[float]]] = {}
    for backend, measured in runs:
        for name, v in measured.items():
            by_field.setdefault(name, {}).setdefault(backend, []).append(v)
    out: dict[str, float] = {}
    for name, per_backend in by_field.items():
        # Detection, restart and the iteration are the cluster's, not the
        # backend's; Gemini's own runs measure them without storage writes.
        values = per_backend.get("replicated") or per_backend.get("disk") or []
        if values:
            out[name] = mean(values)
    return out


def _client(uri: str, key: str, value: str) -> Any:
    from gemini.tracking import _mlflow

    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_file():
        # MLflow would create an empty store there and then find nothing.
        raise ConfigError(
            key,
            value,
            f"no MLflow store at {uri}: point costs.uri (or tracking.uri) at the runs' store",
        )
    return _mlflow().MlflowClient(uri)


def _values_of(run: Any) -> tuple[str, dict[str, float]]:
    backend = run.data.params.get("backend.name", "")
    return backend, measured_values(dict(run.data.metrics), backend)


def costs_from_mlflow(base: CostConfig, uri: str) -> tuple[CostConfig, set[str], str]:
    """``base`` with the values measured by its ``from_run``/``from_experiment`` runs.

    Returns the costs, the names of the measured fields and a label of where
    they came from (``run:<id>`` or ``experiment:<name>``). Refuses, as a
    ConfigError, a run or experiment that is not there or measured nothing.
    """
    if not (base.from_run or base.from_experiment):
        return base, set(), "config"
    if base.from_run:
        key, value, label = "costs.from_run", base.from_run, f"run:{base.from_run}"
    else:
        key, value = "costs.from_experiment", base.from_experiment
        label = f"experiment:{base.from_experiment}"
    client = _client(uri, key, value)
    runs: list[tuple[str, dict[str, float]]] = []
    if base.from_run:
        try:
            runs.append(_values_of(client.get_run(base.from_run)))
        except Exception as e:  # mlflow's own error for an unknown id
            raise ConfigError(key, value, f"no such run in {uri}: give a run id") from e
    else:
        exp = client.get_experiment_by_name(base.from_experiment)
        if exp is None:
            raise ConfigError(key, value, f"no such experiment in {uri}: give its name")
        found = client.search_runs([exp.experiment_id], max_results=5000)
        runs = [_values_of(r) for r in found if r.data.tags.get("kind") != "simulation"]
    measured = combine(runs)
    if not measured:
        raise ConfigError(
            key,
            value,
            "measured no cost (needs a replicated or disk run with run/ metrics): "
            "choose runs of `gemini backend=replicated` or `backend=disk`",
        )
    costs = dataclasses.replace(base)
    for name, v in measured.items():
        setattr(costs, name, v)
    return costs, set(measured), label


def cost_sources(measured: set[str], label: str, systems: list[str]) -> dict[str, str]:
    """Per system: ``label`` if all its costs were measured, ``config`` if none, else both."""
    out = {}
    for system in systems:
        used = set(SYSTEM_FIELDS.get(system, ()))
        if not used:
            continue
        hit = used & measured
        out[system] = "config" if not hit else label if hit == used else f"{label}+config"
    return out
