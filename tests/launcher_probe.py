"""The task of the launcher tests' probe sweeps (tests/test_launchers.py).

A module of its own, importing little: every task of every probe job
unpickles it by name in a fresh interpreter, and importing the test module
(with conftest, psutil, the store) would cost each task seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

CONFIG = """\
cluster:
  launcher: slurm
  nodes: 1
  standby_nodes: 1
out: ???
"""
"""The probe app's primary config: a job's shape comes from its ``cluster`` node."""


def probe(cfg: DictConfig) -> dict[str, Any]:
    """A task of a probe job: what submitit told it, written per task, returned by all."""
    import submitit

    env = submitit.JobEnvironment()
    record = {
        "job": HydraConfig.get().job.num,
        "nodes": cfg.cluster.nodes,
        "launcher": cfg.cluster.launcher,
        "rank": env.global_rank,
        "ntasks": env.num_tasks,
        "num_nodes": env.num_nodes,
        "setup": os.environ.get("PROBE_SETUP", ""),
        "srun": os.environ.get("PROBE_SRUN", ""),
    }
    Path(cfg.out, f"{record['job']}-{record['rank']}.json").write_text(json.dumps(record))
    return record
