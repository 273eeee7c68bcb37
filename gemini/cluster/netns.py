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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gemini.config import ClusterConfig

NETWORK = ipaddress.ip_network("198.18.0.0/15")
"""The benchmarking range (RFC 2544) every emulated link's address comes from."""
NS_PREFIX = "gemini-"
LOCK = Path("/run/lock/gemini-netns.lock")
"""Held while a run picks its subnet and creates its bridge (runs in parallel)."""
MAX_MACHINES = 253
"""Hosts .2 to .254 of a /24: the bridge has .1."""
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
    # Root in a container may still lack CAP_NET_ADMIN: only trying tells.
    probe = f"{NS_PREFIX}probe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except NetnsError as e:
        raise NetnsError(
            f"cannot create a network namespace here ({e}): run as root with CAP_NET_ADMIN"
        ) from None
    with contextlib.suppress(NetnsError):
        _ip("netns", "del", probe)


def check_delay_available() -> None:
    """Raise NetnsError, in one line, if this kernel cannot delay packets (no netem)."""
    probe = f"{NS_PREFIX}probe{os.getpid()}"
    _ip("netns", "add", probe)
    try:
        _tc("qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", ns=probe)
    except NetnsError:
        raise NetnsError(
            "this kernel has no netem queueing discipline to delay packets with: "
            "set it to 0 (links are then capped, not delayed)"
        ) from None
    finally:
        with contextlib.suppress(NetnsError):
            _ip("netns", "del", probe)


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
    """A bridge and one capped, namespaced link per machine, for one run.

    Machines are numbered by whoever uses the fabric (the local cluster gives
    nodes 0..N-1 the first numbers and every standby, refills included, the
    next); ``machines`` are created with it, more with :meth:`add`.
    """

    tag: str
    """Short id of the run (letters and digits, at most 8): names the devices."""
    machines: int
    link_gbps: float
    """Cap of each direction of each machine's link (0 = uncapped)."""
    latency_ms: float = 0.0
    """Delay added to every packet leaving a machine, ms (0 = none; needs netem)."""
    subnet: int = -1
    members: list[int] = field(default_factory=list)
    """Machines whose namespace exists, in creation order."""
    _up: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]{1,8}", self.tag):
            raise NetnsError(f"fabric tag {self.tag!r}: use 1-8 lowercase letters or digits")
        if not 0 <= self.machines <= MAX_MACHINES:
            raise NetnsError(f"{self.machines} machines: a fabric holds 0 to {MAX_MACHINES}")

    # -- names and addresses -----------------------------------------------------
    @property
    def bridge(self) -> str:
        return f"gb{self.tag}"

    @property
    def bridge_mac(self) -> str:
        """The bridge's own MAC address: locally administered, one per subnet."""
        return f"02:00:c6:12:{self.subnet >> 8:02x}:{self.subnet & 0xFF:02x}"

    def namespace(self, machine: int) -> str:
        return f"{NS_PREFIX}{self.tag}-n{machine}"

    def _host_end(self, machine: int) -> str:
        return f"gv{self.tag}n{machine}"

    def _address(self, host: int) -> str:
        base = int(NETWORK.network_address) + (self.subnet << 8) + host
        return str(ipaddress.ip_address(base))

    @property
    def root_address(self) -> str:
        """The controller's address on the fabric (the bridge's)."""
        return self._address(1)

    def address(self, machine: int) -> str:
        return self._address(machine + 2)

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
                # A bridge takes the lowest MAC address of its ports unless
                # given one: removing a lost machine's port would change it,
                # and every namespace's ARP entry for the store's address
                # would point nowhere for as long as it stays cached (tens
                # of seconds without a heartbeat). A fixed, locally
                # administered address keeps it where it is.
                _ip("link", "add", self.bridge, "address", self.bridge_mac, "type", "bridge")
                self._up = True
                _ip("addr", "add", f"{self.root_address}/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            for machine in range(self.machines):
                self.add(machine)
        except BaseException:
            self.close()
            raise
        return self

    def add(self, machine: int) -> None:
        """Give ``machine`` its namespace and capped link (a standby started later)."""
        if not 0 <= machine < MAX_MACHINES or machine in self.members:
            raise NetnsError(f"machine {machine}: not a free number below {MAX_MACHINES}")
        ns, host_end = self.namespace(machine), self._host_end(machine)
        _ip("netns", "add", ns)
        self.members.append(machine)
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", host_end, "master", self.bridge)
        _ip("addr", "add", f"{self.address(machine)}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        _ip("link", "set", host_end, "up")
        # Each end caps what leaves through it: both directions capped. The
        # delay is added where packets leave the node only, so a packet from
        # one node to another is delayed once (it also leaves the bridge
        # through the receiver's host end).
        for dev, where in ((host_end, None), ("eth0", ns)):
            parent = ["root"]
            if self.latency_ms > 0 and where is not None:
                _tc("qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay",
                    f"{self.latency_ms}ms", ns=where)  # fmt: skip
                parent = ["parent", "1:", "handle", "2:"]
            if self.link_gbps > 0:
                _tc("qdisc", "add", "dev", dev, *parent, "tbf", *_cap_args(self.link_gbps),
                    ns=where)  # fmt: skip

    def remove(self, machine: int) -> None:
        """Take ``machine``'s link and namespace away (its processes are gone)."""
        if machine in self.members:
            self.members.remove(machine)
            # Deleting one end removes the pair now; a namespace's own
            # interfaces go only when the kernel gets round to freeing it.
            with contextlib.suppress(NetnsError):
                _ip("link", "del", self._host_end(machine))
            with contextlib.suppress(NetnsError):
                _ip("netns", "del", self.namespace(machine))

    def exec_prefix(self, machine: int) -> list[str]:
        """The command prefix that runs a program inside ``machine``'s namespace
        (``ip netns exec`` execs it: the process keeps the pid it was started with)."""
        return ["ip", "netns", "exec", self.namespace(machine)]

    def cut(self, machine: int) -> None:
        """Partition ``machine``: its link goes down, its processes keep running."""
        _ip("link", "set", self._host_end(machine), "down")

    def heal(self, machine: int) -> None:
        """Bring ``machine``'s link back up."""
        _ip("link", "set", self._host_end(machine), "up")

    def close(self) -> None:
        """Remove the links, the namespaces and the bridge. Idempotent; never raises
        for what is already gone."""
        for machine in list(self.members):
            self.remove(machine)
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


def fabric_tags(min_age_s: float = 0.0) -> set[str]:
    """Tags of the fabrics whose namespaces exist on this machine and are at least
    ``min_age_s`` old (a run creates its fabric a moment before its processes)."""
    netns_dir = Path("/run/netns")
    tags: set[str] = set()
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        for entry in netns_dir.iterdir():
            m = re.fullmatch(rf"{NS_PREFIX}([a-z0-9]{{1,8}})-n\d+", entry.name)
            if m is None:
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - entry.lstat().st_mtime >= min_age_s:
                    tags.add(m.group(1))
    return tags


def open_fabric(c: ClusterConfig, run_id: str) -> Fabric | None:
    """The fabric of a run with ``cluster.network=netns`` (created, one namespace per
    node and standby), or None on loopback."""
    if c.network != "netns":
        return None
    return Fabric(run_id[:8], c.nodes + c.standby_nodes, c.link_gbps, c.link_latency_ms).create()
