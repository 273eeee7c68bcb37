"""Transport: real sockets on 127.0.0.1, real server threads, an in-memory handler.

Misbehaving peers are raw sockets that speak the protocol through the module's
own frame helpers, so they can authenticate correctly and then lie.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemini.cluster.transport import (
    HEADER,
    FrameType,
    TransportClient,
    TransportError,
    TransportServer,
    auth_mac,
    checksum,
    client_handshake,
    pack_header,
    recv_frame,
    send_frame,
    server_handshake,
)

# A crash in a server thread would otherwise only be a warning.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

SECRET = b"run-secret-0123456789abcdef"
OTHER_SECRET = b"another-run-secret-9876543210"
SMALL_CHUNK = 4096


class MemTarget:
    """One slot: the transport writes into `buf`; commit publishes that same object."""

    def __init__(self, handler: MemHandler, source: int, step: int, data_len: int) -> None:
        self.handler, self.source, self.step = handler, source, step
        self.buf = bytearray(data_len)

    def buffer(self) -> memoryview:
        return memoryview(self.buf)

    def commit(self, manifest_json: bytes) -> None:
        self.handler._finish(self, ("commit", manifest_json))

    def abort(self, reason: str) -> None:
        self.handler._finish(self, ("abort", reason))


class MemHandler:
    """A thread-safe in-memory holder that records every terminal callback."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.complete: dict[int, dict[int, tuple[bytes, bytearray]]] = {}
        self.events: list[tuple[int, int, str, Any]] = []
        self.outstanding: set[MemTarget] = set()
        self.targets: list[MemTarget] = []

    def begin_put(self, source: int, step: int, data_len: int, manifest_len: int) -> MemTarget:
        if data_len > self.max_bytes:
            raise ValueError(f"{data_len} bytes exceeds this holder's {self.max_bytes}")
        target = MemTarget(self, source, step, data_len)
        with self.lock:
            self.outstanding.add(target)
            self.targets.append(target)
        return target

    def _finish(self, target: MemTarget, event: tuple[str, Any]) -> None:
        with self.lock:
            assert target in self.outstanding, "second terminal callback for one target"
            self.outstanding.discard(target)
            self.events.append((target.source, target.step, *event))
            if event[0] == "commit":
                self.complete.setdefault(target.source, {})[target.step] = (event[1], target.buf)

    def get(self, source: int, step: int | None) -> tuple[bytes, memoryview] | None:
        with self.lock:
            steps = self.complete.get(source, {})
            if not steps:
                return None
            key = max(steps) if step is None else step
            if key not in steps:
                return None
            manifest, buf = steps[key]
            return manifest, memoryview(buf)

    def list(self) -> dict[Any, Any]:
        with self.lock:
            return {s: sorted(steps) for s, steps in self.complete.items()}

    def events_for(self, source: int, step: int) -> builtins.list[tuple[str, Any]]:
        with self.lock:
            return [(e[2], e[3]) for e in self.events if e[:2] == (source, step)]


def wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def conn_threads(port: int) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith(f"gemini-transport-conn-{port}-") and t.is_alive()
    ]


def server_threads(port: int) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "transport-" in t.name and f"-{port}" in t.name]


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return pack_header(ftype, len(payload), checksum(payload)) + payload


def jframe(ftype: int, obj: Any) -> bytes:
    return frame(ftype, json.dumps(obj).encode())


def put_stream(source: int, step: int, manifest: bytes, data: bytes, chunk: int) -> bytes:
    """Everything a client sends for one put after the handshake."""
    head = {"source": source, "step": step, "data_len": len(data), "manifest_len": len(manifest)}
    parts = [jframe(FrameType.PUT_BEGIN, head), frame(FrameType.MANIFEST, manifest)]
    parts += [frame(FrameType.DATA, data[i : i + chunk]) for i in range(0, len(data), chunk)]
    return b"".join(parts)


def raw_peer(port: int, secret: bytes = SECRET) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    client_handshake(sock, secret)
    return sock


def payload_of(n: int, seed: int) -> bytes:
    """Deterministic bytes, so a shrunk hypothesis example replays exactly."""
    return random.Random(seed).randbytes(n)


@pytest.fixture
def handler() -> MemHandler:
    return MemHandler()


@pytest.fixture
def server(handler: MemHandler) -> Iterator[TransportServer]:
    with TransportServer(SECRET, handler, io_timeout_s=2.0) as srv:
        yield srv
    assert not server_threads(srv.port), "server threads still alive after close()"


