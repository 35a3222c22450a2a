"""The lifecycle of a declared use case, generated from its declaration (``mlops.core.usecase``).

``usecase_definitions(usecase)`` gives, for one use case, tenant-partitioned assets under the key
prefix ``<use case>/`` (one asset group per use case in the UI):

    raw tables [inbox_files_accepted] -> features -> training_set [training_data_integrity]
                                                  -> online_snapshot [no_training_serving_skew]
    training_set -> model [the problem type's gates: blocking] -> model_aliases -> serving_manifest
    prediction_log -> model_monitoring -> shadow_comparison [promotion_gate] -> champion_promotion

the jobs ``<use case>_pipeline``, ``<use case>_retrain`` and ``<use case>_daily_cycle``, and the
asset sensor ``<use case>_decay_sensor``. The assets are thin: the work is
``mlops.core.usecase_store`` (data), ``mlops.core.usecase_model`` (models and gates),
``mlops.core.monitoring`` and ``mlops.core.shadow`` (monitoring, promotion) and ``mlops.core.serving``
(publication). Nothing here knows a particular use case: adding one is adding a folder.
"""


import datetime as dt
import json
import tempfile
from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd

from assets.automation import build_decay_sensor
from assets.monitoring import ingest_prediction_log
from mlops.core import usecase_model, usecase_store
from mlops.core.candidates import (
    failed_or_missing_gates,
    holdout_scores,
    latest_candidate,
    record_candidate,
    record_gate_result,
)
from mlops.core.deployment import promote_usecase_challenger, retire_usecase_challenger
from mlops.core.hashing import content_hash
from mlops.core.loop import (
    LoopRules,
    active_episode,
    after_monitoring,
    audit_loop,
    data_clock,
    decay_floor,
    decide_promotion,
    inherit_floor,
    loop_metadata,
    on_promotion,
)
from mlops.core.model_inputs import ModelInputs
from mlops.core.monitoring import (
    MonitoringReport,
    MonitorSpec,
    load_or_fit,
    monitoring_step,
    read_monitoring_alerts,
    read_monitoring_results,
    store_report,
    usecase_analysis_frame,
    usecase_reference_frame,
)
from mlops.core.names import CHALLENGER, CHAMPION
from mlops.core.prediction_log import (
    prediction_log_ddl,
    prediction_log_table,
)
from mlops.core.pyfunc_model import model_requirements
from mlops.core.serving import publish_usecase, serving_dir
from mlops.core.shadow import (
    promotion_metric,
    shadow_ddl,
    shadow_pairs,
    shadow_table,
)
from mlops.core.usecase import UseCase
from resources.inbox import InboxOutcome, InboxRejection, move_aside, pending_files, read_and_validate
from resources.monitoring import MonitoringPolicy
from resources.registry import ModelRegistry, runtime_tags
from resources.settings import PlatformSettings
from resources.tenants import TENANT_PARTITIONS, TenantCatalog
from resources.warehouse import DuckDBWarehouse

SIMULATOR_SOURCE = "simulator"
SKEW_SAMPLE_SIZE = 200


