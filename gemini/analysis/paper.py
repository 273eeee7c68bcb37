"""The paper's numbers that the report sets ours beside, each with its source figure.

Wang et al., "GEMINI: Fast Failure Recovery in Distributed Training with
In-Memory Checkpoints", SOSP 2023: 16 x p4d.24xlarge (8 x A100, 400 Gbit/s)
and 16 x p3dn (8 x V100, 100 Gbit/s), remote storage 20 Gbit/s aggregate,
DeepSpeed ZeRO-3, GPT-2 / BERT / RoBERTa 10B-100B, m = 2.

Only the paper's values live here. What the harness measured (or simulated,
or computed) is read from the MLflow store by :mod:`gemini.analysis.figures`;
nothing here is ever shown as "ours".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperValue:
    """One number the paper reports."""

    figure: str
    """Our figure key (``fig7``, ``fig8``, ...)."""
    quantity: str
    """Key of the quantity; :mod:`gemini.analysis.figures` computes ours under the same key."""
    label: str
    """What it is, in words, for the table."""
    value: float | None
    """The number (the middle of a range); None where the paper reports no number (OOM)."""
    unit: str
    """Unit of ``value`` (ours is converted to it)."""
    shown: str
    """How the paper states it (a range, a bound, "OOM")."""
    source: str
    """Where in the paper."""


# fmt: off
_ROWS: tuple[tuple[str, str, str, float | None, str, str, str], ...] = (
    # figure, quantity, label,
    #     value, unit, as the paper states it, where
    ("fig7", "overhead_ratio", "iteration time with Gemini / without",
        1.0, "x", "no visible overhead", "Fig. 7 / Fig. 13"),
    ("fig7", "iter_time_largest", "iteration time, largest model",
        70.5, "s", "62-79 s (100B)", "Fig. 7"),
    ("fig8", "idle_s", "idle network time per iteration, largest model",
        11.0, "s", "10-12 s", "Fig. 8"),
    ("fig8", "ckpt_traffic_s", "one checkpoint's replica traffic, largest model",
        2.5, "s", "2.5 s", "Fig. 8"),
    ("fig8", "idle_over_traffic", "idle time / checkpoint traffic",
        4.4, "x", "about 4-5x", "Fig. 8"),
    ("fig9", "group_k2_n16", "P(recover from memory), group, N=16, m=2, k=2",
        0.9333, "", "93.3 %", "Fig. 9, Corollary 1"),
    ("fig9", "group_k3_n16", "P(recover from memory), group, N=16, m=2, k=3",
        0.8, "", "80.0 %", "Fig. 9, Corollary 1"),
    ("fig10", "strawman_min", "Strawman wasted time per failure",
        98.0, "min", "about 98 min", "Fig. 10"),
    ("fig10", "highfreq_min", "HighFreq wasted time per failure",
        23.0, "min", "about 23 min", "Fig. 10"),
    ("fig10", "gemini_iters", "Gemini wasted time per failure",
        1.5, "iterations", "about 1.5 iterations", "Fig. 10"),
    ("fig10", "highfreq_over_gemini", "HighFreq / Gemini wasted time",
        13.0, "x", "> 13x", "Fig. 10, abstract"),
    ("fig11", "reduction_100", "checkpoint-time reduction at 100 Gbit/s",
        65.0, "x", "65x", "Fig. 11"),
    ("fig11", "reduction_400", "checkpoint-time reduction at 400 Gbit/s",
        250.0, "x", "> 250x", "Fig. 11"),
    ("fig12", "gemini_over_highfreq", "checkpoints per hour, Gemini / HighFreq",
        8.0, "x", "8x", "Fig. 12"),
    ("fig12", "gemini_over_strawman", "checkpoints per hour, Gemini / Strawman",
        170.0, "x", "> 170x", "Fig. 12"),
    ("fig14", "detect_s", "failure detection",
        15.0, "s", "15 s", "Fig. 14"),
    ("fig14", "retrieve_load_s", "retrieving and loading the checkpoint (ours: retrieve + load)",
        162.0, "s", "162 s (serialising replicas)", "Fig. 14"),
    ("fig14", "warmup_s", "warm-up before training resumes (ours: restart + rendezvous)",
        253.0, "s", "253 s", "Fig. 14"),
    ("fig14", "takeover_s", "replacing a failed instance (ours: takeover)",
        330.0, "s", "4-7 min", "Fig. 14"),
    ("fig15", "effective_ratio_n1000", "Gemini's effective training time ratio, N=1000",
        0.91, "", "about 0.91", "Fig. 15"),
    ("fig16", "blocking_pct", "iteration-time overhead, blocking",
        10.1, "%", "+10.1 %", "Fig. 16"),
    ("fig16", "naive_pct", "iteration-time overhead, naive interleave",
        None, "%", "out of GPU memory", "Fig. 16"),
    ("fig16", "interleave_nopipe_pct", "iteration-time overhead, no pipelining",
        3.5, "%", "+3.5 %", "Fig. 16"),
    ("fig16", "interleave_pct", "iteration-time overhead, Gemini's interleaving",
        0.0, "%", "about 0 %", "Fig. 16"),
)
# fmt: on

PAPER: tuple[PaperValue, ...] = tuple(PaperValue(*row) for row in _ROWS)
"""Every number of the paper the report compares against, in figure order."""


def paper_values(figure: str) -> list[PaperValue]:
    """The paper's numbers for one figure key (empty for a figure without any)."""
    return [p for p in PAPER if p.figure == figure]
