"""The ``gemini`` console script: a thin Hydra entry point over ``experiment.run``.

User errors — an unknown group option, a value out of range, an unwritable
path — end as one line on stderr naming the key, the value and the fix, with
exit status 2 and no traceback. Group options are checked before Hydra runs
(Hydra's own message spans a screen); values are checked by the schemas.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import hydra
from omegaconf import DictConfig

from gemini.config import REPO_ROOT, ConfigError, register_configs

if TYPE_CHECKING:
    from gemini.config import GeminiConfig


def config_dir() -> Path:
    """conf/ at the repository root (editable install) or shipped in the package."""
    for candidate in (REPO_ROOT / "conf", Path(__file__).resolve().parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError("gemini's conf/ directory is missing: reinstall the package")


CONF = config_dir()


def fail(message: str) -> NoReturn:
    print(f"gemini: error: {message}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def refused_in_one_line(overrides: list[str]) -> Iterator[None]:
    """Turn a bad value or composition inside the block into the one-line refusal."""
    try:
        yield
    except ConfigError as e:
        fail(str(e))
    except Exception as e:  # composition errors: unknown keys, wrong types
        fail(one_line_error(e, overrides))


def group_options(group: str) -> list[str]:
    d = CONF / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def check_overrides(args: list[str]) -> None:
    """Refuse unknown group options and malformed overrides with one line each."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from gemini.launchers import launcher_options

    overrides = [a for a in args if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "malformed override"
        fail(f"{first}: write overrides as key=value")
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    for o in parsed:
        key = o.get_key_element().lstrip("+~")
        if o.is_delete() or (key not in groups and key != "hydra/launcher"):
            continue
        values = [str(v) for v in o.sweep_iterator()] if o.is_sweep_override() else [str(o.value())]
        known = launcher_options(CONF) if key == "hydra/launcher" else group_options(key)
        for v in values:
            if v not in known:
                fail(f"{key}={v}: unknown option; choose one of {', '.join(known)}")


def one_line_error(
    e: BaseException, overrides: list[str] | None = None, *, unknown_hint: str = ""
) -> str:
    """The key, the value and the reason of a composition error, on one line.

    Every console script (``gemini``, ``gemini-simulate``, ``gemini-report``)
    refuses a bad override through this; ``unknown_hint`` says what to do about
    a key that does not exist (default: ``gemini --cfg job`` lists them).
    """
    from omegaconf.errors import OmegaConfBaseException

    # Hydra names the whole override ("foo.bar"); OmegaConf only the first
    # missing part of it ("foo"), and an element of a list as "foo[2]".
    override = re.match(r"Could not override '([^']+)'", str(e).strip())
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException) and getattr(seen, "full_key", None):
            msg = str(getattr(seen, "msg", "") or seen).strip().splitlines()[0]
            key = override.group(1) if override else re.sub(r"\[\d+\]$", "", str(seen.full_key))
            given = _given(key, overrides or [])
            if "not in struct" in msg or ("Key '" in msg and "not" in msg):
                hint = unknown_hint or "check the spelling (`gemini --cfg job` lists them)"
                return f"{given}: no such setting; {hint}"
            return f"{given}: {msg}; fix the value"
        seen = seen.__cause__ or seen.__context__
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _given(key: str, overrides: list[str]) -> str:
    """``key=value`` as the user wrote it (the override that names ``key``), else ``key``."""
    for text in overrides:
        name, _, value = text.partition("=")
        if name.lstrip("+~") == key or name.lstrip("+~").startswith(key + "."):
            return f"{name.lstrip('+~')}={value}"
    return key


