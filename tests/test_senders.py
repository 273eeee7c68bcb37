"""The replica senders: whole copies, and planned chunks sent as idle spans begin.

Real sockets on 127.0.0.1, real transport servers over two nodes' real
shared-memory replica slots (``MemoryServices``), real checkpoints; the
span signals the training loop and the communication hook would give are
driven by hand, so each step of a plan can be checked as it happens. Then
the replicated backend itself, with real worker agents, in every schedule.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_memory_backend import CPU, Nodes, config_dict, train_and_snapshot
from test_transport import SECRET, wait_until
from test_transport_ranges import GRID, SIZE, encoded

from gemini.checkpoint import slot as sl
from gemini.checkpoint.backend import SnapshotTiming
from gemini.checkpoint.interleave import transfer_s
from gemini.checkpoint.node_memory import MemoryServices
from gemini.checkpoint.senders import (
    MAX_INTERVAL,
    ImmediateSender,
    InterleavedSender,
    LinkFit,
    Replica,
    Schedule,
    SpanClock,
    least_squares,
    needed_interval,
    plan_for,
)
from gemini.cluster.job import JobSpec
from gemini.cluster.transport import TransportClient, TransportServer
from gemini.workload.state import TrainState

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

HOLDERS = [1, 2]
CHUNK = 16 << 10


class Holders:
    """Nodes 1 and 2 holding rank 0's replica slots, each behind its own server."""

    def __init__(self, tmp_path: Path) -> None:
        self.run_id = f"t{uuid.uuid4().hex[:9]}"
        job = JobSpec(
            run_id=self.run_id,
            job_dir=str(tmp_path),
            store="",
            secret_file="",
            config=config_dict(tmp_path, {"name": "replicated"}, nodes=3),
        )
        cap = sl.manifest_capacity_for(4, SIZE, GRID)
        self.services: dict[int, MemoryServices] = {}
        self.servers: dict[int, TransportServer] = {}
        self.clients: dict[int, TransportClient] = {}
        for n in HOLDERS:
            svc = MemoryServices(job, node=n, store=None)  # type: ignore[arg-type]
            svc.sets[0] = sl.SlotSet.create(sl.shm_name(self.run_id, n, 0, "replica"), SIZE, cap)
            self.services[n] = svc
            self.servers[n] = TransportServer(SECRET, svc, io_timeout_s=5.0).__enter__()
            self.clients[n] = TransportClient("127.0.0.1", self.servers[n].port, SECRET)

    def client_for(self, node: int) -> TransportClient:
        return self.clients[node]

    def complete(self, node: int) -> list[int]:
        return [s for s, _ in self.services[node].sets[0].complete_steps()]

    def held(self, node: int, step: int) -> bytes:
        slots = self.services[node].sets[0]
        idx = next(i for s, i in slots.complete_steps() if s == step)
        return bytes(slots.data_view(idx)[:SIZE])

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        for s in self.servers.values():
            s.__exit__(None, None, None)
        for svc in self.services.values():
            svc.close()
        sl.unlink_prefix(f"gemini-{self.run_id}-")


@pytest.fixture
def holders(tmp_path: Path) -> Iterator[Holders]:
    h = Holders(tmp_path)
    yield h
    h.close()


def replica(step: int, first_iteration: int = 1) -> tuple[Replica, bytes]:
    manifest, data, sums = encoded(step)
    view = memoryview(data)
    return Replica(0, step, manifest, view, sums, GRID, SnapshotTiming(step), first_iteration), data


# --------------------------------------------------------------- pure parts


def test_the_link_fit_recovers_alpha_and_bandwidth_and_refuses_what_says_nothing() -> None:
    alpha, bw = 0.002, 1e9
    pts = [(s, transfer_s(s, bw, alpha)) for s in (0, 1 << 20, 0, 8 << 20, 64 << 20)]
    got = least_squares(pts)
    assert got is not None
    assert got[0] == pytest.approx(alpha) and got[1] == pytest.approx(bw)
    assert least_squares([(100, 1.0), (100, 2.0)]) is None  # one size: no slope
    assert least_squares([(0, 1.0), (100, 0.5)]) is None  # faster when larger
    assert least_squares([(0, 0.01)]) is None
    # A negative intercept (noise) is clamped: a chunk never costs less than nothing.
    assert least_squares([(0, 0.0), (10, 1.0), (20, 4.0)])[0] == 0.0  # type: ignore[index]
    fit = LinkFit(limit=2)
    for _ in range(3):
        fit.add_put(0.001, 1 << 20, 0.001 + (1 << 20) / 1e8)
    assert fit.puts == 2 and len(fit.samples) == 4 and not fit.wants_more
    a, b = fit.fit()  # type: ignore[misc]
    assert a == pytest.approx(0.001) and b == pytest.approx(1e8)


