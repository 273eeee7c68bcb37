"""What the notebooks in ``analysis/`` call: the store to read, and one figure shown as the
report shows it.

Every notebook starts with the same two cells::

    URI = store_uri()                 # $GEMINI_TRACKING_URI, else the store `gemini` uses
    store = open_store(URI, "gemini")  # job runs + the newest simulation run

and draws each figure with one call, ``data = show("fig7", store)``: the
figure (the same PNG ``gemini-report`` writes), the paper's values beside
ours (:func:`gemini.analysis.report.paper_table`) and the figure's own table
of results if it has one; it returns the figure's data for further looks.
Where the store has nothing to draw, it prints the line ``gemini-report``
prints (why, and the command that produces the data) and returns None, so a
notebook runs to its end on any store, even a missing one.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, TypeAlias

import pandas as pd

from gemini.analysis import modelled as m
from gemini.analysis import style
from gemini.analysis.figures import NoData
from gemini.analysis.load import Simulation, StoreError, load_runs, load_simulation
from gemini.analysis.report import (
    FIGURES,
    RUN_FIRST,
    FigureSpec,
    StoreData,
    not_drawn,
    paper_table,
)

if TYPE_CHECKING:
    from collections.abc import Callable

ENV_URI = "GEMINI_TRACKING_URI"
"""Environment variable that names the store a notebook reads (a test or a user sets it)."""

SIM_DATA: dict[str, Callable[[Simulation | None], pd.DataFrame]] = {
    "fig9": m.recovery_probability_sim_data,
    "fig11": m.checkpoint_reduction_data,
    "fig15": m.effective_time_data,
}
"""The figures a :class:`Simulation` (logged or computed in the notebook) draws."""

Source: TypeAlias = "StoreData | Simulation | pd.DataFrame | None"
"""What :func:`show` draws from."""


def store_uri() -> str:
    """``$GEMINI_TRACKING_URI`` if set, else the store ``gemini`` and ``gemini-report``
    use by default: ``sqlite:///<GEMINI_OUTPUTS or outputs/>/mlflow.db``."""
    from gemini.config import GeminiConfig, PathsConfig, TrackingConfig, default_outputs
    from gemini.tracking import tracking_uri

    cfg = GeminiConfig(
        tracking=TrackingConfig(uri=os.environ.get(ENV_URI, "")),
        paths=PathsConfig(outputs=default_outputs()),
    )
    return tracking_uri(cfg)


def open_store(uri: str, experiment: str = "gemini") -> StoreData:
    """The job runs of ``experiment`` and the newest simulation run, with one line that
    says what was found. A missing store prints why and gives an empty one: every
    figure then says it has no data, and the computed figures still draw."""
    try:
        runs = load_runs(uri, experiment)
        sim = load_simulation(uri, experiment)
    except StoreError as e:
        print(f"{uri}: {e}; {RUN_FIRST}")
        return StoreData(pd.DataFrame())
    line = f"{len(runs)} job runs in experiment {experiment!r} of {uri}"
    if sim is None:
        line += "; no simulation run"
    else:
        line += f"; newest simulation run {sim.run_id[:8]} of {sim.start_time:%Y-%m-%d %H:%M}"
    if runs.empty:
        line += f"; {RUN_FIRST}"
    print(line)
    return StoreData(runs, sim)


def figure_data(figure: str, source: Source) -> pd.DataFrame:
    """The data ``figure`` draws from ``source``: a store (the runs ``gemini-report``
    would pick), a simulation (Figs. 9, 11, 15: its tables), or the data itself.
    Raises :class:`NoData` when there is nothing to draw."""
    spec = _spec(figure)
    if isinstance(source, pd.DataFrame):
        return source
    if isinstance(source, StoreData):
        return spec.data(source)
    if figure not in SIM_DATA:
        raise ValueError(f"figure {figure!r} is measured: pass the store, not a simulation")
    return SIM_DATA[figure](source)


def show(figure: str, source: Source) -> pd.DataFrame | None:
    """Show ``figure`` (a key of :data:`gemini.analysis.report.FIGURES`) drawn from
    ``source`` (see :func:`figure_data`), the paper's values beside ours and the figure's
    table of results; return its data. Without data: print the reason and the command
    that produces it, and return None."""
    from IPython.display import Image, display

    spec = _spec(figure)
    try:
        data = figure_data(figure, source)
        fig = spec.draw(data)
    except NoData as e:
        print(not_drawn(spec, str(e)))
        return None
    display(Image(data=style.png(fig), format="png"))
    paper = paper_table(figure, data)
    if not paper.empty:
        display(paper.drop(columns=["paper_value"]))
    if spec.table is not None:
        display(spec.table(data))
    return data


def _spec(figure: str) -> FigureSpec:
    if figure not in FIGURES:
        raise KeyError(f"figure {figure!r}: use one of {', '.join(FIGURES)}")
    return FIGURES[figure]
