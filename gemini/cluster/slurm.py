"""The SLURM launcher: one SLURM task per node of a job, plus standby tasks.

The ``cluster.launcher=slurm`` implementation of ``gemini.cluster.base.Cluster``.
``hydra/launcher=slurm`` (or ``submitit_local``) starts ``cluster.nodes +
cluster.standby_nodes`` tasks of one SLURM job, each running the same Hydra
job; submitit's ``JobEnvironment`` tells each task its global rank:

- task 0 is the controller (``gemini.experiment``): it hosts the KV store, the
  root agent and node 0, and serves this class's side;
- task i < nodes runs node i's launcher (``gemini.cluster.node``), exactly as
  the local cluster starts it;
- the remaining tasks are standbys: each starts a standby node at once (warm:
  agent up, trainer processes imported, waiting) and hands it a failed node's
  index when the controller assigns one (``slurm/assign/{task}``). With no
  standby left, a failed node is started afresh by the task that ran it, as
  the local cluster restarts a node.

Tasks other than 0 learn where the store is from ``job.json`` in the job
directory (a shared filesystem on a cluster); they accept only a ``job.json``
whose store answers with task 0's signed registration, so a later attempt of
a requeued job never joins the previous attempt's store. Every task frees its
own processes and shared memory when the job ends (``ctl/done``,
``ctl/abort``, or its store going away) and says so (``slurm/exit/{task}``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemini.cluster import keys
from gemini.cluster.base import ClusterBase
from gemini.cluster.job import JobSpec
from gemini.cluster.processes import (
    free_run,
    kill_tree,
    terminate_tree,
)
from gemini.cluster.store import Store
from gemini.config import ConfigError, GeminiConfig

JOIN_TIMEOUT_S = 600.0
"""How long a task waits for task 0's ``job.json`` (its imports, checks and
MLflow run come first; on a loaded cluster, minutes)."""
EXIT_WAIT_S = 30.0
"""How long task 0 waits, at the end, for the other tasks to free their nodes."""


class JobRefused(RuntimeError):
    """Task 0 refused the job before it started: this task has nothing to run."""


@dataclass(frozen=True)
class TaskEnv:
    """This process's place in the SLURM job, as submitit's JobEnvironment says."""

    rank: int
    """Global rank of this task (0 = the controller)."""
    ntasks: int
    """Tasks in the job: cluster.nodes + cluster.standby_nodes."""
    nhosts: int
    """Machines the tasks are spread over."""
    job_id: str
    """SLURM job id (submitit_local: the local controller's pid)."""
    hostname: str
    launch: str = "0.0"
    """Which start of the job this is, the same in every task of it: the launcher's
    requeue count (carried by the requeued submission) and SLURM's restart count
    (which a requeue by hand bumps too)."""

    @classmethod
    def current(cls) -> TaskEnv:
        import submitit

        from gemini.launchers import ATTEMPT_ENV

        try:
            env = submitit.JobEnvironment()
        except RuntimeError:
            raise ConfigError(
                "cluster.launcher",
                "slurm",
                "runs as the tasks of a SLURM job: submit it with "
                "`gemini -m hydra/launcher=slurm cluster=slurm ...` (or hydra/launcher="
                "submitit_local to try it without a scheduler), or use cluster=local",
            ) from None
        return cls(
            rank=int(env.global_rank),
            ntasks=int(env.num_tasks),
            nhosts=max(1, int(env.num_nodes)),
            job_id=str(env.job_id),
            hostname=socket.gethostname(),
            launch=".".join(
                os.environ.get(name, "0") for name in (ATTEMPT_ENV, "SLURM_RESTART_COUNT")
            ),
        )

    @property
    def tasks_on_host(self) -> int:
        """Tasks on this machine, as SLURM spreads them (block distribution)."""
        return math.ceil(self.ntasks / self.nhosts)


def check_tasks(cfg: GeminiConfig, task: TaskEnv) -> None:
    """The job has exactly one task per node plus the standbys."""
    c = cfg.cluster
    want = c.nodes + c.standby_nodes
    if task.ntasks != want:
        raise ConfigError(
            "cluster.nodes",
            c.nodes,
            f"needs {want} SLURM tasks (cluster.nodes={c.nodes} + cluster.standby_nodes="
            f"{c.standby_nodes}) but the job has {task.ntasks}: submit with "
            "hydra/launcher=slurm or submitit_local, which size each job from its config",
        )


def check_task_host(cfg: GeminiConfig, task: TaskEnv) -> None:
    """This machine holds the nodes SLURM put on it: cores and /dev/shm."""
    from gemini.config import check_capacity

    here = min(task.tasks_on_host, cfg.cluster.nodes)
    check_capacity(cfg.cluster, here)
    if cfg.backend.name in ("memory", "replicated"):
        from gemini.checkpoint.memory import check_shm_budget

        # A standby takes no CPU while it waits, but holds its slots.
        c = cfg.cluster
        check_shm_budget(cfg, min(task.tasks_on_host, c.nodes + c.standby_nodes))


class SlurmCluster(ClusterBase):
    """Task 0's side of a SLURM job: the root and node 0 as its own children,
    every other node by assignment to a task (contracts: ``Cluster``'s)."""

    def __init__(self, job: JobSpec, store: Store, task: TaskEnv) -> None:
        self.job, self.store, self.task = job, store, task
        nodes = job.cfg.cluster.nodes
        self.job_path = str(Path(job.job_dir) / "job.json")
        self.log_dir = Path(job.job_dir) / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {"GEMINI_RUN_ID": job.run_id}
        self.root: subprocess.Popen[bytes] | None = None
        self.own_node: subprocess.Popen[bytes] | None = None
        self.task_of = {n: n for n in range(nodes)}
        """Which task runs each node now."""
        self.standby = list(range(nodes, task.ntasks))
        """Tasks not yet given a node, in the order they are taken."""
        self.assignments: dict[int, int] = {}
        self.spawn_seen = 0
        self.replaced: list[tuple[int, float]] = []
        self.takeovers: list[dict[str, Any]] = []

    def start(self) -> None:
        from gemini.cluster.local import sweep_stale_segments

        sweep_stale_segments()
        # First: the other tasks take this as proof that the store is this attempt's.
        self.store.set_json(
            keys.slurm_task(0),
            {"host": self.task.hostname, "pid": os.getpid(), "t": time.time()},
        )
        self.root = self.start_root()
        for node, task in self.task_of.items():
            self.assign(task, node)

    def assign(self, task: int, node: int) -> None:
        """Have ``task`` run ``node``: task 0 starts it itself, the others on request."""
        if task == 0:
            if self.own_node is not None and self.own_node.poll() is None:
                kill_tree(self.own_node.pid)
            self.own_node = start_node(self.job, self.job_path, node, self.log_dir, self.env)
            return
        self.assignments[task] = self.assignments.get(task, 0) + 1
        self.store.set_json(
            keys.slurm_assign(task),
            {"node": node, "n": self.assignments[task], "t": time.time()},
        )

    def replace_node(self, node: int) -> None:
        # A standby takes the failed node's place; with none left, the task that
        # ran it starts it afresh (empty memory), as a local node is restarted.
        standby = bool(self.standby)
        task = self.standby.pop(0) if standby else self.task_of[node]
        self.takeovers.append(
            {"node": node, "from_task": self.task_of[node], "task": task, "standby": standby}
        )
        self.task_of[node] = task
        self.assign(task, node)
        self.replaced.append((node, time.time()))
        self.takeovers[-1]["t"] = self.replaced[-1][1]

    def layout(self) -> dict[str, Any]:
        hosts = {}
        for k in range(self.task.ntasks):
            with contextlib.suppress(Exception):
                info = self.store.get_json_or(keys.slurm_task(k))
                if info is not None:
                    hosts[str(k)] = info.get("host", "")
        return {
            "launcher": "slurm",
            "job_id": self.task.job_id,
            "tasks": self.task.ntasks,
            "task_hosts": hosts,
            "node_task": {str(n): t for n, t in self.task_of.items()},
            "takeovers": self.takeovers,
        }

    def kill_nodes(
        self, nodes: Sequence[int], inject: dict[str, Any] | None = None
    ) -> float | None:
        t = super().kill_nodes(nodes, inject)
        if 0 in [self.task_of[n] for n in nodes] and self.own_node is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.own_node.wait(timeout=10)
        return t

    def teardown(self) -> None:

        with contextlib.suppress(Exception):
            self.store.set(keys.ABORT, "1")
        procs = [p for p in (self.root, self.own_node) if p is not None]
        for p in procs:
            if p.poll() is None:
                terminate_tree(p.pid, grace_s=3.0)
        # The other tasks free their own nodes; the store must outlive that.
        registered = [
            k for k in range(1, self.task.ntasks) if self.store.exists(keys.slurm_task(k))
        ]
        deadline = time.monotonic() + EXIT_WAIT_S
        while time.monotonic() < deadline:
            if all(self.store.exists(keys.slurm_exit(k)) for k in registered):
                break
            time.sleep(0.1)
        free_run(self.job.run_id)
        Path(self.job.secret_file).unlink(missing_ok=True)


def start_node(
    job: JobSpec, job_path: str, node: int, log_dir: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start node ``node``'s launcher in a session of its own on this machine,
    after freeing whatever memory a previous holder of the index left here."""
    from gemini.checkpoint.slot import unlink_prefix
    from gemini.cluster.local import spawn_node

    unlink_prefix(f"gemini-{job.run_id}-n{node}-")
    return spawn_node(job_path, "node", node, log_dir, env)


# -- the other tasks ------------------------------------------------------------------
REFUSED = "slurm-refused.json"
"""Written by task 0 when it refuses the job before any store exists, so that
the other tasks stop waiting for one."""


def refuse_job(job_dir: Path, reason: str, launch: str) -> None:
    path = Path(job_dir) / REFUSED
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{REFUSED}.{os.getpid()}")
    tmp.write_text(json.dumps({"reason": reason, "launch": launch, "t": time.time()}))
    os.replace(tmp, path)


def join_job(
    job_dir: Path, task: TaskEnv, timeout_s: float = JOIN_TIMEOUT_S
) -> tuple[JobSpec, Store] | None:
    """Wait for this start's ``job.json`` and connect to its store.

    A ``job.json`` is this start's when it names this task's ``launch`` (a
    requeued job finds the previous start's file until task 0 replaces it);
    its store must then hold task 0's signed registration. None: task 0 ended
    this start before this task joined (its store is gone or stopping).
    """
    path = job_dir / "job.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            refusal = json.loads((job_dir / REFUSED).read_text())
            if refusal.get("launch") == task.launch:
                raise JobRefused(f"task 0 refused the job: {refusal.get('reason')}")
        try:
            job: JobSpec | None = JobSpec.load(path)
        except (OSError, ValueError, TypeError):
            job = None
        if job is not None and job.launch == task.launch:
            try:
                store = Store.for_job(job, timeout_s=5.0)
                over = store.exists(keys.ABORT) or store.exists(keys.DONE)
                up = store.get_json_or(keys.slurm_task(0)) is not None
            except Exception:  # the store was created before job.json: it is gone
                return None
            if over:
                return None
            if up:
                return job, store
        time.sleep(1.0)
    raise TimeoutError(f"task 0 published no job in {path} within {timeout_s:.0f} s")


def serve_task(cfg: GeminiConfig, job_dir: Path, task: TaskEnv) -> dict[str, Any]:
    """A task other than 0: run the node it is assigned, until the job ends.

    Returns what it did, for the task's own result (task 0's is the job's).
    """
    joined = join_job(job_dir, task)
    if joined is None:
        return {"task": task.rank, "nodes": [], "note": "the job ended before this task joined"}
    job, store = joined
    log_dir = Path(job.job_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {"GEMINI_RUN_ID": job.run_id}
    job_path = str(job_dir / "job.json")
    try:
        check_task_host(cfg, task)
    except ConfigError as e:
        # The job cannot run: say why where the controller looks, and stop it.
        store.set_json(
            keys.ROOT_RESULT,
            {"status": "failed", "reason": f"task {task.rank} on {task.hostname}: {e}"},
        )
        store.set(keys.ABORT, "1")
        raise
    store.set_json(
        keys.slurm_task(task.rank), {"host": task.hostname, "pid": os.getpid(), "t": time.time()}
    )
    node_proc: subprocess.Popen[bytes] | None = None
    nodes_run: list[int] = []
    seen = 0
    # A standby task starts its node warm at once (agent and trainers waiting):
    # its first assignment is a takeover, not a start.
    standby = task.rank - cfg.cluster.nodes
    warm: subprocess.Popen[bytes] | None = None
    if standby >= 0:
        from gemini.cluster.local import spawn_node

        warm = spawn_node(job_path, "standby", standby, log_dir, env)
    try:
        while True:
            try:
                if store.exists(keys.DONE) or store.exists(keys.ABORT):
                    break
                order = store.get_json_or(keys.slurm_assign(task.rank))
            except Exception:  # the store is gone: task 0 ended the job
                break
            if order is not None and int(order["n"]) > seen:
                seen = int(order["n"])
                if node_proc is not None and node_proc.poll() is None:
                    kill_tree(node_proc.pid)
                node = int(order["node"])
                if warm is not None and warm.poll() is None:
                    store.set_json(keys.standby_takeover(standby), {"node": node, "t": time.time()})
                    node_proc = warm
                else:
                    node_proc = start_node(job, job_path, node, log_dir, env)
                warm = None
                nodes_run.append(node)
            time.sleep(0.2)
    finally:
        stop_nodes(job, warm if node_proc is None else node_proc, nodes_run, standby)
        with contextlib.suppress(Exception):
            store.set_json(keys.slurm_exit(task.rank), {"nodes": nodes_run, "t": time.time()})
    return {"task": task.rank, "nodes": nodes_run}


def stop_nodes(
    job: JobSpec, proc: subprocess.Popen[bytes] | None, nodes: list[int], standby: int = -1
) -> None:
    """Stop this task's node (its launcher takes its tree down on SIGTERM) and free
    what any node this task ran, or its standby (``standby`` ≥ 0), left in this
    machine's shared memory."""
    from gemini.checkpoint.slot import standby_prefix, unlink_prefix

    if proc is not None and proc.poll() is None:
        terminate_tree(proc.pid, grace_s=5.0)
    for node in nodes:
        unlink_prefix(f"gemini-{job.run_id}-n{node}-")
    if standby >= 0:
        unlink_prefix(standby_prefix(job.run_id, standby))
