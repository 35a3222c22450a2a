"""Payment-fraud detection, the second real use case, declared in ``usecases/fraud/``: its declaration,
its simulator, point-in-time correctness of its training rows, its pipeline through the generated
assets, and the "new fraud tactic" (concept drift) that a retrained model repairs."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import duckdb
import numpy as np
import pandas as pd
import pytest

from mlops.core import usecase_model as um
from mlops.core import usecase_store as st
from mlops.core.environment import PROJECT_ROOT
from mlops.core.usecase import discover_usecases, load_usecase
from resources.tenants import TenantSpec
from tests.conftest import open_instance

FOLDER = PROJECT_ROOT / "usecases" / "fraud"
SPEC = TenantSpec(name="payco", region="eu", n_accounts=1500, seed=7, days=180)
CHURN_TABLES = {"raw_accounts", "raw_usage_events", "raw_billing_events", "raw_support_tickets",
                "raw_churn_events", "raw_account_attributes"}
DAY = pd.Timedelta(days=1)


@pytest.fixture(scope="module")
def uc():
    return load_usecase(FOLDER)


@pytest.fixture(scope="module")
def sim(uc):
    return st.load_simulator(uc)


@pytest.fixture(scope="module")
def world(sim):
    started = time.perf_counter()
    frames = sim(SPEC)
    return {"frames": frames, "seconds": time.perf_counter() - started}


def warehouse(uc, frames) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    st.replace_rows(con, uc, frames, "simulator")
    st.build_feature_table(con, uc)
    return con


# --- the declaration ---------------------------------------------------------------------------------
def test_the_declaration_loads_and_is_discovered(uc):
    found = discover_usecases([PROJECT_ROOT / "usecases"])
    assert "fraud" in found and found["fraud"].folder == FOLDER
    assert (uc.entity.key, uc.feature_key, uc.problem_type, uc.label.horizon_days) == (
        "payment_id", "account_id", "binary", 45)
    assert {"amount", "currency", "country", "payment_method", "card_age_days"} <= set(uc.request_field_names)
    tables = {t.name for t in uc.tables}
    assert {"raw_payments", "raw_chargebacks", "raw_fraud_accounts"} == tables and not tables & CHURN_TABLES
    assert um.gate_names(uc) == ("roc_auc_gate", "pr_auc_gate", "recall_at_precision_gate", "calibration_gate",
                                 "fairness_gate", "latency_gate", "model_size_gate")
    assert um.gate_thresholds(uc)["fairness_attribute"] == "plan"


# --- the simulator -----------------------------------------------------------------------------------
def test_the_simulator_is_deterministic_fast_and_valid(uc, world):
    assert world["seconds"] < 10, world["seconds"]
    again = st.load_simulator(uc)(SPEC)  # a fresh import: no cache shared with `world`
    for name, frame in world["frames"].items():
        pd.testing.assert_frame_equal(frame, again[name])
        validated = uc.table(name).pandera_schema().validate(frame)  # raises on any problem
        assert len(validated) == len(frame) > 0
    other = st.load_simulator(uc)(replace(SPEC, seed=8))
    assert not other["raw_payments"]["amount"].equals(world["frames"]["raw_payments"]["amount"])


def test_fraud_is_rare_and_every_chargeback_comes_1_to_45_days_after_its_payment(world):
    payments, chargebacks = world["frames"]["raw_payments"], world["frames"]["raw_chargebacks"]
    settled = payments[payments["status"] == "succeeded"]
    # Chargebacks of the last 45 days are not all reported yet: measure the rate on older payments.
    old = settled[settled["paid_at"] < settled["paid_at"].max() - 45 * DAY]
    rate = old["payment_id"].isin(chargebacks["payment_id"]).mean()
    assert 0.003 <= rate <= 0.006, rate
    joined = chargebacks.merge(payments, on="payment_id", how="left", validate="one_to_one")
    assert (joined["status"] == "succeeded").all()  # declined payments never settle
    delay = joined["reported_at"] - joined["paid_at"]
    assert delay.min() >= 1 * DAY and delay.max() <= 45 * DAY, (delay.min(), delay.max())


def test_moving_the_clock_forward_only_adds_rows(uc, sim, world):
    earlier = sim(replace(SPEC, today=120))
    later = world["frames"]
    for table in uc.tables:
        before, after = earlier[table.name], later[table.name]
        assert 0 < len(before) < len(after) or table.name == "raw_fraud_accounts"
        merged = before.merge(after, how="left", indicator=True)
        assert (merged["_merge"] == "both").all(), table.name
    until = pd.Timestamp("2026-04-01") + 120 * DAY
    assert earlier["raw_chargebacks"]["reported_at"].max() < until  # a chargeback shows once reported


def test_a_daily_load_of_the_same_world_replaces_only_its_newest_days_and_equals_a_full_load(uc, sim, world):
    """The daily cycle loads the simulated world at each day's clock: for the same world only the
    rows from the newest day loaded before on are validated and replaced (the rest cannot have
    changed); the tables then hold exactly what a full load at the same clock holds. Another world
    (a changed setting) is replaced whole."""
    def tables(con):
        return {t.name: con.execute(f"SELECT * FROM {t.name} ORDER BY ALL").df()  # noqa: S608 - declared names
                for t in uc.tables}

    fingerprint = st.world_fingerprint(uc, SPEC)
    con = duckdb.connect()
    first = st.replace_rows(con, uc, sim(replace(SPEC, today=120)), "simulator", world=fingerprint)
    second = st.replace_rows(con, uc, sim(replace(SPEC, today=121)), "simulator", world=fingerprint)
    assert second["raw_payments"] < first["raw_payments"] / 20  # one or two days, not 120
    third = st.replace_rows(con, uc, world["frames"], "simulator", world=fingerprint)  # the clock jumps to 180
    assert second["raw_payments"] < third["raw_payments"] < len(world["frames"]["raw_payments"])
    full = duckdb.connect()
    st.replace_rows(full, uc, world["frames"], "simulator")
    for name, frame in tables(full).items():
        pd.testing.assert_frame_equal(tables(con)[name], frame, obj=name)
    other = replace(SPEC, seed=8, today=120)
    counts = st.replace_rows(con, uc, sim(other), "simulator", world=st.world_fingerprint(uc, other))
    assert counts == {name: len(frame) for name, frame in sim(other).items()}
    assert len(tables(con)["raw_payments"]) == counts["raw_payments"]


def test_the_daily_feature_build_computes_only_the_new_days_and_equals_a_full_build(uc, sim):
    """Day by day the offline feature table gains only the rows from the last build's clock on; it
    is then the table a full build gives. A delivery that changes an old raw row rebuilds it whole."""
    def features(con):
        return con.execute(f"SELECT * FROM {st.feature_table(uc)} ORDER BY ALL").df()  # noqa: S608 - declared name

    small = replace(SPEC, n_accounts=400)
    fingerprint = st.world_fingerprint(uc, small)
    con = duckdb.connect()
    built = []
    for today in (60, 61, 63):
        st.replace_rows(con, uc, sim(replace(small, today=today)), "simulator", world=fingerprint)
        st.build_feature_table(con, uc)
        built.append(st.feature_build_state(con, uc))
    assert built[0]["built_since"] == st.START_OF_TIME
    assert built[1]["built_since"] == built[0]["built_as_of"] < built[1]["built_as_of"]
    assert built[2]["built_since"] == built[1]["built_as_of"] < built[2]["built_as_of"]
    full = duckdb.connect()
    st.replace_rows(full, uc, sim(replace(small, today=63)), "simulator")
    st.build_feature_table(full, uc)
    assert st.feature_build_state(full, uc)["built_since"] == st.START_OF_TIME
    pd.testing.assert_frame_equal(features(con), features(full))

    # An inbox delivery corrects an old payment: everything is rebuilt, and equals a full build.
    for c in (con, full):
        c.execute("UPDATE raw_payments SET amount = amount + 100 WHERE payment_id = "
                  "(SELECT min(payment_id) FROM raw_payments WHERE status = 'succeeded')")
    st.build_feature_table(con, uc)
    assert st.feature_build_state(con, uc)["built_since"] == st.START_OF_TIME
    st.build_feature_table(full, uc)
    pd.testing.assert_frame_equal(features(con), features(full))
    st.build_feature_table(con, uc)  # nothing changed: only the clock's own rows are computed again
    assert st.feature_build_state(con, uc)["built_since"] == built[2]["built_as_of"]
    pd.testing.assert_frame_equal(features(con), features(full))


def test_before_drift_day_the_new_tactic_changes_nothing(sim, world):
    drift_day = 100
    drifted = sim(replace(SPEC, scenario="concept_drift", drift_day=drift_day))
    none = world["frames"]
    cut = pd.Timestamp("2026-04-01") + drift_day * DAY
    pd.testing.assert_frame_equal(drifted["raw_fraud_accounts"], none["raw_fraud_accounts"])
    for name, column in (("raw_payments", "paid_at"), ("raw_chargebacks", "reported_at")):
        a, b = drifted[name], none[name]
        pd.testing.assert_frame_equal(a[a[column] < cut].reset_index(drop=True), b[b[column] < cut].reset_index(drop=True))
    # ...and from drift_day on, fraud comes from the new country, which it never used before.
    def fraud_countries(frames, after: bool):
        p = frames["raw_payments"]
        p = p[p["payment_id"].isin(frames["raw_chargebacks"]["payment_id"]) & ((p["paid_at"] >= cut) == after)]
        return p["country"].value_counts(normalize=True)
    assert fraud_countries(drifted, after=True).get("PH", 0) > 0.5
    assert fraud_countries(none, after=True).get("PH", 0) < 0.05
    assert fraud_countries(drifted, after=False).get("PH", 0) < 0.05


def test_the_hard_tactic_changes_nothing_before_drift_day_and_then_looks_legitimate(sim, world):
    """hard_concept_drift: from drift_day most fraud is paid as the account itself pays (its own
    instruments, at home, by day, its usual amounts), so no feature tells it from legitimate payments."""
    drift_day = 100
    spec = replace(SPEC, scenario="hard_concept_drift", drift_day=drift_day)
    drifted, none = sim(spec), world["frames"]
    cut = pd.Timestamp("2026-04-01") + drift_day * DAY
    pd.testing.assert_frame_equal(drifted["raw_fraud_accounts"], none["raw_fraud_accounts"])
    for name, column in (("raw_payments", "paid_at"), ("raw_chargebacks", "reported_at")):
        a, b = drifted[name], none[name]
        pd.testing.assert_frame_equal(a[a[column] < cut].reset_index(drop=True), b[b[column] < cut].reset_index(drop=True))

    truth = sim.__globals__["fraud_truth"](spec)
    payments = drifted["raw_payments"].merge(truth[["payment_id", "is_fraud", "tactic"]], on="payment_id")
    payments = payments[payments["paid_at"] >= cut].merge(drifted["raw_fraud_accounts"], on="account_id")
    mimic, legit = payments[payments["tactic"] == "mimic"], payments[~payments["is_fraud"]]
    fraud = payments[payments["is_fraud"]]
    assert len(mimic) >= 40 and len(mimic) > 0.6 * len(fraud)
    for frame in (mimic, legit):  # at home, on an old instrument, by day, for the account's usual amount
        assert (frame["country"] == frame["home_country"]).mean() > 0.88
        assert (frame["card_age_days"] >= 30).mean() > 0.85
        assert frame["paid_at"].dt.hour.between(8, 21).mean() > 0.85
    usual = legit.groupby("account_id")["amount"].median()
    ratio = [(f["amount"] / f["account_id"].map(usual)).median() for f in (mimic, legit)]
    assert 0.8 < ratio[0] / ratio[1] < 1.25, ratio


# --- point in time -----------------------------------------------------------------------------------
def expected_features(payments: pd.DataFrame, accounts: pd.DataFrame, account: str, at: pd.Timestamp) -> dict:
    """The account's features at ``at``, computed in pandas from its payments strictly before ``at``."""
    mine = payments[(payments["account_id"] == account) & (payments["paid_at"] < at)]
    home = accounts.set_index("account_id").loc[account]

    def window(days):
        return mine[mine["paid_at"] >= at - days * DAY]

    w1, w7, w30 = window(1), window(7), window(30)
    ok30 = w30[w30["status"] == "succeeded"]
    return {
        "payments_1d": len(w1), "payments_7d": len(w7), "payments_30d": len(w30),
        "spend_1d": w1.loc[w1["status"] == "succeeded", "amount"].sum(),
        "spend_7d": w7.loc[w7["status"] == "succeeded", "amount"].sum(),
        "spend_30d": ok30["amount"].sum(),
        "avg_amount_30d": ok30["amount"].mean() if len(ok30) else np.nan,
        "max_amount_30d": ok30["amount"].max() if len(ok30) else np.nan,
        "failed_share_7d": (w7["status"] == "failed").mean() if len(w7) else 0.0,
        "failed_share_30d": (w30["status"] == "failed").mean() if len(w30) else 0.0,
        "countries_7d": w7["country"].nunique(), "countries_30d": w30["country"].nunique(),
        "instruments_7d": w7["instrument_id"].nunique(), "instruments_30d": w30["instrument_id"].nunique(),
        "foreign_share_30d": (w30["country"] != home["home_country"]).mean() if len(w30) else 0.0,
        "days_since_last_payment": (at - w30["paid_at"].max()) / DAY if len(w30) else np.nan,
        "tenure_days": (at - home["signup_date"]) / DAY,
        "plan": home["plan"], "home_country": home["home_country"],
    }


