"""Dataclass schemas of every config group, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` extend these schemas: a key that is not declared
here is refused at composition, and :func:`validate` checks the values that a
type alone cannot (ranges, cross-group consistency), builds once the objects
the processes of a job will build from them (cadence, placement, failure
schedule), and with ``host=True`` checks this machine (address, paths,
/dev/shm, the tracking server). Every refusal is a :class:`ConfigError` that
names the key, the value and the fix, so the entry point can print one line
and exit 2 before the job directory, the store or any process exists.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUTS = REPO_ROOT / "outputs"


class ConfigError(ValueError):
    """A user error in the configuration: key, value and what to do."""

    def __init__(self, key: str, value: Any, fix: str) -> None:
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")

    def __reduce__(self) -> tuple[Any, ...]:
        # A SLURM task's refusal reaches the submitting process pickled.
        return (ConfigError, (self.key, self.value, self.fix))


@dataclass
class ModelConfig:
    name: str = MISSING
    """Name of the option (mlp, gpt_tiny, gpt_small, gpt_medium)."""
    kind: str = "gpt"
    """Architecture: ``mlp`` (regression on seeded features) or ``gpt`` (next-token LM)."""
    input_dim: int = 256
    """mlp: width of the synthetic input features."""
    hidden_dim: int = 1024
    """mlp: width of the hidden layers."""
    depth: int = 4
    """mlp: number of hidden layers."""
    output_dim: int = 16
    """mlp: number of regression targets."""
    vocab_size: int = 1024
    """gpt: vocabulary of the synthetic token stream."""
    n_layer: int = 4
    """gpt: transformer blocks."""
    n_head: int = 4
    """gpt: attention heads per block (must divide n_embd)."""
    n_embd: int = 128
    """gpt: embedding width."""
    block_size: int = 256
    """gpt: longest sequence the position table covers (>= train.seq_len)."""


@dataclass
class ClusterConfig:
    launcher: str = "local"
    """How nodes are started: ``local`` (N node launchers on this host) or ``slurm`` (one
    SLURM task per node, started by ``hydra/launcher=slurm`` or ``submitit_local``)."""
    nodes: int = 4
    """Simulated machines; each runs a node launcher, a worker agent and its ranks."""
    ranks_per_node: int = 1
    """Trainer processes per node."""
    threads_per_rank: int = 1
    """torch intra-op threads per trainer (``torch.set_num_threads``)."""
    heartbeat_s: float = 0.5
    """Period of the worker agents' heartbeats into the KV store."""
    missed_beats: int = 4
    """Beats a node may miss before the root agent declares it failed."""
    collective_timeout_s: float = 20.0
    """Process-group timeout: how long a survivor may block in a collective."""
    hang_timeout_s: float = 10.0
    """A rank whose trainer heartbeat stops for this long while its node's agent lives
    is declared hung and handled as a crash (its agent kills it, then recovery); must be
    > ``heartbeat_s``; 0 = off (a hang then surfaces only as its peers' collective
    timeout). Half the collective timeout by default: short enough to beat it, long
    enough that a host loaded well past its cores does not pass for a hang."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu`` or ``cuda``."""
    max_restarts: int = 20
    """Recoveries the root attempts before it gives up on the job (a crash loop)."""
    max_ranks_per_core: int = 4
    """Oversubscription this host accepts before refusing a layout."""
    restart: str = "in_place"
    """How a failed generation's surviving trainers come back: ``in_place`` (the same
    process leaves the failed step, tears down its process group, waits for the plan
    and rejoins the next generation: no interpreter start, no imports) or ``process``
    (every trainer is replaced by a fresh process, for comparison). A trainer that
    cannot restart in place is replaced by a fresh process either way."""
    warm_spares: bool = True
    """Keep one pre-started trainer per rank on every node (torch imported, waiting,
    at idle priority): a rank killed by a software failure comes back on it, skipping
    the interpreter start-up. They start with their agent, before generation 1 (part
    of ``startup_s``), and a used one is replaced a few seconds into the next
    generation. ``false`` saves their memory and start-up on small machines."""
    standby_nodes: int = 1
    """Spare nodes started with the job, warm (agent up, trainer processes with
    everything imported, idle) and waiting (``slurm``: extra tasks of the same SLURM
    job). A failed node's index is taken over by one, and locally a new one is started
    in its place. With none left, a failed node is restarted afresh where it ran.
    Starting them is part of the job's start-up, before step 0."""
    host: str = "127.0.0.1"
    """Address the controller's KV store binds to (``slurm``: 0.0.0.0, dialled by the
    other tasks at task 0's host name)."""
    store_port: int = 0
    """Port of the KV store; 0 = a free one locally, one derived from the SLURM job id
    under ``slurm`` (so every task knows it without asking)."""
    bind_host: str = ""
    """Address each agent's replication transport binds to; empty = ``host`` locally,
    all interfaces (0.0.0.0) under ``slurm``."""
    advertise_host: str = ""
    """Address peers dial to reach an agent's transport (published through the store);
    empty = ``bind_host`` when it is a single address, else this machine's host name."""
    network: str = "loopback"
    """How the simulated nodes reach each other: ``loopback`` (all share this host's
    loopback: no link to compete for) or ``netns`` (each node, standbys included, in a
    network namespace of its own behind a capped veth link to a bridge; gloo, the
    replication transport and heartbeats all use the node's own address). ``netns``
    needs root and iproute2, and ``cluster.launcher=local``."""
    link_gbps: float = 0.0
    """With ``network=netns``: the cap of each direction of each node's link, Gbit/s
    (a token bucket on both ends of the veth pair); 0 = uncapped."""
    link_latency_ms: float = 0.0
    """With ``network=netns``: one-way delay added to each node's link, ms (needs the
    kernel's netem queueing discipline; refused where it is missing)."""


