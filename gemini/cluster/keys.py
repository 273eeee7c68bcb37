"""Every key of the job's KV store, in one place.

Code never spells a store key itself: it calls the constants and small
functions below, and :data:`TABLE` says, for each key pattern, who writes it,
who reads it, what it means and whether its value is signed.

Signed values carry an HMAC under the per-run secret (``gemini.cluster.store``):
a reader treats a value that is unsigned or wrongly signed as absent. What is
left unsigned, and why that is safe:

- counters bumped with ``add`` (heartbeats, root epoch, queue lengths, the
  inventory request number, restart count): ``add`` combines values on the
  server, so no writer can sign the sum. A forged bump can make a reader wait,
  look again, skip an empty queue entry or step down; every decision that
  follows still needs a signed record (a plan, a spawn request, an inventory),
  so the worst a forged counter does is delay or stop the job — never steer
  it to a wrong result.
- ``root/elect/{epoch}``: a ``compare_set`` arbitration between agents; a
  forged entry can only block an election (the controller then ends the job).
- ``gen{g}/pg/*``: torch.distributed's own rendezvous keys, written and read
  by ``init_process_group``; like any torch job, the process group's
  transport is not authenticated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Key:
    """One row of the key table."""

    pattern: str
    """The key with its variable parts in braces, e.g. ``ctl/plan/{g}``."""
    signed: bool
    """Whether the value carries an HMAC that readers verify."""
    writer: str
    """Which process writes it."""
    reader: str
    """Which processes read it."""
    meaning: str
    """What the value is."""


# -- heartbeats -----------------------------------------------------------------
HB_ROOT = "hb/root"


def hb(name: str) -> str:
    """Heartbeat counter of ``node{i}``, ``rank{r}`` or ``root``."""
    return f"hb/{name}"


def hb_node(node: int) -> str:
    return hb(f"node{node}")


def hb_rank(rank: int) -> str:
    """Progress heartbeat of rank ``rank``'s trainer (the hang watchdog's)."""
    return hb(f"rank{rank}")


# -- worker agents ----------------------------------------------------------------
def agent(node: int) -> str:
    return f"agent/node{node}"


def agent_incarnation(node: int) -> str:
    return f"agent/node{node}/incarnation"


def launcher(node: int) -> str:
    return f"launcher/node{node}"


# -- standby nodes ------------------------------------------------------------------
def standby(k: int) -> str:
    """Standby node ``k`` is up: its agent's pid, and ``warm`` once its trainers are."""
    return f"standby/{k}"


def standby_warm(k: int, local: int) -> str:
    """Trainer ``local`` of standby ``k`` has imported everything and waits."""
    return f"standby/{k}/warm/{local}"


def spare_warm(node: int, local: int) -> str:
    """Node ``node``'s warm spare for local rank ``local`` has imported everything."""
    return f"spare/node{node}/{local}"


def standby_takeover(k: int) -> str:
    """Standby ``k`` is to become a node (the launcher's assignment)."""
    return f"standby/{k}/takeover"


# -- control --------------------------------------------------------------------
GEN = "ctl/gen"
DONE = "ctl/done"
ABORT = "ctl/abort"


def plan(gen: int) -> str:
    return f"ctl/plan/{gen}"


def stop(gen: int) -> str:
    return f"ctl/stop/{gen}"


# -- trainer ranks ----------------------------------------------------------------
def trainer(gen: int, rank: int) -> str:
    return f"trainer/{gen}/{rank}"


def exited(gen: int, rank: int) -> str:
    return f"exit/{gen}/{rank}"


def ready(gen: int, rank: int) -> str:
    return f"ready/{gen}/{rank}"


def parked(gen: int, rank: int) -> str:
    """Rank ``rank`` left generation ``gen`` alive, waiting to restart in place."""
    return f"parked/{gen}/{rank}"


