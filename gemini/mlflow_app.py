"""The app ``make mlflow-server`` runs: MLflow's own server, opening experiments in the
model-training view.

MLflow 3's UI keeps its "GenAI / Model training" switch per browser (local storage
key ``mlflow.workflowType_v1``, GenAI until the user flips it), and no experiment
tag changes that (see :mod:`gemini.mlflow_view`). This app is MLflow's server
with one change: the page it serves first sets that switch to model training
where the browser has no choice stored yet. A choice the user makes stays theirs.
It is registered as MLflow's ``mlflow.app`` entry point ``gemini``, so that
``mlflow server --app-name gemini`` runs it (:mod:`gemini.tracking_server` does).
"""

from __future__ import annotations

import json
from typing import Any

WORKFLOW_KEY = "mlflow.workflowType_v1"
"""The UI's local-storage key of the switch (its ``key`` and ``version`` joined)."""
TRAINING = "machine_learning"

_KEY, _VALUE = json.dumps(WORKFLOW_KEY), json.dumps(json.dumps(TRAINING))
DEFAULT_TO_TRAINING = (
    f"<script>try{{if(localStorage.getItem({_KEY})===null)"
    f"{{localStorage.setItem({_KEY},{_VALUE})}}}}catch(e){{}}</script>"
)
"""Run before the UI's own scripts: the training view where nothing was chosen."""


def with_training_default(html: str) -> str:
    """``html`` (the UI's index page) with :data:`DEFAULT_TO_TRAINING` before its
    first script; unchanged if it is already there."""
    if DEFAULT_TO_TRAINING in html:
        return html
    at = html.find("<script")
    if at < 0:
        at = html.find("</head>")
    if at < 0:
        return html
    return html[:at] + DEFAULT_TO_TRAINING + html[at:]


def patch_index(flask_app: Any) -> None:
    """Serve MLflow's index page with :func:`with_training_default` applied."""
    serve = flask_app.view_functions["serve"]
    if getattr(serve, "training_default", False):
        return

    def serve_training_first() -> Any:
        response = serve()
        if getattr(response, "status_code", None) == 200 and response.mimetype == "text/html":
            # send_from_directory streams the file: read it to rewrite it.
            response.direct_passthrough = False
            response.set_data(with_training_default(response.get_data(as_text=True)))
        return response

    serve_training_first.training_default = True  # type: ignore[attr-defined]
    flask_app.view_functions["serve"] = serve_training_first


def create_app() -> Any:
    """MLflow's ASGI app, its index page patched (the factory ``--app-name`` runs)."""
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import create_fastapi_app

    patch_index(flask_app)
    return create_fastapi_app(flask_app)
