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
import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from gemini.cluster import keys
from gemini.cluster.job import JobSpec
from gemini.cluster.orders import Inbox
from gemini.cluster.processes import spawn_module, terminate_tree
from gemini.cluster.store import Store

if TYPE_CHECKING:
    from gemini.checkpoint.slot import SlotSet

# A spare's exit status when this host cannot return it from idle priority
# (kept in step with gemini.workload.trainer, which imports torch).
SPARE_UNSUPPORTED = 75

# How long a stopped generation's trainers have to leave it alive (restart in
# place) before the agent ends them: leaving takes a broken collective to
# raise (about a second with gloo) and a process-group teardown. A trainer ends
# itself at this deadline too (gemini.workload.trainer.LEAVE_DEADLINE_S).
PARK_GRACE_S = 5.0

# How long a pre-started trainer (parked, spare, standby) handed a generation
# may take to announce itself in it before the agent gives up on it and starts
# a fresh process for that rank: it has nothing to import, so this is slack.
HANDOVER_TIMEOUT_S = 10.0

# How long a newly elected root may stay silent: an interpreter and torch
# start-up on a loaded host.
ROOT_STARTUP_GRACE_S = 60.0


FENCED_EXIT = 75
"""Exit status of an agent that fenced its node (cut off, then replaced)."""


class Heartbeat:
    """A thread that bumps ``hb/{name}`` every period (a counter: no clock skew)."""

    def __init__(self, job: JobSpec, name: str, period_s: float) -> None:
        self.store = Store.for_job(job)
        self.name, self.period_s = name, period_s
        self.last_ok = time.monotonic()
        """When a beat last reached the store (the node's lease, see WorkerAgent.fence)."""
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
            self.last_ok = time.monotonic()
            self._stop.wait(self.period_s)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


