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


def preflight(cfg: GeminiConfig, job_dir: Path) -> None:
    from gemini.checkpoint.disk import storage_dir, uses_storage

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
