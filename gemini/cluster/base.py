"""The cluster interface: how a job's processes are started, failed and replaced.

The controller and the failure injector speak only to a :class:`Cluster`;
``cluster.launcher`` picks the implementation (:func:`make_cluster`). Every
implementation starts the same entry points — the root agent
(``gemini.cluster.root``) and one node launcher per node
(``gemini.cluster.node``) — from the same ``job.json``, so nothing below the
launcher knows how it was started. What differs is *where* processes run and
therefore how one is killed or a node replaced: locally by PID and process
group, elsewhere through the scheduler.

A failure is a cluster operation, not a signal the injector sends itself: on
a cluster whose nodes are other machines, the controller has no PID to signal.
Every implementation carries failures out the same way
(:class:`ClusterBase`): a signed order to the target's own agent (or to the
root agent), which acts on its own processes and memory and acknowledges
(``gemini.cluster.orders``).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from gemini.cluster import keys, orders
from gemini.config import LAUNCHERS, ConfigError

if TYPE_CHECKING:
    from gemini.cluster.job import JobSpec
    from gemini.cluster.netns import Fabric
    from gemini.cluster.store import Store


@runtime_checkable
class Cluster(Protocol):
    """The processes of one job: the root agent and ``cluster.nodes`` node trees."""

    replaced: list[tuple[int, float]]
    """(node, wall time) of every node replaced so far, for the job's summary."""

    def start(self) -> None:
        """Start the root agent and every node's launcher, each from ``job.json``."""
        ...

    def service(self) -> None:
        """Serve what the root has asked of the cluster since the last call (today:
        fresh nodes in place of lost ones, each acknowledged in the store).

        Called on every turn of the controller's loop; must not block.
        """
        ...

    def kill_trainers(
        self, nodes: Sequence[int], ranks: Sequence[int], inject: dict[str, Any] | None = None
    ) -> float | None:
        """A software failure: on every node of ``nodes`` at once, the trainers of
        the current generation at ``ranks`` (ranks within the node, 0-based) die.

        The nodes' agents and their checkpoint memory live on. A rank with no
        trainer up is skipped: the caller checks first that they are all up.
        ``inject`` is the failure's record, pushed to ``inject/*`` stamped
        with the time the first kill landed; that time is returned (None: no
        target acknowledged in time).
        """
        ...

    def hang_trainers(
        self, nodes: Sequence[int], ranks: Sequence[int], inject: dict[str, Any] | None = None
    ) -> float | None:
        """A hang: as :meth:`kill_trainers`, but the trainers are stopped (SIGSTOP),
        not killed. They stay alive and never exit, so no exit is reported: the
        root finds them by their stalled heartbeats (``cluster.hang_timeout_s``)."""
        ...

    def kill_nodes(
        self, nodes: Sequence[int], inject: dict[str, Any] | None = None
    ) -> float | None:
        """A hardware failure of every node of ``nodes`` at once: each one's whole
        process tree dies and its checkpoint memory is freed. They stay down
        until replaced."""
        ...

    def partition_nodes(self, nodes: Sequence[int], heal_after_s: float) -> float:
        """Take the nodes' links down while their processes live (a partition); they
        come back after ``heal_after_s`` (0 = never). Returns when the links went down.
        Only a cluster with emulated links can (validation refuses it elsewhere)."""
        ...

    def kill_root(self, inject: dict[str, Any] | None = None) -> float | None:
        """The root agent's loss: the process serving as root now (the first one
        or an elected successor) dies; its node, if it has one, lives on."""
        ...

    def corrupt_replica(self, holder: int, rank: int) -> dict[str, Any]:
        """Flip a byte in the newest complete replica of ``rank`` that node
        ``holder`` keeps; returns where (empty: it held none)."""
        ...

    def replace_node(self, node: int) -> None:
        """Start ``node`` afresh: a new process tree with empty checkpoint memory,
        whatever is left of the old one killed first (what a spawn request asks)."""
        ...

    def layout(self) -> dict[str, Any]:
        """Where the nodes ran and which were replaced by what, for ``summary.json``."""
        ...

    def teardown(self) -> None:
        """Stop every process of the job, orphans included, and free its shared
        memory and secret. Safe to call after a failed or partial start."""
        ...


