"""The root agent's recovery from one failure, phase by phase.

1. **detect** — count the restart (a job that keeps failing must end), take
   the injections that explain the failure, open the recovery record;
2. **teardown** — stop the generation's trainers on the live nodes;
3. **replace** — ask the launcher for fresh nodes in place of the lost ones;
4. **inventory** — ask every agent which verified checkpoints it holds;
5. **plan** — one step for every rank, on the current timeline, no newer than
   the failed step (``gemini.recovery.plan_recovery``);
6. **trim** — every agent drops its copies newer than that step, and storage
   its steps newer than it: they belong to the timeline the plan abandons;
7. **relaunch** — publish the plan as the next generation and wait until
   every rank restored.

Phases 3-7 are one *attempt*. An attempt fails when a node dies meanwhile
(replace it, plan again) or a rank cannot read its planned source (that
source, and only that one, is excluded from the next plan). After
:data:`MAX_ATTEMPTS` failed attempts the job ends with a reason naming them,
rather than training on from a half-restored generation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gemini.cluster import keys
from gemini.recovery import (
    MILESTONES,
    Held,
    Plan,
    newest_on_timeline,
    plan_recovery,
    restart_phases,
)

if TYPE_CHECKING:
    from gemini.cluster.root import RootAgent
    from gemini.cluster.store import Store

MAX_ATTEMPTS = 5
"""Plans tried for one failure before the job is declared failed."""

TRIM_TIMEOUT_S = 60.0


class RecoveryFailed(RuntimeError):
    """No attempt brought every rank back; the message says why, attempt by attempt."""


@dataclass
class Attempt:
    """What one plan-and-relaunch came to."""

    plan: Plan
    generation: int = 0
    readies: dict[int, Any] = field(default_factory=dict)
    newly_dead: list[int] = field(default_factory=list)
    failed_restores: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Rank -> ``{"step", "source", "error"}`` as the rank reported it."""

    @property
    def ok(self) -> bool:
        return not self.newly_dead and len(self.readies) == len(self.plan.sources)

    def describe(self) -> str:
        if self.newly_dead:
            return f"nodes {self.newly_dead} died during the restart"
        if self.failed_restores:
            return "; ".join(
                f"rank {r} could not read step {f.get('step')} from "
                f"{f.get('source', {}).get('kind')}:{f.get('source', {}).get('node')} "
                f"({f.get('error', '')})"
                for r, f in sorted(self.failed_restores.items())
            )
        missing = sorted(set(self.plan.sources) - set(self.readies))
        return f"ranks {missing} did not come back (see their logs)"


def excluded_sources(attempt: Attempt) -> list[tuple[int, int, str, int]]:
    """The sources a failed attempt proved unreadable: exactly those that failed.

    A rank that could not restore says which source failed it; the other
    ranks of the generation then hang in (or die leaving) the first
    collective, but their sources were fine and stay plannable.
    """
    out = []
    for rank, failure in sorted(attempt.failed_restores.items()):
        src = failure.get("source") or attempt.plan.sources.get(rank, {})
        out.append(
            (rank, int(failure.get("step", attempt.plan.step)), str(src.get("kind", "")),
             int(src.get("node", -1)))
        )  # fmt: skip
    return out


def gave_up(attempts: list[Attempt]) -> str:
    """The reason a recovery failed: every attempt, what it planned and how it ended."""
    parts = [
        f"attempt {i} (step {a.plan.step}, generation {a.generation}): {a.describe()}"
        for i, a in enumerate(attempts, 1)
    ]
    return f"recovery failed after {len(attempts)} attempts: " + " | ".join(parts)


# -- trim requests (the root publishes, every agent acknowledges) -------------------------
def request_trim(store: Store, step: int, generation: int) -> int:
    """Ask every agent to drop its copies newer than ``step``; returns the request number."""
    n = store.counter(keys.TRIM_REQ) + 1
    # The request first, then the counter agents poll: one never sees a
    # number whose request is not there yet.
    store.set_json(keys.trim_request(n), {"step": step, "generation": generation, "t": time.time()})
    store.incr(keys.TRIM_REQ)
    return n