@dataclass
class ReplicationConfig:
    factor: int = 2
    """m: copies of each checkpoint in CPU memory, the local one included."""
    placement: str = "group"
    """``group`` (Algorithm 1: group if m | N, else mixed), ``mixed`` or ``ring``."""
    profile_steps: int = 20
    """Steps of each generation (after its first three, which pay for lazy
    allocation) whose gradient communication is timed to find the idle spans
    of an iteration (``idle_profiles`` in the summary; the interleaving
    planner's input); 0 = off. Only ``replicated`` with more than one rank
    profiles."""
    schedule: str = "naive"
    """When the replicas travel (``gemini.checkpoint.senders``): ``blocking`` (the
    trainer waits until every holder has its copy before the next step),
    ``naive`` (each copy sent whole in the background as soon as the local
    commit is done, unplanned), ``interleave_nopipe`` (chunks planned into the
    idle spans of training communication; the holder stages them through one
    buffer, receiving and draining in turn) or ``interleave`` (the same plan,
    received straight into the holder's slot, so receiving and landing
    overlap). The planned modes send as ``naive`` does until the generation's
    profile exists (its first 3 + ``profile_steps`` steps), so they need
    ``profile_steps`` >= 1; ``replicated`` only. When one iteration's idle
    spans cannot carry the copies, they checkpoint every k-th step instead,
    the smallest k that can, agreed by all ranks (``interleave_interval`` in
    the summary)."""


@dataclass
class BackendConfig:
    name: str = "none"
    """Checkpoint backend: ``none``, ``disk``, ``memory`` or ``replicated``."""
    path: str = ""
    """disk: shared-filesystem root (NFS/Lustre on a cluster); empty = under the run dir."""
    cadence: str = "every_n"
    """When to checkpoint: ``every_n``, ``highfreq``, ``checkfreq``, ``young_daly``."""
    every_n: int = 1
    """every_n: checkpoint every this many steps (1 = every iteration, Gemini)."""
    overhead_bound_pct: float = 5.0
    """checkfreq: largest checkpoint overhead to accept, percent of iteration time."""
    mtbf_s: float = 3600.0
    """young_daly: assumed mean time between failures, seconds."""
    keep_last: int = 2
    """disk: complete checkpoints kept on storage (older ones are deleted)."""
    persist: str = "blocking"
    """disk: ``blocking`` writes in the step; ``background`` snapshots to RAM and persists
    in a thread (CheckFreq)."""
    bandwidth_gbps: float = 0.0
    """disk: emulated storage bandwidth per node in Gbit/s (0 = real disk speed);
    reported as emulated."""
    persist_every_s: float = 0.0
    """memory/replicated: also persist through ``disk`` every this many seconds (0 = never),
    turned into a step interval measured once the run has timed three steps."""
    persist_every_n: int = 0
    """memory/replicated: also persist through ``disk`` every this many steps, fixed in
    advance, so where persisted steps lie does not depend on the machine's speed
    (0 = use ``persist_every_s``)."""
    chunk_mb: int = 4
    """Checksum chunk and network chunk size, MiB."""
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    """replicated: factor and placement of the in-memory copies."""


