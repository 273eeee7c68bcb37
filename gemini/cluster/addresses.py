"""Where each part of a job listens and how the others reach it.

Three settings, because on a cluster they differ: the KV store binds to
``cluster.host`` on the controller's machine; each agent's replication
transport binds to ``cluster.bind_host``; and peers dial an agent (or the
store) at its *advertised* address, ``cluster.advertise_host``. Locally all
three are 127.0.0.1. On SLURM the store and the transports listen on every
interface (0.0.0.0) and are dialled at their machine's host name. Ports are
never configured per agent: each transport takes a free one and publishes
``host:port`` in its agent's registration (``agent/node{i}``); the store's
port is ``cluster.store_port`` or a free one, published in ``job.json``.
"""

from __future__ import annotations

import socket

from gemini.config import ClusterConfig

WILDCARDS = ("", "0.0.0.0", "::")


def bind_host(c: ClusterConfig) -> str:
    """The address an agent's transport listens on."""
    return c.bind_host or c.host


def advertised_host(c: ClusterConfig, bound: str) -> str:
    """The address peers dial for something of this machine listening on ``bound``."""
    if c.advertise_host:
        return c.advertise_host
    return socket.gethostname() if bound in WILDCARDS else bound


def store_address(c: ClusterConfig, port: int) -> str:
    """``host:port`` at which every process of the job dials the store."""
    return f"{advertised_host(c, c.host)}:{port}"
