"""One service for every use case: the spend use case (regression) published by hand into a bundle beside
a churn tenant, served by the real ``bentoml serve`` process over HTTP: scores equal LightGBM's on the
encoded snapshot row, auth and tenant isolation, validation naming the field, request fields, shadow
logging under one prediction id, and a promotion picked up without a restart or a failed request."""

import json
import math
import time

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
import requests

from mlops.core.model_inputs import CHURN_INPUTS, ModelInputs
from mlops.core.serving import (
    ApiKeyStore,
    publish_tenant,
    publish_usecase,
    read_manifest,
    rollback_usecase,
    serving_dir,
)
from mlops.core.usecase import load_usecase
from mlops.core.vocabulary import PLANS, SEGMENTS
from tests.servers import Load, bentoml_service, wait_until
from tests.usecase_fixtures import USECASE_YAML, write_spend_usecase

pytestmark = pytest.mark.slow
TENANT, OTHER = "acme", "globex"
REQUEST_FIELDS = """serving:
  lookup: true
  request_fields:
    - {name: basket, type: DOUBLE, min: 0, max: 100000}
    - {name: channel, type: VARCHAR, isin: [web, app, store]}
"""


def _snapshot(usecase, n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        usecase.entity.key: [f"{usecase.name}-c{i:05d}" for i in range(n)],
        "available_at": pd.Timestamp("2026-06-01"),
        "orders_7d": rng.poisson(2, n).astype(float),
        "spend_7d": rng.gamma(2.0, 20.0, n),
        "orders_28d": rng.poisson(8, n).astype(float),
        "spend_28d": rng.gamma(2.0, 80.0, n),
        "region": rng.choice(["north", "south", "west"], n),
    })
    frame.loc[3, "spend_7d"] = np.nan  # a missing value takes LightGBM's default branch
    return frame


def _train(usecase, path, seed: int) -> lgb.Booster:
    """A tiny regression model on random rows encoded as the use case encodes them."""
    rng = np.random.default_rng(seed)
    rows = _snapshot(usecase, 400, seed + 100)
    for field in usecase.serving.request_fields:
        rows[field.name] = (rng.choice(list(field.isin), 400) if field.isin else rng.gamma(2.0, 30.0, 400))
    y = rows["spend_28d"] * 0.4 + rng.normal(0, 5, 400)
    if "basket" in rows:
        y = y + rows["basket"]
    booster = lgb.train({"objective": "regression", "verbose": -1, "num_leaves": 7, "num_threads": 1,
                         "min_data_in_leaf": 10, "seed": seed},
                        lgb.Dataset(ModelInputs.of(usecase).to_model_frame(rows), y), num_boost_round=15 + seed)
    booster.save_model(str(path))
    return booster


def _churn_bundle(folder, tmp):
    """A churn tenant (random model over churn's inputs), so /v1/predict is served by the same process."""
    rng = np.random.default_rng(5)
    n = 30
    frame = pd.DataFrame({c: rng.gamma(2.0, 5.0, n) for c in CHURN_INPUTS.numeric})
    frame["plan"], frame["segment"] = rng.choice(PLANS, n), rng.choice(SEGMENTS, n)
    frame.insert(0, "account_id", [f"{TENANT}-{i:06d}" for i in range(n)])
    snap = tmp / "churn-features-v00001.parquet"
    frame.to_parquet(snap)
    x = rng.normal(size=(300, len(CHURN_INPUTS.columns)))
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7, "num_threads": 1},
                        lgb.Dataset(x, (x[:, 0] > 0).astype(int)), num_boost_round=10)
    booster.save_model(str(tmp / "churn-v1.txt"))
    publish_tenant(folder, TENANT, champion=("1", tmp / "churn-v1.txt"), challenger=None, snapshot=(1, snap))
    return frame, booster


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("usecase_serving")
    home = tmp / "home"
    folder = serving_dir(home)
    folder.mkdir(parents=True)
    spend = load_usecase(write_spend_usecase(tmp / "usecases"))
    # The request-fields variant: another use case (its folder's name) with two request fields.
    variant_folder = write_spend_usecase(tmp / "variant")
    variant_folder = variant_folder.rename(tmp / "variant" / "spend_rf")
    (variant_folder / "usecase.yaml").write_text(
        USECASE_YAML.replace("name: spend\n", "name: spend_rf\n").replace("serving: {lookup: true}\n", REQUEST_FIELDS))
    variant = load_usecase(variant_folder)
    assert [f.name for f in variant.serving.request_fields] == ["basket", "channel"]

    out = {"home": home, "folder": folder, "usecases": {"spend": spend, "spend_rf": variant}}
    for usecase in (spend, variant):
        snapshot = _snapshot(usecase, 25, 1)
        snap_file = tmp / f"{usecase.name}-features-v00001.parquet"
        snapshot.to_parquet(snap_file)
        models = {v: tmp / f"{usecase.name}-v{v}.txt" for v in ("1", "2")}
        boosters = {v: _train(usecase, models[v], seed=int(v)) for v in models}
        for tenant in (TENANT, OTHER):
            publish_usecase(folder, usecase, tenant, champion=("1", models["1"]), challenger=("2", models["2"]),
                            snapshot=(1, snap_file))
        out[usecase.name] = {"snapshot": snapshot, "models": models, "boosters": boosters, "snap_file": snap_file}
    out["churn"] = _churn_bundle(folder, tmp)
    keys = ApiKeyStore(folder)
    out["key"], out["other_key"] = keys.create(TENANT), keys.create(OTHER)
    return out


