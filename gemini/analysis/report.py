"""The report: every figure the store has data for, each beside the paper's numbers.

:func:`write_report` reads the store (job runs and the newest simulation run),
draws each figure of :data:`FIGURES` that has data into a PNG, and writes
``report.md`` (the PNGs beside it) and a self-contained ``report.html`` (the
figures embedded, the CSS inline, nothing fetched). Each figure comes with
:func:`paper_table`: the paper's value, ours, their ratio, what kind of
number ours is (measured, analytic, simulated), the machine and the date. A
figure without data is listed with the reason and the command that would
produce its data. The report is logged as a run of its own (tag
``kind=report``) with both files and the PNGs as artifacts; the report's
readers leave such runs out of every job table.

``gemini-report`` (:mod:`gemini.analysis.cli`) is the console script over it.
"""

from __future__ import annotations

import datetime as dt
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from gemini.analysis import figures as f
from gemini.analysis import modelled as m
from gemini.analysis import style
from gemini.analysis.figures import NoData
from gemini.analysis.load import Simulation, StoreError, client, load_runs, load_simulation
from gemini.analysis.paper import paper_values

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RUN_FIRST = "run a sweep first (e.g. gemini -m +sweep=backends_under_failure)"
"""The fix named when the store has no job runs."""


class EmptyStore(StoreError):
    """The store has no job run to report on."""


@dataclass
class StoreData:
    """What the figures are drawn from."""

    runs: pd.DataFrame
    """Job runs (:func:`gemini.analysis.load.load_runs`)."""
    simulation: Simulation | None = None
    """The newest simulation run and its tables, if any."""


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report."""

    key: str
    """Key of the paper's values (``fig7``) and of the figure in the report."""
    name: str
    """File name of its PNG, without ``.png``."""
    title: str
    """Heading in the report."""
    data: Callable[[StoreData], pd.DataFrame]
    """Its data from the store; raises :class:`NoData` when there is none."""
    draw: Callable[[pd.DataFrame], Figure]
    """The figure from that data."""
    ours: Callable[[pd.DataFrame], dict[str, float]] | None
    """Our numbers beside the paper's (None: the paper has none for it)."""
    command: str
    """The command that produces its data."""
    table: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    """A table of results shown under the figure, if any."""


def _fig9_data(store: StoreData) -> pd.DataFrame:
    sim = store.simulation
    if sim is not None and "fig9" in sim.tables:
        return m.recovery_probability_sim_data(sim)
    return m.recovery_probability_data()


FIGURES: dict[str, FigureSpec] = {
    s.key: s
    for s in (
        FigureSpec(
            "fig7", "fig7_iteration_time", "Fig. 7: iteration time with and without checkpoints",
            lambda s: f.iteration_time_data(s.runs), f.fig_iteration_time,
            f.iteration_time_ours, "gemini -m +sweep=fig7_overhead",
        ),
        FigureSpec(
            "fig8", "fig8_idle_spans", "Fig. 8: idle network time vs checkpoint traffic",
            lambda s: f.idle_spans_data(s.runs), f.fig_idle_spans, f.idle_spans_ours,
            "gemini -m +sweep=idle_spans",
        ),
        FigureSpec(
            "fig9", "fig9_recovery_probability", "Fig. 9: recovery probability vs N",
            _fig9_data, m.fig_recovery_probability, m.recovery_probability_ours,
            m.SIM_COMMAND,
        ),
        FigureSpec(
            "fig10", "fig10_wasted_time", "Fig. 10: wasted time per failure",
            lambda s: f.wasted_time_data(s.runs), f.fig_wasted_time, f.wasted_time_ours,
            "gemini -m +sweep=fig10_wasted",
        ),
        FigureSpec(
            "fig11", "fig11_checkpoint_reduction", "Fig. 11: checkpoint-time reduction",
            lambda s: m.checkpoint_reduction_data(s.simulation), m.fig_checkpoint_reduction,
            m.checkpoint_reduction_ours, m.SIM_COMMAND,
        ),
        FigureSpec(
            "fig12", "fig12_checkpoint_frequency", "Fig. 12: checkpoints per hour",
            lambda s: f.checkpoint_frequency_data(s.runs), f.fig_checkpoint_frequency,
            f.checkpoint_frequency_ours, "gemini -m +sweep=fig12_frequency",
        ),
        FigureSpec(
            "fig14", "fig14_recovery_timeline", "Fig. 14: one failure, phase by phase",
            lambda s: f.recovery_timeline_data(s.runs), f.fig_recovery_timeline,
            f.recovery_timeline_ours, "gemini -m +sweep=fig14_timeline",
        ),
        FigureSpec(
            "fig15", "fig15_effective_time", "Fig. 15: effective training time at scale",
            lambda s: m.effective_time_data(s.simulation), m.fig_effective_time,
            m.effective_time_ours, m.SIM_COMMAND,
        ),
        FigureSpec(
            "fig16", "fig16_interleave_ablation", "Fig. 16: traffic interleaving ablation",
            lambda s: f.interleave_ablation_data(s.runs), f.fig_interleave_ablation,
            f.interleave_ablation_ours, "gemini -m +sweep=interleave_ablation",
        ),
        FigureSpec(
            "backends_under_failure", "backends_under_failure",
            "Every backend under every failure kind",
            lambda s: f.backends_under_failure_data(s.runs), f.fig_backends_under_failure,
            None, "gemini -m +sweep=backends_under_failure", f.backends_under_failure_table,
        ),
    )
}  # fmt: skip
"""Every figure of the report, in order."""


def not_drawn(spec: FigureSpec, why: str) -> str:
    """The line that says a figure was not drawn, why, and the command that produces its
    data (``gemini-report`` prints it; so do the notebooks)."""
    return f"not drawn: {spec.title}: {why}; run `{spec.command}`"