class WorkerAgent:
    def __init__(
        self,
        job: JobSpec,
        node: int,
        pool: list[subprocess.Popen[bytes]] | None = None,
        slot_pool: list[SlotSet] | None = None,
    ) -> None:
        self.job, self.node = job, node
        self.slot_pool = slot_pool
        """A standby's pre-allocated checkpoint slots, for this node's services."""
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
        self.incarnation = 0
        """This agent's registration number for its node (``agent/node{i}``)."""
        self.root_hb, self.root_seen = -1, time.monotonic()
        self.root_epoch, self.awaiting_root = 0, False
        self.root_checked = 0.0
        self.peer_hb: dict[int, tuple[int, float]] = {}
        self.root_proc: subprocess.Popen[bytes] | None = None
        self.spares: dict[int, subprocess.Popen[bytes]] = {}
        self.spare_how = "spare"
        self.started = self.generation() > 0
        """Whether the job's first generation was launched (by any agent of this node)."""
        if pool:
            # A standby node's pre-started trainers: the ranks it takes over.
            self.spares = dict(zip(self.ranks, pool, strict=False))
            self.spare_how = "standby"
        self.launched_at = time.monotonic()
        self.use_spares = self.cfg.cluster.warm_spares
        self.in_place = self.cfg.cluster.restart == "in_place"
        self.parked: dict[int, subprocess.Popen[bytes]] = {}
        """Trainers that left a failed generation alive, by rank: the next one's."""
        self.parks_seen = 0
        self.stop_seen: float | None = None
        self.handed: dict[int, float] = {}
        """Ranks of the generation handed to pre-started processes, and when, until
        each announces itself (``trainer/{g}/{r}``)."""
        self.inbox = Inbox(self.store, keys.node_orders(node))

    def start_services(self) -> dict[str, Any]:
        """The node's checkpoint services; their address goes into the registration."""
        from gemini.checkpoint.node_memory import make_agent_services

        self.services = make_agent_services(self.job, self.node, self.store, self.slot_pool)
        return dict(self.services.start())

    def run(self) -> int:
        hb = Heartbeat(self.job, f"node{self.node}", self.cfg.cluster.heartbeat_s).start()
        info = self.start_services()
        incarnation = self.store.incr(keys.agent_incarnation(self.node))
        self.incarnation = incarnation
        self.store.set_json(
            keys.agent(self.node),
            {"pid": os.getpid(), "node": self.node, "incarnation": incarnation, **info},
        )
        print(
            f"node {self.node}: agent registered (incarnation {incarnation}) at "
            f"{time.strftime('%H:%M:%S')}",
            flush=True,
        )
        if self.cfg.cluster.network == "netns":
            # Emulated links can be cut (failure=partition): hold a lease.
            threading.Thread(target=self._keep_lease, args=(hb,), name="lease", daemon=True).start()
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
                    if not self.still_mine():
                        self.fence("another agent holds this node's index now")
                    self.stop_trainers()
                    self.launch(g)
                elif self.trainers and self.store.exists(keys.stop(self.gen)):
                    self.on_stop()
                self.poll_trainers()
                if self.handed:
                    self.check_handovers()
                if self.services is not None:
                    self.services.tick()
                self.watch_root()
                if self.use_spares:
                    self.keep_spares()
                # 10 Hz: each pass costs store round trips, i.e. CPU the
                # trainers on this host would otherwise have.
                time.sleep(0.1)
        finally:
            # Leaving: beats stop from here on, and that must not read as a lost lease.
            self._stopping = True
            self.close_spares()
            self.stop_trainers()
            self.close_parked()
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
        """Start generation ``gen``'s ranks: on the processes that left the previous
        generation alive (restart in place), then on warm spares, then fresh ones."""
        self.gen = gen
        self.reported = set()
        self.stop_seen = None
        self.handed = {}
        self.launched_at = time.monotonic()
        # The first generation starts its own processes: the warm spares are kept
        # for a restart, not spent on a start whose refill would then compete
        # with the first steps.
        pools = [(self.parked, "in_place")]
        if self.started:
            pools.append((self.spares, self.spare_how))
        self.started = True
        for local, rank in enumerate(self.ranks):
            for pool, how in pools:
                proc = pool.pop(rank, None)
                if proc is not None and self.hand_over(proc, gen, local, rank, how):
                    self.trainers[rank] = proc
                    self.handed[rank] = time.monotonic()
                    break
            else:
                self.trainers[rank] = self.start_trainer(gen, local, rank)
        self.spare_how = "spare"
        # Parked trainers of ranks this node no longer runs have nothing to wait for.
        self.close_parked()

    def start_trainer(self, gen: int, local: int, rank: int) -> subprocess.Popen[bytes]:
        """A fresh trainer process for ``rank`` in generation ``gen``."""
        args = [*self.trainer_args(local, rank), "--gen", str(gen)]
        return spawn_module(
            "gemini.workload.trainer",
            args,
            log_path=self.log_dir / f"rank{rank}.log",
            stdin_pipe=self.in_place,
        )

    def check_handovers(self) -> None:
        """Replace a pre-started process that has not joined the generation it was
        handed within :data:`HANDOVER_TIMEOUT_S` by a fresh one: the rest of the
        generation waits for every rank, and a fresh start still arrives in time."""
        now = time.monotonic()
        for rank, t in list(self.handed.items()):
            if self.store.exists(keys.trainer(self.gen, rank)):
                del self.handed[rank]
            elif now - t > HANDOVER_TIMEOUT_S:
                del self.handed[rank]
                proc = self.trainers[rank]
                print(
                    f"agent {self.node}: rank {rank} (pid {proc.pid}) did not join generation "
                    f"{self.gen} {HANDOVER_TIMEOUT_S:.0f} s after the handover: starting a "
                    "fresh process",
                    flush=True,
                )
                terminate_tree(proc.pid, grace_s=1.0)
                self.trainers[rank] = self.start_trainer(self.gen, self.ranks.index(rank), rank)

    def hand_over(
        self, proc: subprocess.Popen[bytes], gen: int, local: int, rank: int, how: str
    ) -> bool:
        """Give a waiting trainer process generation ``gen`` as ``rank``; False if it is gone."""
        if proc.poll() is not None or proc.stdin is None:
            return False
        msg = {"gen": gen, "node": self.node, "rank": rank, "local_rank": local, "how": how}
        try:
            proc.stdin.write((json.dumps(msg) + "\n").encode())
            proc.stdin.flush()
        except OSError:
            return False
        return True

    def on_stop(self) -> None:
        """The root stopped the generation: with ``restart=in_place`` its trainers
        leave it by themselves and park; those that have not within
        :data:`PARK_GRACE_S` (blocked for good, or failing to tear down) are ended,
        and the next generation gets fresh processes for them."""
        if not self.in_place:
            self.stop_trainers()
            return
        now = time.monotonic()
        if self.stop_seen is None:
            self.stop_seen = now
        elif now - self.stop_seen > PARK_GRACE_S:
            self.stop_trainers()

    def keep_spares(self) -> None:
        """One warm spare per local rank: started with the agent (the root waits for
        them before generation 1, so their start-up is the job's), and refilled
        once a generation is under way after one was used.

        Waiting a few seconds into a generation keeps a refill's imports off the
        critical path of the generation's own start-up on a machine with few cores.
        """
        refill = self.gen > 0
        if refill and time.monotonic() - self.launched_at < 5.0:
            return
        for local, rank in enumerate(self.ranks):
            spare = self.spares.get(rank)
            if spare is not None and spare.poll() == SPARE_UNSUPPORTED:
                # This host cannot run idle-priority spares: none will come, and
                # the root must not wait for them.
                self.use_spares = False
                for i in range(len(self.ranks)):
                    self.store.set_json(keys.spare_warm(self.node, i), {"unsupported": True})
                return
            if spare is None or spare.poll() is not None:
                args = [*self.trainer_args(local, rank), "--standby"]
                args += ["--announce", keys.spare_warm(self.node, local)]
                self.spares[rank] = spawn_module(
                    "gemini.workload.trainer",
                    args,
                    log_path=self.log_dir / f"rank{rank}.log",
                    stdin_pipe=True,
                )

    def close_spares(self) -> None:
        for spare in self.spares.values():
            if spare.poll() is None:
                terminate_tree(spare.pid, grace_s=1.0)
        self.spares = {}

    def close_parked(self) -> None:
        """End parked trainers: a closed stdin tells them they are not needed."""
        for proc in self.parked.values():
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in self.parked.values():
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                terminate_tree(proc.pid, grace_s=1.0)
        self.parked = {}

    def poll_trainers(self) -> None:
        """Report every trainer of the generation that exited or parked."""
        if self.in_place and self.trainers:
            parks = self.store.counter(keys.parks(self.node))
            if parks != self.parks_seen:
                self.parks_seen = parks
                self.collect_parked()
        for rank, proc in list(self.trainers.items()):
            code = proc.poll()
            if code is not None and rank not in self.reported:
                self.reported.add(rank)
                self.store.set_json(
                    keys.exited(self.gen, rank), {"code": code, "node": self.node, "t": time.time()}
                )

    def collect_parked(self) -> None:
        """Trainers that left the generation alive: reported as exited (with the code
        the trainer gave) and kept for the next generation."""
        for rank, proc in list(self.trainers.items()):
            if rank in self.reported or proc.poll() is not None:
                continue
            rec = self.store.get_json_or(keys.parked(self.gen, rank))
            if rec is None:
                continue
            self.reported.add(rank)
            del self.trainers[rank]
            self.parked[rank] = proc
            self.store.set_json(
                keys.exited(self.gen, rank),
                {
                    "code": int(rec["code"]),
                    "node": self.node,
                    "t": float(rec["t"]),
                    "parked": True,
                    "teardown_s": float(rec.get("teardown_s", 0.0)),
                },
            )

    def stop_trainers(self) -> None:
        for proc in self.trainers.values():
            if proc.poll() is None:
                terminate_tree(proc.pid, grace_s=2.0)
        self.poll_trainers()
        self.trainers = {}

    # -- failures ordered by the injector (gemini.cluster.orders) --------------------
    # -- fencing (emulated links only: nothing else cuts a node off) -------------------
    def _keep_lease(self, hb: Heartbeat) -> None:
        """Fence this node once its beats have failed to reach the store for as long as
        the root waits for them, and one beat more: by then the root counts the node
        lost and gives its index to a replacement, so nothing here may act on the job
        again. (The extra beat spares a node whose agent was only starved of CPU
        for a moment; should the root have declared it lost meanwhile, the
        ownership check before any launch fences it all the same.)"""
        lease_s = self.limit_s + self.cfg.cluster.heartbeat_s
        while not self._stopping:
            silent = time.monotonic() - hb.last_ok
            if silent > lease_s:
                self.fence(f"no heartbeat reached the store for {silent:.1f} s")
            time.sleep(self.cfg.cluster.heartbeat_s / 2)

    def still_mine(self) -> bool:
        """This agent is still the registered one for its node (not replaced while it
        was cut off: generation fencing for the moment the link returns)."""
        reg = self.store.get_json_or(keys.agent(self.node), {})
        return bool(reg.get("incarnation") == self.incarnation)

    def fence(self, why: str) -> None:
        """Take this node out for good: kill every process below the agent (trainers,
        spares, parked ones) and exit, without a word to the store (it is either
        unreachable or no longer this node's). The node stays out; its memory is freed
        by whoever takes its index (the launcher unlinks it before a takeover)."""
        print(f"node {self.node}: fencing itself and staying out: {why}", flush=True)
        me = psutil.Process()
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        os._exit(FENCED_EXIT)

    def obey_orders(self) -> None:
        for n, order in self.inbox.pending():
            op = order.get("op")
            if op in ("kill_trainers", "hang_trainers"):
                sig = signal.SIGKILL if op == "kill_trainers" else signal.SIGSTOP
                t = self.inbox.record_injection(order)
                hit = self.signal_trainers(order, sig)
                if op == "kill_trainers":
                    self.inbox.ack(n, t=t, killed=hit)
                else:
                    self.inbox.ack(n, t=t, stopped=hit)
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

    def signal_trainers(self, order: dict[str, Any], sig: int) -> list[int]:
        """Send ``sig`` to the order's trainers that are running; returns their PIDs."""
        # Only the generation the order saw: a restart since then has other
        # trainers, which the failure never aimed at.
        same_gen = int(order.get("gen", -1)) == self.gen
        procs = [
            self.trainers.get(self.ranks[i])
            for i in order.get("ranks", [])
            if same_gen and 0 <= int(i) < len(self.ranks)
        ]
        hit = []
        for proc in procs:
            if proc is not None and proc.poll() is None:
                # A stopped process still takes SIGKILL, so the root's kill of
                # a hung trainer lands the same way as an injected one.
                proc.send_signal(sig)
                hit.append(proc.pid)
        return hit

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


