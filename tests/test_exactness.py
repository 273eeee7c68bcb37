"""The exact verdict: which configs must end alike, and the reference run looked up in a
real MLflow store (sqlite in ``tmp_path``), tagged the way the controller tags its runs."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
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
def client(tmp_path: Path) -> Any:
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


# -- one sweep: the reference and the verdict ----------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.usefixtures("no_leftovers")
def test_a_sweep_with_and_without_a_failure_reports_the_second_job_exact(
    gemini_cli: Callable[..., Any], tmp_path: Path, outputs_dir: Path, mlflow_uri: str
) -> None:
    import mlflow

    rc, out, err = gemini_cli(
        [
            "-m",
            "failure=none,hardware_once",
            "failure.at_step=3",
            "backend=replicated",
            "model=mlp",
            "train.steps=6",
            "cluster.nodes=2",
            "cluster.heartbeat_s=0.5",
            f"tracking.uri={mlflow_uri}",
        ],
        cwd=tmp_path,
        timeout_s=380,
    )
    assert rc == 0, err
    (sweep,) = (outputs_dir / "multiruns").iterdir()
    first, second = (json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json")))
    assert "exact" not in first  # failure-free: it is the reference
    assert second["recoveries"], "the failure was injected and recovered from"
    ref = first["mlflow_run_id"]
    assert (second["exact"], second["exact_reference_run"]) == ("yes", ref)
    assert re.search(rf"^exact\s+yes \(reference run {ref}\)$", out, re.MULTILINE), out
    client = mlflow.MlflowClient(mlflow_uri)
    tags = client.get_run(second["mlflow_run_id"]).data.tags
    assert (tags["gemini.exact"], tags["gemini.exact_reference"]) == ("yes", ref)
    assert tags["gemini.state_digest"] == first["state_digest"] == second["state_digest"]
    ref_tags = client.get_run(ref).data.tags
    assert ref_tags["gemini.config_hash"] == tags["gemini.config_hash"]
    assert "gemini.exact" not in ref_tags
