"""The real BentoML service over HTTP on loopback: auth, validation, shadow logging, prediction-log
ingestion exactly once, promotion under load and rollback without a restart."""

import json
import os
import signal
import time

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
import requests

from mlops.core.deployment import promote_challenger, rollback_champion
from mlops.core.serving import ApiKeyStore, prediction_log_dir, read_manifest, serving_dir
from resources.feature_store import to_model_matrix
from tests.conftest import TEST_TENANT
from tests.servers import Load, bentoml_service, served_by_workers, wait_until

pytestmark = pytest.mark.slow
TENANT = TEST_TENANT.name


@pytest.fixture(scope="module")
def service(platform_home, tmp_path_factory):
    home = platform_home["home"]
    folder = serving_dir(home)
    keys = ApiKeyStore(folder)
    tenant_key, other_key, revoked_key = keys.create(TENANT), keys.create("acme"), keys.create(TENANT)
    keys.revoke(revoked_key.split("_")[1])
    log = tmp_path_factory.mktemp("bento") / "serve.log"
    with bentoml_service(home, log) as served:
        yield {**served, "key": tenant_key, "other_key": other_key, "revoked_key": revoked_key, "home": home}


def _post(service, route, body, key="default", raw=None):
    headers = {"Content-Type": "application/json"}
    key = service["key"] if key == "default" else key
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body)
    return requests.post(f"{service['url']}{route}", data=data, headers=headers, timeout=30)


def _snapshot(home):
    entry = read_manifest(serving_dir(home))["tenants"][TENANT]
    return entry, pd.read_parquet(serving_dir(home) / entry["snapshot"]["file"])


def test_predict_returns_the_champion_score_of_the_online_features(service):
    entry, snapshot = _snapshot(service["home"])
    account = snapshot["account_id"].iloc[7]
    response = _post(service, "/v1/predict", {"tenant": TENANT, "account_id": account})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"prediction_id", "tenant", "account_id", "score", "model_version"}
    assert body["tenant"] == TENANT and body["account_id"] == account
    assert body["model_version"] == entry["champion"]["version"] == "1"
    booster = lgb.Booster(model_file=str(serving_dir(service["home"]) / entry["champion"]["model_file"]))
    expected = booster.predict(to_model_matrix(snapshot.iloc[[7]]))[0]
    assert body["score"] == pytest.approx(expected, abs=1e-12)


def test_batch_scores_many_accounts(service):
    entry, snapshot = _snapshot(service["home"])
    accounts = snapshot["account_id"].iloc[:1000].tolist()
    response = _post(service, "/v1/predict_batch", {"tenant": TENANT, "account_ids": accounts})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["account_id"] for p in predictions] == accounts
    assert len({p["prediction_id"] for p in predictions}) == 1000
    # The published model is compiled, the service scores with the compiled trees (it says so when it
    # cannot), and the scores are LightGBM's.
    assert (serving_dir(service["home"]) / entry["champion"]["compiled"]["file"]).exists()
    assert "not its compiled object" not in service["log"].read_text()
    booster = lgb.Booster(model_file=str(serving_dir(service["home"]) / entry["champion"]["model_file"]))
    expected = booster.predict(to_model_matrix(snapshot.iloc[:1000]))
    assert [p["score"] for p in predictions] == pytest.approx(expected.tolist(), abs=1e-12, rel=0)


def _tiny_model(folder, seed=0, rounds=30):
    from resources.feature_store import FEATURE_COLUMNS

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(500, len(FEATURE_COLUMNS)))
    x[rng.random(x.shape) < 0.05] = np.nan  # missing values take LightGBM's default branches
    y = (x[:, 0] + rng.normal(size=500) > 0).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 8, "num_threads": 1},
                        lgb.Dataset(x, y), num_boost_round=rounds)
    folder.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(folder / "v1.txt"))
    return folder / "v1.txt", x


