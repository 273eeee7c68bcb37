"""Checks that need a CUDA device: run by scripts/gpu_check.sh on a GPU machine.

Skipped where no GPU is visible (the CPU-only test machines). Nothing is
mocked: without a device these tests simply do not run.
"""

from __future__ import annotations

import pytest
import torch

from gemini.checkpoint import format as fmt
from gemini.config import GeminiConfig, ModelConfig
from gemini.workload.state import TrainState

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
