"""Where each machine's in-memory checkpoint replicas live, and how likely they survive.

This module owns Gemini's checkpoint placement (Algorithm 1 of Wang et al.,
SOSP 2023) and its analysis: which machines hold a copy of which machine's
checkpoint, and the probability that ``k`` simultaneous machine failures still
leave a copy of every checkpoint in CPU memory (Corollary 1, checked by exact
enumeration and Monte Carlo sampling).

Vocabulary, as in the paper: ``n`` machines ``0..n-1``; ``m`` replicas per
checkpoint, *counting the local one*, so each machine's checkpoint is held by
itself and by ``m - 1`` other machines, its *holders*. A machine's checkpoint
is recoverable from CPU memory iff the machine itself or at least one of its
holders survives; recovery from memory fails only when some machine and all
of its holders fail together, and then the job falls back to persistent
storage.

Placements (``PLACEMENTS``):

``group``
    Algorithm 1 when ``m`` divides ``n``: ``n / m`` disjoint groups of ``m``
    consecutive machines; every member holds the checkpoints of all the other
    members of its group. Only a whole group failing loses a checkpoint, which
    is why the paper prefers it: it has the fewest fatal failure sets.
``mixed``
    Algorithm 1 when ``m`` does not divide ``n``: ``n // m`` groups of ``m``
    consecutive machines, the last one enlarged to ``m + n % m`` members.
    Inside that last group, which has more members than replicas, each member
    replicates to its next ``m - 1`` members in the group, wrapping around (a
    ring confined to the group). The full-size groups behave as in ``group``.
    When ``m`` divides ``n`` there is no remainder and the layout is exactly
    ``group``.
``ring``
    The alternative the paper compares against (Fig. 9): machine ``i``
    replicates to ``i+1, ..., i+m-1`` (mod ``n``). Survival sets overlap, so
    more failure sets are fatal and the recovery probability is lower.

Every placement is balanced: each machine holds exactly ``m - 1`` checkpoints
besides its own, so a holder needs ``m - 1`` remote slots (``held_by``).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import SupportsIndex

import numpy as np

__all__ = [
    "EXACT_ENUMERATION_LIMIT",
    "METHODS",
    "PLACEMENTS",
    "PlacementError",
    "ProbabilityEstimate",
    "groups",
    "held_by",
    "holders",
    "holders_of_all",
    "recovery_probability",
    "resolve_placement",
]

PLACEMENTS = ("group", "mixed", "ring")
"""Placement names accepted everywhere a placement is asked for."""

METHODS = ("exact", "closed_form", "monte_carlo")
"""Ways ``recovery_probability`` can compute its answer."""

EXACT_ENUMERATION_LIMIT = 5_000_000
"""Most failure sets ``method="exact"`` enumerates; about a second or two of numpy work."""

# Errors name the configuration keys a user sets, so a message read in a
# Hydra traceback points at the line of YAML to change.
_NODES_KEY = "cluster.nodes"
_FACTOR_KEY = "replication.factor"
_PLACEMENT_KEY = "replication.placement"

# Boolean cells per vectorised batch (batch x machines x replicas): large
# enough to amortise numpy's per-call cost, small enough to stay in cache-ish
# memory (a few MB) whatever n is.
_BATCH_CELLS = 4_000_000


class PlacementError(ValueError):
    """A placement argument is out of range; the message names the key, the value and the fix."""


@dataclass(frozen=True)
class ProbabilityEstimate:
    """A recovery probability and how far to trust it."""

    value: float
    """Probability that every machine's checkpoint keeps at least one copy in CPU memory."""
    stderr: float
    """Standard error of ``value``: 0 for ``exact`` and ``closed_form``."""
    method: str
    """Which of ``METHODS`` produced it."""
    exact: bool
    """True when ``value`` is the exact probability. ``closed_form`` is exact only for
    ``k < 2m`` (no two groups can fail together) and a lower bound otherwise;
    ``monte_carlo`` is never exact."""


# --------------------------------------------------------------------------- validation


def _as_int(value: object, key: str) -> int:
    # __index__ admits numpy integers but not floats or strings, which would
    # otherwise fail later inside range() with a message naming no key. bool
    # has __index__ too, yet True machines is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, SupportsIndex):
        raise PlacementError(f"{key}={value!r} is not an integer: use an integer")
    return operator.index(value)