@dataclass
class FailureConfig:
    name: str = "none"
    """Schedule: none, software_once, hardware_once, two_in_group, poisson, weibull,
    correlated, kill_during_snapshot, corruption, root_loss, hang_once, partition."""
    at_step: int | None = None
    """Step at which a one-off failure fires (None = seeded-random in the middle half)."""
    node: int | None = None
    """Node hit by a one-off failure (None = seeded-random)."""
    rank_in_node: int = 0
    """software and hang failures: which local rank is hit."""
    mtbf_s: float = 600.0
    """poisson/weibull: mean time between failures, seconds."""
    weibull_shape: float = 0.7
    """weibull: shape (< 1: infant mortality)."""
    k: int = 2
    """correlated: nodes that fail together."""
    kind: str = "hardware"
    """correlated/poisson/weibull: failure kind of each event."""
    max_events: int = 4
    """poisson/weibull: most events in one run."""
    seed: int | None = None
    """Schedule seed (None = train.seed): one seed, one schedule."""
    then: str = "none"
    """A second failure once the schedule's last one has been recovered from:
    ``none``, ``software``, ``hardware`` or ``kill_during_snapshot``. It fires
    ``then_after_steps`` steps after the step that recovery restored, i.e. on
    the new timeline right after a rollback, while copies of the abandoned one
    could still be around."""
    then_node: int | None = None
    """``then``: the node it hits (None = seeded-random)."""
    then_after_steps: int = 2
    """``then``: steps trained after the restored step before it fires (>= 1)."""
    partition_s: float = 0.0
    """partition: seconds the node's link stays down before it returns (0 = for good).
    Needs ``cluster.network=netns``. The cut-off node's processes live on: it fences
    itself once its heartbeats have failed for as long as the root waits for them,
    and stays out when the link returns (its index is a replacement's by then)."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to train."""
    micro_batch: int = 8
    """Samples per rank per step."""
    seq_len: int = 64
    """gpt: tokens per sample."""
    lr: float = 1e-3
    """Peak learning rate (AdamW, linear warm-up then cosine decay)."""
    warmup_steps: int = 10
    """Linear warm-up steps of the schedule."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    seed: int = 0
    """Seed of the model init and the synthetic data: same seed, same final state."""
    parallel: str = "ddp"
    """``ddp`` (replicated optimizer) or ``zero`` (optimizer state sharded across ranks)."""
    optimizer_impl: str = "fused"
    """AdamW kernel: ``fused`` (one vectorised pass over each tensor; 17x the
    per-tensor loop on a CPU core here), ``foreach`` (batched per-op), or
    ``for_loop`` (torch's reference loop). Each is deterministic; they differ
    from each other in the last bits, so compare runs of one kind."""


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Record the run in MLflow."""
    uri: str = ""
    """MLflow tracking URI. Empty = ``sqlite:///<abs outputs>/mlflow.db``, a file every
    job of a sweep shares (an absolute ``sqlite:///`` path picks another). Or a
    tracking server, ``http://host:port`` or ``https://host:port[/prefix]`` (e.g. the one
    ``make mlflow-server`` starts): jobs then need no shared filesystem for their
    records, the server stores the artifacts, and its ``/health`` must answer before
    a job starts. Only the controller talks to it; trainers and agents never do."""
    experiment: str = "gemini"
    """MLflow experiment name (created on first use; a sweep creates it before its jobs)."""


@dataclass
class PathsConfig:
    outputs: str = str(DEFAULT_OUTPUTS)
    """Root of run dirs, the MLflow store and checkpoints (override with GEMINI_OUTPUTS)."""


@dataclass
class GeminiConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    progress: bool = True
    """Show a progress bar and the results table on the console."""


def default_outputs() -> str:
    """GEMINI_OUTPUTS if set, else outputs/ at the repository root (absolute)."""
    return str(Path(os.environ.get("GEMINI_OUTPUTS") or DEFAULT_OUTPUTS).resolve())


def register_configs() -> None:
    """Register the schemas so that conf/ YAML files are typed by them."""
    if not OmegaConf.has_resolver("gemini_outputs"):
        OmegaConf.register_new_resolver("gemini_outputs", default_outputs)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=GeminiConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="cluster", name="base_cluster", node=ClusterConfig)
    cs.store(group="backend", name="base_backend", node=BackendConfig)
    cs.store(group="failure", name="base_failure", node=FailureConfig)
    cs.store(group="train", name="base_train", node=TrainConfig)
    cs.store(group="tracking", name="base_tracking", node=TrackingConfig)
    from gemini.launchers import register_launchers  # it imports this module

    register_launchers()


