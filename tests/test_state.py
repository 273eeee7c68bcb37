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


@pytest.mark.parametrize(
    ("impl", "step_device"), [("fused", "meta"), ("foreach", "cpu"), ("for_loop", "cpu")]
)
def test_restored_optimizer_state_lands_on_the_parameters_device(
    impl: str, step_device: str, compose_cfg: Callable[..., DictConfig]
) -> None:
    # No GPU here: parameters on the ``meta`` device stand in for a GPU's.
    # The checkpoint is read back on the host, as on a GPU machine; the state
    # must follow its parameter, except AdamW's ``step``, which torch keeps on
    # the host unless the kernel is fused (then float32 beside the parameter).
    cfg = compose_cfg("model=gpt_tiny", f"train.optimizer_impl={impl}", "train.micro_batch=1")
    saved = _train(cfg, 2)
    restored = TrainState(to_schema(cfg), 0, 1, torch.device("meta"))
    restored.load(saved.tensors(), saved.extra())
    for p in restored.params:
        st = restored.optimizer.state[p]
        assert sorted(st) == ["exp_avg", "exp_avg_sq", "step"]
        assert (st["exp_avg"].device.type, st["exp_avg"].dtype) == ("meta", p.dtype)
        assert (st["exp_avg_sq"].device.type, st["exp_avg_sq"].dtype) == ("meta", p.dtype)
        assert (st["step"].device.type, st["step"].dtype) == (step_device, torch.float32)
    assert restored.step == 2


def test_restored_optimizer_state_is_a_copy_not_a_view_of_the_checkpoint(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    # Checkpoint memory is reused by the next snapshot: a restore that kept
    # views of it would see its optimizer state change under it.
    cfg = compose_cfg("model=gpt_tiny", "train.micro_batch=1")
    saved = _train(cfg, 2)
    tensors = {k: v.clone() for k, v in saved.tensors().items()}
    restored = TrainState(to_schema(cfg), 0, 1, torch.device("cpu"))
    restored.load(tensors, saved.extra())
    before = restored.digest()
    for t in tensors.values():
        t.zero_()
    assert restored.digest() == before == saved.digest()
