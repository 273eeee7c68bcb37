"""Did a run with failures end exact? Its verdict against a failure-free reference run.

Recovery is exact when a run with injected failures ends in the bitwise state
(``state_digest``) of the same run without them. The controller answers it at
the end of every run with a failure schedule: it looks, in the same MLflow
experiment, for a finished failure-free run of the same configuration and
compares the digests. Every tracked run carries the two tags this needs
(``gemini.config_hash``, ``gemini.state_digest``), so any failure-free run is
a reference for later ones; ``gemini -m failure=none,hardware_once ...``
produces the reference and the verdict in one sweep.

"The same configuration" is everything but the failure group (what is being
compared), tracking (where the record goes), ``paths`` (where files go) and
``progress`` (whether a bar is shown). Everything else — model, training,
cluster shape and device, backend and its settings — is included, even
settings that should not change the result: a verdict against a run that
differs in any of them would not say what it claims.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from omegaconf import OmegaConf

from gemini.config import GeminiConfig

# Top-level config groups that do not define the computation being compared.
EXCLUDED = ("failure", "tracking", "paths", "progress")

TAG_CONFIG_HASH = "gemini.config_hash"
TAG_STATE_DIGEST = "gemini.state_digest"
TAG_EXACT = "gemini.exact"
TAG_EXACT_REFERENCE = "gemini.exact_reference"
TAG_FAILURE_SCHEDULE = "failure_schedule"
"""Set on every run by ``gemini.tracking.host_tags``: ``none`` marks a failure-free run."""

NO_REFERENCE = "run with failure=none for a reference"


def reference_hash(cfg: GeminiConfig) -> str:
    """Hash of the resolved config minus :data:`EXCLUDED`: runs that must end alike."""
    plain = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(plain, dict)
    kept = {k: v for k, v in plain.items() if k not in EXCLUDED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Reference:
    """A finished failure-free run of the same configuration."""

    run_id: str
    state_digest: str


@dataclass(frozen=True)
class Verdict:
    """Whether a run ended in its failure-free reference's state."""

    exact: Literal["yes", "no", "unknown"]
    reference_run: str | None = None
    detail: str = ""
    """Why the verdict is unknown (or what differs); empty when it is clear."""

    def describe(self) -> str:
        """``yes (reference run <id>)``, ``unknown (<why>)``...: the results-table cell."""
        if self.reference_run:
            return f"{self.exact} (reference run {self.reference_run})"
        return f"{self.exact} ({self.detail})" if self.detail else self.exact


def find_reference(client: Any, experiment_id: str, config_hash: str) -> Reference | None:
    """The newest finished, failure-free run of ``experiment_id`` with ``config_hash``."""
    query = (
        f"tags.`{TAG_CONFIG_HASH}` = '{config_hash}'"
        f" AND tags.`{TAG_FAILURE_SCHEDULE}` = 'none'"
        " AND attributes.status = 'FINISHED'"
    )
    for run in client.search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"]
    ):
        digest = run.data.tags.get(TAG_STATE_DIGEST)
        if digest:
            return Reference(run.info.run_id, digest)
    return None


def judge_exact(state_digest: str | None, reference: Reference | None) -> Verdict:
    """Compare a run's final digest with its reference's."""
    if state_digest is None:
        return Verdict("unknown", detail="the job ended without a final state")
    if reference is None:
        return Verdict("unknown", detail=NO_REFERENCE)
    same = state_digest == reference.state_digest
    return Verdict("yes" if same else "no", reference.run_id)


def look_up_verdict(client: Any, experiment: str, cfg: GeminiConfig, digest: str | None) -> Verdict:
    """The controller's question, asked of the tracking store ``client`` points at."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return judge_exact(digest, None)
    return judge_exact(digest, find_reference(client, exp.experiment_id, reference_hash(cfg)))


def run_tags(cfg: GeminiConfig, digest: str | None, verdict: Verdict | None) -> dict[str, str]:
    """The tags that make a run a reference (and, with failures, record its verdict)."""
    tags = {TAG_CONFIG_HASH: reference_hash(cfg)}
    if digest:
        tags[TAG_STATE_DIGEST] = digest
    if verdict is not None:
        tags[TAG_EXACT] = verdict.exact
        if verdict.reference_run:
            tags[TAG_EXACT_REFERENCE] = verdict.reference_run
    return tags