BACKENDS = ("none", "disk", "memory", "replicated")
REPLICATION_SCHEDULES = ("blocking", "naive", "interleave_nopipe", "interleave")
PLANNED_SCHEDULES = ("interleave_nopipe", "interleave")
"""The schedules that plan chunks into the profiled idle spans."""
LAUNCHERS = ("local", "slurm")
"""What ``cluster.launcher`` may be: one per ``gemini.cluster.base.Cluster`` implementation."""
PARALLELS = ("ddp", "zero")
OPTIMIZER_IMPLS = ("fused", "foreach", "for_loop")
DEVICES = ("auto", "cpu", "cuda")
RESTARTS = ("in_place", "process")
NETWORKS = ("loopback", "netns")
THEN_KINDS = ("none", "software", "hardware", "kill_during_snapshot")
"""What ``failure.then`` may be: the kinds that hit a node of the restored job."""


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, f"use one of {', '.join(allowed)}")


def _at_least(key: str, value: float, low: float, what: str = "") -> None:
    if value < low:
        raise ConfigError(key, value, what or f"must be >= {low}")


def to_schema(cfg: DictConfig | GeminiConfig) -> GeminiConfig:
    """The typed config object of a composed DictConfig (validated)."""
    if isinstance(cfg, GeminiConfig):
        obj = cfg
    else:
        # Leave out Hydra's own node before resolving: in a multirun callback or
        # a composed test config it holds values Hydra fills in later (job.num).
        keys = [str(k) for k in cfg if k != "hydra"]
        plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)
        assert isinstance(plain, dict)
        typed = OmegaConf.merge(OmegaConf.structured(GeminiConfig), plain)
        obj = OmegaConf.to_object(typed)  # type: ignore[assignment]
        assert isinstance(obj, GeminiConfig)
    validate(obj)
    return obj


def validate(cfg: GeminiConfig, *, host: bool = False) -> None:
    """Refuse, before anything starts, every config the job would fail on later.

    Values a type cannot check (ranges, choices, cross-group consistency);
    then a dry run of what the processes build from the config — the cadence
    policy, the replica placement, the failure schedule — and the failure
    kinds the backend cannot inject or recover exactly. With ``host=True``,
    also this machine: ``cluster.host`` bindable, storage and outputs
    writable (nothing is created), /dev/shm large enough, an http(s)
    ``tracking.uri`` answering. The host checks are for the controller before
    a start; a process re-reading a job's config elsewhere leaves them out.
    """
    check_values(cfg)
    dry_run(cfg)
    if host:
        check_host(cfg)