def test_the_span_clock_counts_spans_across_iterations_and_clamps_the_hook() -> None:
    clock = SpanClock()
    clock.spans = 4
    assert clock.position(1) == -1  # before the plan's first iteration
    clock.begin_iteration()
    assert clock.position(1) == 0
    for _ in range(5):  # more completions than merged busy intervals
        clock.comm_done()
    assert clock.position(1) == 2  # never the tail: that is busy_over's
    clock.busy_over()
    assert clock.position(1) == 3
    clock.begin_iteration()
    clock.comm_done()
    assert clock.position(1) == 5 and clock.position(2) == 1


def test_the_interval_grows_to_the_fewest_iterations_whose_spans_carry_the_copies() -> None:
    spans = [0.01, 0.02, 0.005]
    bw, alpha = 1e8, 1e-4
    # ~2 MB fits one iteration's spans (at mu = 0.8); 20 MB in two copies does not.
    assert needed_interval(spans, 2_000_000, 1, 1 << 20, bw, alpha) == 1
    k = needed_interval(spans, 10_000_000, 2, 1 << 20, bw, alpha)
    assert 1 < k < MAX_INTERVAL
    assert plan_for(spans, 10_000_000, 2, 1 << 20, bw, alpha, k).added_s == 0
    assert plan_for(spans, 10_000_000, 2, 1 << 20, bw, alpha, k - 1).added_s > 0
    # Beyond what any interval can carry: the cap, and the plan overflows.
    assert needed_interval([1e-6], 1 << 30, 1, 1 << 20, bw, alpha) == MAX_INTERVAL


# ----------------------------------------------------- senders over real sockets


def test_the_immediate_sender_lands_every_copy_bitwise_and_probes_the_first_holder(
    holders: Holders,
) -> None:
    fit = LinkFit()
    sender = ImmediateSender(HOLDERS, holders.client_for, CHUNK, fit)
    for step in (1, 2):
        r, data = replica(step)
        sender.send(r)
        assert r.timing.replicate_s > 0
        for h in HOLDERS:
            assert holders.held(h, step) == data
    assert holders.complete(1) == [2, 1] and holders.complete(2) == [2, 1]
    # One holder probed, two points per put: its opening and the whole.
    assert fit.puts == 2 and [s for s, _ in fit.samples] == [0, SIZE, 0, SIZE]
    assert fit.fit() is not None


def signal_and_check(
    sender: InterleavedSender, expected: list[tuple[int, int, int, int]], upto: int
) -> None:
    """Every planned chunk of a span <= ``upto`` has gone, and nothing later."""
    want = [c for c in expected if c[1] <= upto]
    wait_until(lambda: len(sender.sent) >= len(want))
    time.sleep(0.05)  # a chunk of a later span would leave now if it were going to
    assert sender.sent == want


@pytest.mark.parametrize(
    "staging", [0, CHUNK], ids=["interleave-direct", "interleave_nopipe-one-buffer"]
)
def test_the_interleaved_sender_sends_the_planned_chunks_as_their_spans_begin(
    holders: Holders, staging: int
) -> None:
    # Spans sized so that each takes a few chunks: 4 spans, 2 iterations.
    bw, alpha = 1e8, 0.0
    spans = [c * CHUNK / bw / 0.8 for c in (3.5, 2.5, 0.0, 0.5)]
    plan = plan_for(spans, SIZE, len(HOLDERS), CHUNK, bw, alpha, 2)
    assert {span for span, _ in plan.chunks} >= {0, 1, 4, 5}
    schedule = Schedule(plan, SIZE, 2, staging, 1)
    clock = SpanClock()
    clock.spans = len(spans)
    fallback = ImmediateSender(HOLDERS, holders.client_for, CHUNK, None)
    sender = InterleavedSender(HOLDERS, holders.client_for, schedule, clock, fallback)
    expected = [
        (h, span, off, n)
        for h, chunks in zip(HOLDERS, plan.copies(SIZE), strict=True)
        for span, off, n in chunks
    ]
    try:
        r, data = replica(7, first_iteration=1)
        sender.send(r)  # committed before the iteration begins: nothing may go yet
        signal_and_check(sender, expected, -1)
        clock.begin_iteration()
        signal_and_check(sender, expected, 0)
        clock.comm_done()
        signal_and_check(sender, expected, 1)
        clock.comm_done()
        signal_and_check(sender, expected, 2)
        clock.busy_over()
        signal_and_check(sender, expected, 3)
        clock.begin_iteration()
        signal_and_check(sender, expected, 4)
        # The rest goes when the trainer settles, before the next snapshot.
        sender.settle()
        assert sender.sent == expected
        assert r.timing.replicate_s > 0
        for h in HOLDERS:
            assert holders.complete(h) == [7]
            assert holders.held(h, 7) == data
        # Each copy: one put, its ranges in order and without gaps.
        for h in HOLDERS:
            ranges = [(off, n) for hh, _, off, n in sender.sent if hh == h]
            assert ranges[0][0] == 0 and sum(n for _, n in ranges) == SIZE
            assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(ranges))
        # A checkpoint of another size than planned goes whole, unplanned.
        sender.schedule = Schedule(plan, SIZE + 1, 2, staging, 1)
        other, data9 = replica(9)
        sender.send(other)
        sender.settle()
        assert sender.sent == expected and other.timing.replicate_s > 0
        for h in HOLDERS:
            assert holders.complete(h) == [9, 7] and holders.held(h, 9) == data9
    finally:
        sender.close()


