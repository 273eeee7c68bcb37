"""The ``gemini`` console script as a user meets it: a real process started from any
directory; bad input ends in one line on stderr naming the key, exit status 2,
no traceback, and nothing created or left running."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """An empty working directory that is not the repository."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    return d


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("no_leftovers")
def test_console_script_runs_from_another_directory_and_writes_only_under_outputs(
    gemini_cli: Cli, elsewhere: Path, outputs_dir: Path
) -> None:
    rc, out, err = gemini_cli(
        ["train.steps=3", "cluster.nodes=2", "model=mlp", "tracking=off"], cwd=elsewhere
    )
    assert rc == 0, err
    assert "Traceback" not in err
    assert "completed" in out
    (job_dir,) = (outputs_dir / "runs").iterdir()
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["outcome"] == "completed"
    assert summary["steps"] == 3
    assert (job_dir / ".hydra" / "config.yaml").is_file()
    assert (job_dir / "logs").is_dir()
    assert list(elsewhere.iterdir()) == [], "nothing may be written to the working directory"


BAD_INPUTS = [
    ("unknown group option", ["model=nope"], "model=nope"),
    ("unknown option in a sweep", ["-m", "model=mlp,nope"], "model=nope"),
    ("no nodes", ["cluster.nodes=0"], "cluster.nodes"),
    ("more nodes than the host holds", ["cluster.nodes=64"], "cluster.nodes"),
    ("unwritable outputs", ["paths.outputs=/proc/nope"], "paths.outputs"),
    ("not a number", ["cluster.nodes=abc"], "cluster.nodes"),
    ("unknown key", ["foo.bar=1"], "foo.bar"),
    ("misspelt key in a group", ["train.stepz=3"], "train.stepz"),
    ("bad value inside a sweep", ["-m", "cluster.nodes=2,0"], "cluster.nodes"),
    ("unknown parallelism", ["train.parallel=pipeline"], "train.parallel"),
    ("heads not dividing the width", ["model.n_head=3"], "model.n_head"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "key"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_exits_2_with_one_line_naming_the_key_and_creates_nothing(
    gemini_cli: Cli, elsewhere: Path, outputs_dir: Path, args: list[str], key: str
) -> None:
    rc, out, err = gemini_cli(args, cwd=elsewhere, timeout_s=50)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("gemini: error: ")
    assert key in lines[0]
    assert "Traceback" not in err and "Traceback" not in out
    assert not outputs_dir.exists(), "a refused run must not create its outputs directory"
    assert list(elsewhere.iterdir()) == []


@pytest.mark.timeout(60)
def test_help_lists_every_config_group_and_creates_nothing(
    gemini_cli: Cli, elsewhere: Path, outputs_dir: Path
) -> None:
    rc, out, err = gemini_cli(["--help"], cwd=elsewhere, timeout_s=50)
    assert rc == 0, err
    for group in ("model", "cluster", "backend", "failure", "train", "tracking"):
        assert f"{group}:" in out
    assert not outputs_dir.exists()


@pytest.mark.timeout(60)
def test_cfg_job_prints_the_composed_config_with_overrides(
    gemini_cli: Cli, elsewhere: Path, outputs_dir: Path
) -> None:
    rc, out, err = gemini_cli(["--cfg", "job", "model=mlp", "cluster.nodes=3"], cwd=elsewhere)
    assert rc == 0, err
    assert "kind: mlp" in out
    assert "nodes: 3" in out
    assert not outputs_dir.exists()
