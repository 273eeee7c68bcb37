"""Checks made before anything is started or allocated: refuse what cannot work.

A job that would run out of /dev/shm half-way, or write into a directory it
cannot write, should fail in the first second with one line that says what
to change — not after the cluster started and left memory behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from gemini.config import ConfigError, GeminiConfig


def preflight(cfg: GeminiConfig, job_dir: Path) -> None:
    from gemini.checkpoint.disk import storage_dir, uses_storage

    b = cfg.backend
    if uses_storage(cfg):
        root = storage_dir(cfg, job_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                "backend.path",
                str(root),
                f"is not writable ({e.strerror}): choose a writable directory",
            ) from e
    if b.name in ("memory", "replicated"):
        from gemini.checkpoint.memory import check_shm_budget

        check_shm_budget(cfg)