def test_a_closed_interleaved_sender_aborts_its_put_and_the_holder_keeps_its_copy(
    holders: Holders,
) -> None:
    fallback = ImmediateSender(HOLDERS, holders.client_for, CHUNK, None)
    first, data = replica(1)
    fallback.send(first)
    spans = [CHUNK / 1e8 / 0.8 * 1.5, 1.0]
    plan = plan_for(spans, SIZE, len(HOLDERS), CHUNK, 1e8, 0.0, 1)
    clock = SpanClock()
    clock.spans = len(spans)
    sender = InterleavedSender(
        HOLDERS, holders.client_for, Schedule(plan, SIZE, 1, 0, 1), clock, fallback
    )
    r, _ = replica(2)
    sender.send(r)
    clock.begin_iteration()
    wait_until(lambda: len(sender.sent) >= 1)
    sender.close()  # a failed generation: the put is never finished
    wait_until(lambda: all(holders.complete(h) == [1] for h in HOLDERS))
    for h in HOLDERS:
        assert holders.held(h, 1) == data


# ------------------------------------------- the replicated backend, every schedule


@pytest.mark.parametrize("schedule", ["blocking", "naive", "interleave_nopipe", "interleave"])
def test_the_replicated_backend_lands_bitwise_replicas_in_every_schedule(
    tmp_path: Path, schedule: str
) -> None:
    backend_cfg = {"name": "replicated", "replication": {"factor": 2, "schedule": schedule}}
    nodes = Nodes(tmp_path, backend_cfg, nodes=2)
    try:
        state = TrainState(nodes.job.cfg, 0, 2, CPU)
        backend = nodes.backend(node=0, rank=0)
        backend.prepare(state)
        try:
            # The first steps: every schedule sends whole copies (the link probe).
            train_and_snapshot(backend, state, steps=2)
            first = backend.wait()
            assert first is not None and not first.replicating
            assert first.local_s > 0 and first.replicate_s > 0
            assert backend.settle() is None
            planned = schedule.startswith("interleave")
            assert backend.plans_replication == planned
            spans = [0.05, 0.02, 0.3]
            need = backend.interval_needed(spans)
            record = backend.adopt_plan(spans, need)
            if planned:
                assert record["bandwidth_Bps"] > 0 and record["alpha_s"] >= 0
                assert record["interval"] == need == backend.checkpoint_interval
            clock = backend.span_clock
            for step in (3, 4):
                if clock is not None:
                    clock.begin_iteration()
                state.forward_backward()
                if clock is not None:
                    clock.busy_over()
                state.optimizer_step()
                settled = backend.settle()
                assert settled is None or settled.replicate_s > 0
                backend.snapshot(step, state)
                timing = backend.wait()
                assert timing is not None and timing.local_s > 0
                assert timing.replicating == planned
            last = backend.settle()
            assert (last is not None) == planned
            if last is not None:
                assert last.step == 4 and last.replicate_s > 0 and not last.replicating
            local = backend.slots  # type: ignore[attr-defined]
            idx = next(i for s, i in local.complete_steps() if s == 4)
            mine = bytes(local.data_view(idx)[: timing.bytes])
            client = backend._client(1)  # type: ignore[attr-defined]
        finally:
            backend.close()
        # The holder verified every digest before it committed; and the bytes match.
        assert nodes.inventory()[1]["0"] == [[4, 1], [3, 1]]
        with client:
            _, got = client.get(0, 4)
        assert bytes(got) == mine
    finally:
        nodes.close()
