"""The failure injector: fires a schedule's events at the processes of a running job.

A *software* failure kills one trainer rank: its node and the node's
checkpoint memory survive. A *hardware* failure kills the node's whole
process tree and frees its shared memory: the machine is gone. *root_loss*
kills the root agent. *corruption* fails a node and then flips bytes in a
replica a peer holds for it, so recovery has to notice and pick the next
source. Each kill is an operation of the job's ``gemini.cluster.base.Cluster``:
an order the target's own agent carries out (``gemini.cluster.orders``), so
nothing here knows a PID or opens another node's memory.
A *hang* stops one trainer rank (SIGSTOP): it neither exits nor progresses,
and the root's watchdog must find it.
*kill_during_snapshot* is armed in the trainer itself (only it knows when it
is half-way through a copy) and it records its own injection.

Every injection is written to the store (``inject/*``) with the wall time at
which it landed, from which the root measures detection latency. The schedule itself is pure
(``gemini.schedules``): one seed, one schedule.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gemini.cluster import keys
from gemini.schedules import RANK_KINDS, FailureEvent, build_schedule

if TYPE_CHECKING:
    from gemini.cluster.base import Cluster
    from gemini.cluster.job import JobSpec
    from gemini.cluster.store import Store
    from gemini.config import GeminiConfig


def schedule_for(cfg: GeminiConfig) -> list[FailureEvent]:
    """The run's failure schedule: what the injector fires, and what
    ``gemini.config.validate`` builds once before anything starts."""
    f = cfg.failure
    if f.name == "none":
        return []
    group_of = None
    if f.name == "two_in_group":
        from gemini.checkpoint.placement import groups, resolve_placement

        n, m = cfg.cluster.nodes, cfg.backend.replication.factor
        placement = resolve_placement(n, m, cfg.backend.replication.placement)
        gs = groups(n, m, placement) or [list(range(n))]

        def group_of(node: int) -> list[int]:
            return next(g for g in gs if node in g)

    return build_schedule(
        f.name,
        nodes=cfg.cluster.nodes,
        steps=cfg.train.steps,
        seed=cfg.train.seed if f.seed is None else f.seed,
        at_step=f.at_step,
        node=f.node,
        mtbf_s=f.mtbf_s,
        weibull_shape=f.weibull_shape,
        k=f.k,
        kind=f.kind,
        max_events=f.max_events,
        horizon_s=f.mtbf_s * (f.max_events + 1) if f.name in ("poisson", "weibull") else None,
        group_of=group_of,
        rank_in_node=f.rank_in_node,
        then=f.then,
        then_node=f.then_node,
        then_after_steps=f.then_after_steps,
    )


class Injector:
    def __init__(self, job: JobSpec, store: Store, cluster: Cluster) -> None:
        self.job, self.store, self.cluster = job, store, cluster
        # Built once already by gemini.config.validate before the job started.
        self.events = schedule_for(job.cfg)
        self.pending = list(enumerate(self.events))
        self.fired: list[dict[str, Any]] = []
        self.t_start: float | None = None
        for i, ev in self.pending:
            if ev.kind == "kill_during_snapshot" and not ev.after_recovery:
                self.arm(i, ev)
        self.pending = [
            (i, ev)
            for i, ev in self.pending
            if ev.kind != "kill_during_snapshot" or ev.after_recovery
        ]

    def arm(self, idx: int, ev: FailureEvent, after_gen: int | None = None) -> None:
        """kill_during_snapshot fires in the trainer, the only one that knows when
        it is half-way through a copy: tell it which step (and from which
        generation on, for a follow-up)."""
        rank = ev.nodes[0] * self.job.cfg.cluster.ranks_per_node + ev.rank_in_node
        self.store.set_json(
            keys.inject_arm(rank),
            {"id": idx, "step": ev.at_step, "after_gen": after_gen, **ev.to_dict()},
        )

    def fired_in(self, idx: int) -> int | None:
        """The generation in which event ``idx`` fired (None: not yet)."""
        for _, rec in self.store.items(keys.INJECT):
            if rec.get("id") == idx:
                return int(rec.get("gen", 0))
        return None

    def follow_up_due(self, idx: int, ev: FailureEvent) -> bool:
        """A follow-up is due ``at_step`` steps after the restore that recovered the event
        before it; a kill_during_snapshot follow-up is armed for the restored generation."""
        fired = self.fired_in(idx - 1)
        if fired is None:
            return False
        if ev.kind == "kill_during_snapshot":
            self.pending.remove((idx, ev))
            self.arm(idx, ev, after_gen=fired)
            return False
        gen = int(self.store.get_json_or(keys.GEN, 0))
        world = self.job.world_size
        if gen <= fired or not all(self.store.exists(keys.ready(gen, r)) for r in range(world)):
            return False
        start = int(self.store.get_json(keys.plan(gen)).get("start_step", 0))
        assert ev.at_step is not None
        return self.progress() >= start + ev.at_step

    def progress(self) -> int:
        world = self.job.world_size
        return max((self.store.get_int(keys.progress(r)) for r in range(world)), default=0)

    def tick(self) -> None:
        if not self.pending:
            return
        step = self.progress()
        if step > 0 and self.t_start is None:
            self.t_start = time.time()
        for i, ev in list(self.pending):
            if ev.after_recovery:
                due = self.follow_up_due(i, ev)
            else:
                due = (ev.at_step is not None and step >= ev.at_step) or (
                    ev.at_time_s is not None
                    and self.t_start is not None
                    and time.time() - self.t_start >= ev.at_time_s
                )
            if due and self.fire(i, ev, step):
                self.pending.remove((i, ev))

    def fire(self, idx: int, ev: FailureEvent, step: int) -> bool:
        """Inject ``ev`` now; False if it cannot land yet (tried again next tick)."""
        record = {
            "id": idx,
            **ev.to_dict(),
            "t": time.time(),
            "step": step,
            "gen": int(self.store.get_json_or(keys.GEN, 0)),
            "what": ev.describe(),
        }
        rpn = self.job.cfg.cluster.ranks_per_node
        landed: float | None = None
        if ev.kind in RANK_KINDS:
            # Every node of the event loses its rank: a correlated or
            # two-in-group software failure (or hang) hits them all at once.
            gen = int(self.store.get_json_or(keys.GEN, 0))
            infos = [
                self.store.get_json_or(keys.trainer(gen, n * rpn + ev.rank_in_node))
                for n in ev.nodes
            ]
            if any(info is None for info in infos):
                # A restart is under way and its trainers are not all up:
                # the event must hit the next generation, not vanish.
                return False
            if ev.kind == "hang":
                landed = self.cluster.hang_trainers(ev.nodes, [ev.rank_in_node], record)
            else:
                landed = self.cluster.kill_trainers(ev.nodes, [ev.rank_in_node], record)
        elif ev.kind == "hardware":
            landed = self.cluster.kill_nodes(ev.nodes, record)
        elif ev.kind == "root_loss":
            landed = self.cluster.kill_root(record)
        elif ev.kind == "partition":
            # Nobody on the cut-off node can report it: the controller, which
            # cuts the links, stamps the record when they are down.
            landed = self.cluster.partition_nodes(ev.nodes, self.job.cfg.failure.partition_s)
            self.store.push(keys.INJECT, {**record, "t": landed})
        elif ev.kind == "corruption":
            from gemini.checkpoint.memory import replica_holders

            # Kill first: a live source would overwrite the damaged replica
            # with its next step before recovery ever looked at it. The
            # record goes out once the damage is done (detection, by missed
            # beats, comes seconds later).
            node = ev.nodes[0]
            landed = self.cluster.kill_nodes(ev.nodes)
            record["corrupted"] = {}
            for holder in replica_holders(self.job.cfg, node):
                record["corrupted"] = self.cluster.corrupt_replica(holder, node * rpn)
                if record["corrupted"]:
                    break
            self.store.push(keys.INJECT, {**record, "t": landed or record["t"]})
        if landed is None:
            record["unacknowledged"] = True
        else:
            record["t"] = landed
        self.fired.append(record)
        return True

    def stop(self) -> None:
        self.pending = []
