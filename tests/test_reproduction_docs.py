"""The README's "Reproducing Gemini" table quotes the committed report, nothing else.

Every measured, simulated or modelled value in the table's "here" column must
be printed in docs/reproduction/report.md (made by ``gemini-report``), so no
figure in it is typed in by hand, and the report's images are all there.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "docs" / "reproduction" / "report.md"
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+")
"""A value with a decimal point (integers in the text are counts and settings)."""


def reproduction_rows() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    m = re.search(r"^## Reproducing Gemini\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, "README.md has no section Reproducing Gemini"
    rows = [line for line in m.group(1).splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[2:]
    assert [c.strip() for c in header.strip("|").split("|")][3] == "here"
    return [[c.strip() for c in row.strip("|").split("|")] for row in body]


def test_every_value_of_the_here_column_is_printed_in_the_committed_report() -> None:
    report = REPORT.read_text()
    printed = {float(v) for v in NUMBER.findall(report)}
    for cells in reproduction_rows():
        for value in NUMBER.findall(cells[3]):
            assert float(value) in printed, f"{cells[0]}: {value} is not in {REPORT.name}"


def test_the_report_shows_every_image_it_names() -> None:
    report = REPORT.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert images
    for name in images:
        assert (REPORT.parent / name).is_file(), name
