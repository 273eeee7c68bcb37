"""A job that keeps failing ends after ``cluster.max_restarts`` recoveries instead of looping."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import assert_nothing_left

from gemini.experiment import JobFailed


@pytest.mark.timeout(300)
def test_the_root_gives_up_after_max_restarts_and_leaves_nothing_behind(
    run_job: Callable[..., object], tmp_path: Path
) -> None:
    with pytest.raises(JobFailed, match=r"cluster\.max_restarts=0"):
        run_job(
            "backend=memory",
            "failure=software_once",
            "failure.at_step=4",
            "failure.node=1",
            "cluster.nodes=2",
            "cluster.max_restarts=0",
            "train.steps=40",
        )
    job_dir = tmp_path / "jobs" / "job1"
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["outcome"] == "failed"
    assert "gave up after 0 recoveries" in summary["reason"]
    assert_nothing_left(job_dir)
