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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from gemini.config import LAUNCHERS, ConfigError

if TYPE_CHECKING:
    from gemini.cluster.job import JobSpec
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

    def kill_trainers(self, node: int, ranks: Sequence[int]) -> None:
        """A software failure: the trainers of ``node``'s current generation at
        ``ranks`` (ranks within the node, 0-based) die at once.

        The node's agent and its checkpoint memory live on. A rank with no
        trainer up is skipped: the caller checks first that they are all up.
        """
        ...

    def kill_node(self, node: int) -> None:
        """A hardware failure: ``node``'s whole process tree dies and its
        checkpoint memory is freed. The node stays down until replaced."""
        ...

    def kill_root(self) -> None:
        """The root agent's loss: the process serving as root now (the first one
        or an elected successor) dies; its node, if it has one, lives on."""
        ...

    def replace_node(self, node: int) -> None:
        """Start ``node`` afresh: a new process tree with empty checkpoint memory,
        whatever is left of the old one killed first (what a spawn request asks)."""
        ...

    def teardown(self) -> None:
        """Stop every process of the job, orphans included, and free its shared
        memory and secret. Safe to call after a failed or partial start."""
        ...


def make_cluster(job: JobSpec, store: Store) -> Cluster:
    """The cluster ``cluster.launcher`` names (validation refused any other value)."""
    launcher = job.cfg.cluster.launcher
    if launcher == "local":
        from gemini.cluster.local import LocalCluster

        return LocalCluster(job, store)
    # Unreachable through gemini.config.validate; a caller that skipped it
    # gets the same one line.
    raise ConfigError("cluster.launcher", launcher, f"use one of {', '.join(LAUNCHERS)}")
