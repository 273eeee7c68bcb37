"""The ``memory`` and ``replicated`` backends as components, with real processes.

Each node's worker agent is a real ``gemini.cluster.agent`` process (it owns
the shared-memory slots and, for ``replicated``, the transport server); the
controller's KV store is a real TCPStore in this process. No root agent and no
generation are started, so the agents only heartbeat, allocate slots and
answer inventories. The trainer's side is a real backend over a real
``TrainState`` — in a child process where a crash is the point, in this
process otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from omegaconf import OmegaConf

from gemini.checkpoint import format as fmt
from gemini.checkpoint.backend import BackendContext, CheckpointBackend, make_backend
from gemini.checkpoint.memory import check_shm_budget, estimate_rank_bytes
from gemini.checkpoint.node_memory import corrupt_held_replica
from gemini.checkpoint.slot import list_segments, shm_available_bytes, unlink_prefix
from gemini.cluster import keys
from gemini.cluster.job import JobSpec, new_secret_file
from gemini.cluster.processes import kill_tree, run_processes, spawn_module
from gemini.cluster.recovering import request_trim, trim_acks
from gemini.cluster.store import Store
from gemini.config import ConfigError, GeminiConfig, config_hash, to_schema
from gemini.workload.state import TrainState

pytestmark = pytest.mark.usefixtures("no_leftovers")

CPU = torch.device("cpu")
# A small GPT: a few hundred KiB of checkpoint, so every test is about
# the mechanism and not about copying bytes on a loaded machine.
SMALL_GPT = {
    "name": "gpt_test",
    "kind": "gpt",
    "vocab_size": 256,
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 32,
    "block_size": 32,
}
AGENT_START_S = 120.0  # imports torch; the machine is shared and loaded


def config_dict(tmp_path: Path, backend: dict[str, Any], nodes: int) -> dict[str, Any]:
    """A schema-checked config as the plain dict a JobSpec carries."""
    overrides = {
        "model": SMALL_GPT,
        "cluster": {"nodes": nodes, "ranks_per_node": 1, "heartbeat_s": 0.2},
        "train": {"seq_len": 16, "micro_batch": 2, "steps": 10, "warmup_steps": 2},
        "backend": backend,
        "failure": {"name": "none"},
        "tracking": {"enabled": False},
        "paths": {"outputs": str(tmp_path)},
        "progress": False,
    }
    plain = OmegaConf.to_container(
        OmegaConf.merge(OmegaConf.structured(GeminiConfig), overrides), resolve=True
    )
    assert isinstance(plain, dict)
    return {str(k): v for k, v in plain.items()}


class Nodes:
    """The node side of a job without a root: a KV store and one worker agent per node."""

    def __init__(self, tmp_path: Path, backend: dict[str, Any], nodes: int) -> None:
        self.run_id = f"t{uuid.uuid4().hex[:9]}"
        job_dir = tmp_path / "job"
        (job_dir / "logs").mkdir(parents=True)
        self.job = JobSpec(
            run_id=self.run_id,
            job_dir=str(job_dir),
            store="",
            secret_file=str(new_secret_file(job_dir)),
            config=config_dict(tmp_path, backend, nodes),
        )
        self.store = Store("127.0.0.1", 0, self.job.secret(), timeout_s=30.0, master=True)
        self.job.store = self.store.address
        self.job_path = self.job.save()
        self.agents: dict[int, subprocess.Popen[bytes]] = {}
        for n in range(nodes):
            self.start_agent(n)
        for n in range(nodes):
            self.wait_agent(n, incarnation=1)

    def start_agent(self, node: int) -> None:
        self.agents[node] = spawn_module(
            "gemini.cluster.agent",
            ["--job", str(self.job_path), "--node", str(node)],
            log_path=Path(self.job.job_dir) / "logs" / f"agent{node}.log",
            env={"GEMINI_RUN_ID": self.run_id},
            new_session=True,
        )

    def wait_agent(self, node: int, incarnation: int) -> None:
        deadline = time.monotonic() + AGENT_START_S
        while self.store.get_json_or(keys.agent(node), {}).get("incarnation", 0) < incarnation:
            assert self.agents[node].poll() is None, self.agent_log(node)
            assert time.monotonic() < deadline, f"agent {node} did not register"
            time.sleep(0.05)

    def agent_log(self, node: int) -> str:
        return (Path(self.job.job_dir) / "logs" / f"agent{node}.log").read_text()

    def lose_node(self, node: int) -> None:
        """A hardware failure, as the local launcher does it: tree killed, memory freed."""
        kill_tree(self.agents[node].pid)
        self.agents[node].wait()
        unlink_prefix(f"gemini-{self.run_id}-n{node}-")

    def replace_node(self, node: int) -> None:
        before = self.store.get_json(keys.agent(node))["incarnation"]
        self.start_agent(node)
        self.wait_agent(node, incarnation=before + 1)

    def backend(self, node: int, rank: int, generation: int = 1) -> CheckpointBackend:
        ctx = BackendContext(
            self.job,
            node,
            rank,
            0,
            self.job.world_size,
            config_hash(self.job.cfg),
            generation=generation,
        )
        return make_backend(ctx)

    def trim(self, step: int, generation: int) -> dict[int, Any]:
        """The root's trim request after a plan of ``step``; every live agent's answer."""
        n = request_trim(self.store, step, generation)
        live = [node for node, proc in self.agents.items() if proc.poll() is None]
        deadline = time.monotonic() + 30.0
        while len(acks := trim_acks(self.store, n, live)) < len(live):
            assert time.monotonic() < deadline, f"only {sorted(acks)} of {live} trimmed"
            time.sleep(0.02)
        return acks

    def inventory(self) -> dict[int, dict[str, list[list[int]]]]:
        """What the root would be told: verified [step, generation] per source rank, per node."""
        n = self.store.incr(keys.INV_REQ)
        out = {}
        for node, proc in self.agents.items():
            if proc.poll() is not None:
                continue  # a lost node answers nothing
            key = keys.inventory(n, node)
            assert self.store.wait_for(key, 30.0), f"node {node} did not answer"
            out[node] = self.store.get_json(key)
        return out

    def close(self) -> None:
        self.store.set(keys.DONE, "1")
        for p in self.agents.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_tree(p.pid)
        leftovers = run_processes(self.run_id)
        for proc in leftovers:
            proc.kill()
        psutil.wait_procs(leftovers, timeout=5)
        unlink_prefix(f"gemini-{self.run_id}-")


@pytest.fixture
def memory_node(tmp_path: Path) -> Iterator[Nodes]:
    nodes = Nodes(tmp_path, {"name": "memory"}, nodes=1)
    yield nodes
    nodes.close()
    assert run_processes(nodes.run_id) == []
    assert list_segments(f"gemini-{nodes.run_id}") == []


@pytest.fixture
def replicated_pair(tmp_path: Path) -> Iterator[Nodes]:
    backend = {"name": "replicated", "replication": {"factor": 2, "placement": "group"}}
    nodes = Nodes(tmp_path, backend, nodes=2)
    yield nodes
    nodes.close()
    assert run_processes(nodes.run_id) == []
    assert list_segments(f"gemini-{nodes.run_id}") == []


def tensor_hashes(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of every tensor's bytes: equal hashes, bitwise equal tensors."""
    return {
        k: hashlib.sha256(
            t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        ).hexdigest()
        for k, t in tensors.items()
    }


