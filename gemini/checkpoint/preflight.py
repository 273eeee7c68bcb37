"""The storage directory, created and probed once the job directory exists.

``gemini.config.validate(cfg, host=True)`` has already refused, before
anything existed, a path that cannot be written and a /dev/shm too small;
this creates the directory the ``disk`` backend (or the persistent tier)
writes to and confirms a file can be written there.
"""

from __future__ import annotations

import os
from pathlib import Path

from gemini.config import ConfigError, GeminiConfig


def disk_root(cfg: GeminiConfig, job_dir: Path) -> Path:
    """Where the ``disk`` backend (and the persistent tier) writes."""
    from gemini.checkpoint.disk import storage_dir

    return storage_dir(cfg.backend.path, job_dir)


def preflight(cfg: GeminiConfig, job_dir: Path) -> None:
    b = cfg.backend
    if b.name == "disk" or (b.name in ("memory", "replicated") and b.persist_every_s > 0):
        root = disk_root(cfg, job_dir)
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
