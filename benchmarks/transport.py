"""Replication throughput: gemini's transport vs a raw loopback socket.

Both sides move the same preallocated bytes from this process to a receiver
process over 127.0.0.1 with the same chunk size; the raw side does plain
sendall / recv_into, the transport adds framing, per-chunk xxh3_64 on both
ends and the commit acknowledgement (the handshake is paid once, before the
clock starts, as per-step replication reuses one connection). Runs alternate
so both see the same machine state.

Two ratios are printed. Throughput (median of the runs) is what a trainer
sees but swings with whatever else the machine is doing. CPU seconds per GiB
summed over both ends is steadier under load: it is the throughput ratio of a
transfer that is fully CPU-bound (a busy 2-core machine), and so a pessimistic
bound on an idle one, where the two ends' checksums partly overlap.

    .venv/bin/python benchmarks/transport.py --size-mib 1024 --repeats 7
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

from gemini.cluster.transport import TransportClient, TransportServer

SECRET = b"benchmark-secret-0123456789"


class _Slot:
    """A preallocated, already-touched receive buffer reused for every put;
    reports the receiving process's CPU time per put through `pipe`."""

    def __init__(self, size: int, pipe: Connection) -> None:
        self._view = memoryview(bytearray(b"\x01") * size)  # touch every page up front
        self._pipe = pipe
        self.cpu0 = 0.0

    def buffer(self) -> memoryview:
        return self._view

    def commit(self, manifest_json: bytes) -> None:
        # Sent before the ACK, so the sender can read it as soon as put returns.
        self._pipe.send(time.process_time() - self.cpu0)

    def abort(self, reason: str) -> None:
        raise RuntimeError(f"benchmark transfer aborted: {reason}")


class _OneSlotHandler:
    def __init__(self, slot: _Slot) -> None:
        self._slot = slot

    def begin_put(self, source: int, step: int, data_len: int, manifest_len: int) -> _Slot:
        self._slot.cpu0 = time.process_time()
        return self._slot

    def get(self, source: int, step: int | None) -> tuple[bytes, memoryview] | None:
        return None

    def list(self) -> dict[Any, Any]:
        return {}


def _transport_receiver(size: int, pipe: Connection) -> None:
    with TransportServer(SECRET, _OneSlotHandler(_Slot(size, pipe))) as server:
        pipe.send(server.port)
        pipe.recv()  # run until the parent says stop


def _raw_receiver(size: int, chunk: int, rounds: int, pipe: Connection) -> None:
    buf = memoryview(bytearray(b"\x01") * size)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        pipe.send(listener.getsockname()[1])
        conn, _ = listener.accept()
        with conn:
            for _ in range(rounds):
                cpu0 = time.process_time()
                got = 0
                while got < size:
                    n = conn.recv_into(buf[got : got + chunk])
                    if n == 0:
                        return
                    got += n
                pipe.send(time.process_time() - cpu0)
                conn.sendall(b"k")  # so the sender's clock stops at delivery


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    size, chunk = args.size_mib << 20, args.chunk_mib << 20
    data = memoryview(bytearray(os.urandom(1 << 20)) * args.size_mib)

    ctx = mp.get_context("fork")  # no threads exist yet in this process
    raw_pipe, raw_child = ctx.Pipe()
    tr_pipe, tr_child = ctx.Pipe()
    raw_proc = ctx.Process(target=_raw_receiver, args=(size, chunk, args.repeats, raw_child))
    tr_proc = ctx.Process(target=_transport_receiver, args=(size, tr_child))
    raw_proc.start()
    tr_proc.start()
    raw_sock = socket.create_connection(("127.0.0.1", raw_pipe.recv()))
    raw_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client = TransportClient("127.0.0.1", tr_pipe.recv(), SECRET, timeout_s=60)
    client.connect()

    wall: dict[str, list[float]] = {"raw": [], "transport": []}
    cpu: dict[str, list[float]] = {"raw": [], "transport": []}
    for step in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for off in range(0, size, chunk):
            raw_sock.sendall(data[off : off + chunk])
        assert raw_sock.recv(1) == b"k"
        wall["raw"].append(time.perf_counter() - t0)
        cpu["raw"].append(time.process_time() - c0 + raw_pipe.recv())

        t0, c0 = time.perf_counter(), time.process_time()
        client.put(0, step, b'{"bench":true}', data, chunk_bytes=chunk)
        wall["transport"].append(time.perf_counter() - t0)
        cpu["transport"].append(time.process_time() - c0 + tr_pipe.recv())

    client.close()
    raw_sock.close()
    tr_pipe.send("stop")
    raw_proc.join(10)
    tr_proc.join(10)

    gib = size / (1 << 30)
    gbs = {k: size / statistics.median(v) / 1e9 for k, v in wall.items()}
    cpu_gib = {k: statistics.median(v) / gib for k, v in cpu.items()}
    print(f"payload {args.size_mib} MiB, chunk {args.chunk_mib} MiB, {args.repeats} runs each")
    for name, label in (("raw", "raw socket sendall/recv_into"), ("transport", "gemini put")):
        print(f"{label:28s}: {gbs[name]:5.2f} GB/s, {cpu_gib[name]:5.3f} CPU s/GiB (both ends)")
    print(
        f"ratio transport/raw, throughput : {gbs['transport'] / gbs['raw']:5.3f}  (target >= 0.7)"
    )
    print(f"ratio transport/raw, CPU cost   : {cpu_gib['raw'] / cpu_gib['transport']:5.3f}")


if __name__ == "__main__":
    main()
