"""Checkpoints on a (stand-in) shared filesystem: round trips, crash safety, integrity,
pruning, the emulated bandwidth cap, the config check and the ``disk`` backend end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from gemini.checkpoint import format as fmt
from gemini.checkpoint.backend import BackendContext, CheckpointError
from gemini.checkpoint.disk import (
    DiskBackend,
    DiskStore,
    encode_manifest,
    storage_checkpoints,
    storage_complete_steps,
    trim_storage,
)
from gemini.cluster.job import JobSpec
from gemini.config import BackendConfig, GeminiConfig
from gemini.workload.state import TrainState

REPO = Path(__file__).resolve().parents[1]
_CHUNK = 16 << 10  # small chunks so a corruption points at one tensor


def make_state(step: int) -> dict[str, torch.Tensor]:
    """A deterministic state that differs per step."""
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(128, 256, generator=g),
        "b": torch.randn(4096, generator=g).to(torch.bfloat16),
        "step": torch.tensor(step, dtype=torch.int64),
    }


def stage(
    step: int, rank: int = 0, world_size: int = 1, config_hash: str = "cfg", generation: int = 1
) -> tuple[fmt.Manifest, torch.Tensor]:
    state = make_state(step)
    entries, nbytes = fmt.layout(state)
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    fmt.write_state(state, entries, buf)
    manifest = fmt.make_manifest(
        state,
        step=step,
        rank=rank,
        world_size=world_size,
        config_hash=config_hash,
        extra={"data_position": step},
        buf=buf,
        chunk_bytes=_CHUNK,
        generation=generation,
    )
    return manifest, buf


def write_step(
    store: DiskStore, step: int, rank: int = 0, world_size: int = 1, generation: int = 1
) -> torch.Tensor:
    manifest, buf = stage(step, rank, world_size, generation=generation)
    store.write(rank, step, manifest, buf)
    return buf


def assert_reads_back(store: DiskStore, step: int, rank: int = 0) -> None:
    manifest, view = store.read(rank, step)
    assert manifest.step == step and manifest.extra == {"data_position": step}
    got = fmt.read_state(view, manifest)
    for name, t in make_state(step).items():
        assert torch.equal(
            got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
        ), name


# -- DiskStore --------------------------------------------------------------------
def test_write_then_read_is_bitwise_equal(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, "run")
    buf = write_step(store, 7, rank=3, world_size=4)
    assert store.data_path(3, 7) == tmp_path / "run" / "step_00000007" / "rank_00003.bin"
    assert store.manifest_path(3, 7).exists()
    _, view = store.read(3, 7)
    assert bytes(view) == bytes(buf.numpy())
    assert_reads_back(store, 7, rank=3)
    # No temporary files are left behind by a successful write.
    assert sorted(p.name for p in store.step_dir(7).iterdir()) == [
        "rank_00003.bin",
        "rank_00003.json",
    ]


def test_read_into_a_preallocated_buffer_aliases_it(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, "run")
    buf = write_step(store, 1)
    into = torch.full((buf.numel() + 100,), 0xAB, dtype=torch.uint8)
    _, view = store.read(0, 1, into=into)
    assert view.nbytes == buf.numel()
    assert torch.equal(into[: buf.numel()], buf)
    assert int(into[-1]) == 0xAB  # bytes past the checkpoint untouched
    with pytest.raises(CheckpointError, match="needs"):
        store.read(0, 1, into=torch.empty(10, dtype=torch.uint8))


def test_rewriting_a_step_replaces_it(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, "run")
    write_step(store, 1)
    manifest, buf = stage(5)
    manifest.step = 1  # step 5's bytes written as step 1 (training rewound)
    manifest.extra = {"data_position": 1}
    store.write(0, 1, manifest, buf)
    _, view = store.read(0, 1)
    assert bytes(view) == bytes(buf.numpy())


def test_killed_writer_leaves_no_manifest_and_the_previous_step_intact(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, "run")
    write_step(store, 1)
    # A 32 MiB write capped at 0.05 Gbit/s takes ~5 s: plenty of time to kill it mid-file.
    child = textwrap.dedent(
        f"""
        import torch
        from gemini.checkpoint import format as fmt
        from gemini.checkpoint.disk import DiskStore
        state = {{"big": torch.ones(8 << 20)}}
        entries, n = fmt.layout(state)
        buf = torch.zeros(n, dtype=torch.uint8)
        fmt.write_state(state, entries, buf)
        m = fmt.make_manifest(state, step=2, rank=0, world_size=1, config_hash="cfg",
                              extra={{}}, buf=buf)
        DiskStore({str(tmp_path)!r}, "run", bandwidth_gbps=0.05).write(0, 2, m, buf)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", child], env=env)
    tmp = store.step_dir(2) / ".rank_00000.bin.tmp"
    try:
        deadline = time.monotonic() + 20
        while not (tmp.exists() and tmp.stat().st_size >= 1 << 20):
            assert proc.poll() is None, "writer exited before it could be killed"
            assert time.monotonic() < deadline, "writer never started writing"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not store.manifest_path(0, 2).exists()
    assert not store.data_path(0, 2).exists()
    assert store.rank_steps(0) == [1]
    assert store.complete_steps(1) == [1]
    assert_reads_back(store, 1)
    # A retry of the same step overwrites what the dead writer left.
    write_step(store, 2)
    assert store.rank_steps(0) == [2, 1]
    assert not tmp.exists()


