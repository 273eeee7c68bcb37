"""The soak in CI: a couple of drawn failure schedules through the console script,
each ending with the failure-free digest and leaving nothing behind.

``benchmarks/soak.py`` is run as a user runs it (a subprocess, real jobs);
the draw itself is checked to be a pure function of the seed, so that a
failed run can be replayed from the seed the soak prints.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.soak import draw, run_seeds

REPO = Path(__file__).resolve().parents[1]


def test_a_run_is_drawn_from_its_seed_alone() -> None:
    seeds = run_seeds(20, 3)
    assert seeds == run_seeds(20, 3)
    assert len(set(seeds)) == 20
    for s in seeds:
        a, b = draw(s), draw(s)
        assert a == b
        assert 2 <= a.nodes <= 4
        over = dict(o.split("=", 1) for o in a.overrides)
        # Never a combination the configuration check is known to refuse.
        if over["failure"] in ("corruption", "two_in_group"):
            assert over["backend"] == "replicated"
        if over["failure"] == "kill_during_snapshot":
            assert over["backend"] in ("memory", "replicated")
        if over.get("backend.replication.placement") == "group":
            assert a.nodes % int(over["backend.replication.factor"]) == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_short_soak_ends_exact_and_leaves_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--runs", "2", "--seed", "11",
         "--max-nodes", "2", "--dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=580,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    row = re.search(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) / (\d+) \| 0 \| 0 \| 0 \|$", out, re.M)
    assert row, out
    runs, refused, recoveries, exact, ran = map(int, row.groups())
    assert runs == 2 and exact == ran == runs - refused
    assert recoveries >= ran, "every run that ran recovered from its failure at least once"
    assert list(tmp_path.iterdir()) == [], "the soak's scratch directory outlived it"
