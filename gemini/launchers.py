"""Hydra launchers that give every job of a sweep the SLURM tasks its own config asks for.

hydra-submitit-launcher 1.2.0 builds one executor for a whole sweep, so every
job gets the same ``nodes`` and ``tasks_per_node``. A ``cluster=slurm`` job
needs one task per simulated node plus its standby nodes, so a sweep over
``cluster.nodes`` needs a different shape per job. The launchers here extend
the stock ones: each job's config is composed once in the submitting process,
jobs with the same shape go out as one array, every array is submitted before
any is waited for, and the results come back in job order. The task side — one
``__call__`` per SLURM task, requeue through ``checkpoint`` on timeout or
preemption — is the stock code.

``hydra/launcher=slurm`` and ``hydra/launcher=submitit_local`` select them
(:func:`register_launchers`; ours replaces the stock ``submitit_local``). Hydra
instantiates launchers only from the ``hydra_plugins`` namespace, so the two
classes are declared in ``hydra_plugins.gemini_launcher`` over
:class:`PerJobShape`. :func:`check_launcher` refuses bad settings before
anything is submitted; the console script calls it for every sweep variant.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as stock
from hydra_plugins.hydra_submitit_launcher.config import (
    BaseQueueConf,
    LocalQueueConf,
    SlurmQueueConf,
)
from omegaconf import DictConfig, OmegaConf

from gemini.config import ConfigError

log = logging.getLogger(__name__)

# Hydra instantiates launchers only from classes defined in the hydra_plugins
# namespace: there, each is PerJobShape over the stock launcher.
SLURM_TARGET = "hydra_plugins.gemini_launcher.SlurmLauncher"
LOCAL_TARGET = "hydra_plugins.gemini_launcher.LocalLauncher"
OURS = (SLURM_TARGET, LOCAL_TARGET)
"""``_target_`` of the launchers :func:`check_launcher` knows how to check."""

ATTEMPT_ENV = "GEMINI_SUBMIT_ATTEMPT"
"""Set in every task: how many times the launcher's submission was requeued."""

SINFO_TIMEOUT_S = 5.0
"""How long the partition check waits for ``sinfo``: a slow controller must not hang the CLI."""

SETTLE_TIMEOUT_S = 60.0
"""How long the CLI waits, after task 0 reported, for a SLURM job's other tasks to
end before it cancels what is left: it never exits with a job of its own queued."""


@dataclass
class GeminiSlurmQueueConf(SlurmQueueConf):
    """The stock SLURM settings (README "Running on SLURM"), plus the layout of tasks.

    ``nodes`` and ``tasks_per_node`` are not settings here: each job's come from
    its ``cluster.nodes + cluster.standby_nodes`` and ``tasks_per_host``.
    """

    _target_: str = SLURM_TARGET
    tasks_per_host: int = 1
    """Most tasks one SLURM node (machine) runs: 1 = one simulated node per machine, as
    on a real cluster; 0 = every task of a job on one machine (a single-host SLURM).
    A job's tasks are spread evenly over the fewest machines that hold them; a count
    they cannot be spread evenly over is refused."""
    srun_args: list[str] | None = None
    """Extra arguments of the ``srun`` that starts the tasks, e.g. ``[--cpu-bind=none]``."""


@dataclass
class GeminiLocalQueueConf(LocalQueueConf):
    """The stock local submitit settings; every task of a job runs on this machine."""

    _target_: str = LOCAL_TARGET
    array_parallelism: int = 256
    """Most jobs of the sweep running at once on this machine (as SLURM's ``%N``);
    1 runs them one after the other."""
    max_num_timeout: int = 0
    """Requeues after the time limit, as on SLURM (a preemption's are not counted)."""


def register_launchers() -> None:
    """Store ``hydra/launcher=slurm`` and ``hydra/launcher=submitit_local``.

    Ours replaces the stock ``submitit_local``. Hydra executes every plugin's
    module on the first use of its plugin registry, and the stock module
    stores its option then: scanning first makes ours the one that stays. (A
    YAML option of the same name in conf/ cannot shadow it: Hydra would
    validate the file against the stock schema, with a deprecation warning.)
    """
    from hydra.core.plugins import Plugins

    from hydra_plugins.gemini_launcher import LocalLauncher, SlurmLauncher

    plugins = Plugins.instance()
    # The scan may not see an editable install's hydra_plugins: say it here.
    plugins.register(SlurmLauncher)
    plugins.register(LocalLauncher)
    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="slurm", node=GeminiSlurmQueueConf, provider="gemini")
    cs.store(
        group="hydra/launcher", name="submitit_local", node=GeminiLocalQueueConf, provider="gemini"
    )


