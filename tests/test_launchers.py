"""The ``slurm`` and ``submitit_local`` Hydra launchers: every job of a sweep gets the
tasks its own config asks for, results come back in job order, and bad settings are
refused in one line before anything is submitted.

The sweeps run a probe task (not a gemini job) through Hydra's own multirun in
this process, with the real submitit executors: the local one always, SLURM
when ``make slurm-up`` runs one (``slurm``-marked). Every task of every job
writes what ``submitit.JobEnvironment`` told it, so a test sees each task, not
only task 0's return.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import launcher_probe
import pytest
from conftest import REPO, compose_config, run_cli
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_bad_input import assert_cli_refuses, assert_refused

from gemini.config import ConfigError, register_configs, to_schema
from gemini.launchers import (
    LOCAL_TARGET,
    SLURM_TARGET,
    check_launcher,
    check_launcher_host,
    job_tasks,
    launcher_options,
    layout,
    slurm_partitions,
)
from hydra_plugins.gemini_launcher import LocalLauncher

# -- the shape of a job ---------------------------------------------------------


@pytest.mark.parametrize(
    ("tasks", "per_host", "shape"),
    [
        (5, 1, (5, 1)),  # a real cluster: one simulated node per machine
        (5, 0, (1, 5)),  # a single-host SLURM: all on one machine
        (3, 4, (1, 3)),  # fewer tasks than a machine holds
        (6, 4, (2, 3)),  # spread evenly over the fewest machines
        (8, 4, (2, 4)),
        (1, 1, (1, 1)),  # cluster=local: one task
    ],
)
def test_layout_spreads_a_jobs_tasks_evenly_over_the_fewest_hosts(
    tasks: int, per_host: int, shape: tuple[int, int]
) -> None:
    assert layout(tasks, per_host) == shape


def test_layout_refuses_a_count_that_cannot_be_spread_evenly() -> None:
    # 5 tasks, at most 2 a machine: 3 machines would run 2, 2 and 1, which
    # SLURM's --ntasks-per-node cannot say.
    with pytest.raises(ConfigError) as e:
        layout(5, 2)
    assert e.value.key == "hydra.launcher.tasks_per_host"
    assert "use one of 1, 5" in str(e.value)


def test_a_slurm_job_needs_a_task_per_node_and_standby_node_a_local_one_needs_one() -> None:
    register_configs()
    slurm = compose_config(["cluster=slurm", "cluster.nodes=3"])
    assert job_tasks(slurm) == 3 + 1
    assert job_tasks(to_schema(slurm)) == 4
    assert job_tasks(compose_config(["cluster.nodes=3"])) == 1


def test_the_launcher_options_are_ours_and_keep_the_stock_settings() -> None:
    register_configs()
    slurm = compose_config(["hydra/launcher=slurm"]).hydra.launcher
    assert slurm._target_ == SLURM_TARGET
    for key in ("partition", "timeout_min", "cpus_per_task", "gpus_per_node", "gpus_per_task",
                "mem_gb", "gres", "constraint", "setup", "additional_parameters",
                "array_parallelism", "max_num_timeout", "signal_delay_s", "srun_args",
                "tasks_per_host"):  # fmt: skip
        assert key in slurm, key
    assert slurm.tasks_per_host == 1
    # Ours replaces the stock submitit_local, which would start one task a job.
    assert compose_config(["hydra/launcher=submitit_local"]).hydra.launcher._target_ == LOCAL_TARGET


def test_the_readmes_gpu_cluster_option_extends_slurm(tmp_path: Path) -> None:
    # A site keeps its settings in conf/hydra/launcher/<name>.yaml over `slurm`;
    # the README's example must compose to our launcher with its values.
    readme = (REPO / "README.md").read_text()
    example = re.search(
        r"gpu_cluster\.yaml`, that extends `slurm`:\n\n```yaml\n(.*?)```", readme, re.S
    )
    assert example, "README lost its GPU cluster example"
    conf = tmp_path / "conf"
    (conf / "hydra" / "launcher").mkdir(parents=True)
    (conf / "probe.yaml").write_text(launcher_probe.CONFIG)
    (conf / "hydra" / "launcher" / "gpu_cluster.yaml").write_text(example.group(1))
    register_configs()
    assert "gpu_cluster" in launcher_options(conf)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(
                "probe", ["hydra/launcher=gpu_cluster", "out=x"], return_hydra_config=True
            )
    finally:
        GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM_TARGET
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_host) == ("gpu", 8, 1)
    assert launcher.setup[0] == "module load cuda/12.8"
    assert list(launcher.srun_args) == ["--cpu-bind=none"]


def test_requeue_on_timeout_resubmits_the_same_launcher_call() -> None:
    # submitit calls checkpoint() on a timeout or preemption; the stock
    # implementation resubmits the call with its arguments.
    launcher = LocalLauncher(submitit_folder="x", timeout_min=1)
    delayed = launcher.checkpoint(["a=1"], "hydra.sweep.dir", 3, "id", {})
    assert delayed.function is launcher
    assert delayed.args == (["a=1"], "hydra.sweep.dir", 3, "id", {})


# -- refused before anything is submitted ---------------------------------------

SLURM_GROUP = "hydra/launcher=slurm"
LOCAL_GROUP = "hydra/launcher=submitit_local"

# (id, args, key, value): the refused line must name both.
CASES: list[tuple[str, list[str], str, str]] = [
    ("launcher without a multirun", [SLURM_GROUP], "hydra/launcher", "slurm"),
    ("unknown launcher", ["-m", "hydra/launcher=pbs"], "hydra/launcher", "pbs"),
    ("no time", ["-m", SLURM_GROUP, "hydra.launcher.timeout_min=0"],
     "hydra.launcher.timeout_min", "0"),
    ("no CPUs", ["-m", SLURM_GROUP, "hydra.launcher.cpus_per_task=0"],
     "hydra.launcher.cpus_per_task", "0"),
    ("negative GPUs per node", ["-m", LOCAL_GROUP, "hydra.launcher.gpus_per_node=-1"],
     "hydra.launcher.gpus_per_node", "-1"),
    ("negative GPUs per task", ["-m", SLURM_GROUP, "hydra.launcher.gpus_per_task=-2"],
     "hydra.launcher.gpus_per_task", "-2"),
    ("no memory", ["-m", SLURM_GROUP, "hydra.launcher.mem_gb=0"], "hydra.launcher.mem_gb", "0"),
    ("memory not a number", ["-m", SLURM_GROUP, "hydra.launcher.mem_gb=lots"],
     "hydra.launcher.mem_gb", "lots"),
    ("no array parallelism", ["-m", SLURM_GROUP, "hydra.launcher.array_parallelism=0"],
     "hydra.launcher.array_parallelism", "0"),
    ("negative tasks per host", ["-m", SLURM_GROUP, "hydra.launcher.tasks_per_host=-1"],
     "hydra.launcher.tasks_per_host", "-1"),
    ("uneven spread", ["-m", SLURM_GROUP, "cluster=slurm", "cluster.nodes=4",
     "hydra.launcher.tasks_per_host=2"], "hydra.launcher.tasks_per_host", "2"),
    ("uneven spread in one sweep value", ["-m", SLURM_GROUP, "cluster=slurm",
     "cluster.nodes=3,2", "hydra.launcher.tasks_per_host=2"],
     "hydra.launcher.tasks_per_host", "2"),
    ("nodes set by hand", ["-m", SLURM_GROUP, "hydra.launcher.nodes=2"],
     "hydra.launcher.nodes", "2"),
    ("tasks of a local cluster", ["-m", LOCAL_GROUP, "hydra.launcher.tasks_per_node=3"],
     "hydra.launcher.tasks_per_node", "3"),
    ("misspelt launcher setting", ["-m", SLURM_GROUP, "hydra.launcher.partiton=gpu"],
     "hydra.launcher.partiton", "gpu"),
    ("more local tasks than the host holds", ["-m", LOCAL_GROUP, "cluster=slurm",
     "cluster.nodes=2", f"cluster.standby_nodes={4 * (os.cpu_count() or 1)}"],
     "cluster.nodes", "2"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "key", "value"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_launcher_settings_are_refused_in_one_line_before_submitting(
    args: list[str],
    key: str,
    value: str,
    outputs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert_cli_refuses(args, key, value, outputs_dir, monkeypatch, capsys)


@pytest.mark.timeout(60)
def test_the_console_script_refuses_a_bad_launcher_setting_and_submits_nothing(
    tmp_path: Path,
) -> None:
    cwd, outputs = tmp_path / "cwd", tmp_path / "outputs"
    cwd.mkdir()
    rc, out, err = run_cli(
        ["-m", LOCAL_GROUP, "hydra.launcher.timeout_min=0"], cwd, outputs=outputs, timeout_s=50
    )
    assert_refused(rc, out, err, "hydra.launcher.timeout_min", "0")
    assert not outputs.exists() and list(cwd.iterdir()) == []


def test_slurm_is_refused_where_there_is_no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    cfg = compose_config(["hydra/launcher=slurm"])
    # The values are fine; this machine is what cannot run them.
    check_launcher(cfg.hydra.launcher, to_schema(cfg), choice="slurm", multirun=True)
    with pytest.raises(ConfigError) as e:
        check_launcher_host(cfg.hydra.launcher, to_schema(cfg), choice="slurm")
    assert e.value.key == "hydra/launcher" and "submitit_local" in e.value.fix


def test_a_bad_value_in_a_later_sweep_variant_is_named_even_where_slurm_is_missing(
    outputs_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every variant's values are checked before the machine: the first variant
    (3 nodes + 1 standby over 2 hosts) is fine, the second (2 + 1) is not, and the
    user hears about the value, not about SLURM missing from a laptop."""
    monkeypatch.setenv("PATH", "/nonexistent")
    args = ["-m", SLURM_GROUP, "cluster=slurm", "cluster.nodes=3,2",
            "hydra.launcher.tasks_per_host=2"]  # fmt: skip
    assert_cli_refuses(args, "hydra.launcher.tasks_per_host", "2", outputs_dir, monkeypatch, capsys)


