import ast
import subprocess
import sys

from mlops.core.environment import PROJECT_ROOT
from mlops.core.usecase import discover_usecases


def test_definitions_load_without_deprecation_warnings(tmp_path):
    # A fresh interpreter, so import-time warnings are seen, and turned into errors.
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning);"
        "import definitions; d = definitions.defs;"
        "g = d.resolve_asset_graph();"
        "print(sorted({g.get(k).group_name for k in g.get_all_asset_keys()}));"
        "print(d.resolve_job_def('churn_pipeline').name)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
        env={"MLOPS_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # churn's groups, and one group per use case declared under the project's usecases/ (e.g. fraud)
    groups = ast.literal_eval(proc.stdout.splitlines()[-2])
    declared = set(discover_usecases([PROJECT_ROOT / "usecases"]))
    assert set(groups) == {"deployment", "features", "ingestion", "monitoring", "reports", "training"} | declared
    assert "churn_pipeline" in proc.stdout
    # Loading definitions writes nothing.
    assert not (tmp_path / "home").exists()


def test_every_stage_is_in_the_asset_graph():
    from definitions import build_definitions

    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"raw_accounts", "raw_usage_events", "raw_billing_events", "raw_support_tickets", "raw_churn_events",
            "account_features", "churn_training_set", "online_feature_snapshot", "churn_model",
            "churn_model_aliases"} <= keys
    checks = {k.name for k in graph.asset_check_keys}
    assert {"roc_auc_gate", "calibration_gate", "fairness_gate", "latency_gate", "model_size_gate",
            "training_data_integrity", "no_training_serving_skew", "inbox_files_accepted"} <= checks
    # Every per-tenant asset is partitioned by the dynamic tenant partitions.
    assert all(graph.get(k).partitions_def is not None for k in graph.get_all_asset_keys())


CI_MARKERS = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "JENKINS_URL", "TRAVIS",
              "TF_BUILD", "BUILDKITE", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "TEAMCITY_VERSION")


def test_a_build_opens_no_connection_off_the_machine(tmp_path):
    """`mlops add-tenant` and `mlops build` for a tiny tenant (both use cases: data, features,
    training, MLflow registry, gates, notebooks, publication) run under a socket guard over the whole
    process tree, with none of the telemetry variables set by the caller: the project must switch
    every library's usage reporting off itself. Any off-machine connect or name lookup is recorded
    and refused; the record must hold none. The control proves the guard catches one (and without
    the project's switches, this build's MLflow asks config.mlflow-telemetry.io: the guard records it)."""
    from mlops.core.environment import TELEMETRY_OFF
    from tests.socket_guard import control_run, guarded_env, read_record

    loaded, caught, out = control_run(tmp_path / "control")
    assert len(loaded) == 2, "the guard must be loaded in a guarded process and in its child"
    assert [(a["call"], a["target"]) for a in caught] == [
        ("connect_ex", "('203.0.113.1', 443)"), ("create_connection", "('telemetry.example.com', 80)")], caught
    assert "refused" in out and "loopback ok" in out

    env, record = guarded_env(tmp_path / "build")
    # Nothing set by the caller: no telemetry switch, and none of the variables by which a library
    # (MLflow) turns its telemetry off on its own in a test or CI run, as on a customer's machine.
    for key in (*TELEMETRY_OFF, *CI_MARKERS, "MLOPS_HOME", "DAGSTER_HOME", "BENTOML_HOME", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    home = tmp_path / "home"
    for args in (["add-tenant", "tiny", "--accounts", "400", "--days", "120", "--seed", "3"],
                 ["build", "--tenant", "tiny"]):
        proc = subprocess.run([sys.executable, "-m", "mlops.cli", "--home", str(home), *args], cwd=PROJECT_ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"mlops {args[0]}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "churn-tiny: champion=1" in proc.stdout and "fraud-tiny: champion=1" in proc.stdout, proc.stdout
    loaded, attempts = read_record(record)
    assert len(loaded) >= 2, "the guard was not loaded in the build's processes"
    assert attempts == [], f"a build tried to reach off the machine: {attempts}"


def test_the_closed_loop_is_wired_and_on_by_default():
    import dagster as dg

    from definitions import build_definitions

    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"prediction_log", "model_monitoring", "operational_metrics", "shadow_comparison",
            "champion_promotion", "delivery_kpis"} <= keys
    assert "promotion_gate" in {k.name for k in graph.asset_check_keys}
    for name in ("churn_pipeline", "churn_retrain", "daily_cycle", "prediction_log_ingestion"):
        defs.resolve_job_def(name)
    sensors = {s.name: s for s in defs.sensors}
    assert {"decay_retrain_sensor", "service_health_sensor", "tenant_catalog_sensor"} <= set(sensors)
    assert all(s.default_status == dg.DefaultSensorStatus.RUNNING for s in sensors.values())
    # The decay trigger is an asset sensor on the monitoring asset (the UI shows it there).
    decay = defs.resolve_sensor_def("decay_retrain_sensor")
    assert isinstance(decay, dg.AssetSensorDefinition)
    assert decay.asset_key == dg.AssetKey("model_monitoring") and decay.job_name == "churn_retrain"
    assert graph.get(decay.asset_key).partitions_def.name == "tenant"
    schedules = {s.name: s for s in defs.schedules}
    assert schedules["weekly_retrain_schedule"].job_name == "churn_retrain"
    assert schedules["weekly_retrain_schedule"].default_status == dg.DefaultScheduleStatus.RUNNING
    assert schedules["daily_cycle_schedule"].job_name == "daily_cycle"


def test_a_platform_written_instance_config_follows_the_platform_and_an_edited_one_is_kept(tmp_path):
    """An existing home gains what the platform's dagster.yaml adds (run monitoring, retries); a
    dagster.yaml a person wrote is never overwritten."""
    from resources.settings import DAGSTER_YAML, PlatformSettings

    settings = PlatformSettings(home=str(tmp_path))
    settings.ensure_home()
    config = tmp_path / "dagster" / "dagster.yaml"
    older = DAGSTER_YAML.split("run_monitoring:")[0]
    assert older != DAGSTER_YAML
    config.write_text(older)
    settings.ensure_home()
    assert config.read_text() == DAGSTER_YAML
    edited = "# my instance\ntelemetry:\n  enabled: false\n"
    config.write_text(edited)
    settings.ensure_home()
    assert config.read_text() == edited