def parks(node: int) -> str:
    """Counter: trainers of node ``node`` that parked (its agent reads ``parked`` on a change)."""
    return f"parked/node{node}/n"


def final(gen: int, rank: int) -> str:
    return f"final/{gen}/{rank}"


def progress(rank: int) -> str:
    return f"progress/{rank}"


def metrics(rank: int) -> str:
    return f"metrics/{rank}"


def pg_prefix(gen: int) -> str:
    """Prefix of generation ``gen``'s torch.distributed rendezvous keys."""
    return f"gen{gen}/pg"


# -- numbered queues (``{queue}/n`` counts, ``{queue}/{n}`` holds record n) ------
SPAWN = "spawn"
INJECT = "inject"
RECOVERY = "recovery"


def queue_length(queue: str) -> str:
    return f"{queue}/n"


def queue_item(queue: str, n: int) -> str:
    return f"{queue}/{n}"


def spawn_ack(n: int) -> str:
    return f"spawn/{n}/ack"


# -- failure injection ------------------------------------------------------------
def inject_arm(rank: int) -> str:
    return f"inject/arm/{rank}"


def inject_fired(event_id: object) -> str:
    return f"inject/fired/{event_id}"


# -- orders: failures carried out by the target itself ------------------------------
ROOT_ORDERS = "order/root"


def node_orders(node: int) -> str:
    """Queue of orders to node ``node``'s agent (kill its trainers, the node, corrupt)."""
    return f"order/node{node}"


def order_ack(queue: str, n: int) -> str:
    """Order ``n`` of ``queue`` carried out (or refused), by its target."""
    return f"{queue}/{n}/ack"


# -- SLURM tasks (cluster=slurm) --------------------------------------------------------
def slurm_task(task: int) -> str:
    return f"slurm/task/{task}"


def slurm_assign(task: int) -> str:
    return f"slurm/assign/{task}"


def slurm_exit(task: int) -> str:
    return f"slurm/exit/{task}"


# -- root agent -------------------------------------------------------------------
ROOT_PID = "root/pid"
ROOT_EPOCH = "root/epoch"
ROOT_ELECTED = "root/elected"
ROOT_STATE = "root/state"
ROOT_RESULT = "root/result"
ROOT_PENDING = "root/pending"
ROOT_RESTARTS = "root/restarts"
ROOT_INJECT_SEEN = "root/inject_seen"


def root_elect(epoch: int) -> str:
    return f"root/elect/{epoch}"


# -- checkpoint services ----------------------------------------------------------
INV_REQ = "inv/req"


def inventory(request: int, node: int) -> str:
    return f"inv/{request}/{node}"


TRIM_REQ = "trim/req"


def trim_request(request: int) -> str:
    return f"trim/{request}"


def trim_ack(request: int, node: int) -> str:
    return f"trim/{request}/{node}"


def restore_failed(gen: int, rank: int) -> str:
    return f"restore_failed/{gen}/{rank}"


def ckpt_size(rank: int) -> str:
    return f"ckpt/size/{rank}"


def ckpt_ready(node: int, rank: int) -> str:
    return f"ckpt/ready/{node}/{rank}"


_R = "root agent"
_A = "worker agent"
_T = "trainer rank"
_C = "controller"

