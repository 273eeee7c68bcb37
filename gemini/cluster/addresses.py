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

With ``cluster.network=netns`` each node has an address of its own on the
emulated fabric: the local cluster hands it to the node's processes in
``GEMINI_NODE_ADDRESS``, which then wins over ``cluster.bind_host`` (the
store binds to the fabric's bridge address, given as ``cluster.host``).
"""

from __future__ import annotations

import os
import socket

from gemini.config import ClusterConfig

WILDCARDS = ("", "0.0.0.0", "::")
NODE_ADDRESS_ENV = "GEMINI_NODE_ADDRESS"
"""The environment variable carrying a node's own address on an emulated fabric."""


def bind_host(c: ClusterConfig) -> str:
    """The address an agent's transport listens on."""
    return os.environ.get(NODE_ADDRESS_ENV) or c.bind_host or c.host


def advertised_host(c: ClusterConfig, bound: str) -> str:
    """The address peers dial for something of this machine listening on ``bound``."""
    if c.advertise_host:
        return c.advertise_host
    return socket.gethostname() if bound in WILDCARDS else bound


def store_address(c: ClusterConfig, port: int) -> str:
    """``host:port`` at which every process of the job dials the store."""
    return f"{advertised_host(c, c.host)}:{port}"