def _ratio(ours: float, paper: float | None) -> float:
    if paper is None or paper == 0 or ours != ours:
        return math.nan
    return ours / paper


def paper_table(figure: str, data: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's values for ``figure`` (a key of :data:`FIGURES`) beside ours.

    Columns: quantity, paper (as the paper states it), paper_value, ours,
    unit, ratio (ours / paper), at (where ours were taken), kind (measured, analytic or simulated),
    machine, date, source (where in the paper). Ours come from ``data`` (the
    figure's data function's frame); without it, ours are NaN.
    """
    if figure not in FIGURES:
        raise KeyError(f"figure {figure!r}: use one of {', '.join(FIGURES)}")
    spec = FIGURES[figure]
    ours = spec.ours(data) if data is not None and spec.ours is not None else {}
    facts: dict[str, Any] = dict(data.attrs) if data is not None else {}
    rows = []
    for p in paper_values(figure):
        value = float(ours.get(p.quantity, math.nan))
        rows.append(
            {
                "quantity": p.label,
                "paper": p.shown,
                "paper_value": p.value,
                "ours": value,
                "unit": p.unit,
                "ratio": _ratio(value, p.value),
                "at": facts.get("ours_at", ""),
                "kind": facts.get("kind", ""),
                "machine": facts.get("machine", ""),
                "date": facts.get("date", ""),
                "source": p.source,
            }
        )
    return pd.DataFrame(rows)


@dataclass
class Section:
    """One drawn figure of the report."""

    spec: FigureSpec
    """Which figure."""
    png: Path
    """Its PNG file."""
    caption: str
    """Kind, machine, date and how its runs were chosen."""
    paper: pd.DataFrame
    """:func:`paper_table` for it."""
    results: pd.DataFrame | None = None
    """The figure's own table of results, if it has one."""
    note: str = ""
    """A line under it (e.g. how to get the simulated version)."""


@dataclass
class Report:
    """Everything :func:`write_report` wrote, and where."""

    uri: str
    """The store read."""
    experiment: str
    """The experiment read."""
    out_dir: Path
    """Where the files are."""
    created: str
    """When and where the report was made."""
    job_runs: int
    """How many job runs the store holds."""
    sections: list[Section] = field(default_factory=list)
    """The figures drawn, in order."""
    skipped: list[tuple[FigureSpec, str]] = field(default_factory=list)
    """The figures not drawn, each with the reason."""
    markdown: Path | None = None
    """``report.md``."""
    html: Path | None = None
    """``report.html``."""
    run_id: str | None = None
    """The report's own MLflow run (None when not logged)."""

    @property
    def pngs(self) -> list[Path]:
        """Every figure file, in order."""
        return [s.png for s in self.sections]


def caption_of(data: pd.DataFrame) -> str:
    """The caption's facts for a report section (the figure carries them too)."""
    a = data.attrs
    return f"{a.get('kind', 'measured')} on {a.get('machine', '?')}, {a.get('date', '?')}; " + str(
        a.get("how", "")
    )


def read_store(uri: str, experiment: str) -> StoreData:
    """The job runs and the newest simulation; :class:`EmptyStore` where there are no jobs."""
    runs = load_runs(uri, experiment)
    if runs.empty:
        raise EmptyStore(f"no job runs in experiment {experiment!r}")
    return StoreData(runs, load_simulation(uri, experiment))


def write_report(uri: str, out_dir: Path, experiment: str = "gemini", log: bool = True) -> Report:
    """Draw every figure with data into ``out_dir``, write report.md and report.html, and
    (``log``) record them as a ``kind=report`` run of ``experiment``.

    Raises :class:`StoreError` (a missing store, :class:`EmptyStore`: no job
    runs) before anything is written.
    """
    from gemini.analysis import render

    store = read_store(uri, experiment)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now().astimezone()
    report = Report(
        uri=uri,
        experiment=experiment,
        out_dir=out_dir,
        created=f"{now:%Y-%m-%d %H:%M %Z} on {socket.gethostname()}",
        job_runs=len(store.runs),
    )
    for spec in FIGURES.values():
        try:
            data = spec.data(store)
            fig = spec.draw(data)
        except NoData as e:
            report.skipped.append((spec, str(e)))
            continue
        png = style.save(fig, out_dir / f"{spec.name}.png")
        note = ""
        if spec.key == "fig9" and data.attrs.get("kind") == "analytic":
            note = f"Analytic only: `{m.SIM_COMMAND}` adds exact enumeration and Monte Carlo."
        report.sections.append(
            Section(
                spec,
                png,
                caption_of(data),
                paper_table(spec.key, data),
                spec.table(data) if spec.table else None,
                note,
            )
        )
    report.markdown = out_dir / "report.md"
    report.markdown.write_text(render.markdown(report))
    report.html = out_dir / "report.html"
    report.html.write_text(render.html(report))
    if log:
        report.run_id = log_report(report)
    return report


def log_report(report: Report) -> str:
    """Record the report as a run (tag ``kind=report``) with its files as artifacts."""
    c = client(report.uri)
    exp = c.get_experiment_by_name(report.experiment)
    run = c.create_run(
        exp.experiment_id,
        run_name=f"report {report.out_dir.name}",
        tags={
            "kind": "report",
            "host": socket.gethostname(),
            "out_dir": str(report.out_dir.resolve()),
            "figures": ",".join(s.spec.key for s in report.sections),
            "skipped": ",".join(spec.key for spec, _ in report.skipped),
        },
    )
    rid = str(run.info.run_id)
    for path in (report.markdown, report.html, *report.pngs):
        if path is not None:
            c.log_artifact(rid, str(path))
    c.set_terminated(rid)
    return rid
