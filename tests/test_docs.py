"""The design document is the project's own and matches the code it describes.

docs/design.md ships with the repository: nothing may point to a design
document that is not in it, its store-key table lists exactly the keys the
code declares, and every metric name a job can log is explained there.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from gemini.cluster import keys
from gemini.tracking import metric_names, metric_rows

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"


def section(title: str) -> str:
    """The text of one ``## `` section of docs/design.md."""
    text = DESIGN.read_text()
    m = re.search(rf"^## [0-9. ]*{re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"docs/design.md has no section {title!r}"
    return m.group(1)


def tracked_files() -> list[Path]:
    out = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / p for p in out if (REPO / p).is_file()]


def test_nothing_points_to_a_design_document_outside_the_repository() -> None:
    assert DESIGN.is_file()
    offenders = []
    for path in tracked_files():
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".sh", ""}:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if "DESIGN.md" in text and path != Path(__file__).resolve():
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == [], f"these files still point to DESIGN.md: {offenders}"


def documented_keys() -> dict[str, bool]:
    """Key pattern -> signed, from the table of docs/design.md."""
    out: dict[str, bool] = {}
    for row in section("Store keys").splitlines():
        if not row.startswith("| `"):
            continue
        cells = [c.strip() for c in row.strip("|").split("|")]
        (pattern,) = re.findall(r"`([^`]+)`", cells[0])
        assert pattern not in out, f"{pattern} is listed twice"
        out[pattern] = cells[1] == "yes"
    return out


def test_the_store_key_table_lists_exactly_the_declared_keys_and_which_are_signed() -> None:
    declared = {k.pattern: k.signed for k in keys.TABLE}
    documented = documented_keys()
    assert {k: v for k, v in documented.items() if k in declared} == {
        k: v for k, v in declared.items() if k in documented
    }, "the signed column differs from gemini.cluster.keys.TABLE"
    assert sorted(set(declared) - set(documented)) == [], "declared but not documented"
    assert sorted(set(documented) - set(declared)) == [], "documented but not declared"


def test_every_metric_a_job_logs_is_explained_in_the_design_document() -> None:
    text = section("Metrics")
    missing = [name for name in metric_names() if f"`{name}`" not in text]
    assert missing == [], f"logged but not in docs/design.md: {missing}"


def test_a_job_logs_only_the_declared_metrics() -> None:
    # Records as the controller collects them, with fields that are not
    # metrics (wall-clock instants, flags, strings) beside the real ones.
    steps = [
        {"step": 1, "t": 100.0, "iter_time_s": 0.5, "loss": 3.2, "throughput_samples_s": 8.0},
        {"step": 2, "t": 100.5, "iter_time_s": 0.4, "loss": 3.1, "ckpt_stall_s": 0.01,
         "rank": 0, "replay": True},
    ]  # fmt: skip
    recoveries = [
        {"detect_s": 1.0, "alloc_s": 0.2, "recovery_s": 5.0, "t_inject": 123.0,
         "interrupted": True, "kind": "hardware", "lost_steps": 1},
    ]  # fmt: skip
    summary = {"steps": 2, "wall_s": 9.0, "outcome": "completed", "mean_alloc_s": 0.2,
               "state_digest": "ab", "failures_injected": []}  # fmt: skip
    rows = metric_rows(steps, recoveries, summary)
    names = {name for name, *_ in rows}
    assert names <= set(metric_names())
    assert "recovery/t_inject" not in names and "recovery/interrupted" not in names
    assert {"recovery/alloc_s", "run/mean_alloc_s", "iter_time_s"} <= names
    assert ("loss", 3.1, 100500, 2) in rows
    assert ("recovery/detect_s", 1.0, 0, 0) in rows