def _check_nm(n: object, m: object) -> tuple[int, int]:
    n_ = _as_int(n, _NODES_KEY)
    m_ = _as_int(m, _FACTOR_KEY)
    if n_ < 1:
        raise PlacementError(f"{_NODES_KEY}={n_} is not positive: use at least 1 machine")
    if m_ < 1:
        raise PlacementError(
            f"{_FACTOR_KEY}={m_} is below 1 (it counts the local copy): "
            f"use a factor between 1 and {n_}"
        )
    if m_ > n_:
        raise PlacementError(
            f"{_FACTOR_KEY}={m_} exceeds {_NODES_KEY}={n_}: use a factor between 1 and {n_}"
        )
    return n_, m_


def _check_node(node: object, n: int) -> int:
    node_ = _as_int(node, "node")
    if not 0 <= node_ < n:
        raise PlacementError(
            f"node={node_} is not a machine of {_NODES_KEY}={n}: use a node between 0 and {n - 1}"
        )
    return node_


def resolve_placement(n: int, m: int, requested: str) -> str:
    """The placement Algorithm 1 actually uses for ``n`` machines and ``m`` replicas.

    ``"group"`` stays ``"group"`` when ``m`` divides ``n``. When it does not,
    disjoint groups of ``m`` cannot cover the machines, and Algorithm 1's answer
    is the mixed layout (groups of ``m``, the last enlarged and replicated as a
    ring), so ``"group"`` resolves to ``"mixed"``. ``"mixed"`` and ``"ring"``
    are returned as asked; note that ``"mixed"`` with ``m | n`` lays out exactly
    like ``"group"``.

    Raises ``PlacementError`` unless ``1 <= m <= n`` and ``requested`` is one of
    ``PLACEMENTS``.
    """
    n, m = _check_nm(n, m)
    if requested not in PLACEMENTS:
        raise PlacementError(
            f"{_PLACEMENT_KEY}={requested!r} is unknown: use one of {', '.join(PLACEMENTS)}"
        )
    if requested == "group" and n % m != 0:
        return "mixed"
    return requested


# --------------------------------------------------------------------------- layout


def groups(n: int, m: int, placement: str) -> list[list[int]]:
    """The disjoint machine groups of a group or mixed placement, in machine order.

    ``group`` (``m | n``): ``n / m`` groups of ``m`` consecutive machines.
    ``mixed`` (or ``group`` with ``m`` not dividing ``n``, see
    ``resolve_placement``): ``n // m`` groups of ``m``, the last enlarged to
    ``m + n % m`` machines. Together the groups partition ``range(n)``.

    ``ring`` has no disjoint groups (every machine's survival set overlaps its
    neighbours'), so it returns ``[]``; use ``holders`` for ring layouts.
    """
    n, m = _check_nm(n, m)
    resolved = resolve_placement(n, m, placement)
    if resolved == "ring":
        return []
    count = n // m
    out = [list(range(g * m, (g + 1) * m)) for g in range(count)]
    # The remainder joins the last group rather than forming a short group of
    # its own: a group smaller than m could not hold m replicas.
    out[-1].extend(range(count * m, n))
    return out


def _successors(members: list[int], position: int, steps: int) -> list[int]:
    """The next ``steps`` members after ``members[position]``, wrapping around."""
    size = len(members)
    return [members[(position + s) % size] for s in range(1, steps + 1)]


def _predecessors(members: list[int], position: int, steps: int) -> list[int]:
    """The previous ``steps`` members before ``members[position]``, wrapping around."""
    size = len(members)
    return [members[(position - s) % size] for s in range(1, steps + 1)]