# -- sweeps, end to end -----------------------------------------------------------


@pytest.fixture
def probe_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``probe_sweep(overrides)``: a Hydra multirun of the probe task; (returns, records)."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "probe.yaml").write_text(launcher_probe.CONFIG)
    out = tmp_path / "tasks"
    out.mkdir()
    # The tasks unpickle the probe by name, in fresh interpreters.
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join([here, str(REPO), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path.rstrip(os.pathsep))
    register_configs()

    def _sweep(overrides: list[str]) -> tuple[list[dict[str, Any]], dict[int, list[dict]]]:
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(app), version_base="1.3", job_name="probe"):
                hydra = GlobalHydra.instance().hydra
                assert hydra is not None
                runs = hydra.multirun(
                    config_name="probe",
                    task_function=launcher_probe.probe,
                    overrides=[
                        *overrides,
                        f"out={out}",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}",
                        "hydra.launcher.timeout_min=5",
                    ],
                )
        finally:
            GlobalHydra.instance().clear()
        returns = [r.return_value for r in runs[0]]
        records: dict[int, list[dict]] = {}
        for f in sorted(out.glob("*.json")):
            rec = json.loads(f.read_text())
            records.setdefault(rec["job"], []).append(rec)
        for recs in records.values():
            recs.sort(key=lambda r: r["rank"])
        return returns, records

    yield _sweep