def test_compiled_model_scores_as_lightgbm_and_falls_back_when_it_cannot_be_used(tmp_path, capsys):
    from bentos.service import CompiledBooster, NativeBooster, load_scorer
    from mlops.core.serving import _model_entry

    model_file, x = _tiny_model(tmp_path / "models" / "t")
    entry = _model_entry(tmp_path, "t", "1")
    compiled = entry["compiled"]
    assert compiled["file"].startswith("models/t/v1-") and (tmp_path / compiled["file"]).exists()
    scorer = load_scorer(tmp_path, entry, x[:100])
    assert isinstance(scorer, CompiledBooster)
    expected = lgb.Booster(model_file=str(model_file)).predict(x)
    assert np.max(np.abs(scorer.predict(x) - expected)) <= 1e-12
    assert np.max(np.abs(scorer.predict(x[:1]) - expected[:1])) <= 1e-12

    # Publishing the same file again reuses the object; another model text gets another object.
    assert _model_entry(tmp_path, "t", "1")["compiled"] == compiled
    other, _ = _tiny_model(tmp_path / "models" / "u", seed=1)
    assert _model_entry(tmp_path, "u", "1")["compiled"]["file"].split("-")[-1] != compiled["file"].split("-")[-1]

    # Another architecture, a damaged object, or an object of another model: LightGBM scores instead.
    for broken in ({**compiled, "triple": "aarch64-unknown-linux-gnu"},
                   {**compiled, "file": "models/u/" + _model_entry(tmp_path, "u", "1")["compiled"]["file"].split("/")[-1]},
                   {**compiled, "file": "models/t/missing.o"}):
        scorer = load_scorer(tmp_path, {**entry, "compiled": broken}, x[:100])
        assert isinstance(scorer, NativeBooster), broken
        assert "is scored by LightGBM, not its compiled object" in capsys.readouterr().out
        assert np.max(np.abs(scorer.predict(x) - expected)) <= 1e-12


@pytest.mark.parametrize(
    ("key", "tenant", "status", "message"),
    [
        (None, TENANT, 401, "Authorization error"),
        ("mlk_nope_wrong", TENANT, 401, "Authorization error"),
        ("revoked_key", TENANT, 401, "Authorization error"),
        ("other_key", TENANT, 403, "Authorization error"),
        ("default", "acme", 403, "Authorization error"),
    ],
)
def test_authentication_and_tenant_isolation(service, key, tenant, status, message):
    # BentoML deliberately answers 401/403 with a generic message; the status tells which.
    key = service.get(key, key) if key in ("revoked_key", "other_key") else key
    _, snapshot = _snapshot(service["home"])
    response = _post(service, "/v1/predict", {"tenant": tenant, "account_id": snapshot["account_id"][0]}, key=key)
    assert response.status_code == status, response.text
    assert message in response.text


