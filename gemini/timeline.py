"""The recovery timeline figure: one bar per failure, one colour per phase."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemini.config import GeminiConfig
from gemini.recovery import PHASES


def draw_timeline(recoveries: list[dict[str, Any]], path: Path, cfg: GeminiConfig) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import socket

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.5 * len(recoveries)))
    colors = plt.get_cmap("tab10")
    for i, rec in enumerate(recoveries):
        left = 0.0
        for j, phase in enumerate(PHASES):
            width = float(rec.get(phase) or 0.0)
            ax.barh(i, width, left=left, color=colors(j), label=phase[:-2] if i == 0 else None)
            left += width
    ax.set_yticks(range(len(recoveries)))
    ax.set_yticklabels([f"#{i + 1} {r.get('kind', '')}" for i, r in enumerate(recoveries)])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the failure was injected")
    ax.set_title(
        f"Recovery phases — {cfg.backend.name}, {cfg.model.name}, {cfg.cluster.nodes} nodes "
        f"(measured on {socket.gethostname()})",
        fontsize=9,
    )
    ax.legend(ncols=4, fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
