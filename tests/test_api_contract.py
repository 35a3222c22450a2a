"""The service's API contract, against a real ``bentoml serve`` process: the OpenAPI document states
every status, the error body, the bearer scheme and the package version; schemathesis (every phase)
finds no server error and no answer that breaks the document; bodies over the limit get 413 before
they are read; a key over its rate gets 429 with Retry-After; /metrics wants its token when one is set."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import itertools
import json
import socket
import time
import traceback
from collections import Counter
from urllib.parse import urlsplit

import pytest
import requests

from bentos.service import DISTRIBUTION, MAX_BODY_BYTES, SCORING_ROUTES, ErrorBody
from mlops.core.serving import ApiKeyStore
from tests.servers import bentoml_service, wait_until
from tests.test_usecase_serving import OTHER, TENANT, bundle  # noqa: F401 - the use-case home, reused

pytestmark = pytest.mark.slow
METRICS_TOKEN = "metrics-token-for-tests"
STATUSES = {"200", "400", "401", "403", "404", "413", "429", "503", "504"}
# Response checks: what the document promises (statuses, content types, bodies, headers), 4xx for invalid
# data, 401 without the key, 405 for other methods. A failed one is a contract violation.
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance", "negative_data_rejection",
          "ignored_auth", "unsupported_method", "missing_required_header")


@pytest.fixture(scope="module")
def service(bundle, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("contract") / "serve.log"
    env = {"CHURN_SERVICE_WORKERS": "1", "MLOPS_METRICS_TOKEN": METRICS_TOKEN}
    with bentoml_service(bundle["home"], log, env) as served:
        yield {**bundle, **served}


def _post(url, body, key=None, raw=None, **kwargs):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return requests.post(url, data=raw if raw is not None else json.dumps(body), headers=headers, timeout=30,
                         **kwargs)


def _error(response, status: int) -> ErrorBody:
    """The response's body as the one documented error model (extra fields refused)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return ErrorBody.model_validate(response.json())


