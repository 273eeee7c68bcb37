"""Recovery planning: which step every rank resumes from, and from where.

Pure functions, so that the root agent's decisions can be tested without a
cluster. The rule (Gemini §3): all ranks must resume from the same step; pick
the newest step for which *every* rank's checkpoint is available with a
verified checksum somewhere, preferring for each rank its own node's memory
(a software failure: the host survived), then a holder's memory (a hardware
failure), then persistent storage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gemini.lineage import Timeline

PHASES = (
    "detect_s",
    "teardown_s",
    "takeover_s",
    "restart_s",
    "rendezvous_s",
    "alloc_s",
    "retrieve_s",
    "load_s",
    "replay_s",
)
"""The phases of one recovery, in order: they add up to ``recovery_s``.

``takeover_s`` is the wait for lost nodes' replacements to come up (a standby
node taking the index over, or a fresh node when none is left); ``restart_s``
what is left until the last rank enters the rendezvous: trainer processes
handed the new generation (in place, a warm spare or a standby's) or started
afresh.

The one list of phases: the MLflow metrics, the results table, the timeline
figure and the benchmarks all take it from here. ``alloc_s`` is the backend
setting up its checkpoint memory for the new generation (a replaced node's
agent allocating and touching its shared-memory slots, each rank mapping its
own): work only the memory backends pay, kept out of ``restart_s`` so that
``restart_s`` measures the same machinery for every backend."""
RECOVERY_METRICS = (*PHASES, "recovery_s", "wasted_s", "lost_steps")
"""What every recovery reports (MLflow ``recovery/<name>``, summary ``mean_<name>``)."""


MILESTONES = (
    "t_rdzv_start",
    "t_rdzv_end",
    "t_alloc_start",
    "t_alloc_end",
    "t_retrieve_start",
    "t_retrieve_end",
    "t",
)
"""What every restarted rank reports (wall-clock seconds) on its way back: it
enters and leaves the rendezvous, starts and ends preparing its checkpoint
memory (only backends that allocate any), starts and ends retrieving its
checkpoint, and is ready (restored and warmed up) at ``t``."""


def restart_phases(
    t_torn: float,
    readies: Mapping[int, Mapping[str, Any]],
    alloc_before_s: float = 0.0,
    takeover_s: float = 0.0,
) -> dict[str, float]:
    """``takeover_s``, ``restart_s``, ``rendezvous_s``, ``alloc_s``, ``retrieve_s``, ``load_s``.

    The ranks restart together but not in step: one that retrieved from local
    memory waits in the first collective for one still fetching from a peer.
    Summing per-rank durations (or their maxima) would count that wait twice,
    so each phase here ends when the *last* rank passes its milestone and
    starts where the previous phase ended: the four phases add up exactly to
    ``t_ready - t_torn``. Building the model and the backend between the
    rendezvous and the retrieval counts as restart, except the backend's
    ``prepare`` (alloc). A rank that restarts from scratch reports no
    retrieval milestones; its are taken as its ready time. A backend that
    allocates nothing reports no alloc milestones: its ``alloc_s`` is 0.

    ``alloc_before_s`` is allocation the root waited for before launching the
    generation (a replaced node's agent creating and touching its slots);
    it is moved from ``restart_s`` to ``alloc_s``; ``takeover_s``, the wait for
    replacement nodes before that, is moved from ``restart_s`` to its own phase.
    """
    if not readies:
        return {
            "takeover_s": 0.0,
            "restart_s": 0.0,
            "rendezvous_s": 0.0,
            "alloc_s": 0.0,
            "retrieve_s": 0.0,
            "load_s": 0.0,
        }

    def last(key: str, default: str = "t") -> float:
        return max(float(r.get(key, r.get(default, r["t"]))) for r in readies.values())

    b_rdzv = max(t_torn, last("t_rdzv_start"))
    b_rdzv_end = max(b_rdzv, last("t_rdzv_end"))
    b_alloc = max(b_rdzv_end, last("t_alloc_start", "t_rdzv_end"))
    b_alloc_end = max(b_alloc, last("t_alloc_end", "t_rdzv_end"))
    b_retr = max(b_alloc_end, last("t_retrieve_start"))
    b_retr_end = max(b_retr, last("t_retrieve_end"))
    b_ready = max(b_retr_end, last("t"))
    before = min(max(0.0, alloc_before_s), b_rdzv - t_torn)
    takeover = min(max(0.0, takeover_s), b_rdzv - t_torn - before)
    return {
        "takeover_s": takeover,
        "restart_s": (b_rdzv - t_torn - before - takeover)
        + (b_alloc - b_rdzv_end)
        + (b_retr - b_alloc_end),
        "rendezvous_s": b_rdzv_end - b_rdzv,
        "alloc_s": before + (b_alloc_end - b_alloc),
        "retrieve_s": b_retr_end - b_retr,
        "load_s": b_ready - b_retr_end,
    }


Held = int | tuple[int, int]
"""One checkpoint in an inventory: ``(step, generation)``, or a bare step of
unknown generation (held to every plan of the timeline, as generation 0)."""


@dataclass
class Plan:
    """The outcome of planning one recovery."""

    step: int
    """Common step every rank restores (0 = restart from scratch)."""
    sources: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Per rank: ``{"kind": "local"|"peer"|"storage", "node": holder node,
    "generation": the generation that wrote the copy}``."""
    reason: str = ""
    """Why this step: printed and recorded."""
    lost_steps: int | None = None
    """Steps of the current timeline given up (failed step - this step), when
    the failed step was given."""

    def to_json(self) -> dict[str, Any]:
        return {
            "start_step": self.step,
            "sources": {str(r): s for r, s in self.sources.items()},
            "reason": self.reason,
        }

    def source_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sources.values():
            out[s["kind"]] = out.get(s["kind"], 0) + 1
        return out


def _tagged(held: Held) -> tuple[int, int]:
    if isinstance(held, tuple):
        step, gen = held
        return int(step), int(gen)
    return int(held), 0


def newest_on_timeline(
    memory: Mapping[int, Mapping[int, Iterable[Held]]],
    storage: Iterable[Held],
    timeline: Timeline | None = None,
) -> int:
    """The newest step any copy on the current timeline holds (0 if none).

    A checkpoint of the current timeline proves the timeline reached its
    step, even if the rank's last progress report had not yet said so.
    """
    line = timeline or Timeline()
    held = [c for per in memory.values() for steps in per.values() for c in map(_tagged, steps)]
    held += [_tagged(c) for c in storage]
    return max((s for s, g in held if line.valid(s, g)), default=0)


def plan_recovery(
    rank_node: Mapping[int, int],
    memory: Mapping[int, Mapping[int, Iterable[Held]]],
    storage: Iterable[Held],
    excluded: Iterable[tuple[int, int, str, int]] = (),
    *,
    failed_step: int | None = None,
    timeline: Timeline | None = None,
) -> Plan:
    """Choose the common step and a source per rank.

    ``rank_node``: node of every rank. ``memory``: for every *live* node with
    its memory intact, the verified complete checkpoints it holds per source
    rank (its own ranks' local slots and the replicas it holds for others).
    ``storage``: checkpoints complete on persistent storage for every rank.
    ``excluded``: (rank, step, kind, node) sources that already failed a
    retrieval, to skip on a re-plan.

    ``failed_step``: the last step the current timeline reached; no step above
    it is ever chosen. ``timeline``: the plans so far; a checkpoint off the
    current timeline (:meth:`Timeline.valid`) is never chosen, whatever its step.
    """
    bad = set(excluded)
    line = timeline or Timeline()

    def usable(step: int, gen: int) -> bool:
        return (failed_step is None or step <= failed_step) and line.valid(step, gen)

    stored = [c for c in map(_tagged, storage) if usable(*c)]
    candidates: dict[int, dict[int, list[dict[str, Any]]]] = {r: {} for r in rank_node}
    for holder, per_source in memory.items():
        for rank, held in per_source.items():
            if rank not in candidates:
                continue
            kind = "local" if rank_node[rank] == holder else "peer"
            for s, gen in map(_tagged, held):
                if (rank, s, kind, holder) not in bad and usable(s, gen):
                    candidates[rank].setdefault(s, []).append(
                        {"kind": kind, "node": holder, "generation": gen}
                    )
    for rank in candidates:
        for s, gen in stored:
            if (rank, s, "storage", -1) not in bad:
                candidates[rank].setdefault(s, []).append(
                    {"kind": "storage", "node": -1, "generation": gen}
                )

    def lost(step: int) -> int | None:
        if failed_step is None:
            return None
        if step > failed_step:  # usable() makes this impossible
            raise AssertionError(f"planned step {step} is past the failed step {failed_step}")
        return failed_step - step

    if not candidates:
        return Plan(0, {}, "no ranks", lost(0))
    common = set.intersection(*(set(c) for c in candidates.values()))
    if not common:
        return Plan(
            0,
            {r: {"kind": "scratch", "node": -1} for r in rank_node},
            "no step has every rank's checkpoint: restarting from step 0",
            lost(0),
        )
    step = max(common)
    order = {"local": 0, "peer": 1, "storage": 2}
    sources: dict[int, dict[str, Any]] = {}
    for rank, per_step in candidates.items():
        options = sorted(per_step[step], key=lambda o: (order[o["kind"]], o["node"]))
        sources[rank] = options[0]
    kinds = sorted({s["kind"] for s in sources.values()})
    return Plan(
        step,
        sources,
        f"newest step with every rank available: {step} (from {', '.join(kinds)})",
        lost(step),
    )
