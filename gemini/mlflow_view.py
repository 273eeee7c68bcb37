"""How MLflow's UI opens gemini's experiment: the training runs table, key metrics as columns.

MLflow 3's UI opens an experiment in its GenAI view (traces, sessions,
judges) unless told otherwise. What decides it, as the 3.17 UI reads it
(its bundle, ``mlflow/server/js/build``):

* the sidebar's "GenAI / Model training" switch: kept per browser (local
  storage, GenAI until the user flips it), and overridden by the page URL's
  ``workflowType=machine_learning``. This is what chooses the view in 3.17;
  a server cannot set it for a browser.
* the experiment tag ``mlflow.experimentKind``: ``custom_model_development``
  marks a model-training experiment. Without the tag the UI asks the user to
  choose a type; the 3.17 bundle reads it for the view only where the switch
  above is turned off.
* saved views: an experiment tag ``mlflow.sharedViewState.<id>`` holds a
  runs-table state (columns, sort, grouping; not which runs are expanded)
  that the URL's ``viewStateShareKey=<id>`` opens; it is also listed under
  "Views".

``make mlflow-server`` runs MLflow's server as :mod:`gemini.mlflow_app`, whose page
sets that switch to model training where the browser has not chosen yet.

So every experiment gemini records into is tagged as a training experiment
and given a saved view: the key metrics as columns, runs grouped by their
``sweep`` tag (a sweep's jobs show together, without a click on their parent
run). The link gemini prints (:func:`experiment_url`) opens the runs table in
that view.
"""

from __future__ import annotations

import json
import time
from typing import Any

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_ID = "gemini-key-metrics"
VIEW_NAME = "gemini: key metrics"
VIEW_TAG = VIEW_TAG_PREFIX + VIEW_ID
UI_DEFAULT = "http://127.0.0.1:5000"
"""Where ``mlflow ui`` serves when given no ``--host``/``--port``."""

KEY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("tags", "sweep"),
    ("tags", "backend"),
    ("tags", "failure_schedule"),
    ("tags", "model"),
    ("metrics", "run/iter_time_s"),
    ("metrics", "run/checkpoints_per_hour"),
    ("metrics", "run/mean_recovery_s"),
    ("metrics", "run/mean_wasted_s"),
    ("metrics", "run/mean_lost_steps"),
    ("tags", "gemini.exact"),
    ("tags", "outcome"),
)
"""The view's columns, as (kind, name): the run tags and ``run/*`` metrics a sweep compares."""


def column_key(kind: str, name: str) -> str:
    """The runs table's key of a column (``metrics.`run/iter_time_s```)."""
    return f"{kind}.`{name}`"


def view_state() -> dict[str, Any]:
    """The runs table's state the view opens: key columns, newest first, grouped by sweep."""
    return {
        "selectedColumns": [column_key(k, n) for k, n in KEY_COLUMNS],
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "groupBy": {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": "tag", "groupByData": "sweep"}],
        },
    }


def view_tag_value() -> str:
    """The saved view's tag value: the envelope the UI reads, its state as a JSON string."""
    now = int(time.time() * 1000)
    return json.dumps(
        {"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(view_state())}
    )


def missing_tags(existing: dict[str, str]) -> dict[str, str]:
    """The experiment tags to set: the training kind and the view, where not already there.

    A kind someone chose (in the UI or by hand) is left as it is.
    """
    out = {}
    if EXPERIMENT_KIND_TAG not in existing:
        out[EXPERIMENT_KIND_TAG] = TRAINING_KIND
    if VIEW_TAG not in existing:
        out[VIEW_TAG] = view_tag_value()
    return out


def ui_base(uri: str) -> str:
    """The UI's address for a tracking URI: a server is its own; a store, ``mlflow ui``'s."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_DEFAULT


def experiment_url(uri: str, experiment_id: str) -> str:
    """The page that opens the experiment's training runs in the key-metrics view."""
    return (
        f"{ui_base(uri)}/#/experiments/{experiment_id}/runs"
        f"?workflowType=machine_learning&viewStateShareKey={VIEW_ID}"
    )
