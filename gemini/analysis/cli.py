"""The ``gemini-report`` console script: a thin Hydra entry point over
:func:`gemini.analysis.report.write_report`.

    gemini-report                                   # the default store, outputs/mlflow.db
    gemini-report tracking.uri=sqlite:////abs/mlflow.db tracking.experiment=gemini
    gemini-report out=/tmp/report                   # where the files go

Its primary config is ``conf/report.yaml`` (keys as in the main app:
``tracking.uri``, ``tracking.experiment``, ``paths.outputs``; plus ``out``);
the main app's config groups are not part of it. Hydra writes nothing of
its own (no ``.hydra/``, no log file): the report's files are all it
leaves. Errors (an unknown key, a store without job runs, an unwritable
``out``) end as one line on stderr naming the key, the value and the fix,
exit status 2, with nothing created.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from gemini.config import ConfigError, PathsConfig, TrackingConfig, default_outputs

CONFIG_NAME = "report"
"""conf/report.yaml."""


@dataclass
class ReportConfig:
    """gemini-report's configuration (conf/report.yaml extends it)."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """The store to read, as the main app names it: ``tracking.uri`` (empty =
    ``sqlite:///<paths.outputs>/mlflow.db``) and ``tracking.experiment``."""
    paths: PathsConfig = field(default_factory=PathsConfig)
    """``paths.outputs``: where the default store and the default ``out`` are."""
    out: str = ""
    """Directory for report.md, report.html and the PNGs (empty =
    ``<paths.outputs>/reports/<time>``)."""
    log: bool = True
    """Record the report as an MLflow run (tag ``kind=report``) with its files."""


def fail(message: str) -> NoReturn:
    print(f"gemini-report: error: {message}", file=sys.stderr)
    sys.exit(2)


def register() -> None:
    """The schema and the ``gemini_outputs`` resolver conf/report.yaml uses."""
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver("gemini_outputs"):
        OmegaConf.register_new_resolver("gemini_outputs", default_outputs)
    ConfigStore.instance().store(name="report_schema", node=ReportConfig)


def to_schema(cfg: DictConfig) -> ReportConfig:
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, ReportConfig)
    return obj


def store_uri(cfg: ReportConfig) -> str:
    """``tracking.uri`` resolved as the main app resolves it."""
    from gemini.config import GeminiConfig
    from gemini.tracking import tracking_uri

    return tracking_uri(GeminiConfig(tracking=cfg.tracking, paths=cfg.paths))


def default_out(cfg: ReportConfig) -> Path:
    """``<paths.outputs>/reports/<time>``: a new directory per report."""
    import datetime as dt

    return Path(cfg.paths.outputs) / "reports" / f"{dt.datetime.now():%Y-%m-%d_%H-%M-%S}"


def check(args: list[str]) -> None:
    """Compose the config as Hydra will and refuse errors in one line, before Hydra runs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gemini.cli import CONF, one_line_error

    if any(a.startswith("-") for a in args):
        return  # --help, --cfg job, ...: Hydra's own
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(CONFIG_NAME, overrides=args)
        to_schema(cfg)
    except Exception as e:  # composition errors: unknown keys, wrong types
        fail(
            one_line_error(
                e,
                args,
                unknown_hint="use tracking.uri, tracking.experiment, paths.outputs, out or log",
            )
        )
    finally:
        GlobalHydra.instance().clear()


def report(cfg: ReportConfig) -> Any:
    """Write the report for ``cfg``; one line and exit 2 on a store or path error."""
    from gemini.analysis.load import StoreError
    from gemini.analysis.report import RUN_FIRST, not_drawn, write_report
    from gemini.config import check_writable_path

    uri = store_uri(cfg)
    out = Path(cfg.out or default_out(cfg))
    try:
        check_writable_path("out", out)
    except ConfigError as e:
        fail(str(e))
    try:
        result = write_report(uri, out, cfg.tracking.experiment, log=cfg.log)
    except StoreError as e:
        fail(f"tracking.uri={uri}: {e}; {RUN_FIRST}")
    print(f"wrote {result.markdown} and {result.html} ({len(result.sections)} figures)")
    for spec, why in result.skipped:
        print(f"  {not_drawn(spec, why)}")
    if result.run_id:
        print(f"logged as run {result.run_id} (tag kind=report) in {uri}")
    return result


def _task(cfg: DictConfig) -> None:
    report(to_schema(cfg))


def main() -> None:
    import hydra

    from gemini.cli import CONF

    register()
    check(sys.argv[1:])
    app = hydra.main(version_base="1.3", config_path=str(CONF), config_name=CONFIG_NAME)(_task)
    app()


if __name__ == "__main__":
    main()
