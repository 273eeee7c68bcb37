"""Fig. 11: how long one checkpoint takes, remote storage vs Gemini's CPU memory.

Remote storage has a fixed aggregate bandwidth B_storage that all N machines
share, so a checkpoint of S bytes per machine takes ``N * S / B_storage``.
Gemini sends m - 1 copies of each machine's S bytes over the machine's own
NIC (B_net each), all machines in parallel, so it takes ``(m - 1) * S / B_net``
whatever N (plus ``S / B_local`` for the local GPU-to-CPU copy, if modelled).
The reduction ``N * B_net / ((m - 1) * B_storage)`` grows linearly with N.
"""

from __future__ import annotations

from typing import Any

FIG11_COLUMNS = (
    "N",
    "net_gbps",
    "storage_gbps",
    "ckpt_bytes",
    "t_storage_s",
    "t_gemini_s",
    "reduction",
)

_BITS = 8.0
_GIGA = 1e9


def storage_time_s(n: int, ckpt_bytes: float, storage_gbps: float) -> float:
    """N machines' checkpoints through storage of ``storage_gbps`` aggregate."""
    return n * ckpt_bytes * _BITS / (storage_gbps * _GIGA)


def gemini_time_s(ckpt_bytes: float, m: int, net_gbps: float, local_gbps: float = 0.0) -> float:
    """m - 1 remote copies over each machine's own NIC, machines in parallel."""
    t = (m - 1) * ckpt_bytes * _BITS / (net_gbps * _GIGA)
    if local_gbps > 0:
        t += ckpt_bytes * _BITS / (local_gbps * _GIGA)
    return t


def fig11_rows(
    nodes: list[int],
    m: int,
    net_gbps: list[float],
    *,
    storage_gbps: float,
    ckpt_gb: float,
    local_gbps: float = 0.0,
) -> list[dict[str, Any]]:
    """One row per (N, NIC bandwidth): ``FIG11_COLUMNS``."""
    ckpt_bytes = ckpt_gb * _GIGA
    rows = []
    for n in nodes:
        for net in net_gbps:
            t_storage = storage_time_s(n, ckpt_bytes, storage_gbps)
            t_gemini = gemini_time_s(ckpt_bytes, m, net, local_gbps)
            rows.append(
                {
                    "N": n,
                    "net_gbps": net,
                    "storage_gbps": storage_gbps,
                    "ckpt_bytes": ckpt_bytes,
                    "t_storage_s": t_storage,
                    "t_gemini_s": t_gemini,
                    # m = 1 keeps no remote copy: Gemini then sends nothing.
                    "reduction": t_storage / t_gemini if t_gemini > 0 else float("inf"),
                }
            )
    return rows