def trim_acks(store: Store, n: int, nodes: list[int]) -> dict[int, Any]:
    """The answers to trim request ``n`` received so far, per node."""
    got = {node: store.get_json_or(keys.trim_ack(n, node)) for node in nodes}
    return {node: ack for node, ack in got.items() if ack is not None}


# -- one recovery -----------------------------------------------------------------------
class Recovery:
    """The recovery from one failure, driven by the root agent."""

    def __init__(
        self,
        root: RootAgent,
        dead: list[int],
        ranks: list[int],
        exits: dict[int, Any],
        hung: bool = False,
    ) -> None:
        self.root, self.store, self.cfg = root, root.store, root.cfg
        self.dead, self.ranks, self.exits = dead, ranks, exits
        self.hung = hung
        """The failed ranks were found hung (and killed) by the watchdog, not by their exit."""
        self.dead_set: set[int] = set(dead)
        self.replaced: set[int] = set()
        self.excluded: list[tuple[int, int, str, int]] = []
        self.rec: dict[str, Any] = {}
        self.t_torn = 0.0
        self.alloc_before_s = 0.0
        """Seconds waited for replaced nodes to allocate their slots (``alloc_s``)."""
        self.takeover_s = 0.0
        """Seconds waited for lost nodes' replacements to come up (``takeover_s``)."""

    def run(self) -> None:
        """All phases; raises :class:`RecoveryFailed` when no attempt succeeds."""
        self.detect()
        self.teardown()
        attempts: list[Attempt] = []
        while len(attempts) < MAX_ATTEMPTS:
            attempt = self.attempt()
            attempts.append(attempt)
            if attempt.ok:
                self.record(attempt)
                return
            self.root.log(f"attempt {len(attempts)} failed: {attempt.describe()}")
            if attempt.newly_dead:
                self.dead_set |= set(attempt.newly_dead)
                self.replaced -= set(attempt.newly_dead)
            self.excluded += excluded_sources(attempt)
        raise RecoveryFailed(gave_up(attempts))

    # -- 1. detect ------------------------------------------------------------------------
    def detect(self) -> None:
        """Open the record; refuse a job that has restarted too often."""
        root, store = self.root, self.store
        t_detect = time.time()
        restarts = store.incr(keys.ROOT_RESTARTS)
        if restarts > self.cfg.cluster.max_restarts:
            # A job that fails again after every restart (a bug, not a fault)
            # must end, not loop.
            raise RecoveryFailed(
                f"gave up after {restarts - 1} recoveries (cluster.max_restarts="
                f"{self.cfg.cluster.max_restarts}); the last failure: dead nodes {self.dead}, "
                f"failed ranks {self.ranks} — see the rank logs"
            )
        injected = store.items(keys.INJECT, root.inject_seen + 1)
        if injected:
            root.inject_seen = injected[-1][0]
            store.incr(
                keys.ROOT_INJECT_SEEN, root.inject_seen - store.counter(keys.ROOT_INJECT_SEEN)
            )
        t_inject = min((rec["t"] for _, rec in injected), default=t_detect)
        kind = self.kind(self.dead)
        failed_step = root.progress()
        root.log(
            f"failure: {kind}; dead nodes {self.dead}, failed ranks {self.ranks}; "
            f"job at step {failed_step}"
        )
        pending = store.get_json_or(keys.ROOT_PENDING)
        if pending is not None:
            # A failure during the previous recovery's replay ends that record early.
            pending["interrupted"] = True
            store.push(keys.RECOVERY, pending)
            store.set_json(keys.ROOT_PENDING, None)
        self.rec = {
            "kind": kind,
            "failed": f"nodes {self.dead}" if self.dead else f"ranks {self.ranks}",
            "dead_nodes": self.dead,
            "failed_ranks": self.ranks,
            "failed_step": failed_step,
            "t_inject": t_inject,
            "t_detect": t_detect,
            "detect_s": t_detect - t_inject,
            "injected": [r for _, r in injected],
        }

    def kind(self, dead: list[int]) -> str:
        """The failure's kind as recorded: a lost node outweighs a rank's failure."""
        if dead:
            return "hardware"
        return "hang" if self.hung else "software"

    # -- 2. teardown ----------------------------------------------------------------------
    def teardown(self) -> None:
        """Stop every trainer of the generation on the live nodes and wait for their exits."""
        old = self.root.gen
        self.store.set(keys.stop(old), "1")
        live = [r for r in range(self.root.world) if self.root.rank_node[r] not in self.dead_set]
        self.dead_set |= set(self.root.wait_exits(old, live, timeout_s=15.0))
        self.t_torn = time.time()
        self.rec["teardown_s"] = self.t_torn - float(self.rec["t_detect"])

    # -- 3-7. one attempt ---------------------------------------------------------------------
    def attempt(self) -> Attempt:
        self.replace_lost()
        memory = self.root.inventory()
        plan = self.plan(memory)
        newly_dead = self.trim(plan)
        if newly_dead:
            return Attempt(plan, newly_dead=newly_dead)
        return self.relaunch(plan)

    def replace_lost(self) -> None:
        lost = sorted(self.dead_set - self.replaced)
        if lost:
            t0 = time.time()
            self.root.replace(lost)
            self.takeover_s += time.time() - t0
            self.replaced |= set(lost)
            self.alloc_before_s += self.root.wait_allocated(lost)
        rec = self.rec
        rec["dead_nodes"] = sorted(self.dead_set)
        rec["kind"] = self.kind(sorted(self.dead_set))
        if self.dead_set:
            rec["failed"] = f"nodes {sorted(self.dead_set)}"
        rec["replace_s"] = time.time() - self.t_torn

    def plan(self, memory: dict[int, dict[int, list[Held]]]) -> Plan:
        """The newest step every rank has on the current timeline, no newer than the failure."""
        timeline = self.root.timeline()
        storage = self.root.storage_checkpoints()
        # The failed step is the furthest the current timeline got: what the
        # ranks last reported, or a checkpoint of it they wrote since.
        failed_step = max(
            int(self.rec["failed_step"]), newest_on_timeline(memory, storage, timeline)
        )
        plan = plan_recovery(
            self.root.rank_node,
            memory,
            storage,
            self.excluded,
            failed_step=failed_step,
            timeline=timeline,
        )
        self.rec.update(
            failed_step=failed_step,
            restored_step=plan.step,
            reason=plan.reason,
            source_counts=plan.source_counts(),
            sources={str(r): src for r, src in plan.sources.items()},
            lost_steps=plan.lost_steps,
        )
        self.root.log(f"plan: {plan.reason}; sources {plan.source_counts()}")
        return plan

    def trim(self, plan: Plan) -> list[int]:
        """Every tier drops what is newer than the plan; returns nodes found dead meanwhile."""
        root = self.root
        t0 = time.time()
        dropped = root.trim_storage(plan.step)
        self.rec["trimmed_storage"] = sorted({*self.rec.get("trimmed_storage", []), *dropped})
        n = request_trim(self.store, plan.step, root.gen + 1)
        nodes = list(range(root.nodes))
        deadline = time.monotonic() + TRIM_TIMEOUT_S
        while True:
            acks = trim_acks(self.store, n, nodes)
            root.refresh_liveness()
            # A node that died meanwhile answers nothing (its replacement starts
            # empty); every live one must have dropped its copies before a launch.
            dead = sorted((set(nodes) - set(acks)) & set(root.dead_nodes()))
            waiting = [node for node in nodes if node not in acks and node not in dead]
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise RecoveryFailed(
                    f"nodes {waiting} did not drop their checkpoints newer than step "
                    f"{plan.step} within {TRIM_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.02)
        # What every attempt of this recovery dropped, node -> rank -> steps.
        trimmed = self.rec.setdefault("trimmed", {})
        for node, per_rank in acks.items():
            for rank, steps in per_rank.items():
                mine = trimmed.setdefault(str(node), {}).setdefault(rank, [])
                mine[:] = sorted({*mine, *steps})
        self.rec["trim_s"] = self.rec.get("trim_s", 0.0) + time.time() - t0
        return dead

    def relaunch(self, plan: Plan) -> Attempt:
        self.rec["t_launch"] = time.time()
        gen = self.root.launch({**plan.to_json(), "replay_until": self.rec["failed_step"]})
        ok, readies = self.root.wait_ready(gen)
        attempt = Attempt(plan, gen, readies)
        if ok:
            return attempt
        self.store.set(keys.stop(gen), "1")
        attempt.newly_dead = self.root.wait_exits(gen, list(range(self.root.world)), 15.0)
        reported = {
            r: self.store.get_json_or(keys.restore_failed(gen, r)) for r in self.root.rank_node
        }
        attempt.failed_restores = {r: f for r, f in reported.items() if f is not None}
        return attempt

    # -- the record ---------------------------------------------------------------------------
    def record(self, attempt: Attempt) -> None:
        """Store the recovery's phases; the root closes it once replay is done."""
        rec, readies = self.rec, attempt.readies
        t_ready = max(float(v["t"]) for v in readies.values()) if readies else time.time()
        rec.update(restart_phases(self.t_torn, readies, self.alloc_before_s, self.takeover_s))
        prepare = [float(v.get("ckpt_prepare_s", 0.0)) for v in readies.values()]
        rec["ckpt_prepare_s"] = max(prepare) if prepare else 0.0
        rec["retrieve_bytes"] = sum(int(v.get("bytes", 0)) for v in readies.values())
        rec["rank_sources"] = {str(r): v.get("source", "scratch") for r, v in readies.items()}
        # How each rank came back: in_place (the surviving process), spare (a
        # pre-started one) or fresh (a new interpreter).
        how = {r: str(v.get("restart", "fresh")) for r, v in readies.items()}
        rec["rank_restart"] = {str(r): h for r, h in how.items()}
        # Each rank's milestones, in seconds after the launch of the generation:
        # where the last rank to be ready spent its time.
        t_launch = float(rec.get("t_launch", self.t_torn))
        rec["rank_milestones"] = {
            str(r): {m: round(float(v[m]) - t_launch, 4) for m in MILESTONES if m in v}
            for r, v in readies.items()
        }
        rec["in_place_ranks"] = sorted(r for r, h in how.items() if h == "in_place")
        # Ranks that loaded into a model their process already held (a
        # survivor's, or one a spare built while it waited) instead of building one.
        rec["model_reused_ranks"] = sorted(r for r, v in readies.items() if v.get("model_reused"))
        # Ranks whose local slots a standby node allocated before its takeover.
        rec["pooled_slot_ranks"] = sorted(
            r for r, v in readies.items() if v.get("ckpt_slots_pooled")
        )
        # Each rank's own durations, for the one that held the others up.
        rec["rank_retrieve_s"] = {str(r): v.get("retrieve_s", 0.0) for r, v in readies.items()}
        rec["rank_load_s"] = {str(r): v.get("load_s", 0.0) for r, v in readies.items()}
        # The part of load_s spent in DDP's discarded warm-up backward (collectives).
        rec["rank_warm_up_s"] = {str(r): v.get("warm_up_s", 0.0) for r, v in readies.items()}
        rec["generation"] = attempt.generation
        rec["t_ready"] = t_ready
        self.store.set_json(keys.ROOT_PENDING, rec)
