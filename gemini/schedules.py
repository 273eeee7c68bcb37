"""Failure schedules: which failure happens, when, and on which node.

A schedule is a plain list of :class:`FailureEvent`, computed up front from
the config and a seed; the injector (``gemini.failures``) executes it. Keeping
the schedule pure makes a run's failures part of its identity: one seed gives
the bitwise-identical list, so a sweep compares backends under exactly the
same failures, and a test can assert what will be hit before anything runs.

The failure kinds follow Gemini (Wang et al., SOSP 2023, §2.1, §5):

* ``software`` — a trainer process dies; its host and CPU memory survive,
  so recovery reads the local in-memory checkpoint.
* ``hardware`` — the machine is lost with its memory; recovery reads a
  peer's copy (or persistent storage if every holder of a shard is lost).
* ``corruption`` — a stored checkpoint is damaged; checksums must catch it
  and recovery must fall back to another copy or an older step.
* ``kill_during_snapshot`` — a failure while a checkpoint is being written;
  the two-slot design must keep the previous complete one intact.
* ``root_loss`` — the root agent dies; the workers elect a new one.
* ``hang`` — a trainer process stops (SIGSTOP) without exiting: nothing
  reports an exit, so only its stalled progress heartbeat gives it away;
  recovery is then that of a software failure.

Random arrivals model the field studies behind the paper's Fig. 15:
``poisson`` (memoryless, exponential inter-arrivals) and ``weibull`` (shape
< 1: failures cluster early, "infant mortality", as reported for large GPU
clusters), both with a mean inter-arrival of ``mtbf_s``.

Randomness comes from :class:`random.Random` and explicit inverse-CDF
transforms of its ``random()`` stream, whose output Python keeps stable across
versions; numpy's distribution methods carry no such promise.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FAILURE_KINDS = (
    "software",
    "hardware",
    "corruption",
    "kill_during_snapshot",
    "root_loss",
    "hang",
    "partition",
)

RANK_KINDS = ("software", "hang")
"""Kinds that hit one local rank of a node (``rank_in_node``), not the whole node."""

SCHEDULES = (
    "none",
    "software_once",
    "hardware_once",
    "two_in_group",
    "poisson",
    "weibull",
    "correlated",
    "kill_during_snapshot",
    "corruption",
    "root_loss",
    "hang_once",
    "partition",
)

# One event on one node at one step; the schedule's name is the event's kind.
_ONCE = {
    "software_once": "software",
    "hardware_once": "hardware",
    "kill_during_snapshot": "kill_during_snapshot",
    "corruption": "corruption",
    "root_loss": "root_loss",
    "hang_once": "hang",
    "partition": "partition",
}


class ScheduleError(ValueError):
    """A refused failure setting: key, value and what to do."""

    def __init__(self, key: str, value: object, fix: str) -> None:
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")


@dataclass(frozen=True)
class FailureEvent:
    """One failure: what kind, which node(s), and when it fires.

    Exactly one of ``at_step`` (fire when training reaches this step) and
    ``at_time_s`` (seconds after training starts) is set. ``nodes`` is empty
    only for ``root_loss``, which hits the root agent rather than a node.
    """

    kind: str
    """One of :data:`FAILURE_KINDS`."""
    nodes: tuple[int, ...]
    """Node indices hit together (several for correlated / two_in_group)."""
    at_step: int | None
    """Fire when training reaches this step, or None."""
    at_time_s: float | None
    """Fire this many seconds after training starts, or None."""
    rank_in_node: int = 0
    """software and hang failures: the local rank that is hit."""
    after_recovery: bool = False
    """Fire only once the event before it has been recovered from; ``at_step``
    then counts the steps trained after the step that recovery restored."""

    def __post_init__(self) -> None:
        if self.kind not in FAILURE_KINDS:
            raise ScheduleError("failure.kind", self.kind, f"use one of {', '.join(FAILURE_KINDS)}")
        if (self.at_step is None) == (self.at_time_s is None):
            raise ScheduleError(
                "failure.at_step",
                self.at_step,
                f"set exactly one of at_step and at_time_s (at_time_s={self.at_time_s!r})",
            )
        if self.at_step is not None and self.at_step < 1:
            raise ScheduleError("failure.at_step", self.at_step, "must be >= 1")
        if self.at_time_s is not None and not (
            math.isfinite(self.at_time_s) and self.at_time_s >= 0
        ):
            raise ScheduleError("failure.at_time_s", self.at_time_s, "must be finite and >= 0")
        if not isinstance(self.nodes, tuple) or any(n < 0 for n in self.nodes):
            raise ScheduleError("failure.node", self.nodes, "nodes are a tuple of indices >= 0")
        if len(set(self.nodes)) != len(self.nodes):
            raise ScheduleError("failure.node", self.nodes, "each node may appear once per event")
        if (self.kind == "root_loss") != (not self.nodes):
            raise ScheduleError(
                "failure.node",
                self.nodes,
                "root_loss hits the root agent (nodes=()); every other kind needs a node",
            )
        if self.rank_in_node < 0:
            raise ScheduleError("failure.rank_in_node", self.rank_in_node, "must be >= 0")
        if self.after_recovery and self.at_step is None:
            raise ScheduleError(
                "failure.then_after_steps", self.at_step, "a follow-up failure counts steps"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (nodes as a list); :meth:`from_dict` inverts it."""
        return {
            "kind": self.kind,
            "nodes": list(self.nodes),
            "at_step": self.at_step,
            "at_time_s": self.at_time_s,
            "rank_in_node": self.rank_in_node,
            "after_recovery": self.after_recovery,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FailureEvent:
        """The event :meth:`to_dict` wrote (e.g. read back from the KV store)."""
        return cls(
            kind=d["kind"],
            nodes=tuple(int(n) for n in d["nodes"]),
            at_step=d.get("at_step"),
            at_time_s=d.get("at_time_s"),
            rank_in_node=int(d.get("rank_in_node", 0)),
            after_recovery=bool(d.get("after_recovery", False)),
        )

    def describe(self) -> str:
        """One line for logs, e.g. ``"hardware on node 2 at step 40"``."""
        if not self.nodes:
            where = "of the root agent"
        elif len(self.nodes) == 1:
            where = f"on node {self.nodes[0]}"
        else:
            where = "on nodes " + ", ".join(str(n) for n in self.nodes)
        if self.kind in RANK_KINDS:
            where += f" (local rank {self.rank_in_node})"
        when = (
            f"at step {self.at_step}" if self.at_step is not None else f"at {self.at_time_s:.1f} s"
        )
        if self.after_recovery:
            when = f"{self.at_step} steps after the previous recovery's restored step"
        return f"{self.kind} {where} {when}"


# -- validation helpers ---------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(key: str, value: float, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScheduleError(key, value, fix)
    if not (math.isfinite(value) and value > 0):
        raise ScheduleError(key, value, fix)


def _check_node(node: int, nodes: int) -> None:
    if not _is_int(node) or not 0 <= node < nodes:
        raise ScheduleError("failure.node", node, f"use a node index in [0, {nodes - 1}]")


def _check_steps_for_step_event(steps: int) -> None:
    if steps < 2:
        raise ScheduleError(
            "train.steps",
            steps,
            "a step-triggered failure needs train.steps >= 2 (fires before the last)",
        )


# -- sampling -------------------------------------------------------------


def _pick_step(rng: random.Random, steps: int, at_step: int | None) -> int:
    """``at_step``, or a seeded step in the middle half of training.

    The middle half leaves room before the failure for checkpoints to exist
    and after it for recovery to be observed doing useful work.
    """
    if at_step is not None:
        return at_step
    lo = max(1, steps // 4)
    hi = max(lo, min(steps - 1, (3 * steps) // 4))
    return lo + rng.randrange(hi - lo + 1)


def _pick_node(rng: random.Random, nodes: int, node: int | None) -> int:
    return node if node is not None else rng.randrange(nodes)


def _exponential(rng: random.Random, mean: float) -> float:
    # Inverse CDF; 1 - u lies in (0, 1], so the log is finite.
    return -mean * math.log(1.0 - rng.random())


def _weibull(rng: random.Random, scale: float, shape: float) -> float:
    return scale * (-math.log(1.0 - rng.random())) ** (1.0 / shape)


def _groups(nodes: int, group_of: Callable[[int], list[int]]) -> list[tuple[int, ...]]:
    """The distinct placement groups, sorted, each a sorted tuple of members."""
    seen: set[tuple[int, ...]] = set()
    for n in range(nodes):
        members = tuple(sorted(set(group_of(n))))
        for m in members:
            if not _is_int(m) or not 0 <= m < nodes:
                raise ScheduleError(
                    "failure.group_of",
                    members,
                    f"group of node {n} names a node outside [0, {nodes - 1}]",
                )
        seen.add(members)
    return sorted(seen)


def _arrivals(
    rng: random.Random,
    draw: Callable[[random.Random], float],
    *,
    kind: str,
    nodes: int,
    node: int | None,
    max_events: int,
    horizon_s: float,
    rank_in_node: int,
) -> list[FailureEvent]:
    """Events at cumulative inter-arrival times within ``horizon_s``.

    ``mtbf_s`` is the cluster's MTBF (a node's MTBF divided by the node
    count): one renewal process for the whole cluster, the node drawn per
    event, as in the paper's Fig. 15 simulation.
    """
    events: list[FailureEvent] = []
    t = 0.0
    while len(events) < max_events:
        t += draw(rng)
        if t > horizon_s:
            break
        # Always draw a node so the arrival times do not depend on ``node``.
        drawn = rng.randrange(nodes)
        hit = () if kind == "root_loss" else (node if node is not None else drawn,)
        events.append(FailureEvent(kind, hit, None, t, rank_in_node))
    return events


THEN_KINDS = ("software", "hardware", "kill_during_snapshot")
"""Kinds of a follow-up failure (``then``): they hit one node of the restored job."""


def build_schedule(
    name: str,
    *,
    then: str | None = None,
    then_node: int | None = None,
    then_after_steps: int = 2,
    **kw: Any,
) -> list[FailureEvent]:
    """The failure schedule ``name`` (see :func:`base_schedule`), then an optional follow-up.

    ``then`` (one of :data:`THEN_KINDS`, or None) adds one failure of that kind
    on ``then_node`` (None = drawn) that fires ``then_after_steps`` steps after
    the step restored by the recovery from the schedule's last event: right
    after a rollback, on the new timeline. Its node is drawn after every other
    choice, so adding it leaves the rest of the schedule as it was.
    """
    events = base_schedule(name, **kw)
    if then is None or then == "none":
        return events
    if then not in THEN_KINDS:
        raise ScheduleError("failure.then", then, f"use none or one of {', '.join(THEN_KINDS)}")
    if not events or name in ("poisson", "weibull"):
        raise ScheduleError(
            "failure.then", then, f"follows a one-off failure; failure={name} has none"
        )
    if not _is_int(then_after_steps) or then_after_steps < 1:
        raise ScheduleError("failure.then_after_steps", then_after_steps, "must be >= 1")
    nodes = int(kw["nodes"])
    if then_node is not None:
        _check_node(then_node, nodes)
    rng = random.Random(f"then-{kw['seed']}")
    node = _pick_node(rng, nodes, then_node)
    rank = int(kw.get("rank_in_node", 0)) if then == "software" else 0
    follow = FailureEvent(then, (node,), then_after_steps, None, rank, after_recovery=True)
    return [*events, follow]


def base_schedule(
    name: str,
    *,
    nodes: int,
    steps: int,
    seed: int,
    at_step: int | None = None,
    node: int | None = None,
    mtbf_s: float = 600.0,
    weibull_shape: float = 0.7,
    k: int = 2,
    kind: str = "hardware",
    max_events: int = 8,
    horizon_s: float | None = None,
    group_of: Callable[[int], list[int]] | None = None,
    rank_in_node: int = 0,
) -> list[FailureEvent]:
    """The failure schedule ``name`` (one of :data:`SCHEDULES`) for a run.

    ``nodes`` and ``steps`` are the cluster size and the training length;
    ``seed`` fixes every random choice (one seed, one schedule). ``at_step``
    and ``node`` pin the step and node of the one-off schedules (and the
    first node of ``correlated``); left as None they are drawn. ``kind`` is
    the failure kind of ``two_in_group``, ``correlated``, ``poisson`` and
    ``weibull`` events. ``group_of(node)`` returns the members of ``node``'s
    placement group (from the replica placement) for ``two_in_group``.
    ``horizon_s`` bounds the random arrivals of ``poisson`` / ``weibull``;
    their times are converted to steps by the injector.
    """
    if name not in SCHEDULES:
        raise ScheduleError("failure.name", name, f"use one of {', '.join(SCHEDULES)}")
    if not _is_int(nodes) or nodes < 1:
        raise ScheduleError("cluster.nodes", nodes, "must be an integer >= 1")
    if not _is_int(steps) or steps < 1:
        raise ScheduleError("train.steps", steps, "must be an integer >= 1")
    if not _is_int(seed):
        raise ScheduleError("failure.seed", seed, "use an integer seed (or leave it to train.seed)")
    if kind not in FAILURE_KINDS:
        raise ScheduleError("failure.kind", kind, f"use one of {', '.join(FAILURE_KINDS)}")
    if node is not None:
        _check_node(node, nodes)
    if at_step is not None:
        _check_steps_for_step_event(steps)
        if not _is_int(at_step) or not 1 <= at_step <= steps - 1:
            raise ScheduleError(
                "failure.at_step",
                at_step,
                f"use a step in [1, {steps - 1}] (train.steps={steps}), or None for a seeded one",
            )
    _positive("failure.mtbf_s", mtbf_s, "must be a positive number of seconds, e.g. 600")
    _positive("failure.weibull_shape", weibull_shape, "must be > 0 (< 1: infant mortality)")
    if not _is_int(max_events) or max_events < 1:
        raise ScheduleError("failure.max_events", max_events, "must be an integer >= 1")
    if horizon_s is not None:
        _positive("failure.horizon_s", horizon_s, "must be a positive number of seconds")
    if not _is_int(rank_in_node) or rank_in_node < 0:
        raise ScheduleError("failure.rank_in_node", rank_in_node, "must be an integer >= 0")

    rng = random.Random(seed)
    # Only a software failure or a hang hits one chosen rank; the other kinds
    # take the whole node (or a stored checkpoint), so the rank is left at 0.
    rank = rank_in_node if kind in RANK_KINDS else 0

    if name == "none":
        return []

    if name in _ONCE:
        _check_steps_for_step_event(steps)
        once_kind = _ONCE[name]
        step = _pick_step(rng, steps, at_step)
        if once_kind == "root_loss":
            return [FailureEvent(once_kind, (), step, None)]
        once_rank = rank_in_node if once_kind in RANK_KINDS else 0
        return [FailureEvent(once_kind, (_pick_node(rng, nodes, node),), step, None, once_rank)]

    if name == "correlated":
        # A rack: k neighbouring nodes lose power or their switch together.
        if not _is_int(k) or not 1 <= k <= nodes:
            raise ScheduleError("failure.k", k, f"use 1 <= k <= cluster.nodes={nodes}")
        if kind == "root_loss":
            raise ScheduleError("failure.kind", kind, "correlated failures hit nodes: use hardware")
        _check_steps_for_step_event(steps)
        step = _pick_step(rng, steps, at_step)
        if node is not None and node + k > nodes:
            raise ScheduleError(
                "failure.node", node, f"k={k} consecutive nodes from here pass node {nodes - 1}"
            )
        first = node if node is not None else rng.randrange(nodes - k + 1)
        return [FailureEvent(kind, tuple(range(first, first + k)), step, None, rank)]

    if name == "two_in_group":
        # Both copies of a group's checkpoints at once: the case where
        # in-memory recovery must fall back to persistent storage (m = 2).
        if group_of is None:
            raise ScheduleError(
                "failure.name",
                name,
                "two_in_group needs the placement's groups: pass group_of from the placement",
            )
        if kind == "root_loss":
            raise ScheduleError("failure.kind", kind, "two_in_group hits nodes: use hardware")
        _check_steps_for_step_event(steps)
        step = _pick_step(rng, steps, at_step)
        if node is not None:
            members = tuple(sorted(set(group_of(node))))
            others = [m for m in members if m != node]
            if not others:
                raise ScheduleError(
                    "failure.node", node, "its placement group has no other member: pick another"
                )
            pair = tuple(sorted((node, others[rng.randrange(len(others))])))
        else:
            candidates = [g for g in _groups(nodes, group_of) if len(g) >= 2]
            if not candidates:
                raise ScheduleError(
                    "failure.name",
                    name,
                    "no placement group has 2 members: use backend.replication.factor >= 2",
                )
            group = candidates[rng.randrange(len(candidates))]
            i = rng.randrange(len(group))
            j = rng.randrange(len(group) - 1)
            j += j >= i  # a second, different member
            pair = tuple(sorted((group[i], group[j])))
        return [FailureEvent(kind, pair, step, None, rank)]

    # poisson / weibull: random arrivals in time.
    if horizon_s is None:
        raise ScheduleError(
            "failure.horizon_s",
            horizon_s,
            f"{name} arrivals need a time horizon: pass the run's expected duration in seconds",
        )
    if name == "poisson":

        def draw(r: random.Random) -> float:
            return _exponential(r, mtbf_s)

    else:
        # Mean of Weibull(scale, shape) is scale * Gamma(1 + 1/shape).
        scale = mtbf_s / math.gamma(1.0 + 1.0 / weibull_shape)

        def draw(r: random.Random) -> float:
            return _weibull(r, scale, weibull_shape)

    return _arrivals(
        rng,
        draw,
        kind=kind,
        nodes=nodes,
        node=node,
        max_events=max_events,
        horizon_s=horizon_s,
        rank_in_node=rank,
    )