def test_publication_writes_the_bundle_and_the_declaration(bundle):
    manifest = read_manifest(bundle["folder"])
    assert set(manifest["tenants"]) == {TENANT}  # churn stays where it was
    spend = manifest["use_cases"]["spend"]
    entry = spend["tenants"][TENANT]
    assert set(entry) == {"champion", "challenger", "snapshot", "champion_history"}
    assert entry["champion"]["model_file"] == f"models/spend/{TENANT}/v1.txt"
    assert entry["champion"]["compiled"]["file"].startswith(f"models/spend/{TENANT}/v1-")
    assert entry["snapshot"]["file"] == f"online/spend/{TENANT}/spend-features-v00001.parquet"
    assert (bundle["folder"] / entry["champion"]["compiled"]["file"]).exists()
    declaration = spend["declaration"]
    assert declaration["entity"] == {"name": "customer", "key": "customer_id"}
    assert declaration["problem_type"] == "regression" and declaration["lookup"] is True
    assert declaration["inputs"] == {"numeric": ["orders_7d", "spend_7d", "orders_28d", "spend_28d"],
                                     "categorical": [["region", ["north", "south", "west"]]]}
    rf = manifest["use_cases"]["spend_rf"]["declaration"]
    assert rf["inputs"]["numeric"][-1] == "basket" and dict(rf["inputs"]["categorical"])["channel"] == ["web", "app", "store"]
    assert [f["name"] for f in rf["request_fields"]] == ["basket", "channel"]


@pytest.fixture(scope="module")
def service(bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("bento") / "serve.log"
    with bentoml_service(bundle["home"], log, {"CHURN_SHADOW_BATCH_SAMPLE": "1", "CHURN_SERVICE_WORKERS": "1"}) as served:
        yield {**bundle, **served}


def _post(service, route, body, key="default", raw=None):
    headers = {"Content-Type": "application/json"}
    key = service["key"] if key == "default" else key
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return requests.post(f"{service['url']}{route}", data=raw if raw is not None else json.dumps(body),
                         headers=headers, timeout=30)


def _expected(service, name, rows, version="1", **fields):
    usecase = service["usecases"][name]
    frame = service[name]["snapshot"].iloc[rows].copy()
    for field, value in fields.items():
        frame[field] = value
    return service[name]["boosters"][version].predict(ModelInputs.of(usecase).to_model_frame(frame))


def test_a_prediction_is_the_champions_score_of_the_encoded_snapshot_row(service):
    customer = service["spend"]["snapshot"]["customer_id"].iloc[3]
    response = _post(service, "/v1/spend/predict", {"tenant": TENANT, "customer_id": customer})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"prediction_id", "tenant", "customer_id", "score", "model_version"}
    assert body["tenant"] == TENANT and body["customer_id"] == customer and body["model_version"] == "1"
    assert body["score"] == pytest.approx(_expected(service, "spend", [3])[0], abs=1e-9)
    assert "not its compiled object" not in service["log"].read_text()  # scored by the compiled trees