@pytest.fixture
def client(server: TransportServer) -> Iterator[TransportClient]:
    with TransportClient("127.0.0.1", server.port, SECRET, timeout_s=5) as c:
        yield c


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "size",
    [0, 1, SMALL_CHUNK - 1, SMALL_CHUNK, SMALL_CHUNK + 1, 3 * SMALL_CHUNK, 3 * SMALL_CHUNK + 7],
)
def test_put_then_get_round_trip_is_bitwise_equal(
    client: TransportClient, handler: MemHandler, size: int
) -> None:
    data = os.urandom(size)
    manifest = json.dumps({"step": 5, "size": size}).encode()
    seconds = client.put(2, 5, manifest, memoryview(data), chunk_bytes=SMALL_CHUNK)
    assert seconds > 0
    assert handler.events_for(2, 5) == [("commit", manifest)]
    got_manifest, got = client.get(2, 5, chunk_bytes=64 << 10)
    assert got_manifest == manifest
    assert bytes(got) == data


def test_multi_mib_put_uses_default_chunks_and_round_trips(
    client: TransportClient, handler: MemHandler
) -> None:
    data = os.urandom((20 << 20) + 12345)  # several 8 MiB chunks plus a ragged tail
    client.put(0, 1, b"{}", data)
    assert bytes(handler.complete[0][1][1]) == data
    into = bytearray(len(data) + 100)
    _, got = client.get(0, 1, into=into)
    assert isinstance(got, memoryview) and got.nbytes == len(data)
    assert got.obj is into and bytes(got) == data


def test_one_connection_carries_many_puts_and_get_none_means_newest(
    server: TransportServer, client: TransportClient, handler: MemHandler
) -> None:
    for step in range(5):
        client.put(3, step, json.dumps({"step": step}).encode(), bytes([step]) * 1000)
    assert len(conn_threads(server.port)) == 1
    manifest, data = client.get(3, None)
    assert json.loads(manifest) == {"step": 4} and bytes(data) == b"\x04" * 1000
    assert client.list() == {"3": [0, 1, 2, 3, 4]}


def test_put_accepts_any_contiguous_buffer(client: TransportClient, handler: MemHandler) -> None:
    import array

    floats = array.array("f", [1.5, -2.0, 3.25])
    client.put(1, 1, b"{}", floats)
    assert bytes(handler.complete[1][1][1]) == floats.tobytes()


# ------------------------------------------------------------ zero-copy paths


