"""The report notebooks: executed through their Dagster assets on the small test home, rendered to
HTML, failing with the failing cell's error, runnable by hand with papermill, committed without
outputs."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from assets.reports import eda_report, model_report
from resources.feature_store import FEATURE_COLUMNS
from resources.notebooks import NOTEBOOKS_DIR, NotebookExecutionError, NotebookRunner, kernel_interpreter
from resources.registry import CHALLENGER, CHAMPION
from resources.schemas import SEGMENTS
from resources.settings import PROJECT_ROOT
from tests.conftest import TEST_TENANT

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


# --- helpers --------------------------------------------------------------------------------------
def report_resources(defs, **runner):
    r = defs.resources
    return {"settings": r["settings"], "registry": r["registry"],
            "notebooks": NotebookRunner(settings=r["settings"], **runner)}


def outputs(path: Path) -> list[dict]:
    nb = nbformat.read(path, as_version=4)
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def images(path: Path) -> int:
    return sum("image/png" in out.get("data", {}) for out in outputs(path))


def html_tables(path: Path) -> list[str]:
    return [out["data"]["text/html"] for out in outputs(path)
            if "<table" in out.get("data", {}).get("text/html", "")]


def text_of(path: Path) -> str:
    return "\n".join(out.get("text", "") for out in outputs(path) if out["output_type"] == "stream")


def errors(path: Path) -> list[str]:
    return [f"{out['ename']}: {out['evalue']}" for out in outputs(path) if out["output_type"] == "error"]


def table_with(path: Path, *needles: str) -> str:
    found = [t for t in html_tables(path) if all(n in t for n in needles)]
    assert found, f"no table in {path.name} with {needles}"
    return found[0]


def failing_notebook(folder: Path, name: str) -> Path:
    params = new_code_cell('tenant = ""\nmlops_home = ""')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[
        new_markdown_cell("# a report that breaks"),
        params,
        new_code_cell("x = 1"),
        new_code_cell('# the broken step\nraise ValueError("boom")'),
        new_code_cell('print("never reached")'),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


# --- executed through the assets -------------------------------------------------------------------
@pytest.fixture(scope="module")
def reports(platform_home):
    with platform_home["instance"]() as instance:
        result = dg.materialize([eda_report, model_report], resources=report_resources(platform_home["defs"]),
                                instance=instance, partition_key=TEST_TENANT.name, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    metadata = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        assert materialization.partition == TEST_TENANT.name
        metadata[event.asset_key.to_user_string()] = {k: v.value for k, v in materialization.metadata.items()}
    assert set(metadata) == {"eda_report", "model_report"}
    return metadata


def _check_paths(platform_home, meta: dict, name: str) -> tuple[Path, Path]:
    notebook, html = Path(meta["notebook"]), Path(meta["html"])
    folder = Path(platform_home["home"]).resolve() / "reports" / TEST_TENANT.name
    assert notebook.parent == folder and html.parent == folder
    assert re.fullmatch(rf"{name}-\d{{8}}T\d{{6}}Z(-\d+)?\.ipynb", notebook.name), notebook.name
    assert html == notebook.with_suffix(".html")
    assert notebook.is_file() and html.is_file()
    assert errors(notebook) == []
    return notebook, html


@pytest.mark.slow
def test_eda_report_has_distributions_churn_over_time_and_missing_values(platform_home, reports):
    meta = reports["eda_report"]
    notebook, html_path = _check_paths(platform_home, meta, "eda")
    nb = nbformat.read(notebook, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and f'tenant = "{TEST_TENANT.name}"' in injected[0].source

    # churn rate over time, features per segment, features per outcome, categorical mix
    assert images(notebook) >= 4 and meta["figures"] == images(notebook)
    missing = table_with(notebook, "Missing values per column", "missing_share")
    assert all(col in missing for col in FEATURE_COLUMNS)
    per_segment = table_with(notebook, "mean per segment")
    assert all(seg in per_segment for seg in SEGMENTS) and "seat_utilisation_7d" in per_segment
    table_with(notebook, "churn rate by segment")
    assert meta["training_rows"] > 1000 and 0 < meta["churn_rate"] < 0.2
    assert meta["columns_with_missing_values"] == 0

    html = html_path.read_text()
    assert html.count("data:image/png;base64") >= 4
    assert "Missing values per column" in html and "Churn rate over time" in html
    assert all(seg in html for seg in SEGMENTS)
    assert not re.search(r'<script[^>]+src="https?://', html), "the report must open without the network"


@pytest.mark.slow
def test_model_report_has_curves_confusion_matrix_explanations_and_fairness(platform_home, reports):
    meta = reports["model_report"]
    notebook, html_path = _check_paths(platform_home, meta, "model_report")
    registry = platform_home["defs"].resources["registry"]
    champion = str(registry.alias_version(TEST_TENANT.name, CHAMPION).version)
    # The asset reports the challenger; in the test home it is also the champion.
    assert meta["model_version"] == str(registry.alias_version(TEST_TENANT.name, CHALLENGER).version)
    assert meta["champion_version"] == champion and meta["is_champion"] is True
    assert 0.75 <= meta["roc_auc"] <= 0.95 and meta["threshold"] == 0.3

    # ROC+PR, calibration, confusion matrix, importance, explanations
    assert images(notebook) >= 5 and meta["figures"] == images(notebook)
    confusion = table_with(notebook, "confusion matrix at threshold 0.3")
    assert all(label in confusion for label in
               ("actual: retained", "actual: churned", "predicted: retained", "predicted: churned"))
    fairness = table_with(notebook, "Fairness by segment", "roc_auc", "evaluated")
    assert all(seg in fairness for seg in SEGMENTS)
    table_with(notebook, "Feature importance", "mean_abs_shap", "seat_utilisation_7d")
    explanations = table_with(notebook, "Per-prediction explanations (SHAP)", "reason 1")
    assert explanations.count(f"{TEST_TENANT.name}-") >= 2
    assert "is the current champion" in json.dumps([o.get("data", {}) for o in outputs(notebook)])
    # The kernel ran this environment's interpreter.
    assert f"at {sys.executable};" in text_of(notebook)

    html = html_path.read_text()
    assert html.count("data:image/png;base64") >= 5
    for needle in ("Fairness by segment", "predicted: churned", "Per-prediction explanations (SHAP)", *SEGMENTS):
        assert needle in html, needle
    assert not re.search(r'<script[^>]+src="https?://', html)


# --- failures ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_failing_cell_raises_with_the_cell_and_the_error(platform_home, tmp_path):
    failing_notebook(tmp_path, "broken")
    runner = NotebookRunner(settings=platform_home["defs"].resources["settings"], notebooks_dir=str(tmp_path))
    with pytest.raises(NotebookExecutionError) as info:
        runner.run("broken", TEST_TENANT.name)
    err = info.value
    assert (err.cell_index, err.ename, err.evalue) == (3, "ValueError", "boom")
    message = str(err)
    assert "cell 3" in message and "# the broken step" in message and "ValueError: boom" in message
    assert 'raise ValueError("boom")' in err.cell_source
    assert err.output_path.is_file() and err.html_path is not None and err.html_path.is_file()
    assert errors(err.output_path) == ["ValueError: boom"]
    assert "never reached" not in text_of(err.output_path)


@pytest.mark.slow
def test_a_failing_cell_fails_the_asset_run(platform_home, tmp_path):
    failing_notebook(tmp_path, "eda")  # stands in for notebooks/eda.ipynb
    with platform_home["instance"]() as instance:
        result = dg.materialize([eda_report], instance=instance, partition_key=TEST_TENANT.name,
                                resources=report_resources(platform_home["defs"], notebooks_dir=str(tmp_path)),
                                raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    text = failure.step_failure_data.error.to_string()
    assert "NotebookExecutionError" in text
    assert "failed in cell 3" in text and "ValueError: boom" in text and "# the broken step" in text


# --- by hand -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_papermill_by_hand_compares_a_new_version_with_the_champion(platform_home, tmp_path):
    """`papermill notebooks/model_report.ipynb out.ipynb -p tenant .. -p mlops_home ..` on a copy of the
    home in which a second version (the same model) is registered as challenger."""
    home = Path(platform_home["home"])
    copy = tmp_path / "home"
    shutil.copytree(home, copy, ignore=shutil.ignore_patterns("dagster", "reports", "serving"))
    from definitions import build_definitions

    try:
        resources = build_definitions(str(copy)).resources
        registry = resources["registry"]
        champion = registry.version(TEST_TENANT.name, registry.alias_version(TEST_TENANT.name, CHAMPION).version)
        # The copy's registry points at the session home's artifacts: the new version reuses them.
        second = registry.client.create_model_version(champion.name, source=champion.source, run_id=champion.run_id)
        registry.set_alias(TEST_TENANT.name, CHALLENGER, second.version)
        with resources["warehouse"].transaction(TEST_TENANT.name) as con:
            con.execute("INSERT INTO model_holdout_scores SELECT * REPLACE (CAST(? AS VARCHAR) AS model_version) "
                        "FROM model_holdout_scores WHERE model_version = ?", [second.version, champion.version])
    finally:
        build_definitions(str(home))  # point this process back at the session home

    out = tmp_path / "out.ipynb"
    env = {k: v for k, v in os.environ.items() if k not in {"MLOPS_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI"}}
    proc = subprocess.run(
        [sys.executable, "-m", "papermill", "notebooks/model_report.ipynb", str(out), "-p", "tenant",
         TEST_TENANT.name, "-p", "mlops_home", str(copy), "-p", "model_version", str(second.version),
         "-p", "threshold", "0.2", "--no-progress-bar"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert errors(out) == []
    comparison = table_with(out, f"v{second.version} against the champion v{champion.version} on the same holdout")
    assert "roc_auc" in comparison and "difference" in comparison
    table_with(out, "confusion matrix at threshold 0.2")
    assert images(out) >= 6  # the five figures of the report and the ROC comparison
    summary = next(o["data"]["application/json"] for o in outputs(out) if "application/json" in o.get("data", {}))
    assert summary["model_version"] == str(second.version) and summary["is_champion"] is False
    assert summary["champion_roc_auc"] == pytest.approx(summary["roc_auc"])  # the same model, registered twice


# --- static --------------------------------------------------------------------------------------
def test_kernel_runs_this_interpreter():
    assert kernel_interpreter("python3") == sys.executable


def test_notebooks_are_committed_without_outputs_and_are_parametrised():
    assert {p.name for p in NOTEBOOKS} >= {"eda.ipynb", "model_report.ipynb"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        for cell in code:
            assert cell.outputs == [], f"{path.name}: a cell has outputs"
            assert cell.execution_count is None, f"{path.name}: a cell has an execution count"
        params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        for name in ("tenant", "mlops_home"):
            assert re.search(rf"^{name} = ", params[0].source, re.M), f"{path.name}: parameter {name} missing"
        source = "\n".join(c.source for c in code)
        statements = re.sub(r"(^|  )#.*$", "", source, flags=re.M)  # comments may name the defaults
        # Reads through the platform's resources only: no own connections, SQL of features or paths.
        assert "build_definitions(mlops_home" in source, path.name
        for forbidden in ("duckdb.connect", "mlflow.", "sqlite", ".mlops", "/tmp/", "/home/", "FEATURE_VIEW_SQL"):
            assert forbidden not in statements, f"{path.name} uses {forbidden!r}"
    report = nbformat.read(NOTEBOOKS_DIR / "model_report.ipynb", as_version=4)
    params = next(c for c in report.cells if "parameters" in c.metadata.get("tags", []))
    assert re.search(r'^model_version = ""', params.source, re.M) and re.search(r"^threshold = ", params.source, re.M)