def check_values(cfg: GeminiConfig) -> None:
    """Refuse values a type cannot: ranges, choices, cross-group consistency."""
    m, c, t, b = cfg.model, cfg.cluster, cfg.train, cfg.backend
    _choice("model.kind", m.kind, ("mlp", "gpt"))
    # A zero width or depth builds no model: the trainers would fail after rendezvous.
    sizes = (
        ("vocab_size", "n_layer", "n_head", "n_embd", "block_size")
        if m.kind == "gpt"
        else ("input_dim", "hidden_dim", "depth", "output_dim")
    )
    for name in sizes:
        _at_least(f"model.{name}", getattr(m, name), 1, "must be >= 1")
    if m.kind == "gpt":
        if m.n_embd % m.n_head:
            raise ConfigError("model.n_head", m.n_head, f"must divide model.n_embd={m.n_embd}")
        if t.seq_len > m.block_size:
            raise ConfigError(
                "train.seq_len", t.seq_len, f"must be <= model.block_size={m.block_size}"
            )
    _choice("cluster.launcher", c.launcher, LAUNCHERS)
    _at_least("cluster.nodes", c.nodes, 1, "must be >= 1: set cluster.nodes=1 or more")
    _at_least("cluster.ranks_per_node", c.ranks_per_node, 1, "must be >= 1")
    _at_least("cluster.threads_per_rank", c.threads_per_rank, 1, "must be >= 1")
    _at_least("cluster.missed_beats", c.missed_beats, 1, "must be >= 1")
    _at_least("cluster.standby_nodes", c.standby_nodes, 0, "must be >= 0")
    if not 0 <= c.store_port <= 65535:
        raise ConfigError(
            "cluster.store_port", c.store_port, "use a port in [1, 65535], or 0 for a free one"
        )
    _at_least("cluster.max_restarts", c.max_restarts, 0, "must be >= 0")
    if c.heartbeat_s <= 0:
        raise ConfigError("cluster.heartbeat_s", c.heartbeat_s, "must be > 0 seconds")
    if c.collective_timeout_s <= 0:
        raise ConfigError("cluster.collective_timeout_s", c.collective_timeout_s, "must be > 0")
    if not math.isfinite(c.hang_timeout_s) or (
        c.hang_timeout_s != 0 and c.hang_timeout_s <= c.heartbeat_s
    ):
        # At or below one beat, a live trainer would look hung between two beats.
        raise ConfigError(
            "cluster.hang_timeout_s",
            c.hang_timeout_s,
            f"must be > cluster.heartbeat_s={c.heartbeat_s} seconds, or 0 (off)",
        )
    _choice("cluster.device", c.device, DEVICES)
    _choice("cluster.restart", c.restart, RESTARTS)
    check_network(c)
    if c.launcher == "local":
        # On SLURM each task checks the machine it landed on (gemini.cluster.slurm).
        check_capacity(c)
    _at_least("train.steps", t.steps, 1, "must be >= 1")
    _at_least("train.micro_batch", t.micro_batch, 1, "must be >= 1")
    _at_least("train.seq_len", t.seq_len, 1, "must be >= 1")
    _choice("train.parallel", t.parallel, PARALLELS)
    _choice("train.optimizer_impl", t.optimizer_impl, OPTIMIZER_IMPLS)
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise ConfigError("train.lr", t.lr, "must be a finite number > 0, e.g. 1e-3")
    _at_least("train.warmup_steps", t.warmup_steps, 0, "must be >= 0 (0 = no warm-up)")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        raise ConfigError("train.weight_decay", t.weight_decay, "must be a finite number >= 0")
    _choice("backend.name", b.name, BACKENDS)
    _at_least("backend.every_n", b.every_n, 1, "must be >= 1")
    _at_least("backend.keep_last", b.keep_last, 1, "must keep at least 1 checkpoint")
    _at_least("backend.chunk_mb", b.chunk_mb, 1, "must be >= 1 MiB")
    _choice("backend.persist", b.persist, ("blocking", "background"))
    if not (math.isfinite(b.persist_every_s) and b.persist_every_s >= 0):
        raise ConfigError(
            "backend.persist_every_s", b.persist_every_s, "must be >= 0 seconds (0 = never)"
        )
    _at_least(
        "backend.persist_every_n",
        b.persist_every_n,
        0,
        "must be >= 0 steps (0 = use persist_every_s)",
    )
    if b.persist_every_n > 0 and b.persist_every_s > 0:
        raise ConfigError(
            "backend.persist_every_n",
            b.persist_every_n,
            "sets the persistent tier's period in steps, and backend.persist_every_s sets it in "
            "seconds: set only one (the other = 0)",
        )
    if b.bandwidth_gbps < 0:
        raise ConfigError("backend.bandwidth_gbps", b.bandwidth_gbps, "must be >= 0 (0 = no cap)")
    f = cfg.failure
    _choice("failure.then", f.then, THEN_KINDS)
    if f.then != "none":
        if f.name in ("none", "poisson", "weibull"):
            raise ConfigError(
                "failure.then",
                f.then,
                f"follows a one-off failure; failure={f.name} has none: use e.g. "
                "failure=hardware_once, or failure.then=none",
            )
        _at_least("failure.then_after_steps", f.then_after_steps, 1, "must be >= 1")
        if f.then_node is not None and not 0 <= f.then_node < c.nodes:
            raise ConfigError(
                "failure.then_node", f.then_node, f"use a node index in [0, {c.nodes - 1}]"
            )
        if f.then == "kill_during_snapshot" and b.name not in ("memory", "replicated"):
            raise ConfigError(
                "failure.then",
                f.then,
                f"backend={b.name} writes no in-memory snapshot to interrupt: "
                "use backend=memory or backend=replicated",
            )
    check_tracking_uri(cfg.tracking)
    r = b.replication
    # two_in_group picks its pair from the placement, whatever the backend.
    if b.name == "replicated" or cfg.failure.name == "two_in_group":
        if not 1 <= r.factor <= c.nodes:
            raise ConfigError(
                "backend.replication.factor",
                r.factor,
                f"use a factor between 1 and cluster.nodes={c.nodes}",
            )
        _choice("backend.replication.placement", r.placement, ("group", "mixed", "ring"))
    _at_least(
        "backend.replication.profile_steps",
        r.profile_steps,
        0,
        "must be >= 0 (0 = no profile)",
    )
    _choice("backend.replication.schedule", r.schedule, REPLICATION_SCHEDULES)
    if r.schedule in PLANNED_SCHEDULES:
        if b.name != "replicated":
            raise ConfigError(
                "backend.replication.schedule",
                r.schedule,
                f"plans the sending of replicas, which backend={b.name} does not make: "
                "use backend=replicated, or backend.replication.schedule=naive",
            )
        if r.profile_steps == 0:
            raise ConfigError(
                "backend.replication.profile_steps",
                r.profile_steps,
                f"schedule={r.schedule} plans from the idle spans this profile measures: "
                "set backend.replication.profile_steps >= 1, or "
                "backend.replication.schedule=naive",
            )


