"""Checks that need a CUDA device: run by scripts/gpu_check.sh on a GPU machine.

Skipped where no GPU is visible (the CPU-only test machines). Nothing is
mocked: without a device these tests simply do not run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gemini.checkpoint import format as fmt
from gemini.checkpoint.backend import BackendContext, make_backend
from gemini.cluster.job import JobSpec
from gemini.config import GeminiConfig, ModelConfig
from gemini.workload.state import TrainState
from gemini.workload.trainer import (
    CadenceAgreement,
    pick_device,
    process_group_backend,
    restore,
    train_step,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _state(device: torch.device) -> TrainState:
    return TrainState(GeminiConfig(model=ModelConfig(name="gpt_tiny")), 0, 1, device)


def test_a_cuda_state_checkpointed_to_host_memory_restores_bitwise() -> None:
    dev = torch.device("cuda")
    src = _state(dev)
    for _ in range(3):
        src.forward_backward()
        src.optimizer_step()
    tensors = src.tensors()
    entries, nbytes = fmt.layout(tensors)
    buf = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    fmt.write_state(tensors, entries, buf)
    manifest = fmt.make_manifest(
        tensors, step=src.step, rank=0, world_size=1, config_hash="gpu", extra=src.extra(), buf=buf
    )
    fmt.verify(buf, manifest)

    dst = _state(dev)
    dst.forward_backward()
    dst.optimizer_step()  # creates the optimizer state that load() fills
    dst.load(fmt.read_state(buf, manifest), manifest.extra)
    assert dst.digest() == src.digest()
    # Training on from the restored state matches training on from the original.
    assert dst.forward_backward() == src.forward_backward()


def test_the_same_seed_builds_the_same_cuda_model() -> None:
    dev = torch.device("cuda")
    assert _state(dev).digest() == _state(dev).digest()


def _disk_job(tmp_path: Path, impl: str) -> JobSpec:
    overrides = {
        "model": {"name": "gpt_tiny"},
        "cluster": {"nodes": 1, "device": "cuda"},
        "train": {"steps": 6, "optimizer_impl": impl},
        "backend": {"name": "disk", "persist": "blocking", "keep_last": 10},
        "paths": {"outputs": str(tmp_path)},
        "tracking": {"enabled": False},
    }
    plain = OmegaConf.to_container(
        OmegaConf.merge(OmegaConf.structured(GeminiConfig), overrides), resolve=True
    )
    assert isinstance(plain, dict)
    config = {str(k): v for k, v in plain.items()}
    return JobSpec(run_id="gpu", job_dir=str(tmp_path), store="", secret_file="", config=config)


@pytest.mark.parametrize("impl", ["fused", "foreach", "for_loop"])
def test_a_cuda_rank_restored_from_a_checkpoint_trains_on_to_the_failure_free_state(
    impl: str, tmp_path: Path
) -> None:
    # The trainer's own step, checkpoint and restore functions on one CUDA rank:
    # a run checkpoints every step to the end; a second "restarted" rank
    # restores step 3 from it, takes the remaining optimizer steps, and must
    # end bitwise where the run that never failed ended.
    job = _disk_job(tmp_path, impl)
    cfg = job.cfg
    dev = pick_device(cfg, 0, 0)
    assert dev.type == "cuda"
    ctx = BackendContext(job, node=0, rank=0, local_rank=0, world_size=1, config_hash="gpu")

    reference = TrainState(cfg, 0, 1, dev)
    backend = make_backend(ctx)
    restore(reference, backend, {"start_step": 0})
    cadence = CadenceAgreement(cfg, backend, dev)
    for step in range(1, cfg.train.steps + 1):
        train_step(reference, backend, cadence, step)
    backend.wait()
    backend.close()

    restarted = TrainState(cfg, 0, 1, dev)
    backend = make_backend(ctx)
    ready = restore(restarted, backend, {"start_step": 3, "sources": {"0": {}}})
    assert (ready["source"], restarted.step) == ("storage", 3)
    for p in restarted.params:
        for key, t in restarted.optimizer.state[p].items():
            want = "cpu" if key == "step" and impl != "fused" else "cuda"
            assert t.device.type == want, (key, impl)
    cadence = CadenceAgreement(cfg, backend, dev)
    for step in range(4, cfg.train.steps + 1):
        train_step(restarted, backend, cadence, step)
    backend.wait()
    backend.close()
    assert restarted.step == reference.step == cfg.train.steps
    assert restarted.digest() == reference.digest()


def test_ranks_take_the_gpus_round_robin_and_use_nccl_only_with_one_each() -> None:
    n = torch.cuda.device_count()
    one_rank = _disk_job(Path("/unused"), "fused").cfg
    one_rank.cluster.nodes = 1
    assert process_group_backend(one_rank, pick_device(one_rank, 0, 0)) == "nccl"
    crowded = _disk_job(Path("/unused"), "fused").cfg
    crowded.cluster.nodes = n + 1  # more ranks on this host than GPUs
    devices = [pick_device(crowded, r, 0) for r in range(n + 1)]
    assert [d.index for d in devices] == [*range(n), 0]
    assert process_group_backend(crowded, devices[0]) == "gloo"