class StandbyNode:
    """A node started with the job but given no index yet (``cluster.standby_nodes``).

    Its trainer processes import everything at once and wait; the agent waits
    for the launcher to assign it a failed node's index
    (``standby/{k}/takeover``), then becomes that node's agent and its waiting
    trainers the node's ranks, so a takeover pays no interpreter start.
    """

    def __init__(self, job: JobSpec, k: int) -> None:
        self.job, self.k = job, k
        self.store = Store.for_job(job)
        self.pool: list[subprocess.Popen[bytes]] = []
        self.slots: list[SlotSet] | None = None
        """Checkpoint slots allocated and touched while standing by (once every
        rank has announced its checkpoint size); renamed at a takeover."""
        self._stopping = False

    def start_pool(self) -> None:
        log_dir = Path(self.job.job_dir) / "logs"
        for local in range(self.job.cfg.cluster.ranks_per_node):
            args = ["--job", str(Path(self.job.job_dir) / "job.json"), "--node", "-1"]
            args += ["--rank", "-1", "--local-rank", str(local), "--standby"]
            args += ["--announce", keys.standby_warm(self.k, local)]
            self.pool.append(
                spawn_module(
                    "gemini.workload.trainer",
                    args,
                    log_path=log_dir / f"standby{self.k}-trainer{local}.log",
                    stdin_pipe=True,
                )
            )

    def wait(self) -> int | None:
        """Stand by until a takeover names a node (returned), or the job ends (None)."""
        hb = Heartbeat(self.job, f"standby{self.k}", self.job.cfg.cluster.heartbeat_s).start()
        info = {"pid": os.getpid(), "standby": self.k, "warm": False, "t": time.time()}
        self.store.set_json(keys.standby(self.k), info)
        self.start_pool()
        try:
            while not self._stopping:
                if self.store.exists(keys.DONE) or self.store.exists(keys.ABORT):
                    return None
                order = self.store.get_json_or(keys.standby_takeover(self.k))
                if order is not None:
                    return int(order["node"])
                if not info["warm"] and all(
                    self.store.exists(keys.standby_warm(self.k, i)) for i in range(len(self.pool))
                ):
                    info.update(warm=True, t_warm=time.time())
                    self.store.set_json(keys.standby(self.k), info)
                if self.slots is None:
                    # The agent imports checkpoint code (and torch) only once needed.
                    from gemini.checkpoint.node_memory import allocate_standby_slots

                    self.slots = allocate_standby_slots(self.job, self.k, self.store)
                    if self.slots is not None:
                        touch = sum(s.touch_s for s in self.slots)
                        info.update(slots=len(self.slots), slots_touch_s=touch)
                        self.store.set_json(keys.standby(self.k), info)
                time.sleep(0.1)
            return None
        finally:
            hb.stop()

    def close(self) -> None:
        for proc in self.pool:
            if proc.poll() is None:
                terminate_tree(proc.pid, grace_s=1.0)
        if self.slots:
            from gemini.checkpoint.node_memory import release_slots

            release_slots(self.slots)

    def request_stop(self, *_: Any) -> None:
        self._stopping = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--job", required=True)
    node_or_standby = p.add_mutually_exclusive_group(required=True)
    node_or_standby.add_argument("--node", type=int)
    node_or_standby.add_argument("--standby", type=int, help="start as standby node k")
    a = p.parse_args(argv)
    # `kill -USR1 <agent pid>` writes every thread's stack to the agent's log:
    # how a stuck recovery is diagnosed without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    job = JobSpec.load(a.job)
    pool: list[subprocess.Popen[bytes]] = []
    node = a.node
    if a.standby is not None:
        standby = StandbyNode(job, a.standby)
        signal.signal(signal.SIGTERM, standby.request_stop)
        signal.signal(signal.SIGINT, standby.request_stop)
        try:
            node = standby.wait()
        except KeyboardInterrupt:
            node = None
        if node is None:
            standby.close()
            return 0
        pool = standby.pool
        print(
            f"standby {a.standby}: taking over node {node} at {time.strftime('%H:%M:%S')}",
            flush=True,
        )
        # Whatever a previous holder of the index left in this machine's memory.
        from gemini.checkpoint.slot import unlink_prefix

        unlink_prefix(f"gemini-{job.run_id}-n{node}-")
    agent = WorkerAgent(job, node, pool, standby.slots if a.standby is not None else None)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    with contextlib.suppress(KeyboardInterrupt):
        return agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
