"""The notebooks in analysis/: committed without outputs, their code only calls the package,
and each runs to its end in a real Jupyter kernel (nbclient, this venv's python) on a real
store: on one without job runs every measured figure says why it is not drawn and which
sweep draws it; on the small store of real jobs (report_store.py) each figure with data is
drawn, and each without says so, as gemini-report says it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import pytest
from report_store import JobStore, log_simulation, sim_tables

from gemini.analysis import (
    FIGURES,
    effective_time_data,
    open_store,
    show,
    simulation_of,
    store_uri,
)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = {p.stem: p for p in sorted((REPO / "analysis").glob("*.ipynb"))}
KERNEL = "python3"
"""With ipykernel installed in the venv, this kernel runs the venv's own python."""

MEASURED = {
    "overhead": {"fig7": "fig7", "fig8": "fig8", "fig12": "fig12", "fig16": "fig16"},
    "recovery": {"fig10": "fig10", "fig14": "fig14", "backends": "backends_under_failure"},
}
"""Notebook -> cell id -> the figure that cell shows, drawn from the store's job runs."""
COMPUTED = {"fig9": "fig9", "fig9-sim": "fig9", "fig11": "fig11", "fig15": "fig15"}
"""placement_simulation's cells that compute their figure in the notebook: drawn on any store."""
LOGGED = {"logged-fig9": "fig9", "logged-fig11": "fig11", "logged-fig15": "fig15"}
"""placement_simulation's cells that draw the store's newest simulation run."""


def read(path: Path) -> Any:
    import nbformat

    return nbformat.read(path, as_version=4)


