"""The root agent: detects failures, drives recovery, and declares the job done.

It launches generation 1 once every worker agent has registered, then
watches three things through the KV store: the agents' heartbeats (a node
that misses ``cluster.missed_beats`` beats has failed: a hardware failure),
the trainers' exits as their agents report them (a rank killed by a signal
while its agent lives: a software failure), and the ranks' final reports.

On a failure it stops the generation, replaces lost nodes (asking the
launcher for a fresh one), asks the surviving agents what checkpoints they
hold, plans a common step and a source per rank (``gemini.recovery``), and
launches the next generation; every phase is timed and recorded in the store
for the controller to log. All of its state lives in the store, so a new root
elected after this one is lost picks up where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from gemini.cluster.agent import Heartbeat
from gemini.cluster.job import JobSpec
from gemini.cluster.store import Store
from gemini.recovery import Plan, plan_recovery


@dataclass
class Liveness:
    """Last seen heartbeat counter per node, and when (on the root's own clock)."""

    counters: dict[int, int] = field(default_factory=dict)
    changed: dict[int, float] = field(default_factory=dict)

    def update(self, node: int, value: int, now: float) -> None:
        if self.counters.get(node) != value:
            self.counters[node] = value
            self.changed[node] = now

    def stale(self, node: int, now: float, limit_s: float) -> bool:
        return now - self.changed.get(node, now) > limit_s


class RootAgent:
    def __init__(self, job: JobSpec) -> None:
        self.job = job
        self.cfg = job.cfg
        self.store = Store.from_address(job.store)
        c = self.cfg.cluster
        self.nodes = c.nodes
        self.world = job.world_size
        self.rank_node = {r: r // c.ranks_per_node for r in range(self.world)}
        self.limit_s = c.heartbeat_s * c.missed_beats
        self.live = Liveness()
        self.gen = self.store.counter("ctl/gen")
        self.inject_seen = self.store.counter("root/inject_seen")

    # -- helpers ----------------------------------------------------------------
    def log(self, msg: str) -> None:
        print(f"[root {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def refresh_liveness(self) -> None:
        now = time.monotonic()
        for n in range(self.nodes):
            self.live.update(n, self.store.counter(f"hb/node{n}"), now)

    def dead_nodes(self) -> list[int]:
        now = time.monotonic()
        return [n for n in range(self.nodes) if self.live.stale(n, now, self.limit_s)]

    def exits(self, gen: int) -> dict[int, dict[str, Any]]:
        return {
            r: self.store.get_json(f"exit/{gen}/{r}")
            for r in range(self.world)
            if self.store.exists(f"exit/{gen}/{r}")
        }

    def progress(self) -> int:
        return max(
            (int(self.store.raw.get(f"progress/{r}")) for r in range(self.world)
             if self.store.exists(f"progress/{r}")),
            default=0,
        )

    def launch(self, plan: dict[str, Any]) -> int:
        gen = self.gen + 1
        self.store.set_json(f"ctl/plan/{gen}", plan)
        self.gen = self.store.incr("ctl/gen")
        self.store.set_json("root/state", {"gen": self.gen})
        return self.gen

    # -- the job ----------------------------------------------------------------
    def wait_agents(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        for n in range(self.nodes):
            while not self.store.exists(f"agent/node{n}"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {n}'s agent did not register in {timeout_s:.0f} s")
                time.sleep(0.05)

    def run(self) -> int:
        hb = Heartbeat(self.job.store, "root", self.cfg.cluster.heartbeat_s).start()
        try:
            if self.gen == 0:
                self.wait_agents()
                self.launch({"start_step": 0, "sources": {}, "reason": "first launch"})
                self.log(f"generation {self.gen}: {self.world} ranks on {self.nodes} nodes")
            return self.monitor()
        finally:
            hb.stop()

    def monitor(self) -> int:
        suspicious_since: float | None = None
        while True:
            if self.store.exists("ctl/abort"):
                return 1
            self.refresh_liveness()
            exits = self.exits(self.gen)
            finals = [r for r in range(self.world) if self.store.exists(f"final/{self.gen}/{r}")]
            if len(finals) == self.world and len(exits) == self.world and all(
                e["code"] == 0 for e in exits.values()
            ):
                self.finish("completed")
                return 0
            dead = self.dead_nodes()
            killed = [r for r, e in exits.items() if e["code"] < 0 and e["code"] != -15]
            crashed = [r for r, e in exits.items() if e["code"] != 0]
            now = time.monotonic()
            if dead or killed:
                self.on_failure(dead, killed, exits)
                suspicious_since = None
            elif crashed:
                # A survivor's trainer dies of a broken connection before the
                # failed node misses its beats: wait for the cause to show.
                suspicious_since = suspicious_since or now
                if now - suspicious_since > self.limit_s + 1.0:
                    self.on_failure([], crashed, exits)
                    suspicious_since = None
            time.sleep(0.05)

    def on_failure(self, dead: list[int], ranks: list[int], exits: dict[int, Any]) -> None:
        kind = "hardware" if dead else "software"
        self.log(f"failure detected: {kind}; dead nodes {dead}, failed ranks {ranks}")
        self.store.set_json("root/result", {"status": "failed", "reason": f"{kind} failure"})
        self.store.set("ctl/abort", "1")

    def finish(self, status: str) -> None:
        self.store.set_json("root/result", {"status": status, "gen": self.gen})
        self.store.set("ctl/done", "1")
        self.log(f"job {status} in generation {self.gen}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--job", required=True)
    a = p.parse_args(argv)
    root = RootAgent(JobSpec.load(a.job))
    try:
        return root.run()
    except Exception as e:  # the controller reads the reason from the store
        root.store.set_json("root/result", {"status": "error", "reason": f"{type(e).__name__}: {e}"})
        raise


if __name__ == "__main__":
    sys.exit(main())