def check_network(c: ClusterConfig) -> None:
    """The emulated network's values agree with each other and with the launcher."""
    _choice("cluster.network", c.network, NETWORKS)
    shaping = (("cluster.link_gbps", c.link_gbps), ("cluster.link_latency_ms", c.link_latency_ms))
    for key, value in shaping:
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(key, value, "must be a finite number >= 0 (0 = none)")
        if value and c.network == "loopback":
            raise ConfigError(
                key,
                value,
                "shapes an emulated link, and loopback has none: "
                "add cluster.network=netns, or set it to 0",
            )
    if c.network == "loopback":
        return
    if c.launcher != "local":
        raise ConfigError(
            "cluster.network",
            c.network,
            "emulates the links of nodes that share one "
            f"machine; cluster.launcher={c.launcher} nodes have real ones: use "
            "cluster.network=loopback",
        )
    addresses = (("cluster.host", c.host, "127.0.0.1"), ("cluster.bind_host", c.bind_host, ""),
                 ("cluster.advertise_host", c.advertise_host, ""))  # fmt: skip
    for key, address, default in addresses:
        if address != default:
            raise ConfigError(
                key,
                address,
                "is chosen by cluster.network=netns (the bridge's and each "
                f"node's own address): set it back to its default ({default or 'empty'})",
            )


HTTP_SCHEMES = ("http", "https")
TRACKING_PROBE_TIMEOUT_S = 5.0
"""How long a tracking server has to answer ``/health`` before a job is refused."""
_NO_SERVER_FIX = (
    "start one with `make mlflow-server` (PORT=... for another port), or set tracking.uri "
    "to an sqlite URI (empty = <outputs>/mlflow.db)"
)


def is_server_uri(uri: str) -> bool:
    """``uri`` names a tracking server (http/https) rather than a store of files."""
    return urlsplit(uri).scheme.lower() in HTTP_SCHEMES


def check_tracking_uri(t: TrackingConfig) -> None:
    """An http(s) tracking URI names a host and a valid port (reachability is a host check)."""
    if not t.enabled or not is_server_uri(t.uri):
        return
    parts = urlsplit(t.uri)
    try:
        parts.port  # noqa: B018  # raises on a port that is not a number in range
    except ValueError as e:
        raise ConfigError("tracking.uri", t.uri, f"{e}: use http://host:port") from e
    if not parts.hostname:
        raise ConfigError("tracking.uri", t.uri, "names no host: use http://host:port")


def check_tracking_server(t: TrackingConfig) -> None:
    """An http(s) tracking URI's ``/health`` answers, or the job is refused before it starts.

    Otherwise the job would train for minutes and then fail, or hang in the
    client's retries, when it records its run.
    """
    if not t.enabled or not is_server_uri(t.uri):
        return
    from gemini.tracking_server import health_error

    why = health_error(t.uri, timeout=TRACKING_PROBE_TIMEOUT_S)
    if why is not None:
        raise ConfigError(
            "tracking.uri",
            t.uri,
            f"no MLflow server answers at {t.uri.rstrip('/')}/health ({why}): {_NO_SERVER_FIX}",
        )


