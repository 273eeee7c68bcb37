"""``make mlflow-server``'s app: MLflow's server, its page opening the training view.

The page MLflow serves is the real one (its Flask app, through the test client);
the browser check of what a person then sees is in test_multirun_table.py.
"""

from __future__ import annotations

from gemini.mlflow_app import DEFAULT_TO_TRAINING, patch_index, with_training_default


def test_the_default_goes_before_the_uis_first_script_and_only_once() -> None:
    page = "<html><head><title>MLflow</title><script src=a.js></script></head></html>"
    once = with_training_default(page)
    assert once.index(DEFAULT_TO_TRAINING) < once.index("<script src=a.js>")
    assert with_training_default(once) == once
    assert with_training_default("no html here") == "no html here"


def test_the_script_sets_the_switch_only_where_the_browser_has_no_choice() -> None:
    assert 'localStorage.getItem("mlflow.workflowType_v1")===null' in DEFAULT_TO_TRAINING
    assert '"\\"machine_learning\\""' in DEFAULT_TO_TRAINING


def test_mlflows_index_page_is_served_with_the_default_and_its_other_files_unchanged() -> None:
    from mlflow.server import app as flask_app

    patch_index(flask_app)
    patch_index(flask_app)  # idempotent: one wrapper, one script
    client = flask_app.test_client()
    page = client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert html.count(DEFAULT_TO_TRAINING) == 1
    # Before every script of the UI: it runs before the UI reads the switch.
    assert html.index("<script") == html.index(DEFAULT_TO_TRAINING)
    assert int(page.headers["Content-Length"]) == len(page.get_data())
    # The UI's scripts and styles are served as MLflow serves them.
    asset = html.split('src="', 1)[1].split('"', 1)[0].lstrip("/")
    assert asset.startswith("static-files/")
    served = client.get("/" + asset)
    assert served.status_code == 200
    assert DEFAULT_TO_TRAINING.encode() not in served.get_data()
