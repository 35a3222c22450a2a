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
import duckdb
import nbformat
import numpy as np
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from assets.reports import drift_report, eda_report, model_report
from mlops.core import modeling
from mlops.core.environment import PROJECT_ROOT
from mlops.core.monitoring import (
    TIMESTAMP,
    TenantMonitor,
    read_monitoring_alerts,
    read_monitoring_results,
    reference_frame,
    store_report,
)
from mlops.core.names import CHALLENGER, CHAMPION
from mlops.replay import replay_tenant
from resources.feature_store import FEATURE_COLUMNS
from resources.notebooks import NOTEBOOKS_DIR, NotebookExecutionError, NotebookRunner, kernel_interpreter
from resources.schemas import SEGMENTS
from resources.tenants import TenantSpec
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


def figures_by_section(path: Path) -> dict[str, list[tuple[int, int, int]]]:
    """The figures of an executed notebook under each of its ``## `` section headings: per figure,
    the PNG's width, height and number of distinct colours (decoded from the output itself)."""
    import base64
    import io

    from PIL import Image

    found: dict[str, list[tuple[int, int, int]]] = {}
    section = ""
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            section = cell.source.splitlines()[0][3:].strip()
        for out in cell.get("outputs", []):
            if "image/png" in out.get("data", {}):
                image = Image.open(io.BytesIO(base64.b64decode(out["data"]["image/png"]))).convert("RGB")
                colours = image.getcolors(maxcolors=1 << 16)
                found.setdefault(section, []).append((*image.size, 1 << 16 if colours is None else len(colours)))
    return found