def assert_each_job_got_its_own_tasks(
    returns: list[dict[str, Any]], records: dict[int, list[dict]], nodes: list[int]
) -> None:
    # Job order is the sweep's, although the shapes were submitted as groups.
    assert [r["job"] for r in returns] == list(range(len(nodes)))
    assert [r["nodes"] for r in returns] == nodes
    for job, n in enumerate(nodes):
        tasks = n + 1  # a standby node
        assert [r["rank"] for r in records[job]] == list(range(tasks)), records[job]
        assert {r["ntasks"] for r in records[job]} == {tasks}


@pytest.mark.timeout(120)
def test_submitit_local_gives_each_job_of_a_sweep_its_own_task_count(probe_sweep: Any) -> None:
    # 1, 2, 1 nodes: the two 1-node jobs go out together, the 2-node job apart.
    returns, records = probe_sweep([LOCAL_GROUP, "cluster.nodes=1,2,1"])
    assert_each_job_got_its_own_tasks(returns, records, [1, 2, 1])


@pytest.mark.timeout(120)
def test_a_local_cluster_job_runs_in_one_task(probe_sweep: Any) -> None:
    returns, records = probe_sweep([LOCAL_GROUP, "cluster.launcher=local,slurm"])
    assert [len(records[0]), len(records[1])] == [1, 2]
    assert [r["launcher"] for r in returns] == ["local", "slurm"]


def slurm_up() -> bool:
    return shutil.which("sbatch") is not None and bool(slurm_partitions())


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_slurm_gives_each_job_of_a_sweep_its_own_task_count(probe_sweep: Any) -> None:
    if not slurm_up():
        pytest.fail("no SLURM answers: start one with `make slurm-up`")
    returns, records = probe_sweep([
        SLURM_GROUP,
        "cluster.nodes=1,2,1",
        # This machine's SLURM has one node: every task of a job on it.
        "hydra.launcher.tasks_per_host=0",
        "hydra.launcher.setup=['export PROBE_SETUP=ran']",
        "hydra.launcher.srun_args=['--export=ALL,PROBE_SRUN=passed']",
    ])  # fmt: skip
    assert_each_job_got_its_own_tasks(returns, records, [1, 2, 1])
    every = [r for recs in records.values() for r in recs]
    assert {r["num_nodes"] for r in every} == {1}
    assert {(r["setup"], r["srun"]) for r in every} == {("ran", "passed")}


@pytest.mark.slurm
def test_a_partition_slurm_does_not_know_is_refused_and_a_known_one_is_not() -> None:
    known = slurm_partitions()
    if not known:
        pytest.fail("no SLURM answers: start one with `make slurm-up`")
    cfg = compose_config(["hydra/launcher=slurm"])
    job = to_schema(cfg)
    with pytest.raises(ConfigError) as e:
        cfg.hydra.launcher.partition = "no-such-partition"
        check_launcher_host(cfg.hydra.launcher, job, choice="slurm")
    assert e.value.key == "hydra.launcher.partition"
    cfg.hydra.launcher.partition = sorted(known)[0]
    check_launcher_host(cfg.hydra.launcher, job, choice="slurm")
