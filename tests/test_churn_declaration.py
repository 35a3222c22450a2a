"""Churn as a declared use case (issue 12, the first step of moving churn onto the generated
lifecycle): ``usecases/churn/declaration.yaml`` with its ``features.sql`` and ``labels.sql``, run by
the declared use cases' store (``mlops.core.usecase_store``), gives exactly the feature rows, online
snapshot, training set, early labels and model inputs of the hand-written path
(``resources.feature_store``, ``mlops.core.model_inputs``) on the same warehouse."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from mlops.core import usecase_store
from mlops.core.environment import PROJECT_ROOT
from mlops.core.model_inputs import CHURN_INPUTS, ModelInputs
from mlops.core.usecase import load_usecase
from mlops.replay import load_world
from resources import feature_store
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


def test_the_declared_model_inputs_are_the_hand_written_ones(churn):
    inputs = ModelInputs.of(churn)
    assert inputs.columns == CHURN_INPUTS.columns
    assert inputs.categorical == CHURN_INPUTS.categorical
    assert churn.tables == tuple(load_usecase(PROJECT_ROOT / "usecases" / "churn", file="declaration.yaml").tables)