def train_and_snapshot(
    backend: CheckpointBackend, state: TrainState, steps: int
) -> dict[int, dict[str, Any]]:
    """The trainer's order per step; returns what every snapshot should hold."""
    expected: dict[int, dict[str, Any]] = {}
    for step in range(1, steps + 1):
        state.forward_backward()
        backend.wait()
        state.optimizer_step()
        expected[step] = {
            "hashes": tensor_hashes(state.tensors()),
            "extra": state.extra(),
            "digest": state.digest(),
        }
        backend.snapshot(step, state)
    return expected


def assert_restores(got_tensors: dict[str, torch.Tensor], extra: Any, want: dict[str, Any]) -> None:
    assert tensor_hashes(got_tensors) == want["hashes"]
    assert extra == want["extra"]


# A trainer that checkpoints three steps into its agent's memory and then dies
# like a SIGKILLed process: nothing is closed or flushed.
CRASHING_TRAINER = textwrap.dedent(
    """
    import hashlib, json, os, signal, sys
    import torch
    from gemini.checkpoint.backend import BackendContext, make_backend
    from gemini.cluster.job import JobSpec
    from gemini.config import config_hash
    from gemini.workload.state import TrainState

    job = JobSpec.load(sys.argv[1])
    cfg = job.cfg
    state = TrainState(cfg, 0, job.world_size, torch.device("cpu"))
    backend = make_backend(BackendContext(job, 0, 0, 0, job.world_size, config_hash(cfg)))
    backend.prepare(state)
    expected = {}
    for step in (1, 2, 3):
        state.forward_backward()
        backend.wait()
        state.optimizer_step()
        expected[step] = {
            "hashes": {
                k: hashlib.sha256(
                    t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                ).hexdigest()
                for k, t in state.tensors().items()
            },
            "extra": state.extra(),
            "digest": state.digest(),
        }
        backend.snapshot(step, state)
    backend.wait()
    with open(sys.argv[2], "w") as f:
        json.dump(expected, f)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_memory_checkpoint_survives_a_trainer_crash_and_reads_back_bitwise(
    memory_node: Nodes, tmp_path: Path
) -> None:
    out = tmp_path / "expected.json"
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_TRAINER, str(memory_node.job_path), str(out)],
        env={**os.environ, "GEMINI_RUN_ID": memory_node.run_id},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert child.returncode == -9, child.stderr
    expected = {int(k): v for k, v in json.loads(out.read_text()).items()}
    # The agent (the "host") lived through the crash and reports what it holds.
    # Written by the crashed trainer's generation (the child's context: 0).
    assert memory_node.inventory() == {0: {"0": [[3, 0], [2, 0]]}}

    # The restarted trainer: a fresh state, a fresh backend, the same slots.
    state = TrainState(memory_node.job.cfg, 0, 1, CPU)
    backend = memory_node.backend(node=0, rank=0)
    backend.prepare(state)
    try:
        assert backend.complete_steps() == [3, 2]
        got = backend.retrieve(3, {"kind": "local", "node": 0})
        assert got.source == "local" and got.step == 3
        assert got.bytes > 0 and got.retrieve_s > 0
        assert_restores(got.tensors, got.extra, expected[3])
        state.load(got.tensors, got.extra)
        assert state.digest() == expected[3]["digest"]
    finally:
        backend.close()


def test_memory_backend_reports_local_copy_timings_and_no_replication(
    memory_node: Nodes,
) -> None:
    state = TrainState(memory_node.job.cfg, 0, 1, CPU)
    backend = memory_node.backend(node=0, rank=0)
    try:
        ready = backend.prepare(state)
        # Sized before the first step from the predicted layout.
        _, predicted = fmt.layout(state.checkpoint_spec())
        assert ready["ckpt_capacity_bytes"] == predicted
        t0 = time.perf_counter()
        train_and_snapshot(backend, state, steps=2)
        timing = backend.wait()
        elapsed = time.perf_counter() - t0
        assert timing is not None and timing.step == 2
        assert timing.local_s > 0 and timing.replicate_s == 0.0
        assert timing.bytes == ready["ckpt_capacity_bytes"]
        # The stall is part of what the caller waited, counted once.
        assert timing.stall_s <= elapsed
    finally:
        backend.close()


def test_replicated_checkpoint_is_fetched_from_a_peer_into_the_local_slot_bitwise(
    replicated_pair: Nodes,
) -> None:
    nodes = replicated_pair
    cfg = nodes.job.cfg
    state = TrainState(cfg, 0, 2, CPU)
    backend = nodes.backend(node=0, rank=0)
    backend.prepare(state)
    try:
        expected = train_and_snapshot(backend, state, steps=3)
        timing = backend.wait()
        assert timing is not None and timing.replicate_s > 0 and timing.bytes > 0
    finally:
        backend.close()
    # Node 1 holds rank 0's replica, verified by its agent.
    assert nodes.inventory()[1]["0"] == [[3, 1], [2, 1]]

    nodes.lose_node(0)
    assert list_segments(f"gemini-{nodes.run_id}-n0-") == []
    nodes.replace_node(0)

    fresh = TrainState(cfg, 0, 2, CPU)
    restarted = nodes.backend(node=0, rank=0)
    restarted.prepare(fresh)
    try:
        assert restarted.complete_steps() == []  # a new machine: empty memory
        got = restarted.retrieve(3, {"kind": "peer", "node": 1})
        assert got.source == "peer:1" and got.step == 3 and got.bytes > 0
        assert_restores(got.tensors, got.extra, expected[3])
        # It landed in the new node's own slot: the next failure finds it locally.
        assert restarted.complete_steps() == [3]
        again = restarted.retrieve(3, {"kind": "local", "node": 0})
        assert_restores(again.tensors, again.extra, expected[3])
        fresh.load(got.tensors, got.extra)
        assert fresh.digest() == expected[3]["digest"]
    finally:
        restarted.close()
    assert nodes.inventory()[0]["0"] == [[3, 1]]


def test_a_corrupted_replica_is_left_out_of_the_inventory_and_never_committed(
    replicated_pair: Nodes,
) -> None:
    nodes = replicated_pair
    state = TrainState(nodes.job.cfg, 0, 2, CPU)
    backend = nodes.backend(node=0, rank=0)
    backend.prepare(state)
    try:
        train_and_snapshot(backend, state, steps=2)
        backend.wait()
    finally:
        backend.close()
    nodes.lose_node(0)
    hit = corrupt_held_replica(nodes.job, 1, rank=0)
    assert hit["holder"] == 1 and hit["step"] == 2
    # The holder verifies before it reports: only the intact older step is offered.
    assert nodes.inventory()[1]["0"] == [[1, 1]]

    nodes.replace_node(0)
    restarted = nodes.backend(node=0, rank=0)
    restarted.prepare(TrainState(nodes.job.cfg, 0, 2, CPU))
    try:
        with pytest.raises(fmt.ChecksumError):
            restarted.retrieve(2, {"kind": "peer", "node": 1})
        assert restarted.complete_steps() == []
        got = restarted.retrieve(1, {"kind": "peer", "node": 1})
        assert got.step == 1 and got.source == "peer:1"
    finally:
        restarted.close()


def test_a_rollback_drops_newer_local_and_replica_copies_so_two_slots_stay_current(
    replicated_pair: Nodes,
) -> None:
    """Generation 1 checkpoints steps 1-3 (local on node 0, replica on node 1); the
    plan of generation 2 restores step 2 from elsewhere (storage, say). Step 3 on
    both nodes belongs to the abandoned timeline: the trim drops it, so
    generation 2's step 3 goes into the slot beside step 2 instead of overwriting
    step 2 and leaving the stale step 3 as the only other copy."""
    nodes = replicated_pair
    cfg = nodes.job.cfg
    state = TrainState(cfg, 0, 2, CPU)
    first = nodes.backend(node=0, rank=0, generation=1)
    first.prepare(state)
    try:
        expected = train_and_snapshot(first, state, steps=3)
        first.wait()
    finally:
        first.close()
    assert nodes.inventory() == {0: {"0": [[3, 1], [2, 1]]}, 1: {"0": [[3, 1], [2, 1]]}}

    acks = nodes.trim(step=2, generation=2)
    assert acks == {0: {"0": [3]}, 1: {"0": [3]}}
    assert nodes.inventory() == {0: {"0": [[2, 1]]}, 1: {"0": [[2, 1]]}}
    # Asked again (the same plan): nothing left to drop.
    assert nodes.trim(step=2, generation=2) == {0: {}, 1: {}}

    # Generation 2 restores step 2 and writes step 3 again.
    fresh = TrainState(cfg, 0, 2, CPU)
    second = nodes.backend(node=0, rank=0, generation=2)
    second.prepare(fresh)
    try:
        got = second.retrieve(2, {"kind": "local", "node": 0})
        assert_restores(got.tensors, got.extra, expected[2])
        fresh.load(got.tensors, got.extra)
        del got
        again = train_and_snapshot_from(second, fresh, first_step=3, last_step=3)
        second.wait()
    finally:
        second.close()
    assert again[3]["digest"] == expected[3]["digest"]  # the same state, another timeline
    # Both tiers hold the current timeline's last two steps.
    assert nodes.inventory() == {0: {"0": [[3, 2], [2, 1]]}, 1: {"0": [[3, 2], [2, 1]]}}


def train_and_snapshot_from(
    backend: CheckpointBackend, state: TrainState, first_step: int, last_step: int
) -> dict[int, dict[str, Any]]:
    expected: dict[int, dict[str, Any]] = {}
    for step in range(first_step, last_step + 1):
        state.forward_backward()
        backend.wait()
        state.optimizer_step()
        expected[step] = {"digest": state.digest()}
        backend.snapshot(step, state)
    return expected


# -- the /dev/shm budget --------------------------------------------------------------
ComposeFn = Callable[[list[str]], Any]


def medium_config(hydra_compose: ComposeFn, nodes: int, rpn: int, factor: int) -> GeminiConfig:
    """gpt_medium replicated ``factor`` times, composed from conf/ as the CLI does."""
    return to_schema(
        hydra_compose(
            [
                "model=gpt_medium",
                "backend=replicated",
                "failure=none",
                f"cluster.nodes={nodes}",
                f"cluster.ranks_per_node={rpn}",
                f"backend.replication.factor={factor}",
            ]
        )
    )


def test_shm_budget_refuses_slots_that_cannot_fit_naming_need_and_availability(
    hydra_compose: ComposeFn,
) -> None:
    cfg = medium_config(hydra_compose, nodes=4, rpn=2, factor=4)
    per_rank = estimate_rank_bytes(cfg)
    # 4 nodes and the default standby node, which allocates as much as any node.
    assert cfg.cluster.standby_nodes == 1
    need = 10 * 4 * 2 * per_rank
    available = shm_available_bytes()
    assert need > available, "this host's /dev/shm is large enough to hold it: pick a bigger case"
    with pytest.raises(ConfigError) as err:
        check_shm_budget(cfg)
    e = err.value
    assert e.key == "backend.replication.factor" and e.value == 4
    msg = str(e)
    assert msg.startswith("backend.replication.factor=4: ")
    assert f"need {need / 2**30:.1f} GiB of /dev/shm" in msg
    assert f"but {available / 2**30:.1f} GiB is available" in msg
    assert "10 ranks x 4 copies x 2 slots" in msg
    assert "\n" not in msg


def test_shm_budget_accepts_a_layout_that_fits(hydra_compose: ComposeFn) -> None:
    check_shm_budget(medium_config(hydra_compose, nodes=1, rpn=1, factor=1))


def test_cli_refuses_an_impossible_shm_layout_in_one_line_and_allocates_nothing(
    gemini_cli: Callable[..., Any],
    outputs_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A private directory on the same tmpfs: the same budget, and it shows
    # exactly what this run allocated even while other jobs use /dev/shm.
    shm_dir = Path("/dev/shm") / f"gemini-test-{uuid.uuid4().hex[:8]}"
    shm_dir.mkdir()
    monkeypatch.setenv("GEMINI_SHM_DIR", str(shm_dir))
    try:
        rc, _, stderr = gemini_cli(
            [
                "model=gpt_medium",
                "backend=replicated",
                "failure=none",
                "cluster.nodes=4",
                "cluster.ranks_per_node=2",
                "backend.replication.factor=4",
                "tracking=off",
            ],
            tmp_path,
            timeout_s=240,
        )
        assert rc == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert lines[0].startswith("gemini: error: backend.replication.factor=4: ")
        assert "GiB of /dev/shm" in lines[0] and "is available" in lines[0]
        assert list(shm_dir.iterdir()) == []
        # Refused before any job was set up: not even its directory exists.
        assert not outputs_dir.exists()
    finally:
        for p in shm_dir.iterdir():
            p.unlink()
        shm_dir.rmdir()