def test_training_rows_see_only_the_past_and_only_mature_labels(uc, sim):
    spec = replace(SPEC, today=150)
    frames = sim(spec)
    con = warehouse(uc, frames)
    as_of = st.clock(con, uc)
    training = st.build_training_set(con, uc)
    con.close()
    payments, accounts = frames["raw_payments"], frames["raw_fraud_accounts"]
    # Immature labels (payment + 45 days after the clock) never appear; mature ones are final.
    assert (training["prediction_time"] + 45 * DAY <= as_of).all()
    assert training["prediction_time"].max() > as_of - 47 * DAY  # ...and the newest mature ones do
    truth = sim.__globals__["fraud_truth"](spec).set_index("payment_id")["is_fraud"]
    assert (training["is_fraud"].to_numpy() == truth.loc[training["payment_id"]].to_numpy()).all()
    # Each payment is scored with its account's row of the midnight before it (as served that day).
    assert (training["available_at"] <= training["prediction_time"]).all()
    assert (training["available_at"] == training["prediction_time"].dt.floor("D")).all()
    request = payments.set_index("payment_id").loc[training["payment_id"]]
    assert (request["account_id"].to_numpy() == training["account_id"].to_numpy()).all()
    assert np.allclose(request["amount"], training["amount"])
    sample = pd.concat([training[training["is_fraud"] == 1].sample(15, random_state=0),
                        training.sample(25, random_state=1)])
    for _, row in sample.iterrows():
        # the row's features come from events before available_at, hence strictly before the payment
        expected = expected_features(payments, accounts, row["account_id"], row["available_at"])
        for column, value in expected.items():
            if column in uc.features.categorical:
                assert row[column] == value, (row["payment_id"], column)
            else:
                assert np.isclose(row[column], value, rtol=1e-9, equal_nan=True), (row["payment_id"], column,
                                                                                    row[column], value)


