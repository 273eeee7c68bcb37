"""What every process of a job needs to know, handed over as one JSON file.

The controller writes ``job.json`` in the job dir; the root agent, the node
launchers, the worker agents and the trainers all start from it, however they
were started (locally or by SLURM). The per-run secret that authenticates
transport peers sits beside it in a file only the owner can read.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gemini.config import GeminiConfig


@dataclass
class JobSpec:
    run_id: str
    """Unique id of this job: prefixes shared-memory names and store keys."""
    job_dir: str
    """The Hydra job dir: config, logs, summary, checkpoints by default."""
    store: str
    """host:port of the KV store."""
    secret_file: str
    """File holding the per-run transport secret (hex), mode 0600."""
    config: dict[str, Any]
    """The resolved config as a plain dict: what ``job.json`` carries."""
    attempt: int = 0
    """How many times the job was requeued before this start (SLURM timeout or
    preemption); 0 for a first start."""
    storage_id: str = ""
    """Names the job's checkpoints on storage; a requeued job keeps its first
    attempt's so that it finds them (empty = :attr:`run_id`)."""
    launch: str = ""
    """Which start of a SLURM job wrote this file (``gemini.cluster.slurm.TaskEnv``):
    the other tasks join only their own start's."""
    resume: bool = False
    """Start from the newest complete checkpoint on storage rather than step 0
    (a requeued job's later attempt)."""

    @property
    def storage_run(self) -> str:
        """The name of this job's checkpoints on storage (see :attr:`storage_id`)."""
        return self.storage_id or self.run_id

    @functools.cached_property
    def cfg(self) -> GeminiConfig:
        """The typed config, built once per process from :attr:`config`; every
        component reads this, never the plain dict."""
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GeminiConfig), self.config))
        assert isinstance(obj, GeminiConfig)
        return obj

    @property
    def world_size(self) -> int:
        return self.cfg.cluster.nodes * self.cfg.cluster.ranks_per_node

    def secret(self) -> bytes:
        return bytes.fromhex(Path(self.secret_file).read_text().strip())

    def save(self) -> Path:
        # Whole or not at all: on SLURM other tasks poll for this file.
        path = Path(self.job_dir) / "job.json"
        tmp = path.with_name(f".job.json.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> JobSpec:
        return cls(**json.loads(Path(path).read_text()))


def new_secret_file(job_dir: Path) -> Path:
    """Create the run's secret file: a new file (never an existing one or a
    link someone planted), readable by its owner only. Teardown removes it."""
    path = job_dir / ".secret"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already exists (a run in this job dir, or one that did not end "
            "cleanly): the secret is only ever written to a new file; use a new job dir"
        ) from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path