def test_a_trim_clears_what_a_killed_writer_left_in_the_steps_it_keeps(tmp_path: Path) -> None:
    # Rank 1 died writing step 3; the recovery restored step 3 from memory, and
    # step 3 may never be persisted again: its temporary file must not outlive
    # the run.
    config = GeminiConfig(backend=BackendConfig(path=str(tmp_path / "ckpt")))
    store = DiskStore(tmp_path / "ckpt", "run")
    for step in (2, 3):
        write_step(store, step, rank=0, world_size=2)
    write_step(store, 2, rank=1, world_size=2)
    left = [
        store.step_dir(3) / ".rank_00001.bin.tmp",
        store.step_dir(3) / ".rank_00001.json.tmp",
    ]
    for path in left:
        path.write_bytes(b"half")
    assert trim_storage(config, tmp_path, "run", 3) == []
    assert not any(p.exists() for p in left)
    assert store.rank_steps(0) == [3, 2]
    assert store.complete_steps(2) == [2]
    assert store.clear_partial_writes() == []


def test_flipped_byte_is_detected_naming_file_chunk_and_tensor(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, "run")
    manifest, buf = stage(1)
    store.write(0, 1, manifest, buf)
    entry = next(e for e in manifest.tensors if e.name == "b")
    path = store.data_path(0, 1)
    with open(path, "r+b") as f:
        f.seek(entry.offset + 10)
        byte = f.read(1)
        f.seek(entry.offset + 10)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(fmt.ChecksumError) as ei:
        store.read(0, 1)
    e = ei.value
    assert str(path) in str(e)
    assert "b" in e.tensors
    assert e.chunk == (entry.offset + 10) // _CHUNK
    assert f"chunk {e.chunk}" in str(e) and "b" in str(e)


def test_tampered_manifest_is_refused(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, "run")
    write_step(store, 1)
    path = store.manifest_path(0, 1)
    good = path.read_bytes()

    # Changing the non-tensor state (not covered by the chunk checksums).
    path.write_bytes(good.replace(b'"data_position":1', b'"data_position":9'))
    with pytest.raises(fmt.FormatError, match="manifest digest mismatch") as ei:
        store.read(0, 1)
    assert str(path) in str(ei.value)

    # A torn manifest.
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(fmt.FormatError, match=str(path)):
        store.read(0, 1)

    # A consistently re-sealed manifest with a forged chunk checksum still fails.
    manifest = fmt.Manifest.from_json(good[good.index(b'"manifest":') + 11 : -2])
    manifest.checksums[0] = "0" * 16
    path.write_bytes(encode_manifest(manifest))
    with pytest.raises(fmt.ChecksumError):
        store.read(0, 1)

    # A manifest moved to another rank's place.
    path.write_bytes(good)
    other = store.manifest_path(1, 1)
    other.write_bytes(good)
    with pytest.raises(fmt.FormatError, match="its place says step 1 rank 1"):
        store.read_manifest(1, 1)


def test_truncated_data_file_is_refused(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, "run")
    write_step(store, 1)
    path = store.data_path(0, 1)
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(fmt.FormatError, match="truncated"):
        store.read(0, 1)


def test_complete_steps_require_every_rank(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, "run")
    assert store.complete_steps(2) == [] and store.rank_steps(0) == []
    write_step(store, 1, rank=0, world_size=2)
    assert store.rank_steps(0) == [1] and store.rank_steps(1) == []
    assert store.complete_steps(2) == []
    write_step(store, 1, rank=1, world_size=2)
    assert store.complete_steps(2) == [1]
    with pytest.raises(CheckpointError, match="no complete checkpoint of rank 0 at step 2"):
        store.read(0, 2)


