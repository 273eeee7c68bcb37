"""The training state in one process: the AdamW kernels and the checkpoint layout they produce."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from omegaconf import DictConfig

from gemini.config import to_schema
from gemini.workload.state import TrainState


def _train(cfg: DictConfig, steps: int) -> TrainState:
    state = TrainState(to_schema(cfg), 0, 1, torch.device("cpu"))
    for _ in range(steps):
        state.forward_backward()
        state.optimizer_step()
    return state


@pytest.mark.parametrize("impl", ["fused", "foreach", "for_loop"])
def test_every_adamw_kernel_is_deterministic_and_matches_the_predicted_layout(
    impl: str, compose_cfg: Callable[..., DictConfig]
) -> None:
    cfg = compose_cfg("model=gpt_tiny", f"train.optimizer_impl={impl}", "train.micro_batch=2")
    fresh = TrainState(to_schema(cfg), 0, 1, torch.device("cpu"))
    # The setting reaches torch: the optimizer runs the kernel it names.
    defaults = fresh.optimizer.defaults
    assert (bool(defaults.get("fused")), defaults.get("foreach")) == {
        "fused": (True, None),
        "foreach": (False, True),
        "for_loop": (False, False),
    }[impl]
    spec = fresh.checkpoint_spec()
    a, b = _train(cfg, 3), _train(cfg, 3)
    assert a.digest() == b.digest()
    got = a.tensors()
    # Checkpoint memory is sized from the spec before the first step.
    assert list(got) == list(spec)
    for name, t in got.items():
        assert (t.dtype, tuple(t.shape)) == (spec[name].dtype, tuple(spec[name].shape)), name


def test_the_fused_kernel_computes_the_same_update_as_the_reference_loop(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    fused = _train(compose_cfg("model=gpt_tiny", "train.optimizer_impl=fused"), 3)
    loop = _train(compose_cfg("model=gpt_tiny", "train.optimizer_impl=for_loop"), 3)
    for (name, x), y in zip(fused.tensors().items(), loop.tensors().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)