def execute(name: str, cwd: Path) -> dict[str, Any]:
    """Run notebook ``name`` top to bottom in a fresh kernel; its cells by id (a cell that
    raises fails the test with the cell and the traceback)."""
    from nbclient import NotebookClient

    nb = read(NOTEBOOKS[name])
    client = NotebookClient(
        nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    for cell in nb.cells:
        errors = [o["text"] for o in cell.get("outputs", []) if o.get("name") == "stderr"]
        assert errors == [], f"{name}, cell {cell.id} wrote to stderr: {errors}"
    return {cell.id: cell for cell in nb.cells}


def images(cell: Any) -> int:
    return sum(1 for o in cell.get("outputs", []) if "image/png" in o.get("data", {}))


def text(cell: Any) -> str:
    return "".join(
        o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream"
    )


def assert_not_drawn(cell: Any, figure: str) -> None:
    spec = FIGURES[figure]
    assert images(cell) == 0, cell.source
    assert f"not drawn: {spec.title}: " in text(cell), text(cell)
    assert f"; run `{spec.command}`" in text(cell), text(cell)


# -- as committed -------------------------------------------------------------------


def test_there_is_one_notebook_per_area() -> None:
    assert set(NOTEBOOKS) == {"overhead", "recovery", "placement_simulation"}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_a_notebook_is_committed_without_outputs_and_reads_the_store_from_its_first_cell(
    name: str,
) -> None:
    nb = read(NOTEBOOKS[name])
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs"
    first = code[0]
    assert first.id == "parameters" and "parameters" in first.metadata.get("tags", [])
    assert "URI = store_uri()" in first.source
    assert nb.metadata.kernelspec.name == KERNEL


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_a_notebooks_code_only_calls_the_package(name: str) -> None:
    """No logic only in a notebook: no function, class, loop or branch of its own, and
    nothing imported but gemini's own modules."""
    for cell in read(NOTEBOOKS[name]).cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            assert not isinstance(
                node,
                ast.FunctionDef | ast.ClassDef | ast.Lambda | ast.For | ast.While | ast.If,
            ), f"{name}, cell {cell.id}: move {type(node).__name__} into gemini.analysis"
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").startswith("gemini."), f"{name}, cell {cell.id}"
            assert not isinstance(node, ast.Import), f"{name}, cell {cell.id}"


# -- the functions the notebooks call ----------------------------------------------------


def test_the_store_is_the_env_uri_else_the_one_gemini_writes_to(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("GEMINI_TRACKING_URI", raising=False)
    monkeypatch.setenv("GEMINI_OUTPUTS", str(tmp_path))
    assert store_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("GEMINI_TRACKING_URI", "http://127.0.0.1:5000/")
    assert store_uri() == "http://127.0.0.1:5000"


def test_a_missing_store_is_one_line_and_every_figure_says_why_it_is_not_drawn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    store = open_store(uri)
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith(f"{uri}: no store at {tmp_path / 'none' / 'mlflow.db'} ")
    assert line.endswith("; run a sweep first (e.g. gemini -m +sweep=backends_under_failure)")
    assert not (tmp_path / "none").exists(), "nothing created"
    assert show("fig7", store) is None
    assert show("fig15", store.simulation) is None
    out = capsys.readouterr().out
    assert "not drawn: Fig. 7: iteration time with and without checkpoints: no run of sweep" in out
    assert "run `gemini -m +sweep=fig7_overhead`" in out
    assert "not drawn: Fig. 15: effective training time at scale: no simulation run" in out


def test_tables_simulated_in_a_notebook_draw_as_simulated_on_this_machine() -> None:
    from gemini.simulate import SimulateConfig, simulate

    sim = simulation_of(simulate(SimulateConfig(nodes=[16, 32], figures=["fig15"])))
    assert set(sim.tables) == {"fig15"}, "a figure not computed has no table"
    data = effective_time_data(sim)
    assert data.attrs["kind"] == "simulated"
    assert data.attrs["how"] == "computed in this session by gemini.simulate"
    assert show("fig11", sim) is None
    with pytest.raises(ValueError, match=r"'fig7' is measured"):
        show("fig7", sim)


def test_the_kernel_is_this_venvs_python() -> None:
    from jupyter_client.manager import KernelManager

    cmd = KernelManager(kernel_name=KERNEL).format_kernel_cmd()
    assert Path(cmd[0]) == Path(sys.executable), "pip install -e '.[dev]' installs ipykernel"


# -- executed in a kernel ----------------------------------------------------------------


def test_a_figure_a_user_draws_in_a_kernel_shows_inline(tmp_path: Path) -> None:
    """The figure style keeps a kernel's inline backend (elsewhere it draws to files only)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import matplotlib\n"
            "from gemini.analysis import fig_recovery_probability\n"
            "fig_recovery_probability()\n"
            "print(matplotlib.get_backend())"
        )
    ]
    NotebookClient(
        nb, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert images(nb.cells[0]) >= 1
    assert "inline" in text(nb.cells[0])


@pytest.fixture(scope="module")
def sim_only_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store without job runs, with a simulation run logged as the simulator logs one."""
    root = tmp_path_factory.mktemp("sim-only")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    log_simulation(uri, sim_tables(), root)
    return uri


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_a_notebook_runs_to_its_end_on_a_store_without_job_runs(
    name: str, sim_only_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_TRACKING_URI", sim_only_store)
    cells = execute(name, tmp_path)
    assert f"0 job runs in experiment 'gemini' of {sim_only_store}" in text(cells["store"])
    for cell_id, figure in MEASURED.get(name, {}).items():
        assert_not_drawn(cells[cell_id], figure)
    if name == "placement_simulation":
        for cell_id in (*COMPUTED, *LOGGED):
            assert images(cells[cell_id]) == 1, cell_id
    assert list(tmp_path.iterdir()) == [], "a notebook writes nothing"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_a_notebook_draws_the_figures_a_store_of_real_jobs_has_data_for(
    name: str, job_store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default store, as `gemini` resolves it: the jobs' GEMINI_OUTPUTS.
    monkeypatch.delenv("GEMINI_TRACKING_URI", raising=False)
    monkeypatch.setenv("GEMINI_OUTPUTS", str(job_store.root))
    cells = execute(name, tmp_path)
    assert f"3 job runs in experiment 'gemini' of {job_store.uri}" in text(cells["store"])
    # No idle-span profile in these jobs: Fig. 8 must say so (as in test_report.py).
    # One replication schedule is no ablation: nor is Fig. 16 drawn.
    drawn = {"fig7", "fig12", "fig10", "fig14", "backends"}
    for cell_id, figure in MEASURED.get(name, {}).items():
        if cell_id in drawn:
            assert images(cells[cell_id]) == 1, f"{cell_id}: {text(cells[cell_id])}"
            assert "text/html" in cells[cell_id].outputs[-1]["data"], "a table under it"
        else:
            assert_not_drawn(cells[cell_id], figure)
    if name == "placement_simulation":
        for cell_id in (*COMPUTED, *LOGGED):
            assert images(cells[cell_id]) == 1, cell_id
    assert list(tmp_path.iterdir()) == [], "a notebook writes nothing"