def test_a_batch(service):
    customers = service["spend"]["snapshot"]["customer_id"].iloc[[0, 5, 3, 5, 9]].tolist()
    response = _post(service, "/v1/spend/predict_batch",
                     {"tenant": TENANT, "instances": [{"customer_id": c} for c in customers]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tenant"] == TENANT and body["model_version"] == "1"
    assert [p["customer_id"] for p in body["predictions"]] == customers
    assert len({p["prediction_id"] for p in body["predictions"]}) == 5
    assert [p["score"] for p in body["predictions"]] == pytest.approx(
        _expected(service, "spend", [0, 5, 3, 5, 9]).tolist(), abs=1e-9)


def _customer(service, i=0):
    return service["spend"]["snapshot"]["customer_id"].iloc[i]


REFUSALS = {
    "no key": ("/v1/spend/predict", lambda s: {"tenant": TENANT, "customer_id": _customer(s)}, None, None, 401,
               "Authorization error"),
    "wrong key": ("/v1/spend/predict", lambda s: {"tenant": TENANT, "customer_id": _customer(s)}, "mlk_x_y", None,
                  401, "Authorization error"),
    "key of another tenant": ("/v1/spend/predict", lambda s: {"tenant": TENANT, "customer_id": _customer(s)},
                              "other_key", None, 403, "Authorization error"),
    "another tenant's data": ("/v1/spend/predict", lambda s: {"tenant": OTHER, "customer_id": _customer(s)},
                              "default", None, 403, "Authorization error"),
    "unknown customer": ("/v1/spend/predict", lambda s: {"tenant": TENANT, "customer_id": "ghost-7"}, "default",
                         None, 404, "ghost-7"),
    "unknown customer in a batch": ("/v1/spend/predict_batch",
                                    lambda s: {"tenant": TENANT, "instances": [{"customer_id": "ghost-8"}]},
                                    "default", None, 404, "customer_id(s)"),
    "unknown use case": ("/v1/fraud/predict", lambda s: {"tenant": TENANT, "customer_id": "x"}, "default", None,
                         404, "unknown use case 'fraud'; deployed: churn, spend, spend_rf"),
    "missing tenant": ("/v1/spend/predict", lambda s: {"customer_id": _customer(s)}, "default", None, 400, "tenant"),
    "missing key field": ("/v1/spend/predict", lambda s: {"tenant": TENANT}, "default", None, 400, "customer_id"),
    "key of the wrong type": ("/v1/spend/predict", lambda s: {"tenant": TENANT, "customer_id": 17}, "default", None,
                              400, "customer_id"),
    "unknown field": ("/v1/spend/predict", lambda s: {"tenant": TENANT, "customer_id": "a", "custmer": 1},
                      "default", None, 400, "custmer"),
    "bad tenant name": ("/v1/spend/predict", lambda s: {"tenant": "../etc", "customer_id": "a"}, "default", None,
                        400, "tenant"),
    "empty batch": ("/v1/spend/predict_batch", lambda s: {"tenant": TENANT, "instances": []}, "default", None, 400,
                    "instances"),
    "oversized batch": ("/v1/spend/predict_batch",
                        lambda s: {"tenant": TENANT, "instances": [{"customer_id": "a"}] * 10_001}, "default", None,
                        400, "instances"),
    "malformed JSON": ("/v1/spend/predict", None, "default", '{"tenant": "acme", "customer_id": ', 400, ""),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_problem_and_the_service_keeps_serving(service, case):
    route, body, key, raw, status, fragment = REFUSALS[case]
    key = service[key] if key == "other_key" else key
    response = _post(service, route, body(service) if body else None, key=key, raw=raw)
    assert response.status_code == status, response.text
    assert fragment in response.text
    ok = _post(service, "/v1/spend/predict", {"tenant": TENANT, "customer_id": _customer(service, 1)})
    assert ok.status_code == 200


def test_request_fields_are_validated_and_scored(service):
    customer = service["spend_rf"]["snapshot"]["customer_id"].iloc[4]
    body = {"tenant": TENANT, "customer_id": customer, "basket": 42.5, "channel": "app"}
    response = _post(service, "/v1/spend_rf/predict", body)
    assert response.status_code == 200, response.text
    expected = _expected(service, "spend_rf", [4], basket=42.5, channel="app")[0]
    assert response.json()["score"] == pytest.approx(expected, abs=1e-9)
    # the request fields change the score: they are used, not ignored
    other = _post(service, "/v1/spend_rf/predict", {**body, "basket": 300})
    assert other.json()["score"] == pytest.approx(_expected(service, "spend_rf", [4], basket=300.0, channel="app")[0],
                                                  abs=1e-9)
    assert not math.isclose(other.json()["score"], response.json()["score"])
    batch = _post(service, "/v1/spend_rf/predict_batch", {"tenant": TENANT, "instances": [
        {"customer_id": customer, "basket": 42.5, "channel": "app"},
        {"customer_id": customer, "basket": 300, "channel": "app"}]})
    assert [p["score"] for p in batch.json()["predictions"]] == pytest.approx(
        [response.json()["score"], other.json()["score"]], abs=1e-12)

    for bad, fragment in (({"basket": "42.5"}, "basket"), ({"basket": True}, "basket"), ({"basket": -1}, "basket"),
                          ({"channel": "fax"}, "channel"), ({"channel": 3}, "channel")):
        response = _post(service, "/v1/spend_rf/predict", {**body, **bad})
        assert response.status_code == 400, (bad, response.text)
        assert fragment in response.text
    for missing in ("basket", "channel"):
        response = _post(service, "/v1/spend_rf/predict", {k: v for k, v in body.items() if k != missing})
        assert response.status_code == 400 and missing in response.text
    for raw in ('NaN', 'Infinity', '-Infinity'):
        response = _post(service, "/v1/spend_rf/predict", None,
                         raw=json.dumps({**body, "basket": 0}).replace('"basket": 0', f'"basket": {raw}'))
        assert response.status_code == 400 and "basket" in response.text, (raw, response.text)


def test_churn_is_served_by_the_same_process(service):
    frame, booster = service["churn"]
    account = frame["account_id"].iloc[2]
    expected = booster.predict(CHURN_INPUTS.to_model_matrix(frame.iloc[[2]]))[0]
    for route in ("/v1/predict", "/v1/churn/predict"):
        response = _post(service, route, {"tenant": TENANT, "account_id": account})
        assert response.status_code == 200, response.text
        assert set(response.json()) == {"prediction_id", "tenant", "account_id", "score", "model_version"}
        assert response.json()["score"] == pytest.approx(expected, abs=1e-12)
    batch = _post(service, "/v1/churn/predict_batch", {"tenant": TENANT, "account_ids": [account, account]})
    assert [p["score"] for p in batch.json()["predictions"]] == pytest.approx([expected] * 2, abs=1e-12)
    assert _post(service, "/v1/churn/predict", {"tenant": TENANT, "account_id": "nope"}).status_code == 404


def test_openapi_documents_the_use_case_routes_and_metrics_count_them(service):
    docs = requests.get(f"{service['url']}/docs.json", timeout=5).json()
    assert {"/v1/predict", "/v1/predict_batch", "/v1/{use_case}/predict", "/v1/{use_case}/predict_batch"} <= set(
        docs["paths"])
    metrics = requests.get(f"{service['url']}/metrics", timeout=5).text
    assert 'usecase_predictions_total{' in metrics and 'use_case="spend"' in metrics


def test_champion_and_shadow_rows_share_prediction_ids_in_the_use_cases_log(service):
    customers = service["spend"]["snapshot"]["customer_id"].iloc[:8].tolist()
    ids = [_post(service, "/v1/spend/predict", {"tenant": TENANT, "customer_id": c}).json()["prediction_id"]
           for c in customers]
    batch = _post(service, "/v1/spend/predict_batch",
                  {"tenant": TENANT, "instances": [{"customer_id": c} for c in customers]}).json()
    ids += [p["prediction_id"] for p in batch["predictions"]]
    folder = service["home"] / "prediction_logs" / "spend" / TENANT / "closed"

    def logged():  # segments rotate every second; the shadow's rows follow the champion's
        frames = [pd.read_parquet(p) for p in sorted(folder.glob("segment-*.parquet"))]
        log = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["prediction_id", "role"])
        mine = log[log["prediction_id"].isin(ids)]
        return mine if len(mine) == 2 * len(ids) else None

    mine = wait_until(logged, "the champion's and the shadow's rows of every prediction in closed segments")
    by_id = mine.groupby("prediction_id")["role"].apply(set)
    assert set(by_id.index) == set(ids)
    assert all(roles == {"champion", "challenger"} for roles in by_id)
    assert set(mine.loc[mine["role"] == "challenger", "model_version"]) == {"2"}
    assert set(mine["tenant"]) == {TENANT} and set(mine["account_id"]) == set(customers)  # the entity key
    challenger = mine[mine["role"] == "challenger"].drop_duplicates("prediction_id")
    assert challenger["score"].tolist() == pytest.approx(
        _expected(service, "spend", [customers.index(c) for c in challenger["account_id"]], version="2").tolist(),
        abs=1e-9)
    # churn's log stays where it was; no other tenant's log holds these predictions
    assert not (service["home"] / "prediction_logs" / "spend" / OTHER).exists()


def test_promotion_is_picked_up_without_a_restart_or_a_failed_request(service):
    customers = service["spend"]["snapshot"]["customer_id"].tolist()
    with Load(f"{service['url']}/v1/spend/predict", {"Authorization": f"Bearer {service['key']}"},
              lambda i: {"tenant": TENANT, "customer_id": customers[i % len(customers)]}) as load:
        wait_until(lambda: len(load.results) >= 20, "20 answers before the promotion")
        promoted_at = time.monotonic()
        published = service["spend"]
        publish_usecase(service["folder"], service["usecases"]["spend"], TENANT,
                        champion=("2", published["models"]["2"]), challenger=None,
                        snapshot=(1, published["snap_file"]))
        wait_until(lambda: sum(v == "2" for _, _, v in load.answered_after(promoted_at)) >= 20,
                   "20 answers of the promoted version")
    results = load.results
    assert len(results) > 30
    assert all(status == 200 for _, status, _ in results), {s for _, s, _ in results}
    assert {v for t, _, v in results if t < promoted_at} == {"1"}
    assert results[-1][2] == "2"
    response = _post(service, "/v1/spend/predict", {"tenant": TENANT, "customer_id": customers[3]})
    assert response.json()["score"] == pytest.approx(_expected(service, "spend", [3], version="2")[0], abs=1e-9)
    # the other tenant keeps its champion
    other = _post(service, "/v1/spend/predict", {"tenant": OTHER, "customer_id": customers[3]},
                  key=service["other_key"])
    assert other.json()["model_version"] == "1"

    # and a rollback goes back to v1, without the challenger, in the running service
    assert rollback_usecase(service["folder"], "spend", TENANT) == ("2", "1")
    entry = read_manifest(service["folder"])["use_cases"]["spend"]["tenants"][TENANT]
    assert entry["champion"]["version"] == "1" and entry["challenger"] is None
    response = wait_until(  # the service polls the manifest every 0.5 s
        lambda: (r := _post(service, "/v1/spend/predict", {"tenant": TENANT, "customer_id": customers[3]})).json()
        .get("model_version") == "1" and r, "the rolled-back version to answer")
    assert response.status_code == 200
    with pytest.raises(ValueError, match="no previous champion"):
        rollback_usecase(service["folder"], "spend", TENANT)
    with pytest.raises(KeyError, match="use case 'fraud' is not deployed"):
        rollback_usecase(service["folder"], "fraud", TENANT)


def test_multiclass_and_binary_answers():
    from bentos.usecase_serving import UseCaseDeclaration

    spec = {"name": "tier", "entity": {"name": "customer", "key": "customer_id"}, "problem_type": "multiclass",
            "classes": ["low", "mid", "high"], "lookup": False, "inputs": {"numeric": ["x"], "categorical": []},
            "features": [], "request_fields": [{"name": "x", "type": "DOUBLE", "nullable": True}]}
    declaration = UseCaseDeclaration(spec)
    scores = np.array([[0.2, 0.5, 0.3], [0.7, 0.2, 0.1]])
    answers = declaration.predictions("acme", "3", ["a", "b"], ["c1", None], scores)
    assert answers[0]["score"] == {"low": 0.2, "mid": 0.5, "high": 0.3} and answers[0]["predicted_class"] == "mid"
    assert answers[1]["predicted_class"] == "low" and answers[1]["customer_id"] is None
    assert declaration.logged_scores(scores).tolist() == [0.5, 0.7]
    # no lookup: the key may be left out, a nullable field too (a missing value)
    record = declaration.predict_model.model_validate({"tenant": "acme"})
    assert np.isnan(declaration.encode(np.empty((0, 1)), None, [record])).all()
    binary = UseCaseDeclaration({**spec, "problem_type": "binary", "classes": None})
    assert binary.predictions("acme", "1", ["a"], ["c"], np.array([0.25]))[0]["score"] == 0.25
