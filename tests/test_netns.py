"""Emulated NICs (gemini.cluster.netns): namespaces, capped links, partitions, cleanup.

Real namespaces, veth pairs and tbf qdiscs: these tests need root and
iproute2 and are skipped, with the reason, on a machine without them (CI
runs them as root).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest

from gemini.cluster.netns import Fabric, NetnsError, check_available, remove_stale

try:
    check_available()
    WHY_NOT = ""
except NetnsError as e:
    WHY_NOT = str(e)

pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=f"netns unavailable: {WHY_NOT}")

CAP_GBPS = 0.2
PORT = 47001

RECEIVER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
n, t0 = 0, None
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    if t0 is None:
        t0 = time.perf_counter()
    n += len(b)
print(n, time.perf_counter() - t0, flush=True)
"""

SENDER = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
c.sendall(b"x" * int(sys.argv[3]))
c.close()
"""


def in_ns(fabric: Fabric, node: int, code: str, *args: str) -> list[str]:
    return [*fabric.exec_prefix(node), sys.executable, "-c", textwrap.dedent(code), *args]


def send(fabric: Fabric, src: int, dst: int, nbytes: int) -> float:
    """Bits per second of one TCP stream from node ``src`` to node ``dst``."""
    host = fabric.address(dst)
    rx = subprocess.Popen(
        in_ns(fabric, dst, RECEIVER, host, str(PORT)), stdout=subprocess.PIPE, text=True
    )
    try:
        assert rx.stdout is not None and rx.stdout.readline().strip() == "listening"
        subprocess.run(
            in_ns(fabric, src, SENDER, host, str(PORT), str(nbytes), "30"), check=True, timeout=60
        )
        out, _ = rx.communicate(timeout=60)
    finally:
        if rx.poll() is None:
            rx.kill()
    got, seconds = out.split()
    assert int(got) == nbytes
    return nbytes * 8 / float(seconds)


@pytest.fixture
def fabric() -> Iterator[Fabric]:
    tag = uuid.uuid4().hex[:8]
    with Fabric(tag, machines=2, link_gbps=CAP_GBPS) as f:
        yield f
    remove_stale(tag)


def test_each_direction_of_a_link_is_capped(fabric: Fabric) -> None:
    nbytes = int(CAP_GBPS * 1e9 / 8 * 1.5)  # ~1.5 s at the cap
    for src, dst in ((0, 1), (1, 0)):
        rate = send(fabric, src, dst, nbytes)
        assert rate <= 1.05 * CAP_GBPS * 1e9, (src, dst, rate)
        # It is the cap that limits it, not a broken link.
        assert rate >= 0.5 * CAP_GBPS * 1e9, (src, dst, rate)


def test_nodes_reach_each_other_and_the_controller_and_nothing_else(fabric: Fabric) -> None:
    for node in (0, 1):
        routes = subprocess.run(
            ["ip", "-n", fabric.namespace(node), "-4", "route"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "default" not in routes
        assert routes.strip().startswith("198.1"), routes
    # The controller's side of the bridge (the store, the root) is reachable
    # from inside a namespace.
    with socket.create_server((fabric.root_address, 0)) as server:
        port = server.getsockname()[1]
        subprocess.run(
            in_ns(fabric, 0, SENDER, fabric.root_address, str(port), "5", "10"),
            check=True,
            timeout=30,
        )
        conn, _ = server.accept()
        with conn:
            assert conn.recv(16) == b"xxxxx"


def test_a_cut_link_partitions_the_node_until_it_heals(fabric: Fabric) -> None:
    fabric.cut(1)
    probe = subprocess.run(
        in_ns(fabric, 0, SENDER, fabric.address(1), str(PORT), "1", "2"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode != 0  # no route to a node whose link is down
    fabric.heal(1)
    assert send(fabric, 0, 1, 1 << 20) > 0


def test_close_removes_every_namespace_and_link() -> None:
    tag = uuid.uuid4().hex[:8]
    f = Fabric(tag, machines=3, link_gbps=1.0).create()
    names = [f.namespace(i) for i in range(3)]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(n in listed for n in names)
    f.close()
    f.close()  # idempotent
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
    links = subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
    assert f"gb{tag}" not in links and f"gv{tag}" not in links


def test_bad_tags_and_sizes_are_refused() -> None:
    with pytest.raises(NetnsError, match="tag"):
        Fabric("Bad-Tag", machines=2, link_gbps=1.0)
    with pytest.raises(NetnsError, match="machines"):
        Fabric("ok", machines=-1, link_gbps=1.0)


def test_a_machine_added_later_joins_the_fabric_and_leaves_it_on_remove(fabric: Fabric) -> None:
    fabric.add(5)
    assert send(fabric, 5, 0, 1 << 20) > 0
    with pytest.raises(NetnsError, match="free number"):
        fabric.add(5)
    fabric.remove(5)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert fabric.namespace(5) not in listed and fabric.namespace(0) in listed


def test_the_bridge_keeps_its_address_when_a_machine_leaves(fabric: Fabric) -> None:
    # Otherwise every namespace's cached ARP entry for the store's address
    # goes stale when a lost machine's port is removed.
    def bridge_mac() -> str:
        out = subprocess.run(
            ["ip", "-br", "link", "show", fabric.bridge], capture_output=True, text=True
        ).stdout
        return out.split()[2]

    assert bridge_mac() == fabric.bridge_mac
    fabric.add(7)
    fabric.remove(0)
    assert bridge_mac() == fabric.bridge_mac
    assert send(fabric, 1, 7, 1 << 20) > 0
