"""The worker agent: one per node, long-lived, the owner of the node's checkpoint memory.

It heartbeats into the KV store, starts and stops the node's trainer ranks
generation by generation as the root agent decides (as torchelastic's agent
supervises its workers), reports how each trainer exited, and hosts the
node's checkpoint services (shared-memory slots, the replication receiver).
Because it is a separate process from the trainers, a trainer crash — a
software failure — loses no checkpoint; killing the agent is a hardware
failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from gemini.cluster import keys
from gemini.cluster.job import JobSpec
from gemini.cluster.orders import Inbox
from gemini.cluster.processes import spawn_module, terminate_tree
from gemini.cluster.store import Store

# A spare's exit status when this host cannot return it from idle priority
# (kept in step with gemini.workload.trainer, which imports torch).
SPARE_UNSUPPORTED = 75

# How long a newly elected root may stay silent: an interpreter and torch
# start-up on a loaded host.
ROOT_STARTUP_GRACE_S = 60.0


class Heartbeat:
    """A thread that bumps ``hb/{name}`` every period (a counter: no clock skew)."""

    def __init__(self, job: JobSpec, name: str, period_s: float) -> None:
        self.store = Store.for_job(job)
        self.name, self.period_s = name, period_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"hb-{name}", daemon=True)

    def start(self) -> Heartbeat:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.incr(keys.hb(self.name))
            except Exception:  # the store went away: the job is over
                return
            self._stop.wait(self.period_s)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


class WorkerAgent:
    def __init__(self, job: JobSpec, node: int) -> None:
        self.job, self.node = job, node
        self.cfg = job.cfg
        self.store = Store.for_job(job)
        self.rpn = self.cfg.cluster.ranks_per_node
        self.ranks = [node * self.rpn + i for i in range(self.rpn)]
        self.trainers: dict[int, subprocess.Popen[bytes]] = {}
        self.gen = 0
        self.reported: set[int] = set()
        self.log_dir = Path(job.job_dir) / "logs"
        self.services: Any = None
        self._stopping = False
        c = self.cfg.cluster
        self.limit_s = c.heartbeat_s * c.missed_beats
        self.root_hb, self.root_seen = -1, time.monotonic()
        self.root_epoch, self.awaiting_root = 0, False
        self.root_checked = 0.0
        self.peer_hb: dict[int, tuple[int, float]] = {}
        self.root_proc: subprocess.Popen[bytes] | None = None
        self.spares: dict[int, subprocess.Popen[bytes]] = {}
        self.launched_at = time.monotonic()
        self.use_spares = self.cfg.cluster.warm_spares
        self.inbox = Inbox(self.store, keys.node_orders(node))

    def start_services(self) -> dict[str, Any]:
        """The node's checkpoint services; their address goes into the registration."""
        from gemini.checkpoint.node_memory import make_agent_services

        self.services = make_agent_services(self.job, self.node, self.store)
        return dict(self.services.start())

    def run(self) -> int:
        hb = Heartbeat(self.job, f"node{self.node}", self.cfg.cluster.heartbeat_s).start()
        info = self.start_services()
        incarnation = self.store.incr(keys.agent_incarnation(self.node))
        self.store.set_json(
            keys.agent(self.node),
            {"pid": os.getpid(), "node": self.node, "incarnation": incarnation, **info},
        )
        # A replacement agent must not relaunch the generation it replaces:
        # it waits for the root's next one.
        self.gen = self.generation()
        try:
            while not self._stopping:
                if self.store.exists(keys.DONE) or self.store.exists(keys.ABORT):
                    break
                self.obey_orders()
                g = self.generation()
                # Only a generation the root planned (a signed plan) is launched.
                if g > self.gen and self.store.exists(keys.plan(g)):
                    self.stop_trainers()
                    self.launch(g)
                elif self.trainers and self.store.exists(keys.stop(self.gen)):
                    self.stop_trainers()
                self.poll_trainers()
                if self.services is not None:
                    self.services.tick()
                self.watch_root()
                if self.use_spares:
                    self.keep_spares()
                # 10 Hz: each pass costs store round trips, i.e. CPU the
                # trainers on this host would otherwise have.
                time.sleep(0.1)
        finally:
            self.close_spares()
            self.stop_trainers()
            if self.root_proc is not None and self.root_proc.poll() is None:
                # The elected root finishes the job's bookkeeping on its own.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.root_proc.wait(timeout=10)
            hb.stop()
            if self.services is not None:
                self.services.close()
        return 0

    def generation(self) -> int:
        return int(self.store.get_json_or(keys.GEN, 0))

    def trainer_args(self, local: int, rank: int) -> list[str]:
        return [
            "--job",
            str(Path(self.job.job_dir) / "job.json"),
            "--node",
            str(self.node),
            "--rank",
            str(rank),
            "--local-rank",
            str(local),
        ]

    def launch(self, gen: int) -> None:
        """Start generation ``gen``'s ranks, on warm spares where there are some."""
        self.gen = gen
        self.reported = set()
        self.launched_at = time.monotonic()
        for local, rank in enumerate(self.ranks):
            spare = self.spares.pop(rank, None)
            if spare is not None and spare.poll() is None and spare.stdin is not None:
                try:
                    spare.stdin.write(f"{gen}\n".encode())
                    spare.stdin.close()
                    self.trainers[rank] = spare
                    continue
                except OSError:
                    pass
            log = self.log_dir / f"rank{rank}.log"
            args = [*self.trainer_args(local, rank), "--gen", str(gen)]
            self.trainers[rank] = spawn_module("gemini.workload.trainer", args, log_path=log)

    def keep_spares(self) -> None:
        """One warm spare per local rank, started once a generation is under way.

        Waiting a few seconds keeps the spares' imports off the critical path of
        the generation's own start-up on a machine with few cores.
        """
        if self.gen == 0 or time.monotonic() - self.launched_at < 5.0:
            return
        for local, rank in enumerate(self.ranks):
            spare = self.spares.get(rank)
            if spare is not None and spare.poll() == SPARE_UNSUPPORTED:
                self.use_spares = False  # this host cannot run idle-priority spares
                return
            if spare is None or spare.poll() is not None:
                self.spares[rank] = spawn_module(
                    "gemini.workload.trainer",
                    [*self.trainer_args(local, rank), "--standby"],
                    log_path=self.log_dir / f"rank{rank}.log",
                    stdin_pipe=True,
                )

    def close_spares(self) -> None:
        for spare in self.spares.values():
            if spare.poll() is None:
                terminate_tree(spare.pid, grace_s=1.0)
        self.spares = {}

    def poll_trainers(self) -> None:
        for rank, proc in list(self.trainers.items()):
            code = proc.poll()
            if code is not None and rank not in self.reported:
                self.reported.add(rank)
                self.store.set_json(
                    keys.exited(self.gen, rank), {"code": code, "node": self.node, "t": time.time()}
                )

    def stop_trainers(self) -> None:
        for proc in self.trainers.values():
            if proc.poll() is None:
                terminate_tree(proc.pid, grace_s=2.0)
        self.poll_trainers()
        self.trainers = {}

    # -- failures ordered by the injector (gemini.cluster.orders) --------------------
    def obey_orders(self) -> None:
        for n, order in self.inbox.pending():
            op = order.get("op")
            if op == "kill_trainers":
                # Only the generation the order saw: a restart since then has
                # other trainers, which the failure never aimed at.
                same_gen = int(order.get("gen", -1)) == self.gen
                procs = [
                    self.trainers.get(self.ranks[i])
                    for i in order.get("ranks", [])
                    if same_gen and 0 <= int(i) < len(self.ranks)
                ]
                t = self.inbox.record_injection(order)
                killed = []
                for proc in procs:
                    if proc is not None and proc.poll() is None:
                        proc.kill()
                        killed.append(proc.pid)
                self.inbox.ack(n, t=t, killed=killed)
            elif op == "kill_node":
                t = self.inbox.record_injection(order)
                self.inbox.ack(n, t=t)
                self.die()
            elif op == "corrupt":
                from gemini.checkpoint.node_memory import corrupt_held_replica

                result = corrupt_held_replica(self.job, self.node, int(order.get("rank", -1)))
                self.inbox.ack(n, result=result)
            else:
                self.inbox.ack(n, error=f"unknown order {op!r}")

    def die(self) -> None:
        """A hardware failure of this node: everything below this agent dies at
        once, the node's shared memory is freed, then the agent itself dies.

        No goodbye: the heartbeats just stop, as they do when a machine is lost,
        and the root finds out by missed beats.
        """
        from gemini.checkpoint.slot import unlink_prefix

        procs = psutil.Process().children(recursive=True)
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(procs, timeout=5)
        unlink_prefix(f"gemini-{self.job.run_id}-n{self.node}-")
        os.kill(os.getpid(), signal.SIGKILL)

    # -- root election ------------------------------------------------------------
    def live_nodes(self, now: float) -> list[int]:
        live = []
        for n in range(self.cfg.cluster.nodes):
            v = self.store.counter(keys.hb_node(n))
            seen = self.peer_hb.get(n)
            if seen is None or seen[0] != v:
                self.peer_hb[n] = (v, now)
            if now - self.peer_hb[n][1] <= self.limit_s:
                live.append(n)
        return live

    def watch_root(self) -> None:
        """Elect a new root when the current one stops beating (the store outlives it).

        After an election the new root needs an interpreter start before its
        first beat: until that beat arrives the silence allowed is the
        start-up grace, not the missed-beats limit, or every agent would keep
        electing roots that are still importing torch.
        """
        now = time.monotonic()
        # Looking once per beat is enough; every store round trip costs CPU
        # that the trainers on this host would otherwise have.
        if now - self.root_checked < self.cfg.cluster.heartbeat_s / 2:
            return
        self.root_checked = now
        v = self.store.counter(keys.HB_ROOT)
        epoch = self.store.counter(keys.ROOT_EPOCH)
        if epoch != self.root_epoch:
            self.root_epoch, self.root_seen, self.awaiting_root = epoch, now, True
        if v != self.root_hb or v == 0:
            if v != self.root_hb and self.root_hb >= 0:
                self.awaiting_root = False
            self.root_hb, self.root_seen = v, now
            return
        limit = ROOT_STARTUP_GRACE_S if self.awaiting_root else self.limit_s
        if now - self.root_seen < limit or self.store.exists(keys.DONE):
            return
        live = self.live_nodes(now)
        # The lowest live node stands first; the others only if it stays silent.
        lowest = min(live, default=self.node)
        if self.node != lowest and now - self.root_seen < 3 * limit:
            return
        me = str(self.node)
        got = self.store.raw.compare_set(keys.root_elect(epoch), "", me)
        if got.decode() != me:
            return
        self.store.set_json(
            keys.ROOT_ELECTED, {"node": self.node, "epoch": epoch + 1, "t": time.time()}
        )
        self.store.incr(keys.ROOT_EPOCH)
        self.root_proc = spawn_module(
            "gemini.cluster.root",
            ["--job", str(Path(self.job.job_dir) / "job.json")],
            log_path=self.log_dir / f"root-epoch{epoch + 1}.log",
        )

    def request_stop(self, *_: Any) -> None:
        self._stopping = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--job", required=True)
    p.add_argument("--node", type=int, required=True)
    a = p.parse_args(argv)
    agent = WorkerAgent(JobSpec.load(a.job), a.node)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    with contextlib.suppress(KeyboardInterrupt):
        return agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
