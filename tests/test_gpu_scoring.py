"""The GPU batch scorer gives LightGBM's churn probabilities, from the booster compiled by Hummingbird.

Runs the compiled tensor program on CPU PyTorch (no GPU here); on a machine with CUDA the "auto"
test checks the GPU path too. torch and hummingbird-ml are not default dependencies: without them
these tests fail and say how to install them.
"""

from __future__ import annotations

import duckdb
import lightgbm as lgb
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bentos.gpu_scoring import (
    INSTALL_HINT,
    BatchScorer,
    CategoryColumn,
    HummingbirdUnavailable,
    NumericColumn,
    compile_booster,
    cuda_available,
    probe_matrix,
    torch_available,
)
from mlops.core.modeling import time_split, train_booster
from resources import feature_store as fs
from resources.tenants import TenantSpec
from usecases.churn.simulator import simulate_tenant

TOLERANCE = 1e-5  # the contract; the compiled program agrees to ~1e-15
ROUNDS = 120  # the pipeline trains 250; fewer keeps CPU PyTorch scoring fast with trees as deep


def require_torch() -> None:
    """Fail (not skip): CI installs torch + hummingbird-ml, so their absence is a broken setup."""
    if not torch_available():
        pytest.fail(f"torch / hummingbird-ml are missing: {INSTALL_HINT}", pytrace=False)


@pytest.fixture(scope="module")
def churn_model():
    """A real churn booster (the pipeline's training code and parameters) on a small simulated tenant."""
    spec = TenantSpec(name="gpuco", region="us", n_accounts=600, seed=4, days=120)
    con = duckdb.connect()
    for name, frame in simulate_tenant(spec).items():
        con.register(name, frame)
    fs.build_feature_table(con)
    training_set = con.execute("WITH churn_labels AS (" + fs.LABELS_SQL + ") " + fs.TRAINING_SET_SQL).df()
    split = time_split(training_set)
    booster = train_booster(split.train, rounds=ROUNDS)
    holdout = split.holdout
    matrix = fs.to_model_matrix(holdout)
    # Serving sees categories the model never saw (NaN codes) and missing values too.
    odd = matrix[:200].copy()
    odd[:100, list(fs.FEATURE_COLUMNS).index("plan")] = np.nan
    odd[100:, list(fs.FEATURE_COLUMNS).index("segment")] = np.nan
    odd[::3, 0] = np.nan
    return {"booster": booster, "matrix": np.vstack([matrix, odd]), "labels": holdout["churned"].to_numpy(),
            "holdout_rows": len(holdout)}


def test_compiled_program_on_cpu_pytorch_matches_lightgbm(churn_model):
    require_torch()
    booster, matrix = churn_model["booster"], churn_model["matrix"]
    scorer = BatchScorer(booster, device="cpu")
    assert scorer.backend == "hummingbird-cpu"
    # Our models split on the two categorical features: those splits go through the rewrite.
    assert any(isinstance(c, CategoryColumn) for c in scorer.compiled.columns)
    expected = booster.predict(matrix)
    scores = scorer.predict(matrix)
    assert scores.shape == expected.shape and scores.dtype == np.float64
    assert np.max(np.abs(scores - expected)) <= TOLERANCE
    # Every threshold, its float neighbours, NaN, zero and odd categories: exact there too.
    probe = probe_matrix(scorer.compiled, rows=2000, seed=1)
    assert np.max(np.abs(scorer.predict(probe) - booster.predict(probe))) <= TOLERANCE
    n = churn_model["holdout_rows"]
    auc = roc_auc_score(churn_model["labels"], expected[:n])
    assert roc_auc_score(churn_model["labels"], scores[:n]) == pytest.approx(auc, abs=1e-12)


def test_lightgbm_backend_gives_identical_scores(churn_model):
    booster, matrix = churn_model["booster"], churn_model["matrix"]
    scorer = BatchScorer(booster, device="lightgbm")
    assert scorer.backend == "lightgbm"
    assert scorer.compiled is None  # nothing compiled, torch not touched
    np.testing.assert_array_equal(scorer.predict(matrix), booster.predict(matrix))


def test_auto_uses_the_gpu_when_there_is_one_and_lightgbm_otherwise(churn_model):
    require_torch()
    booster, matrix = churn_model["booster"], churn_model["matrix"]
    scorer = BatchScorer(booster)
    if cuda_available():
        assert scorer.backend == "hummingbird-cuda", scorer.fallback_reason
        assert np.max(np.abs(scorer.predict(matrix) - booster.predict(matrix))) <= TOLERANCE
    else:
        assert scorer.backend == "lightgbm"
        assert "CUDA" in scorer.fallback_reason
        np.testing.assert_array_equal(scorer.predict(matrix), booster.predict(matrix))
        with pytest.raises(HummingbirdUnavailable, match="cuda"):
            BatchScorer(booster, device="cuda")


