"""The root agent: detects failures, drives recovery, and declares the job done.

It launches generation 1 once every worker agent has registered, then
watches four things through the KV store: the agents' heartbeats (a node
that misses ``cluster.missed_beats`` beats has failed: a hardware failure),
the trainers' exits as their agents report them (a rank killed by a signal
while its agent lives: a software failure), the trainers' own heartbeats (a
rank silent for ``cluster.hang_timeout_s`` while its node lives is hung: its
agent kills it and it is recovered as a software failure), and the ranks'
final reports.

On a failure it stops the generation, replaces lost nodes (asking the
launcher for a fresh one), asks the surviving agents what checkpoints they
hold, plans a common step and a source per rank (``gemini.recovery``), has
every tier drop what the plan abandons, and launches the next generation
(``gemini.cluster.recovering``, phase by phase); every phase is timed and
recorded in the store for the controller to log. All of its state lives in
the store, so a new root elected after this one is lost picks up where it
stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from gemini.cluster import keys
from gemini.cluster.agent import Heartbeat
from gemini.cluster.job import JobSpec
from gemini.cluster.orders import Inbox
from gemini.cluster.recovering import Recovery, RecoveryFailed
from gemini.cluster.store import Store
from gemini.lineage import Timeline
from gemini.recovery import Held


@dataclass
class Liveness:
    """Last seen heartbeat counter per node, and when (on the root's own clock)."""

    counters: dict[int, int] = field(default_factory=dict)
    changed: dict[int, float] = field(default_factory=dict)

    def update(self, node: int, value: int, now: float) -> None:
        if self.counters.get(node) != value:
            self.counters[node] = value
            self.changed[node] = now

    def stale(self, node: int, now: float, limit_s: float) -> bool:
        return now - self.changed.get(node, now) > limit_s


def obey_orders(job: JobSpec, stop: threading.Event) -> None:
    """The root's inbox (``order/root``), watched on a thread of its own: a root
    in the middle of a recovery must still die when a root_loss is ordered."""
    inbox = Inbox(Store.for_job(job), keys.ROOT_ORDERS)
    while not stop.wait(0.1):
        try:
            pending = inbox.pending()
        except Exception:  # the store went away: the job is over
            return
        for n, order in pending:
            if order.get("op") == "die":
                t = inbox.record_injection(order)
                inbox.ack(n, t=t)
                os.kill(os.getpid(), signal.SIGKILL)
            inbox.ack(n, error=f"unknown order {order.get('op')!r}")


STANDBY_WARM_TIMEOUT_S = 120.0
"""How long generation 1 waits for the standby nodes to be warm."""


class RootAgent:
    def __init__(self, job: JobSpec) -> None:
        self.job = job
        self.cfg = job.cfg
        self.store = Store.for_job(job)
        c = self.cfg.cluster
        self.nodes = c.nodes
        self.world = job.world_size
        self.rank_node = {r: r // c.ranks_per_node for r in range(self.world)}
        self.limit_s = c.heartbeat_s * c.missed_beats
        self.live = Liveness()
        self.hang_timeout_s = c.hang_timeout_s
        # The trainers' beats, per rank, for the current generation only
        # (``rank_live_gen``): a new trainer is judged from its own start.
        self.rank_live = Liveness()
        self.rank_live_gen = -1
        self.hang_checked = 0.0
        self.job_progress = Liveness()
        """The furthest step any rank reported (one entry), and when it last moved."""
        self.gen = int(self.store.get_json_or(keys.GEN, 0))
        self.inject_seen = self.store.counter(keys.ROOT_INJECT_SEEN)
        # A root serves one epoch; finding a newer one means it was presumed
        # dead and replaced, so it must step down rather than act twice.
        self.epoch = self.store.counter(keys.ROOT_EPOCH)

    # -- helpers ----------------------------------------------------------------
    def log(self, msg: str) -> None:
        print(f"[root {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def refresh_liveness(self) -> None:
        now = time.monotonic()
        for n in range(self.nodes):
            self.live.update(n, self.store.counter(keys.hb_node(n)), now)

    def dead_nodes(self) -> list[int]:
        now = time.monotonic()
        return [n for n in range(self.nodes) if self.live.stale(n, now, self.limit_s)]

    def hung_ranks(self, exits: dict[int, Any], dead: list[int], finals: list[int]) -> list[int]:
        """Ranks of the current generation that are hung: the job has made no
        progress for ``cluster.hang_timeout_s`` (no rank completed a step: the
        peers wait on someone), and these ranks' trainers stopped beating for as
        long while they have not exited and their nodes live.

        Both conditions, not the beat alone: a trainer on a host loaded far past
        its cores can miss its beats for a while, but then the job still moves.
        Only a trainer that has started (``trainer/{g}/{r}``) is watched: one not
        yet launched has no beat to miss.
        """
        if self.hang_timeout_s <= 0:
            return []
        finished = set(finals)
        if self.rank_live_gen != self.gen:
            self.rank_live, self.rank_live_gen = Liveness(), self.gen
            self.job_progress = Liveness()
        now = time.monotonic()
        self.job_progress.update(0, self.progress(), now)
        watched = []
        for r in range(self.world):
            # A rank past its final report has finished training: what is left
            # is its exit, and an interpreter shutting down runs no threads.
            if r in exits or self.rank_node[r] in dead or r in finished:
                continue
            if r not in self.rank_live.counters and not self.store.exists(
                keys.trainer(self.gen, r)
            ):
                continue
            self.rank_live.update(r, self.store.counter(keys.hb_rank(r)), now)
            watched.append(r)
        if not self.job_progress.stale(0, now, self.hang_timeout_s):
            return []
        hung = [r for r in watched if self.rank_live.stale(r, now, self.hang_timeout_s)]
        return hung

    def kill_hung(self, ranks: list[int]) -> None:
        """Have each hung rank's own agent SIGKILL it (nothing kills across nodes by PID)."""
        from gemini.cluster import orders

        rpn = self.cfg.cluster.ranks_per_node
        sends = [
            (
                keys.node_orders(self.rank_node[r]),
                {"op": "kill_trainers", "ranks": [r % rpn], "gen": self.gen, "inject": None},
            )
            for r in ranks
        ]
        for (_, order), ack in zip(sends, orders.send(self.store, sends), strict=True):
            if ack is None:
                self.log(f"no agent acknowledged the kill of hung rank(s) {order['ranks']}")

    def exits(self, gen: int) -> dict[int, dict[str, Any]]:
        got = {r: self.store.get_json_or(keys.exited(gen, r)) for r in range(self.world)}
        return {r: e for r, e in got.items() if e is not None}

    def progress(self) -> int:
        return max((self.store.get_int(keys.progress(r)) for r in range(self.world)), default=0)

    def launch(self, plan: dict[str, Any]) -> int:
        gen = self.gen + 1
        self.store.set_json(keys.plan(gen), plan)
        # Progress restarts with the new generation: a step the abandoned
        # timeline reached must not count as reached by this one.
        for r in range(self.world):
            self.store.set(keys.progress(r), str(int(plan.get("start_step", 0))))
        self.store.set_json(keys.GEN, gen)
        self.gen = gen
        self.store.set_json(keys.ROOT_STATE, {"gen": self.gen})
        return self.gen

    # -- the job ----------------------------------------------------------------
    def wait_agents(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        for n in range(self.nodes):
            while not self.store.exists(keys.agent(n)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {n}'s agent did not register in {timeout_s:.0f} s")
                time.sleep(0.05)

    def wait_standbys(self, timeout_s: float = STANDBY_WARM_TIMEOUT_S) -> None:
        """Wait until the standby nodes and the warm spares are ready, so that their
        start-up (interpreters, imports) is part of the job's and never competes
        with step 0 onwards.

        One that is not ready in time is waited for no longer: it can still
        take over, only more slowly.
        """
        c = self.cfg.cluster
        waits: list[tuple[str, str, str | None]] = [
            (f"standby node {k}", keys.standby(k), "warm") for k in range(c.standby_nodes)
        ]
        if c.warm_spares:
            waits += [
                (f"node {n}'s spare {i}", keys.spare_warm(n, i), None)
                for n in range(self.nodes)
                for i in range(c.ranks_per_node)
            ]
        deadline = time.monotonic() + timeout_s
        for what, key, flag in waits:
            while True:
                got = self.store.get_json_or(key)
                if got is not None and (flag is None or got.get(flag)):
                    break
                if time.monotonic() > deadline:
                    self.log(f"{what} not ready after {timeout_s:.0f} s: starting anyway")
                    return
                time.sleep(0.05)

    def run(self) -> int:
        hb = Heartbeat(self.job, "root", self.cfg.cluster.heartbeat_s).start()
        self.store.set_json(keys.ROOT_PID, {"pid": os.getpid(), "t": time.time()})
        stop_orders = threading.Event()
        threading.Thread(
            target=obey_orders, args=(self.job, stop_orders), name="orders", daemon=True
        ).start()
        try:
            if self.gen == 0:
                self.wait_agents()
                self.wait_standbys()
                self.launch(self.resume_plan() if self.job.resume else self.first_plan())
                self.log(f"generation {self.gen}: {self.world} ranks on {self.nodes} nodes")
            else:
                self.took_over()
            return self.monitor()
        finally:
            stop_orders.set()
            hb.stop()

    def first_plan(self) -> dict[str, Any]:
        return {"start_step": 0, "sources": {}, "reason": "first launch"}

    def resume_plan(self) -> dict[str, Any]:
        """A requeued job's first plan: the newest step complete on storage for
        every rank (step 0 if none), after the previous attempt's leftovers
        above it — half-written files of writers it killed — are gone.

        Generations go on from the newest one found on storage: the previous
        attempt's checkpoints keep their place on the timeline, and this
        attempt's are newer than all of them.
        """
        from gemini.recovery import plan_recovery

        stored = self.storage_checkpoints()
        plan = plan_recovery(self.rank_node, {}, stored)
        self.trim_storage(plan.step)
        self.gen = max((g for _, g in stored), default=0)
        reason = f"requeued (attempt {self.job.attempt + 1}): " + (
            plan.reason if stored else "no complete checkpoint on storage, from step 0"
        )
        self.log(reason)
        return {**plan.to_json(), "reason": reason, "resumed": True}

    def took_over(self) -> None:
        """Record the loss of the previous root: this one was elected to replace it."""
        now = time.time()
        elected = self.store.get_json_or(keys.ROOT_ELECTED, {})
        injected = self.store.items(keys.INJECT, self.inject_seen + 1)
        lost = [rec for _, rec in injected if rec.get("kind") == "root_loss"]
        if injected:
            self.inject_seen = injected[-1][0]
            self.store.incr(
                keys.ROOT_INJECT_SEEN, self.inject_seen - self.store.counter(keys.ROOT_INJECT_SEEN)
            )
        t_inject = float(lost[0]["t"]) if lost else float(elected.get("t", now))
        t_elected = float(elected.get("t", now))
        self.log(
            f"elected by node {elected.get('node')} (epoch {elected.get('epoch')}); carrying on"
        )
        step = self.progress()
        self.store.push(
            keys.RECOVERY,
            {
                "kind": "root_loss",
                "failed": "root agent",
                "failed_step": step,
                "restored_step": step,
                "t_inject": t_inject,
                "detect_s": t_elected - t_inject,
                "teardown_s": 0.0,
                "takeover_s": 0.0,
                "restart_s": now - t_elected,
                "rendezvous_s": 0.0,
                "alloc_s": 0.0,
                "retrieve_s": 0.0,
                "load_s": 0.0,
                "replay_s": 0.0,
                "recovery_s": now - t_inject,
                "lost_steps": 0,
                "reason": f"root re-elected on node {elected.get('node')}; training carried on",
                "source_counts": {},
                "t_back": now,
            },
        )

    def monitor(self) -> int:
        suspicious_since: float | None = None
        while True:
            if self.store.exists(keys.ABORT):
                return 1
            if self.store.counter(keys.ROOT_EPOCH) != self.epoch:
                self.log("a newer root was elected: stepping down")
                return 0
            self.refresh_liveness()
            exits = self.exits(self.gen)
            finals = [r for r in range(self.world) if self.store.exists(keys.final(self.gen, r))]
            if (
                len(finals) == self.world
                and len(exits) == self.world
                and all(e["code"] == 0 for e in exits.values())
            ):
                self.check_replayed()
                self.finish("completed")
                return 0
            self.check_replayed()
            dead = self.dead_nodes()
            killed = [r for r, e in exits.items() if e["code"] < 0 and e["code"] != -15]
            crashed = [r for r, e in exits.items() if e["code"] != 0]
            now = time.monotonic()
            # The watchdog's reads (every rank's progress and beat) once per
            # beat, not every turn: hangs are judged over seconds.
            judge = now - self.hang_checked >= self.cfg.cluster.heartbeat_s
            hung = [] if dead or killed or not judge else self.hung_ranks(exits, dead, finals)
            if judge:
                self.hang_checked = now
            if dead or killed:
                self.on_failure(dead, killed, exits)
                suspicious_since = None
            elif hung:
                self.log(
                    f"ranks {hung}: no trainer heartbeat for "
                    f"{self.hang_timeout_s:g} s while their nodes live: hung"
                )
                self.kill_hung(hung)
                self.on_failure([], hung, exits, hung=True)
                suspicious_since = None
            elif crashed:
                # A survivor's trainer dies of a broken connection before the
                # failed node misses its beats: wait for the cause to show.
                suspicious_since = suspicious_since or now
                if now - suspicious_since > self.limit_s + 1.0:
                    self.on_failure([], crashed, exits)
                    suspicious_since = None
            time.sleep(0.1)

    # -- recovery -------------------------------------------------------------
    def wait_exits(self, gen: int, ranks: list[int], timeout_s: float) -> list[int]:
        """Wait for the ranks' exit reports; returns nodes found dead meanwhile.

        A rank that never reports is on a node that died too (two nodes of a
        rack fail a moment apart): once every missing rank's node has missed
        its beats, there is nothing left to wait for.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            missing = [r for r in ranks if not self.store.exists(keys.exited(gen, r))]
            if not missing:
                return []
            self.refresh_liveness()
            dead = set(self.dead_nodes())
            if all(self.rank_node[r] in dead for r in missing):
                return sorted({self.rank_node[r] for r in missing})
            time.sleep(0.02)
        self.refresh_liveness()
        return self.dead_nodes()

    def replace(self, nodes: list[int], timeout_s: float = 120.0) -> None:
        """Ask the launcher for fresh nodes (empty memory) and wait for their agents."""
        before = {n: self.store.get_json_or(keys.agent(n), {}).get("incarnation", 0) for n in nodes}
        for n in nodes:
            self.store.push(keys.SPAWN, {"node": n, "t": time.time()})
        deadline = time.monotonic() + timeout_s
        for n in nodes:
            while self.store.get_json_or(keys.agent(n), {}).get("incarnation", 0) <= before[n]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replacement node {n} did not come up in {timeout_s:.0f} s")
                time.sleep(0.05)
        now = time.monotonic()
        for n in nodes:
            self.live.changed[n] = now

    def wait_allocated(self, nodes: list[int], timeout_s: float = 120.0) -> float:
        """Wait until fresh nodes' agents have allocated their slots; returns the seconds.

        A replaced node's agent creates and touches the slots of every rank it
        holds as soon as it comes up (the sizes are known from the first
        generation); a disk restart pays nothing of the kind. Waiting here,
        before the inventory (which the agent answers only after allocating),
        makes that work its own phase, ``alloc_s``.
        """
        if self.cfg.backend.name not in ("memory", "replicated"):
            return 0.0
        from gemini.checkpoint.memory import held_sources

        t0 = time.time()
        rpn = self.cfg.cluster.ranks_per_node
        deadline = time.monotonic() + timeout_s
        for n in nodes:
            inc = self.store.get_json_or(keys.agent(n), {}).get("incarnation")
            for src in held_sources(self.cfg, n):
                for rank in range(src * rpn, (src + 1) * rpn):
                    if not self.store.exists(keys.ckpt_size(rank)):
                        continue  # never announced: nothing to allocate yet
                    while (
                        self.store.get_json_or(keys.ckpt_ready(n, rank), {}).get("incarnation")
                        != inc
                    ):
                        if time.monotonic() > deadline:
                            raise TimeoutError(
                                f"replacement node {n} did not allocate slots for rank {rank} "
                                f"in {timeout_s:.0f} s"
                            )
                        time.sleep(0.01)
        return time.time() - t0

    def inventory(self, timeout_s: float = 60.0) -> dict[int, dict[int, list[Held]]]:
        """Ask every agent which verified ``(step, generation)`` it holds, per source rank."""
        n = self.store.incr(keys.INV_REQ)
        out: dict[int, dict[int, list[Held]]] = {}
        deadline = time.monotonic() + timeout_s
        for node in range(self.nodes):
            key = keys.inventory(n, node)
            got = self.store.get_json_or(key)
            while got is None and time.monotonic() < deadline:
                time.sleep(0.02)
                got = self.store.get_json_or(key)
            if got is not None:
                out[node] = {int(r): [(int(s), int(g)) for s, g in held] for r, held in got.items()}
        return out

    def storage_checkpoints(self) -> list[tuple[int, int]]:
        """``(step, generation)`` complete on storage for every rank."""
        from gemini.checkpoint.disk import storage_checkpoints, uses_storage

        if not uses_storage(self.cfg):
            return []
        from gemini.config import config_hash

        return storage_checkpoints(
            self.cfg,
            self.job.job_dir,
            self.job.storage_run,
            self.world,
            config_hash=config_hash(self.cfg),
        )

    def trim_storage(self, step: int) -> list[int]:
        """Storage's share of a trim: every step above ``step`` and dead writers' files."""
        from gemini.checkpoint.disk import trim_storage, uses_storage

        if not uses_storage(self.cfg):
            return []
        return trim_storage(self.cfg, self.job.job_dir, self.job.storage_run, step)

    def timeline(self) -> Timeline:
        """Every generation's start step, from the plans published so far."""
        # A resumed job's generations start above those of earlier attempts,
        # whose plans died with their store: only this attempt's are known.
        plans = {g: self.store.get_json_or(keys.plan(g)) for g in range(1, self.gen + 1)}
        return Timeline.from_plans({g: p for g, p in plans.items() if p is not None})

    def on_failure(
        self, dead: list[int], ranks: list[int], exits: dict[int, Any], hung: bool = False
    ) -> None:
        """Recover (``gemini.cluster.recovering``), or end the job with the reason why not."""
        try:
            Recovery(self, dead, ranks, exits, hung=hung).run()
        except RecoveryFailed as e:
            self.fail(str(e))

    def fail(self, reason: str) -> None:
        """End the job as failed: the controller reports ``reason`` and tears everything down."""
        self.log(reason)
        self.store.set_json(
            keys.ROOT_RESULT, {"status": "failed", "reason": reason, "gen": self.gen}
        )
        self.store.set(keys.ABORT, "1")

    def wait_ready(self, gen: int, timeout_s: float = 300.0) -> tuple[bool, dict[int, Any]]:
        """Wait until every rank of ``gen`` restored; False if one died trying."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.refresh_liveness()
            if self.dead_nodes():
                return False, {}
            got = {r: self.store.get_json_or(keys.ready(gen, r)) for r in range(self.world)}
            readies = {r: v for r, v in got.items() if v is not None}
            if len(readies) == self.world:
                return True, readies
            failed = [r for r, e in self.exits(gen).items() if e["code"] != 0]
            if failed:
                self.log(f"ranks {failed} failed to restore in generation {gen}")
                return False, readies
            time.sleep(0.02)
        raise TimeoutError(f"generation {gen} did not come up in {timeout_s:.0f} s")

    def check_replayed(self) -> None:
        """Close the pending recovery record once every rank is back at the failed step."""
        rec = self.store.get_json_or(keys.ROOT_PENDING)
        if rec is None:
            return
        target = min(int(rec["failed_step"]), self.cfg.train.steps)
        done = (
            all(self.store.exists(keys.final(self.gen, r)) for r in range(self.world))
            or self.min_progress() >= target
        )
        if not done:
            return
        t_back = time.time()
        rec["replay_s"] = max(0.0, t_back - float(rec["t_ready"]))
        rec["recovery_s"] = t_back - float(rec["t_inject"])
        rec["t_back"] = t_back
        self.store.push(keys.RECOVERY, rec)
        self.store.set_json(keys.ROOT_PENDING, None)
        self.log(f"recovered: back at step {target} {rec['recovery_s']:.2f} s after the failure")

    def min_progress(self) -> int:
        return min(self.store.get_int(keys.progress(r)) for r in range(self.world))

    def finish(self, status: str) -> None:
        self.store.set_json(keys.ROOT_RESULT, {"status": status, "gen": self.gen})
        self.store.set(keys.DONE, "1")
        self.log(f"job {status} in generation {self.gen}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--job", required=True)
    a = p.parse_args(argv)
    root = RootAgent(JobSpec.load(a.job))
    try:
        return root.run()
    except Exception as e:  # the controller reads the reason from the store
        root.store.set_json(
            keys.ROOT_RESULT, {"status": "error", "reason": f"{type(e).__name__}: {e}"}
        )
        raise


if __name__ == "__main__":
    sys.exit(main())