def usecase_definitions(uc: UseCase) -> dg.Definitions:
    """Assets, checks and the pipeline job of one declared use case."""
    name = uc.name

    def key(asset: str) -> dg.AssetKey:
        return dg.AssetKey([name, asset])

    table_keys = {table.name: key(table.name) for table in uc.tables}
    common = {"partitions_def": TENANT_PARTITIONS, "group_name": name}

    first_table = next(iter(table_keys.values()))

    @dg.multi_asset(
        name=f"{name}_raw_tables",
        specs=[dg.AssetSpec(k, description=f"Raw `{t}` table of use case {name} in the tenant's warehouse: the "
                                           f"simulated world and files from `inbox/<tenant>/{name}/`.",
                            kinds={"duckdb"}, **common) for t, k in table_keys.items()],
        check_specs=[dg.AssetCheckSpec("inbox_files_accepted", asset=first_table,
                                       description=f"Every file in the tenant's {name} inbox passed its table's "
                                                   "declared schema.")],
    )
    def raw_tables(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, catalog: TenantCatalog,
                   settings: PlatformSettings):
        """The simulated world (one transaction), then each inbox file in a transaction of its own: a bad
        file is rejected whole, with a reason naming file, column and problem, and changes nothing."""
        tenant = context.partition_key
        spec = catalog.get(tenant)
        counts = {}
        with warehouse.transaction(tenant) as con:
            usecase_store.ensure_tables(con, uc)
            if uc.simulator is not None:
                world = spec.for_use_case(name)
                counts = usecase_store.replace_rows(con, uc, usecase_store.load_simulator(uc)(world), SIMULATOR_SOURCE,
                                                    world=usecase_store.world_fingerprint(uc, world))
        outcomes = ingest_usecase_inbox(uc, warehouse, settings, catalog, tenant)
        rejected = [o for o in outcomes if not o.accepted]
        for table, asset_key in table_keys.items():
            yield dg.MaterializeResult(asset_key=asset_key, metadata={
                "simulated_rows": dg.MetadataValue.int(counts.get(table, 0)),
                "inbox_rows": dg.MetadataValue.int(sum(o.rows for o in outcomes if o.accepted and o.table == table)),
                "use_case": name,
            })
        yield dg.AssetCheckResult(
            check_name="inbox_files_accepted", asset_key=first_table, passed=not rejected,
            severity=dg.AssetCheckSeverity.WARN, description="; ".join(o.message for o in rejected) or None,
            metadata={"accepted_files": dg.MetadataValue.int(sum(o.accepted for o in outcomes)),
                      "rejected": dg.MetadataValue.md("\n".join(f"- {o.message}" for o in rejected) or "none")})

    @dg.asset(key=key("features"), deps=list(table_keys.values()), kinds={"duckdb"},
              description=f"Offline feature table of {name}: the declared feature view over the whole history "
                          "(incremental: each run computes the rows from the last run's clock on).",
              **common)
    def features(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse):
        with warehouse.transaction(context.partition_key) as con:
            rows = usecase_store.build_feature_table(con, uc)
            state = usecase_store.feature_build_state(con, uc)
        since = state["built_since"]
        return dg.MaterializeResult(metadata={
            "rows": dg.MetadataValue.int(rows), "as_of": str(state["built_as_of"]),
            # incremental: the rows from the last build's clock on; the start of time: a full build
            "computed_from": "the whole history" if since == usecase_store.START_OF_TIME else str(since),
            "features": ", ".join(ModelInputs.of(uc).columns)})

    @dg.asset(key=key("training_set"), deps=[features], kinds={"duckdb"},
              description=f"Mature {uc.label.column} labels joined point-in-time to the features of {name}.",
              check_specs=[dg.AssetCheckSpec("training_data_integrity", asset=key("training_set"), blocking=True,
                                             description="Rows, labels, one row per entity and prediction time, "
                                                         "point-in-time order and fresh labels.")],
              **common)
    def training_set(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse):
        with warehouse.transaction(context.partition_key) as con:
            frame = usecase_store.build_training_set(con, uc)
            clock = usecase_store.clock(con, uc)
        problems = usecase_store.training_set_problems(
            uc, frame, clock, usecase_model.gate_thresholds(uc)["max_label_staleness_days"])
        yield dg.MaterializeResult(metadata={
            "rows": dg.MetadataValue.int(len(frame)),
            "entities": dg.MetadataValue.int(int(frame[uc.entity.key].nunique()) if len(frame) else 0),
            "prediction_dates": dg.MetadataValue.int(int(frame["prediction_time"].nunique()) if len(frame) else 0),
        })
        yield dg.AssetCheckResult(check_name="training_data_integrity", asset_key=key("training_set"),
                                  passed=not problems, description="; ".join(problems) or None)

    @dg.asset(key=key("online_snapshot"), deps=[features], kinds={"duckdb", "parquet"},
              description=f"Latest feature row per {uc.entity.name}, published as an immutable versioned file.",
              check_specs=[dg.AssetCheckSpec("no_training_serving_skew", asset=key("online_snapshot"), blocking=True,
                                             description="Online features equal the offline features at the same "
                                                         "as-of time for a sample of entities.")],
              **common)
    def online_snapshot(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, settings: PlatformSettings,
                        catalog: TenantCatalog):
        tenant = context.partition_key
        folder = online_dir(settings, catalog, uc, tenant)
        with warehouse.connect(tenant) as con:
            as_of = usecase_store.clock(con, uc)
            snapshot = usecase_store.compute_online_snapshot(con, uc)
            sample = snapshot.sample(n=min(SKEW_SAMPLE_SIZE, len(snapshot)), random_state=0)
            offline = usecase_store.offline_rows_at(con, uc, sample[uc.feature_key].tolist(), as_of)
        pointer = usecase_store.write_online_snapshot(folder, uc, snapshot, as_of)
        problems = usecase_store.compare_feature_rows(uc, sample, offline)
        yield dg.MaterializeResult(metadata={
            "rows": dg.MetadataValue.int(len(snapshot)),
            "snapshot_version": dg.MetadataValue.int(int(pointer["version"])),
            "path": dg.MetadataValue.path(str(folder / pointer["path"])),
        })
        yield dg.AssetCheckResult(check_name="no_training_serving_skew", asset_key=key("online_snapshot"),
                                  passed=not problems, metadata={
                                      "compared": dg.MetadataValue.int(len(sample)),
                                      "mismatches": dg.MetadataValue.int(len(problems)),
                                      "examples": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems[:20])
                                                                      or "none")})

    gates = usecase_model.gate_names(uc)

    @dg.asset(key=key("model"), deps=[training_set], kinds={"lightgbm", "mlflow"},
              description=f"LightGBM {uc.problem_type} model of {name}, tracked and registered in MLflow as "
                          f"`{name}-<tenant>` with every lineage tag.",
              required_resource_keys={"mlflow", "warehouse", "registry"}, **common)
    def model(context: dg.AssetExecutionContext):
        tenant = context.partition_key
        warehouse, registry, mlf = (context.resources.warehouse, context.resources.registry,
                                    context.resources.mlflow)
        with warehouse.connect(tenant) as con:
            training = con.execute(f"SELECT * FROM {usecase_store.training_table(uc)} "  # noqa: S608 - declared name
                                   f"ORDER BY prediction_time, {uc.entity.key}").df()
            episode = active_episode(con, name)
        if training.empty:
            raise dg.Failure(f"{name}/{tenant}: the training set is empty; nothing to train on")
        dataset_version = content_hash(training)
        retrain = None
        if episode is not None and uc.label.early_after_days is not None:
            # A retrain in a decay episode learns the changed concept from the early labels too,
            # weighted by the episode's onset estimate (mlops.core.retraining); the holdout stays matured.
            with warehouse.transaction(tenant) as con:
                early = usecase_store.build_provisional_set(con, uc)
            retrain = usecase_model.fit_for_episode(uc, training, early, episode.onset_estimate,
                                                    who=f"{name}/{tenant}")
            split, booster, scores = retrain.split, retrain.booster, retrain.holdout_scores
        else:
            split = usecase_model.time_split(uc, training)
            booster = usecase_model.train(uc, split.train)
            scores = usecase_model.predict(uc, booster, split.holdout)
        metrics = usecase_model.evaluate(uc, split.holdout[uc.label.column].to_numpy(), scores)
        model_name = uc.registered_model_name(tenant)
        lineage = {"tenant": tenant, "use_case": name, "dataset_version": dataset_version,
                   "feature_view_version": usecase_store.feature_view_version(uc), **runtime_tags(),
                   "dagster_run_id": context.run_id, "dagster_partition": tenant}
        run_id = mlflow.active_run().info.run_id
        mlf.log_params({**uc.model.params, "objective": uc.model.objective,
                        "num_boost_round": uc.model.num_boost_round, "holdout_cutoff": str(split.cutoff.date()),
                        **({"episode_training": retrain.candidate.name, "early_label_rows": retrain.early_rows,
                            "change_point": str(retrain.change_point)} if retrain is not None else {})})
        mlf.log_metrics({**metrics, "train_rows": len(split.train), "holdout_rows": len(split.holdout)})
        mlf.set_tags(lineage)
        model_bytes = usecase_model.model_bytes(booster)
        info = usecase_model.log_model(uc, booster, split.train, registered_model_name=model_name,
                                       pip_requirements=model_requirements())
        version = str(info.registered_model_version)
        registry.tag_version(tenant, version, lineage | {"mlflow_run_id": run_id}, use_case=name)
        mlflow.end_run()
        if scores.ndim == 1:
            holdout = split.holdout.assign(score=scores)
        else:  # multiclass: one probability column per class, and the most probable class's index
            holdout = split.holdout.assign(score=scores.argmax(axis=1).astype(float),
                                           **{f"score_{c}": scores[:, i] for i, c in enumerate(uc.label.classes)})
        with warehouse.transaction(tenant) as con:
            record_candidate(con, version=version, mlflow_run_id=run_id, dagster_run_id=context.run_id,
                             dataset_version=dataset_version, feature_view_version=usecase_store.feature_view_version(uc),
                             holdout_cutoff=split.cutoff, model_bytes=model_bytes, metrics=metrics,
                             holdout=holdout, use_case=name)
        warehouse.audit(tenant, actor="training", action="model_trained", subject=f"{model_name}/{version}",
                        outcome="registered", details={**metrics, "mlflow_run_id": run_id, "use_case": name})
        return dg.MaterializeResult(metadata={
            "model_name": model_name, "model_version": version, "mlflow_run_id": run_id,
            "dataset_version": dataset_version, "train_rows": dg.MetadataValue.int(len(split.train)),
            "holdout_rows": dg.MetadataValue.int(len(split.holdout)),
            **{k: dg.MetadataValue.float(float(v)) for k, v in metrics.items()},
            "episode_training": dg.MetadataValue.json(retrain.summary() if retrain is not None else {}),
        })

    @dg.multi_asset_check(
        specs=[dg.AssetCheckSpec(gate, asset=key("model"), blocking=True,
                                 description=f"{uc.problem_type} gate of {name}") for gate in gates],
        name=f"{name}_gates",
    )
    def model_gates(context: dg.AssetCheckExecutionContext, warehouse: DuckDBWarehouse, registry: ModelRegistry):
        tenant = _partition(context)
        with warehouse.connect(tenant) as con:
            candidate = latest_candidate(con, use_case=name)
            version = str(candidate["model_version"])
            holdout = holdout_scores(con, version, use_case=name)
        booster = registry.load_booster(tenant, version, use_case=name)
        scores = usecase_model.predict(uc, booster, holdout)
        champion = registry.alias_version(tenant, CHAMPION, use_case=name)
        champion_scores = None
        if champion is not None and str(champion.version) != version:
            champion_scores = usecase_model.predict(uc, registry.load_booster(tenant, champion.version, use_case=name),
                                                    holdout)
        outcomes = usecase_model.evaluate_gates(uc, holdout, scores, booster, int(candidate["model_bytes"]),
                                                champion_scores=champion_scores)
        with warehouse.transaction(tenant) as con:
            for outcome in outcomes:
                record_gate_result(con, version, outcome, context.run.run_id, use_case=name)
        for outcome in outcomes:
            warehouse.audit(tenant, actor="validation", action=f"gate:{outcome.gate}",
                            subject=f"{uc.registered_model_name(tenant)}/{version}",
                            outcome="passed" if outcome.passed else "failed",
                            details={"value": outcome.value, "threshold": outcome.threshold, "reason": outcome.reason})
            yield dg.AssetCheckResult(asset_key=key("model"), check_name=outcome.gate, passed=outcome.passed,
                                      description=outcome.reason, metadata={
                                          "model_version": version,
                                          "value": dg.MetadataValue.float(float(outcome.value)),
                                          "threshold": dg.MetadataValue.float(float(outcome.threshold))})

    @dg.asset(key=key("model_aliases"), deps=[model], kinds={"mlflow"},
              description=f"`challenger` for the newest {name} version that passed every gate (and `champion` "
                          "when the tenant has none).", **common)
    def model_aliases(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, registry: ModelRegistry):
        tenant = context.partition_key
        model_name = uc.registered_model_name(tenant)
        with warehouse.connect(tenant) as con:
            version = str(latest_candidate(con, use_case=name)["model_version"])
            problems = failed_or_missing_gates(con, version, gates=gates, use_case=name)
        if problems:
            warehouse.audit(tenant, actor="deployment", action="alias_refused", subject=f"{model_name}/{version}",
                            outcome="refused", details=problems)
            reason = "; ".join(f"{gate}: {why}" for gate, why in sorted(problems.items()))
            raise dg.Failure(f"{model_name} v{version} is kept away from the aliases: {reason}")
        registry.set_alias(tenant, CHALLENGER, version, use_case=name)
        assigned = [CHALLENGER]
        champion = registry.alias_version(tenant, CHAMPION, use_case=name)
        if champion is None:
            registry.set_alias(tenant, CHAMPION, version, use_case=name)
            assigned.append(CHAMPION)
        warehouse.audit(tenant, actor="deployment", action="alias_assigned", subject=f"{model_name}/{version}",
                        outcome="assigned", details={"aliases": assigned})
        return dg.MaterializeResult(metadata={"model_name": model_name, "challenger_version": version,
                                              "aliases_assigned": ", ".join(assigned)})

    @dg.asset(key=key("serving_manifest"), deps=[model_aliases, online_snapshot], kinds={"bentoml"},
              description=f"Publishes {name}'s champion, challenger and online snapshot to the serving bundle; "
                          "the running service swaps models on its own.", **common)
    def serving_manifest(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, registry: ModelRegistry,
                         settings: PlatformSettings, catalog: TenantCatalog):
        tenant = context.partition_key
        entry = publish_usecase_from_registry(uc, tenant, registry, settings, catalog)
        warehouse.audit(tenant, actor="deployment", action="manifest_published",
                        subject=uc.registered_model_name(tenant), outcome="published", details=entry)
        return dg.MaterializeResult(metadata={
            "champion_version": entry[CHAMPION]["version"],
            "challenger_version": (entry[CHALLENGER] or {}).get("version", "none"),
            "manifest": dg.MetadataValue.path(str(serving_dir(settings.root) / "manifest.json")),
        })

    @dg.asset(key=key("prediction_log"), kinds={"duckdb", "parquet"},
              description=f"The service's closed prediction-log segments of {name}, ingested exactly once.",
              **common)
    def prediction_log(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, settings: PlatformSettings):
        return ingest_prediction_log(context, warehouse, settings, use_case=name)

    metric = promotion_metric(uc)
    gate_key = key("shadow_comparison")

    @dg.asset(key=gate_key, deps=[prediction_log, model_aliases], kinds={"nannyml", "duckdb"},
              description=f"{name}'s champion versus its shadow challenger on the same requests: agreement, "
                          f"latency, {metric.label} estimated and realized. Decides: promote, retire or wait.",
              check_specs=[dg.AssetCheckSpec(
                  "promotion_gate", asset=gate_key, blocking=False,
                  description=f"The challenger has enough shadow predictions, meets the latency budget and is not "
                              f"worse than the champion on {metric.label} (realized on matured labels, else "
                              "estimated).")],
              **common)
    def shadow_comparison(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, registry: ModelRegistry,
                          settings: PlatformSettings, catalog: TenantCatalog, monitoring_policy: MonitoringPolicy):
        tenant = context.partition_key
        policy = monitoring_policy
        champion = registry.alias_version(tenant, CHAMPION, use_case=name)
        challenger = registry.alias_version(tenant, CHALLENGER, use_case=name)
        if champion is None:
            raise dg.Failure(f"{uc.registered_model_name(tenant)} has no champion yet")
        champ_v = str(champion.version)
        chall_v = str(challenger.version) if challenger is not None else None
        comparison: dict = {"champion_version": champ_v, "challenger_version": chall_v, "metric": metric.name}
        pairs = pd.DataFrame()
        if chall_v is None or chall_v == champ_v:
            decision, reason = "no_challenger", f"{name} has no challenger in shadow"
        else:
            with warehouse.connect(tenant) as con:
                con.execute(prediction_log_ddl(prediction_log_table(name)))
                origin = usecase_store.clock(con, uc)
                # In a decay episode the challenger must restore performance: "not worse" is not enough.
                episode = active_episode(con, name)
                pairs = shadow_pairs(con, champ_v, chall_v, use_case=name)
                if len(pairs) >= policy.shadow_min_predictions:
                    # The champion's logged rows: the shadow pairs' features and the labelled ones.
                    # In an episode, early labels (a chargeback already reported) are evidence too.
                    logged = usecase_analysis_frame(
                        con, uc, online_dir(settings, catalog, uc, tenant), champ_v,
                        policy.analysis_window_days + uc.label.horizon_days, origin,
                        early_after_days=uc.label.early_after_days if episode is not None else None)
                    # Each version's reference as its monitor has it: labelled as monitoring labels
                    # (``monitoring.realized_after_days``), so the estimates are of the metric the
                    # floor and the realized comparison judge, as on the simulated clock.
                    references = {v: usecase_reference_frame(con, uc, v) for v in (champ_v, chall_v)}
            comparison["require_improvement"] = episode is not None
            if len(pairs) < policy.shadow_min_predictions:
                decision = "wait"
                reason = f"{len(pairs)} of {policy.shadow_min_predictions} shadow predictions so far"
            else:
                boosters = {v: registry.load_booster(tenant, v, use_case=name) for v in (champ_v, chall_v)}
                evidence, decision, reason = decide_promotion(
                    pairs, logged, references, boosters, policy, require_improvement=episode is not None,
                    origin=origin, spec=MonitorSpec.of(uc), metric=metric,
                    score=lambda booster, rows: usecase_model.predict(uc, booster, rows))
                comparison |= evidence
        comparison |= {"decision": decision, "reason": reason, "shadow_pairs": len(pairs)}
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        with warehouse.transaction(tenant) as con:
            con.execute(shadow_ddl(name))
            con.execute(f"INSERT INTO {shadow_table(name)} VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - derived
                        [now, champ_v, chall_v, decision, reason, len(pairs), json.dumps(comparison, default=float),
                         context.run_id])
        subject = f"{uc.registered_model_name(tenant)}/{chall_v}"
        if decision in ("promote", "retire"):
            warehouse.audit(tenant, actor="shadow_comparison", action="promotion_gate", subject=subject,
                            outcome="passed" if decision == "promote" else "failed",
                            details={**comparison, "use_case": name})
        if decision == "retire":
            retire_usecase_challenger(uc, tenant, chall_v, registry, warehouse, reason=reason, publish=lambda:
                                      publish_usecase_from_registry(uc, tenant, registry, settings, catalog))
        numbers = {k: dg.MetadataValue.float(float(v)) for k, v in comparison.items()
                   if isinstance(v, float | int) and not isinstance(v, bool) and k != "shadow_pairs"}
        yield dg.MaterializeResult(metadata={
            "decision": decision, "reason": reason, "use_case": name, "champion_version": champ_v,
            "challenger_version": chall_v or "none", "shadow_pairs": dg.MetadataValue.int(len(pairs)), **numbers,
        })
        yield dg.AssetCheckResult(
            check_name="promotion_gate", asset_key=gate_key, passed=decision == "promote",
            # Waiting (or nothing in shadow) is not a failure: it does not block, and promotion does nothing.
            severity=dg.AssetCheckSeverity.ERROR if decision in ("promote", "retire") else dg.AssetCheckSeverity.WARN,
            description=f"{decision}: {reason}",
            metadata={"decision": decision, "reason": reason, "challenger_version": chall_v or "none"},
        )

    @dg.asset(key=key("champion_promotion"), deps=[shadow_comparison], kinds={"mlflow", "bentoml"},
              description=f"Moves {name}'s `champion` to the challenger that passed the promotion gate and "
                          "republishes the serving manifest; the running service swaps models without a restart.",
              **common)
    def champion_promotion(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, registry: ModelRegistry,
                           settings: PlatformSettings, catalog: TenantCatalog, monitoring_policy: MonitoringPolicy):
        tenant = context.partition_key
        with warehouse.connect(tenant) as con:
            con.execute(shadow_ddl(name))
            latest = con.execute(f"SELECT champion_version, challenger_version, decision, reason "  # noqa: S608
                                 f"FROM {shadow_table(name)} ORDER BY evaluated_at DESC LIMIT 1").fetchone()
        challenger = registry.alias_version(tenant, CHALLENGER, use_case=name)
        if latest is None or latest[2] != "promote" or challenger is None or str(challenger.version) != latest[1]:
            return dg.MaterializeResult(metadata={"promoted": False, "use_case": name,
                                                  "reason": "no challenger passed the promotion gate"})
        old_v, new_v = str(latest[0]), str(latest[1])
        spec = MonitorSpec.of(uc)
        with warehouse.connect(tenant) as con:
            monitors = {v: load_or_fit(settings.root, tenant, v, monitoring_policy,
                                       lambda v=v: usecase_reference_frame(con, uc, v), spec)[0]
                        for v in (old_v, new_v)}
            old_floor = decay_floor(con, name, old_v, monitors[old_v].own_bound)[0]
        entry = promote_usecase_challenger(
            uc, tenant, registry, warehouse, reason=f"promotion gate passed: {latest[3]}",
            publish=lambda: publish_usecase_from_registry(uc, tenant, registry, settings, catalog))
        with warehouse.transaction(tenant) as con:
            floor, source = inherit_floor(con, name, new_v, old_v, monitors[new_v].realized_metric,
                                          monitors[new_v].own_bound, old_floor)
            episode = on_promotion(con, name, now=data_clock(usecase_store.clock(con, uc)), new_version=new_v)
        return dg.MaterializeResult(metadata={
            "promoted": True, "use_case": name, "from_version": latest[0], "to_version": latest[1],
            "reason": latest[3], "serving_champion": entry[CHAMPION]["version"],
            "decay_floor": dg.MetadataValue.float(floor), "decay_floor_source": source,
            "loop_episode": "" if episode is None else str(episode.episode),
        })

    # After the day's promotion, as churn's: the loop decides on the champion that serves from today on.
    @dg.asset(key=key("model_monitoring"), deps=[prediction_log, model, champion_promotion],
              kinds={"nannyml", "duckdb"},
              description=f"NannyML on {name}'s champion predictions ({uc.problem_type}): drift of every feature, "
                          "estimated and realized performance, data quality; a decay alert triggers retraining.",
              **common)
    def model_monitoring(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, registry: ModelRegistry,
                         settings: PlatformSettings, catalog: TenantCatalog, monitoring_policy: MonitoringPolicy):
        tenant = context.partition_key
        champion = registry.alias_version(tenant, CHAMPION, use_case=name)
        if champion is None:
            raise dg.Failure(f"{uc.registered_model_name(tenant)} has no champion to monitor yet")
        version = str(champion.version)
        spec = MonitorSpec.of(uc)
        with warehouse.connect(tenant) as con:
            origin = usecase_store.clock(con, uc)
            analysis = usecase_analysis_frame(con, uc, online_dir(settings, catalog, uc, tenant), version,
                                              monitoring_policy.analysis_window_days, origin,
                                              realized_after_days=spec.realized_after_days or None)
            monitor, fitted = load_or_fit(settings.root, tenant, version, monitoring_policy,
                                          lambda: usecase_reference_frame(con, uc, version), spec)
            stored = read_monitoring_results(con, version, use_case=name)
            raised = set(read_monitoring_alerts(con, version, use_case=name)[["metric", "chunk_key"]]
                         .itertuples(index=False, name=None))
            floor = decay_floor(con, name, version, monitor.own_bound)
        if analysis.empty:
            return dg.MaterializeResult(metadata={"model_version": version, "analysis_rows": dg.MetadataValue.int(0),
                                                  "decay_alert": False})
        # Judged against the floor the version inherited (the last healthy champion's), not only its own.
        fresh, everything, decay = monitoring_step(monitor, analysis, stored, raised, floor[0], monitoring_policy)
        challenger = registry.alias_version(tenant, CHALLENGER, use_case=name)
        with warehouse.transaction(tenant) as con:
            store_report(con, MonitoringReport(fresh, monitor.reference_roc_auc, decay), version, context.run_id,
                         use_case=name)
            loop = after_monitoring(
                con, name, everything, decay, now=data_clock(origin), champion_version=version, floor=floor,
                challenger_in_shadow=challenger is not None and str(challenger.version) != version,
                labels_through=data_clock(origin) - pd.Timedelta(days=uc.label.horizon_days),
                rules=LoopRules.of(monitoring_policy), realized_metric=monitor.realized_metric,
                higher_is_better=monitor.higher_is_better, evidence_days=uc.label.early_after_days or 0)
        audit_loop(warehouse, tenant, f"{uc.registered_model_name(tenant)}/{version}", decay, loop, context.log)
        report = MonitoringReport(everything, monitor.reference_roc_auc, decay)
        return dg.MaterializeResult(metadata={
            "model_version": version, "monitor_fitted_now": fitted,
            "analysis_rows": dg.MetadataValue.int(len(analysis)),
            "chunks": dg.MetadataValue.int(int(everything["chunk_key"].nunique())),
            "alerts": dg.MetadataValue.int(len(report.alerts)),
            "features_drifting_latest_chunk": dg.MetadataValue.int(len(report.drifting_latest())),
            **{metric: dg.MetadataValue.float(float("nan") if report.latest(metric) is None else report.latest(metric))
               for metric in monitor.spec.decay_metrics},
            "decay_alert": bool(decay),
            "decay_alerts": dg.MetadataValue.json(decay),
            "decay_floor": dg.MetadataValue.float(floor[0]),
            "decay_floor_source": floor[1],
            **loop_metadata(loop),
        })

    assets = [raw_tables, features, training_set, online_snapshot, model, model_aliases, serving_manifest]
    pipeline = dg.define_asset_job(
        f"{name}_pipeline", selection=dg.AssetSelection.assets(*assets),
        description=f"{uc.title}: ingest -> features -> train -> gates -> aliases -> serving manifest, for one tenant.",
        executor_def=dg.in_process_executor,
    )
    retrain = dg.define_asset_job(
        f"{name}_retrain", selection=dg.AssetSelection.assets(features, training_set, model, model_aliases,
                                                              online_snapshot, serving_manifest),
        description=f"Retrain {name} for one tenant on its current data: features -> model -> gates -> challenger.",
        executor_def=dg.in_process_executor,
    )
    daily_cycle = dg.define_asset_job(
        f"{name}_daily_cycle", selection=dg.AssetSelection.assets(
            raw_tables, features, online_snapshot, serving_manifest, prediction_log, model_monitoring,
            shadow_comparison, champion_promotion),
        description=f"{name}'s day for one tenant: new data -> features -> snapshot -> prediction log -> monitoring "
                    "-> shadow comparison [promotion_gate] -> promotion.",
        executor_def=dg.in_process_executor,
    )
    return dg.Definitions(assets=[*assets, prediction_log, model_monitoring, shadow_comparison, champion_promotion],
                          asset_checks=[model_gates],
                          jobs=[pipeline, retrain, daily_cycle], sensors=[build_decay_sensor(f"{name}_decay_sensor", key("model_monitoring"), retrain,
                                                     run_key_prefix=f"decay:{name}")])


