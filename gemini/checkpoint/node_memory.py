"""What a worker agent hosts for the checkpoint backend of the run.

``none`` and ``disk`` need nothing on the agent. ``memory`` and
``replicated`` need the node's shared-memory slots — two per source rank: the
node's own ranks, and for ``replicated`` the ranks of the nodes it holds
(placement's ``held_by``) — and ``replicated`` a transport server through
which peers put their checkpoints and a replaced node's ranks fetch theirs
back. The agent allocates and touches the slots once, when a rank announces
its checkpoint size, and answers the root's inventory requests with the
steps it holds *after verifying their checksums*, so a corrupted replica is
never planned as a source, each with the generation that wrote it.

After every recovery plan the root asks each agent to *trim*: to invalidate
every slot, local or replica, newer than the restored step. Those copies
belong to the timeline the rollback abandoned; left in place, one would count
as the newest slot and the next write would overwrite the only copy of the
current timeline. A trim first ends every put still being received: it comes
from the ended generation (a sender cut off by a partition never closes its
connection, and its put would hold the source's slot past the point where
the next generation's put of that source gives up).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gemini.checkpoint import format as fmt
from gemini.checkpoint.slot import SlotError, SlotSet, shm_name, standby_prefix
from gemini.cluster import keys

if TYPE_CHECKING:
    from gemini.cluster.job import JobSpec
    from gemini.cluster.store import Store
    from gemini.cluster.transport import PutTarget, TransportServer

# Longest a put waits for the same source's previous put to end: past the
# transport's io timeout, by which that one has finished or been aborted.
PUT_WAIT_S = 45.0


class AgentServices:
    """Nothing to host: the default for backends without node-side state."""

    def __init__(
        self, job: JobSpec | None = None, node: int = 0, store: Store | None = None
    ) -> None:
        self.job, self.node, self.store = job, node, store
        self.answered = store.counter(keys.INV_REQ) if store is not None else 0
        # Trim requests are answered once each, newest only: an older one's
        # step can only be newer than (or equal to) the newest one's.
        self.trimmed = store.counter(keys.TRIM_REQ) if store is not None else 0

    def start(self) -> dict[str, Any]:
        """Start serving; returns what peers need to know (e.g. an address)."""
        return {}

    def tick(self) -> None:
        """Called from the agent's control loop: answers inventory requests."""
        if self.store is None:
            return
        n = self.store.counter(keys.TRIM_REQ)
        if n > self.trimmed:
            self.trimmed = n
            # The root writes the request before bumping the counter: an
            # absent (or unsigned) one was never the root's.
            req = self.store.get_json_or(keys.trim_request(n))
            if req is not None:
                dropped = self.trim(int(req["step"]), int(req.get("generation", 0)))
                self.store.set_json(keys.trim_ack(n, self.node), dropped)
        n = self.store.counter(keys.INV_REQ)
        if n > self.answered:
            self.answered = n
            self.store.set_json(keys.inventory(n, self.node), self.inventory())

    def inventory(self) -> dict[str, list[list[int]]]:
        """Verified complete ``[step, generation]`` held here, per source rank."""
        return {}

    def trim(self, step: int, generation: int = 0) -> dict[str, list[int]]:
        """Invalidate every copy newer than ``step``, and from now on refuse copies
        written by generations before ``generation`` (the one about to launch);
        returns the steps dropped per rank."""
        return {}

    def close(self) -> None:
        """Stop serving and release memory."""


class _SlotTarget:
    """Where one incoming replica lands: a slot of the source's SlotSet."""

    def __init__(
        self,
        slots: SlotSet,
        idx: int,
        data_len: int,
        done: Callable[[], None],
        floor: Callable[[], int],
    ) -> None:
        self.slots, self.idx, self.data_len = slots, idx, data_len
        self._done, self._floor = done, floor

    def buffer(self) -> memoryview:
        return self.slots.data_view(self.idx)

    def commit(self, manifest_json: bytes) -> None:
        # A generation ended by a recovery may still deliver a whole put (its
        # sender's kernel sends what was written once a cut link returns):
        # that copy belongs to an abandoned timeline and must not become one
        # of the slots the next generation counts on.
        written_by, floor = fmt.Manifest.from_json(manifest_json).generation, self._floor()
        if written_by < floor:
            raise SlotError(
                f"a copy written by generation {written_by}, ended before generation {floor}"
            )
        # Chunks were verified on the wire; the content checksums are verified
        # when the root asks for an inventory, before this copy is relied on.
        self.slots.commit_raw(self.idx, manifest_json, verify=False)
        self._done()

    def abort(self, reason: str) -> None:
        self.slots.invalidate(self.idx)
        self._done()