def test_the_document_states_every_status_the_error_body_the_bearer_scheme_and_the_version(service):
    docs = requests.get(f"{service['url']}/docs.json", timeout=10).json()
    assert docs["info"]["version"] == md.version(DISTRIBUTION) != "None"
    scheme = docs["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    error = docs["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and set(error["properties"]) == {"error", "detail"}
    for path in SCORING_ROUTES:
        operation = docs["paths"][path]["post"]
        assert set(operation["responses"]) == STATUSES, path
        assert operation["security"] == [{"apiKey": []}], path
        for status in STATUSES - {"200"}:
            schema = operation["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}, (path, status)
        assert operation["responses"]["429"]["headers"]["Retry-After"]["required"] is True
    parameter = docs["paths"]["/v1/{use_case}/predict"]["post"]["parameters"][0]
    assert parameter["name"] == "use_case" and set(parameter["examples"]) == {"churn", "spend", "spend_rf"}
    assert docs["paths"]["/metrics"]["get"]["security"] == [{"metricsToken": []}]
    # BentoML's own error models are gone: one error model, documented once.
    assert not {"InvalidArgument", "NotFound", "InternalServerError"} & set(docs["components"]["schemas"])


def test_errors_have_the_documented_body(service):
    url, customer = service["url"], service["spend"]["snapshot"]["customer_id"].iloc[0]
    no_key = _error(_post(f"{url}/v1/spend/predict", {"tenant": TENANT, "customer_id": customer}), 401)
    assert no_key.error.startswith("Authorization error") and "Bearer" in no_key.error and not no_key.detail
    other = _error(_post(f"{url}/v1/spend/predict", {"tenant": TENANT, "customer_id": customer},
                         key=service["other_key"]), 403)
    assert "another tenant" in other.error and repr(TENANT) in other.error
    assert "Authorization error" in _error(_post(f"{url}/v1/predict", {"tenant": OTHER, "account_id": "a"},
                                                 key=service["key"]), 403).error
    invalid = _error(_post(f"{url}/v1/predict", {"tenant": TENANT, "account_id": 5}, key=service["key"]), 400)
    assert [(d.loc, d.type) for d in invalid.detail] == [(["account_id"], "string_type")]
    bad_json = _error(_post(f"{url}/v1/spend/predict", None, key=service["key"], raw="{"), 400)
    assert "not valid JSON" in bad_json.error
    assert "ghost" in _error(_post(f"{url}/v1/spend/predict", {"tenant": TENANT, "customer_id": "ghost"},
                                   key=service["key"]), 404).error
    for path in ("/v1/nope/predict", "/v1/a%2Fb/predict_batch", "/v1//predict"):
        assert "unknown use case" in _error(_post(f"{url}{path}", {}, key=service["key"]), 404).error, path
    # a string UTF-8 cannot encode (a lone surrogate): a 400 with the documented body, not a 500
    odd = _error(_post(f"{url}/v1/spend/predict", None, key=service["key"],
                       raw='{"tenant": "acme", "customer_id": "x", "\\ud800": 1}'), 400)
    assert odd.detail, odd


def _served_entities(service):
    """A schemathesis ``map_case`` hook: every other positive case names the key's tenant and entities the
    service knows (random strings are refused with 403/404), so that answers of 200 are checked too."""
    accounts = service["churn"][0]["account_id"].tolist()
    customers = service["spend"]["snapshot"]["customer_id"].tolist()
    turn = itertools.count()

    def map_case(context, case):
        body = case.body
        if case.meta is None or case.meta.generation.mode.value != "positive" or not isinstance(body, dict):
            return case
        if next(turn) % 2:
            return case
        use_case = (case.path_parameters or {}).get("use_case", "churn")
        batch = case.operation.path.endswith("_batch")
        size = len(body.get("account_ids") or body.get("instances") or [None]) if batch else 1
        if use_case == "churn":
            ids = [accounts[i % len(accounts)] for i in range(size)]
            case.body = {"tenant": TENANT, **({"account_ids": ids} if batch else {"account_id": ids[0]})}
        elif use_case == "spend":
            ids = [{"customer_id": customers[i % len(customers)]} for i in range(size)]
            case.body = {"tenant": TENANT, **({"instances": ids} if batch else ids[0])}
        return case

    return map_case


def test_schemathesis_finds_no_server_error_and_no_contract_violation(service, tmp_path):
    import hypothesis.configuration
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import events, from_schema

    hypothesis.configuration.set_hypothesis_home_dir(tmp_path / "hypothesis")  # not .hypothesis/ in the repository
    config = SchemathesisConfig.from_dict({
        "seed": 14, "workers": 1, "request-timeout": 30,
        "auth": {"openapi": {"apiKey": {"bearer": service["key"]}}},
        "cache": {"enabled": False},  # no .schemathesis/ folder in the repository
        "generation": {"max-examples": 200, "database": "none"},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True},
                   "stateful": {"enabled": True}},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    })
    schema = schemathesis.openapi.from_url(f"{service['url']}/docs.json", config=config)
    schema = schema.include(path=list(SCORING_ROUTES), method="POST")
    assert len(list(schema.get_all_operations())) == len(SCORING_ROUTES)
    schema.hook(_served_entities(service))

    cases_by_phase, statuses, failures, errors = Counter(), Counter(), [], []
    try:
        run = list(from_schema(schema).execute())
    finally:
        hypothesis.configuration.set_hypothesis_home_dir(None)  # back to its default for any later test
    for event in run:
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            cases_by_phase[event.phase.value] += len(recorder.cases)
            statuses.update(i.response.status_code for i in recorder.interactions.values() if i.response)
            for case_id, checks in recorder.checks.items():
                failures += [(c.name, c.failure_info.failure.title if c.failure_info else None,
                              recorder.interactions[case_id].request.uri if case_id in recorder.interactions else "")
                             for c in checks if c.status.value == "failure"]
        elif isinstance(event, events.NonFatalError | events.FatalError):
            errors.append((getattr(event, "label", ""), "".join(traceback.format_exception(event.value))[-1500:]))
    print(f"schemathesis: cases by phase {dict(cases_by_phase)}, responses by status {dict(statuses)}")
    assert not errors, errors[:5]
    assert failures == [], failures[:10]
    assert sum(cases_by_phase.values()) >= 1000, cases_by_phase
    assert {"examples", "coverage", "fuzzing"} <= set(cases_by_phase)
    assert not [s for s in statuses if s >= 500]
    assert 200 in statuses and 400 in statuses  # real answers were checked, not only refusals


