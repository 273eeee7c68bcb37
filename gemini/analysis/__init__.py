"""The paper's figures from the MLflow store, and the report that sets them beside the
paper's numbers.

Modules, and what a notebook calls:

- :mod:`~gemini.analysis.load`: :func:`load_runs` (one row per job run),
  :func:`load_step_metrics`, :func:`load_simulation` (the newest simulation
  run's CSV tables), :func:`select`, :func:`machine_of`, :func:`dates_of`.
- :mod:`~gemini.analysis.figures`: the measured figures (Figs. 7, 8, 10, 12,
  14, 16 and every backend under every failure kind), and
  :mod:`~gemini.analysis.modelled`: the computed ones (Fig. 9 analytic or
  simulated, Figs. 11 and 15 simulated). Per figure, ``<name>_data`` gives a
  DataFrame, ``fig_<name>`` a matplotlib Figure, ``<name>_ours`` our numbers.
- :mod:`~gemini.analysis.paper`: the paper's values with their source figures.
- :mod:`~gemini.analysis.report`: :data:`FIGURES`, :func:`paper_table` (the
  paper's value beside ours), :func:`write_report`; ``gemini-report``
  (:mod:`~gemini.analysis.cli`) runs it.
- :mod:`~gemini.analysis.notebook`: what the notebooks in ``analysis/`` call:
  :func:`store_uri`, :func:`open_store`, :func:`show` (one figure, its paper
  table, or the reason it is not drawn); :func:`simulation_of` draws
  tables :func:`gemini.simulate.simulate` just computed.
- :mod:`~gemini.analysis.style`: the one figure style (theme, caption,
  legend outside the axes).

    from gemini.analysis import load_runs, iteration_time_data, fig_iteration_time, paper_table

    runs = load_runs("sqlite:////abs/outputs/mlflow.db")
    data = iteration_time_data(runs)
    fig_iteration_time(data)
    paper_table("fig7", data)
"""

from __future__ import annotations

from gemini.analysis.figures import (
    NoData,
    backends_under_failure_data,
    backends_under_failure_table,
    checkpoint_frequency_data,
    checkpoint_frequency_ours,
    fig_backends_under_failure,
    fig_checkpoint_frequency,
    fig_idle_spans,
    fig_interleave_ablation,
    fig_iteration_time,
    fig_recovery_timeline,
    fig_wasted_time,
    idle_spans_data,
    idle_spans_ours,
    interleave_ablation_data,
    interleave_ablation_ours,
    iteration_time_data,
    iteration_time_ours,
    recovery_timeline_data,
    recovery_timeline_ours,
    system_of,
    wasted_time_data,
    wasted_time_ours,
)
from gemini.analysis.load import (
    Simulation,
    StoreError,
    dates_of,
    load_runs,
    load_simulation,
    load_step_metrics,
    machine_of,
    select,
)
from gemini.analysis.modelled import (
    checkpoint_reduction_data,
    checkpoint_reduction_ours,
    effective_time_data,
    effective_time_ours,
    fig_checkpoint_reduction,
    fig_effective_time,
    fig_recovery_probability,
    recovery_probability_data,
    recovery_probability_ours,
    recovery_probability_sim_data,
    simulation_of,
)
from gemini.analysis.notebook import figure_data, open_store, show, store_uri
from gemini.analysis.paper import PAPER, PaperValue, paper_values
from gemini.analysis.report import (
    FIGURES,
    EmptyStore,
    StoreData,
    not_drawn,
    paper_table,
    write_report,
)

__all__ = [
    "FIGURES",
    "PAPER",
    "EmptyStore",
    "NoData",
    "PaperValue",
    "Simulation",
    "StoreData",
    "StoreError",
    "backends_under_failure_data",
    "backends_under_failure_table",
    "checkpoint_frequency_data",
    "checkpoint_frequency_ours",
    "checkpoint_reduction_data",
    "checkpoint_reduction_ours",
    "dates_of",
    "effective_time_data",
    "effective_time_ours",
    "fig_backends_under_failure",
    "fig_checkpoint_frequency",
    "fig_checkpoint_reduction",
    "fig_effective_time",
    "fig_idle_spans",
    "fig_interleave_ablation",
    "fig_iteration_time",
    "fig_recovery_probability",
    "fig_recovery_timeline",
    "fig_wasted_time",
    "figure_data",
    "idle_spans_data",
    "idle_spans_ours",
    "interleave_ablation_data",
    "interleave_ablation_ours",
    "iteration_time_data",
    "iteration_time_ours",
    "load_runs",
    "load_simulation",
    "load_step_metrics",
    "machine_of",
    "not_drawn",
    "open_store",
    "paper_table",
    "paper_values",
    "recovery_probability_data",
    "recovery_probability_ours",
    "recovery_probability_sim_data",
    "recovery_timeline_data",
    "recovery_timeline_ours",
    "select",
    "show",
    "simulation_of",
    "store_uri",
    "system_of",
    "wasted_time_data",
    "wasted_time_ours",
    "write_report",
]