def slots_per_node(job: JobSpec) -> int:
    """How many slot sets any node holds: its own ranks' and the replicas'."""
    from gemini.checkpoint.memory import held_sources

    cfg = job.cfg
    most = max(len(held_sources(cfg, n)) for n in range(cfg.cluster.nodes))
    return most * cfg.cluster.ranks_per_node


def allocate_standby_slots(job: JobSpec, k: int, store: Store) -> list[SlotSet] | None:
    """A standby node's slots, allocated and touched before it has an index.

    Which ranks' slots a node holds depends on its index, but how many it
    holds does not, and every rank announces its checkpoint size in the
    first generation: the standby allocates that many slot sets, each as
    large as the largest rank's, under its own names. A takeover renames
    them to the index's (:class:`MemoryServices`). None while a size is
    still unknown; empty for backends without slots.
    """
    if job.cfg.backend.name not in ("memory", "replicated"):
        return []
    world = job.cfg.cluster.nodes * job.cfg.cluster.ranks_per_node
    sizes = [store.get_json_or(keys.ckpt_size(r)) for r in range(world)]
    if any(s is None for s in sizes):
        return None
    data = max(int(s["data"]) for s in sizes if s is not None)
    manifest = max(int(s["manifest"]) for s in sizes if s is not None)
    out: list[SlotSet] = []
    try:
        for i in range(slots_per_node(job)):
            name = f"{standby_prefix(job.run_id, k)}{i}"
            out.append(SlotSet.create(name, data, manifest, touch=True))
    except BaseException:
        release_slots(out)
        raise
    return out


def release_slots(sets: list[SlotSet]) -> None:
    """Unmap and unlink slot sets nobody else uses."""
    for slots in sets:
        slots.close()
        slots.unlink()
    sets.clear()


