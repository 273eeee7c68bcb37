"""The table a multirun ends with: one row per job, the keys its sweep varies, what each cost.

Everything comes from the sweep dir: each job's ``.hydra/`` (its number and
overrides) and ``summary.json`` (what the controller measured), so the table
needs no tracking store and covers jobs that ran on other machines (SLURM
tasks writing to a shared filesystem). A job that left no summary (refused,
or killed before its end) is a row too, with that as its outcome.

:func:`build_table` is a pure function over :class:`JobRecord` values;
:func:`read_jobs` reads them, :func:`write_table` leaves ``multirun_table.md``
and ``multirun_table.csv`` beside the jobs, and :func:`end_multirun` does it
all when a multirun ends (Hydra's callback, or a launcher exiting on a failed
job), printing the table and ending the sweep's parent MLflow run.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from omegaconf import DictConfig

TABLE_MD = "multirun_table.md"
TABLE_CSV = "multirun_table.csv"
NO_SUMMARY = "no summary"
"""The outcome of a job that left no ``summary.json`` (refused, or killed before its end)."""


@dataclass(frozen=True)
class JobRecord:
    """What one job of a sweep left in its job dir."""

    num: int
    """Hydra's job number (the order the sweep launched the jobs in)."""
    overrides: tuple[str, ...]
    """The job's overrides as Hydra composed it (``key=value``; sweep params included)."""
    summary: dict[str, Any] | None = None
    """Its ``summary.json``; None when it left none."""
    job_dir: str = ""


@dataclass
class Table:
    """The comparison of a sweep's jobs: raw values (for CSV) and their columns."""

    keys: list[str]
    """The override keys whose value differs between jobs, in the order first seen."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """Per job: ``num``, each swept key, then every metric of :data:`METRICS` (None if absent)."""

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The rows of jobs that did not complete."""
        return [r for r in self.rows if r["outcome"] != "completed"]


METRICS: tuple[tuple[str, str], ...] = (
    ("iter_time_s", "iter (s)"),
    ("overhead_pct", "overhead vs none"),
    ("checkpoints", "checkpoints"),
    ("mean_recovery_s", "recovery (s)"),
    ("mean_wasted_s", "wasted (s)"),
    ("mean_lost_steps", "lost steps"),
    ("exact", "exact"),
    ("outcome", "outcome"),
)
"""(summary key or derived value, column title), in column order after the swept keys."""


def override_items(overrides: Sequence[str]) -> dict[str, str]:
    """``key -> value`` of Hydra overrides, the key without its ``+``/``++``/``~`` prefix."""
    out: dict[str, str] = {}
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def swept_keys(jobs: Sequence[JobRecord]) -> list[str]:
    """The keys whose value is not the same in every job (absent counts as a value)."""
    maps = [override_items(j.overrides) for j in jobs]
    order: dict[str, None] = {}
    for m in maps:
        order.update(dict.fromkeys(m))
    return [k for k in order if len({m.get(k) for m in maps}) > 1]


def _backend(job: JobRecord) -> str | None:
    return job.summary.get("backend") if job.summary else None


def _backend_keys(jobs: Sequence[JobRecord], keys: list[str]) -> set[str]:
    """The swept keys that choose the backend: each of their values goes with one backend
    in every job, and not all of them with the same one (``backend``, ``+ablation``, ...)."""
    out = set()
    for k in keys:
        seen: dict[str | None, set[str | None]] = {}
        for j in jobs:
            seen.setdefault(override_items(j.overrides).get(k), set()).add(_backend(j))
        if all(len(b) == 1 for b in seen.values()) and len(set().union(*seen.values())) > 1:
            out.add(k)
    return out


def _reference(
    job: JobRecord, jobs: Sequence[JobRecord], keys: list[str], backend_keys: set[str]
) -> JobRecord | None:
    """The first completed ``backend=none`` job that agrees with ``job`` on every swept key
    but those that choose the backend."""
    mine = override_items(job.overrides)
    for other in jobs:
        s = other.summary
        if not s or s.get("backend") != "none" or s.get("outcome") != "completed":
            continue
        theirs = override_items(other.overrides)
        if all(mine.get(k) == theirs.get(k) for k in keys if k not in backend_keys):
            return other
    return None


def _number(v: Any) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    return float(v) if ok and math.isfinite(v) else None


def build_table(jobs: Sequence[JobRecord]) -> Table:
    """One row per job, in job order: the swept keys, then :data:`METRICS`.

    ``overhead_pct`` is ``(iter / iter_none - 1) * 100`` against the ``backend=none``
    job with otherwise the same swept keys, where the sweep has one.
    """
    jobs = sorted(jobs, key=lambda j: j.num)
    keys = swept_keys(jobs)
    backend_keys = _backend_keys(jobs, keys)
    table = Table(keys=keys)
    for job in jobs:
        s = job.summary or {}
        values = override_items(job.overrides)
        row: dict[str, Any] = {"num": job.num, **{k: values.get(k) for k in keys}}
        for key, _ in METRICS:
            row[key] = s.get(key)
        row["outcome"] = s.get("outcome") or NO_SUMMARY
        row["overhead_pct"] = None
        ref = _reference(job, jobs, keys, backend_keys) if s.get("backend") != "none" else None
        iter_s = _number(s.get("iter_time_s"))
        ref_s = _number(ref.summary.get("iter_time_s")) if ref and ref.summary else None
        if iter_s is not None and ref_s:
            row["overhead_pct"] = (iter_s / ref_s - 1.0) * 100.0
        row["job_dir"] = job.job_dir
        table.rows.append(row)
    return table