@contextlib.contextmanager
def _refused() -> Iterator[None]:
    """The constructors' own refusals, as the ConfigError the entry point prints."""
    from gemini.checkpoint.cadence import CadenceError
    from gemini.checkpoint.placement import PlacementError
    from gemini.schedules import ScheduleError

    try:
        yield
    except (CadenceError, ScheduleError) as e:
        raise ConfigError(e.key, e.value, e.fix) from e
    except PlacementError as e:  # its message names its own key
        raise ConfigError("backend.replication", "", str(e)) from e


# Schedules whose events all hit one node at a step, as a kill during a
# snapshot must be armed (the trainer, not the injector, fires it).
_ONE_NODE_AT_A_STEP = (
    "kill_during_snapshot",
    "software_once",
    "hardware_once",
    "corruption",
    "hang_once",
    "partition",
)


def dry_run(cfg: GeminiConfig) -> None:
    """Build the cadence, placement and failure schedule as the job will; check the kinds."""
    from gemini.checkpoint.cadence import cadence_for
    from gemini.checkpoint.placement import holders_of_all, resolve_placement
    from gemini.failures import schedule_for
    from gemini.schedules import RANK_KINDS

    b, c, f = cfg.backend, cfg.cluster, cfg.failure
    with _refused():
        cadence_for(cfg)
        if b.name == "replicated":
            r = b.replication
            holders_of_all(c.nodes, r.factor, resolve_placement(c.nodes, r.factor, r.placement))
        events = schedule_for(cfg)
    if f.rank_in_node >= c.ranks_per_node and any(e.kind in RANK_KINDS for e in events):
        raise ConfigError(
            "failure.rank_in_node",
            f.rank_in_node,
            f"use a local rank in [0, {c.ranks_per_node - 1}] "
            f"(cluster.ranks_per_node={c.ranks_per_node})",
        )
    kinds = {e.kind for e in events}
    one_kind = f.name in _ONE_NODE_AT_A_STEP
    key, value = ("failure.name", f.name) if one_kind else ("failure.kind", f.kind)
    if "hang" in kinds and c.hang_timeout_s == 0:
        raise ConfigError(
            key,
            value,
            "a hung trainer never exits, and cluster.hang_timeout_s=0 turns off the watchdog "
            "that finds it: set cluster.hang_timeout_s > cluster.heartbeat_s, or another failure",
        )
    if "partition" in kinds and c.network != "netns":
        raise ConfigError(
            key,
            value,
            "a partition takes a node's own link down, and nodes on loopback have none: "
            "add cluster.network=netns (root and iproute2), or use failure=hardware_once",
        )
    if not (math.isfinite(f.partition_s) and f.partition_s >= 0):
        raise ConfigError(
            "failure.partition_s",
            f.partition_s,
            "must be a finite number of seconds >= 0 (0 = the link never returns)",
        )
    if "corruption" in kinds:
        if b.name != "replicated" or b.replication.factor < 2:
            raise ConfigError(
                key,
                value,
                "a corruption damages a copy held by a peer, which only backend=replicated "
                "with backend.replication.factor >= 2 keeps: use that backend, or another failure",
            )
        if any(len(e.nodes) > 1 for e in events):
            raise ConfigError(
                key,
                value,
                "a corruption is injected on one node: use failure=corruption "
                "(or failure.kind=hardware for several nodes at once)",
            )
    if "kill_during_snapshot" in kinds:
        kills = [e for e in events if e.kind == "kill_during_snapshot"]
        _check_kill_during_snapshot(cfg, kills, key, value)


