"""Which device a rank trains on and which collective library its group uses.

CUDA cases run only where a GPU is visible (tests/test_gpu.py); here, the
rules that hold on any host.
"""

from __future__ import annotations

import pytest
import torch

from gemini.config import GeminiConfig, ModelConfig
from gemini.workload.trainer import pick_device, process_group_backend, ranks_per_host


def config(device: str, nodes: int = 2, ranks_per_node: int = 2) -> GeminiConfig:
    cfg = GeminiConfig(model=ModelConfig(name="gpt_tiny"))
    cfg.cluster.device, cfg.cluster.nodes = device, nodes
    cfg.cluster.ranks_per_node = ranks_per_node
    return cfg


def test_cpu_ranks_train_on_the_cpu_over_gloo() -> None:
    cfg = config("cpu")
    dev = pick_device(cfg, rank=3, local_rank=1)
    assert dev == torch.device("cpu")
    assert process_group_backend(cfg, dev) == "gloo"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the host without a GPU")
def test_auto_without_a_gpu_is_the_cpu() -> None:
    assert pick_device(config("auto"), rank=0, local_rank=0) == torch.device("cpu")


def test_every_simulated_node_of_the_local_launcher_shares_this_hosts_devices() -> None:
    # Four ranks on one host: one GPU each would take four, else NCCL refuses.
    assert ranks_per_host(config("cuda", nodes=2, ranks_per_node=2)) == 4
    assert ranks_per_host(config("cuda", nodes=1, ranks_per_node=1)) == 1