def _ring_of(node: int, n: int, m: int, resolved: str) -> tuple[list[int], int]:
    """The cyclic sequence ``node`` replicates along, and its position in it.

    Every placement is a ring of ``m - 1`` successors inside some set of
    machines: the whole cluster for ``ring``, the node's group otherwise. In a
    group of exactly ``m`` members the ``m - 1`` successors are all the other
    members, which is group placement; in the enlarged last group of ``mixed``
    it is the ring inside that group. One rule keeps the orders consistent.
    """
    if resolved == "ring":
        return list(range(n)), node
    last_start = (n // m - 1) * m
    if node >= last_start:
        members = list(range(last_start, n))
    else:
        start = node - node % m
        members = list(range(start, start + m))
    return members, members.index(node)


def holders(node: int, n: int, m: int, placement: str) -> list[int]:
    """The ``m - 1`` other machines that hold ``node``'s checkpoint, nearest first.

    The local copy is not listed. "Nearest first" is the cyclic order of the
    node's ring (see the module docstring): its next machine in the group (or
    cluster, for ``ring``) first, wrapping around. Recovery tries holders in
    this order, so the order is part of the contract.
    """
    n, m = _check_nm(n, m)
    node = _check_node(node, n)
    resolved = resolve_placement(n, m, placement)
    members, position = _ring_of(node, n, m, resolved)
    return _successors(members, position, m - 1)


def holders_of_all(n: int, m: int, placement: str) -> dict[int, list[int]]:
    """``holders`` for every machine: ``{node: [holder, ...]}``."""
    n, m = _check_nm(n, m)
    resolve_placement(n, m, placement)
    return {node: holders(node, n, m, placement) for node in range(n)}


def held_by(node: int, n: int, m: int, placement: str) -> list[int]:
    """The other machines whose checkpoints ``node`` stores, nearest first.

    The inverse of ``holders``: ``a in held_by(b)`` iff ``b in holders(a)``.
    Every placement is balanced, so this always has ``m - 1`` entries; a
    holder sizes its remote slots from it.
    """
    n, m = _check_nm(n, m)
    node = _check_node(node, n)
    resolved = resolve_placement(n, m, placement)
    members, position = _ring_of(node, n, m, resolved)
    # Successor rings are inverted by walking the same ring backwards.
    return _predecessors(members, position, m - 1)


# --------------------------------------------------------------------------- analysis


def _survival_sets(n: int, m: int, placement: str) -> np.ndarray:
    """Array ``(n, m)``: row ``i`` is machine ``i`` followed by its holders."""
    table = holders_of_all(n, m, placement)
    return np.array([[node, *table[node]] for node in range(n)], dtype=np.intp).reshape(n, m)


def _count_survivors(failed: np.ndarray, survival: np.ndarray) -> int:
    """How many rows of boolean ``failed`` (batch, n) keep a copy of every checkpoint."""
    # failed[:, survival] is (batch, n, m): a checkpoint is lost when all m of
    # its copies sit on failed machines.
    lost = np.any(np.all(failed[:, survival], axis=2), axis=1)
    return int(lost.size - np.count_nonzero(lost))


def _batch_rows(n: int, m: int) -> int:
    return max(1, _BATCH_CELLS // (n * m))


def _combination_batches(n: int, k: int, rows: int) -> Iterator[np.ndarray]:
    """All k-subsets of ``range(n)`` as index arrays of at most ``rows`` rows."""
    combos = itertools.combinations(range(n), k)
    while True:
        flat = np.fromiter(
            itertools.chain.from_iterable(itertools.islice(combos, rows)), dtype=np.intp
        )
        if flat.size == 0:
            return
        yield flat.reshape(-1, k)


def _mark(failed_idx: np.ndarray, n: int) -> np.ndarray:
    failed = np.zeros((failed_idx.shape[0], n), dtype=bool)
    np.put_along_axis(failed, failed_idx, True, axis=1)
    return failed


def _exact(n: int, m: int, k: int, placement: str) -> ProbabilityEstimate:
    total = math.comb(n, k)
    if total > EXACT_ENUMERATION_LIMIT:
        raise PlacementError(
            f"method='exact' would enumerate C({n}, {k})={total} failure sets, more than "
            f"{EXACT_ENUMERATION_LIMIT}: use method='monte_carlo' "
            "(or 'closed_form' for group placement)"
        )
    if k == 0:
        # combinations(range(n), 0) yields one empty tuple, which fromiter
        # cannot tell from "no more batches"; nothing failed means nothing lost.
        return ProbabilityEstimate(1.0, 0.0, "exact", True)
    survival = _survival_sets(n, m, placement)
    survived = sum(
        _count_survivors(_mark(batch, n), survival)
        for batch in _combination_batches(n, k, _batch_rows(n, m))
    )
    return ProbabilityEstimate(survived / total, 0.0, "exact", True)


def _closed_form(n: int, m: int, k: int, placement: str) -> ProbabilityEstimate:
    resolved = resolve_placement(n, m, placement)
    if resolved == "ring" or n % m != 0:
        raise PlacementError(
            f"method='closed_form' is Corollary 1, for group placement with "
            f"{_FACTOR_KEY} dividing {_NODES_KEY}; got {_PLACEMENT_KEY}={placement!r}, "
            f"{_NODES_KEY}={n}, {_FACTOR_KEY}={m}: use method='exact' or 'monte_carlo'"
        )
    if k < m:
        # Fewer failures than a group's size cannot wipe out a whole group.
        return ProbabilityEstimate(1.0, 0.0, "closed_form", True)
    # A given group is entirely among the k failed machines in C(n-m, k-m) of
    # the C(n, k) failure sets; there are n/m groups. Summing over groups (a
    # union bound) counts exactly when at most one group can fail, i.e. k < 2m,
    # and over-counts the fatal sets otherwise, so P is then a lower bound.
    fatal = (n // m) * math.comb(n - m, k - m) / math.comb(n, k)
    return ProbabilityEstimate(max(0.0, 1.0 - fatal), 0.0, "closed_form", k < 2 * m)


def _monte_carlo(
    n: int, m: int, k: int, placement: str, trials: int, seed: int
) -> ProbabilityEstimate:
    trials = _as_int(trials, "trials")
    if trials < 1:
        raise PlacementError(f"trials={trials} is not positive: use at least 1 trial")
    seed = _as_int(seed, "seed")
    survival = _survival_sets(n, m, placement)
    rng = np.random.default_rng(seed)
    rows = _batch_rows(n, m)
    survived = 0
    done = 0
    while done < trials:
        batch = min(rows, trials - done)
        if k == 0:
            survived += batch
        else:
            # The k smallest of n i.i.d. uniform keys are a uniformly random
            # k-subset; argpartition finds them without a full sort.
            keys = rng.random((batch, n))
            failed_idx = np.argpartition(keys, k - 1, axis=1)[:, :k]
            survived += _count_survivors(_mark(failed_idx, n), survival)
        done += batch
    p = survived / trials
    return ProbabilityEstimate(p, math.sqrt(p * (1.0 - p) / trials), "monte_carlo", False)


def recovery_probability(
    n: int,
    m: int,
    k: int,
    placement: str,
    method: str = "exact",
    *,
    trials: int = 100_000,
    seed: int = 0,
) -> ProbabilityEstimate:
    """Probability that ``k`` simultaneous failures leave every checkpoint recoverable from memory.

    The ``k`` failed machines are a uniformly random ``k``-subset of the ``n``
    machines. A machine's checkpoint survives iff the machine or one of its
    holders survives; the estimate is for *all* machines' checkpoints surviving
    (the paper's Fig. 9 quantity).

    Methods:

    ``"exact"``
        Enumerates all ``C(n, k)`` failure sets; refused when there are more
        than ``EXACT_ENUMERATION_LIMIT``.
    ``"closed_form"``
        Corollary 1, for group placement with ``m | n``: 1 for ``k < m``, else
        ``max(0, 1 - n * C(n-m, k-m) / (m * C(n, k)))``. Exact for ``k < 2m``,
        a lower bound otherwise (``estimate.exact`` says which). Refused for
        ring and mixed layouts.
    ``"monte_carlo"``
        ``trials`` failure sets drawn with ``numpy.random.default_rng(seed)``;
        deterministic for a given seed. ``stderr = sqrt(p (1 - p) / trials)``.

    For ``n = 16, m = 2`` (the paper's setting) group placement gives 0.9333
    at ``k = 2`` and 0.8000 at ``k = 3``.
    """
    n, m = _check_nm(n, m)
    resolve_placement(n, m, placement)
    k = _as_int(k, "k")
    if not 0 <= k <= n:
        raise PlacementError(
            f"k={k} failed machines is outside {_NODES_KEY}={n}: use k between 0 and {n}"
        )
    if method == "exact":
        return _exact(n, m, k, placement)
    if method == "closed_form":
        return _closed_form(n, m, k, placement)
    if method == "monte_carlo":
        return _monte_carlo(n, m, k, placement, trials, seed)
    raise PlacementError(f"method={method!r} is unknown: use one of {', '.join(METHODS)}")
