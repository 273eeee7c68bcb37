"""The recovery timeline figure: one bar per failure, one colour per phase.

Drawn in the report's style (:mod:`gemini.analysis.style`): the title on
top, the legend outside the axes (it used to cover the title), the machine
and date in the caption.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemini.config import GeminiConfig
from gemini.recovery import PHASES

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def draw_timeline(recoveries: list[dict[str, Any]], path: Path, cfg: GeminiConfig) -> Path:
    """Write the job's recovery timeline to ``path`` (PNG)."""
    from gemini.analysis import style

    return Path(style.save(timeline_figure(recoveries, cfg), path))


def timeline_figure(recoveries: list[dict[str, Any]], cfg: GeminiConfig) -> Figure:
    """One horizontal bar per recovery, its phases stacked in order."""
    from gemini.analysis import style
    from gemini.analysis.load import machine_of_tags
    from gemini.tracking import host_tags

    fig, ax = style.new_figure(width=8.5, height=1.9 + 0.45 * len(recoveries))
    import seaborn as sns

    colors = sns.color_palette("colorblind", len(PHASES))
    for i, rec in enumerate(recoveries):
        left = 0.0
        for j, phase in enumerate(PHASES):
            width = float(rec.get(phase) or 0.0)
            label = phase.removesuffix("_s") if i == 0 else None
            ax.barh(i, width, left=left, color=colors[j], label=label)
            left += width
    ax.set_yticks(range(len(recoveries)))
    ax.set_yticklabels([f"#{i + 1} {r.get('kind', '')}" for i, r in enumerate(recoveries)])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the failure was injected")
    style.legend_outside(ax, "phase")
    style.title(
        fig, f"Recovery phases: {cfg.backend.name}, {cfg.model.name}, {cfg.cluster.nodes} nodes"
    )
    style.caption(fig, "measured", machine_of_tags(host_tags(cfg)), dt.date.today().isoformat())
    return fig
