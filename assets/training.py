"""Training: a LightGBM churn model per tenant, tracked and registered in MLflow (dagster-mlflow)."""


import tempfile
from pathlib import Path

import dagster as dg
import mlflow

from mlops.core import modeling
from mlops.core.candidates import record_candidate
from mlops.core.hashing import content_hash
from mlops.core.loop import active_episode
from mlops.core.names import CHURN, registered_model_name
from mlops.core.pyfunc_model import log_churn_model, model_requirements
from mlops.core.retraining import retrain_for_episode
from resources.feature_store import FEATURE_COLUMNS, FEATURE_VIEW_VERSION, LABEL_HORIZON_DAYS
from resources.registry import runtime_tags
from resources.tenants import TENANT_PARTITIONS


@dg.asset(
    deps=["churn_training_set"],
    partitions_def=TENANT_PARTITIONS,
    group_name="training",
    kinds={"lightgbm", "mlflow"},
    # dagster-mlflow's resource is function-style, so this asset names its resources by key.
    required_resource_keys={"mlflow", "warehouse", "registry", "gates"},
)
def churn_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """LightGBM churn model trained on a time split, logged to MLflow and registered as
    ``churn-<tenant>``; the model version carries every lineage tag needed to reproduce it."""
    tenant = context.partition_key
    warehouse, registry = context.resources.warehouse, context.resources.registry
    mlf = context.resources.mlflow

    with warehouse.connect(tenant) as con:
        training = con.execute("SELECT * FROM churn_training_set ORDER BY prediction_time, account_id").df()
        episode = active_episode(con, CHURN)
        early = None
        if episode is not None and _table_exists(con, "churn_provisional_set"):
            early = con.execute("SELECT * FROM churn_provisional_set ORDER BY prediction_time, account_id").df()
    if training.empty:
        raise dg.Failure(f"tenant {tenant!r}: churn_training_set is empty; nothing to train on")
    dataset_version = content_hash(training)
    retrain = None
    if episode is None:
        split = modeling.time_split(training, embargo_days=LABEL_HORIZON_DAYS)
        booster = modeling.train_booster(split.train)
        holdout_scores = modeling.score(booster, split.holdout)
    else:
        # A decay episode: learn the changed concept from early labels and the change point.
        retrain = fit_churn_for_episode(training, early, episode.onset_estimate, who=f"tenant {tenant!r}",
                                        max_ece=context.resources.gates.max_expected_calibration_error)
        split, booster, holdout_scores = retrain.split, retrain.booster, retrain.holdout_scores
        context.log.info(f"{tenant}: episode {episode.episode} retrain chose {retrain.candidate.name!r}: "
                         f"{retrain.comparison}")
    y_holdout = split.holdout["churned"].to_numpy()
    metrics = modeling.evaluate(y_holdout, holdout_scores)
    importance = modeling.top_features(booster)
    roc_png, calibration_png = modeling.roc_and_calibration_png(y_holdout, holdout_scores, tenant)

    lineage = {
        "tenant": tenant,
        "use_case": CHURN,
        "dataset_version": dataset_version,
        "feature_view_version": FEATURE_VIEW_VERSION,
        **runtime_tags(),
        "dagster_run_id": context.run_id,
        "dagster_partition": tenant,
    }
    run_id = mlflow.active_run().info.run_id
    mlf.log_params({**modeling.LGBM_PARAMS, "num_boost_round": modeling.NUM_BOOST_ROUND,
                    "holdout_cutoff": str(split.cutoff.date()), "features": ",".join(FEATURE_COLUMNS),
                    **({"episode_training": retrain.candidate.name, "early_label_rows": retrain.early_rows,
                        "change_point": str(retrain.change_point)} if retrain is not None else {})})
    mlf.log_metrics({**metrics, "train_rows": len(split.train), "holdout_rows": len(split.holdout)})
    mlf.set_tags(lineage)
    with tempfile.TemporaryDirectory() as tmp:
        for name, png in (("roc.png", roc_png), ("calibration.png", calibration_png)):
            (Path(tmp) / name).write_bytes(png)
            mlf.log_artifact(str(Path(tmp) / name), artifact_path="plots")
        model_file = Path(tmp) / "model.txt"
        booster.save_model(str(model_file))
        model_bytes = model_file.stat().st_size
    # A pyfunc that scores stored feature rows on its own (signature, input example, the shared
    # encoding), with the LightGBM model text inside for the rest of the platform.
    info = log_churn_model(
        booster, split.train, registered_model_name=registered_model_name(tenant),
        # Stated, not inferred: MLflow's inference exports the whole uv lock on every run (~3 s).
        pip_requirements=model_requirements(),
    )
    version = str(info.registered_model_version)
    registry.tag_version(tenant, version, lineage | {"mlflow_run_id": run_id})
    mlflow.end_run()

    with warehouse.transaction(tenant) as con:
        record_candidate(con, version=version, mlflow_run_id=run_id, dagster_run_id=context.run_id,
                         dataset_version=dataset_version, feature_view_version=FEATURE_VIEW_VERSION,
                         holdout_cutoff=split.cutoff, model_bytes=model_bytes, metrics=metrics,
                         holdout=split.holdout.assign(score=holdout_scores))
    warehouse.audit(tenant, actor="training", action="model_trained", subject=f"{registered_model_name(tenant)}/{version}",
                    outcome="registered", details={**metrics, "mlflow_run_id": run_id, "dataset_version": dataset_version})

    return dg.MaterializeResult(
        metadata={
            "model_name": registered_model_name(tenant),
            "model_version": version,
            "mlflow_run_id": run_id,
            "dataset_version": dataset_version,
            "train_rows": dg.MetadataValue.int(len(split.train)),
            "holdout_rows": dg.MetadataValue.int(len(split.holdout)),
            "holdout_cutoff": str(split.cutoff.date()),
            "roc_auc": dg.MetadataValue.float(metrics["roc_auc"]),
            "pr_auc": dg.MetadataValue.float(metrics["pr_auc"]),
            "brier": dg.MetadataValue.float(metrics["brier"]),
            "expected_calibration_error": dg.MetadataValue.float(metrics["ece"]),
            "model_bytes": dg.MetadataValue.int(model_bytes),
            "top_features": dg.MetadataValue.md(importance.to_markdown(index=False, floatfmt=".3f")),
            "episode_training": dg.MetadataValue.json(retrain.summary() if retrain is not None else {}),
            "roc_curve": png_metadata(roc_png),
            "calibration_curve": png_metadata(calibration_png),
        }
    )


def fit_churn_for_episode(training, early, change_point, who: str, max_ece: float | None = None):
    """Churn's retrain in a decay episode (``mlops.core.retraining``) with churn's trainer and metric;
    a candidate over the calibration gate's ``max_ece`` is chosen only if every one is."""
    from sklearn.metrics import roc_auc_score

    def acceptable(y, scores) -> str | None:
        ece = modeling.expected_calibration_error(y, scores)
        return None if max_ece is None or ece <= max_ece else f"ECE {ece:.3f} > {max_ece}"

    return retrain_for_episode(
        training, early, change_point, horizon_days=LABEL_HORIZON_DAYS,
        fit=lambda rows, weight: modeling.train_booster(rows, weight=weight), score=modeling.score,
        metric=roc_auc_score, who=who, acceptable=acceptable)


def _table_exists(con, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0])


def png_metadata(png: bytes) -> dg.MetadataValue:
    import base64

    return dg.MetadataValue.md(f"![plot](data:image/png;base64,{base64.b64encode(png).decode()})")
