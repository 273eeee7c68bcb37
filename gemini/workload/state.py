"""The training state of one rank: model, optimizer, schedule, step, RNG, data position.

``ddp`` keeps a full replica of model and optimizer on every rank. ``zero``
shards the optimizer state with ``ZeroRedundancyOptimizer`` and, as in the
setting Gemini targets, each rank's checkpoint holds only the unique slice it
owns: its partition of the parameters and their optimizer state. Restoring a
``zero`` checkpoint therefore loads each rank's slice and broadcasts every
parameter from its owner.

The checkpoint is a flat set of named tensors plus a JSON-able ``extra``
dict — never a pickle.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from gemini.config import GeminiConfig
from gemini.workload.data import SyntheticData
from gemini.workload.models import build_model


def lr_lambda(warmup: int, total: int) -> Any:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


_ADAMW_KERNELS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "for_loop": {"foreach": False},
}


def adamw_options(impl: str) -> dict[str, bool]:
    """The ``torch.optim.AdamW`` keyword that selects ``train.optimizer_impl``'s kernel."""
    return dict(_ADAMW_KERNELS[impl])


def make_cuda_deterministic() -> None:
    """Make CUDA kernels bitwise repeatable, which exact recovery relies on.

    Some CUDA kernels reduce in an order that varies from run to run (atomic
    adds in backward passes, cuBLAS split reductions with several
    workspaces): a restored run would then differ from the uninterrupted one
    for no fault of the checkpoint. cuBLAS reads its workspace setting when
    it creates a handle, at the first matmul, so this must run before any.
    Kernels with no deterministic version warn instead of failing; the
    digest comparisons are what prove a run exact.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def place_optimizer_state(
    opt: torch.optim.Optimizer, param: torch.Tensor, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Copies of ``param``'s restored optimizer state, where the optimizer step expects them.

    A checkpoint is read back into host memory, but the state must live with
    its parameter (on its GPU), or the first optimizer step after a restore
    fails. AdamW's ``step`` is the exception: torch keeps it a host scalar
    (one fewer kernel launch per parameter) unless the group is ``fused`` or
    ``capturable``, in which case the kernel reads it as float32 on the
    parameter's device. The same rule as torch's own ``load_state_dict``.
    Always copies: the input may alias checkpoint memory that is reused.
    """
    group = next(g for g in opt.param_groups if any(q is param for q in g["params"]))
    on_device = bool(group.get("fused") or group.get("capturable"))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "step":
            if on_device:
                out[key] = value.to(device=param.device, dtype=torch.float32, copy=True)
            else:
                out[key] = value.to(device="cpu", copy=True)
        elif value.is_floating_point() and param.is_floating_point():
            out[key] = value.to(device=param.device, dtype=param.dtype, copy=True)
        else:
            out[key] = value.to(device=param.device, copy=True)
    return out