def test_early_labels_are_the_open_windows_observed_long_enough_labelled_as_known_so_far(uc, sim):
    """``build_provisional_set``: payments whose 45-day window is still open but that are at least
    ``early_after_days`` old, labelled by the chargebacks reported before the clock, joined point in
    time as the training set; the chargeback delay is right-skewed, so most frauds are known by then."""
    assert uc.label.early_after_days == 14
    spec = replace(SPEC, today=150)
    frames = sim(spec)
    con = warehouse(uc, frames)
    as_of = st.clock(con, uc)
    training = st.build_training_set(con, uc)
    early = st.build_provisional_set(con, uc)
    con.close()
    assert len(early) > 1000 and set(training.columns) <= set(early.columns)
    assert (early["prediction_time"] + 45 * DAY > as_of).all()
    assert (early["prediction_time"] + 14 * DAY <= as_of).all()
    assert early["prediction_time"].min() < as_of - 44 * DAY and early["prediction_time"].max() > as_of - 15 * DAY
    assert np.allclose(early["observed_days"], (as_of - early["prediction_time"]) / DAY)
    assert not set(early["payment_id"]) & set(training["payment_id"])
    # the label as known at the clock: a reported chargeback is a known fraud, nothing else is
    reported = frames["raw_chargebacks"].set_index("payment_id")["reported_at"]
    known = early["payment_id"].map(reported)
    assert (early["is_fraud"].to_numpy() == (known.notna() & (known < as_of)).to_numpy()).all()
    truth = sim.__globals__["fraud_truth"](spec).set_index("payment_id")["is_fraud"]
    eventual = truth.loc[early["payment_id"]].to_numpy()
    assert (early["is_fraud"].to_numpy() <= eventual).all()  # a known positive is a positive
    assert early["is_fraud"].sum() >= 0.8 * eventual.sum()  # most frauds are known 14 days on
    assert (early["available_at"] == early["prediction_time"].dt.floor("D")).all()