def _cell(key: str, v: Any) -> str:
    if v is None or v == "":
        return "-"
    if key == "overhead_pct":
        return f"{v:+.1f} %"
    n = _number(v)
    if n is None:
        return str(v)
    if n == int(n) and (isinstance(v, int) or key in ("mean_lost_steps", "checkpoints")):
        return str(int(n))
    return f"{n:.4g}"


def _columns(table: Table) -> tuple[list[str], list[list[str]]]:
    header = ["#", *table.keys, *(title for _, title in METRICS)]
    names = [*table.keys, *(k for k, _ in METRICS)]
    cells = [[str(r["num"]), *(_cell(k, r[k]) for k in names)] for r in table.rows]
    return header, cells


def to_text(table: Table) -> str:
    """The table as aligned columns, for the console."""
    header, cells = _columns(table)
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *cells]]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_markdown(table: Table) -> str:
    header, cells = _columns(table)

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, cells)])


def to_csv(table: Table) -> str:
    """Raw values, one row per job (numbers unrounded; empty where absent)."""
    names = ["num", *table.keys, *(k for k, _ in METRICS), "job_dir"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    for r in table.rows:
        writer.writerow(["" if r.get(k) is None else r[k] for k in names])
    return out.getvalue()


def _job_num(job_dir: Path, fallback: int) -> int:
    try:
        hydra = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())
        return int(hydra["hydra"]["job"]["num"])
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        # The default subdir is "<num>_<overrides>".
        head = job_dir.name.split("_", 1)[0]
        return int(head) if head.isdigit() else fallback


def read_jobs(sweep_dir: Path) -> list[JobRecord]:
    """Every job dir of ``sweep_dir`` (a subdir with ``.hydra/overrides.yaml``), in job order."""
    jobs = []
    found = sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml"))
    for i, job_dir in enumerate(found):
        try:
            overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
        except (OSError, yaml.YAMLError):
            overrides = []
        try:
            summary = json.loads((job_dir / "summary.json").read_text())
        except (OSError, ValueError):
            summary = None
        jobs.append(
            JobRecord(
                num=_job_num(job_dir, i),
                overrides=tuple(str(o) for o in overrides),
                summary=summary if isinstance(summary, dict) else None,
                job_dir=str(job_dir),
            )
        )
    return sorted(jobs, key=lambda j: j.num)


def write_table(sweep_dir: Path, table: Table, title: str = "") -> list[Path]:
    """``multirun_table.md`` (under a ``title`` line, if given) and ``.csv`` in ``sweep_dir``."""
    md = sweep_dir / TABLE_MD
    md.write_text((f"{title}\n\n" if title else "") + to_markdown(table) + "\n")
    csv_path = sweep_dir / TABLE_CSV
    csv_path.write_text(to_csv(table))
    return [md, csv_path]


def end_multirun(config: DictConfig) -> None:
    """Print the table comparing the sweep's jobs, leave it in the sweep dir, and end the
    parent run (FAILED if a job did not complete) with the table as its artifact.

    Called when the multirun ends, and by the SLURM launchers before they exit on a
    failed job. Works without a tracking store: the table is read from the job dirs.
    """
    from gemini.tracking import sweep_name

    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep = sweep_name(config.hydra.runtime.choices)
    table = build_table(read_jobs(sweep_dir))
    failed = len(table.failed)
    title = (
        f"Sweep {sweep + ': ' if sweep else ''}{len(table.rows)} jobs"
        + (f", {failed} did not complete" if failed else "")
        + f" ({sweep_dir})"
    )
    paths = write_table(sweep_dir, table, title) if sweep_dir.is_dir() else []
    link = _end_parent(sweep_dir, paths, failed=failed > 0)
    if not config.get("progress", True):
        return
    print(f"\n{title}\n{to_text(table)}")
    if paths:
        print(f"table: {paths[0]} (and {paths[1].name})")
    if link:
        print(f"MLflow, the sweep's runs with their key metrics:\n  {link}")


def _end_parent(sweep_dir: Path, artifacts: list[Path], *, failed: bool) -> str:
    """Log the table to the sweep's parent run and end it; how to see the sweep in the UI."""
    from gemini.tracking import PARENT_FILE, browse_hint, client_at

    try:
        run_id, uri = (sweep_dir / PARENT_FILE).read_text().splitlines()[:2]
    except (OSError, ValueError):
        return ""  # tracking off, or the sweep never started its parent run
    client = client_at(uri)
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
    return browse_hint(uri, str(client.get_run(run_id).info.experiment_id))