def ingest_usecase_inbox(uc: UseCase, warehouse: DuckDBWarehouse, settings: PlatformSettings,
                         catalog: TenantCatalog, tenant: str) -> list[InboxOutcome]:
    """Load every pending file of ``inbox/<tenant>/<use case>/`` into the table its name says, one
    transaction per file; rows with a key already stored replace it."""
    known = set(catalog.all())
    outcomes = []
    for path in pending_files(settings.inbox_dir(tenant) / uc.name):
        try:
            table, frame = read_and_validate(path, tenant, known, tables=uc.tables)
            with warehouse.transaction(tenant) as con:
                rows = warehouse.upsert_rows(con, table, frame, source=f"inbox:{path.name}")
        except InboxRejection as exc:
            move_aside(path, accepted=False, message=str(exc))
            outcomes.append(InboxOutcome(path.name, None, False, 0, str(exc)))
            warehouse.audit(tenant, actor="ingestion", action="inbox_file", subject=f"{uc.name}/{path.name}",
                            outcome="rejected", details={"reason": str(exc)})
            continue
        move_aside(path, accepted=True)
        outcomes.append(InboxOutcome(path.name, table.name, True, rows, f"{path.name}: {rows} rows"))
        warehouse.audit(tenant, actor="ingestion", action="inbox_file", subject=f"{uc.name}/{path.name}",
                        outcome="accepted", details={"table": table.name, "rows": rows})
    return outcomes