def test_early_after_days_is_checked_against_the_horizon_and_the_problem_type(uc, tmp_path):
    import shutil

    import yaml

    from mlops.core.usecase import UseCaseError

    for changes, message in (({"early_after_days": 45}, "label.early_after_days 45 must be under label.horizon_days"),
                             ({"early_after_days": 0}, "label.early_after_days"),
                             ({"classes": ["a", "b", "c"]}, None)):
        folder = tmp_path / "fraud"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(FOLDER, folder)
        raw = yaml.safe_load((folder / "usecase.yaml").read_text())
        raw["label"].update(changes)
        if "classes" in changes:  # a multiclass use case may not declare early labels
            raw.update(problem_type="multiclass", monitoring={})
            raw["model"]["objective"] = "multiclass"
            message = "label.early_after_days: early labels are for a binary label"
        (folder / "usecase.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(UseCaseError, match=message) as failure:
            load_usecase(folder)
        assert str(folder / "usecase.yaml") in str(failure.value)


@pytest.mark.parametrize(("days", "message"), [
    (46, "monitoring.realized_after_days 46 must be at most label.horizon_days 45"),
    (0, "monitoring.realized_after_days 0 must be a whole number of days >= 1"),
    (7.5, "monitoring.realized_after_days 7.5 must be a whole number"),
    (True, "monitoring.realized_after_days True must be a whole number"),
])
def test_realized_after_days_is_checked(uc, tmp_path, days, message):
    import shutil

    import yaml

    from mlops.core.monitoring import MonitorSpec
    from mlops.core.usecase import UseCaseError

    assert MonitorSpec.of(uc).realized_after_days == 14
    folder = tmp_path / "fraud"
    shutil.copytree(FOLDER, folder)
    raw = yaml.safe_load((folder / "usecase.yaml").read_text())
    raw["monitoring"]["realized_after_days"] = days
    (folder / "usecase.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UseCaseError, match=message):
        load_usecase(folder)


def test_the_analysis_frame_gives_early_labels_only_when_asked(uc, sim, tmp_path):
    """``usecase_analysis_frame(..., early_after_days=14)``: logged payments whose window has closed
    carry their label, those observed 14 days or more the label as known at the clock (the shadow
    comparison's evidence in an episode), younger ones none; without it only the closed ones."""
    from mlops.core.monitoring import TIMESTAMP, usecase_analysis_frame
    from mlops.core.online import snapshot_file_name
    from mlops.core.prediction_log import prediction_log_ddl, prediction_log_table

    spec = replace(SPEC, today=150)
    frames = sim(spec)
    con = warehouse(uc, frames)
    origin = st.clock(con, uc)
    labels = st.labels_as_of(con, uc, origin).set_index("payment_id")["is_fraud"]
    table = prediction_log_table(uc.name)
    con.execute(prediction_log_ddl(table))
    # snapshot version -> day: closed windows, three weeks of early ones, too young
    days = dict(enumerate([100, *range(112, 133), 140], start=1))
    payments = frames["raw_payments"]
    for version, day in days.items():
        at = pd.Timestamp("2026-04-01") + day * DAY
        snapshot = con.execute(f"SELECT * FROM {st.feature_table(uc)} WHERE available_at = ?", [at]).df()  # noqa: S608
        snapshot.to_parquet(tmp_path / snapshot_file_name(version))
        paid = payments[(payments["paid_at"] >= at) & (payments["paid_at"] < at + DAY)
                        & payments["payment_id"].isin(labels.index)]
        log = pd.DataFrame({"prediction_id": paid["payment_id"], "tenant": "payco", "account_id": paid["payment_id"],
                            "role": "champion", "model_version": "1", "score": 0.5, "latency_ms": 1.0,
                            "snapshot_version": version, "endpoint": "predict", "requested_at": at,
                            "segment": "segment-1"})
        con.register("log_rows", log)
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM log_rows")  # noqa: S608 - derived name
        con.unregister("log_rows")
    plain = usecase_analysis_frame(con, uc, tmp_path, "1", 365, origin)
    early = usecase_analysis_frame(con, uc, tmp_path, "1", 365, origin, early_after_days=14)
    censored = usecase_analysis_frame(con, uc, tmp_path, "1", 365, origin, realized_after_days=10)
    # what the labels SQL said ten days after each payment's day, for three of the days
    then = {day: st.labels_as_of(con, uc, pd.Timestamp("2026-04-01") + (day + 10) * DAY)
            .set_index("payment_id")["is_fraud"] for day in (100, 112, 132)}
    con.close()
    # Monitoring's censored label (monitoring.realized_after_days): fraud as known ten days after
    # the payment's day, for every payment whose tenth day has come; none for the others.
    assert list(censored.columns) == list(plain.columns) and len(censored) == len(plain)
    censored_day = ((pd.to_datetime(censored[TIMESTAMP]) - pd.Timestamp("2026-04-01")) / DAY).astype(int)
    assert censored.loc[censored_day >= 141, "is_fraud"].isna().all()
    assert censored.loc[censored_day < 140, "is_fraud"].notna().all()
    for day, known_then in then.items():
        rows = censored[censored_day == day]
        assert len(rows) > 20
        assert (rows["is_fraud"].to_numpy() == rows["payment_id"].map(known_then).to_numpy()).all()
    # known by the tenth day <= known by the clock: some frauds of days 112-130 came later
    within = censored[(censored_day >= 112) & (censored_day <= 130)].set_index("prediction_id")["is_fraud"]
    by_now = early.set_index("prediction_id").loc[within.index, "is_fraud"]
    assert (within <= by_now).all() and 0 < within.sum() < by_now.sum()
    assert len(early) == len(plain) > 1000 and early["prediction_id"].is_unique
    age = (origin - pd.to_datetime(early[TIMESTAMP])) / DAY
    closed, young = age >= 50, age < 14
    assert early.loc[young, "is_fraud"].isna().all() and young.sum() > 100
    assert early.loc[~young, "is_fraud"].notna().all() and (~young & ~closed).sum() > 500
    known = early.loc[~young, "payment_id"].map(labels)
    assert (early.loc[~young, "is_fraud"].to_numpy() == known.to_numpy()).all()
    assert early.loc[~young & ~closed, "is_fraud"].sum() > 0  # chargebacks already reported
    plain = plain.set_index("prediction_id").loc[early["prediction_id"]]
    assert plain["is_fraud"].notna().to_numpy().tolist() == closed.tolist()


def test_an_episode_retrain_learns_the_new_tactic_from_early_labels(uc, sim):
    """``fit_for_episode`` on the labels of a clock a month after a new tactic started: the early
    labels hold the new tactic's first weeks, and the retrain trains on them (the matured ones do not
    hold it yet) and beats the routine model on the next weeks' payments."""
    spec = TenantSpec(name="payco", region="eu", n_accounts=3000, seed=7, days=285, scenario="concept_drift",
                      drift_day=150, today=195)
    con = warehouse(uc, sim(spec))
    training = st.build_training_set(con, uc)
    early = st.build_provisional_set(con, uc)
    con.close()
    drift = pd.Timestamp("2026-04-01") + 150 * DAY
    assert early.loc[early["prediction_time"] >= drift, "is_fraud"].sum() >= 20
    retrained = um.fit_for_episode(uc, training, early, drift, who="payco")
    assert retrained.early_rows == len(early) and len(retrained.comparison) > 1
    assert len(retrained.split.train) > len(um.time_split(uc, training).train)  # the early rows are in
    routine = um.train(uc, um.time_split(uc, training).train)
    later = replace(spec, today=285)
    con = warehouse(uc, sim(later))
    future = st.build_training_set(con, uc)
    con.close()
    future = future[future["prediction_time"] >= pd.Timestamp("2026-04-01") + 195 * DAY]
    y = future["is_fraud"].to_numpy()
    from sklearn.metrics import average_precision_score

    assert (average_precision_score(y, um.predict(uc, retrained.booster, future))
            > average_precision_score(y, um.predict(uc, routine, future)) + 0.05)


# --- the pipeline through the generated assets ----------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from definitions import build_definitions

    home = tmp_path_factory.mktemp("fraud_home")
    defs = build_definitions(str(home))  # the project's own usecases/ root
    r = defs.resources
    r["settings"].ensure_home()
    r["registry"].ensure_experiment()
    r["catalog"].add(SPEC)
    with open_instance(home) as instance:
        instance.add_dynamic_partitions("tenant", [SPEC.name])
        result = defs.resolve_job_def("fraud_pipeline").execute_in_process(
            instance=instance, partition_key=SPEC.name, raise_on_error=False)
    return {"home": home, "defs": defs, "result": result}


@pytest.mark.slow
def test_the_fraud_pipeline_trains_gates_registers_and_publishes(uc, pipeline):
    from resources.registry import LINEAGE_TAGS

    result = pipeline["result"]
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    checks = {e.event_specific_data.check_name: e.event_specific_data.passed for e in result.all_events
              if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert checks == {"inbox_files_accepted": True, "training_data_integrity": True, "no_training_serving_skew": True,
                      **{gate: True for gate in um.gate_names(uc)}}
    model = next(e for e in result.all_events
                 if e.is_step_materialization and e.asset_key.to_user_string() == "fraud/model")
    meta = model.event_specific_data.materialization.metadata
    quality = {k: round(meta[k].value, 4) for k in ("pr_auc", "roc_auc", "recall_at_precision", "base_rate")}
    print(f"\nfraud holdout ({int(meta['holdout_rows'].value)} payments): {quality}")
    assert quality["pr_auc"] >= 0.25 and quality["recall_at_precision"] >= 0.2 and quality["roc_auc"] >= 0.85

    registry = pipeline["defs"].resources["registry"]
    champion = registry.alias_version(SPEC.name, "champion", use_case="fraud")
    assert champion is not None and champion.name == f"fraud-{SPEC.name}"
    assert set(LINEAGE_TAGS) <= set(champion.tags) and champion.tags["use_case"] == "fraud"
    assert registry.alias_version(SPEC.name, "champion") is None  # churn's model was not trained

    manifest = json.loads((pipeline["home"] / "serving" / "manifest.json").read_text())
    section = manifest["use_cases"]["fraud"]
    assert section["tenants"][SPEC.name]["champion"]["version"] == str(champion.version)
    assert section["declaration"]["entity"]["key"] == "payment_id"
    assert [f["name"] for f in section["declaration"]["request_fields"]] == list(uc.request_field_names)
    snapshot = pd.read_parquet(pipeline["home"] / "serving" / section["tenants"][SPEC.name]["snapshot"]["file"])
    assert snapshot["account_id"].is_unique and len(snapshot) > 1000


@pytest.mark.slow
def test_the_monitoring_reference_is_labelled_as_monitoring_labels_what_the_model_scores(uc, pipeline):
    """``usecase_reference_frame``: the champion's holdout, each payment's label as known 14 days
    after its day (``monitoring.realized_after_days``), as the analysis frame labels the traffic."""
    from mlops.core.monitoring import reference_frame, usecase_reference_frame

    registry, warehouse = (pipeline["defs"].resources[k] for k in ("registry", "warehouse"))
    version = str(registry.alias_version(SPEC.name, "champion", use_case="fraud").version)
    with warehouse.connect(SPEC.name) as con:
        final = reference_frame(con, version, use_case="fraud")
        censored = usecase_reference_frame(con, uc, version)
    assert len(censored) == len(final) > 1000  # every holdout payment is older than 14 days
    assert (censored["payment_id"].to_numpy() == final["payment_id"].to_numpy()).all()
    assert (censored["is_fraud"].to_numpy() <= final["is_fraud"].to_numpy()).all()
    assert 0.6 * final["is_fraud"].sum() <= censored["is_fraud"].sum() <= final["is_fraud"].sum()


@pytest.mark.slow
def test_the_service_scores_a_payment_from_its_fields_and_its_accounts_online_aggregates(uc, pipeline, tmp_path):
    """Request-time scoring: the request carries the payment's fields and its account; the service joins
    the account's online aggregates. The score equals the training path's on the same row (no skew)."""
    import lightgbm as lgb
    import requests

    from mlops.core.model_inputs import ModelInputs
    from mlops.core.serving import ApiKeyStore, serving_dir
    from tests.servers import bentoml_service

    home = pipeline["home"]
    entry = json.loads((home / "serving" / "manifest.json").read_text())["use_cases"]["fraud"]["tenants"][SPEC.name]
    snapshot = pd.read_parquet(home / "serving" / entry["snapshot"]["file"])
    booster = lgb.Booster(model_file=str(home / "serving" / entry["champion"]["model_file"]))
    key = ApiKeyStore(serving_dir(home)).create(SPEC.name)
    payments = [
        {"payment_id": f"p-{i}", "account_id": account, "amount": amount, "currency": "EUR", "country": country,
         "payment_method": "card", "card_age_days": card_age, "hour_of_day": hour}
        for i, (account, amount, country, card_age, hour) in enumerate([
            (snapshot["account_id"].iloc[0], 25.0, "DE", 900.0, 14.0),
            (snapshot["account_id"].iloc[1], 1800.0, "NG", 0.0, 3.0),
            (snapshot["account_id"].iloc[2], 12.5, "PH", 2000.0, 11.0)])
    ]
    with bentoml_service(home, tmp_path / "serve.log") as service:
        headers = {"Authorization": f"Bearer {key}"}
        scores = []
        for payment in payments:
            response = requests.post(f"{service['url']}/v1/fraud/predict", headers=headers, timeout=30,
                                     json={"tenant": SPEC.name, **payment})
            assert response.status_code == 200, response.text
            assert response.json()["payment_id"] == payment["payment_id"]
            scores.append(response.json()["score"])
        missing = requests.post(f"{service['url']}/v1/fraud/predict", headers=headers, timeout=30,
                                json={"tenant": SPEC.name, **{k: v for k, v in payments[0].items() if k != "amount"}})
        assert missing.status_code == 400 and "amount" in missing.text
        unknown = requests.post(f"{service['url']}/v1/fraud/predict", headers=headers, timeout=30,
                                json={"tenant": SPEC.name, **payments[0], "account_id": "nobody"})
        assert unknown.status_code == 404 and "nobody" in unknown.text
    rows = pd.DataFrame(payments).merge(snapshot, on="account_id")
    expected = booster.predict(ModelInputs.of(uc).to_model_matrix(rows))
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)
    assert scores[1] > scores[0]  # a new card, a large amount, abroad at night: riskier


# --- the new fraud tactic (the oracle of issue 13) ------------------------------------------------------
@pytest.mark.slow
def test_a_model_from_before_the_new_tactic_decays_and_retraining_repairs_it(uc, sim):
    """Days 0-239, the new tactic from day 120, the clock at 240 (labels mature to day 195). Model A
    learns days 30-99; model B days 30-159 (40 days of the new tactic). Both are scored on days 160-194."""
    spec = TenantSpec(name="payco", region="eu", n_accounts=1500, seed=7, days=240, scenario="concept_drift",
                      drift_day=120)
    con = warehouse(uc, sim(spec))
    training = st.build_training_set(con, uc)
    con.close()
    day = (training["prediction_time"] - pd.Timestamp("2026-04-01")).dt.days

    def rows(lo, hi):
        return training[(day >= lo) & (day < hi)]

    def quality(booster, lo, hi):
        part = rows(lo, hi)
        metrics = um.evaluate(uc, part["is_fraud"], um.predict(uc, booster, part))
        return {k: round(metrics[k], 3) for k in ("pr_auc", "roc_auc", "recall_at_precision")} | {
            "frauds": int(part["is_fraud"].sum())}

    before = um.train(uc, rows(30, 100))
    retrained = um.train(uc, rows(30, 160))
    pre, post, repaired = quality(before, 100, 120), quality(before, 160, 195), quality(retrained, 160, 195)
    print(f"\nnew fraud tactic: before-drift model on pre-drift {pre}; on post-drift {post}; "
          f"retrained on post-drift {repaired}")
    assert pre["pr_auc"] >= 0.6
    assert post["pr_auc"] <= pre["pr_auc"] - 0.3  # the new tactic slips past the old model
    assert repaired["pr_auc"] >= post["pr_auc"] + 0.3
    assert repaired["pr_auc"] - post["pr_auc"] >= 0.7 * (pre["pr_auc"] - post["pr_auc"])  # most of it recovered