class MemoryServices(AgentServices):
    def __init__(
        self, job: JobSpec, node: int, store: Store, pool: list[SlotSet] | None = None
    ) -> None:
        super().__init__(job, node, store)
        self.pool = list(pool or [])
        """Slots a standby allocated before it took this index over, to be renamed."""
        from gemini.checkpoint.memory import held_sources

        cfg = job.cfg
        rpn = cfg.cluster.ranks_per_node
        self.source_nodes = held_sources(cfg, node)
        self.ranks = [n * rpn + i for n in self.source_nodes for i in range(rpn)]
        self.rank_node = {r: r // rpn for r in self.ranks}
        self.sets: dict[int, SlotSet] = {}
        self.server: TransportServer | None = None
        self.replicated = cfg.backend.name == "replicated"
        self.incarnation: int | None = None
        # Puts arrive on one thread per connection. A slot set has one writer
        # at a time: a source's second put (its trainer reconnected while the
        # first one's thread still drains a dead connection) waits for the
        # first to end, or both would pick the same slot.
        self._put_free = threading.Condition()
        self._receiving: set[int] = set()
        self.generation_floor = 0
        """Puts of copies written by an older generation are refused (set by trims)."""

    def start(self) -> dict[str, Any]:
        assert self.job is not None
        if not self.replicated:
            return {}
        from gemini.cluster.addresses import advertised_host, bind_host
        from gemini.cluster.transport import TransportServer

        c = self.job.cfg.cluster
        host = bind_host(c)
        self.server = TransportServer(self.job.secret(), self, host=host, port=0).start()
        return {"transport": f"{advertised_host(c, host)}:{self.server.port}"}

    def tick(self) -> None:
        assert self.store is not None and self.job is not None
        # Once every slot exists this loop costs nothing: no store round trips
        # on the agent's hot path while training runs.
        for rank in self.ranks if len(self.sets) < len(self.ranks) else ():
            size = None if rank in self.sets else self.store.get_json_or(keys.ckpt_size(rank))
            if size is None:
                continue
            kind = "local" if self.rank_node[rank] == self.node else "replica"
            name = shm_name(self.job.run_id, self.node, rank, kind)
            t0 = time.perf_counter()
            data, manifest = int(size["data"]), int(size["manifest"])
            ready = self._from_pool(name, data, manifest)
            pooled = ready is not None
            if ready is None:
                ready = SlotSet.create(name, data, manifest, touch=True)
            self.sets[rank] = ready
            if self.incarnation is None:
                self.incarnation = self.store.get_json(keys.agent(self.node))["incarnation"]
            self.store.set_json(
                keys.ckpt_ready(self.node, rank),
                {
                    "incarnation": self.incarnation,
                    "touch_s": time.perf_counter() - t0,
                    "pooled": pooled,
                },
            )
        if self.pool and len(self.sets) == len(self.ranks):
            release_slots(self.pool)  # more than this index needs
        super().tick()

    def _from_pool(self, name: str, data: int, manifest: int) -> SlotSet | None:
        """A pre-allocated slot set large enough for the rank, renamed to ``name``."""
        for i, slots in enumerate(self.pool):
            if slots.data_capacity >= data and slots.manifest_capacity >= manifest:
                slots.rename(name)
                return self.pool.pop(i)
        return None

    def inventory(self) -> dict[str, list[list[int]]]:
        out: dict[str, list[list[int]]] = {}
        for rank, slots in self.sets.items():
            good = []
            for step, idx in slots.complete_steps():
                try:
                    manifest = slots.verify(idx)
                    good.append([step, manifest.generation])
                except Exception as e:  # a corrupted copy is reported, never planned
                    print(f"[agent {self.node}] rank {rank} step {step}: {e}", flush=True)
            out[str(rank)] = good
        return out

    def trim(self, step: int, generation: int = 0) -> dict[str, list[int]]:
        self.generation_floor = max(self.generation_floor, generation)
        if self.server is not None:
            # Every trainer of the ended generation has stopped, or is on a node
            # cut off for good: a put still under way is that generation's, and
            # one whose sender was cut off would hold its source's slot until
            # the io timeout, while the next generation puts the same source.
            # Ended before the slots are trimmed, so no stale copy commits after.
            stale = self.server.abort_puts(f"its generation ended (recovery to step {step})")
            if stale:
                print(
                    f"[agent {self.node}] ended the puts of an ended generation: {stale}",
                    flush=True,
                )
        out: dict[str, list[int]] = {}
        for rank, slots in self.sets.items():
            newer = [s for s, _ in slots.complete_steps() if s > step]
            if slots.invalidate_newer_than(step):
                out[str(rank)] = newer
        if out:
            print(f"[agent {self.node}] dropped copies newer than step {step}: {out}", flush=True)
        return out

    # -- transport Handler --------------------------------------------------------
    def begin_put(self, source: int, step: int, data_len: int, manifest_len: int) -> PutTarget:
        with self._put_free:
            slots = self.sets.get(source)
            if slots is None or self.rank_node.get(source) == self.node:
                raise SlotError(f"node {self.node} holds no replica slots for rank {source}")
            if not self._put_free.wait_for(lambda: source not in self._receiving, PUT_WAIT_S):
                raise SlotError(f"a put of rank {source} is still being received here")
            idx = slots.begin_write(step, data_len)
            self._receiving.add(source)
        return _SlotTarget(
            slots, idx, data_len, lambda: self._put_done(source), lambda: self.generation_floor
        )

    def _put_done(self, source: int) -> None:
        with self._put_free:
            self._receiving.discard(source)
            self._put_free.notify_all()

    def get(self, source: int, step: int | None) -> tuple[bytes, memoryview] | None:
        slots = self.sets.get(source)
        if slots is None:
            return None
        for s, idx in slots.complete_steps():
            if step is None or s == step:
                return slots.raw_slot_view(idx)
        return None

    def list(self) -> dict[str, Any]:
        return {str(r): [s for s, _ in sl.complete_steps()] for r, sl in self.sets.items()}

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for slots in self.sets.values():
            slots.close()
        release_slots(self.pool)


def make_agent_services(
    job: JobSpec, node: int, store: Store, pool: list[SlotSet] | None = None
) -> AgentServices:
    """The services ``job``'s backend needs on node ``node``; ``pool``: slots a
    standby allocated before taking the node over."""
    if job.cfg.backend.name in ("memory", "replicated"):
        return MemoryServices(job, node, store, pool)
    return AgentServices(job, node, store)


def corrupt_held_replica(job: JobSpec, holder: int, rank: int) -> dict[str, Any]:
    """Flip a byte in the newest complete replica of ``rank`` that node ``holder``
    keeps (called by ``holder``'s own agent, on an order: nothing opens another
    node's memory); empty when it holds none."""
    try:
        slots = SlotSet.open(shm_name(job.run_id, holder, rank, "replica"))
    except SlotError:
        return {}
    with slots:
        newest = slots.newest_complete()
        if newest is None:
            return {}
        step, idx = newest
        view = slots.data_view(idx)
        pos = slots.header(idx).data_len // 2
        view[pos] ^= 0xFF
        return {"holder": holder, "rank": rank, "step": step, "offset": pos}