def _variants(args: list[str]) -> list[list[str]]:
    """The override lists to compose so that every swept value is checked once."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if not a.startswith("-") and "=" in a]
    parsed = OverridesParser.create().parse_overrides(overrides)
    base: list[str] = []
    sweeps: list[tuple[str, list[str]]] = []
    for text, o in zip(overrides, parsed, strict=True):
        if o.is_sweep_override():
            prefix = text.split("=", 1)[0]
            values = [str(v) for v in o.sweep_string_iterator()]
            sweeps.append((prefix, values))
            base.append(f"{prefix}={values[0]}")
        else:
            base.append(text)
    out = [base]
    for prefix, values in sweeps:
        where = next(j for j, t in enumerate(base) if t.startswith(prefix + "="))
        for v in values[1:]:
            variant = list(base)
            variant[where] = f"{prefix}={v}"
            out.append(variant)
    return out


def check_composition(args: list[str]) -> None:
    """Compose every variant before Hydra creates any directory; refuse errors in one line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gemini.config import to_schema, validate
    from gemini.launchers import check_launcher, check_launcher_host

    if any(
        a in ("--help", "-h", "--hydra-help", "--info", "-i")
        or a.startswith("--cfg")
        or a.startswith("-c")
        for a in args
    ):
        return
    multirun = any(a in ("-m", "--multirun") for a in args)
    outputs: list[str] = []
    # Every variant's values are checked before this machine is (SLURM's commands,
    # the cores): a bad value is named wherever the sweep is submitted from.
    on_host: list[tuple[DictConfig, GeminiConfig, str, list[str]]] = []
    for overrides in _variants(args):
        GlobalHydra.instance().clear()
        try:
            with refused_in_one_line(overrides):
                with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                    cfg = compose("config", overrides=overrides, return_hydra_config=True)
                typed = to_schema(cfg)
                validate(typed, host=True)
                choice = cfg.hydra.runtime.choices.get("hydra/launcher", "")
                check_launcher(cfg.hydra.launcher, typed, choice=choice, multirun=multirun)
        finally:
            GlobalHydra.instance().clear()
        outputs.append(typed.paths.outputs)
        on_host.append((cfg.hydra.launcher, typed, choice, overrides))
    for launcher, typed, choice, overrides in on_host:
        with refused_in_one_line(overrides):
            check_launcher_host(launcher, typed, choice=choice)
    # Only once every variant is valid: checking creates the directory.
    for path in dict.fromkeys(outputs):
        check_writable_or_fail(path)


def check_writable_or_fail(path: str) -> None:
    from gemini.experiment import check_writable

    try:
        check_writable("paths.outputs", Path(path))
    except ConfigError as e:
        fail(str(e))


FAILED_JOBS: list[str] = []
"""Jobs of this process's multirun that ended without completing (their messages)."""


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def _task(cfg: DictConfig) -> None:
    from gemini.experiment import JobFailed, run

    # A task of a submitit job reports its end through its result, which the
    # submitting launcher reads (gemini.launchers): an exit would leave no
    # result, and a scheduler without accounting would wait for it forever.
    in_task = "SUBMITIT_EXECUTOR" in os.environ
    try:
        run(cfg)
    except ConfigError as e:
        if in_task:
            print(f"gemini: error: {e}", file=sys.stderr)
            raise
        fail(str(e))
    except JobFailed as e:
        print(f"gemini: {e}", file=sys.stderr)
        if in_task:
            raise
        if _in_multirun():
            # The sweep goes on with its other jobs: its table shows this one's
            # outcome, and the command still exits 1 once the sweep is over.
            FAILED_JOBS.append(str(e))
            return
        sys.exit(1)
    except KeyboardInterrupt as e:
        print(
            "gemini: interrupted; every process and shared-memory segment was cleaned up",
            file=sys.stderr,
        )
        sys.exit(143 if isinstance(e, Terminated) else 130)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is."""


def _on_sigterm(signum: int, frame: object) -> None:
    # kill, a CI timeout or a scheduler's preemption must tear the job down as
    # Ctrl-C does: the nodes run in sessions of their own and would outlive
    # the controller, their shared-memory checkpoints with them. A second
    # signal must not cut that teardown short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    register_configs()
    check_overrides(sys.argv[1:])
    check_composition(sys.argv[1:])
    app = hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")(_task)
    try:
        app()
    except ConfigError as e:  # raised while composing (e.g. a resolver)
        fail(str(e))
    if FAILED_JOBS:
        sys.exit(1)


if __name__ == "__main__":
    main()