def test_put_lands_straight_in_the_targets_buffer(
    client: TransportClient, handler: MemHandler
) -> None:
    size = 32 << 20
    data = os.urandom(size)
    client.put(0, 0, b"{}", data)  # warm up: connection, handshake, code paths
    tracemalloc.start()
    try:
        client.put(0, 1, b"{}", data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    target = handler.targets[-1]
    # The slot the handler handed out is the object that was filled...
    assert handler.complete[0][1][1] is target.buf and target.buf == data
    # ...and nothing on the way allocated a chunk-sized intermediate: the peak
    # includes the 32 MiB slot itself, so anything else must be tiny.
    assert peak < size + (1 << 20), f"peak {peak} bytes suggests a copy on the data path"


def test_get_receives_straight_into_the_given_buffer(client: TransportClient) -> None:
    data = os.urandom(3 * SMALL_CHUNK + 5)
    client.put(4, 9, b'{"a":1}', data)
    into = bytearray(len(data))
    tracemalloc.start()
    try:
        manifest, got = client.get(4, 9, into=memoryview(into), chunk_bytes=64 << 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert manifest == b'{"a":1}' and into == data
    assert isinstance(got, memoryview) and got.obj is into
    assert peak < 256 << 10


def test_get_into_a_too_small_buffer_fails_and_the_client_recovers(
    client: TransportClient,
) -> None:
    client.put(4, 1, b"{}", b"x" * 1000)
    with pytest.raises(TransportError, match="into holds 10 bytes, the checkpoint needs 1000"):
        client.get(4, 1, into=bytearray(10))
    assert bytes(client.get(4, 1)[1]) == b"x" * 1000


def test_get_of_a_missing_checkpoint_is_refused_and_the_connection_stays_usable(
    server: TransportServer, client: TransportClient
) -> None:
    with pytest.raises(TransportError, match="no checkpoint of source 7 step newest"):
        client.get(7)
    with pytest.raises(TransportError, match="no checkpoint of source 7 step 3"):
        client.get(7, 3)
    assert client.list() == {}
    assert len(conn_threads(server.port)) == 1


def test_a_refused_put_reports_the_handlers_reason_and_keeps_the_connection(
    server: TransportServer, handler: MemHandler, client: TransportClient
) -> None:
    handler.max_bytes = 100
    with pytest.raises(TransportError, match=r"refused.*101 bytes exceeds this holder's 100"):
        client.put(1, 1, b"{}", b"x" * 101)
    client.put(1, 2, b"{}", b"x" * 100)
    assert handler.events_for(1, 1) == [] and handler.events_for(1, 2)[0][0] == "commit"
    assert len(conn_threads(server.port)) == 1


# ------------------------------------------------------------ authentication


def test_client_with_wrong_secret_is_refused_and_server_keeps_serving(
    server: TransportServer, handler: MemHandler, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gemini.cluster.transport")
    with (
        TransportClient("127.0.0.1", server.port, OTHER_SECRET, timeout_s=5) as bad,
        pytest.raises(TransportError, match="auth failed"),
    ):
        bad.put(0, 0, b"{}", b"secret data")
    assert handler.targets == []  # nothing was read past the handshake
    wait_until(lambda: "auth failed" in caplog.text)
    with TransportClient("127.0.0.1", server.port, SECRET, timeout_s=5) as good:
        good.put(0, 0, b"{}", b"data")
        assert good.list() == {"0": [0]}


def test_server_refuses_a_wrong_proof_with_an_error_frame(server: TransportServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        client_nonce = os.urandom(32)
        send_frame(sock, FrameType.HELLO, client_nonce)
        _, server_nonce = recv_frame(sock, {FrameType.CHALLENGE})
        send_frame(
            sock, FrameType.PROOF, auth_mac(OTHER_SECRET, b"client", client_nonce, server_nonce)
        )
        ftype, payload = recv_frame(sock, {FrameType.AUTH_OK})
        assert ftype == FrameType.ERROR and json.loads(payload) == {"error": "auth failed"}
        assert sock.recv(1) == b""  # and it hung up


def test_replaying_the_servers_proof_as_ours_is_refused(server: TransportServer) -> None:
    """A peer without the secret cannot turn the server's own MAC into a proof."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        client_nonce = os.urandom(32)
        send_frame(sock, FrameType.HELLO, client_nonce)
        _, server_nonce = recv_frame(sock, {FrameType.CHALLENGE})
        forged = auth_mac(SECRET, b"server", client_nonce, server_nonce)  # best case for it
        send_frame(sock, FrameType.PROOF, forged)
        ftype, _ = recv_frame(sock, {FrameType.AUTH_OK})
        assert ftype == FrameType.ERROR


def fake_server(behaviour: Callable[[socket.socket], None]) -> tuple[int, threading.Thread]:
    """A one-connection server running `behaviour` on the accepted socket."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                try:
                    behaviour(conn)
                    conn.recv(1)  # linger until the client hangs up
                except (OSError, TransportError):
                    pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread


def test_client_detects_a_server_that_does_not_know_the_secret() -> None:
    def impostor(conn: socket.socket) -> None:
        _, client_nonce = recv_frame(conn, {FrameType.HELLO})
        server_nonce = os.urandom(32)
        send_frame(conn, FrameType.CHALLENGE, server_nonce)
        recv_frame(conn, {FrameType.PROOF})  # accepts anything
        mac = auth_mac(OTHER_SECRET, b"server", client_nonce, server_nonce)
        send_frame(conn, FrameType.AUTH_OK, mac)

    port, thread = fake_server(impostor)
    with (
        TransportClient("127.0.0.1", port, SECRET, timeout_s=5) as c,
        pytest.raises(TransportError, match="auth failed: server did not prove the run secret"),
    ):
        c.put(0, 0, b"{}", b"must not leave")
    thread.join(5)


def test_real_server_with_another_secret_is_refused_by_the_client(handler: MemHandler) -> None:
    with (
        TransportServer(OTHER_SECRET, handler) as srv,
        TransportClient("127.0.0.1", srv.port, SECRET, timeout_s=5) as c,
        pytest.raises(TransportError, match="auth failed"),
    ):
        c.list()


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        TransportClient("127.0.0.1", 1, b"short")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        TransportServer(b"short", MemHandler())


# ---------------------------------------------------------- corrupted data


def test_corrupted_chunk_aborts_the_put_and_commits_nothing(
    server: TransportServer, handler: MemHandler
) -> None:
    data = os.urandom(4 * SMALL_CHUNK)
    chunks = [data[i : i + SMALL_CHUNK] for i in range(0, len(data), SMALL_CHUNK)]
    with raw_peer(server.port) as sock:
        head = {"source": 2, "step": 17, "data_len": len(data), "manifest_len": 2}
        sock.sendall(jframe(FrameType.PUT_BEGIN, head))
        assert recv_frame(sock, {FrameType.READY})[0] == FrameType.READY
        sock.sendall(frame(FrameType.MANIFEST, b"{}"))
        for i, chunk in enumerate(chunks):
            if i == 3:  # the checksum is of the true bytes; one bit flips in flight
                wire = bytearray(chunk)
                wire[100] ^= 0x01
                sock.sendall(pack_header(FrameType.DATA, len(chunk), checksum(chunk)) + wire)
            else:
                sock.sendall(frame(FrameType.DATA, chunk))
        ftype, payload = recv_frame(sock, {FrameType.ACK})
        assert ftype == FrameType.ERROR
        assert json.loads(payload)["error"] == "checksum mismatch in chunk 3 of source 2 step 17"
        assert handler.events_for(2, 17) == [
            ("abort", "checksum mismatch in chunk 3 of source 2 step 17")
        ]
        assert 2 not in handler.complete
        # The server drained the rest of the put, so this connection is still in step.
        sock.sendall(frame(FrameType.LIST))
        assert recv_frame(sock, {FrameType.LIST_REPLY}) == (FrameType.LIST_REPLY, b"{}")


def test_client_rejects_a_corrupted_chunk_from_a_holder() -> None:
    data = os.urandom(3 * SMALL_CHUNK)

    def liar(conn: socket.socket) -> None:
        server_handshake(conn, SECRET)
        recv_frame(conn, {FrameType.GET})
        begin = {"source": 2, "data_len": len(data), "manifest_len": 2}
        conn.sendall(jframe(FrameType.GET_BEGIN, begin) + frame(FrameType.MANIFEST, b"{}"))
        for i in range(3):
            chunk = data[i * SMALL_CHUNK : (i + 1) * SMALL_CHUNK]
            wire = bytearray(chunk)
            if i == 1:
                wire[0] ^= 0xFF
            conn.sendall(pack_header(FrameType.DATA, len(chunk), checksum(chunk)) + wire)

    port, thread = fake_server(liar)
    with (
        TransportClient("127.0.0.1", port, SECRET, timeout_s=5) as c,
        pytest.raises(TransportError, match="checksum mismatch in chunk 1 of source 2 step 17"),
    ):
        c.get(2, 17)
    thread.join(5)


# ------------------------------------------------------- lost or stuck peers


def test_peer_disconnecting_mid_transfer_aborts_the_put(
    server: TransportServer, handler: MemHandler
) -> None:
    data = os.urandom(4 * SMALL_CHUNK)
    stream = put_stream(5, 8, b"{}", data, SMALL_CHUNK)
    with raw_peer(server.port) as sock:
        sock.sendall(stream[: len(stream) - SMALL_CHUNK - 10])
    wait_until(lambda: bool(handler.events_for(5, 8)))
    [(kind, reason)] = handler.events_for(5, 8)
    assert kind == "abort"
    # Cut inside a chunk's frame header or its payload, depending on framing:
    # either way the put names what was missing and is not committed.
    assert re.match(
        r"put of source 5 step 8 failed: peer closed (mid-transfer after \d+ of \d+ bytes"
        r"|the connection after \d+ of \d+ header bytes)",
        reason,
    ), reason
    assert 5 not in handler.complete


def test_a_stalled_peer_is_dropped_after_the_io_timeout(handler: MemHandler) -> None:
    with TransportServer(SECRET, handler, io_timeout_s=0.3) as srv, raw_peer(srv.port) as sock:
        stream = put_stream(6, 1, b"{}", os.urandom(2 * SMALL_CHUNK), SMALL_CHUNK)
        sock.sendall(stream[:-100])  # then say nothing
        wait_until(lambda: bool(handler.events_for(6, 1)), timeout_s=3)
        [(kind, reason)] = handler.events_for(6, 1)
        assert kind == "abort" and "stalled for 0.3s mid-transfer" in reason


def test_a_lost_holder_fails_the_put_with_progress_and_the_client_reconnects(
    handler: MemHandler,
) -> None:
    srv = TransportServer(SECRET, handler).start()
    port = srv.port
    with TransportClient("127.0.0.1", port, SECRET, timeout_s=5) as c:
        c.put(0, 0, b"{}", b"a" * 100)
        srv.close()  # the holder goes away between steps...
        with pytest.raises(TransportError, match="cannot connect"):
            c.put(0, 1, b"{}", b"b" * 100)
        # ...and comes back on the same address: the next call just works.
        with TransportServer(SECRET, handler, port=port) as srv2:
            c.put(0, 2, b"{}", b"c" * 100)
            assert c.list() == {"0": [0, 2]}
        assert not server_threads(srv2.port)


def test_abort_puts_ends_a_stalled_put_at_once_and_leaves_idle_connections_alone(
    handler: MemHandler, caplog: pytest.LogCaptureFixture
) -> None:
    # A sender cut off mid-put (its link down: no reset ever arrives) would
    # hold its put until the io timeout; the holder's agent ends it when the
    # sender's generation is over.
    caplog.set_level(logging.WARNING, logger="gemini.cluster.transport")
    with (
        TransportServer(SECRET, handler, io_timeout_s=60) as srv,
        TransportClient("127.0.0.1", srv.port, SECRET, timeout_s=5) as idle,
        raw_peer(srv.port) as cut_off,
    ):
        idle.put(1, 0, b"{}", b"before")
        cut_off.sendall(put_stream(9, 4, b"{}", b"y" * 10_000, SMALL_CHUNK)[:-5])
        wait_until(lambda: len(conn_threads(srv.port)) == 2 and len(handler.outstanding) == 1)
        t0 = time.monotonic()
        assert srv.abort_puts("its generation ended") == ["source 9 step 4"]
        assert time.monotonic() - t0 < 2
        # Returned once the target is aborted and the connection gone ...
        [(kind, _)] = handler.events_for(9, 4)
        assert kind == "abort" and not handler.outstanding
        assert len(conn_threads(srv.port)) == 1
        assert "its generation ended" in caplog.text
        cut_off.settimeout(2)
        while cut_off.recv(4096):  # the READY frame it never read, then the close
            pass
        # ... while the idle connection serves on, and nothing else was ended.
        idle.put(1, 1, b"{}", b"after")
        assert idle.list() == {"1": [0, 1]}
        assert srv.abort_puts("again") == []


def test_close_ends_idle_and_half_open_connections_and_joins_every_thread(
    handler: MemHandler,
) -> None:
    srv = TransportServer(SECRET, handler).start()
    clients = [TransportClient("127.0.0.1", srv.port, SECRET, timeout_s=5) for _ in range(3)]
    for i, c in enumerate(clients):
        c.put(i, 0, b"{}", b"x")
    half = socket.create_connection(("127.0.0.1", srv.port))  # never finishes the handshake
    mid = raw_peer(srv.port)  # in the middle of a put
    mid.sendall(put_stream(9, 0, b"{}", b"y" * 10_000, SMALL_CHUNK)[:-5])
    wait_until(lambda: len(conn_threads(srv.port)) == 5 and len(handler.outstanding) == 1)
    t0 = time.monotonic()
    srv.close()
    assert time.monotonic() - t0 < 2
    assert not server_threads(srv.port)
    assert handler.events_for(9, 0)[0][0] == "abort"
    for c in clients:
        with pytest.raises(TransportError):
            c.list()
        c.close()
    half.close()
    mid.close()


# ------------------------------------------ property-based: hostile peers


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[TransportServer, MemHandler]]:
    handler = MemHandler(max_bytes=1 << 20)
    with TransportServer(SECRET, handler, io_timeout_s=2.0) as srv:
        yield srv, handler
    assert not server_threads(srv.port)


_step_counter = iter(range(1_000, 1 << 30))


def assert_still_serving(srv: TransportServer, handler: MemHandler) -> None:
    """The server survives, serves a correct client, and leaks no connection
    thread or half-finished put."""
    step = next(_step_counter)
    data = os.urandom(2 * SMALL_CHUNK + 3)
    with TransportClient("127.0.0.1", srv.port, SECRET, timeout_s=5) as c:
        c.put(0, step, b"{}", data, chunk_bytes=SMALL_CHUNK)
        assert bytes(c.get(0, step)[1]) == data
    wait_until(lambda: not conn_threads(srv.port) and not handler.outstanding)


def throw(port: int, payload: bytes, *, authenticate: bool) -> None:
    sock = raw_peer(port) if authenticate else socket.create_connection(("127.0.0.1", port))
    # The server may hang up first; that is the point.
    with sock, contextlib.suppress(OSError):
        sock.sendall(payload)


# Few examples by default to keep the suite fast; raise for a longer fuzzing run.
SETTINGS = settings(
    max_examples=int(os.environ.get("GEMINI_TRANSPORT_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SETTINGS
@given(garbage=st.binary(max_size=300), authenticate=st.booleans())
def test_random_garbage_never_hurts_the_server(
    shared: tuple[TransportServer, MemHandler], garbage: bytes, authenticate: bool
) -> None:
    srv, handler = shared
    throw(srv.port, garbage, authenticate=authenticate)
    assert_still_serving(srv, handler)


@SETTINGS
@given(cut=st.floats(0, 1, exclude_max=True), n=st.integers(0, 3 * SMALL_CHUNK))
def test_truncated_valid_puts_abort_and_commit_nothing(
    shared: tuple[TransportServer, MemHandler], cut: float, n: int
) -> None:
    srv, handler = shared
    step = next(_step_counter)
    stream = put_stream(1, step, b'{"ok":1}', payload_of(n, step), SMALL_CHUNK)
    throw(srv.port, stream[: int(cut * len(stream))], authenticate=True)
    assert_still_serving(srv, handler)
    assert all(kind == "abort" for kind, _ in handler.events_for(1, step))


@SETTINGS
@given(n=st.integers(1, 3 * SMALL_CHUNK), data=st.data())
def test_any_flipped_byte_in_a_put_commits_nothing(
    shared: tuple[TransportServer, MemHandler], n: int, data: st.DataObject
) -> None:
    srv, handler = shared
    step = next(_step_counter)
    stream = bytearray(put_stream(1, step, b'{"ok":1}', payload_of(n, step), SMALL_CHUNK))
    # Drawn independently of the stream's length, which varies with the step.
    pos = data.draw(st.integers(0, 1 << 20), label="pos") % len(stream)
    stream[pos] ^= data.draw(st.integers(1, 255), label="xor")
    throw(srv.port, bytes(stream), authenticate=True)
    assert_still_serving(srv, handler)
    assert all(kind == "abort" for kind, _ in handler.events_for(1, step))


field_values = st.one_of(
    st.integers(-(1 << 70), 1 << 70),
    st.integers(0, 1 << 21),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
)
requests = st.fixed_dictionaries(
    {},
    optional={k: field_values for k in ("source", "step", "data_len", "manifest_len")}
    | {"chunk_bytes": field_values},
)


@SETTINGS
@given(
    ftype=st.sampled_from([*list(FrameType), 0, 99, 255]),
    body=st.one_of(requests.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200)),
    declared=st.one_of(st.none(), st.integers(0, (1 << 64) - 1)),
    good_checksum=st.booleans(),
    tail=st.binary(max_size=200),
)
def test_well_formed_frames_with_garbled_fields_never_hurt_the_server(
    shared: tuple[TransportServer, MemHandler],
    ftype: int,
    body: bytes,
    declared: int | None,
    good_checksum: bool,
    tail: bytes,
) -> None:
    srv, handler = shared
    length = len(body) if declared is None else declared
    csum = checksum(body) if good_checksum else checksum(body) ^ 1
    throw(
        srv.port, HEADER.pack(b"GMNI", 1, ftype, 0, length, csum) + body + tail, authenticate=True
    )
    assert_still_serving(srv, handler)


def test_an_oversized_length_is_refused_before_allocating(
    shared: tuple[TransportServer, MemHandler],
) -> None:
    srv, handler = shared
    with raw_peer(srv.port) as sock:
        tracemalloc.start()
        try:
            sock.sendall(pack_header(FrameType.PUT_BEGIN, 1 << 40, 0))
            assert sock.recv(1) == b""  # hung up on us at once
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 1 << 20
    assert_still_serving(srv, handler)