class TrainState:
    """Everything one rank needs to resume exactly, and how to (de)serialise it."""

    def __init__(
        self,
        cfg: GeminiConfig,
        rank: int,
        world_size: int,
        device: torch.device,
        module: nn.Module | None = None,
    ) -> None:
        """``module``: a model this process built before (a previous generation's,
        or a spare's, built while it waited) to train instead of building one.

        Only for a state about to be loaded from a checkpoint: its weights are
        whatever they were, and the load overwrites every one of them. The
        optimizer, its schedule and the DDP wrapper are always new: they hold
        the process group of the generation that built them.
        """
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        if device.type == "cuda":
            make_cuda_deterministic()
        t = cfg.train
        if module is None:
            module = build_model(cfg.model, t.seed)
        else:
            # A failure mid-backward leaves partial gradients behind; the next
            # backward would add to them.
            for p in module.parameters():
                p.grad = None
        self.module: nn.Module = module.to(device)
        self.params = list(self.module.parameters())
        self.param_names = [n for n, _ in self.module.named_parameters()]
        distributed = dist.is_available() and dist.is_initialized()
        self.model: nn.Module = DDP(self.module) if distributed else self.module
        betas = (0.9, 0.95)
        impl = adamw_options(t.optimizer_impl)
        self.zero = t.parallel == "zero" and distributed
        if self.zero:
            self.optimizer: torch.optim.Optimizer = ZeroRedundancyOptimizer(
                self.params,
                optimizer_class=torch.optim.AdamW,
                lr=t.lr,
                weight_decay=t.weight_decay,
                betas=betas,
                **impl,
            )
        else:
            self.optimizer = torch.optim.AdamW(
                self.params, lr=t.lr, weight_decay=t.weight_decay, betas=betas, **impl
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.warmup_steps, t.steps)
        )
        self.data = SyntheticData(cfg.model, t.seed, t.micro_batch, t.seq_len, rank, world_size)
        self.step = 0

    # -- training ---------------------------------------------------------
    def forward_backward(self) -> float:
        """Loss of the next step's batch; gradients are left for ``optimizer_step``."""
        x, y = self.data.batch(self.step + 1)
        loss = self.model(x.to(self.device), y.to(self.device))
        loss.backward()
        return float(loss.detach())

    def warm_up_buckets(self) -> None:
        """Let DDP rebuild its gradient buckets before the first restored step.

        DDP lays out buckets in parameter order for the first backward, then
        rebuilds them in gradient-ready order. Bucket boundaries decide how a
        ring all-reduce splits each tensor, and so the order in which more than
        two ranks' gradients are summed: a restarted job whose first step ran
        on the initial layout would drift from the uninterrupted run in the
        last bits. One discarded backward puts it on the same layout.
        """
        if not isinstance(self.model, DDP):
            return
        x, y = self.data.batch(self.step + 1)
        self.model(x.to(self.device), y.to(self.device)).backward()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    # -- what a checkpoint holds --------------------------------------------
    def _local_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optim if self.zero else self.optimizer  # type: ignore[attr-defined]

    def _partitions(self) -> list[list[dict[str, Any]]]:
        """ZeRO's assignment of parameter groups to ranks (rank -> its groups).

        torch exposes it only as a private method; it is deterministic given the
        parameters and the world size, which is what checkpoints rely on.
        """
        return self.optimizer._partition_parameters()  # type: ignore[attr-defined]

    def _owned(self) -> list[int]:
        """Indices (into self.params) of the parameters this rank checkpoints."""
        if not self.zero:
            return list(range(len(self.params)))
        parts = self._partitions()
        mine = {id(p) for g in parts[self.rank] for p in g["params"]}
        return [i for i, p in enumerate(self.params) if id(p) in mine]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors to copy into a checkpoint (no copy made here)."""
        out: dict[str, torch.Tensor] = {}
        owned = self._owned()
        for i in owned:
            out[f"model/{self.param_names[i]}"] = self.params[i].detach()
        opt = self._local_optimizer()
        for p in (q for g in opt.param_groups for q in g["params"]):
            idx = next(i for i, q in enumerate(self.params) if q is p)
            for key, val in sorted(opt.state[p].items()):
                if isinstance(val, torch.Tensor):
                    out[f"optim/{self.param_names[idx]}/{key}"] = val.detach()
        for i, b in enumerate(self.module.buffers()):
            out[f"buffer/{i}"] = b.detach()
        return out

    def checkpoint_spec(self) -> dict[str, torch.Tensor]:
        """Meta tensors shaped like ``tensors()`` will be after the first step.

        AdamW creates its state lazily at the first step, but checkpoint memory
        is allocated (and touched) once, before training: this predicts the
        layout without changing any state.
        """
        out: dict[str, torch.Tensor] = {}
        for i in self._owned():
            p = self.params[i]
            out[f"model/{self.param_names[i]}"] = torch.empty(p.shape, dtype=p.dtype, device="meta")
        opt = self._local_optimizer()
        for p in (q for g in opt.param_groups for q in g["params"]):
            idx = next(i for i, q in enumerate(self.params) if q is p)
            name = self.param_names[idx]
            if opt.state.get(p):
                for key, val in sorted(opt.state[p].items()):
                    if isinstance(val, torch.Tensor):
                        out[f"optim/{name}/{key}"] = torch.empty(
                            val.shape, dtype=val.dtype, device="meta"
                        )
                continue
            # torch.optim.AdamW's per-parameter state (amsgrad off), in sorted key order.
            out[f"optim/{name}/exp_avg"] = torch.empty(p.shape, dtype=p.dtype, device="meta")
            out[f"optim/{name}/exp_avg_sq"] = torch.empty(p.shape, dtype=p.dtype, device="meta")
            out[f"optim/{name}/step"] = torch.empty((), dtype=torch.float32, device="meta")
        for i, b in enumerate(self.module.buffers()):
            out[f"buffer/{i}"] = torch.empty(b.shape, dtype=b.dtype, device="meta")
        return out

    def extra(self) -> dict[str, Any]:
        """Non-tensor state, JSON-able: step, data position, schedule, RNG."""
        return {
            "step": self.step,
            "data_position": self.step,
            "scheduler": {"last_epoch": self.scheduler.last_epoch},
            "rng_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "parallel": self.cfg.train.parallel,
        }

    def load(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        """Restore from a checkpoint's tensors and extra (the inverse of the two above)."""
        owned = self._owned()
        with torch.no_grad():
            for i in owned:
                self.params[i].copy_(tensors[f"model/{self.param_names[i]}"])
            opt = self._local_optimizer()
            for p in (q for g in opt.param_groups for q in g["params"]):
                idx = next(i for i, q in enumerate(self.params) if q is p)
                prefix = f"optim/{self.param_names[idx]}/"
                st = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                if st:
                    opt.state[p] = place_optimizer_state(opt, p, st)
            for i, b in enumerate(self.module.buffers()):
                b.copy_(tensors[f"buffer/{i}"])
        if self.zero:
            # Each parameter lives in exactly one rank's checkpoint: its owner
            # broadcasts it so every replica holds the full model again.
            for owner, groups in enumerate(self._partitions()):
                for g in groups:
                    for p in g["params"]:
                        dist.broadcast(p.data, src=owner)
        self.step = int(extra["step"])
        self.scheduler.last_epoch = int(extra["scheduler"]["last_epoch"])
        # LambdaLR applies the factor in step(); recompute the current lr now.
        for g, base, f in zip(
            self.optimizer.param_groups,
            self.scheduler.base_lrs,
            self.scheduler.lr_lambdas,
            strict=True,
        ):
            g["lr"] = base * f(self.scheduler.last_epoch)
        if self.zero:
            for g, lg in zip(
                self.optimizer.param_groups, self._local_optimizer().param_groups, strict=True
            ):
                lg["lr"] = g["lr"]
        rng = base64.b64decode(extra["rng_cpu"])
        torch.set_rng_state(torch.frombuffer(bytearray(rng), dtype=torch.uint8))

    def digest(self) -> str:
        """sha256 over this rank's full model and its optimizer state, in a fixed order."""
        h = hashlib.sha256()
        for name, p in zip(self.param_names, self.params, strict=True):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        for name, t in sorted(self.tensors().items()):
            if name.startswith("optim/"):
                h.update(name.encode())
                h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(str(self.step).encode())
        return h.hexdigest()
