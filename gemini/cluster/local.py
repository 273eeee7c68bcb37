"""The local launcher: a simulated cluster of N nodes as process trees on this host.

The ``cluster.launcher=local`` implementation of ``gemini.cluster.base.Cluster``.
Each node is a node launcher process in its own session (so that exactly one
node can be taken down, and a Ctrl-C reaches only the controller, which then
tears everything down in order). The root agent is a process of its own.
Every process is on this host, so "replace the machine" is a fresh process
tree; a failure is an order its target carries out (``ClusterBase``).
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gemini.checkpoint.slot import unlink_prefix
from gemini.cluster import keys
from gemini.cluster.addresses import NODE_ADDRESS_ENV
from gemini.cluster.base import ClusterBase
from gemini.cluster.job import JobSpec
from gemini.cluster.netns import Fabric
from gemini.cluster.processes import (
    free_run,
    kill_tree,
    run_processes,
    spawn_module,
    terminate_tree,
)
from gemini.cluster.store import Store


def sweep_stale_segments() -> list[str]:
    """Free the shared memory of runs whose processes are all gone.

    Teardown frees a run's segments on success, error, Ctrl-C and SIGTERM; a
    controller killed outright (SIGKILL, a lost terminal) cannot. Its
    segments would hold RAM until reboot, so every new run first frees those
    whose run has no live process left.
    """
    import re

    from gemini.checkpoint.slot import SHM_DIR, list_segments

    now = time.time()
    runs: set[str] = set()
    for name in list_segments("gemini-"):
        run_id = name.split("-")[1]
        # Only segments named by a run (run ids are 10 hex digits), and not
        # brand new ones: tools and tests name theirs otherwise.
        if re.fullmatch(r"[0-9a-f]{10}", run_id):
            try:
                if now - (SHM_DIR / name).stat().st_mtime > 60:
                    runs.add(run_id)
            except FileNotFoundError:
                continue
    freed = []
    for run_id in sorted(runs):
        if not run_processes(run_id):
            unlink_prefix(f"gemini-{run_id}-")
            freed.append(run_id)
    return freed


def spawn_node(
    job_path: str,
    role: str,
    index: int,
    log_dir: Path,
    env: dict[str, str],
    prefix: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start a node launcher (``role`` ``node`` or ``standby``, number ``index``) in a
    session of its own on this machine (``prefix``: a command that runs it elsewhere,
    e.g. in the node's network namespace)."""
    return spawn_module(
        "gemini.cluster.node",
        ["--job", job_path, f"--{role}", str(index)],
        log_path=log_dir / f"{role}{index}.log",
        new_session=True,
        env=env,
        prefix=prefix,
    )


def sweep_stale_fabrics() -> list[str]:
    """Remove the emulated networks of runs whose processes are all gone (a
    controller killed outright cannot remove its own), as for shared memory."""
    from gemini.cluster.netns import fabric_tags, remove_stale

    gone = []
    for tag in sorted(fabric_tags(min_age_s=60.0)):
        if not run_processes(tag, prefix=True):
            remove_stale(tag)
            gone.append(tag)
    return gone


