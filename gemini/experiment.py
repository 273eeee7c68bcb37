"""``run(cfg)``: one job, end to end — the controller (docs/design.md §1).

The calling process is the controller: it hosts the KV store, starts the
root agent and the node launchers, fires the failure schedule, shows
progress, and when the root declares the job over, collects what the ranks
reported, writes ``summary.json`` and records the job in MLflow. Whatever
happens — success, an error, Ctrl-C — it tears down every process it started
and frees the run's shared memory before returning.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from gemini.cluster import keys
from gemini.cluster.addresses import store_address
from gemini.config import ConfigError, GeminiConfig, to_schema, validate
from gemini.exactness import Verdict, look_up_verdict, run_tags
from gemini.recovery import PHASES, RECOVERY_METRICS
from gemini.tracking import browse_hint, mlflow_client, tracking_uri

if TYPE_CHECKING:
    from gemini.cluster.base import Cluster
    from gemini.cluster.job import JobSpec
    from gemini.cluster.store import Store
    from gemini.failures import Injector


class JobFailed(RuntimeError):
    """The job ended without completing (the reason is in the message)."""


def _hydra_dirs() -> tuple[Path | None, str | None, str]:
    """(job dir, sweep dir if multirun, job name) when running under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:
        return None, None, "job"
    multirun = hc.mode == RunMode.MULTIRUN
    return (
        Path(hc.runtime.output_dir),
        str(hc.sweep.dir) if multirun else None,
        (hc.job.override_dirname or "default") if multirun else "default",
    )


