"""Churn as a declared use case (issue 12, the first step of moving churn onto the generated
lifecycle): ``usecases/churn/declaration.yaml`` with its ``features.sql`` and ``labels.sql``, run by
the declared use cases' store and model code (``mlops.core.usecase_store``, ``usecase_model``), gives
exactly the feature rows, online snapshot, training set, early labels, model scores, model inputs,
gate thresholds and monitoring spec of the hand-written path (``resources.feature_store``,
``mlops.core.modeling``, ``model_inputs``, ``resources.gates``) on the same warehouse."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from mlops.core import usecase_store
from mlops.core.environment import PROJECT_ROOT
from mlops.core.model_inputs import CHURN_INPUTS, ModelInputs
from mlops.core.modeling import FAIRNESS_ATTRIBUTE
from mlops.core.monitoring import CHURN_SPEC, MonitorSpec
from mlops.core.usecase import load_usecase
from mlops.replay import load_world
from resources import feature_store
from resources.schemas import RAW_TABLES
from resources.tenants import TenantSpec

# A drifting world (concept drift on day 182, attributes that change) cut on day 200.
WORLD = TenantSpec(name="parity", region="eu", n_accounts=400, seed=11, days=260, scenario="concept_drift",
                   drift_day=182)
KEY = ["account_id", "available_at"]


@pytest.fixture(scope="module")
def churn():
    return load_usecase(PROJECT_ROOT / "usecases" / "churn", file="declaration.yaml")


@pytest.fixture(scope="module")
def warehouse():
    con = load_world(dataclasses.replace(WORLD, today=200))
    yield con
    con.close()


def _sorted(frame: pd.DataFrame, key: list[str], columns: list[str]) -> pd.DataFrame:
    return frame[columns].sort_values(key, ignore_index=True)


def test_the_declared_features_are_the_hand_written_ones(churn, warehouse):
    columns = [*KEY, *churn.features.columns]
    hand_rows = feature_store.build_feature_table(warehouse)
    declared_rows = usecase_store.build_feature_table(warehouse, churn)
    assert declared_rows == hand_rows > 10_000
    hand = warehouse.table(feature_store.FEATURE_TABLE).df()
    declared = warehouse.table(usecase_store.feature_table(churn)).df()
    pd.testing.assert_frame_equal(_sorted(declared, KEY, columns), _sorted(hand, KEY, columns), check_exact=True)
    # The clock is the day after the newest usage event; the newest week is available at it.
    assert declared["available_at"].max() == usecase_store.clock(warehouse, churn)

    # Every build is a full one (features.incremental: false): the rows move with the clock.
    state = usecase_store.feature_build_state(warehouse, churn)
    assert state["built_since"] == usecase_store.START_OF_TIME

    # The online snapshot: the newest week's row per account, from the look-back window only.
    origin, _ = feature_store.feature_origin(warehouse)
    hand_online = feature_store.compute_features(warehouse, origin, -1, -1)
    online = usecase_store.compute_online_snapshot(warehouse, churn)
    assert len(online) == len(hand_online) > 300
    pd.testing.assert_frame_equal(_sorted(online, KEY, columns), _sorted(hand_online, KEY, columns),
                                  check_exact=True)


def test_the_declared_labels_and_training_set_are_the_hand_written_ones(churn, warehouse):
    feature_store.build_feature_table(warehouse)
    usecase_store.build_feature_table(warehouse, churn)
    row = ["account_id", "prediction_time"]
    columns = [*row, "churned", "available_at", *churn.features.columns]

    hand = feature_store.build_training_set(warehouse)
    declared = usecase_store.build_training_set(warehouse, churn)
    assert len(declared) == len(hand) > 5_000 and 0 < declared["churned"].mean() < 0.5
    pd.testing.assert_frame_equal(_sorted(declared, row, columns), _sorted(hand, row, columns), check_exact=True)

    # Early labels: the windows not closed yet but observed for a week, churns seen so far positive.
    hand_early = feature_store.build_provisional_set(warehouse)
    early = usecase_store.build_provisional_set(warehouse, churn)
    assert len(early) == len(hand_early) > 1_000 and early["churned"].sum() > 0
    pd.testing.assert_frame_equal(_sorted(early, row, [*columns, "observed_days"]).astype({"observed_days": float}),
                                  _sorted(hand_early, row, [*columns, "observed_days"]).astype({"observed_days": float}),
                                  check_exact=True)


def test_the_declared_model_scores_as_the_hand_written_one(churn, warehouse):
    """The same split (the latest quarter of prediction dates held out, a 30-day embargo before it),
    the same booster, the same scores on the holdout."""
    from mlops.core import modeling, usecase_model

    feature_store.build_feature_table(warehouse)
    usecase_store.build_feature_table(warehouse, churn)
    hand = modeling.time_split(feature_store.build_training_set(warehouse), embargo_days=feature_store.LABEL_HORIZON_DAYS)
    declared = usecase_model.time_split(churn, usecase_store.build_training_set(warehouse, churn))
    assert declared.cutoff == hand.cutoff and len(declared.train) == len(hand.train) > 2_000
    order = ["account_id", "prediction_time"]
    holdout = hand.holdout.sort_values(order, ignore_index=True)
    hand_scores = modeling.score(modeling.train_booster(hand.train), holdout)
    declared_scores = usecase_model.predict(churn, usecase_model.train(churn, declared.train), holdout)
    assert len(holdout) > 1_000 and 0.01 < hand_scores.mean() < 0.99
    np.testing.assert_array_equal(declared_scores, hand_scores)


def test_the_declared_model_inputs_are_the_hand_written_ones(churn):
    inputs = ModelInputs.of(churn)
    assert inputs.columns == CHURN_INPUTS.columns
    assert inputs.categorical == CHURN_INPUTS.categorical
    # The raw tables are churn's one declaration (tables.yaml), which the hand-written path reads too.
    assert {t.name: t for t in churn.tables} == RAW_TABLES
    # Monitoring watches the same features, label and metric with the same thresholds.
    assert MonitorSpec.of(churn) == CHURN_SPEC


def test_the_declared_gates_are_the_hand_written_policy(churn):
    from mlops.core.usecase_model import gate_thresholds
    from resources.gates import GatePolicy

    gates, policy = gate_thresholds(churn), GatePolicy()
    assert gates["fairness_attribute"] == FAIRNESS_ATTRIBUTE
    for declared, hand in (("min_roc_auc", "min_roc_auc"), ("champion_tolerance", "champion_auc_tolerance"),
                           ("max_expected_calibration_error", "max_expected_calibration_error"),
                           ("max_fairness_gap", "max_fairness_gap"), ("fairness_min_group_size", "fairness_min_group_size"),
                           ("fairness_min_class_rows", "fairness_min_class_rows"),
                           ("max_single_row_p99_ms", "max_single_row_p99_ms"), ("max_model_bytes", "max_model_bytes"),
                           ("max_label_staleness_days", "max_label_staleness_days")):
        assert gates[declared] == getattr(policy, hand), declared


def test_the_declared_training_set_check_names_stale_repeated_and_leaking_rows(churn, warehouse):
    """The blocking integrity check of a declared training set: as the hand-written churn check, it
    refuses labels older than gates.max_label_staleness_days, repeated rows and leaks."""
    from mlops.core.usecase_model import gate_thresholds

    usecase_store.build_feature_table(warehouse, churn)
    frame = usecase_store.build_training_set(warehouse, churn)
    clock, limit = usecase_store.clock(warehouse, churn), gate_thresholds(churn)["max_label_staleness_days"]
    assert usecase_store.training_set_problems(churn, frame, clock, limit) == []

    stale = usecase_store.training_set_problems(churn, frame, clock + pd.Timedelta(days=30), limit)
    assert len(stale) == 1 and "older than gates.max_label_staleness_days 45" in stale[0], stale
    broken = pd.concat([frame, frame.head(3)], ignore_index=True)
    broken.loc[0, "available_at"] = broken.loc[0, "prediction_time"] + pd.Timedelta(days=1)
    assert usecase_store.training_set_problems(churn, broken, clock, limit) == [
        "3 rows repeat an account and prediction time", "1 rows use features newer than their label (leak)"]
    assert usecase_store.training_set_problems(churn, frame.head(0), clock, limit) == [
        "no mature labels joined to features"]