class LocalCluster(ClusterBase):
    """N simulated nodes and the root agent as process trees on this host
    (the methods' contracts are :class:`gemini.cluster.base.Cluster`'s)."""

    def __init__(self, job: JobSpec, store: Store, fabric: Fabric | None = None) -> None:
        self.job, self.store, self.fabric = job, store, fabric
        self.machine_of: dict[int, int] = {}
        """With a fabric: the machine (namespace) each node index runs on now."""
        self.standby_machine: dict[int, int] = {}
        self.machines_started = 0
        self.cut_off: dict[int, int] = {}
        """Partitioned node indices not yet replaced, and their machines."""
        self.isolated: dict[int, subprocess.Popen[bytes]] = {}
        """Launchers of replaced partitioned nodes, by machine, until they exit."""
        self.partitions: list[dict[str, Any]] = []
        self._net_lock = threading.Lock()
        self._heals: list[threading.Timer] = []
        self.job_path = str(Path(job.job_dir) / "job.json")
        self.log_dir = Path(job.job_dir) / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.root: subprocess.Popen[bytes] | None = None
        self.spawn_seen = 0
        self.replaced: list[tuple[int, float]] = []
        self.standbys: dict[int, subprocess.Popen[bytes]] = {}
        """Standby nodes not yet given an index, by standby number."""
        self.standbys_started = 0
        self.takeovers: list[dict[str, Any]] = []
        # Inherited by every process of the run: how teardown finds orphans.
        self.env = {"GEMINI_RUN_ID": job.run_id}

    def start(self) -> None:
        sweep_stale_segments()
        if self.fabric is not None:
            sweep_stale_fabrics()
        self.root = self.start_root()
        for n in range(self.job.cfg.cluster.nodes):
            self._start_node(n)
        for _ in range(self.job.cfg.cluster.standby_nodes):
            self._start_standby()

    def _spawn(self, role: str, index: int) -> tuple[subprocess.Popen[bytes], int]:
        """Start a node launcher on a machine of its own: with a fabric, the next
        machine's namespace (created here unless the fabric came with it)."""
        machine = self.machines_started
        self.machines_started += 1
        if self.fabric is None:
            return spawn_node(self.job_path, role, index, self.log_dir, self.env), machine
        if machine not in self.fabric.members:
            self.fabric.add(machine)
        env = {
            **self.env,
            NODE_ADDRESS_ENV: self.fabric.address(machine),
            # gloo binds to the interface it is told, not to the host name's
            # address (which does not exist inside the namespace).
            "GLOO_SOCKET_IFNAME": "eth0",
        }
        prefix = self.fabric.exec_prefix(machine)
        return spawn_node(self.job_path, role, index, self.log_dir, env, prefix), machine

    def _start_standby(self) -> None:
        k = self.standbys_started
        self.standbys_started += 1
        self.standbys[k], self.standby_machine[k] = self._spawn("standby", k)

    def _start_node(self, node: int) -> None:
        self.nodes[node], self.machine_of[node] = self._spawn("node", node)
        self.store.set_json(keys.launcher(node), {"pid": self.nodes[node].pid})

    def kill_nodes(
        self, nodes: Sequence[int], inject: dict[str, Any] | None = None
    ) -> float | None:
        t = super().kill_nodes(nodes, inject)
        # The agent killed its tree and itself; its launcher (our child) then
        # exits: reap it, so the node is down when this returns.
        for n in nodes:
            p = self.nodes.get(n)
            if p is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)
        return t

    def replace_node(self, node: int) -> None:
        """A standby takes the failed node's index and a new standby is started in
        its place; with no standby alive, the node is restarted afresh."""
        p = self.nodes.get(node)
        if node in self.cut_off:
            # A partitioned node's processes live on where nobody can reach
            # them: it fences itself, and stays out once its link returns.
            # Its machine (namespace) goes when its launcher has exited.
            machine = self.cut_off.pop(node)
            self.machine_of.pop(node, None)
            if p is not None:
                self.isolated[machine] = p
        elif p is not None and p.poll() is None:
            kill_tree(p.pid)
        unlink_prefix(f"gemini-{self.job.run_id}-n{node}-")
        if self.fabric is not None and node in self.machine_of:
            # The lost machine goes with its link; its replacement has its own.
            with self._net_lock:
                self.fabric.remove(self.machine_of.pop(node))
        standby = next((k for k, s in sorted(self.standbys.items()) if s.poll() is None), None)
        if standby is None:
            self._start_node(node)
        else:
            proc = self.standbys.pop(standby)
            if standby in self.standby_machine:
                self.machine_of[node] = self.standby_machine.pop(standby)
            self.store.set_json(keys.standby_takeover(standby), {"node": node, "t": time.time()})
            self.nodes[node] = proc
            self.store.set_json(keys.launcher(node), {"pid": proc.pid, "standby": standby})
            # Refill the pool: the lost node's processes are gone, so the
            # machine holds as many as before.
            self._start_standby()
        self.replaced.append((node, time.time()))
        self.takeovers.append({"node": node, "standby": standby, "t": self.replaced[-1][1]})

    def partition_nodes(self, nodes: Sequence[int], heal_after_s: float) -> float:
        if self.fabric is None:
            return super().partition_nodes(nodes, heal_after_s)
        with self._net_lock:
            machines = [self.machine_of[n] for n in nodes]
            for machine in machines:
                self.fabric.cut(machine)
            t = time.time()
        for n, machine in zip(nodes, machines, strict=True):
            self.cut_off[n] = machine
            self.partitions.append(
                {"node": n, "machine": machine, "t_cut": t, "heal_after_s": heal_after_s,
                 "t_heal": None, "t_exit": None, "exit_code": None}
            )  # fmt: skip
        if heal_after_s > 0:
            timer = threading.Timer(heal_after_s, self._heal, args=(machines,))
            timer.daemon = True
            timer.start()
            self._heals.append(timer)
        return t

    def _heal(self, machines: list[int]) -> None:
        with self._net_lock:
            if self.fabric is None:
                return
            for machine in machines:
                if machine in self.fabric.members:
                    self.fabric.heal(machine)
                for rec in self.partitions:
                    if rec["machine"] == machine:
                        rec["t_heal"] = time.time()

    def _reap_isolated(self) -> None:
        """Note when each fenced node's launcher exited, and drop its machine then."""
        for machine, p in list(self.isolated.items()):
            code = p.poll()
            if code is None:
                continue
            del self.isolated[machine]
            for rec in self.partitions:
                if rec["machine"] == machine:
                    rec["t_exit"], rec["exit_code"] = time.time(), code
            if self.fabric is not None:
                with self._net_lock:
                    self.fabric.remove(machine)

    def service(self) -> None:
        self._reap_isolated()
        super().service()

    def layout(self) -> dict[str, Any]:
        return {
            "launcher": "local",
            "replaced": [{"node": n, "t": t} for n, t in self.replaced],
            "standby_nodes": self.job.cfg.cluster.standby_nodes,
            "takeovers": self.takeovers,
            **({"partitions": self.partitions} if self.partitions else {}),
        }

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.store.set(keys.ABORT, "1")
        for timer in self._heals:
            timer.cancel()
        procs = [
            p
            for p in [self.root, *self.nodes.values(), *self.standbys.values(),
                      *self.isolated.values()]
            if p is not None
        ]  # fmt: skip
        for p in procs:
            if p.poll() is None:
                terminate_tree(p.pid, grace_s=3.0)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill_tree(p.pid)
        # Orphans (an elected root whose node died, a trainer whose agent was
        # killed) were re-parented away from us: find them by the run's env.
        free_run(self.job.run_id)
        # Every process that needed the secret is gone.
        Path(self.job.secret_file).unlink(missing_ok=True)
        if self.fabric is not None:
            # Last: no process of the run is left in a namespace.
            with self._net_lock:
                self.fabric.close()