BAD_INPUTS = {
    "unknown account": ("/v1/predict", {"tenant": TENANT, "account_id": "no-such-account"}, None, 404, "no-such-account"),
    "wrong type": ("/v1/predict", {"tenant": TENANT, "account_id": 12345}, None, 400, "account_id"),
    "missing field": ("/v1/predict", {"tenant": TENANT}, None, 400, "account_id"),
    "NaN": ("/v1/predict", None, '{"tenant": "testco", "account_id": NaN}', 400, "account_id"),
    "Infinity": ("/v1/predict", None, '{"tenant": "testco", "account_id": Infinity}', 400, "account_id"),
    "malformed JSON": ("/v1/predict", None, '{"tenant": "testco", "account_id": ', 400, ""),
    "bad tenant name": ("/v1/predict", {"tenant": "../etc", "account_id": "x"}, None, 400, "tenant"),
    "empty batch": ("/v1/predict_batch", {"tenant": TENANT, "account_ids": []}, None, 400, "account_ids"),
    "oversized batch": ("/v1/predict_batch", {"tenant": TENANT, "account_ids": ["a"] * 10_001}, None, 400,
                        "account_ids"),
    "batch with unknown": ("/v1/predict_batch", {"tenant": TENANT, "account_ids": ["ghost-1"]}, None, 404, "ghost-1"),
    "null in batch": ("/v1/predict_batch", {"tenant": TENANT, "account_ids": [None]}, None, 400, "account_ids"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_service_keeps_serving(service, case):
    route, body, raw, status, fragment = BAD_INPUTS[case]
    response = _post(service, route, body, raw=raw)
    assert response.status_code == status, response.text
    assert fragment in response.text
    _, snapshot = _snapshot(service["home"])
    ok = _post(service, "/v1/predict", {"tenant": TENANT, "account_id": snapshot["account_id"][1]})
    assert ok.status_code == 200


def test_openapi_documents_the_contract_the_fast_path_validates(service):
    """The churn routes' input is declared once (PredictInput, PredictBatchInput): the OpenAPI
    document shows exactly the fields and constraints the fast path validates with."""
    from bentos.service import PredictBatchInput, PredictInput

    spec = requests.get(f"{service['url']}/docs.json", timeout=10).json()

    def schema_of(path: str) -> dict:
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        while "$ref" in schema:
            schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        return schema

    for path, model in (("/v1/predict", PredictInput), ("/v1/predict_batch", PredictBatchInput)):
        documented, declared = schema_of(path), model.model_json_schema()
        assert documented["properties"] == declared["properties"], path
        assert set(documented["required"]) == set(declared["required"]), path


def test_health_and_metrics(service):
    assert requests.get(f"{service['url']}/livez", timeout=5).status_code == 200
    assert requests.get(f"{service['url']}/readyz", timeout=5).status_code == 200
    metrics = requests.get(f"{service['url']}/metrics", timeout=5).text
    assert "churn_prediction_latency_seconds" in metrics
    assert f'tenant="{TENANT}"' in metrics and 'model_version="1"' in metrics
    docs = requests.get(f"{service['url']}/docs.json", timeout=5).json()
    assert "/v1/predict" in docs["paths"] and "/v1/predict_batch" in docs["paths"]


def test_request_metrics_label_routes_not_the_paths_clients_send(service):
    """BentoML labels its request metrics by the raw path: each made-up path a client sends, with or
    without a key, would add series for good. Labels come from the service's routes."""
    made_up = [f"/scan-{i}-{os.urandom(4).hex()}" for i in range(30)]
    use_cases = [f"nouc{os.urandom(3).hex()}" for _ in range(30)]
    for path in made_up:
        assert requests.get(f"{service['url']}{path}", timeout=5).status_code == 404
    for name in use_cases:  # an unknown use case is still answered by name: the request keeps its path
        response = _post(service, f"/v1/{name}/predict", {"tenant": TENANT})
        assert response.status_code == 404 and name in response.json()["error"], response.text
    entry, snapshot = _snapshot(service["home"])
    account = snapshot["account_id"].iloc[3]
    assert _post(service, "/v1/churn/predict", {"tenant": TENANT, "account_id": account}).status_code == 200
    assert _post(service, "/v1/predict", {"tenant": TENANT, "account_id": account}).status_code == 200

    metrics = requests.get(f"{service['url']}/metrics", timeout=5).text
    assert not [line for line in metrics.splitlines() if any(p in line for p in made_up + use_cases)]

    def requests_total(endpoint: str, code: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("bentoml_service_request_total{") and f'endpoint="{endpoint}"' in line
                   and f'http_response_code="{code}"' in line)
    assert requests_total("/{unmatched}", "404") >= 30
    assert requests_total("/v1/{use_case}/predict", "404") >= 30
    assert requests_total("/v1/churn/predict", "200") >= 1 and requests_total("/v1/predict", "200") >= 1


@pytest.fixture(scope="module")
def with_challenger(service, platform_home):
    """Retrain with the default gates: the new version becomes challenger and is published."""
    from definitions import build_definitions

    defs = build_definitions(str(platform_home["home"]))
    with platform_home["instance"]() as instance:
        result = defs.resolve_job_def("churn_pipeline").execute_in_process(
            instance=instance, partition_key=TENANT, raise_on_error=False)
    assert result.success
    entry = read_manifest(serving_dir(platform_home["home"]))["tenants"][TENANT]
    assert entry["champion"]["version"] == "1" and entry["challenger"] is not None
    challenger = entry["challenger"]["version"]
    # every worker of the service has loaded the new manifest (its status file says what it serves)
    wait_until(lambda: (workers := served_by_workers(service)) and all(
        w.get(TENANT, {}).get("challenger") == challenger and w[TENANT].get("champion") == "1"
        and w[TENANT].get("snapshot_version") == entry["snapshot"]["version"] for w in workers.values()),
        f"every service worker to serve champion 1 and challenger {challenger}")
    return defs, challenger


def _ingest_log(defs, platform_home):
    with platform_home["instance"]() as instance:
        result = defs.resolve_job_def("prediction_log_ingestion").execute_in_process(
            instance=instance, partition_key=TENANT)
    return result.asset_materializations_for_node("prediction_log")[0].metadata


def _logged_roles(closed, ids) -> dict[str, int]:
    """How many rows of each role the closed segments hold for ``ids``."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for path in closed.glob("segment-*.parquet"):
        table = pq.read_table(path, columns=["prediction_id", "role"]).to_pydict()
        for pid, role in zip(table["prediction_id"], table["role"], strict=True):
            if pid in ids:
                counts[role] = counts.get(role, 0) + 1
    return counts


def test_shadow_predictions_are_logged_under_the_same_id_and_ingested_once(service, with_challenger, platform_home):
    defs, challenger_version = with_challenger
    _, snapshot = _snapshot(service["home"])
    ids = []
    for account in snapshot["account_id"].iloc[:20]:
        response = _post(service, "/v1/predict", {"tenant": TENANT, "account_id": account})
        assert response.status_code == 200 and response.json()["model_version"] == "1"
        ids.append(response.json()["prediction_id"])
    # both roles of every prediction are in closed segments (the writer rotates them once a second)
    closed = prediction_log_dir(service["home"], TENANT) / "closed"
    wait_until(lambda: _logged_roles(closed, ids) == {"champion": 20, "challenger": 20},
               "the 20 predictions and their shadows in closed log segments")

    def shadowed():
        metrics = requests.get(f"{service['url']}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("churn_shadow_requests_total{") and f'tenant="{TENANT}"' in line
                   and 'outcome="shadowed"' in line and 'endpoint="predict"' in line) >= 20
    wait_until(shadowed, "the shadow metric to count the 20 shadowed predictions")
    first = _ingest_log(defs, platform_home)
    assert first["segments_ingested"].value >= 1
    second = _ingest_log(defs, platform_home)
    assert second["segments_ingested"].value == 0 and second["rows_ingested"].value == 0
    warehouse = defs.resources["warehouse"]
    with warehouse.connect(TENANT, read_only=True) as con:
        rows = con.execute(
            "SELECT prediction_id, role, model_version FROM prediction_log WHERE list_contains(?, prediction_id)",
            [ids]).fetchall()
        duplicates = con.execute(
            "SELECT count(*) - count(DISTINCT (prediction_id, role)) FROM prediction_log").fetchone()[0]
    assert duplicates == 0
    by_id = {}
    for pid, role, version in rows:
        by_id.setdefault(pid, {})[role] = version
    assert set(by_id) == set(ids)
    assert all(v == {"champion": "1", "challenger": challenger_version} for v in by_id.values())


def test_promotion_under_load_drops_no_request_then_rollback(service, with_challenger, platform_home):
    defs, challenger_version = with_challenger
    r = defs.resources
    _, snapshot = _snapshot(service["home"])
    accounts = snapshot["account_id"].iloc[:50].tolist()
    with Load(f"{service['url']}/v1/predict", {"Authorization": f"Bearer {service['key']}"},
              lambda i: {"tenant": TENANT, "account_id": accounts[i % 50]}, threads=4) as load:
        wait_until(lambda: len(load.results) >= 30, "30 answers before the promotion")
        promoted_at = time.monotonic()
        promote_challenger(TENANT, r["registry"], r["feature_store"], r["settings"], r["warehouse"], reason="test")
        # every worker has swapped (its status file says so); then 20 more answers
        wait_until(lambda: (workers := served_by_workers(service)) and all(
            w.get(TENANT, {}).get("champion") == challenger_version for w in workers.values()),
            f"every service worker to serve champion {challenger_version}")
        swapped_at = time.monotonic()
        wait_until(lambda: len(load.answered_after(swapped_at)) >= 20, "20 answers after every worker swapped")
    # leaving the block failed had a client thread died; every request of every client got a 200
    load.assert_every_request_answered()
    results = load.results
    assert len(results) > 50
    assert {v for t, _, v in results if t < promoted_at} == {"1"}
    # a request being scored while its worker swapped may carry the old version; the last ten, sent
    # after every worker had swapped, carry the promoted one
    assert {v for _, _, v in results[-10:]} == {challenger_version}
    assert str(r["registry"].alias_version(TENANT, "champion").version) == challenger_version

    rollback_champion(TENANT, r["registry"], r["settings"], r["warehouse"], reason="test rollback")
    response = wait_until(  # the service polls the manifest every 0.5 s
        lambda: (r1 := _post(service, "/v1/predict", {"tenant": TENANT, "account_id": accounts[0]})).json()
        .get("model_version") == "1" and r1, "the rolled-back version to answer")
    assert response.status_code == 200
    assert str(r["registry"].alias_version(TENANT, "champion").version) == "1"
    actions = r["warehouse"].audit_entries(TENANT)["action"].tolist()
    assert actions.index("promotion") < actions.index("rollback")


def test_graceful_shutdown_loses_no_prediction(service, with_challenger, platform_home):
    defs, _ = with_challenger
    _, snapshot = _snapshot(service["home"])
    ids = [_post(service, "/v1/predict", {"tenant": TENANT, "account_id": a}).json()["prediction_id"]
           for a in snapshot["account_id"].iloc[100:110]]
    os.killpg(service["proc"].pid, signal.SIGTERM)
    service["proc"].wait(timeout=30)
    _ingest_log(defs, platform_home)
    with defs.resources["warehouse"].connect(TENANT, read_only=True) as con:
        found = con.execute(
            "SELECT count(DISTINCT prediction_id) FROM prediction_log WHERE list_contains(?, prediction_id)",
            [ids]).fetchone()[0]
    assert found == 10


def test_prediction_log_writer_keeps_every_row_in_order_and_loses_none_when_a_write_fails(tmp_path, capsys):
    from mlops.core.serving import LogChunk, PredictionLogWriter, prediction_log_dir

    writer = PredictionLogWriter(tmp_path, max_rows=10**6, max_age_s=3600)
    writer.append_one("t1", ("champion", "3", 7, "predict"), 1_700_000_000_000_001, 0.5, "id-1", "a-1", 0.25, 0.0)
    # a shadow micro-batch: numpy columns, one value for the rest
    writer.append_chunk("t1", LogChunk(2, "challenger", "4", 7, "predict", np.array([11, 12]), 0.1,
                                       ["id-1", "id-2"], ["a-1", "a-2"], np.array([0.75, 0.125])), 0.0)
    # per-row role and version (as ``append`` of dicts gives), and another tenant in between
    writer.append_one("t2", ("champion", "1", 1, "predict"), 5, 1.0, "id-9", "b-9", 0.5, 0.0)
    writer.append_chunk("t1", LogChunk(2, ["champion", "challenger"], ["3", "4"], 7, "predict_batch", 13, [0.2, 0.3],
                                       ["id-3", "id-3"], "a-3", [0.5, 0.625]), 0.0)
    with pytest.raises(ValueError, match="chunk of 2 rows has a column of 3 values"):  # the buffer is untouched
        writer.append_chunk("t1", LogChunk(2, "champion", "3", 7, "predict", 1, 0.1, ["x", "y"], "a", [0.5] * 3), 0.0)

    # The first write fails (the tenant's log folder is a file): its rows go back in front of the
    # ones appended since, and the next rotation writes them all.
    folder = prediction_log_dir(tmp_path, "t1")
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("in the way")
    with pytest.raises(OSError):
        writer.rotate_due(now=7200.0)
    writer.append_one("t1", ("champion", "3", 7, "predict"), 14, 0.4, "id-4", "a-4", 0.875, 7200.0)
    folder.unlink()
    writer.close()

    t1 = pd.concat([pd.read_parquet(p) for p in sorted((folder / "closed").glob("segment-*.parquet"))], ignore_index=True)
    assert t1["prediction_id"].tolist() == ["id-1", "id-1", "id-2", "id-3", "id-3", "id-4"]
    assert t1["account_id"].tolist() == ["a-1", "a-1", "a-2", "a-3", "a-3", "a-4"]
    assert t1["role"].tolist() == ["champion", "challenger", "challenger", "champion", "challenger", "champion"]
    assert t1["model_version"].tolist() == ["3", "4", "4", "3", "4", "3"]
    assert t1["endpoint"].tolist() == ["predict"] * 3 + ["predict_batch"] * 2 + ["predict"]
    assert t1["score"].tolist() == [0.25, 0.75, 0.125, 0.5, 0.625, 0.875]
    assert t1["latency_ms"].tolist() == [0.5, 0.1, 0.1, 0.2, 0.3, 0.4]
    assert t1["snapshot_version"].tolist() == [7] * 6
    assert t1["tenant"].unique().tolist() == ["t1"]
    assert t1["requested_at"].iloc[0] == pd.Timestamp("2023-11-14 22:13:20.000001")
    assert (t1["requested_at"].iloc[1:] - pd.Timestamp(0)).dt.total_seconds().mul(1e6).round().tolist() == [11, 12, 13, 13, 14]
    assert str(t1["requested_at"].dtype) == "datetime64[us]" and str(t1["score"].dtype) == "float64"
    t2 = pd.read_parquet(next((prediction_log_dir(tmp_path, "t2") / "closed").glob("segment-*.parquet")))
    assert t2[["prediction_id", "account_id", "score"]].values.tolist() == [["id-9", "b-9", 0.5]]

    # While segments cannot be written, a tenant keeps at most max_backlog_rows rows: the newest.
    small = PredictionLogWriter(tmp_path / "small", max_rows=10**6, max_age_s=3600, max_backlog_rows=2)
    for i in range(3):
        small.append_one("t3", ("champion", "1", 1, "predict"), i, 0.1, f"id-{i}", "a", 0.5, 0.0)
    folder = prediction_log_dir(tmp_path / "small", "t3")
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("in the way")
    with pytest.raises(OSError):
        small.rotate_due(now=7200.0)
    assert "dropped its 1 oldest rows" in capsys.readouterr().out
    folder.unlink()
    small.close()
    kept = pd.read_parquet(next((folder / "closed").glob("segment-*.parquet")))
    assert kept["prediction_id"].tolist() == ["id-1", "id-2"]

    # Rows appended while a failed segment was being written (a newer buffer) follow the failed
    # segment's rows, their role/version codes mapped onto the older buffer's.
    from mlops.core.serving import _segment_table, _SegmentBuffer

    older, newer = _SegmentBuffer(0.0), _SegmentBuffer(1.0)
    older.append_one(("champion", "1", 1, "predict"), 1, 0.1, "o-1", "a", 0.1)
    newer.append_one(("challenger", "2", 1, "predict"), 2, 0.2, "n-1", "b", 0.2)
    newer.append_one(("champion", "1", 1, "predict"), 3, 0.3, "n-2", "c", 0.3)
    older.absorb(newer)
    merged = _segment_table("t4", older).to_pandas()
    assert merged[["prediction_id", "role", "model_version", "score"]].values.tolist() == [
        ["o-1", "champion", "1", 0.1], ["n-1", "challenger", "2", 0.2], ["n-2", "champion", "1", 0.3]]
