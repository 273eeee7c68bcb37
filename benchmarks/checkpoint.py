"""Checkpoint backends: each path's speed as a fraction of the raw path, measured in one run.

Four comparisons, each between gemini's path and the plain hardware path doing
the same bytes on the same machine in the same run (this machine is shared
and loaded, so only ratios mean anything):

1. **snapshot** — what ``backend=memory``/``replicated`` does per step: a
   :class:`~gemini.checkpoint.slot.SlotSet` slot in /dev/shm,
   ``format.write_checksummed`` of a real training state (a model plus its
   AdamW moments after one step: copy and checksum in one pass),
   ``SlotSet.commit`` — against one ``copy_`` of the same number of bytes
   into a preallocated, touched buffer. Target: bandwidth ratio >= 0.7. For
   contrast it also prints the ratio of the two-pass path (``write_state``,
   then ``checksum`` over the slot), which the backend used before. Both use one torch thread, as a
   trainer rank does (``cluster.threads_per_rank=1``).
2. **replication** — a put in ranges (``TransportClient.begin_put``, one
   ``send_range`` per chunk, ``finish``, handing over the snapshot's own
   digests as the replicated backend does) into a real ``TransportServer``
   in another process whose handler receives into a SlotSet slot (the agent's
   path: ``begin_write``, ranges received straight into the slot and hashed
   as they land, ``commit_raw``) — against a raw loopback socket
   ``sendall``/``recv_into`` of the same bytes (the raw receiver of
   ``benchmarks/transport.py``). Target >= 0.9. ``--staging-mib`` and
   ``--subbuffers`` measure the holder's staged receive instead.
3. **disk** — ``DiskStore.write`` against ``os.write`` + ``fsync`` of the same
   bytes (``benchmarks/disk.py``'s measurement). Target >= 0.8.
4. **end to end** — ``gemini.experiment.run`` on 4 nodes x 1 rank with
   ``backend=none``, ``replicated`` (m=2, every iteration) and ``disk`` (every
   iteration, for contrast), tracking off, no failures. Reports the mean
   iteration time of ``none`` and each backend's mean checkpoint stall as a
   percentage of it (target for replicated <= 5 %), and
   ``overhead_pct = (iter_time(backend) / iter_time(none) - 1) * 100``.
   Jobs run one after another, so other tenants' load can swing one job's
   iteration time by tens of percent: the three jobs run in ``--rounds``
   rounds (order reversed every round) and medians are compared. The stall
   share is measured inside each job and is the steadier of the two.

Parts 1-3 alternate the two paths every repetition and compare medians of
wall-clock time; beside that ratio the table gives the same ratio in CPU
seconds (thread CPU time for part 1, both processes' for part 2), which leaves
out time spent descheduled and is what an idle machine would show.

Run from the repository root (``python benchmarks/checkpoint.py`` works too)::

    .venv/bin/python -m benchmarks.checkpoint            # full: gpt_small, ~20 min
    .venv/bin/python -m benchmarks.checkpoint --quick    # small sizes, few steps, ~3 min

The last thing printed is a markdown table to paste into the README.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import statistics
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

try:
    from benchmarks.disk import _payload as payload
    from benchmarks.disk import overhead as disk_overhead
    from benchmarks.transport import SECRET, _raw_receiver
except ModuleNotFoundError:  # run as a script, as `make bench` does: siblings are top level
    from disk import _payload as payload  # type: ignore[no-redef]
    from disk import overhead as disk_overhead  # type: ignore[no-redef]
    from transport import SECRET, _raw_receiver  # type: ignore[no-redef]
from gemini.checkpoint import format as fmt
from gemini.checkpoint.node_memory import _SlotTarget
from gemini.checkpoint.slot import SlotSet, manifest_capacity_for
from gemini.config import GeminiConfig

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- shared helpers


def machine() -> str:
    """Cores, CPU model and RAM of this machine, for every header."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    return (
        f"{socket.gethostname()}: {os.cpu_count()} cores, {model}, {ram:.0f} GiB RAM "
        f"(load average {load:.1f} at start)"
    )


