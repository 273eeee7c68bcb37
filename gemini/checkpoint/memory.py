"""In-memory checkpoints: ``memory`` (local CPU memory) and ``replicated`` (+ m-1 peers).

The trainer's side. The slots live in POSIX shared memory owned by the
node's worker agent (``node_memory``), so a trainer crash loses nothing. At
start-up the trainer announces the exact size of its checkpoint; its agent
(and, for ``replicated``, its holders' agents) allocate and touch two slots of
that size once, and the trainer maps its local slots.

Per step the trainer copies its state into the in-progress slot in a
background thread, overlapped with the next forward/backward; the trainer
joins it before the next optimizer step changes the parameters. The commit
writes step and checksums last, so a failure mid-copy leaves the other slot as
the newest complete checkpoint. ``replicated`` then sends the committed slot
to the m-1 holders chosen by placement (Algorithm 1) over the authenticated
transport; they receive straight into their slot for this source.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from gemini.checkpoint import format as fmt
from gemini.checkpoint.backend import (
    BackendContext,
    CheckpointBackend,
    CheckpointError,
    Retrieved,
    SnapshotTiming,
)
from gemini.checkpoint.slot import SlotSet, manifest_capacity_for, shm_available_bytes, shm_name
from gemini.cluster import keys
from gemini.cluster.store import Store
from gemini.config import ConfigError, GeminiConfig

if TYPE_CHECKING:
    from gemini.checkpoint.disk import DiskStore
    from gemini.checkpoint.senders import ReplicaSender
    from gemini.cluster.transport import TransportClient
    from gemini.workload.state import TrainState


def replica_holders(cfg: GeminiConfig, node: int) -> list[int]:
    """The m-1 nodes that hold ``node``'s checkpoints (none for ``memory``)."""
    if cfg.backend.name != "replicated" or cfg.backend.replication.factor <= 1:
        return []
    from gemini.checkpoint.placement import holders, resolve_placement

    n, m = cfg.cluster.nodes, cfg.backend.replication.factor
    return holders(node, n, m, resolve_placement(n, m, cfg.backend.replication.placement))


def held_sources(cfg: GeminiConfig, node: int) -> list[int]:
    """Nodes whose checkpoints ``node`` stores, itself first."""
    if cfg.backend.name != "replicated" or cfg.backend.replication.factor <= 1:
        return [node]
    from gemini.checkpoint.placement import held_by, resolve_placement

    n, m = cfg.cluster.nodes, cfg.backend.replication.factor
    return [node, *held_by(node, n, m, resolve_placement(n, m, cfg.backend.replication.placement))]