def launcher_options(conf: Path | None = None) -> list[str]:
    """The ``hydra/launcher`` options: ours, the plugins', and a site's own YAML files
    under ``conf/hydra/launcher/`` (``defaults: [slurm]`` plus its settings)."""
    names = {n.removesuffix(".yaml") for n in ConfigStore.instance().list("hydra/launcher")}
    if conf is not None:
        names.update(p.stem for p in (conf / "hydra" / "launcher").glob("*.yaml"))
    return sorted(names)


# -- the shape of a job ------------------------------------------------------


def job_tasks(cfg: DictConfig | Any) -> int:
    """SLURM tasks a job needs: one per simulated node and standby node under
    ``cluster=slurm``; one otherwise (a local cluster runs inside one task)."""
    cluster = OmegaConf.select(cfg, "cluster") if isinstance(cfg, DictConfig) else cfg.cluster
    if cluster is None or cluster.launcher != "slurm":
        return 1
    return int(cluster.nodes) + int(cluster.standby_nodes)


def layout(tasks: int, tasks_per_host: int) -> tuple[int, int]:
    """``(nodes, tasks_per_node)`` of a job of ``tasks`` tasks, at most ``tasks_per_host``
    per machine (0 = no limit), spread evenly over the fewest machines.

    SLURM (and submitit, which waits for ``nodes x tasks_per_node`` results)
    starts the same number of tasks on every node, so an uneven spread is refused.
    """
    if tasks < 1:
        raise ConfigError(
            "cluster.nodes", tasks, "a job needs at least one task: set cluster.nodes >= 1"
        )
    if tasks_per_host < 0:
        raise ConfigError(
            "hydra.launcher.tasks_per_host",
            tasks_per_host,
            "must be >= 0 (1 = one task per machine, 0 = all on one machine)",
        )
    if tasks_per_host == 0 or tasks <= tasks_per_host:
        return 1, tasks
    nodes = math.ceil(tasks / tasks_per_host)
    if tasks % nodes:
        fits = [k for k in range(1, tasks + 1) if tasks % math.ceil(tasks / k) == 0]
        raise ConfigError(
            "hydra.launcher.tasks_per_host",
            tasks_per_host,
            f"{tasks} tasks (cluster.nodes + cluster.standby_nodes) cannot be spread evenly over "
            f"{nodes} machines: use one of {', '.join(map(str, fits))}, or 0 (all on one machine)",
        )
    return nodes, tasks // nodes


# -- the launchers ------------------------------------------------------------


class PerJobShape(stock.BaseSubmititLauncher):
    """The stock launcher, with one executor per job shape instead of one per sweep.

    Mixed in before a stock launcher (hydra_plugins.gemini_launcher), which sets
    the executor.
    """

    # Settings of ours that are not submitit parameters.
    _OWN_KEYS: frozenset[str] = frozenset({"tasks_per_host"})

    attempt: int = 0
    """Requeues of this submission so far: the requeued submission carries it
    (see :meth:`checkpoint`), so every task of an attempt agrees on which it is."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        # Runs in every task, in a fresh interpreter: the config's resolvers
        # (paths.outputs) must exist before the stock code composes the job.
        from gemini.config import register_configs

        register_configs()
        # Read by gemini.cluster.slurm.TaskEnv: the tasks of one attempt join
        # that attempt's job, never a previous attempt's leftovers.
        os.environ[ATTEMPT_ENV] = str(self.attempt)
        return super().__call__(*args, **kwargs)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        # Called in task 0 when SLURM signals a timeout or a preemption: what
        # it returns is pickled and run again by every task of the next attempt.
        self.attempt += 1
        return super().checkpoint(*args, **kwargs)

    def shape(self, overrides: Sequence[str]) -> tuple[int, int]:
        """``(nodes, tasks_per_node)`` of the job that ``overrides`` select."""
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        return layout(job_tasks(cfg), int(self.params.get("tasks_per_host", 0)))

    def local_window(self) -> int | None:
        """How many jobs submitit's local executor may run at once (None: SLURM caps
        its arrays itself)."""
        if self._EXECUTOR != "local":
            return None
        return max(1, int(self.params.get("array_parallelism", 256)))

    def executor(self, nodes: int, tasks_per_node: int) -> Any:
        """A submitit executor with this launcher's settings and one job shape."""
        import submitit

        own = self._OWN_KEYS | ({"array_parallelism"} if self._EXECUTOR == "local" else set())
        params = {k: v for k, v in self.params.items() if k not in own}
        params.update(nodes=nodes, tasks_per_node=tasks_per_node)
        folder = params.pop("submitit_folder")
        # max_num_timeout (requeues after a timeout) is the executor's, not a job's.
        init: dict[str, Any] = {}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(folder=folder, cluster=self._EXECUTOR, **init)
        # submitit takes the shared settings plain and the others prefixed
        # with the executor's name (slurm_partition), as the stock launcher.
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()}
        )
        return executor

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None
        assert len(job_overrides) > 0
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")

        groups: dict[tuple[int, int], list[int]] = {}
        for i, overrides in enumerate(job_overrides):
            groups.setdefault(self.shape(overrides), []).append(i)
        singletons = Singleton.get_state()
        submitted: dict[int, Any] = {}
        # Submit every shape before waiting on any: the arrays run side by side.
        for (nodes, per_node), members in groups.items():
            log.info(f"\t{nodes} node(s) x {per_node} task(s):")
            for i in members:
                idx = initial_job_idx + i
                log.info(f"\t#{idx} : {' '.join(filter_overrides(job_overrides[i]))}")
            args = [
                (list(job_overrides[i]), "hydra.sweep.dir", initial_job_idx + i,
                 f"job_id_for_{initial_job_idx + i}", singletons)
                for i in members
            ]  # fmt: skip
            executor = self.executor(nodes, per_node)
            window = self.local_window()
            if window is None:
                jobs = executor.map_array(self, *zip(*args, strict=True))
                submitted.update(zip(members, jobs, strict=True))
                continue
            # submitit's local executor has no arrays to cap: keep at most
            # `array_parallelism` jobs running, starting the next as one ends.
            for i, job_args in zip(members, args, strict=True):
                while sum(not j.done() for j in submitted.values()) >= window:
                    time.sleep(1.0)
                submitted[i] = executor.submit(self, *job_args)
        # Task 0's return is the job's, as in the stock launcher.
        returns = [submitted[i].results()[0] for i in range(len(job_overrides))]
        if self._EXECUTOR == "slurm":
            settle(list(submitted.values()))
        if any(r.status == JobStatus.FAILED for r in returns):
            # report_failures ends the process, before Hydra's end of the multirun:
            # the sweep's table and parent run end here instead.
            from gemini.multirun_table import end_multirun

            end_multirun(self.config)
        report_failures(returns, initial_job_idx)
        return returns