def assert_figures(path: Path, expected: dict[str, int]) -> None:
    """Each section of ``expected`` shows that many figures (at least), each a plausible size for the
    notebook's figsize at 80 dpi and drawn, not blank: a blank (or failed) figure has a colour or
    two, an axes with its text a few hundred (the report's flattest figure, the importance bars,
    261). Whether the right data was drawn is checked by the tables and numbers beside them."""
    found = figures_by_section(path)
    for section, count in expected.items():
        shown = found.get(section, [])
        assert len(shown) >= count, f"{path.name}: section {section!r} shows {len(shown)} figures, expected {count}"
        for width, height, colours in shown:
            assert 250 <= width <= 2000 and 180 <= height <= 3000, (section, width, height)
            assert colours >= 64, f"{path.name}: a figure of {section!r} is blank: {colours} colours"


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
def materialize_reports(platform_home, assets) -> dict[str, dict]:
    """Materialize report assets for the test tenant; the metadata of each, by asset name."""
    with platform_home["instance"]() as instance:
        result = dg.materialize(assets, resources=report_resources(platform_home["defs"]),
                                instance=instance, partition_key=TEST_TENANT.name, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    metadata = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        assert materialization.partition == TEST_TENANT.name
        metadata[event.asset_key.to_user_string()] = {k: v.value for k, v in materialization.metadata.items()}
    assert set(metadata) == {a.key.to_user_string() for a in assets}
    return metadata


@pytest.fixture(scope="module")
def reports(platform_home):
    return materialize_reports(platform_home, [eda_report, model_report])


# A small world whose heavy users start leaving for a competitor (concept drift) 5 days before the
# first monitored day: 38 daily chunks, the first 8 with matured labels. (The replay trains its own model
# at REPLAY_START, on a purged time split: about 120 days of history are needed for one.)
DRIFT_WORLD = TenantSpec(name=TEST_TENANT.name, region=TEST_TENANT.region, n_accounts=600, seed=TEST_TENANT.seed,
                         days=160, scenario="hard_concept_drift", drift_day=115)
REPLAY_START, REPLAY_END = 120, 158


@pytest.fixture(scope="module")
def monitored(platform_home):
    """Real NannyML results of the test home's champion, stored in its warehouse as model_monitoring
    stores them, without running the closed loop: the reference is the champion's holdout (as in
    production), the analysis a replay of ``DRIFT_WORLD`` scored by the champion, with a broken feed
    on the last day (events_7d missing, a fifth of the rows on a plan the model never saw)."""
    resources = platform_home["defs"].resources
    registry, warehouse = resources["registry"], resources["warehouse"]
    version = str(registry.alias_version(TEST_TENANT.name, CHAMPION).version)
    analysis = replay_tenant(DRIFT_WORLD, REPLAY_START, REPLAY_END).analysis_as_of(REPLAY_END)
    analysis["score"] = modeling.score(registry.load_booster(TEST_TENANT.name, version), analysis)
    last_day = analysis[TIMESTAMP] == analysis[TIMESTAMP].max()
    analysis.loc[last_day, "events_7d"] = np.nan
    analysis.loc[last_day & (np.arange(len(analysis)) % 5 == 0), "plan"] = "platinum"
    with warehouse.connect(TEST_TENANT.name, read_only=True) as con:
        reference = reference_frame(con, version)
    report = TenantMonitor(resources["monitoring_policy"], reference).run(analysis)
    with warehouse.transaction(TEST_TENANT.name) as con:
        stored = store_report(con, report, version, "seeded-by-test_notebooks")
    return {"version": version, "report": report, "results": stored}


@pytest.fixture(scope="module")
def drift(platform_home, monitored):
    return materialize_reports(platform_home, [drift_report])["drift_report"]


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
    assert_figures(notebook, {"Churn rate over time": 1, "Feature distributions per segment": 1,
                              "Feature distributions by outcome": 1, "Categorical features": 1})
    assert meta["figures"] == images(notebook) >= 4
    missing = table_with(notebook, "Missing values per column", "missing_share")
    assert all(col in missing for col in FEATURE_COLUMNS)
    per_segment = table_with(notebook, "mean per segment")
    assert all(seg in per_segment for seg in SEGMENTS) and "seat_utilisation_7d" in per_segment
    table_with(notebook, "churn rate by segment")
    assert meta["training_rows"] > 1000 and 0 < meta["churn_rate"] < 0.2
    assert meta["columns_with_missing_values"] == 0
    # the numbers the report states are the warehouse's
    with platform_home["defs"].resources["warehouse"].connect(TEST_TENANT.name, read_only=True) as con:
        rows, accounts, dates, rate = con.execute(
            "SELECT count(*), count(DISTINCT account_id), count(DISTINCT prediction_time), avg(churned) "
            "FROM churn_training_set").fetchone()
    assert (meta["training_rows"], meta["accounts"], meta["prediction_dates"]) == (rows, accounts, dates)
    assert meta["churn_rate"] == pytest.approx(rate, abs=1e-12)

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
    # The asset reports the challenger, or the champion when there is none (the session home's
    # aliases depend on which test modules ran before this one in its worker).
    reported = str((registry.alias_version(TEST_TENANT.name, CHALLENGER)
                    or registry.alias_version(TEST_TENANT.name, CHAMPION)).version)
    assert meta["model_version"] == reported
    assert meta["champion_version"] == champion and meta["is_champion"] is (reported == champion)
    assert 0.75 <= meta["roc_auc"] <= 0.95 and meta["threshold"] == 0.3

    # ROC+PR, calibration, confusion matrix, importance, explanations
    assert_figures(notebook, {"ROC and precision-recall curves": 1, "Calibration": 1,
                              "Confusion matrix at the threshold": 1, "Feature importance": 1,
                              "Individual predictions": 1})
    assert meta["figures"] == images(notebook) >= 5
    # the ROC AUC the report states is that of the version's holdout scores in the warehouse
    from sklearn.metrics import roc_auc_score

    with platform_home["defs"].resources["warehouse"].connect(TEST_TENANT.name, read_only=True) as con:
        holdout = con.execute("SELECT churned, score FROM model_holdout_scores WHERE model_version = ?",
                              [meta["model_version"]]).df()
    assert meta["holdout_rows"] == len(holdout) > 0
    assert meta["roc_auc"] == pytest.approx(roc_auc_score(holdout["churned"], holdout["score"]), abs=1e-6)
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


@pytest.mark.slow
def test_drift_report_has_drift_over_time_cbpe_against_realized_alerts_and_data_quality(platform_home, monitored, drift):
    meta, report, version = drift, monitored["report"], monitored["version"]
    notebook, html_path = _check_paths(platform_home, meta, "drift_report")
    nb = nbformat.read(notebook, as_version=4)
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert f'model_version = "{version}"' in injected.source  # the asset reports the champion
    results = monitored["results"]
    chunks = sorted(results["chunk_key"].unique())
    assert len(chunks) == REPLAY_END - REPLAY_START

    # The headline numbers are those monitoring stored.
    assert meta["model_version"] == version and meta["is_champion"] is True and meta["model_name"] == "churn-testco"
    assert meta["chunks"] == len(chunks) and (meta["first_chunk"], meta["last_chunk"]) == (chunks[0], chunks[-1])
    assert meta["alerts"] == len(report.alerts) > 0
    assert meta["decay_alerts"] == len(report.decay) >= 1
    assert meta["realized_roc_auc"] == pytest.approx(report.latest("realized_roc_auc"), abs=1e-6)
    assert meta["estimated_roc_auc"] == pytest.approx(report.latest("estimated_roc_auc"), abs=1e-6)
    assert meta["reference_roc_auc"] == pytest.approx(report.reference_roc_auc, abs=1e-6)
    # The concept drift: realized ROC AUC under the threshold while CBPE, blind to it, stays above.
    assert meta["realized_roc_auc"] < meta["roc_auc_threshold"] < meta["estimated_roc_auc"]
    assert meta["data_quality_alerts"] == 2  # events_7d missing, plan unseen, both on the last day
    assert meta["features_with_drift_alerts"] >= 1 and meta["multivariate_drift_alerts"] >= 1

    # Heatmap, small multiples, multivariate drift, CBPE against realized, data quality.
    assert_figures(notebook, {"Per-feature drift over time": 2, "Multivariate drift": 1,
                              "Estimated (CBPE) against realized ROC AUC": 1, "Data quality": 1})
    assert meta["figures"] == images(notebook) >= 5
    per_feature = table_with(notebook, "Univariate drift per feature", "jensen_shannon", "chi2", "alerting_chunks")
    assert all(feature in per_feature for feature in FEATURE_COLUMNS)
    per_chunk = table_with(notebook, "CBPE estimate against realized ROC AUC per chunk", "estimated_roc_auc",
                           "realized_roc_auc", "threshold")
    assert all(chunk in per_chunk for chunk in chunks)
    by_metric = table_with(notebook, "Alerts per metric")
    for metric in ("univariate_drift", "multivariate_drift", "estimated_roc_auc", "realized_roc_auc",
                   "missing_values_rate", "unseen_values_rate"):
        assert metric in by_metric, metric
    # The newest alerts: the broken feed of the last day among them.
    alerts = table_with(notebook, "newest chunks first", "lower_threshold", "upper_threshold")
    assert f"Alerts ({min(len(report.alerts), 50)} of {len(report.alerts)}, newest chunks first)" in alerts
    assert chunks[-1] in alerts and "missing_values_rate" in alerts and "unseen_values_rate" in alerts
    decay = table_with(notebook, "Decay alerts (retraining triggers)")
    assert report.decay[0]["metric"] in decay and report.decay[0]["chunk"] in decay
    quality = table_with(notebook, "Data quality per feature", "missing_values_rate", "unseen_values_rate")
    assert "events_7d" in quality and "plan" in quality and chunks[-1] in quality
    table_with(notebook, "monitoring coverage", "reference ROC AUC", "ROC AUC alert threshold")

    html = html_path.read_text()
    assert html.count("data:image/png;base64") >= 5
    for needle in ("Per-feature drift over time", "Multivariate drift", "Estimated (CBPE) against realized ROC AUC",
                   "Decay alerts (retraining triggers)", "Data quality per feature"):
        assert needle in html, needle
    assert not re.search(r'<script[^>]+src="https?://', html)


def test_monitoring_readers_before_monitoring_ran():
    with duckdb.connect() as con:  # a warehouse without monitoring tables
        results, alerts = read_monitoring_results(con), read_monitoring_alerts(con, "1")
    assert results.empty and {"metric", "feature", "chunk_key", "value", "upper_threshold", "alert"} <= set(results)
    assert alerts.empty and {"metric", "chunk_key", "value", "lower_threshold", "raised_at"} <= set(alerts)


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
    # the five figures of the report and the ROC comparison
    assert_figures(out, {"ROC and precision-recall curves": 1, "Calibration": 1, "Confusion matrix at the threshold": 1,
                         "Feature importance": 1, "Individual predictions": 1, "Comparison with the champion": 1})
    summary = next(o["data"]["application/json"] for o in outputs(out) if "application/json" in o.get("data", {}))
    assert summary["model_version"] == str(second.version) and summary["is_champion"] is False
    assert summary["champion_roc_auc"] == pytest.approx(summary["roc_auc"])  # the same model, registered twice


# --- static --------------------------------------------------------------------------------------
def test_kernel_runs_this_interpreter():
    assert kernel_interpreter("python3") == sys.executable


def test_notebooks_are_committed_without_outputs_and_are_parametrised():
    assert {p.name for p in NOTEBOOKS} >= {"eda.ipynb", "model_report.ipynb", "drift_report.ipynb"}
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
    drift = nbformat.read(NOTEBOOKS_DIR / "drift_report.ipynb", as_version=4)
    params = next(c for c in drift.cells if "parameters" in c.metadata.get("tags", []))
    assert re.search(r'^model_version = ""', params.source, re.M) and re.search(r"^last_chunks = 0", params.source, re.M)
