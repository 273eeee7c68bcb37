"""report.md and report.html from a :class:`gemini.analysis.report.Report`.

The Markdown links the PNG files beside it. The HTML is self-contained: the
figures are embedded as ``data:`` URIs and the style sheet is inline, so the
file opens anywhere (a browser, an MLflow artifact view, an attachment)
and requests nothing.
"""

from __future__ import annotations

import base64
import html as h
import math
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from gemini.analysis.report import Report

PAPER_COLUMNS = {
    "quantity": "quantity",
    "paper": "paper",
    "ours": "this harness",
    "ratio": "ratio (ours / paper)",
    "at": "ours at",
    "kind": "ours is",
    "machine": "machine",
    "date": "date",
    "source": "source",
}
"""The columns of each "paper vs this harness" table, and their headings."""


def _number(v: object, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    text = (f"{v:.3g}" if abs(v) < 1e5 else f"{v:,.0f}") if isinstance(v, float) else str(v)
    if unit == "x":
        return text + "x"
    return f"{text} {unit}".strip()


def _paper_rows(paper: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    rows = []
    for _, r in paper.iterrows():
        rows.append(
            [
                str(r["quantity"]),
                str(r["paper"]),
                _number(r["ours"], str(r["unit"])),
                _number(r["ratio"]),
                str(r["at"]),
                str(r["kind"]),
                str(r["machine"]),
                str(r["date"]),
                str(r["source"]),
            ]
        )
    return list(PAPER_COLUMNS.values()), rows


def _frame_rows(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    return [str(c) for c in df.columns], [[_number(v) for v in row] for row in df.itertuples(False)]


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(head), line(["---"] * len(head)), *map(line, rows)])


def _header(report: Report) -> list[str]:
    return [
        f"Store `{report.uri}`, experiment `{report.experiment}`: {report.job_runs} job runs.",
        f"Made {report.created}.",
    ]


def _contents(report: Report) -> str:
    drawn = ", ".join(s.spec.title.split(":")[0] for s in report.sections) or "none"
    missing = ", ".join(spec.title.split(":")[0] for spec, _ in report.skipped) or "none"
    return f"Drawn: {drawn}. Not drawn (no data): {missing}."


def markdown(report: Report) -> str:
    """report.md: each figure (a PNG beside it), its caption and its tables."""
    out = ["# gemini: the paper's figures, reproduced", "", *_header(report), "", _contents(report)]
    out.append("")
    for s in report.sections:
        out += [f"## {s.spec.title}", "", f"![{s.spec.title}]({s.png.name})", "", f"*{s.caption}*"]
        if s.note:
            out += ["", s.note]
        if s.results is not None:
            out += ["", "Results:", "", _md_table(*_frame_rows(s.results))]
        if len(s.paper):
            out += ["", "Paper vs this harness:", "", _md_table(*_paper_rows(s.paper))]
        out.append("")
    if report.skipped:
        out += ["## Figures not drawn", ""]
        head = ["figure", "why", "to produce its data"]
        rows = [[spec.title, why, f"`{spec.command}`"] for spec, why in report.skipped]
        out += [_md_table(head, rows), ""]
    return "\n".join(out)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2.5rem;
       border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto;
       border: 1px solid #eee; }
figcaption { font-size: .85rem; color: #555; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .85rem; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left;
       vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; }
p.meta { color: #555; font-size: .9rem; } code { background: #f5f5f5; padding: 0 .2rem; }
"""
"""The report's whole style sheet (inline: the file fetches nothing)."""


def _html_table(head: list[str], rows: list[list[str]], caption: str) -> str:
    ths = "".join(f"<th>{h.escape(c)}</th>" for c in head)
    trs = "".join(
        "<tr>" + "".join(f"<td>{h.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><caption>{h.escape(caption)}</caption><tr>{ths}</tr>{trs}</table>"


def _code(text: str) -> str:
    # `x` in a note becomes <code>x</code>; everything else is escaped.
    parts = h.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def html(report: Report) -> str:
    """report.html: the same content, figures embedded as data: URIs, inline CSS."""
    body = ["<h1>gemini: the paper's figures, reproduced</h1>"]
    body += [f'<p class="meta">{_code(line)}</p>' for line in _header(report)]
    links = " · ".join(
        f'<a href="#{h.escape(s.spec.key)}">{h.escape(s.spec.title.split(":")[0])}</a>'
        for s in report.sections
    )
    body.append(f"<nav><p>{links}</p><p>{h.escape(_contents(report))}</p></nav>")
    for s in report.sections:
        data = base64.b64encode(s.png.read_bytes()).decode("ascii")
        body.append(f'<section id="{h.escape(s.spec.key)}"><h2>{h.escape(s.spec.title)}</h2>')
        body.append(
            f'<figure><img alt="{h.escape(s.spec.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{h.escape(s.caption)}</figcaption></figure>"
        )
        if s.note:
            body.append(f"<p>{_code(s.note)}</p>")
        if s.results is not None:
            body.append(_html_table(*_frame_rows(s.results), "Results"))
        if len(s.paper):
            body.append(_html_table(*_paper_rows(s.paper), "Paper vs this harness"))
        body.append("</section>")
    if report.skipped:
        body.append('<section id="skipped"><h2>Figures not drawn</h2>')
        rows = [[spec.title, why, spec.command] for spec, why in report.skipped]
        body.append(_html_table(["figure", "why", "to produce its data"], rows, "Not drawn"))
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # An empty icon: a browser would otherwise ask for /favicon.ico.
        '<link rel="icon" href="data:,">'
        f"<title>gemini report</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