#: Every key the project uses. Order: as in the sections above.
TABLE: tuple[Key, ...] = (
    Key(
        "hb/node{i}",
        False,
        _A,
        f"{_R}, {_A}",
        "heartbeat counter of node i, compared against the reader's own clock",
    ),
    Key(
        "hb/rank{r}",
        False,
        _T,
        _R,
        "heartbeat counter of rank r's trainer (any generation); stalled while its node lives "
        "= hung",
    ),
    Key("hb/root", False, _R, f"{_A}, {_C}", "heartbeat counter of the root agent"),
    Key("agent/node{i}", True, _A, f"{_R}, {_T}", "JSON: pid, transport address, incarnation"),
    Key("agent/node{i}/incarnation", False, _A, _A, "counter: starts of node i's agent"),
    Key("launcher/node{i}", True, _C, "-", "JSON: pid of node i's launcher (for inspection)"),
    Key(
        "hb/standby{k}", False, _A, _C, "heartbeat counter of standby node k (until it takes over)"
    ),
    Key(
        "standby/{k}",
        True,
        _A,
        f"{_R}, {_C}",
        "JSON: standby node k is up (pid; warm once its trainers are; its pre-allocated "
        "slots once every rank's size is known)",
    ),
    Key(
        "standby/{k}/warm/{j}",
        True,
        _T,
        _A,
        "JSON: trainer j of standby k imported everything (pid)",
    ),
    Key(
        "spare/node{i}/{j}",
        True,
        f"{_T}, {_A}",
        _R,
        "JSON: node i's warm spare for local rank j is ready (pid), or cannot exist here",
    ),
    Key("standby/{k}/takeover", True, _C, _A, "JSON: standby k is to become node i (its index)"),
    Key("ctl/gen", True, _R, f"{_A}, {_C}, {_R}", "JSON int: the current generation"),
    Key("ctl/plan/{g}", True, _R, f"{_T}, {_A}", "JSON: start step, restore source per rank"),
    Key("ctl/stop/{g}", True, _R, _A, "flag: stop generation g's trainers"),
    Key("ctl/done", True, _R, f"{_A}, {_R}", "flag: the job finished"),
    Key("ctl/abort", True, f"{_R}, {_C}", f"{_A}, {_R}", "flag: the job is being torn down"),
    Key(
        "trainer/{g}/{r}",
        True,
        _T,
        f"{_T}, {_C}",
        "JSON: pid and node of rank r in generation g (all awaited before rendezvous)",
    ),
    Key("exit/{g}/{r}", True, _A, _R, "JSON: exit code of rank r in generation g"),
    Key(
        "ready/{g}/{r}",
        True,
        _T,
        f"{_R}, {_C}",
        "JSON: restore milestones and timings of rank r in generation g",
    ),
    Key(
        "parked/{g}/{r}",
        True,
        _T,
        _A,
        "JSON: rank r left generation g alive (why, teardown time) and awaits the next",
    ),
    Key("parked/node{i}/n", False, _T, _A, "counter: parks of node i's trainers"),
    Key("final/{g}/{r}", True, _T, f"{_R}, {_C}", "JSON: final digest and step of rank r"),
    Key("progress/{r}", True, _T, f"{_R}, {_C}", "last completed step of rank r"),
    Key("metrics/{r}", True, _T, _C, "per-step JSON records, one signed line each (appended)"),
    Key("gen{g}/pg/*", False, _T, _T, "torch.distributed rendezvous of generation g"),
    Key("spawn/n", False, _R, _C, "counter: spawn requests made"),
    Key("spawn/{n}", True, _R, _C, "JSON: request n to (re)start a node"),
    Key("spawn/{n}/ack", True, _C, "-", "JSON: request n served (for inspection)"),
    Key("inject/n", False, f"{_C}, {_A}, {_R}, {_T}", _R, "counter: injected failures"),
    Key(
        "inject/{n}",
        True,
        f"{_C}, {_A}, {_R}, {_T}",
        f"{_R}, {_C}",
        "JSON: injected failure n with its wall time (written by whoever carried it out)",
    ),
    Key("inject/arm/{r}", True, _C, _T, "JSON: kill rank r midway through the snapshot of a step"),
    Key("inject/fired/{id}", True, _T, _T, "flag: the armed failure id has fired"),
    Key("order/node{i}/n", False, f"{_C}, {_R}", _A, "counter: orders sent to node i's agent"),
    Key(
        "order/node{i}/{n}",
        True,
        f"{_C}, {_R}",
        _A,
        "JSON: order n to node i's agent: kill or stop (hang) its trainers, the whole node "
        "(and free its memory), or corrupt a replica it holds; the root kills hung trainers",
    ),
    Key(
        "order/node{i}/{n}/ack",
        True,
        _A,
        f"{_C}, {_R}",
        "JSON: order n carried out (wall time, result)",
    ),
    Key("order/root/n", False, _C, _R, "counter: orders sent to the root agent"),
    Key("order/root/{n}", True, _C, _R, "JSON: order n to the root agent: die (root_loss)"),
    Key("order/root/{n}/ack", True, _R, _C, "JSON: order n carried out (wall time)"),
    Key("recovery/n", False, _R, _C, "counter: recovery records"),
    Key("recovery/{n}", True, _R, _C, "JSON: one recovery, phase by phase"),
    Key("root/pid", True, f"{_C}, {_R}", _C, "JSON: pid of the current root agent"),
    Key("root/epoch", False, _A, f"{_R}, {_A}", "counter: root elections so far"),
    Key("root/elect/{epoch}", False, _A, _A, "compare_set: the node that won election epoch"),
    Key("root/elected", True, _A, _R, "JSON: node, epoch and time of the last election"),
    Key("root/state", True, _R, "-", "JSON: the root's generation (for inspection)"),
    Key("root/result", True, _R, _C, "JSON: how the job ended (status, reason)"),
    Key("root/pending", True, _R, _R, "JSON: the recovery record awaiting its replay"),
    Key("root/restarts", False, _R, _R, "counter: recoveries started (bounded by max_restarts)"),
    Key("root/inject_seen", False, _R, _R, "counter: injected failures already attributed"),
    Key(
        "slurm/task/{k}",
        True,
        "SLURM task",
        _C,
        "JSON: SLURM task k is up (host, pid); cluster=slurm only",
    ),
    Key(
        "slurm/assign/{k}",
        True,
        _C,
        "SLURM task",
        "JSON: the node SLURM task k runs now (a standby's takeover), numbered",
    ),
    Key("slurm/exit/{k}", True, "SLURM task", _C, "JSON: SLURM task k stopped its node"),
    Key("inv/req", False, _R, _A, "counter: inventory requests"),
    Key(
        "inv/{n}/{i}",
        True,
        _A,
        _R,
        "JSON: verified [step, generation] node i holds per rank, answer to request n",
    ),
    Key("trim/req", False, _R, _A, "counter: trim requests (drop copies newer than a plan)"),
    Key("trim/{n}", True, _R, _A, "JSON: trim request n: the plan's step and generation"),
    Key("trim/{n}/{i}", True, _A, _R, "JSON: steps node i dropped per rank, answer to request n"),
    Key(
        "restore_failed/{g}/{r}",
        True,
        _T,
        _R,
        "JSON: the source rank r of generation g could not read (step, source, error)",
    ),
    Key("ckpt/size/{r}", True, _T, f"{_A}, {_R}", "JSON: slot sizes rank r needs"),
    Key(
        "ckpt/ready/{i}/{r}",
        True,
        _A,
        f"{_T}, {_R}",
        "JSON: node i allocated rank r's slots (incarnation, touch time, whether a standby "
        "had allocated them before its takeover); the root waits for a new node's (alloc_s)",
    ),
)


def _regex(pattern: str) -> str:
    out = ""
    for part in re.split(r"(\{[a-z]+\}|\*)", pattern):
        if part == "*":
            out += ".+"
        elif part.startswith("{"):
            out += "[0-9]+"
        else:
            out += re.escape(part)
    return out


_COMPILED = [(re.compile(_regex(k.pattern)), k) for k in TABLE]


@lru_cache(maxsize=4096)
def describe(key: str) -> Key | None:
    """The table row a concrete key belongs to (None: not a key of ours)."""
    for rx, k in _COMPILED:
        if rx.fullmatch(key):
            return k
    return None


def is_signed(key: str) -> bool:
    row = describe(key)
    return row is not None and row.signed