def _raw_post(url: str, path: str, head: dict[str, str], chunks, key: str) -> tuple[int, str, float]:
    """POST over a raw socket: the headers, then ``chunks`` (stopping once the server has answered);
    (status, the answer, seconds from the first byte sent to the answer)."""
    parts = urlsplit(url)
    lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
             f"Authorization: Bearer {key}", *(f"{k}: {v}" for k, v in head.items())]
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sock.setblocking(False)
        answer = b""
        for chunk in chunks:
            with contextlib.suppress(BlockingIOError):
                answer += sock.recv(65536)
            if answer:
                break
            try:
                sock.sendall(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        elapsed = time.monotonic() - start
        head_text, _, body = answer.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head_text.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += sock.recv(65536)
    return int(head_text.split()[1]), body.decode(), elapsed


def test_a_body_over_the_limit_gets_413_before_it_is_read(service):
    url, key = service["url"], service["key"]
    # 50 MB announced, a few bytes sent: refused at once, without waiting for (or reading) the rest.
    status, body, elapsed = _raw_post(url, "/v1/predict", {"Content-Length": str(50_000_000)}, [b'{"ten'], key)
    assert status == 413 and elapsed < 2.0, (status, body, elapsed)
    assert "MLOPS_MAX_BODY_BYTES" in ErrorBody.model_validate_json(body).error
    # The batch route's larger limit is stated the same way.
    status, body, _ = _raw_post(url, "/v1/spend/predict_batch", {"Content-Length": str(50_000_000)}, [b"{"], key)
    assert status == 413 and "MLOPS_MAX_BATCH_BODY_BYTES" in body
    # A chunked body is counted as it streams: refused once past the limit, before its end is sent.
    piece = b" " * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    sent_before_refusal = MAX_BODY_BYTES // len(piece) + 1

    def stream():
        for _ in range(4 * sent_before_refusal):  # never ends while unanswered: no terminating chunk
            yield chunk

    status, body, _ = _raw_post(url, "/v1/predict", {"Transfer-Encoding": "chunked"}, stream(), key)
    assert status == 413 and "MLOPS_MAX_BODY_BYTES" in body
    # A body under the limit is served as before.
    account = service["churn"][0]["account_id"].iloc[0]
    assert _post(f"{url}/v1/predict", {"tenant": TENANT, "account_id": account}, key=key).status_code == 200


def test_metrics_need_the_metrics_token_when_one_is_set(service):
    url = f"{service['url']}/metrics"
    refused = requests.get(url, timeout=10)
    assert _error(refused, 401).error.startswith("/metrics needs the metrics token")
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert "acme" not in refused.text
    assert requests.get(url, headers={"Authorization": f"Bearer {service['key']}"}, timeout=10).status_code == 401
    served = requests.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    assert served.status_code == 200 and "bentoml_service_request_duration_seconds" in served.text


def test_a_key_over_its_rate_gets_429_with_retry_after(bundle, tmp_path):  # noqa: F811
    keys = ApiKeyStore(bundle["folder"])
    first, second = keys.create(TENANT), keys.create(TENANT)
    env = {"CHURN_SERVICE_WORKERS": "1", "MLOPS_RATE_LIMIT_PER_S": "0.5", "MLOPS_RATE_LIMIT_BURST": "3"}
    customer = bundle["spend"]["snapshot"]["customer_id"].iloc[0]
    body = {"tenant": TENANT, "customer_id": customer}
    with bentoml_service(bundle["home"], tmp_path / "serve.log", env) as served:
        predict = f"{served['url']}/v1/spend/predict"
        assert [_post(predict, body, key=first).status_code for _ in range(3)] == [200, 200, 200]  # the burst
        refused = _post(predict, body, key=first)
        assert "rate limit of API key" in _error(refused, 429).error
        assert 1 <= int(refused.headers["retry-after"]) <= 2
        # Per key: another key of the same tenant is not limited; a request without a valid key is a 401.
        assert _post(predict, body, key=second).status_code == 200
        assert _post(predict, body).status_code == 401
        # Refused requests take no token: once the bucket refills, the key is served again.
        wait_until(lambda: _post(predict, body, key=first).status_code == 200, "the bucket to refill", timeout_s=10,
                   interval_s=0.25)


def test_token_buckets_refill_at_the_rate_up_to_the_burst():
    from bentos.service import TokenBuckets

    now = [100.0]
    buckets = TokenBuckets(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [buckets.take("k1") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k1") == pytest.approx(0.5)  # one token comes in 1/rate seconds
    assert buckets.take("k2") == 0.0  # per key
    now[0] += 0.25
    assert buckets.take("k1") == pytest.approx(0.25)  # half a token refilled; a refusal takes nothing
    now[0] += 0.25
    assert buckets.take("k1") == 0.0
    now[0] += 60
    assert [buckets.take("k1") for _ in range(4)][-1] > 0  # never more than the burst