def check_writable(key: str, path: Path) -> None:
    """Refuse an unwritable outputs path before anything starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            key, str(path), f"is not writable ({e.strerror}): choose a writable directory"
        ) from e


def run(cfg: DictConfig | GeminiConfig, job_dir: Path | None = None) -> dict[str, Any]:
    """Run one job and return its summary (also written to ``summary.json``)."""
    typed = to_schema(cfg)
    hydra_dir, sweep_dir, job_name = _hydra_dirs()
    task = None
    if typed.cluster.launcher == "slurm":
        # Every task of the SLURM job runs this; only task 0 is the controller.
        from gemini.cluster.slurm import TaskEnv, check_task_host, check_tasks, serve_task

        task = TaskEnv.current()
        check_tasks(typed, task)
        if task.rank != 0:
            where = job_dir or hydra_dir
            if where is None:
                raise ConfigError(
                    "cluster.launcher", "slurm", "runs under Hydra: start it with `gemini -m ...`"
                )
            return serve_task(typed, where, task)
    # Every refusal before the job dir, the store or a process exists.
    try:
        validate(typed, host=True)
        if task is not None:
            check_task_host(typed, task)
    except ConfigError as e:
        if task is not None and (job_dir or hydra_dir) is not None:
            from gemini.cluster.slurm import refuse_job

            refuse_job(job_dir or hydra_dir, str(e), task.launch)  # type: ignore[arg-type]
        raise
    outputs = Path(typed.paths.outputs)
    check_writable("paths.outputs", outputs)
    job_dir = job_dir or hydra_dir or outputs / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
    check_writable("paths.outputs", job_dir)
    if typed.tracking.enabled and not typed.tracking.uri:
        check_writable("paths.outputs", outputs)
    controller = Controller(typed, job_dir, sweep_dir, job_name)
    controller.launch = task.launch if task is not None else ""
    return controller.run()


def previous_attempt(cfg: GeminiConfig, job_dir: Path) -> JobSpec | None:
    """The job this one continues: on SLURM, a requeued job starts again in the
    same job dir, where its previous attempt left ``job.json``."""
    from gemini.cluster.job import JobSpec

    path = job_dir / "job.json"
    if cfg.cluster.launcher != "slurm" or not path.exists():
        return None
    try:
        return JobSpec.load(path)
    except (OSError, ValueError, TypeError):
        return None


def free_attempt(prev: JobSpec) -> None:
    """Whatever a killed earlier attempt left on this machine: processes, shared
    memory, its secret (the new attempt writes a new one to a new file)."""
    from gemini.cluster.processes import free_run

    free_run(prev.run_id)
    Path(prev.secret_file).unlink(missing_ok=True)


class Controller:
    def __init__(
        self, cfg: GeminiConfig, job_dir: Path, sweep_dir: str | None, job_name: str
    ) -> None:
        self.cfg, self.job_dir, self.sweep_dir, self.job_name = cfg, job_dir, sweep_dir, job_name
        self.run_id = uuid.uuid4().hex[:10]
        self.launch = ""
        """Which start of a SLURM job this is (``job.json``'s ``launch``)."""
        self.reason = ""
        """Why the job ended as it did, as the controller saw it (e.g. the root vanished)."""

    def run(self) -> dict[str, Any]:
        from gemini.checkpoint.preflight import preflight
        from gemini.cluster.base import make_cluster
        from gemini.cluster.job import JobSpec, new_secret_file
        from gemini.cluster.netns import open_fabric
        from gemini.cluster.store import Store
        from gemini.failures import Injector

        cfg = self.cfg
        preflight(cfg, self.job_dir)
        prev = previous_attempt(cfg, self.job_dir)
        if prev is not None:
            free_attempt(prev)
        job = JobSpec(
            run_id=self.run_id,
            job_dir=str(self.job_dir),
            store="",
            secret_file=str(new_secret_file(self.job_dir)),
            config=OmegaConf.to_container(OmegaConf.structured(cfg)),  # type: ignore[arg-type]
            attempt=prev.attempt + 1 if prev else 0,
            storage_id=prev.storage_run if prev else "",
            resume=prev is not None,
            launch=self.launch,
        )
        # The emulated network, if any, exists before the store: the store
        # binds to the fabric's bridge, where every namespace reaches it.
        fabric = open_fabric(cfg.cluster, self.run_id)
        try:
            host = fabric.root_address if fabric else cfg.cluster.host
            store = Store(host, cfg.cluster.store_port, job.secret(), timeout_s=60.0, master=True)
            job.store = f"{host}:{store.port}" if fabric else store_address(cfg.cluster, store.port)
            job.save()
            mlflow_run = self.open_tracking(job)
            (self.job_dir / "config.resolved.yaml").write_text(
                OmegaConf.to_yaml(OmegaConf.structured(cfg))
            )
            cluster = make_cluster(job, store, fabric)
        except BaseException:
            if fabric is not None:
                fabric.close()
            raise
        injector = Injector(job, store, cluster)
        t0 = time.time()
        outcome = "error"
        try:
            cluster.start()
            outcome = self.watch(store, cluster, injector)
        finally:
            injector.stop()
            wall_s = time.time() - t0
            reports = collect(store, job.world_size)
            layout = cluster.layout()
            cluster.teardown()
        summary = summarize(
            cfg,
            reports,
            wall_s,
            outcome,
            self.run_id,
            injector.fired,
            cluster.replaced,
            reason=self.reason,
            t_start=t0,
        )
        summary["cluster_layout"] = layout
        if cfg.cluster.launcher == "slurm":
            summary["requeues"] = job.attempt
        verdict = judge_run(cfg, summary)
        if verdict is not None:
            summary.update(
                exact=verdict.exact,
                exact_reference_run=verdict.reference_run,
                exact_detail=verdict.detail,
            )
        (self.job_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if reports["recoveries"]:
            from gemini.timeline import draw_timeline

            draw_timeline(reports["recoveries"], self.job_dir / "recovery_timeline.png", cfg)
        if cfg.tracking.enabled:
            from gemini.tracking import parent_run_id, record_job

            summary["mlflow_run_id"] = record_job(
                cfg,
                self.job_dir,
                run_name=self.run_name(),
                summary=summary,
                step_metrics=reports["steps"],
                recoveries=reports["recoveries"],
                parent=parent_run_id(self.sweep_dir),
                extra_tags=run_tags(cfg, summary["state_digest"], verdict),
                run_id=mlflow_run,
            )
            (self.job_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if cfg.progress:
            print_results(cfg, summary, reports["recoveries"])
        store.raw = None  # type: ignore[assignment]  # closes the server socket
        if outcome != "completed":
            raise JobFailed(
                f"job {outcome}: {summary.get('reason', '')} (logs in {self.job_dir / 'logs'})"
            )
        return summary

    def run_name(self) -> str:
        return self.job_name if self.sweep_dir else f"{self.cfg.model.name}-{self.cfg.backend.name}"

    def open_tracking(self, job: JobSpec) -> str | None:
        """The job's MLflow run, open while it runs (a requeued job's, continued)."""
        if not self.cfg.tracking.enabled:
            return None
        from gemini.tracking import open_job_run, parent_run_id

        return open_job_run(
            self.cfg,
            self.job_dir,
            run_name=self.run_name(),
            parent=parent_run_id(self.sweep_dir),
            tags={"run_id": job.run_id, "launcher": self.cfg.cluster.launcher},
        )

    def watch(self, store: Store, cluster: Cluster, injector: Injector) -> str:
        """Serve the cluster until the root declares the job over; show progress."""
        bar = None
        if self.cfg.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=self.cfg.train.steps,
                desc="training",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
                disable=not sys.stderr.isatty(),
            )
        last = 0
        c = self.cfg.cluster
        root_hb, root_seen = -1, time.monotonic()
        # Start-up (imports) and one election must fit in the grace.
        root_grace = 3 * c.heartbeat_s * c.missed_beats + 60.0
        try:
            while True:
                cluster.service()
                injector.tick()
                res = store.get_json_or(keys.ROOT_RESULT)
                if res is not None:
                    self.reason = res.get("reason", "")
                    return str(res["status"])
                if bar is not None:
                    step = progress(store, c.nodes * c.ranks_per_node)
                    if step != last:
                        bar.update(step - last)
                        last = step
                hb = store.counter(keys.HB_ROOT)
                now = time.monotonic()
                if hb != root_hb:
                    root_hb, root_seen = hb, now
                elif now - root_seen > root_grace:
                    # No root and no successor (an election takes a few
                    # missed beats plus a start-up): stop rather than hang.
                    self.reason = (
                        f"the root agent stopped beating {now - root_seen:.0f} s ago and no "
                        f"new root was elected (see {self.job_dir / 'logs'}/root*.log)"
                    )
                    return "error"
                time.sleep(0.1)
        finally:
            if bar is not None:
                bar.close()


def judge_run(cfg: GeminiConfig, summary: dict[str, Any]) -> Verdict | None:
    """Whether a run with a failure schedule ended exact (None for a failure-free run).

    The reference is a failure-free run of the same config in the MLflow
    experiment, so an untracked run cannot be judged.
    """
    if cfg.failure.name == "none":
        return None
    if not cfg.tracking.enabled:
        return Verdict("unknown", detail="tracking is off: no reference runs to compare with")
    from gemini.tracking import mlflow_client

    return look_up_verdict(
        mlflow_client(cfg), cfg.tracking.experiment, cfg, summary["state_digest"]
    )


def progress(store: Any, world: int) -> int:
    steps = [store.get_int(keys.progress(r), -1) for r in range(world)]
    return min(steps) if steps and min(steps) >= 0 else 0


def collect(store: Any, world: int) -> dict[str, Any]:
    """Everything the ranks and the root reported through the store (see :func:`merge_reports`)."""
    gen = int(store.get_json_or(keys.GEN, 0))
    return merge_reports(
        per_rank={r: store.read_lines(keys.metrics(r)) for r in range(world)},
        finals={r: store.get_json_or(keys.final(gen, r)) for r in range(world)},
        readies={r: store.get_json_or(keys.ready(gen, r)) for r in range(world)},
        recoveries=[rec for _, rec in store.items(keys.RECOVERY)],
        gen=gen,
        root=store.get_json_or(keys.ROOT_RESULT, {}),
    )


# Per-step metrics averaged over ranks in a step's row (bytes are summed).
STEP_MEANS = (
    "iter_time_s",
    "ckpt_stall_s",
    "loss",
    "ckpt_local_s",
    "ckpt_replicate_s",
    "ckpt_persist_s",
    "ckpt_time_s",
)


def merge_reports(
    *,
    per_rank: dict[int, list[dict[str, Any]]],
    finals: dict[int, Any],
    readies: dict[int, Any],
    recoveries: list[dict[str, Any]],
    gen: int,
    root: dict[str, Any],
) -> dict[str, Any]:
    """The job's reports: one row per step over all ranks, and the recoveries' wasted time.

    ``per_rank`` is each rank's per-step records in the order it sent them;
    a rank's ``final_wait`` record (the last checkpoint, waited for after the
    loop) is kept apart in ``final_waits``.
    """
    # A step replayed after a recovery is reported again: the last report of
    # each step is the timeline that produced the final state.
    by_step: dict[int, list[dict[str, Any]]] = {}
    for r, recs in per_rank.items():
        latest: dict[int, dict[str, Any]] = {}
        for rec in recs:
            if not rec.get("final_wait"):
                latest[int(rec["step"])] = rec
        for s, rec in latest.items():
            by_step.setdefault(s, []).append({**rec, "rank": r})
    steps = []
    for s in sorted(by_step):
        recs = by_step[s]
        row: dict[str, Any] = {"step": s, "t": max(r["t"] for r in recs)}
        for k in STEP_MEANS:
            vals = [r[k] for r in recs if k in r]
            if vals:
                row[k] = mean(vals)
        if "ckpt_bytes" in recs[0]:
            row["ckpt_bytes"] = sum(r.get("ckpt_bytes", 0) for r in recs)
        row["throughput_samples_s"] = mean(r["throughput_samples_s"] for r in recs)
        steps.append(row)
    # When every rank had trained its first step (of the first generation).
    firsts = [float(recs[0]["t"]) for recs in per_rank.values() if recs]
    return {
        "steps": steps,
        "t_first_step": max(firsts) if len(firsts) == len(per_rank) and firsts else None,
        "finals": finals,
        "readies": readies,
        "recoveries": add_wasted(recoveries, per_rank),
        "gen": gen,
        "final_waits": [rec for recs in per_rank.values() for rec in recs if rec.get("final_wait")],
        "idle_profiles": idle_profiles(per_rank),
        "interleave": first_record(per_rank, "interleave"),
        "root": root,
    }


def first_record(per_rank: dict[int, list[dict[str, Any]]], key: str) -> dict[str, dict[str, Any]]:
    """Each rank's first ``key`` entry (of its first generation that reported one)."""
    out: dict[str, dict[str, Any]] = {}
    for r, recs in sorted(per_rank.items()):
        found = next((rec[key] for rec in recs if rec.get(key)), None)
        if found is not None:
            out[str(r)] = found
    return out


def idle_profiles(per_rank: dict[int, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each rank's profile of its iterations' idle spans, from its first generation
    (a later generation profiles again; the first is the undisturbed one)."""
    out: dict[str, dict[str, Any]] = {}
    for r, recs in sorted(per_rank.items()):
        profile = next((rec["idle_profile"] for rec in recs if "idle_profile" in rec), None)
        if profile is not None:
            out[str(r)] = profile
    return out


def add_wasted(
    recoveries: list[dict[str, Any]], per_rank: dict[int, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """The recoveries (copies, in their order) with ``ckpt_stall_since_last_s`` and ``wasted_s``.

    ``wasted_s`` = ``recovery_s`` + the checkpoint stalls paid since the
    previous failure. Stalls are averaged over ranks (they train in
    lock-step) and summed over every executed step in the window, replayed
    ones included: that is time the job spent on checkpoints that this
    failure then made worthless or that bought its recovery.
    """
    out = [dict(rec) for rec in recoveries]
    start = 0.0
    world = max(1, len(per_rank))
    for rec in sorted(out, key=lambda r: float(r.get("t_inject", 0.0))):
        t_inj = float(rec.get("t_inject", 0.0))
        stall = (
            sum(
                float(x.get("ckpt_stall_s", 0.0))
                for recs in per_rank.values()
                for x in recs
                if start <= float(x.get("t", 0.0)) < t_inj
            )
            / world
        )
        rec["ckpt_stall_since_last_s"] = stall
        if isinstance(rec.get("recovery_s"), (int, float)):
            rec["wasted_s"] = float(rec["recovery_s"]) + stall
        start = t_inj
    return out


def state_digest(finals: dict[int, Any]) -> str | None:
    """sha256 over every rank's final state digest, in rank order."""
    if not finals or any(v is None for v in finals.values()):
        return None
    h = hashlib.sha256()
    for r in sorted(finals):
        h.update(finals[r]["digest"].encode())
    return h.hexdigest()


def summarize(
    cfg: GeminiConfig,
    reports: dict[str, Any],
    wall_s: float,
    outcome: str,
    run_id: str,
    fired: list[dict[str, Any]],
    replaced: list[tuple[int, float]],
    reason: str = "",
    t_start: float | None = None,
) -> dict[str, Any]:
    """The job's ``summary.json``; ``reason`` is the controller's word on how it ended,
    used when the root left none (a root that vanished writes no result)."""
    steps = reports["steps"]
    # The first steps pay for lazy allocation and warm caches; a run mean of
    # steady state is what overhead comparisons need.
    steady = [s for s in steps if s["step"] > min(3, max(0, len(steps) - 1))] or steps

    def m(key: str, rows: list[dict[str, Any]] = steady) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return mean(vals) if vals else None

    ckpt_rows = [s for s in steps if "ckpt_local_s" in s]
    summary: dict[str, Any] = {
        "outcome": outcome,
        "reason": reports["root"].get("reason") or reason,
        "run_id": run_id,
        "steps": steps[-1]["step"] if steps else 0,
        "wall_s": wall_s,
        # Cluster start -> every rank done with its first step: processes,
        # imports, the standby nodes and warm spares the root waits for, the
        # rendezvous and the first step.
        "startup_s": (
            reports["t_first_step"] - t_start
            if t_start is not None and reports.get("t_first_step") is not None
            else None
        ),
        "iter_time_s": m("iter_time_s"),
        # Every step's, in order: benchmarks take the steady state after a
        # phase of their own (e.g. after the idle-span profile).
        "iter_times_s": [s.get("iter_time_s") for s in steps],
        "throughput_samples_s": m("throughput_samples_s"),
        "final_loss": steps[-1].get("loss") if steps else None,
        "state_digest": state_digest(reports["finals"]),
        "world_size": cfg.cluster.nodes * cfg.cluster.ranks_per_node,
        "nodes": cfg.cluster.nodes,
        "backend": cfg.backend.name,
        "model": cfg.model.name,
        "ckpt_stall_s": m("ckpt_stall_s"),
        "ckpt_local_s": m("ckpt_local_s", ckpt_rows),
        "ckpt_replicate_s": m("ckpt_replicate_s", ckpt_rows),
        "ckpt_persist_s": m("ckpt_persist_s", ckpt_rows),
        # t_ckpt: one checkpoint from start to complete, as the cadence saw it.
        "ckpt_time_s": m("ckpt_time_s", [s for s in steps if "ckpt_time_s" in s]),
        "ckpt_bytes": m("ckpt_bytes", ckpt_rows),
        # Each step's row carries the checkpoint it waited for; the last one is
        # waited for after the loop (a final_wait record).
        "checkpoints": len(ckpt_rows) + (1 if reports["final_waits"] else 0),
        "checkpoints_per_hour": len(ckpt_rows) / wall_s * 3600 if wall_s > 0 else 0.0,
        "failures_injected": fired,
        "recoveries": reports["recoveries"],
        "generations": reports["gen"],
    }
    profiles = list(reports.get("idle_profiles", {}).values())
    if profiles:
        # Ranks train in lock-step: their idle spans differ only by jitter.
        summary["idle_profiles"] = reports.get("idle_profiles", {})
        summary["idle_s"] = mean(p["idle_s"] for p in profiles)
        summary["idle_cv"] = mean(p["idle_cv"] for p in profiles)
        summary["comm_s"] = mean(p["comm_s"] for p in profiles)
    plans = reports.get("interleave") or {}
    if plans:
        # Each rank's link fit and plan; the interval is the one all ranks agreed on.
        summary["interleave"] = plans
        summary["interleave_interval"] = max(int(p.get("interval", 1)) for p in plans.values())
    if cfg.backend.bandwidth_gbps > 0:
        summary["storage_bandwidth"] = f"emulated {cfg.backend.bandwidth_gbps} Gbit/s per node"
    if reports["recoveries"]:
        recs = reports["recoveries"]
        for k in RECOVERY_METRICS:
            vals = [r[k] for r in recs if isinstance(r.get(k), (int, float))]
            if vals:
                summary[f"mean_{k}"] = mean(vals)
    return summary


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}{unit}"
    return f"{v}{unit}"


def print_results(cfg: GeminiConfig, s: dict[str, Any], recoveries: list[dict[str, Any]]) -> None:
    rows = [
        ("outcome", s["outcome"]),
        *([("reason", s["reason"])] if s.get("reason") else []),
        ("model / parallel", f"{cfg.model.name} / {cfg.train.parallel}"),
        (
            "cluster",
            f"{cfg.cluster.nodes} nodes x {cfg.cluster.ranks_per_node} ranks "
            f"({cfg.cluster.launcher})",
        ),
        (
            "backend",
            cfg.backend.name
            + (
                f" (m={cfg.backend.replication.factor}, {cfg.backend.replication.placement})"
                if cfg.backend.name == "replicated"
                else ""
            ),
        ),
        ("steps", s["steps"]),
        ("wall time", _fmt(s["wall_s"], " s")),
        ("start-up (to step 1)", _fmt(s.get("startup_s"), " s")),
        ("iteration time (mean)", _fmt(s["iter_time_s"], " s")),
        ("throughput", _fmt(s["throughput_samples_s"], " samples/s")),
        ("final loss", _fmt(s["final_loss"])),
        ("checkpoints", s["checkpoints"]),
        ("checkpoint stall (mean/step)", _fmt(s["ckpt_stall_s"], " s")),
        ("state digest", (s["state_digest"] or "-")[:16]),
    ]
    if s.get("exact"):
        verdict = Verdict(s["exact"], s.get("exact_reference_run"), s.get("exact_detail", ""))
        rows.append(("exact", verdict.describe()))
    if s.get("storage_bandwidth"):
        rows.append(("storage", s["storage_bandwidth"]))
    width = max(len(k) for k, _ in rows)
    print("\nResults", file=sys.stdout)
    print("-" * (width + 40))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for i, r in enumerate(recoveries, 1):
        print(
            f"\nRecovery {i}: {r.get('kind')} failure of {r.get('failed', '')} "
            f"at step {r.get('failed_step')}, "
            f"restored step {r.get('restored_step')} ({r.get('reason', '')})"
        )
        print("  " + "  ".join(f"{p[:-2]} {_fmt(r.get(p), 's')}" for p in PHASES))
        print(
            f"  recovery {_fmt(r.get('recovery_s'), 's')}  wasted {_fmt(r.get('wasted_s'), 's')}  "
            f"lost steps {r.get('lost_steps')}  sources {r.get('source_counts')}"
        )
        ranks = r.get("rank_sources") or {}
        if ranks:
            where = ", ".join(
                f"rank {k}: {v}" for k, v in sorted(ranks.items(), key=lambda kv: int(kv[0]))
            )
            print(f"  restored from: {where}")
    print("-" * (width + 40))
    if cfg.tracking.enabled:
        exp = mlflow_client(cfg).get_experiment_by_name(cfg.tracking.experiment)
        print(
            f"MLflow run {s.get('mlflow_run_id', '')}; browse with:\n"
            f"  {browse_hint(tracking_uri(cfg), str(exp.experiment_id) if exp else '0')}"
        )