def estimate_rank_bytes(cfg: GeminiConfig) -> int:
    """Upper bound of one rank's checkpoint: parameters + AdamW's two moments, fp32."""
    from gemini.workload.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.train.seed)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    per_rank = 3 * params
    if cfg.train.parallel == "zero":
        world = cfg.cluster.nodes * cfg.cluster.ranks_per_node
        # Greedy partitioning by size can be uneven by one large tensor.
        biggest = max(p.numel() * p.element_size() for p in model.parameters())
        per_rank = 3 * (params // world + biggest)
    return per_rank + (1 << 20)


def check_shm_budget(cfg: GeminiConfig, nodes_here: int | None = None) -> None:
    """Refuse, before allocating anything, a layout /dev/shm cannot hold.

    Each node holds two slots for each of its own ranks and for each rank it
    keeps a replica of: ``m`` copies' worth per rank, and a standby node as
    much as any node (it allocates its slots before it takes an index over).
    ``nodes_here``: the nodes this machine runs, standbys included (all of
    them locally; on SLURM, its tasks')."""
    c = cfg.cluster
    here = c.nodes + c.standby_nodes if nodes_here is None else nodes_here
    world = here * cfg.cluster.ranks_per_node
    m = cfg.backend.replication.factor if cfg.backend.name == "replicated" else 1
    per_rank = estimate_rank_bytes(cfg)
    need = world * m * 2 * per_rank
    available = shm_available_bytes()
    # /dev/shm is RAM here: leave a tenth for training itself.
    if need > 0.9 * available:
        key = "backend.replication.factor" if m > 1 else "backend.name"
        value: Any = m if m > 1 else cfg.backend.name
        raise ConfigError(
            key,
            value,
            f"the slots need {need / 2**30:.1f} GiB of /dev/shm "
            f"({world} ranks x {m} copies x 2 slots x "
            f"{per_rank / 2**20:.0f} MiB) but {available / 2**30:.1f} GiB is available: lower "
            "backend.replication.factor, or use a smaller model, fewer ranks or "
            "fewer cluster.standby_nodes",
        )


class MemoryBackend(CheckpointBackend):
    """``backend=memory``: two slots per rank in the local agent's shared memory."""

    name = "memory"
    allocates = True
    persists_periodically = True

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.cfg = ctx.job.cfg
        self.store = Store.for_job(ctx.job)
        self.chunk = self.cfg.backend.chunk_mb << 20
        self.slots: SlotSet | None = None
        self.holders: list[int] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._persist_thread: threading.Thread | None = None
        self._persist_slot: int | None = None
        self._disk: DiskStore | None = None
        arm = self.store.get_json_or(keys.inject_arm(ctx.rank))
        if arm is not None and arm.get("after_gen") is not None:
            # A follow-up failure: only a generation after the one it follows.
            arm = arm if ctx.generation > int(arm["after_gen"]) else None
        self._arm = arm
        self._restored = 0
        """The step this rank restored (a follow-up failure counts from it)."""

    # -- start-up ---------------------------------------------------------------
    def _prepare(self, state: TrainState) -> dict[str, Any]:
        spec = state.checkpoint_spec()
        _, nbytes = fmt.layout(spec)
        size = {
            "data": nbytes,
            "manifest": manifest_capacity_for(len(spec), nbytes, self.chunk),
        }
        self.store.set_json(keys.ckpt_size(self.ctx.rank), size)
        nodes = [self.ctx.node, *self.holders]
        touch = 0.0
        pooled = False
        deadline = time.monotonic() + 120
        for n in nodes:
            while True:
                inc = self.store.get_json_or(keys.agent(n), {}).get("incarnation")
                ready = self.store.get_json_or(keys.ckpt_ready(n, self.ctx.rank))
                if ready is not None and inc is not None and ready["incarnation"] == inc:
                    touch = max(touch, float(ready.get("touch_s", 0.0)))
                    pooled = pooled or (n == self.ctx.node and bool(ready.get("pooled")))
                    break
                if time.monotonic() > deadline:
                    raise CheckpointError(
                        f"node {n} did not allocate slots for rank {self.ctx.rank}"
                    )
                time.sleep(0.02)
        name = shm_name(self.ctx.job.run_id, self.ctx.node, self.ctx.rank, "local")
        self.slots = SlotSet.open(name, populate=True)
        if self.cfg.backend.persist_every_s > 0 or self.cfg.backend.persist_every_n > 0:
            self._disk = _disk_store(self.ctx)
        # ckpt_slots_pooled: the local slots were allocated by a standby node
        # before it took this node's index over.
        return {"ckpt_alloc_s": touch, "ckpt_capacity_bytes": nbytes, "ckpt_slots_pooled": pooled}

    # -- per step ---------------------------------------------------------------
    def _snapshot(self, step: int, state: TrainState, timing: SnapshotTiming) -> None:
        assert self.slots is not None, "prepare() first"
        tensors = state.tensors()
        extra = state.extra()
        newest = self.slots.newest_complete()
        target = 0 if newest is None or newest[1] == 1 else 1
        if self._persist_thread is not None and self._persist_slot == target:
            # The persistent tier still reads the slot we are about to reuse.
            self._persist_thread.join()
            self._persist_thread = None
        idx = self.slots.begin_write(step)
        # The first snapshot at or after the armed step: a cadence that skips
        # the armed step itself still gets its kill (gemini.config.validate
        # refuses a run in which no snapshot would follow it).
        kill_midway = (
            self._arm is not None
            and step
            >= int(self._arm["step"]) + (self._restored if self._arm.get("after_recovery") else 0)
            and not self.store.exists(keys.inject_fired(self._arm["id"]))
        )
        self._error = None
        self._thread = threading.Thread(
            target=self._copy, args=(idx, step, tensors, extra, timing, kill_midway), daemon=True
        )
        self._thread.start()

    def _copy(
        self,
        idx: int,
        step: int,
        tensors: dict[str, torch.Tensor],
        extra: dict[str, Any],
        timing: SnapshotTiming,
        kill_midway: bool,
    ) -> None:
        try:
            assert self.slots is not None
            t0 = time.perf_counter()
            entries, nbytes = fmt.layout(tensors)
            dst = self.slots.data_tensor(idx)
            if kill_midway:
                self._die_midway(tensors, entries, dst, step)
            # Copy and hash in one pass: each piece is hashed while still in
            # cache, which a separate checksum pass over the slot cannot do.
            sums = fmt.write_checksummed(tensors, entries, dst, self.chunk)
            manifest = fmt.make_manifest(
                tensors,
                step=step,
                rank=self.ctx.rank,
                world_size=self.ctx.world_size,
                config_hash=self.ctx.config_hash,
                extra=extra,
                buf=dst,
                chunk_bytes=self.chunk,
                checksums=sums,
                generation=self.ctx.generation,
            )
            self.slots.commit(idx, manifest)
            timing.local_s = time.perf_counter() - t0
            timing.bytes = nbytes
            self._after_commit(idx, manifest, timing)
        except BaseException as e:  # re-raised in the training thread by _wait
            self._error = e

    def _die_midway(
        self,
        tensors: dict[str, torch.Tensor],
        entries: list[fmt.TensorEntry],
        dst: torch.Tensor,
        step: int,
    ) -> None:
        """kill_during_snapshot: copy half the state, then die as a SIGKILL would."""
        half = dict(list(tensors.items())[: max(1, len(tensors) // 2)])
        fmt.write_state(half, entries[: len(half)], dst)
        arm = self._arm or {}
        self.store.push(
            keys.INJECT,
            {
                **arm,
                "t": time.time(),
                "step": step,
                "gen": self.ctx.generation,
                "what": f"kill during the snapshot of step {step}",
            },
        )
        self.store.set(keys.inject_fired(arm.get("id")), "1")
        os.kill(os.getpid(), signal.SIGKILL)

    def _after_commit(self, idx: int, manifest: fmt.Manifest, timing: SnapshotTiming) -> None:
        k = self.persist_interval
        if self._disk is not None and k > 0 and manifest.step % k == 0:
            # Every rank persists the same steps (the interval was agreed on
            # collectively), so storage holds complete steps, not a mosaic.
            self._persist_slot = idx
            self._persist_thread = threading.Thread(
                target=self._persist, args=(idx, manifest), daemon=True
            )
            self._persist_thread.start()

    def _persist(self, idx: int, manifest: fmt.Manifest) -> None:
        """Gemini's last resort: the committed slot, written through the disk backend."""
        assert self.slots is not None and self._disk is not None
        try:
            self._disk.write(
                self.ctx.rank,
                manifest.step,
                manifest,
                self.slots.data_view(idx)[: manifest.data_nbytes],
            )
            if self.ctx.rank == 0:
                self._disk.prune(self.ctx.world_size)
        except Exception as e:  # the in-memory copies remain; report, don't stop training
            print(f"[rank {self.ctx.rank}] persistent tier write failed: {e}", flush=True)

    def _wait(self, timing: SnapshotTiming) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(
                f"{self.name}: snapshot of step {timing.step} failed: {err}"
            ) from err

    def _complete_steps(self) -> list[int]:
        return [s for s, _ in self.slots.complete_steps()] if self.slots else []

    # -- restore ------------------------------------------------------------------
    def _retrieve(self, step: int, source: dict[str, Any]) -> Retrieved:
        assert self.slots is not None, "prepare() first"
        self._restored = step
        kind = source.get("kind", "local")
        if kind == "storage":
            disk = self._disk or _disk_store(self.ctx)
            manifest, view = disk.read(self.ctx.rank, step)
            self._check(manifest, "storage")
            # Views: the read buffer is ours alone and TrainState.load copies
            # out of it at once, so a clone would only double memory and time.
            tensors = fmt.read_state(view, manifest, copy=False)
            return Retrieved(step, tensors, manifest.extra, "storage", manifest.data_nbytes, 0.0)
        if kind == "peer":
            self._fetch_from_peer(step, int(source["node"]))
        idx = next((i for s, i in self.slots.complete_steps() if s == step), None)
        if idx is None:
            raise CheckpointError(f"rank {self.ctx.rank}: no complete step {step} in local memory")
        # Views into our own slot, which TrainState.load copies out of: a copy
        # here would allocate and fault in the whole state once more on the
        # recovery's critical path. The next snapshot goes to the other slot.
        # A fetched slot was verified as it was committed.
        manifest, tensors = self.slots.view_state(idx, verify=kind != "peer")
        self._check(manifest, kind)
        self.slots.invalidate_newer_than(step)
        where = "local" if kind == "local" else f"peer:{source['node']}"
        return Retrieved(step, tensors, manifest.extra, where, manifest.data_nbytes, 0.0)

    def _fetch_from_peer(self, step: int, holder: int) -> None:
        """Receive this rank's checkpoint from a holder straight into the local slot."""
        assert self.slots is not None
        client = self._client(holder)
        idx = self.slots.begin_write(step)
        manifest_json, _ = client.get(self.ctx.rank, step, into=self.slots.data_view(idx))
        self.slots.commit_raw(idx, manifest_json, verify=True)

    def _check(self, manifest: fmt.Manifest, where: str) -> None:
        if manifest.config_hash != self.ctx.config_hash:
            raise CheckpointError(
                f"the {where} checkpoint of rank {self.ctx.rank} was written by another config "
                f"(hash {manifest.config_hash}, this run {self.ctx.config_hash}): start a fresh run"
            )

    def _client(self, node: int) -> TransportClient:
        from gemini.cluster.transport import TransportClient

        info = self.store.get_json(keys.agent(node))
        host, port = info["transport"].rsplit(":", 1)
        return TransportClient(host, int(port), self.ctx.job.secret(), timeout_s=60.0)

    def _close(self, abandon: bool) -> None:
        if abandon and self._disk is not None:
            self._disk.abandon.set()
        for t in (self._thread, self._persist_thread):
            if t is not None:
                t.join()
        if self.slots is not None:
            self.slots.close()


class ReplicatedBackend(MemoryBackend):
    """``backend=replicated``: ``memory`` plus m-1 copies on the holders' agents.

    How the copies travel is ``backend.replication.schedule``
    (``gemini.checkpoint.senders``): ``naive`` and ``blocking`` send each copy
    whole from the copy thread (``blocking`` also makes the snapshot wait for
    it); the planned modes do the same until the generation's idle profile
    exists, then hand each committed slot to an interleaving sender.
    """

    name = "replicated"

    def __init__(self, ctx: BackendContext) -> None:
        from gemini.checkpoint.senders import ImmediateSender, LinkFit, SpanClock
        from gemini.config import PLANNED_SCHEDULES

        super().__init__(ctx)
        self.holders = replica_holders(self.cfg, ctx.node)
        self.clients: dict[int, TransportClient] = {}
        self.schedule = self.cfg.backend.replication.schedule
        planned = self.schedule in PLANNED_SCHEDULES
        self.plans_replication = planned
        self.link = LinkFit() if planned else None
        self.immediate = ImmediateSender(
            self.holders, self._client_for, max(self.chunk, 8 << 20), self.link
        )
        self.sender: ReplicaSender = self.immediate
        self.span_clock = SpanClock() if planned else None
        self._first_iteration = 0
        self._ckpt_bytes = 0
        self._needed = 1

    def _client_for(self, node: int) -> TransportClient:
        return self.clients.get(node) or self.clients.setdefault(node, self._client(node))

    def _snapshot(self, step: int, state: TrainState, timing: SnapshotTiming) -> None:
        if self.span_clock is not None:
            # A plan starts at span 0 of the iteration after this snapshot.
            self._first_iteration = self.span_clock.iteration + 1
        super()._snapshot(step, state, timing)
        if self.schedule == "blocking" and self._thread is not None:
            # The trainer waits here, inside the snapshot, until every holder
            # has acknowledged its copy: nothing overlaps the next step.
            self._thread.join()

    def _after_commit(self, idx: int, manifest: fmt.Manifest, timing: SnapshotTiming) -> None:
        from gemini.checkpoint.senders import InterleavedSender, Replica

        assert self.slots is not None
        self._ckpt_bytes = manifest.data_nbytes
        replica = Replica(
            self.ctx.rank,
            manifest.step,
            manifest.to_json(),
            self.slots.data_view(idx)[: manifest.data_nbytes],
            manifest.checksums,
            manifest.chunk_bytes,
            timing,
            self._first_iteration,
        )
        sender = self.sender
        if isinstance(sender, InterleavedSender) and self.holders:
            # Set before the hand-over: wait() reads it once this thread ends.
            timing.replicating = True
        sender.send(replica)
        super()._after_commit(idx, manifest, timing)

    def _settle(self) -> None:
        self.sender.settle()

    # -- the plan ---------------------------------------------------------------
    def interval_needed(self, spans_s: list[float]) -> int:
        from gemini.checkpoint.senders import needed_interval

        fit = self.link.fit() if self.link is not None else None
        if not self.plans_replication or fit is None or not self.holders or not self._ckpt_bytes:
            self._needed = 1
        else:
            alpha, bandwidth = fit
            self._needed = needed_interval(
                spans_s, self._ckpt_bytes, len(self.holders), self._buffer, bandwidth, alpha
            )
        return self._needed

    @property
    def _buffer(self) -> int:
        """Largest chunk: the checksum/network chunk (``backend.chunk_mb``), which is
        also the holder's one staging buffer under ``interleave_nopipe``."""
        return self.chunk

    def adopt_plan(self, spans_s: list[float], interval: int) -> dict[str, Any]:
        from gemini.checkpoint.senders import (
            InterleavedSender,
            Schedule,
            plan_for,
            schedule_record,
        )

        fit = self.link.fit() if self.link is not None else None
        interval = max(1, interval)
        if not self.plans_replication or self.span_clock is None or not spans_s:
            return {}
        if fit is None or not self.holders or not self._ckpt_bytes:
            # Nothing measured to plan with: this generation stays unplanned.
            return schedule_record(self.schedule, fit, spans_s, self._needed, None)
        alpha, bandwidth = fit
        plan = plan_for(
            spans_s, self._ckpt_bytes, len(self.holders), self._buffer, bandwidth, alpha, interval
        )
        # interleave: the holder receives straight into its slot, so the
        # socket buffer pipelines receiving with landing and no staging copy
        # is paid (on host memory the fastest way in); interleave_nopipe: one
        # staging buffer the size of a chunk, received then drained in turn.
        staging = self._buffer if self.schedule == "interleave_nopipe" else 0
        schedule = Schedule(plan, self._ckpt_bytes, interval, staging, 1)
        self.span_clock.spans = len(spans_s)
        self.checkpoint_interval = interval
        self.sender = InterleavedSender(
            self.holders, self._client_for, schedule, self.span_clock, self.immediate
        )
        if interval > 1:
            print(
                f"[rank {self.ctx.rank}] {self.schedule}: the replicas need {self._needed} "
                f"iteration(s) of idle spans (all ranks: {interval}); checkpointing every "
                f"{interval} steps",
                flush=True,
            )
        return schedule_record(self.schedule, fit, spans_s, self._needed, schedule)

    def _close(self, abandon: bool) -> None:
        # The senders read the slots: they stop before the slots are unmapped.
        if self._thread is not None:
            self._thread.join()
        self.sender.close()
        super()._close(abandon)
        for c in self.clients.values():
            c.close()


def _disk_store(ctx: BackendContext) -> DiskStore:
    from gemini.checkpoint.disk import DiskStore, storage_dir

    b = ctx.job.cfg.backend
    return DiskStore(
        storage_dir(ctx.job.cfg, ctx.job.job_dir),
        ctx.job.storage_run,
        bandwidth_gbps=b.bandwidth_gbps,
        keep_last=b.keep_last,
    )
