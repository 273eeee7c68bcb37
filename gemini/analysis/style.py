"""The one figure style of every figure the project draws.

One seaborn theme (:func:`apply`), figures laid out by matplotlib's
constrained layout (:func:`new_figure`), the title above everything
(:func:`title`), a legend outside the axes on the right (:func:`legend_outside`)
so that it never covers the title or the data, and a caption under the axes
(:func:`caption`) that says what kind of number the figure shows (measured,
analytic, simulated), on which machine and when. The report's figures and a
job's recovery timeline (:mod:`gemini.timeline`) all go through here.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

KINDS = ("measured", "analytic", "simulated")
"""What a figure's numbers are; every caption starts with one of these."""
DPI = 120
"""Resolution of the PNG files."""
_RC = {
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "figure.titlesize": 11,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "savefig.facecolor": "white",
}


def apply() -> None:
    """Set the theme: seaborn's whitegrid with the colour-blind palette, small print."""
    import matplotlib

    # Files only: no display on a cluster, in CI or in the job's controller. A
    # Jupyter kernel (ipykernel sets MPLBACKEND) keeps its inline backend, so that
    # a figure left open, or one a user draws, still shows in the notebook.
    if "inline" not in os.environ.get("MPLBACKEND", ""):
        matplotlib.use("Agg")
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", rc=_RC)


def new_figure(width: float = 7.5, height: float = 4.0, ncols: int = 1) -> tuple[Figure, Any]:
    """A themed figure with ``ncols`` axes in a row; constrained layout makes room for
    the title, the legend outside and the caption."""
    apply()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), layout="constrained")
    return fig, axes


def title(fig: Figure, text: str) -> None:
    """The figure's title, above every axes and legend."""
    fig.suptitle(text, fontweight="bold")


def legend_outside(ax: Axes, title_text: str | None = None, **kwargs: Any) -> None:
    """Move (or make) ``ax``'s legend outside it, on the right: it covers neither data
    nor title, however many entries it has."""
    handles, labels = ax.get_legend_handles_labels()
    old = ax.get_legend()
    if old is not None:
        old.remove()
    if not handles:
        return
    ax.legend(
        handles,
        labels,
        title=title_text,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        frameon=False,
        **kwargs,
    )


def caption(fig: Figure, kind: str, machine: str, date: str, note: str = "") -> str:
    """Write the caption under the axes: kind, machine, date (and a note); returns it."""
    if kind not in KINDS:
        raise ValueError(f"caption kind {kind!r}: use one of {', '.join(KINDS)}")
    lead = {
        "measured": "Measured",
        "simulated": "Simulated (not measured)",
        "analytic": "Analytic (computed, not measured)",
    }[kind]
    text = f"{lead} on {machine}, {date}."
    if note:
        text += f"\n{note}"
    fig.supxlabel(text, fontsize=7, color="0.3")
    return text


def save(fig: Figure, path: Any) -> Any:
    """Write ``fig`` as PNG at the style's resolution and close it; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def png(fig: Figure) -> bytes:
    """``fig`` as the PNG :func:`save` would write, and close it (a notebook shows these
    bytes: the same pixels as the report, whatever the kernel's backend)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def overlaps(fig: Figure) -> list[str]:
    """Which of title, legends and caption overlap one another or an axes (empty: none).

    The check the tests make of every figure: drawn as it will be saved, no
    legend may sit on the title or on the data.
    """
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    boxes: dict[str, Any] = {}
    # No public getters for the suptitle and supxlabel artists.
    for name, attr in (("title", "_suptitle"), ("caption", "_supxlabel")):
        artist = getattr(fig, attr, None)
        if artist is not None:
            boxes[name] = artist.get_window_extent(renderer)
    for i, ax in enumerate(fig.axes):
        boxes[f"axes{i}"] = ax.get_window_extent(renderer)
        legend = ax.get_legend()
        if legend is not None:
            boxes[f"legend{i}"] = legend.get_window_extent(renderer)
        if ax.get_title():
            boxes[f"axes{i} title"] = ax.title.get_window_extent(renderer)
    for i, leg in enumerate(fig.legends):
        boxes[f"figure legend{i}"] = leg.get_window_extent(renderer)
    names = list(boxes)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if a.startswith("axes") and b.startswith("axes") and "title" not in a + b:
                continue  # axes side by side share no pixels, but their edges may touch
            if a.split()[0] == b.split()[0] and "title" in a + b:
                continue  # an axes and its own title touch by design
            if boxes[a].overlaps(boxes[b]):
                out.append(f"{a} / {b}")
    return out