def online_dir(settings: PlatformSettings, catalog: TenantCatalog, uc: UseCase, tenant: str) -> Path:
    spec = catalog.get(tenant)
    return settings.online_dir(spec.name, spec.region) / uc.name


def publish_usecase_from_registry(uc: UseCase, tenant: str, registry: ModelRegistry, settings: PlatformSettings,
                                  catalog: TenantCatalog) -> dict:
    """Export the aliased versions of a use case from MLflow and publish them with its current snapshot."""
    champion = registry.alias_version(tenant, CHAMPION, use_case=uc.name)
    if champion is None:
        raise dg.Failure(f"{uc.registered_model_name(tenant)} has no champion to serve yet")
    challenger = registry.alias_version(tenant, CHALLENGER, use_case=uc.name)
    pointer, _ = usecase_store.read_online_snapshot(online_dir(settings, catalog, uc, tenant))
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for mv in (champion, challenger):
            if mv is not None and str(mv.version) not in files:
                path = Path(tmp) / f"v{mv.version}.txt"
                registry.load_booster(tenant, mv.version, use_case=uc.name).save_model(str(path))
                files[str(mv.version)] = path
        chall = None
        if challenger is not None and str(challenger.version) != str(champion.version):
            chall = (str(challenger.version), files[str(challenger.version)])
        return publish_usecase(
            serving_dir(settings.root), uc, tenant, champion=(str(champion.version), files[str(champion.version)]),
            challenger=chall,
            snapshot=(int(pointer["version"]), online_dir(settings, catalog, uc, tenant) / pointer["path"]),
        )


def _partition(context) -> str:
    tenant = context.run.tags.get("dagster/partition")
    if not tenant:
        raise dg.Failure("use-case gates run per tenant: launch them with a tenant partition")
    return tenant