def test_prune_keeps_the_newest_complete_steps_and_newer_partial_ones(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, "run", keep_last=2)
    for step in (1, 2, 3, 4):
        for rank in (0, 1):
            write_step(store, step, rank, world_size=2)
    write_step(store, 5, rank=0, world_size=2)  # rank 1 still writing step 5
    assert store.prune(2) == [2, 1]
    assert store.complete_steps(2) == [4, 3]
    assert store.rank_steps(0) == [5, 4, 3]
    assert store.rank_steps(1) == [4, 3]
    assert sorted(p.name for p in store.run_dir.iterdir()) == [
        "step_00000003",
        "step_00000004",
        "step_00000005",
    ]
    assert store.prune(2) == []
    assert_reads_back(store, 3, rank=1)


def test_a_rollback_drops_every_newer_step_and_keeps_the_restored_one(tmp_path: Path) -> None:
    # Generation 1 persisted steps 2..5 (step 6 only half: rank 1 was lost);
    # generation 2 restored step 3. Steps 4..6 belong to the abandoned timeline.
    store = DiskStore(tmp_path, "run", keep_last=2)
    for step in (2, 3, 4, 5):
        for rank in (0, 1):
            write_step(store, step, rank, world_size=2)
    write_step(store, 6, rank=0, world_size=2)
    assert store.drop_newer_than(3) == [6, 5, 4]
    assert store.complete_steps(2) == [3, 2]
    assert sorted(p.name for p in store.run_dir.iterdir()) == ["step_00000002", "step_00000003"]
    assert_reads_back(store, 3, rank=1)
    assert store.drop_newer_than(3) == []
    # The new timeline's steps then count for pruning, not the abandoned ones.
    for step in (4, 5):
        for rank in (0, 1):
            write_step(store, step, rank, world_size=2, generation=2)
    assert store.prune(2) == [3, 2]
    assert store.complete_steps(2) == [5, 4]
    assert store.generation(5, 2) == 2


def test_storage_reports_the_generation_of_each_complete_step(tmp_path: Path) -> None:
    config = GeminiConfig()
    config.backend.path = str(tmp_path / "ckpt")
    store = DiskStore(tmp_path / "ckpt", "run")
    write_step(store, 2, rank=0, world_size=2, generation=1)
    write_step(store, 2, rank=1, world_size=2, generation=1)
    write_step(store, 3, rank=0, world_size=2, generation=1)
    write_step(store, 3, rank=1, world_size=2, generation=2)
    assert storage_checkpoints(config, tmp_path, "run", 2) == [(3, 1), (2, 1)]
    assert trim_storage(config, tmp_path, "run", 2) == [3]
    assert storage_checkpoints(config, tmp_path, "run", 2) == [(2, 1)]


def test_bandwidth_cap_bounds_write_and_read_time(tmp_path: Path) -> None:
    gbps = 0.5
    store = DiskStore(tmp_path, "run", bandwidth_gbps=gbps)
    manifest, buf = stage(1)
    data = torch.zeros(8 << 20, dtype=torch.uint8)
    data[: buf.numel()] = buf
    manifest.tensors.append(
        fmt.TensorEntry("pad", "uint8", ((8 << 20) - (1 << 20),), 1 << 20, (8 << 20) - (1 << 20))
    )
    manifest.data_nbytes = 8 << 20
    manifest.checksums = fmt.checksum(data, manifest.data_nbytes, manifest.chunk_bytes)
    floor_s = (8 << 20) * 8 / (gbps * 1e9)  # 0.134 s
    took = store.write(0, 1, manifest, data)
    assert floor_s <= took < floor_s + 5.0
    t0 = time.perf_counter()
    store.read(0, 1)
    assert floor_s <= time.perf_counter() - t0 < floor_s + 5.0
    d = store.describe()
    assert d["bandwidth_emulated"] is True and "emulated" in str(d["bandwidth"])
    assert DiskStore(tmp_path, "run").describe()["bandwidth_emulated"] is False


