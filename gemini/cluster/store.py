"""The distributed KV store every process of a job talks through.

The controller hosts a ``torch.distributed.TCPStore`` (as Gemini relies on
etcd); it outlives the root agent, so a newly elected root finds the job's
state there. Everything here is JSON or integers: nothing read from the store
is ever unpickled.

Every key, who writes and reads it, and whether its value is signed:
``gemini.cluster.keys.TABLE``.

The store is a control plane, so it is guarded like one:

- It listens on ``cluster.host`` only: the controller binds the listening
  socket itself and hands it to TCPStore, which would otherwise listen on
  every interface.
- A value under a signed key is ``hex(mac) + "." + payload``, the MAC an
  HMAC-SHA256 under the per-run secret over ``gemini-store/1 <key>\\0<payload>``
  (the key is bound in, so a value cannot be replayed under another key).
  Appended keys sign each line. A reader treats an unsigned or wrongly signed
  value as absent, logs one line per key it refused, and carries on: a forged
  value is ignored, never acted on. What a MAC cannot stop is someone who
  reaches the port overwriting (or ``add``-ing to) a real value: readers then
  see it as absent, which can stall or end the job but not change its
  result. Listening on ``cluster.host`` only keeps that to those who can
  reach that address.
- Counters (``add``) cannot carry a MAC; ``keys`` says why each one is safe.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from gemini.cluster import keys

_LABEL = b"gemini-store/1 "
_MAC_HEX = 2 * hashlib.sha256().digest_size


def store_mac(secret: bytes, key: str, payload: bytes) -> bytes:
    """The MAC of ``payload`` stored under ``key`` (hex, as stored)."""
    msg = _LABEL + key.encode() + b"\0" + payload
    return hmac.new(secret, msg, hashlib.sha256).hexdigest().encode()


def sign(secret: bytes, key: str, payload: bytes) -> bytes:
    return store_mac(secret, key, payload) + b"." + payload


def verify(secret: bytes, key: str, value: bytes) -> bytes | None:
    """The payload of a signed value, or None when it is unsigned or wrongly signed."""
    mac, dot, payload = value.partition(b".")
    if not dot or len(mac) != _MAC_HEX:
        return None
    if not hmac.compare_digest(mac, store_mac(secret, key, payload)):
        return None
    return payload


def _looks_signed(value: bytes) -> bool:
    mac, dot, _ = value.partition(b".")
    return bool(dot) and len(mac) == _MAC_HEX and all(c in b"0123456789abcdef" for c in mac)


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket bound to ``host`` only (not every interface)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(512)
    except BaseException:
        sock.close()
        raise
    return sock


class Store:
    """A typed client over TCPStore: JSON helpers, signed values, counters.

    ``master=True`` hosts the store, listening on ``host`` only.
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes,
        timeout_s: float = 60.0,
        *,
        master: bool = False,
    ) -> None:
        self.host, self.timeout_s = host, timeout_s
        self.secret = bytes(secret)
        self._refused: set[str] = set()
        self._lock = threading.Lock()
        fd = None
        if master:
            listener = listen_socket(host, port)
            port = listener.getsockname()[1]
            # TCPStore (libuv) takes the descriptor over and closes it with the store.
            fd = listener.detach()
        self.raw = dist.TCPStore(
            host,
            port,
            is_master=master,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
            master_listen_fd=fd,
            use_libuv=True,
        )
        self.port = self.raw.port

    @classmethod
    def from_address(cls, address: str, secret: bytes, timeout_s: float = 60.0) -> Store:
        host, port = address.rsplit(":", 1)
        return cls(host, int(port), secret, timeout_s)

    @classmethod
    def for_job(cls, job: Any, timeout_s: float = 60.0) -> Store:
        """A client of ``job``'s store (a ``JobSpec``), holding the run's secret."""
        return cls.from_address(job.store, job.secret(), timeout_s)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- values ------------------------------------------------------------------
    def set(self, key: str, value: str) -> None:
        if keys.is_signed(key):
            value = sign(self.secret, key, value.encode()).decode()
        self.raw.set(key, value)

    def get(self, key: str) -> str | None:
        """The value under ``key``; None when absent, or signed key refused."""
        if not self.raw.check([key]):
            return None
        data = self.raw.get(key)
        if keys.is_signed(key):
            payload = verify(self.secret, key, data)
            if payload is None:
                self._refuse(key, "bad signature" if _looks_signed(data) else "unsigned")
                return None
            data = payload
        return data.decode()

    def exists(self, key: str) -> bool:
        if keys.is_signed(key):
            return self.get(key) is not None
        return bool(self.raw.check([key]))

    def set_json(self, key: str, value: Any) -> None:
        self.set(key, json.dumps(value))

    def get_json(self, key: str) -> Any:
        """The JSON value under ``key``; KeyError when absent or refused."""
        text = self.get(key)
        if text is None:
            raise KeyError(f"{key}: absent from the store (or refused)")
        return json.loads(text)

    def get_json_or(self, key: str, default: Any = None) -> Any:
        text = self.get(key)
        return default if text is None else json.loads(text)

    def get_int(self, key: str, default: int = 0) -> int:
        text = self.get(key)
        return default if text is None else int(text)

    def _refuse(self, key: str, why: str) -> None:
        with self._lock:
            if key in self._refused:
                return
            self._refused.add(key)
        print(f"[store] {key}: refused: {why}", file=sys.stderr, flush=True)

    # -- counters -----------------------------------------------------------------
    def counter(self, key: str) -> int:
        """Read a counter without blocking (a missing counter reads 0)."""
        return int(self.raw.add(self._unsigned(key), 0))

    def incr(self, key: str, by: int = 1) -> int:
        return int(self.raw.add(self._unsigned(key), by))

    @staticmethod
    def _unsigned(key: str) -> str:
        # ``add`` on a signed value would break the store for every client.
        if keys.is_signed(key):
            raise ValueError(f"{key} holds a signed value, not a counter")
        return key

    # -- appended lines -----------------------------------------------------------
    def append_json(self, key: str, record: Any) -> None:
        self.append(key, json.dumps(record) + "\n")

    def append(self, key: str, text: str) -> None:
        """Append lines (each signed on its own under a signed key)."""
        if keys.is_signed(key):
            text = "".join(
                sign(self.secret, key, line.encode()).decode() + "\n"
                for line in text.splitlines()
                if line
            )
        # TCPStore.append exists at run time (torch >= 2.1) but not in the stubs.
        self.raw.append(key, text)  # type: ignore[attr-defined]

    def read_lines(self, key: str) -> list[Any]:
        if not self.raw.check([key]):
            return []
        lines = self.raw.get(key).splitlines()
        if keys.is_signed(key):
            good = [p for p in (verify(self.secret, key, line) for line in lines if line) if p]
            if len(good) < sum(1 for line in lines if line):
                self._refuse(key, "a line with a bad signature or none")
            lines = good
        return [json.loads(line) for line in lines if line]

    # -- numbered queues ----------------------------------------------------------
    def push(self, queue: str, record: Any) -> int:
        """Append a record to a numbered list ``{queue}/{n}``; returns n (1-based)."""
        n = self.incr(keys.queue_length(queue))
        self.set_json(keys.queue_item(queue, n), record)
        return n

    def items(self, queue: str, start: int = 1) -> list[tuple[int, Any]]:
        """Records of a numbered list from ``start`` on (those written and signed)."""
        last = self.counter(keys.queue_length(queue))
        out = []
        for n in range(start, last + 1):
            rec = self.get_json_or(keys.queue_item(queue, n))
            if rec is not None:
                out.append((n, rec))
        return out

    def wait_for(self, key: str, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Poll for a key (TCPStore.wait raises on timeout; polling keeps callers responsive)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.exists(key):
                return True
            time.sleep(poll_s)
        return self.exists(key)