def settle(jobs: Sequence[Any], timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Wait until SLURM no longer lists ``jobs``; cancel those still listed after
    ``timeout_s``.

    submitit counts a job done once task 0's result is written, while its other
    tasks (and srun's cleanup) may still be ending: after a refusal, that is
    seconds. The CLI returns only once none of its jobs is queued or running.
    """
    ids = [str(job.job_id) for job in jobs]
    deadline = time.monotonic() + timeout_s
    while (left := slurm_listed(ids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        log.warning(f"SLURM job(s) {' '.join(left)} still running {timeout_s:.0f} s after "
                    "task 0 ended: cancelling them")  # fmt: skip
        subprocess.run(["scancel", *left], capture_output=True, timeout=30, check=False)


def slurm_listed(ids: Sequence[str]) -> list[str]:
    """Those of ``ids`` (``<job>`` or ``<array job>_<task>``) that ``squeue`` still lists;
    none when squeue cannot answer (the CLI does not hang on a broken controller)."""
    if not ids:
        return []
    try:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-j", ",".join(ids)],
            capture_output=True,
            text=True,
            timeout=SINFO_TIMEOUT_S,
            check=False,
        )
    except (subprocess.SubprocessError, OSError):
        return []
    # squeue exits non-zero ("Invalid job id") once every id has left its memory.
    if out.returncode != 0:
        return []
    listed = {line.strip() for line in out.stdout.splitlines() if line.strip()}
    # An array's still-pending tasks are listed together, as <array job>_[0-3].
    pending = {line.split("_[")[0] for line in listed if "_[" in line}
    return [i for i in ids if i in listed or i.split("_")[0] in pending]


def report_failures(returns: Sequence[JobReturn], initial_job_idx: int) -> None:
    """One line per job that failed, then exit as a local run would (2 when every
    failure was a refusal, else 1): the jobs' own logs hold the rest."""
    import sys

    from gemini.experiment import JobFailed

    failed = [(i, r) for i, r in enumerate(returns) if r.status == JobStatus.FAILED]
    if not failed:
        return
    refusals = 0
    for i, ret in failed:
        error = ret._return_value
        refusals += isinstance(error, ConfigError)
        what = f"error: {error}" if isinstance(error, (ConfigError, JobFailed)) else repr(error)
        print(f"gemini: job #{initial_job_idx + i}: {what}", file=sys.stderr)
    sys.exit(2 if refusals == len(failed) else 1)


# -- refusing bad settings -----------------------------------------------------


def check_launcher(launcher: DictConfig, job: Any, *, choice: str, multirun: bool) -> None:
    """Refuse launcher settings a submission would fail on (or run wrongly with).

    ``launcher`` is the composed ``hydra.launcher`` node, ``job`` the job's typed
    config, ``choice`` the ``hydra/launcher`` option's name. Values only: what
    this machine can do (SLURM's commands, the partition, the cores) is
    :func:`check_launcher_host`'s.
    """
    target = str(launcher.get("_target_", ""))
    if target not in OURS:
        if job.cluster.launcher == "slurm":
            # Another launcher would start one task (or none under SLURM) per job.
            raise ConfigError(
                "cluster",
                "slurm",
                "runs as one SLURM task per node: submit it with `gemini -m "
                "hydra/launcher=slurm cluster=slurm ...` (or hydra/launcher=submitit_local), "
                "or use cluster=local",
            )
        return
    if not multirun:
        raise ConfigError(
            "hydra/launcher",
            choice,
            "a launcher only starts the jobs of a multirun: use gemini -m ...",
        )
    s = launcher

    def key(name: str) -> str:
        return f"hydra.launcher.{name}"

    if s.timeout_min < 1:
        raise ConfigError(key("timeout_min"), s.timeout_min, "must be >= 1 minute")
    if s.cpus_per_task is not None and s.cpus_per_task < 1:
        raise ConfigError(key("cpus_per_task"), s.cpus_per_task, "must be >= 1 (or null)")
    for name in ("gpus_per_node", "gpus_per_task"):
        value = s.get(name)
        if value is not None and value < 0:
            raise ConfigError(key(name), value, "must be >= 0 (or null)")
    if s.mem_gb is not None and s.mem_gb <= 0:
        raise ConfigError(key("mem_gb"), s.mem_gb, "must be > 0 GB (or null for the default)")
    for name in ("nodes", "tasks_per_node"):
        if s[name] != 1:
            raise ConfigError(
                key(name),
                s[name],
                "is set per job from cluster.nodes + cluster.standby_nodes (cluster=slurm; "
                "1 task for cluster=local): set cluster.nodes instead"
                + (
                    ", and hydra.launcher.tasks_per_host for the spread"
                    if target == SLURM_TARGET
                    else ""
                ),
            )
    tasks = job_tasks(job)
    if s.array_parallelism < 1:
        raise ConfigError(key("array_parallelism"), s.array_parallelism, "must be >= 1")
    if s.max_num_timeout < 0:
        raise ConfigError(key("max_num_timeout"), s.max_num_timeout, "must be >= 0")
    if target == SLURM_TARGET:
        if s.signal_delay_s < 0:
            raise ConfigError(key("signal_delay_s"), s.signal_delay_s, "must be >= 0 seconds")
        layout(tasks, s.tasks_per_host)


def check_launcher_host(launcher: DictConfig, job: Any, *, choice: str) -> None:
    """Refuse what this machine cannot do with settings :func:`check_launcher` passed.

    Separate so that a sweep's values are all checked before the machine is: a bad
    value in the sweep's last variant is named even where SLURM is not installed.
    """
    target = str(launcher.get("_target_", ""))
    if target not in OURS:
        return
    if target == SLURM_TARGET:
        check_slurm_here(launcher.partition, choice)
    else:
        check_local_capacity(job, job_tasks(job))


def check_slurm_here(partition: str | None, choice: str) -> None:
    """SLURM's commands exist here and know ``partition`` (when one is set)."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise ConfigError(
            "hydra/launcher",
            choice,
            "sbatch/srun are not on this machine's PATH: submit from a SLURM login node, "
            "or use hydra/launcher=submitit_local to run the same tasks here",
        )
    if partition is None:
        return
    known = slurm_partitions()
    if known is not None and partition not in known:
        raise ConfigError(
            "hydra.launcher.partition",
            partition,
            f"SLURM has no such partition: use one of {', '.join(sorted(known))} (sinfo -s)",
        )


def slurm_partitions() -> set[str] | None:
    """Partitions ``sinfo`` lists, or None when it cannot say (missing, slow or failing)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%P"],
            capture_output=True,
            text=True,
            timeout=SINFO_TIMEOUT_S,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    # sinfo marks the default partition with a trailing '*'.
    names = {line.strip().rstrip("*") for line in out.splitlines() if line.strip()}
    return names or None


def check_local_capacity(job: Any, tasks: int) -> None:
    """submitit_local runs every task on this machine: refuse more than it holds."""
    c = job.cluster
    cores = os.cpu_count() or 1
    limit = c.max_ranks_per_core * cores
    processes = tasks * c.ranks_per_node
    if processes > limit:
        raise ConfigError(
            "cluster.nodes",
            c.nodes,
            f"{tasks} tasks (cluster.nodes + cluster.standby_nodes) x {c.ranks_per_node} ranks = "
            f"{processes} trainer processes exceeds what this machine holds ({limit} = "
            f"cluster.max_ranks_per_core={c.max_ranks_per_core} x {cores} cores): lower "
            "cluster.nodes or cluster.standby_nodes, or submit with hydra/launcher=slurm",
        )