def compose(overrides: list[str]) -> GeminiConfig:
    """The typed config of ``conf/config.yaml`` with these overrides (no Hydra run dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gemini.cli import CONF
    from gemini.config import register_configs, to_schema

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return to_schema(hydra_compose("config", overrides=overrides))
    finally:
        GlobalHydra.instance().clear()


def run_job(overrides: list[str], outputs: Path, label: str) -> dict[str, Any]:
    """One ``experiment.run`` with tracking and progress off, its outputs under ``outputs``."""
    from gemini.experiment import run

    cfg = compose([*overrides, "tracking=off", "progress=false", f"paths.outputs={outputs}"])
    job_dir = outputs / "runs" / f"{label}-{uuid.uuid4().hex[:6]}"
    print(f"  running {label}: {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    summary = run(cfg, job_dir=job_dir)
    print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)
    # Checkpoints of a finished run are not needed and can be GBs.
    shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)
    return summary


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def add_saved_results_args(ap: argparse.ArgumentParser, markdown_help: str) -> None:
    """``--save``/``--from``/``--markdown``: a benchmark's tables can be
    reprinted from the measurements it saved, without measuring again."""
    ap.add_argument("--save", metavar="JSON", help="also write the measurements to this file")
    ap.add_argument(
        "--from",
        dest="from_json",
        metavar="JSON",
        help="measure nothing: print the tables of a file written by --save",
    )
    ap.add_argument("--markdown", action="store_true", help=markdown_help)


def measured_or_saved(a: argparse.Namespace, measure: Callable[[argparse.Namespace], Any]) -> Any:
    """The results named by ``--from``, or fresh ones (written to ``--save`` if asked)."""
    if a.from_json:
        return json.loads(Path(a.from_json).read_text())
    results = measure(a)
    if a.save:
        Path(a.save).write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"measurements saved to {a.save} (reprint with --from {a.save})")
    return results


def _alternating(
    a: Callable[[], tuple[float, float]], b: Callable[[], tuple[float, float]], repeat: int
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Run ``a`` and ``b`` ``repeat`` times each, alternating which goes first, so drift
    in the machine's load falls on both alike."""
    ra: list[tuple[float, float]] = []
    rb: list[tuple[float, float]] = []
    for i in range(repeat):
        if i % 2:
            rb.append(b())
            ra.append(a())
        else:
            ra.append(a())
            rb.append(b())
    return ra, rb


def _median(pairs: list[tuple[float, float]], i: int) -> float:
    return statistics.median(p[i] for p in pairs)


@dataclass
class Row:
    what: str
    ours: str
    baseline: str
    value: float
    unit: str
    target: str
    met: bool | None
    """None: no target, shown for contrast."""
    cpu_ratio: float | None = None
    """The same ratio in CPU seconds (what an idle machine would show), where measured."""

    def cells(self) -> list[str]:
        v = f"{self.value:.3g}" if self.unit == "x" else f"{self.value:+.1f} %"
        cpu = "-" if self.cpu_ratio is None else f"{self.cpu_ratio:.3g}"
        met = "-" if self.met is None else "yes" if self.met else "NO"
        return [self.what, self.ours, self.baseline, v, cpu, self.target, met]


# --------------------------------------------------------------------------- 1. snapshot


def training_state(model: str) -> dict[str, torch.Tensor]:
    """The checkpointed tensors of a real one-rank training state after one step."""
    from gemini.workload.state import TrainState

    cfg = compose([f"model={model}", "backend=none", "failure=none"])
    state = TrainState(cfg, 0, 1, torch.device("cpu"))
    state.forward_backward()
    state.optimizer_step()  # AdamW creates its moments at the first step
    return state.tensors()