def test_checkpoint_of_another_config_is_refused_in_one_line(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, "run")
    write_step(store, 1)  # config_hash "cfg"
    store.check_config("cfg", 1, 0)
    with pytest.raises(CheckpointError) as ei:
        store.check_config("other", 1, 0)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg == (
        f"checkpoint at {store.manifest_path(0, 1)} was written by another config "
        "(hash cfg, this run other): point backend.path elsewhere or delete it"
    )
    cfg = GeminiConfig(backend=BackendConfig(path=str(tmp_path)))
    assert storage_complete_steps(cfg, "/nonexistent", "run", 1) == [1]
    assert storage_complete_steps(cfg, "/nonexistent", "run", 1, config_hash="cfg") == [1]
    with pytest.raises(CheckpointError, match="another config"):
        storage_complete_steps(cfg, "/nonexistent", "run", 1, config_hash="other")


def test_storage_root_defaults_under_the_job_dir(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "checkpoints", "run")
    write_step(store, 3)
    assert storage_complete_steps(GeminiConfig(), str(tmp_path), "run", 1) == [3]


# -- DiskBackend with a real TrainState --------------------------------------------
def tiny_config(persist: str, tmp_path: Path) -> dict[str, Any]:
    """A real GeminiConfig (schema-checked) with a tiny GPT and the disk backend."""
    overrides = {
        "model": {"name": "gpt_tiny", "kind": "gpt", "vocab_size": 64, "n_layer": 1,
                  "n_head": 2, "n_embd": 16, "block_size": 16},
        "cluster": {"nodes": 1},
        "train": {"seq_len": 8, "micro_batch": 2},
        "backend": {"name": "disk", "persist": persist, "keep_last": 2, "chunk_mb": 1},
        "paths": {"outputs": str(tmp_path)},
        "tracking": {"enabled": False},
    }  # fmt: skip
    cfg = OmegaConf.merge(OmegaConf.structured(GeminiConfig), overrides)
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    return {str(k): v for k, v in plain.items()}


def stepped_state(config: dict[str, Any], tmp_path: Path) -> TrainState:
    """``config``'s training state after one optimizer step (AdamW state exists)."""
    job = JobSpec(run_id="job1", job_dir=str(tmp_path), store="", secret_file="", config=config)
    state = TrainState(job.cfg, 0, 1, torch.device("cpu"))
    state.forward_backward()
    state.optimizer_step()
    return state


def make_backend(config: dict[str, Any], tmp_path: Path, config_hash: str = "h") -> DiskBackend:
    job = JobSpec(run_id="job1", job_dir=str(tmp_path), store="", secret_file="", config=config)
    ctx = BackendContext(job, node=0, rank=0, local_rank=0, world_size=1, config_hash=config_hash)
    return DiskBackend(ctx)


def tensor_bytes(state: TrainState) -> dict[str, bytes]:
    return {
        k: t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for k, t in state.tensors().items()
    }


@pytest.mark.parametrize("persist", ["blocking", "background"])
def test_disk_backend_restores_train_state_bitwise(persist: str, tmp_path: Path) -> None:
    config = tiny_config(persist, tmp_path)
    job = JobSpec(run_id="job1", job_dir=str(tmp_path), store="", secret_file="", config=config)
    cfg = job.cfg
    cpu = torch.device("cpu")
    state = TrainState(cfg, 0, 1, cpu)
    backend = make_backend(config, tmp_path)
    assert backend.describe()["persist"] == persist
    expected: dict[int, tuple[str, dict[str, bytes]]] = {}
    # The trainer's order: forward/backward, wait for the in-flight copy, step, snapshot.
    for step in (1, 2, 3):
        state.forward_backward()
        timing = backend.wait()
        if step > 1:
            assert timing is not None and timing.step == step - 1
            assert timing.bytes > 0 and timing.local_s > 0
        state.optimizer_step()
        backend.snapshot(step, state)
        expected[step] = (state.digest(), tensor_bytes(state))
    state.forward_backward()  # overlaps the last background copy
    last = backend.wait()
    assert last is not None and last.step == 3
    backend.close()
    assert backend.last_persisted is not None and backend.last_persisted.step == 3
    assert backend.last_persisted.persist_s > 0
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in (root / "job1").iterdir()) == ["step_00000002", "step_00000003"]

    # A restarted rank: a new backend and a fresh state.
    restarted = make_backend(config, tmp_path)
    assert restarted.complete_steps() == [3, 2]
    for step in (3, 2):
        got = restarted.retrieve(step)
        assert got.source == "storage" and got.step == step and got.bytes > 0
        assert got.retrieve_s > 0
        fresh = TrainState(cfg, 0, 1, cpu)
        fresh.load(got.tensors, got.extra)
        digest, tensors = expected[step]
        assert fresh.digest() == digest
        assert tensor_bytes(fresh) == tensors
    # Training continues identically from the restored state.
    fresh = TrainState(cfg, 0, 1, cpu)
    got = restarted.retrieve(3)
    fresh.load(got.tensors, got.extra)
    restarted.close()
    loss_a, loss_b = fresh.forward_backward(), state.forward_backward()
    assert loss_a == loss_b


