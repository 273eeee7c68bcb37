"""The key table covers every store key, and code spells no key by hand."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from gemini.cluster import keys

ROOT = Path(__file__).resolve().parents[1]
# Methods through which a key reaches the store (Store's own and TCPStore's).
STORE_METHODS = {
    "set",
    "set_json",
    "get",
    "get_json",
    "get_json_or",
    "get_int",
    "exists",
    "counter",
    "incr",
    "append",
    "append_json",
    "read_lines",
    "push",
    "items",
    "wait_for",
    "compare_set",
    "add",
    "check",
    "flag",
    "set_flag",
    "PrefixStore",
}


def _key_functions() -> list[tuple[str, str]]:
    """(name, key) for every key function of the module, called with sample arguments."""
    out = []
    for name, fn in inspect.getmembers(keys, inspect.isfunction):
        if (
            fn.__module__ != keys.__name__
            or name.startswith("_")
            or name
            in (
                "describe",
                "is_signed",
                # A queue's name, not a key: its keys are checked below.
                "node_orders",
            )
        ):
            continue
        params = inspect.signature(fn).parameters
        args = ["node3" if p == "name" else ("spawn" if p == "queue" else 7) for p in params]
        out.append((name, fn(*args)))
    return out


def _key_constants() -> list[tuple[str, str]]:
    return [
        (name, v)
        for name, v in vars(keys).items()
        if name.isupper()
        and not name.startswith("_")
        and isinstance(v, str)
        and name not in ("SPAWN", "INJECT", "RECOVERY", "ROOT_ORDERS")
    ]


@pytest.mark.parametrize(("name", "key"), _key_functions() + _key_constants())
def test_every_key_the_module_makes_has_exactly_one_row(name: str, key: str) -> None:
    if name == "pg_prefix":
        key += "/some_torch_key"
    rows = [k for k in keys.TABLE if keys._COMPILED[keys.TABLE.index(k)][0].fullmatch(key)]
    assert len(rows) == 1, f"{name}() -> {key!r} matches {[r.pattern for r in rows]}"


def test_queues_have_a_signed_record_row_and_an_unsigned_length_row() -> None:
    for q in (keys.SPAWN, keys.INJECT, keys.RECOVERY, keys.ROOT_ORDERS, keys.node_orders(3)):
        assert not keys.is_signed(keys.queue_length(q))
        assert keys.describe(keys.queue_length(q)) is not None
        assert keys.is_signed(keys.queue_item(q, 12))
    for q in (keys.ROOT_ORDERS, keys.node_orders(3)):
        assert keys.is_signed(keys.order_ack(q, 12))


def test_a_key_outside_the_table_is_not_ours() -> None:
    assert keys.describe("ctl/plan/x") is None
    assert keys.describe("something/else") is None
    assert not keys.is_signed("ctl/plan/")


def test_the_table_has_one_row_per_pattern_and_says_everything() -> None:
    patterns = [k.pattern for k in keys.TABLE]
    assert len(patterns) == len(set(patterns))
    for k in keys.TABLE:
        assert k.writer and k.reader and k.meaning, k


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _store_calls_with_literal_keys(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in STORE_METHODS or not node.args:
            continue
        receiver = ast.unparse(node.func.value)
        if not receiver.lower().endswith(("store", "store.raw")) and receiver != "dist":
            continue
        first = node.args[0]
        literal = isinstance(first, ast.JoinedStr) or (
            isinstance(first, ast.Constant) and isinstance(first.value, str)
        )
        if literal:
            bad.append(f"{_name(path)}:{node.lineno}: {ast.unparse(node)}")
    return bad


def _literal_keys(path: Path) -> list[str]:
    """String literals that start like one of the table's keys (docstrings excluded)."""
    prefixes = {k.pattern.split("/")[0].split("{")[0] + "/" for k in keys.TABLE}
    prefixes.discard("gen/")
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and node.values:
            head = node.values[0]
            text = head.value if isinstance(head, ast.Constant) else ""
            if re.match(r"f['\"]gen\{[^}]*\}/", ast.unparse(node)):
                bad.append(f"{_name(path)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in docstrings or id(node) in parts:
                continue
            text = node.value
        else:
            continue
        if any(str(text).startswith(p) for p in prefixes):
            bad.append(f"{_name(path)}:{node.lineno}: {ast.unparse(node)}")
    return bad


# MLflow metric names that share a prefix with a store key, on purpose.
NOT_STORE_KEYS = {"gemini/tracking.py"}


def test_no_code_spells_a_store_key_by_hand() -> None:
    sources = [
        p
        for p in sorted((ROOT / "gemini").rglob("*.py"))
        if p.name != "keys.py" and str(p.relative_to(ROOT)) not in NOT_STORE_KEYS
    ]
    assert len(sources) > 20
    bad = [b for p in sources for b in (*_store_calls_with_literal_keys(p), *_literal_keys(p))]
    assert not bad, "store keys spelled outside gemini.cluster.keys:\n" + "\n".join(bad)


def test_the_check_finds_a_key_spelled_by_hand(tmp_path: Path) -> None:
    # The check above must be able to fail.
    src = tmp_path / "probe.py"
    src.write_text(
        'def f(store, g):\n    store.get_json_or(f"ctl/plan/{g}")\n    x = "ctl/abort"\n'
    )
    assert len(_store_calls_with_literal_keys(src)) == 1
    assert len(_literal_keys(src)) == 2