class ClusterBase:
    """What every launcher shares: the root agent started by the controller, the
    root's spawn requests served through :meth:`replace_node`, and failures as
    orders their targets carry out (``gemini.cluster.orders``).

    Subclasses set ``store``, ``job``, ``log_dir`` and ``env`` and implement
    ``replace_node``; :meth:`kill_nodes` is extended where the launcher also
    owns a node's top process (to reap it).
    """

    store: Store
    job: JobSpec
    log_dir: Path
    env: dict[str, str]
    spawn_seen: int = 0

    def replace_node(self, node: int) -> None:
        raise NotImplementedError

    def start_root(self) -> subprocess.Popen[bytes]:
        """The root agent, in a session of its own on the controller's machine."""
        from gemini.cluster.processes import spawn_module

        root = spawn_module(
            "gemini.cluster.root",
            ["--job", str(Path(self.job.job_dir) / "job.json")],
            log_path=self.log_dir / "root.log",
            new_session=True,
            env=self.env,
        )
        self.store.set_json(keys.ROOT_PID, {"pid": root.pid})
        return root

    def service(self) -> None:
        for n, req in self.store.items(keys.SPAWN, self.spawn_seen + 1):
            self.spawn_seen = n
            node = int(req["node"])
            self.replace_node(node)
            self.store.set_json(keys.spawn_ack(n), {"node": node, "t": time.time()})

    def kill_trainers(
        self, nodes: Sequence[int], ranks: Sequence[int], inject: dict[str, Any] | None = None
    ) -> float | None:
        # Each trainer records itself under its generation when it starts; the
        # current generation's are the ones a failure now would hit.
        gen = int(self.store.get_json_or(keys.GEN, 0))
        return self._order(nodes, {"op": "kill_trainers", "ranks": list(ranks), "gen": gen}, inject)

    def hang_trainers(
        self, nodes: Sequence[int], ranks: Sequence[int], inject: dict[str, Any] | None = None
    ) -> float | None:
        gen = int(self.store.get_json_or(keys.GEN, 0))
        return self._order(nodes, {"op": "hang_trainers", "ranks": list(ranks), "gen": gen}, inject)

    def kill_nodes(
        self, nodes: Sequence[int], inject: dict[str, Any] | None = None
    ) -> float | None:
        return self._order(nodes, {"op": "kill_node"}, inject)

    def partition_nodes(self, nodes: Sequence[int], heal_after_s: float) -> float:
        raise NotImplementedError(
            "a partition needs emulated links (cluster.network=netns, launcher local)"
        )

    def kill_root(self, inject: dict[str, Any] | None = None) -> float | None:
        (ack,) = orders.send(self.store, [(keys.ROOT_ORDERS, {"op": "die", "inject": inject})])
        return _ack_time(ack)

    def corrupt_replica(self, holder: int, rank: int) -> dict[str, Any]:
        order = {"op": "corrupt", "rank": rank}
        (ack,) = orders.send(self.store, [(keys.node_orders(holder), order)])
        return dict(ack.get("result") or {}) if ack else {}

    def _order(
        self, nodes: Sequence[int], order: dict[str, Any], inject: dict[str, Any] | None
    ) -> float | None:
        # One record per event: the first target stamps and pushes it.
        sends = [
            (keys.node_orders(n), {**order, "inject": inject if i == 0 else None})
            for i, n in enumerate(nodes)
        ]
        acks = orders.send(self.store, sends)
        return _ack_time(acks[0]) if acks else None


def _ack_time(ack: Any) -> float | None:
    return float(ack["t"]) if ack else None


def make_cluster(job: JobSpec, store: Store, fabric: Fabric | None = None) -> Cluster:
    """The cluster ``cluster.launcher`` names (validation refused any other value);
    ``fabric``: the emulated network of ``cluster.network=netns`` (local only), which
    the cluster then owns and removes at teardown."""
    launcher = job.cfg.cluster.launcher
    if launcher == "local":
        from gemini.cluster.local import LocalCluster

        return LocalCluster(job, store, fabric)
    if launcher == "slurm":
        from gemini.cluster.slurm import SlurmCluster, TaskEnv

        return SlurmCluster(job, store, TaskEnv.current())
    # Unreachable through gemini.config.validate; a caller that skipped it
    # gets the same one line.
    raise ConfigError("cluster.launcher", launcher, f"use one of {', '.join(LAUNCHERS)}")
