"""The distributed KV store every process of a job talks through, and its key space.

The controller hosts a ``torch.distributed.TCPStore`` (as Gemini relies on
etcd); it outlives the root agent, so a newly elected root finds the job's
state there. Everything here is JSON or integers: nothing read from the store
is ever unpickled.

Every key, who writes and reads it, and whether its value is signed:
``gemini.cluster.keys.TABLE``.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from gemini.cluster import keys


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
        n = self.incr(keys.queue_length(queue))
        self.set_json(keys.queue_item(queue, n), record)
        return n

    def items(self, queue: str, start: int = 1) -> list[tuple[int, Any]]:
        """Records of a numbered list from ``start`` on (those already written)."""
        last = self.counter(keys.queue_length(queue))
        out = []
        for n in range(start, last + 1):
            key = keys.queue_item(queue, n)
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
