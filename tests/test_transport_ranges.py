"""Puts in ranges: the sender paces the ranges, the holder commits only after FINISH.

Real sockets on 127.0.0.1, real server threads, the in-memory holder of
test_transport.py and a node's real shared-memory slots: every chunking lands
bitwise, straight into the slot or through 1, 2 or 4 staging sub-buffers;
ranges out of order, overlapping or overflowing are refused; a put that is
abandoned, cut off or never finished leaves no complete replica and the
holder's previous copy as it was; a corrupted range fails at FINISH.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_memory_backend import config_dict
from test_transport import SECRET, MemHandler, jframe, raw_peer, wait_until

from gemini.checkpoint import format as fmt
from gemini.checkpoint import slot as sl
from gemini.checkpoint.node_memory import MemoryServices
from gemini.cluster.job import JobSpec
from gemini.cluster.transport import (
    FrameType,
    TransportClient,
    TransportError,
    TransportServer,
    checksum,
    pack_header,
    recv_frame,
    send_frame,
)
from gemini.cluster.transport.wire import RANGE_PREFIX, Refused

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

SIZE = 100_003  # no power of two divides it
GRID = 16 << 10  # the "snapshot's" checksum chunk


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def handler() -> MemHandler:
    return MemHandler()


@pytest.fixture
def server(handler: MemHandler) -> Iterator[TransportServer]:
    with TransportServer(SECRET, handler, io_timeout_s=2.0) as srv:
        yield srv


@pytest.fixture
def client(server: TransportServer) -> Iterator[TransportClient]:
    with TransportClient("127.0.0.1", server.port, SECRET, timeout_s=5) as c:
        yield c


def send_in(stream_client: TransportClient, data: bytes, chunk: int, **kw: object) -> float:
    stream = stream_client.begin_put(3, 9, b'{"m":1}', len(data), **kw)  # type: ignore[arg-type]
    with stream:
        for off in range(0, len(data), chunk):
            stream.send_range(off, memoryview(data)[off : off + chunk])
        return stream.finish()


# ------------------------------------------------------------------ chunkings


@pytest.mark.parametrize("chunk", [SIZE, 3001, 257], ids=["one-range", "uneven", "many-small"])
@pytest.mark.parametrize("subbuffers", [1, 2, 4])
@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
@pytest.mark.parametrize("digests", [True, False], ids=["snapshot-digests", "hashed-on-send"])
def test_every_chunking_lands_bitwise(
    client: TransportClient,
    handler: MemHandler,
    chunk: int,
    subbuffers: int,
    staged: bool,
    digests: bool,
) -> None:
    data = payload(SIZE, chunk + subbuffers)
    kw: dict[str, object] = {"subbuffers": subbuffers, "checksum_bytes": GRID}
    if staged:
        kw["staging_bytes"] = chunk * subbuffers
    if digests:
        kw["checksums"] = fmt.checksum(data, len(data), GRID)
    send_in(client, data, chunk, **kw)
    manifest, buf = handler.complete[3][9]
    assert manifest == b'{"m":1}' and bytes(buf[:SIZE]) == data
    assert handler.events_for(3, 9) == [("commit", manifest)]


def test_ranges_sent_from_another_thread_with_pauses(
    client: TransportClient, handler: MemHandler
) -> None:
    data = payload(SIZE, 1)
    stream = client.begin_put(3, 2, b"{}", SIZE, subbuffers=2, staging_bytes=2 * 8192)
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            for off in range(0, SIZE, 8192):
                time.sleep(0.002)  # an idle span's worth of waiting
                stream.send_range(off, data[off : off + 8192])
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=sender)
    t.start()
    t.join(10)
    assert not errors, errors
    assert stream.finish() > 0
    assert bytes(handler.complete[3][2][1][:SIZE]) == data


def test_empty_put_and_the_one_call_put_still_work(
    client: TransportClient, handler: MemHandler
) -> None:
    client.begin_put(1, 1, b"{}", 0).finish()
    assert handler.events_for(1, 1) == [("commit", b"{}")]
    data = payload(SIZE, 2)
    client.put(1, 2, b"{}", data, chunk_bytes=4096, subbuffers=4, staging_bytes=4 * 1000)
    assert bytes(handler.complete[1][2][1][:SIZE]) == data


# ------------------------------------------------------------------ refusals


def test_the_client_refuses_bad_ranges_before_sending_and_the_put_goes_on(
    client: TransportClient, handler: MemHandler
) -> None:
    data = payload(SIZE, 3)
    stream = client.begin_put(2, 4, b"{}", SIZE, subbuffers=2, staging_bytes=20_000)
    stream.send_range(0, data[:5000])
    with pytest.raises(ValueError, match="must start at 5000"):
        stream.send_range(6000, data[6000:7000])  # a gap
    with pytest.raises(ValueError, match="must start at 5000"):
        stream.send_range(4000, data[4000:9000])  # an overlap
    with pytest.raises(ValueError, match="exceeds the 10000-byte limit"):
        stream.send_range(5000, data[5000:15001])  # bigger than a sub-buffer
    with pytest.raises(ValueError, match="after 5000 of 100003 bytes"):
        stream.finish()
    with pytest.raises(RuntimeError, match="still open on this connection"):
        client.list()
    for off in range(5000, SIZE, 10_000):
        stream.send_range(off, data[off : off + 10_000])
    with pytest.raises(ValueError, match="overflows"):
        stream.send_range(SIZE, b"x")
    stream.finish()
    assert bytes(handler.complete[2][4][1][:SIZE]) == data


def open_raw_put(port: int, data_len: int, **extra: int) -> socket.socket:
    sock = raw_peer(port)
    head = {
        "source": 5,
        "step": 1,
        "data_len": data_len,
        "manifest_len": 2,
        "checksum_bytes": GRID,
        "subbuffers": 1,
        "staging_bytes": 0,
        **extra,
    }
    sock.sendall(jframe(FrameType.PUT_OPEN, head))
    assert recv_frame(sock, {FrameType.READY})[0] == FrameType.READY
    send_frame(sock, FrameType.MANIFEST, b"{}")
    return sock


def raw_range(offset: int, data: bytes) -> bytes:
    prefix = RANGE_PREFIX.pack(offset)
    return pack_header(FrameType.RANGE, len(prefix) + len(data), checksum(prefix)) + prefix + data


@pytest.mark.parametrize(
    ("ranges", "error"),
    [
        ([(0, 1000), (2000, 1000)], "range at offset 2000.*must start at 1000"),
        ([(0, 1000), (500, 1000)], "range at offset 500.*must start at 1000"),
        ([(1000, 1000)], "range at offset 1000.*must start at 0"),
        ([(0, 4000), (4000, 1001)], r"range \[4000, 5001\) overflows the 5000-byte put"),
    ],
    ids=["gap", "overlap", "not-from-zero", "overflow"],
)
def test_the_holder_refuses_bad_ranges_from_a_raw_peer(
    server: TransportServer, handler: MemHandler, ranges: list[tuple[int, int]], error: str
) -> None:
    data = payload(6000, 4)
    with open_raw_put(server.port, 5000) as sock:
        for off, n in ranges:
            sock.sendall(raw_range(off, data[off : off + n]))
        ftype, body = recv_frame(sock, {FrameType.ACK})
        assert ftype == FrameType.ERROR
        assert re.search(error, body.decode()), body
    wait_until(lambda: bool(handler.events_for(5, 1)))
    [(kind, _)] = handler.events_for(5, 1)
    assert kind == "abort" and 5 not in handler.complete
    with TransportClient("127.0.0.1", server.port, SECRET) as c:  # still serving
        c.put(5, 2, b"{}", b"fine")


def test_a_staged_range_larger_than_its_sub_buffer_is_refused(
    server: TransportServer, handler: MemHandler
) -> None:
    with open_raw_put(server.port, 5000, subbuffers=2, staging_bytes=2000) as sock:
        sock.sendall(raw_range(0, bytes(1001)))
        ftype, body = recv_frame(sock, {FrameType.ACK})
        assert ftype == FrameType.ERROR and b"exceeds the 1000-byte staging sub-buffer" in body
    wait_until(lambda: bool(handler.events_for(5, 1)))
    assert handler.events_for(5, 1)[0][0] == "abort"


def test_finish_before_the_last_byte_commits_nothing(
    server: TransportServer, handler: MemHandler
) -> None:
    with open_raw_put(server.port, 5000) as sock:
        sock.sendall(raw_range(0, bytes(4000)))
        send_frame(sock, FrameType.FINISH, bytes(8))
        ftype, body = recv_frame(sock, {FrameType.ACK})
        assert ftype == FrameType.ERROR and b"after 4000 of 5000 bytes" in body
        send_frame(sock, FrameType.LIST)  # the connection stayed in step
        assert recv_frame(sock, {FrameType.LIST_REPLY})[0] == FrameType.LIST_REPLY
    assert handler.events_for(5, 1)[0][0] == "abort"


@pytest.mark.parametrize("staging", [0, 2 * 8192], ids=["direct", "staged"])
def test_a_corrupted_range_fails_at_finish_and_the_connection_stays(
    client: TransportClient, handler: MemHandler, staging: int
) -> None:
    data = payload(SIZE, 5)
    sums = fmt.checksum(data, SIZE, GRID)
    bad = bytearray(data)
    bad[GRID + 17] ^= 0x40  # in chunk 1
    with pytest.raises(Refused, match=r"checksum mismatch in chunk 1 \(bytes \[16384, 32768\)\)"):
        send_in(
            client,
            bytes(bad),
            8192,
            checksums=sums,
            checksum_bytes=GRID,
            subbuffers=2,
            staging_bytes=staging,
        )
    assert handler.events_for(3, 9)[0][0] == "abort" and 3 not in handler.complete
    client.put(3, 10, b"{}", data)  # same connection, in step
    assert bytes(handler.complete[3][10][1][:SIZE]) == data


# ------------------------------------------------------- abandoned puts, real slots


def encoded(step: int) -> tuple[bytes, bytes, list[str]]:
    """(manifest JSON, data, the manifest's digests) of a real checkpoint of ``SIZE`` bytes."""
    state = {"w": torch.frombuffer(bytearray(payload(SIZE, step)), dtype=torch.uint8)}
    entries, nbytes = fmt.layout(state)
    assert nbytes == SIZE
    buf = torch.empty(nbytes, dtype=torch.uint8)
    fmt.write_state(state, entries, buf)
    manifest = fmt.make_manifest(
        state,
        step=step,
        rank=0,
        world_size=2,
        config_hash="cfg",
        extra={},
        buf=memoryview(buf.numpy()),
        chunk_bytes=GRID,
    )
    return manifest.to_json(), bytes(buf.numpy()), manifest.checksums


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[MemoryServices]:
    """Node 1's real memory services holding rank 0's replica slots."""
    run_id = f"t{uuid.uuid4().hex[:9]}"
    job = JobSpec(
        run_id=run_id,
        job_dir=str(tmp_path),
        store="",
        secret_file="",
        config=config_dict(tmp_path, {"name": "replicated"}, nodes=2),
    )
    services = MemoryServices(job, node=1, store=None)  # type: ignore[arg-type]
    cap = sl.manifest_capacity_for(4, SIZE, GRID)
    services.sets[0] = sl.SlotSet.create(sl.shm_name(run_id, 1, 0, "replica"), SIZE, cap)
    yield services
    services.close()
    sl.unlink_prefix(f"gemini-{run_id}-")


def receiving_done(holder: MemoryServices) -> bool:
    with holder._put_free:
        return not holder._receiving


def assert_only_step_1(holder: MemoryServices, data: bytes) -> None:
    slots = holder.sets[0]
    [(step, idx)] = slots.complete_steps()
    assert step == 1
    assert bytes(slots.data_view(idx)[:SIZE]) == data


@pytest.mark.parametrize("how", ["connection-closed", "aborted", "never-finished"])
@pytest.mark.parametrize("staging", [0, 4 * 4096], ids=["direct", "staged"])
def test_an_abandoned_put_leaves_the_previous_replica_untouched(
    holder: MemoryServices, how: str, staging: int
) -> None:
    manifest, data, sums = encoded(1)
    with TransportServer(SECRET, holder, io_timeout_s=0.5) as srv:
        c = TransportClient("127.0.0.1", srv.port, SECRET)
        c.put(0, 1, manifest, data, checksums=sums, checksum_bytes=GRID)
        manifest2, data2, sums2 = encoded(2)
        stream = c.begin_put(
            0,
            2,
            manifest2,
            SIZE,
            checksums=sums2,
            checksum_bytes=GRID,
            subbuffers=4,
            staging_bytes=staging,
        )
        for off in range(0, SIZE // 2, 4096):
            stream.send_range(off, data2[off : off + 4096])
        if how == "connection-closed":
            c.close()
            with pytest.raises(RuntimeError, match="already failed"):
                stream.send_range(stream.sent, data2[stream.sent : stream.sent + 10])
        elif how == "aborted":
            stream.abort("the trainer moved on")
        else:
            time.sleep(0.8)  # past the holder's io timeout
        wait_until(lambda: receiving_done(holder))
        assert_only_step_1(holder, data)
        if how == "never-finished":
            # The sender learns of it on its next call; the holder already let go.
            with pytest.raises(TransportError, match="closed the connection"):
                stream.send_range(stream.sent, data2[stream.sent : stream.sent + 10])
        assert not stream.open
        c.close()


def test_a_killed_sender_process_leaves_no_complete_replica(holder: MemoryServices) -> None:
    """The sender is a real process killed mid-put (SIGKILL: no goodbye)."""
    import multiprocessing as mp

    manifest, data, sums = encoded(1)
    with TransportServer(SECRET, holder) as srv:
        with TransportClient("127.0.0.1", srv.port, SECRET) as c:
            c.put(0, 1, manifest, data, checksums=sums, checksum_bytes=GRID)
        ctx = mp.get_context("spawn")
        started = ctx.Event()
        p = ctx.Process(target=_half_a_put, args=(srv.port, started), daemon=True)
        p.start()
        assert started.wait(30), "the sender never began its put"
        p.kill()
        p.join(10)
        wait_until(lambda: receiving_done(holder), timeout_s=10)
        assert_only_step_1(holder, data)


def _half_a_put(port: int, started: object) -> None:
    manifest, data, sums = encoded(2)
    c = TransportClient("127.0.0.1", port, SECRET)
    stream = c.begin_put(0, 2, manifest, SIZE, checksums=sums, checksum_bytes=GRID)
    stream.send_range(0, data[:50_000])
    started.set()  # type: ignore[attr-defined]
    time.sleep(60)
