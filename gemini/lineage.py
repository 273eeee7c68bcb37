"""Which checkpoints belong to the job's current timeline.

Every launch of all trainer ranks is a *generation*, and every checkpoint
(local slot, replica, persisted file) records the generation that wrote it.
A recovery plan starts generation g from step p_g. Training after a rollback
(p_g below the step the job had reached) takes a new path from p_g: any
checkpoint of a step above p_g written by a generation before g is then a
leftover of the abandoned path. Such a checkpoint is harmful twice: it
counts as the "newest" slot, so the next write overwrites the only slot of
the current timeline, and the planner might pick it as a step the current
timeline never reached.

A checkpoint of step s written by generation g is on the current timeline
iff every later generation started at a step >= s: none of them rolled back
below it. Generations are numbered from 1; 0 marks a checkpoint of unknown
origin (an old manifest), which is held to every start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Timeline"]


@dataclass
class Timeline:
    """The start step of every planned generation."""

    starts: dict[int, int] = field(default_factory=dict)
    """Generation -> the step its plan restored (0 = from scratch)."""

    @classmethod
    def from_plans(cls, plans: Mapping[int, Mapping[str, object]]) -> Timeline:
        """From the plans the root published, generation -> ``{"start_step": ...}``."""
        return cls({int(g): int(str(p.get("start_step", 0))) for g, p in plans.items()})

    def add(self, generation: int, start_step: int) -> None:
        if generation in self.starts and self.starts[generation] != start_step:
            raise ValueError(
                f"generation {generation} was planned from step {self.starts[generation]}, "
                f"not {start_step}"
            )
        self.starts[generation] = start_step

    def valid(self, step: int, generation: int) -> bool:
        """Is the checkpoint of ``step`` written by ``generation`` on the current timeline?"""
        return all(start >= step for g, start in self.starts.items() if g > generation)