def snapshot(model: str, repeat: int, chunk: int) -> Row:
    tensors = training_state(model)
    entries, nbytes = fmt.layout(tensors)
    name = f"gemini-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    slots = SlotSet.create(name, nbytes, manifest_capacity_for(len(entries), nbytes, chunk))
    # The reference: one copy_ of the same bytes between touched buffers.
    src = torch.empty(nbytes, dtype=torch.uint8)
    fmt.write_state(tensors, entries, src)
    dst = torch.ones(nbytes, dtype=torch.uint8)
    parts: dict[str, list[float]] = {"write_checksummed": [], "commit": []}
    two_pass: list[tuple[float, float]] = []
    step = [0]

    def commit(idx: int, sums: list[str]) -> None:
        manifest = fmt.Manifest(
            step=step[0],
            rank=0,
            world_size=1,
            config_hash="bench",
            tensors=entries,
            data_nbytes=nbytes,
            chunk_bytes=chunk,
            checksums=sums,
            extra={"step": step[0]},
        )
        slots.commit(idx, manifest)

    def gemini_path() -> tuple[float, float]:
        step[0] += 1
        c0, t0 = time.thread_time(), time.perf_counter()
        idx = slots.begin_write(step[0], nbytes)
        sums = fmt.write_checksummed(tensors, entries, slots.data_tensor(idx), chunk)
        t1 = time.perf_counter()
        commit(idx, sums)
        t2 = time.perf_counter()
        parts["write_checksummed"].append(t1 - t0)
        parts["commit"].append(t2 - t1)
        return t2 - t0, time.thread_time() - c0

    def two_pass_path() -> tuple[float, float]:
        step[0] += 1
        c0, t0 = time.thread_time(), time.perf_counter()
        idx = slots.begin_write(step[0], nbytes)
        buf = slots.data_tensor(idx)
        fmt.write_state(tensors, entries, buf)
        commit(idx, fmt.checksum(buf, nbytes, chunk))
        return time.perf_counter() - t0, time.thread_time() - c0

    def plain_copy() -> tuple[float, float]:
        c0, t0 = time.thread_time(), time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - t0, time.thread_time() - c0

    try:
        gemini_path(), plain_copy()  # warm both (slot pages, allocator)
        for p in parts.values():
            p.clear()
        ours, ref = _alternating(gemini_path, plain_copy, repeat)
        two_pass, ref2 = _alternating(two_pass_path, plain_copy, max(3, repeat // 2))
    finally:
        slots.close()
        slots.unlink()
    t_ours, t_ref = _median(ours, 0), _median(ref, 0)
    ratio = t_ref / t_ours
    cpu_ratio = _median(ref, 1) / _median(ours, 1)
    print(
        f"1. snapshot of a {model} state: {len(entries)} tensors, {nbytes / 2**20:.0f} MiB, "
        f"median of {repeat}, torch threads {torch.get_num_threads()}"
    )
    print(f"   copy_ into a preallocated buffer  {nbytes / t_ref / 1e9:6.2f} GB/s")
    print(f"   SlotSet write_checksummed+commit  {nbytes / t_ours / 1e9:6.2f} GB/s")
    for k, v in parts.items():
        print(f"     {k:<17} {statistics.median(v) / t_ours * 100:5.1f} % of it")
    print(
        f"   two passes (write_state, then checksum): ratio "
        f"{_median(ref2, 0) / _median(two_pass, 0):.3f}, for contrast"
    )
    print(
        f"   ratio {ratio:.3f} (target >= 0.7); in CPU seconds {cpu_ratio:.3f} "
        "(steadier on a loaded machine: descheduled time is not counted)"
    )
    return Row(
        f"snapshot into a shm slot ({model}, {nbytes / 2**20:.0f} MiB)",
        f"{nbytes / t_ours / 1e9:.2f} GB/s",
        f"copy_ {nbytes / t_ref / 1e9:.2f} GB/s",
        ratio,
        "x",
        ">= 0.7",
        ratio >= 0.7,
        cpu_ratio,
    )


# --------------------------------------------------------------------------- 2. replication


class _TimedTarget(_SlotTarget):
    """The agent's put target, reporting the receiver's CPU seconds per put."""

    def __init__(self, slots: SlotSet, idx: int, data_len: int, pipe: Connection) -> None:
        super().__init__(slots, idx, data_len, lambda: None)
        self.pipe, self.cpu0 = pipe, time.process_time()

    def commit(self, manifest_json: bytes) -> None:
        super().commit(manifest_json)
        self.pipe.send(time.process_time() - self.cpu0)


class _SlotHandler:
    """What ``MemoryServices`` does for a put: receive into the source's SlotSet."""

    def __init__(self, slots: SlotSet, pipe: Connection) -> None:
        self.slots, self.pipe = slots, pipe

    def begin_put(self, source: int, step: int, data_len: int, manifest_len: int) -> _TimedTarget:
        return _TimedTarget(self.slots, self.slots.begin_write(step, data_len), data_len, self.pipe)

    def get(self, source: int, step: int | None) -> tuple[bytes, memoryview] | None:
        return None

    def list(self) -> dict[Any, Any]:
        return {}


def _slot_receiver(size: int, manifest_cap: int, pipe: Connection) -> None:
    from gemini.cluster.transport import TransportServer

    name = f"gemini-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    slots = SlotSet.create(name, size, manifest_cap)
    try:
        with TransportServer(SECRET, _SlotHandler(slots, pipe)).start() as server:
            pipe.send(server.port)
            pipe.recv()  # until the parent says stop
    finally:
        slots.close()
        slots.unlink()


def replication(
    mib: int, repeat: int, chunk: int, subbuffers: int = 1, staging_bytes: int = 0
) -> Row:
    from gemini.cluster.transport import TransportClient

    size = mib << 20
    manifest, tensor = payload(size, chunk)
    data = memoryview(tensor.numpy())
    ctx = mp.get_context("spawn")  # torch threads exist here: no fork
    raw_pipe, raw_child = ctx.Pipe()
    tr_pipe, tr_child = ctx.Pipe()
    # One extra round each: the first transfer of either path is a warm-up.
    raw_proc = ctx.Process(target=_raw_receiver, args=(size, chunk, repeat + 1, raw_child))
    mcap = manifest_capacity_for(1, size, chunk)
    tr_proc = ctx.Process(target=_slot_receiver, args=(size, mcap, tr_child))
    raw_proc.start()
    tr_proc.start()
    wall: dict[str, list[float]] = {"raw": [], "gemini": []}
    cpu: dict[str, list[float]] = {"raw": [], "gemini": []}
    try:
        raw_sock = socket.create_connection(("127.0.0.1", raw_pipe.recv()))
        raw_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = TransportClient("127.0.0.1", tr_pipe.recv(), SECRET, timeout_s=120)
        client.connect()  # the handshake is paid once per holder, not per step

        def raw() -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            for off in range(0, size, chunk):
                raw_sock.sendall(data[off : off + chunk])
            assert raw_sock.recv(1) == b"k"
            return time.perf_counter() - t0, time.process_time() - c0 + raw_pipe.recv()

        def put(step: int) -> tuple[float, float]:
            manifest.step = step
            body = manifest.to_json()
            t0, c0 = time.perf_counter(), time.process_time()
            stream = client.begin_put(
                0,
                step,
                body,
                size,
                checksums=manifest.checksums,
                checksum_bytes=manifest.chunk_bytes,
                subbuffers=subbuffers,
                staging_bytes=staging_bytes,
            )
            rng = min(chunk, stream.max_range_bytes)
            for off in range(0, size, rng):
                stream.send_range(off, data[off : off + rng])
            stream.finish()
            return time.perf_counter() - t0, time.process_time() - c0 + tr_pipe.recv()

        raw(), put(0)
        for i in range(1, repeat + 1):
            for which in ("raw", "gemini") if i % 2 else ("gemini", "raw"):
                w, c = raw() if which == "raw" else put(i)
                wall[which].append(w)
                cpu[which].append(c)
        client.close()
        raw_sock.close()
    finally:
        tr_pipe.send("stop")
        for p in (raw_proc, tr_proc):
            p.join(20)
            if p.is_alive():
                p.kill()
    gbs = {k: size / statistics.median(v) / 1e9 for k, v in wall.items()}
    cpu_gib = {k: statistics.median(v) / (size / 2**30) for k, v in cpu.items()}
    ratio = gbs["gemini"] / gbs["raw"]
    how = (
        f"staged through {subbuffers} x {staging_bytes // subbuffers >> 20} MiB"
        if staging_bytes
        else "straight into the slot"
    )
    print(
        f"2. replication of {mib} MiB over loopback, {chunk >> 20} MiB chunks, {how}, "
        f"median of {repeat}"
    )
    for k, label in (("raw", "raw socket sendall/recv_into"), ("gemini", "ranged put into a slot")):
        print(f"   {label:<30} {gbs[k]:6.2f} GB/s  {cpu_gib[k]:.3f} CPU s/GiB (both ends)")
    print(
        f"   ratio {ratio:.2f} (target >= 0.9); CPU-cost ratio "
        f"{cpu_gib['raw'] / cpu_gib['gemini']:.2f} (steadier on a loaded machine)"
    )
    return Row(
        f"replication put into a SlotSet ({mib} MiB)",
        f"{gbs['gemini']:.2f} GB/s",
        f"raw socket {gbs['raw']:.2f} GB/s",
        ratio,
        "x",
        ">= 0.9",
        ratio >= 0.9,
        cpu_gib["raw"] / cpu_gib["gemini"],
    )


# --------------------------------------------------------------------------- 3. disk


def disk(base: Path, mib: int, repeat: int, chunk: int) -> Row:
    print("3. disk (benchmarks/disk.py part 1)")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ratio = disk_overhead(base / "disk", mib, repeat, chunk)
    print(textwrap.indent(out.getvalue().rstrip(), "  "))
    # disk.py prints each writer's median throughput; the table wants them too.
    rate = dict(
        re.findall(r"(raw write\+fsync|DiskStore\.write) .*\(([\d.]+) GB/s\)", out.getvalue())
    )
    return Row(
        f"DiskStore.write ({mib} MiB)",
        f"{rate.get('DiskStore.write', '?')} GB/s",
        f"raw write+fsync {rate.get('raw write+fsync', '?')} GB/s",
        ratio,
        "x",
        ">= 0.8",
        ratio >= 0.8,
    )


# --------------------------------------------------------------------------- 4. end to end


E2E_BACKENDS: dict[str, list[str]] = {
    "none": ["backend=none"],
    "replicated": ["backend=replicated", "backend.every_n=1", "backend.replication.factor=2"],
    "disk": ["backend=disk", "backend.cadence=every_n", "backend.every_n=1"],
}


def end_to_end(base: Path, model: str, steps: int, rounds: int) -> list[Row]:
    print(
        f"4. end to end: {model}, 4 nodes x 1 rank, {steps} steps, no failures, "
        f"{rounds} round(s) in alternating order"
    )
    common = [f"model={model}", "cluster.nodes=4", "failure=none", f"train.steps={steps}"]
    done: dict[str, list[dict[str, Any]]] = {name: [] for name in E2E_BACKENDS}
    for i in range(rounds):
        # Other tenants' load drifts over minutes: alternate the order so that
        # no backend always runs first or last.
        order = list(E2E_BACKENDS) if i % 2 == 0 else list(reversed(E2E_BACKENDS))
        for name in order:
            done[name].append(run_job([*common, *E2E_BACKENDS[name]], base, name))

    def med(name: str, key: str) -> float:
        return statistics.median(float(s[key] or 0.0) for s in done[name])

    runs = {name: {**ss[-1], "iter_time_s": med(name, "iter_time_s")} for name, ss in done.items()}
    for name in ("replicated", "disk"):
        runs[name]["ckpt_stall_s"] = med(name, "ckpt_stall_s")
    t_none = float(runs["none"]["iter_time_s"])
    print(
        f"   none: mean iteration {t_none:.3f} s (steady steps, mean over ranks; median of "
        f"{rounds} run(s) where more)"
    )
    for name, ss in done.items():
        its = ", ".join(f"{float(x['iter_time_s']):.3f}" for x in ss)
        print(f"   {name:<10}: iteration time of each run {its} s")
    rows: list[Row] = []
    for name in ("replicated", "disk"):
        s = runs[name]
        stall, it = float(s["ckpt_stall_s"] or 0.0), float(s["iter_time_s"])
        stall_pct = stall / t_none * 100
        over = (it / t_none - 1) * 100
        mib = (s.get("ckpt_bytes") or 0) / 4 / 2**20
        print(
            f"   {name:<10}: iteration {it:.3f} s, stall {stall:.4f} s = {stall_pct:.1f} % of "
            f"none's iteration, overhead_pct {over:+.1f} %, {s['checkpoints']} checkpoints "
            f"of {mib:.0f} MiB/rank, local {s.get('ckpt_local_s') or 0:.3f} s, "
            f"replicate {s.get('ckpt_replicate_s') or 0:.3f} s, "
            f"persist {s.get('ckpt_persist_s') or 0:.3f} s"
        )
        label = (
            "replicated m=2, every iteration" if name == "replicated" else "disk, every iteration"
        )
        target = "<= 5 %" if name == "replicated" else "-"
        ok = stall_pct <= 5 if name == "replicated" else None
        rows.append(
            Row(
                f"{label}: stall / iter(none)",
                f"{stall:.3f} s",
                f"iter(none) {t_none:.3f} s",
                stall_pct,
                "%",
                target,
                ok,
            )
        )
        rows.append(
            Row(
                f"{label}: overhead_pct",
                f"iter {it:.3f} s",
                f"iter(none) {t_none:.3f} s",
                over,
                "%",
                "-",
                None,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes and few steps (~2-5 min)")
    ap.add_argument("--model", help="e2e workload (default gpt_small; gpt_tiny with --quick)")
    ap.add_argument("--steps", type=int, help="e2e steps per backend (default 18; 8 with --quick)")
    ap.add_argument(
        "--rounds",
        type=int,
        help="e2e rounds of the three jobs, alternating order, medians (default 2; 1 quick)",
    )
    ap.add_argument("--snapshot-model", default="gpt_small", help="state measured in part 1")
    ap.add_argument("--repeat", type=int, help="repetitions of parts 1-3 (default 7; 3 quick)")
    ap.add_argument("--xfer-mib", type=int, help="part 2 payload (default 512; 128 quick)")
    ap.add_argument("--disk-mib", type=int, help="part 3 payload (default 512; 128 quick)")
    ap.add_argument("--chunk-mib", type=int, default=4, help="checksum chunk, MiB")
    ap.add_argument(
        "--staging-mib", type=int, default=0, help="part 2: holder's staging (0: into the slot)"
    )
    ap.add_argument("--subbuffers", type=int, default=1, help="part 2: staging sub-buffers")
    ap.add_argument("--only-replication", action="store_true", help="part 2 only")
    ap.add_argument("--skip-e2e", action="store_true", help="only the micro-benchmarks")
    ap.add_argument("--dir", default=None, help="scratch dir on the disk to measure")
    a = ap.parse_args(argv)
    q = a.quick
    model = a.model or ("gpt_tiny" if q else "gpt_small")
    steps = a.steps or (8 if q else 18)
    rounds = max(1, a.rounds or (1 if q else 2))
    repeat = a.repeat or (3 if q else 7)
    xfer = a.xfer_mib or (128 if q else 512)
    disk_mib = a.disk_mib or (128 if q else 512)
    chunk = a.chunk_mib << 20
    torch.set_num_threads(1)  # a trainer rank runs with threads_per_rank=1

    header = f"machine: {machine()}; mode: {'quick' if q else 'full'}"
    print(header, flush=True)
    # The replicated backend sends in chunks of at least 8 MiB.
    part2 = (xfer, repeat, max(chunk, 8 << 20), a.subbuffers, a.staging_mib << 20)
    if a.only_replication:
        print(markdown(["measurement", "gemini", "reference"], [replication(*part2).cells()[:3]]))
        return
    rows = [snapshot(a.snapshot_model, repeat, chunk)]
    rows.append(replication(*part2))
    with tempfile.TemporaryDirectory(prefix="gemini-ckpt-bench-", dir=a.dir) as tmp:
        rows.append(disk(Path(tmp), disk_mib, repeat, chunk))
        if not a.skip_e2e:
            rows += end_to_end(Path(tmp), model, steps, rounds)
    print(f"\n### Checkpoint backends vs the raw path ({'quick' if q else 'full'} mode)\n")
    print(f"Measured on {header.removeprefix('machine: ')}; every ratio within one run.\n")
    print(
        markdown(
            [
                "measurement",
                "gemini",
                "reference (same run)",
                "ratio / share",
                "CPU-time ratio",
                "target",
                "met",
            ],
            [r.cells() for r in rows],
        )
    )


if __name__ == "__main__":
    main()
