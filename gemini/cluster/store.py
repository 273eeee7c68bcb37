"""The distributed KV store every process of a job talks through, and its key space.

The controller hosts a ``torch.distributed.TCPStore`` (as Gemini relies on
etcd); it outlives the root agent, so a newly elected root finds the job's
state there. Everything here is JSON or integers: nothing read from the store
is ever unpickled.

Key space (all keys are strings):

=========================== ==================================================
``hb/node{i}``, ``hb/root``  heartbeat counters (``add``), compared by the
                             reader against its own clock: immune to skew
``agent/node{i}``            JSON: pid, transport address, incarnation
``ctl/gen``                  current generation (counter); a generation is one
                             launch of all trainer ranks
``ctl/plan/{g}``             JSON plan of generation g: start step, per-rank
                             restore source
``ctl/stop/{g}``             teardown request for generation g's trainers
``ctl/done``, ``ctl/abort``  the job finished / is being torn down
``trainer/{g}/{r}``          JSON: pid and node of rank r in generation g
``exit/{g}/{r}``             JSON: exit code of rank r in generation g
``ready/{g}/{r}``            JSON: restore timings of rank r in generation g
``restore_failed/{g}/{r}``   JSON: the source rank r of generation g could not
                             read (step, source, error)
``trim/req``, ``trim/{n}``   the root's n-th request that every agent drop its
                             copies newer than a plan's step
``trim/{n}/{node}``          JSON: a node's answer, the steps it dropped per rank
``inv/req``, ``inv/{n}/{node}``
                             inventory requests and each node's answer:
                             verified ``[step, generation]`` per source rank
``progress/{r}``             last completed step of rank r
``metrics/{r}``              newline-separated JSON records, appended
``final/{g}/{r}``            JSON: the final digest and run means of rank r
``spawn/n``, ``spawn/{n}``   requests from the root to (re)start a node
``inject/n``, ``inject/{n}`` injected failures, with their wall time
``recovery/n``,
``recovery/{n}``             one JSON record per recovery, phase by phase
``root/...``                 root agent state (epoch, result)
=========================== ==================================================
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist


class Store:
    """A thin, typed client over TCPStore with JSON helpers."""

    def __init__(
        self, host: str, port: int, timeout_s: float = 60.0, *, master: bool = False
    ) -> None:
        self.host, self.timeout_s = host, timeout_s
        self.raw = dist.TCPStore(
            host,
            port,
            is_master=master,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
        self.port = self.raw.port

    @classmethod
    def from_address(cls, address: str, timeout_s: float = 60.0) -> Store:
        host, port = address.rsplit(":", 1)
        return cls(host, int(port), timeout_s)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def set(self, key: str, value: str) -> None:
        self.raw.set(key, value)

    def set_json(self, key: str, value: Any) -> None:
        self.raw.set(key, json.dumps(value))

    def get_json(self, key: str) -> Any:
        return json.loads(self.raw.get(key))

    def get_json_or(self, key: str, default: Any = None) -> Any:
        return self.get_json(key) if self.exists(key) else default

    def exists(self, key: str) -> bool:
        return bool(self.raw.check([key]))

    def counter(self, key: str) -> int:
        """Read a counter without blocking (a missing counter reads 0)."""
        return int(self.raw.add(key, 0))

    def incr(self, key: str, by: int = 1) -> int:
        return int(self.raw.add(key, by))

    def append_json(self, key: str, record: Any) -> None:
        self.append(key, json.dumps(record) + "\n")

    def append(self, key: str, text: str) -> None:
        # TCPStore.append exists at run time (torch >= 2.1) but not in the stubs.
        self.raw.append(key, text)  # type: ignore[attr-defined]

    def read_lines(self, key: str) -> list[Any]:
        if not self.exists(key):
            return []
        text = self.raw.get(key).decode()
        return [json.loads(line) for line in text.splitlines() if line]

    def push(self, queue: str, record: Any) -> int:
        """Append a record to a numbered list ``{queue}/{n}``; returns n (1-based)."""
        n = self.incr(f"{queue}/n")
        self.set_json(f"{queue}/{n}", record)
        return n

    def items(self, queue: str, start: int = 1) -> list[tuple[int, Any]]:
        """Records of a numbered list from ``start`` on (those already written)."""
        last = self.counter(f"{queue}/n")
        out = []
        for n in range(start, last + 1):
            key = f"{queue}/{n}"
            if self.exists(key):
                out.append((n, self.get_json(key)))
        return out

    def wait_for(self, key: str, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Poll for a key (TCPStore.wait raises on timeout; polling keeps callers responsive)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.exists(key):
                return True
            time.sleep(poll_s)
        return self.exists(key)
