"""The ``gemini-simulate`` console script: a thin Hydra entry point over ``record.run``.

Its primary config is ``conf/simulate.yaml``. Lists are values of one run,
not sweeps: ``nodes=16,128,1000`` is read as ``nodes=[16,128,1000]`` (Hydra
alone would call it an ambiguous sweep), and a single value as a list of one.
Bad input ends as one line on stderr naming the key, the value and the fix,
exit status 2, before Hydra creates the run dir.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from gemini.config import (
    ConfigError,
    check_tracking_server,
    check_tracking_uri,
    check_writable_path,
)
from gemini.simulate.config import SimulateConfig, check, list_keys, register

PROG = "gemini-simulate"
CONFIG_NAME = "simulate"
_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i")


def config_dir() -> Path:
    """conf/ holding simulate.yaml: the main app's (``gemini.cli.config_dir``)."""
    from gemini.cli import config_dir as gemini_conf

    return gemini_conf()


def fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def as_lists(args: list[str]) -> list[str]:
    """``key=a,b`` and ``key=a`` as ``key=[a,b]`` and ``key=[a]`` for the list-valued keys."""
    keys = list_keys()
    out = []
    for a in args:
        key, eq, value = a.partition("=")
        if eq and key in keys and not value.startswith("[") and value != "null":
            a = f"{key}=[{value}]"
        out.append(a)
    return out


def to_schema(cfg: DictConfig) -> SimulateConfig:
    """The checked, typed config of a composed one (Hydra's own node left out)."""
    keys = [str(k) for k in cfg if k != "hydra"]
    plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)
    typed = OmegaConf.merge(OmegaConf.structured(SimulateConfig), plain)
    obj = OmegaConf.to_object(typed)
    assert isinstance(obj, SimulateConfig)
    check(obj)
    return obj


def _check_syntax(overrides: list[str], given: list[str]) -> None:
    """Refuse an override Hydra cannot parse, naming it as the user wrote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for text, original in zip(overrides, given, strict=True):
        try:
            parser.parse_overrides([text])
        except HydraException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "malformed"
            fail(f"{original}: {first}: write key=value, lists as a,b or [a,b]")


def check_args(args: list[str], given: list[str]) -> None:
    """Compose, type and check the config, read measured costs: refuse errors in one line.

    ``args`` are the overrides as :func:`as_lists` rewrote them, ``given`` as the
    user wrote them (what an error names).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gemini.cli import one_line_error
    from gemini.simulate.record import resolve_costs

    if any(a in ("-m", "--multirun") for a in args):
        fail(f"-m: {PROG} runs one simulation of every listed value; drop -m (nodes=16,128)")
    if any(a in _INFO_FLAGS or a.startswith(("--cfg", "-c")) for a in args):
        return
    pairs = [(a, g) for a, g in zip(args, given, strict=True) if not a.startswith("-")]
    overrides = [a for a, _ in pairs]
    originals = [g for _, g in pairs]
    _check_syntax(overrides, originals)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(CONFIG_NAME, overrides=overrides)
        typed = to_schema(cfg)
        check_tracking_uri(typed.tracking)
        check_writable_path("paths.outputs", Path(typed.paths.outputs))
        check_tracking_server(typed.tracking)
        resolve_costs(typed)
    except ConfigError as e:
        fail(str(e))
    except Exception as e:  # composition errors: unknown keys, wrong types
        hint = f"check the spelling (`{PROG} --cfg job` lists them)"
        fail(one_line_error(e, originals, unknown_hint=hint))
    finally:
        GlobalHydra.instance().clear()


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from gemini.simulate.record import run

    try:
        run(to_schema(cfg), Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    register()
    given = sys.argv[1:]
    args = as_lists(given)
    check_args(args, given)
    sys.argv = [sys.argv[0], *args]
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=CONFIG_NAME)(
        _task
    )
    app()


if __name__ == "__main__":
    main()
