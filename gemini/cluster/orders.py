"""Orders: failures carried out by their target, asked for through the store.

A failure must land the same way whether the target is a process tree on
this host or a SLURM task on another machine, so nobody kills a process or
opens shared memory across nodes. The injector (through the job's
``Cluster``) pushes a signed order into the target's queue —
``order/node{i}`` for node i's worker agent, ``order/root`` for the root
agent — and the target carries it out on its next turn (10 Hz) and
acknowledges it:

- ``kill_trainers``: the agent SIGKILLs the named trainers of the named
  generation (a software failure: the agent and the node's memory live on);
- ``hang_trainers``: the agent SIGSTOPs the named trainers of the named
  generation (a hang: alive, silent, never exiting; the root's watchdog
  finds them and has their agent SIGKILL them with a ``kill_trainers``);
- ``kill_node``: the agent SIGKILLs every process below it, frees the node's
  shared memory and SIGKILLs itself (a hardware failure: the machine is gone;
  detection is by missed heartbeats, as for a real loss);
- ``corrupt``: the agent flips a byte in the newest complete replica it holds
  for a rank (the corruption schedule);
- ``die`` (root queue): the root agent SIGKILLs itself (root_loss).

An order may carry the failure's ``inject`` record: the target stamps it with
the wall time at which it acts and pushes it to ``inject/*`` *before* acting,
so the root measures detection from the moment the failure really happened,
not from when it was asked for. Each order is carried out once: a target
skips those already acknowledged (a replacement agent does not re-run its
predecessor's last order).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gemini.cluster import keys

if TYPE_CHECKING:
    from gemini.cluster.store import Store

ACK_TIMEOUT_S = 15.0
"""How long the sender waits for an acknowledgement: a target may be in the
middle of stopping a generation (a few seconds) when the order arrives."""


def send(
    store: Store, sends: list[tuple[str, dict[str, Any]]], wait_s: float = ACK_TIMEOUT_S
) -> list[Any]:
    """Push every ``(queue, order)`` first — targets of one event act together —
    then wait for each acknowledgement; returns them in order (None: none came)."""
    acks = []
    for queue, order in sends:
        n = store.push(queue, {**order, "t_sent": time.time()})
        acks.append(keys.order_ack(queue, n))
    deadline = time.monotonic() + wait_s
    out = []
    for ack in acks:
        store.wait_for(ack, max(0.0, deadline - time.monotonic()), poll_s=0.01)
        out.append(store.get_json_or(ack))
    return out


class Inbox:
    """A target's side of one order queue: the orders not yet carried out, in order."""

    def __init__(self, store: Store, queue: str) -> None:
        self.store, self.queue = store, queue
        self.seen = 0

    def pending(self) -> list[tuple[int, dict[str, Any]]]:
        """Orders numbered after the last one handled; one whose record is not
        written yet (a push between its counter and its value) waits for the
        next call, as do all after it, so that orders run in their order."""
        last = self.store.counter(keys.queue_length(self.queue))
        out = []
        while self.seen < last:
            n = self.seen + 1
            order = self.store.get_json_or(keys.queue_item(self.queue, n))
            if order is None:
                break
            self.seen = n
            if not self.store.exists(keys.order_ack(self.queue, n)):
                out.append((n, order))
        return out

    def ack(self, n: int, **result: Any) -> float:
        """Acknowledge order ``n``; returns the wall time recorded in the ack."""
        t = float(result.pop("t", time.time()))
        self.store.set_json(keys.order_ack(self.queue, n), {"t": t, **result})
        return t

    def record_injection(self, order: dict[str, Any]) -> float:
        """Push the order's failure record, stamped now; returns that time."""
        t = time.time()
        record = order.get("inject")
        if record is not None:
            self.store.push(keys.INJECT, {**record, "t": t})
        return t
