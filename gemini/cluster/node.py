"""The node launcher: the one entry point of a node, however the node was started.

Locally the controller starts one per simulated node; on SLURM each task runs
the same module. It starts the node's worker agent (which starts the trainer
ranks), waits for it, and takes the whole node down with it on SIGTERM. It
imports no torch, so that starting a node costs one interpreter less.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from gemini.cluster.processes import spawn_module, terminate_tree


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--job", required=True, help="path of the job's job.json")
    node_or_standby = p.add_mutually_exclusive_group(required=True)
    node_or_standby.add_argument("--node", type=int)
    node_or_standby.add_argument(
        "--standby", type=int, help="start as standby node k: warm, waiting to take over a node"
    )
    a = p.parse_args(argv)
    log_dir = Path(a.job).parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    role = ["--node", str(a.node)] if a.standby is None else ["--standby", str(a.standby)]
    name = f"agent{a.node}" if a.standby is None else f"agent-standby{a.standby}"
    agent = spawn_module(
        "gemini.cluster.agent", ["--job", a.job, *role], log_path=log_dir / f"{name}.log"
    )

    def stop(*_: Any) -> None:
        terminate_tree(agent.pid, grace_s=5.0)
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return agent.wait()


if __name__ == "__main__":
    sys.exit(main())
