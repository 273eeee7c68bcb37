"""What a connection may cost the holder, and the run secret's file.

Real sockets on 127.0.0.1 and real server threads, as in test_transport.py:
peers that never authenticate hold a slot for seconds at most and never all of
them; idle authenticated connections are closed and clients reconnect
without the caller noticing; concurrent puts into a node's real shared-memory
slots never interleave; the secret file is new, private and gone after the run.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_memory_backend import config_dict
from test_transport import SECRET, MemHandler, conn_threads, put_stream, raw_peer, wait_until

from gemini.checkpoint import format as fmt
from gemini.checkpoint import slot as sl
from gemini.checkpoint.node_memory import MemoryServices
from gemini.cluster.job import JobSpec, new_secret_file
from gemini.cluster.local import LocalCluster
from gemini.cluster.store import Store
from gemini.cluster.transport import (
    FrameType,
    TransportClient,
    TransportError,
    TransportServer,
    recv_frame,
    send_frame,
    server_handshake,
)

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


def closed_by_server(sock: socket.socket, within_s: float) -> float:
    """Seconds until the server hung up on ``sock`` (fails after ``within_s``)."""
    t0 = time.monotonic()
    sock.settimeout(within_s)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""
    return time.monotonic() - t0


# ------------------------------------------------------------- handshake


def test_a_silent_peer_is_dropped_within_the_handshake_timeout_and_blocks_no_one() -> None:
    handler = MemHandler()
    with TransportServer(SECRET, handler, handshake_timeout_s=1.0) as srv:
        silent = socket.create_connection(("127.0.0.1", srv.port))
        # Meanwhile a peer with the secret is served at once.
        with TransportClient("127.0.0.1", srv.port, SECRET, timeout_s=5) as c:
            t0 = time.monotonic()
            c.put(0, 1, b"{}", b"x" * 1000)
            assert bytes(c.get(0, 1)[1]) == b"x" * 1000
            assert time.monotonic() - t0 < 0.9
        with silent:
            held = closed_by_server(silent, within_s=5.0)
        assert 0.5 < held < 2.0, f"an unauthenticated peer held its slot for {held:.2f} s"


def test_a_peer_dribbling_its_handshake_is_dropped_on_the_same_deadline() -> None:
    # Each byte arrives well within any per-receive timeout: only a deadline
    # on the whole handshake ends this connection.
    with TransportServer(SECRET, MemHandler(), handshake_timeout_s=1.0) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        t0 = time.monotonic()
        with sock, contextlib.suppress(OSError):
            for _ in range(40):
                sock.sendall(b"G")
                time.sleep(0.1)
        held = time.monotonic() - t0
        assert held < 2.5, f"a dribbling peer held its slot for {held:.2f} s"


def test_peers_without_the_secret_cannot_keep_one_that_has_it_out() -> None:
    with TransportServer(SECRET, MemHandler(), max_connections=4, handshake_timeout_s=30) as srv:
        squatters = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(8)]
        try:
            # At most half the slots wait for a handshake: the older squatters
            # were hung up on as newer ones came, long before their deadline.
            wait_until(lambda: len(conn_threads(srv.port)) == 2)
            for s in squatters[:6]:
                assert closed_by_server(s, within_s=2.0) < 2.0
            with TransportClient("127.0.0.1", srv.port, SECRET, timeout_s=5) as c:
                c.put(1, 1, b"{}", b"y" * 100)
                assert c.list() == {"1": [1]}
                # ...and it keeps its slot while squatters keep coming.
                more = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(8)]
                c.put(1, 2, b"{}", b"z" * 100)
                assert c.list() == {"1": [1, 2]}
                for s in more:
                    s.close()
        finally:
            for s in squatters:
                s.close()


# ------------------------------------------------------------- idle connections


def test_idle_connections_are_closed_by_default() -> None:
    default = inspect.signature(TransportServer).parameters["idle_timeout_s"].default
    assert default is not None and 0 < default <= 600


def test_an_idle_authenticated_connection_is_closed_and_the_client_reconnects() -> None:
    handler = MemHandler()
    with (
        TransportServer(SECRET, handler, idle_timeout_s=0.5) as srv,
        TransportClient("127.0.0.1", srv.port, SECRET, timeout_s=5) as c,
    ):
        c.put(0, 1, b"{}", b"a" * 100)
        assert len(conn_threads(srv.port)) == 1
        wait_until(lambda: not conn_threads(srv.port), timeout_s=3.0)
        c.put(0, 2, b"{}", b"b" * 100)  # a new connection, transparently
        assert c.list() == {"0": [1, 2]}


class HangUpServer:
    """A holder that authenticates, reads one request and hangs up unanswered on
    its first ``hang_ups`` connections (as at an idle deadline), then answers
    LIST requests properly."""

    def __init__(self, hang_ups: int) -> None:
        self.hang_ups, self.requests = hang_ups, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError, TransportError):
                n += 1
                server_handshake(conn, SECRET)
                while True:
                    recv_frame(conn, {FrameType.LIST})
                    self.requests += 1
                    if n <= self.hang_ups:
                        break
                    send_frame(conn, FrameType.LIST_REPLY, json.dumps({"0": [n]}).encode())

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def hang_up_server(request: pytest.FixtureRequest) -> Iterator[HangUpServer]:
    srv = HangUpServer(hang_ups=request.param)
    yield srv
    srv.close()


@pytest.mark.parametrize("hang_up_server", [1], indirect=True)
def test_a_reused_connection_closed_before_any_answer_is_retried_once(
    hang_up_server: HangUpServer,
) -> None:
    with TransportClient("127.0.0.1", hang_up_server.port, SECRET, timeout_s=5) as c:
        c.connect()
        assert c.list() == {"0": [2]}  # answered on the second connection
        assert hang_up_server.requests == 2


@pytest.mark.parametrize("hang_up_server", [2], indirect=True)
def test_the_retry_happens_once_and_never_on_a_fresh_connection(
    hang_up_server: HangUpServer,
) -> None:
    with TransportClient("127.0.0.1", hang_up_server.port, SECRET, timeout_s=5) as c:
        c.connect()
        with pytest.raises(TransportError, match="list with"):
            c.list()
        assert hang_up_server.requests == 2
    with TransportClient("127.0.0.1", hang_up_server.port, SECRET, timeout_s=5) as c:
        assert c.list() == {"0": [3]}  # a fresh connection that works: no retry needed


# ------------------------------------------------------------- concurrent puts


def make_state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(256, 256, generator=g), "step": torch.tensor(step)}


def encoded(step: int, rank: int, generation: int = 0) -> tuple[bytes, bytes]:
    """(manifest JSON, data) of a real checkpoint of ``step``, written by ``generation``."""
    state = make_state(step)
    entries, nbytes = fmt.layout(state)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    fmt.write_state(state, entries, buf)
    manifest = fmt.make_manifest(
        state,
        step=step,
        rank=rank,
        world_size=2,
        config_hash="cfg",
        extra={},
        buf=memoryview(buf.numpy()),
        chunk_bytes=16 << 10,
        generation=generation,
    )
    return manifest.to_json(), bytes(buf.numpy())


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[MemoryServices]:
    """Node 1's real memory services holding rank 0's replica slots (no agent around them)."""
    run_id = f"t{uuid.uuid4().hex[:9]}"
    job = JobSpec(
        run_id=run_id,
        job_dir=str(tmp_path),
        store="",
        secret_file="",
        config=config_dict(tmp_path, {"name": "replicated"}, nodes=2),
    )
    services = MemoryServices(job, node=1, store=None)  # type: ignore[arg-type]
    _manifest, data = encoded(0, 0)
    cap = sl.manifest_capacity_for(4, len(data), 16 << 10)
    services.sets[0] = sl.SlotSet.create(sl.shm_name(run_id, 1, 0, "replica"), len(data), cap)
    yield services
    services.close()
    sl.unlink_prefix(f"gemini-{run_id}-")


def test_concurrent_puts_of_one_source_never_share_a_slot(holder: MemoryServices) -> None:
    steps = {t: [t * 100 + i for i in range(1, 6)] for t in range(6)}
    payloads = {s: encoded(s, 0) for ss in steps.values() for s in ss}
    errors: list[BaseException] = []
    with TransportServer(SECRET, holder) as srv:

        def sender(thread: int) -> None:
            try:
                with TransportClient("127.0.0.1", srv.port, SECRET, timeout_s=30) as c:
                    for s in steps[thread]:
                        c.put(0, s, *payloads[s], chunk_bytes=32 << 10)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=sender, args=(t,)) for t in steps]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors
    slots = holder.sets[0]
    complete = slots.complete_steps()
    assert len(complete) == 2
    for step, idx in complete:
        slots.verify(idx)  # data and manifest of one and the same put
        assert bytes(slots.data_view(idx)[: len(payloads[step][1])]) == payloads[step][1]


def test_a_second_put_of_a_source_waits_for_the_first(holder: MemoryServices) -> None:
    manifest, data = encoded(7, 0)
    first = holder.begin_put(0, 7, len(data), len(manifest))
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(holder.begin_put(0, 8, len(data), 10)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not got, "a second writer began while the first one wrote"
    first.buffer()[: len(data)] = data
    first.commit(manifest)
    waiter.join(5)
    assert got, "the second put never began"
    got[0].abort("test over")
    assert holder.sets[0].complete_steps() == [(7, first.idx)]
    assert got[0].idx != first.idx


def test_a_trim_ends_a_cut_off_senders_put_so_the_next_generation_puts_at_once(
    holder: MemoryServices,
) -> None:
    # Generation 1's rank 0 was cut off in the middle of its put of step 8:
    # its connection stays open, silent, for as long as the link is down.
    old_manifest, old_data = encoded(8, 0, generation=1)
    with TransportServer(SECRET, holder, io_timeout_s=120) as srv:
        holder.server = srv
        cut_off = raw_peer(srv.port)
        cut_off.sendall(put_stream(0, 8, old_manifest, old_data, 16 << 10)[: len(old_data) // 2])
        wait_until(lambda: 0 in holder._receiving)
        # The recovery to step 7 launches generation 2: the trim ends that put.
        assert holder.trim(7, generation=2) == {}
        assert 0 not in holder._receiving
        # Generation 2's rank 0 puts the same step straight away; held up
        # behind the dead put it would wait past this client's timeout.
        manifest, data = encoded(8, 0, generation=2)
        with TransportClient("127.0.0.1", srv.port, SECRET, timeout_s=10) as c:
            c.put(0, 8, manifest, data, chunk_bytes=32 << 10)
        cut_off.close()
    slots = holder.sets[0]
    [(step, idx)] = slots.complete_steps()
    assert step == 8 and slots.verify(idx).generation == 2


def test_a_whole_copy_from_an_ended_generation_is_refused_after_a_trim(
    holder: MemoryServices,
) -> None:
    # A cut-off sender's kernel delivers what it had written once the link
    # returns, whole, after the recovery: it must not become a slot.
    with (
        TransportServer(SECRET, holder) as srv,
        TransportClient("127.0.0.1", srv.port, SECRET, timeout_s=10) as c,
    ):
        c.put(0, 7, *encoded(7, 0, generation=1))
        holder.trim(7, generation=2)
        with pytest.raises(TransportError, match="written by generation 1, ended before"):
            c.put(0, 8, *encoded(8, 0, generation=1))
        c.put(0, 8, *encoded(8, 0, generation=2))
    assert [s for s, _ in holder.sets[0].complete_steps()] == [8, 7]


# ------------------------------------------------------------- the secret file


def test_the_secret_file_is_new_and_private(tmp_path: Path) -> None:
    path = new_secret_file(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(bytes.fromhex(path.read_text())) == 32
    with pytest.raises(FileExistsError, match="new job dir"):
        new_secret_file(tmp_path)


def test_a_planted_secret_file_or_link_is_refused_and_left_alone(tmp_path: Path) -> None:
    elsewhere = tmp_path / "readable-by-all"
    elsewhere.write_text("")
    os.chmod(elsewhere, 0o644)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / ".secret").symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        new_secret_file(job_dir)
    assert elsewhere.read_text() == ""
    dangling = tmp_path / "job2"
    dangling.mkdir()
    (dangling / ".secret").symlink_to(tmp_path / "nothing-here")
    with pytest.raises(FileExistsError):
        new_secret_file(dangling)
    assert not (tmp_path / "nothing-here").exists()


def test_teardown_removes_the_secret_file(tmp_path: Path) -> None:
    secret = new_secret_file(tmp_path)
    job = JobSpec(
        run_id=f"t{uuid.uuid4().hex[:9]}",
        job_dir=str(tmp_path),
        store="",
        secret_file=str(secret),
        config=config_dict(tmp_path, {"name": "memory"}, nodes=1),
    )
    store = Store("127.0.0.1", 0, job.secret(), timeout_s=10.0, master=True)
    job.store = store.address
    LocalCluster(job, store).teardown()
    assert not secret.exists()
