"""The closed loop of a declared use case on a simulated clock (``mlops.usecase_replay``): fraud's
new tactic is detected, a retrain inside the episode learns it from early labels and the promotion
gate puts the better model in front; without a drift nothing is retrained.

To fit a test, the tenant is the fraud use case with a two-week label window (``horizon_days: 14``,
early labels after 5 days): the same data, SQL and simulator, labels that mature 31 days sooner, so
the loop's whole episode fits in seven simulated weeks (3,000 accounts: with fewer, the first
champion's reference is too noisy for a floor). Each replay takes 80-90 s on one core, hence slow. ``benchmarks/loop.py --use-case fraud``
replays the declared 45-day window over many seeds.
"""

from __future__ import annotations

import shutil
import warnings

import pandas as pd
import pytest
import yaml

from mlops.core.environment import PROJECT_ROOT
from mlops.core.monitoring import TIMESTAMP
from mlops.core.names import CHALLENGER, CHAMPION
from mlops.core.usecase import load_usecase
from mlops.usecase_replay import UseCaseReplay
from resources.tenants import TenantSpec
from usecases.fraud.simulator import START

pytestmark = pytest.mark.slow

START_DAY, DRIFT_DAY, END_DAY = 120, 130, 175
HORIZON, EARLY = 14, 5


@pytest.fixture(scope="module")
def fraud_14d(tmp_path_factory):
    folder = tmp_path_factory.mktemp("usecases") / "fraud"
    shutil.copytree(PROJECT_ROOT / "usecases" / "fraud", folder)
    raw = yaml.safe_load((folder / "usecase.yaml").read_text())
    raw["label"].update(horizon_days=HORIZON, early_after_days=EARLY)
    (folder / "usecase.yaml").write_text(yaml.safe_dump(raw))
    return load_usecase(folder)


def replay(uc, scenario: str, end_day: int = END_DAY) -> UseCaseReplay:
    warnings.simplefilter("ignore")
    spec = TenantSpec(name="s1", region="eu", n_accounts=3000, seed=1, days=end_day + HORIZON, scenario=scenario,
                      drift_day=None if scenario == "none" else DRIFT_DAY)
    return UseCaseReplay(uc, spec, START_DAY, end_day, START).run()


def test_a_new_fraud_tactic_alerts_and_an_early_label_retrain_is_promoted_and_serves_better(fraud_14d):
    r = replay(fraud_14d, "concept_drift")
    kinds = [(e.day, e.kind) for e in r.events]
    alert = next(d for d, k in kinds if k == "decay alert")
    assert DRIFT_DAY < alert <= DRIFT_DAY + HORIZON + 14, kinds
    trainings = [e for e in r.events if e.kind == "training"]
    assert trainings and all(e.day >= alert for e in trainings)
    early_rows = int(trainings[0].detail.split("; ")[1].split(" early")[0])
    assert early_rows > 1000  # the episode's retrain used the early labels
    promoted = [e for e in r.events if e.kind == "promoted"]
    assert promoted, kinds
    assert r.summary()["worse_promotions"] == 0
    # ground truth: on the traffic both scored in shadow, the promoted model finds the frauds far
    # better than the champion it replaced...
    old, new = promoted[0].detail.split(":")[0].replace("v", "").split(" -> ")
    pairs = r.logged(CHAMPION, old).merge(r.logged(CHALLENGER, new)[["prediction_id", "score"]],
                                          on="prediction_id", suffixes=("", "_new"))
    y = r.eventual_labels(pairs)
    assert y.sum() >= 10
    assert r.metric(y, pairs["score_new"]) > r.metric(y, pairs["score"]) + 0.1
    # ...and what is served after the promotion is better than what was served after the drift before it
    served = pd.concat([f for f in r.log if f["role"].iat[0] == CHAMPION], ignore_index=True)
    served = served[served[TIMESTAMP] < r.labels_closed_before()]
    day = (served[TIMESTAMP] - START).dt.days
    after, drifted = served[day >= promoted[0].day], served[(day >= DRIFT_DAY) & (day < promoted[0].day)]
    assert (r.metric(r.eventual_labels(after), after["score"])
            > r.metric(r.eventual_labels(drifted), drifted["score"]) + 0.1)


def test_without_a_drift_nothing_is_retrained(fraud_14d):
    r = replay(fraud_14d, "none", end_day=165)
    assert not [e for e in r.events if e.kind in ("challenger", "gates failed", "training", "promoted")], r.events
    assert set(r.served.values()) == {"1"}
    assert pd.notna(r.summary()["seed"])
