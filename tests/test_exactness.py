"""The exact verdict: which configs must end alike, and the reference run looked up in a
real MLflow store (sqlite in ``tmp_path``), tagged the way the controller tags its runs."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gemini.config import GeminiConfig, ModelConfig
from gemini.exactness import (
    NO_REFERENCE,
    Reference,
    Verdict,
    find_reference,
    judge_exact,
    look_up_verdict,
    reference_hash,
    run_tags,
)


def base() -> GeminiConfig:
    return GeminiConfig(model=ModelConfig(name="gpt_tiny"))


def changed(group: str, key: str, value: Any) -> GeminiConfig:
    cfg = base()
    if group == "progress":
        return dataclasses.replace(cfg, progress=value)
    setattr(getattr(cfg, group), key, value)
    return cfg


@pytest.mark.parametrize(
    ("group", "key", "value"),
    [
        ("failure", "name", "hardware_once"),
        ("failure", "at_step", 7),
        ("failure", "kind", "software"),
        ("tracking", "enabled", False),
        ("tracking", "experiment", "elsewhere"),
        ("paths", "outputs", "/somewhere/else"),
        ("progress", "", False),
    ],
)
def test_failure_group_tracking_and_where_files_go_leave_the_hash_alone(
    group: str, key: str, value: Any
) -> None:
    assert reference_hash(changed(group, key, value)) == reference_hash(base())


@pytest.mark.parametrize(
    ("group", "key", "value"),
    [
        ("model", "name", "gpt_small"),
        ("model", "n_layer", 3),
        ("train", "seed", 1),
        ("train", "steps", 50),
        ("train", "lr", 2e-3),
        ("train", "optimizer_impl", "foreach"),
        ("train", "parallel", "zero"),
        ("cluster", "nodes", 2),
        ("cluster", "ranks_per_node", 2),
        ("cluster", "device", "cpu"),
        ("backend", "name", "replicated"),
        ("backend", "every_n", 3),
    ],
)
def test_every_other_setting_changes_the_hash(group: str, key: str, value: Any) -> None:
    assert reference_hash(changed(group, key, value)) != reference_hash(base())


def test_the_verdict_compares_digests_and_says_why_when_it_cannot() -> None:
    ref = Reference("r1", "d" * 64)
    assert judge_exact("d" * 64, ref) == Verdict("yes", "r1")
    assert judge_exact("e" * 64, ref) == Verdict("no", "r1")
    assert judge_exact("d" * 64, None) == Verdict("unknown", None, NO_REFERENCE)
    assert judge_exact(None, ref).exact == "unknown"
    assert Verdict("yes", "r1").describe() == "yes (reference run r1)"
    assert Verdict("no", "r1").describe() == "no (reference run r1)"
    assert judge_exact("d", None).describe() == f"unknown ({NO_REFERENCE})"


# -- a real MLflow store ---------------------------------------------------------------


@pytest.fixture
def client(tmp_path: Any) -> Any:
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def add_run(
    client: Any,
    exp: str,
    cfg: GeminiConfig,
    digest: str | None,
    *,
    schedule: str = "none",
    status: str = "FINISHED",
) -> str:
    """A run tagged as the controller tags one (``failure_schedule`` comes from host_tags).

    Each starts a second after the one before, so "newest" is unambiguous.
    """
    tags = {**run_tags(cfg, digest, None), "failure_schedule": schedule}
    start_ms = 1_700_000_000_000 + 1000 * len(client.search_runs([exp]))
    rid = str(client.create_run(exp, start_time=start_ms, tags=tags).info.run_id)
    client.set_terminated(rid, status=status)
    return rid


def test_the_reference_is_the_newest_finished_failure_free_run_of_the_same_config(
    client: Any,
) -> None:
    exp = client.create_experiment("gemini")
    cfg, other = base(), changed("train", "seed", 1)
    h = reference_hash(cfg)
    assert find_reference(client, exp, h) is None
    add_run(client, exp, other, "o" * 64)  # another config
    add_run(client, exp, cfg, "f" * 64, status="FAILED")  # did not finish
    add_run(client, exp, cfg, "x" * 64, schedule="hardware_once")  # had failures
    assert find_reference(client, exp, h) is None
    old = add_run(client, exp, cfg, "a" * 64)
    assert find_reference(client, exp, h) == Reference(old, "a" * 64)
    new = add_run(client, exp, cfg, "b" * 64)
    assert find_reference(client, exp, h) == Reference(new, "b" * 64)
    # Another experiment does not see it.
    assert find_reference(client, client.create_experiment("other"), h) is None


def test_a_run_with_failures_is_judged_against_its_reference_in_the_store(client: Any) -> None:
    exp = client.create_experiment("gemini")
    cfg = base()
    with_failures = changed("failure", "name", "hardware_once")
    assert look_up_verdict(client, "gemini", with_failures, "a" * 64) == Verdict(
        "unknown", None, NO_REFERENCE
    )
    assert look_up_verdict(client, "missing", with_failures, "a" * 64).exact == "unknown"
    ref = add_run(client, exp, cfg, "a" * 64)
    assert look_up_verdict(client, "gemini", with_failures, "a" * 64) == Verdict("yes", ref)
    assert look_up_verdict(client, "gemini", with_failures, "c" * 64) == Verdict("no", ref)
    # The run's own tags record the verdict and make it findable by config.
    tags = run_tags(with_failures, "a" * 64, Verdict("yes", ref))
    assert tags == {
        "gemini.config_hash": reference_hash(cfg),
        "gemini.state_digest": "a" * 64,
        "gemini.exact": "yes",
        "gemini.exact_reference": ref,
    }
