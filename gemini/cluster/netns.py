"""Emulated NICs: every simulated node in a network namespace of its own, behind a capped link.

On one machine the simulated nodes share loopback: there is no link for
checkpoint traffic and training traffic to compete for. A :class:`Fabric`
gives each node one. For a run with tag ``T``:

* a bridge ``gb<T>`` in this (the root) namespace, with the address
  ``198.18.S.1/24`` — the controller's side: the store and the root are
  reached there;
* per node ``i``, a namespace ``gemini-<T>-n<i>`` with loopback up and one
  interface, ``eth0``, at ``198.18.S.<i+2>/24``: one end of a veth pair whose
  other end (``gv<T>n<i>``) is a port of the bridge;
* a token-bucket qdisc (``tc ... tbf``) on *both* ends of every pair, so the
  node's egress and its ingress are each capped at ``link_gbps``.

The addresses come from 198.18.0.0/15, reserved for benchmarking (RFC 2544):
the subnet ``S`` is one no other interface of the machine uses, the
namespaces get no default route and nothing is forwarded or translated, so
no packet leaves the namespaces the run created. A partition is real:
:meth:`Fabric.cut` takes the node's link down while its processes live.

Creating namespaces needs root (``CAP_NET_ADMIN``) and ``ip``/``tc``
(iproute2); :func:`check_available` says in one line what is missing.
Everything is removed by :meth:`Fabric.close`, and :func:`remove_stale`
removes what a killed run left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

NETWORK = ipaddress.ip_network("198.18.0.0/15")
"""The benchmarking range (RFC 2544) every emulated link's address comes from."""
NS_PREFIX = "gemini-"
LOCK = Path("/run/lock/gemini-netns.lock")
"""Held while a run picks its subnet and creates its bridge (runs in parallel)."""
TBF_LATENCY_MS = 50
"""How long a packet may wait in a cap's queue before it is dropped (not a delay)."""


class NetnsError(RuntimeError):
    """A namespace, link or cap could not be set up (or the machine cannot have one)."""


def check_available() -> None:
    """Raise NetnsError, in one line, if this process cannot create namespaced links."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetnsError(f"{' and '.join(missing)} not found: install iproute2")
    if os.geteuid() != 0:
        raise NetnsError("network namespaces need root (CAP_NET_ADMIN): run as root")


def _ip(*args: str, ns: str | None = None) -> str:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    return _run(cmd)


def _tc(*args: str, ns: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", ns, "tc", *args] if ns else ["tc", *args]
    return _run(cmd)


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _subnets_in_use() -> set[int]:
    """Third octets (and the /15's second half) of 198.18/15 subnets already on this machine."""
    used: set[int] = set()
    for m in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+)/", _ip("-4", "addr", "show")):
        addr = ipaddress.ip_address(m.group(1))
        if addr in NETWORK:
            used.add((int(addr) - int(NETWORK.network_address)) >> 8)
    return used


def _cap_args(gbps: float) -> list[str]:
    rate_bit = int(gbps * 1e9)
    # The bucket holds at least one jumbo frame and about a millisecond of
    # traffic: smaller starves the link, larger lets bursts beat the cap.
    burst = max(64 << 10, rate_bit // 8 // 1000)
    return ["rate", f"{rate_bit}bit", "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms"]


@dataclass
class Fabric:
    """A bridge and one capped, namespaced link per node, for one run."""

    tag: str
    """Short id of the run (letters and digits, at most 8): names the devices."""
    nodes: int
    link_gbps: float
    """Cap of each direction of each node's link (0 = uncapped)."""
    subnet: int = -1
    namespaces: list[str] = field(default_factory=list)
    _up: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]{1,8}", self.tag):
            raise NetnsError(f"fabric tag {self.tag!r}: use 1-8 lowercase letters or digits")
        if not 1 <= self.nodes <= 250:
            raise NetnsError(f"{self.nodes} nodes: a fabric holds 1 to 250")

    # -- names and addresses -----------------------------------------------------
    @property
    def bridge(self) -> str:
        return f"gb{self.tag}"

    def namespace(self, node: int) -> str:
        return f"{NS_PREFIX}{self.tag}-n{node}"

    def _host_end(self, node: int) -> str:
        return f"gv{self.tag}n{node}"

    def _address(self, host: int) -> str:
        base = int(NETWORK.network_address) + (self.subnet << 8) + host
        return str(ipaddress.ip_address(base))

    @property
    def root_address(self) -> str:
        """The controller's address on the fabric (the bridge's)."""
        return self._address(1)

    def address(self, node: int) -> str:
        return self._address(node + 2)

    # -- life cycle ----------------------------------------------------------------
    def create(self) -> Fabric:
        """Set everything up; on any failure, remove what was made and raise."""
        check_available()
        try:
            with _locked():
                used = _subnets_in_use()
                free = [s for s in range(NETWORK.num_addresses >> 8) if s not in used]
                if not free:
                    raise NetnsError("every /24 of 198.18.0.0/15 is in use on this machine")
                self.subnet = free[0]
                _ip("link", "add", self.bridge, "type", "bridge")
                self._up = True
                _ip("addr", "add", f"{self.root_address}/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            for node in range(self.nodes):
                self._add_node(node)
        except BaseException:
            self.close()
            raise
        return self

    def _add_node(self, node: int) -> None:
        ns, host_end = self.namespace(node), self._host_end(node)
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", host_end, "master", self.bridge)
        _ip("addr", "add", f"{self.address(node)}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        _ip("link", "set", host_end, "up")
        if self.link_gbps > 0:
            # Each end caps what leaves through it: both directions capped.
            cap = _cap_args(self.link_gbps)
            _tc("qdisc", "add", "dev", host_end, "root", "tbf", *cap)
            _tc("qdisc", "add", "dev", "eth0", "root", "tbf", *cap, ns=ns)

    def exec_prefix(self, node: int) -> list[str]:
        """The command prefix that runs a program inside ``node``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(node)]

    def cut(self, node: int) -> None:
        """Partition ``node``: its link goes down, its processes keep running."""
        _ip("link", "set", self._host_end(node), "down")

    def heal(self, node: int) -> None:
        """Bring ``node``'s link back up."""
        _ip("link", "set", self._host_end(node), "up")

    def close(self) -> None:
        """Remove the links, the namespaces and the bridge. Idempotent; never raises
        for what is already gone."""
        for node in range(len(self.namespaces)):
            # Deleting one end removes the pair now; a namespace's own
            # interfaces go only when the kernel gets round to freeing it.
            with contextlib.suppress(NetnsError):
                _ip("link", "del", self._host_end(node))
        for ns in self.namespaces:
            with contextlib.suppress(NetnsError):
                _ip("netns", "del", ns)
        self.namespaces.clear()
        if self._up:
            with contextlib.suppress(NetnsError):
                _ip("link", "del", self.bridge)
            self._up = False

    def __enter__(self) -> Fabric:
        return self.create()

    def __exit__(self, *_: object) -> None:
        self.close()


def remove_stale(tag: str) -> int:
    """Remove whatever a run with ``tag`` left behind (a killed controller's
    namespaces and bridge); returns how many namespaces went."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    gone = 0
    for ns in names:
        if ns.startswith(f"{NS_PREFIX}{tag}-"):
            node = ns.rsplit("-n", 1)[-1]
            with contextlib.suppress(NetnsError):
                _ip("link", "del", f"gv{tag}n{node}")
            with contextlib.suppress(NetnsError):
                _ip("netns", "del", ns)
                gone += 1
    with contextlib.suppress(NetnsError):
        _ip("link", "del", f"gb{tag}")
    return gone