def test_disk_backend_refuses_a_checkpoint_of_another_config(tmp_path: Path) -> None:
    config = tiny_config("blocking", tmp_path)
    state = stepped_state(config, tmp_path)
    writer = make_backend(config, tmp_path, config_hash="aaaa")
    writer.snapshot(1, state)
    writer.wait()
    writer.close()
    reader = make_backend(config, tmp_path, config_hash="bbbb")
    with pytest.raises(CheckpointError, match=r"another config \(hash aaaa, this run bbbb\)"):
        reader.retrieve(1)


def test_background_wait_returns_before_the_write_and_next_snapshot_waits_for_it(
    tmp_path: Path,
) -> None:
    config = tiny_config("background", tmp_path)
    state = stepped_state(config, tmp_path)
    nbytes = fmt.layout(state.tensors())[1]
    write_s = 0.6
    # An emulated cap at which this checkpoint's write takes ~write_s seconds.
    config["backend"]["bandwidth_gbps"] = nbytes * 8 / write_s / 1e9
    backend = make_backend(config, tmp_path)
    backend.snapshot(1, state)
    first = backend.wait()
    assert first is not None and first.stall_s < write_s / 2
    assert backend.last_persisted is None  # still writing
    assert backend.complete_steps() == []
    backend.snapshot(2, state)  # joins the write of step 1: that wait is stall
    second = backend.wait()
    assert second is not None and second.stall_s > write_s / 2
    assert backend.last_persisted is first and first.persist_s >= write_s
    backend.close()
    assert backend.complete_steps() == [2, 1]


def test_background_checkpoint_cost_is_unknown_until_a_persist_finishes(tmp_path: Path) -> None:
    # The cadence policies' t_ckpt: the copy alone would understate it many
    # times over and keep HighFreq's interval too short.
    config = tiny_config("background", tmp_path)
    state = stepped_state(config, tmp_path)
    nbytes = fmt.layout(state.tensors())[1]
    config["backend"]["bandwidth_gbps"] = nbytes * 8 / 0.5 / 1e9  # ~0.5 s per write
    backend = make_backend(config, tmp_path)
    backend.snapshot(1, state)
    first = backend.wait()
    assert first is not None and backend.checkpoint_cost(first) is None
    backend.snapshot(2, state)
    second = backend.wait()
    assert second is not None
    cost = backend.checkpoint_cost(second)
    assert first is not None and second is not None and cost is not None
    assert cost == second.local_s + first.persist_s and cost >= 0.5
    backend.close()


def test_background_write_failure_surfaces_by_close(tmp_path: Path) -> None:
    config = tiny_config("background", tmp_path)
    state = stepped_state(config, tmp_path)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    job = JobSpec(run_id="job1", job_dir=str(tmp_path), store="", secret_file="", config=config)
    ctx = BackendContext(job, node=0, rank=0, local_rank=0, world_size=1, config_hash="h")
    backend = DiskBackend(ctx, root=not_a_dir)
    backend.snapshot(1, state)
    # The copy into RAM succeeds; the write fails in the thread, and the error
    # reaches the caller by close at the latest (wait, if it is already known).
    with pytest.raises(CheckpointError, match="background checkpoint failed"):
        backend.wait()
        backend.close()
    backend.close()


def test_a_failed_generation_abandons_its_write_in_flight_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    # A survivor restarting in place closes its backend with abandon=True: a
    # write still in flight stops at its next chunk and removes what it
    # wrote, as in a process that died, instead of holding up the recovery.
    config = tiny_config("background", tmp_path)
    state = stepped_state(config, tmp_path)
    nbytes = fmt.layout(state.tensors())[1]
    config["backend"]["bandwidth_gbps"] = nbytes * 8 / 60.0 / 1e9  # ~60 s per write
    backend = make_backend(config, tmp_path)
    backend.snapshot(1, state)
    assert backend.wait() is not None  # the copy is done; the write goes on
    backend.close(abandon=True)
    assert backend.last_persisted is None
    assert backend.store.rank_steps(0) == []
    step_dir = backend.store.step_dir(1)
    assert not step_dir.exists() or list(step_dir.iterdir()) == []