def _check_kill_during_snapshot(cfg: GeminiConfig, events: list[Any], key: str, value: Any) -> None:
    """A kill during a snapshot needs a snapshot in memory at a known step to interrupt."""
    b, t = cfg.backend, cfg.train
    if b.name not in ("memory", "replicated"):
        raise ConfigError(
            "backend.name",
            b.name,
            "a kill during a snapshot interrupts the copy into checkpoint memory, which "
            f"backend={b.name} never makes: use backend=memory or backend=replicated",
        )
    if any(e.at_step is None or len(e.nodes) != 1 for e in events):
        raise ConfigError(
            key,
            value,
            "a kill during a snapshot is armed in one trainer at a step, not fired at a time "
            "or on several nodes: use failure=kill_during_snapshot, or failure.kind=software",
        )
    if b.cadence != "every_n":
        raise ConfigError(
            "backend.cadence",
            b.cadence,
            "a kill during a snapshot needs snapshot steps known before the run, and this "
            "cadence picks them while training: use backend.cadence=every_n",
        )
    for e in events:
        # It lands in the first snapshot at or after its step.
        first = -(-e.at_step // b.every_n) * b.every_n
        if first > t.steps:
            raise ConfigError(
                "failure.at_step",
                e.at_step,
                f"no snapshot follows it (backend.every_n={b.every_n}, train.steps={t.steps}): "
                f"use a step <= {t.steps // b.every_n * b.every_n}",
            )


def check_host(cfg: GeminiConfig) -> None:
    """This machine can hold the job: its address binds, its paths are writable, its
    /dev/shm is large enough, its tracking server answers. Creates nothing."""
    c, b = cfg.cluster, cfg.backend
    try:
        infos = socket.getaddrinfo(c.host, 0, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind(addr)
    except (OSError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(
            "cluster.host",
            c.host,
            f"cannot bind it here ({reason}): use an address of this machine, e.g. 127.0.0.1",
        ) from e
    if c.network == "netns":
        from gemini.cluster.netns import NetnsError, check_available, check_delay_available

        try:
            check_available()
            if c.link_latency_ms:
                check_delay_available()
        except NetnsError as e:
            key = "cluster.link_latency_ms" if "netem" in str(e) else "cluster.network"
            value = c.link_latency_ms if key.endswith("ms") else c.network
            raise ConfigError(key, value, str(e)) from None
    check_writable_path("paths.outputs", Path(cfg.paths.outputs))
    from gemini.checkpoint.disk import uses_storage

    if uses_storage(cfg) and b.path:
        check_writable_path("backend.path", Path(b.path))
    if b.name in ("memory", "replicated") and c.launcher == "local":
        # On SLURM each task checks the machine it landed on (gemini.cluster.slurm).
        from gemini.checkpoint.memory import check_shm_budget

        check_shm_budget(cfg)
    # Last: the only check that may wait (on the network).
    check_tracking_server(cfg.tracking)


def check_writable_path(key: str, path: Path) -> None:
    """``path`` is, or could be created as, a writable directory; nothing is created."""
    path = Path(os.path.abspath(path))
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, str(path), f"{probe} is not a directory: choose a directory")
    try:
        # An unnamed file where the filesystem allows it (O_TMPFILE), else one
        # removed at once: root passes access() checks that a write then fails.
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(
            key, str(path), f"{probe} is not writable ({e.strerror}): choose a writable directory"
        ) from e


def check_capacity(c: ClusterConfig, nodes_here: int | None = None) -> None:
    """Refuse a layout this host cannot hold rather than thrash for minutes.

    ``nodes_here``: the nodes this machine runs (all of them locally; on SLURM,
    the tasks SLURM put on it)."""
    cores = os.cpu_count() or 1
    here = c.nodes if nodes_here is None else nodes_here
    ranks = here * c.ranks_per_node
    limit = c.max_ranks_per_core * cores
    if ranks > limit:
        raise ConfigError(
            "cluster.nodes",
            c.nodes,
            f"{here} nodes x {c.ranks_per_node} ranks = {ranks} trainer processes on this machine "
            "exceed "
            f"what it holds ({limit} = cluster.max_ranks_per_core="
            f"{c.max_ranks_per_core} x {cores} cores): lower cluster.nodes or "
            "cluster.ranks_per_node",
        )


def config_hash(cfg: GeminiConfig) -> str:
    """Hash of what determines a checkpoint's layout: refuse checkpoints of another config."""
    import hashlib
    import json

    relevant = {
        "model": OmegaConf.to_container(OmegaConf.structured(cfg.model)),
        "world": cfg.cluster.nodes * cfg.cluster.ranks_per_node,
        "parallel": cfg.train.parallel,
        "seed": cfg.train.seed,
        "micro_batch": cfg.train.micro_batch,
        "seq_len": cfg.train.seq_len,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