def test_rejects_a_matrix_of_the_wrong_width(churn_model):
    scorer = BatchScorer(churn_model["booster"], device="lightgbm")
    with pytest.raises(ValueError, match="expected a"):
        scorer.predict(churn_model["matrix"][:, :-1])
    assert scorer.predict(churn_model["matrix"][:0]).shape == (0,)
    with pytest.raises(ValueError, match="device must be one of"):
        BatchScorer(churn_model["booster"], device="tpu")


# --- the rewrite, on the model shapes LightGBM can produce -----------------------------------------
def _synthetic(params: dict, categorical: list[int], rounds: int = 20) -> tuple[lgb.Booster, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 2000
    x = rng.normal(size=(n, 6))
    x[:, 4] = rng.integers(0, 40, n)  # a categorical feature with more than 32 levels (two bitset words)
    x[:, 5] = rng.integers(0, 3, n)
    x[rng.random(n) < 0.1, 0] = np.nan
    x[rng.random(n) < 0.2, 1] = 0.0
    y = (np.nan_to_num(x[:, 0]) + x[:, 1] + (x[:, 4] % 7 == 0) + (x[:, 5] == 1) + rng.normal(size=n) > 0.5)
    params = {"objective": "binary", "verbose": -1, "num_threads": 1, "num_leaves": 15, "min_data_in_leaf": 5,
              "min_data_per_group": 5, "cat_smooth": 1.0, **params}
    booster = lgb.train(params, lgb.Dataset(x, y.astype(int), categorical_feature=categorical), num_boost_round=rounds)
    return booster, x


CASES = {
    "nan-missing + many categories": ({"max_cat_to_onehot": 4}, [4, 5]),
    "one-hot categorical splits": ({"max_cat_to_onehot": 64}, [4, 5]),
    "zero as missing": ({"zero_as_missing": True}, [5]),
    "missing values off": ({"use_missing": False}, []),
    "sigmoid 2": ({"sigmoid": 2.0}, [4]),
    "constant trees": ({"min_data_in_leaf": 5000}, []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rewrite_is_exact_for_every_split_kind(case):
    params, categorical = CASES[case]
    booster, x = _synthetic(params, categorical)
    compiled = compile_booster(booster)
    surrogate = lgb.Booster(model_str=compiled.model_string)
    rows = np.vstack([x, probe_matrix(compiled, rows=3000, seed=2)])
    derived = compiled.derive(rows)
    assert np.all(derived == np.round(derived)) and np.all(np.abs(derived) < 2**24), "codes must be exact in float32"
    # LightGBM itself scores the surrogate on the derived columns exactly as the original.
    np.testing.assert_array_equal(
        surrogate.predict(derived.astype(np.float64), raw_score=True), booster.predict(rows, raw_score=True)
    )
    assert all(isinstance(c, NumericColumn | CategoryColumn) for c in compiled.columns)


def test_hummingbird_handles_nan_rules_and_wide_categories():
    require_torch()
    import torch

    booster, x = _synthetic(*CASES["nan-missing + many categories"])
    scorer = BatchScorer(booster, device="cpu", batch_rows=777)  # several batches, a ragged last one
    rows = np.vstack([x, probe_matrix(scorer.compiled, rows=2000, seed=3)])
    assert np.max(np.abs(scorer.predict(rows) - booster.predict(rows))) <= TOLERANCE
    # The GPU derives the columns with torch (on CPU the scorer uses numpy): both agree exactly.
    np.testing.assert_array_equal(scorer.derive_tensor(torch.from_numpy(rows)).numpy(), scorer.compiled.derive(rows))


# --- the GPU service's dispatch ------------------------------------------------------------------
def test_gpu_service_scores_small_batches_with_lightgbm_and_large_ones_with_the_scorer(churn_model):
    require_torch()
    from bentos import service_gpu
    from bentos.service import ChurnService, Model

    assert "_scores" in vars(ChurnService.inner), (
        "bentos/service.py must route scoring through ChurnService._scores(model, matrix) for the GPU variant"
    )
    # The service's scoring path without its bundle: no __init__, just the scorer cache.
    service = service_gpu.ChurnServiceGPU.inner.__new__(service_gpu.ChurnServiceGPU.inner)
    service.scorers = service_gpu.ScorerCache(device="cpu")  # the compiled program, on CPU PyTorch
    booster, matrix = churn_model["booster"], churn_model["matrix"]
    model = Model("7", booster)
    small = matrix[: service_gpu.GPU_MIN_ROWS - 1]
    large = np.vstack([matrix] * (service_gpu.GPU_MIN_ROWS // len(matrix) + 1))
    np.testing.assert_array_equal(service._scores(model, small), booster.predict(small))
    assert model not in service.scorers
    assert np.max(np.abs(service._scores(model, large) - booster.predict(large))) <= TOLERANCE
    assert model in service.scorers and service.scorers.get(model).backend == "hummingbird-cpu"
    assert service.scorers.get(model) is service.scorers.get(Model("7", booster))  # compiled once per booster
