"""Batch scoring of LightGBM churn models as tensor programs (Hummingbird on PyTorch), on the GPU.

``BatchScorer(booster).predict(matrix)`` returns the same churn probabilities as
``booster.predict(matrix)`` (to ~1e-15), on the GPU when ``torch.cuda.is_available()``, and falls
back to LightGBM on the CPU when there is no GPU, or when torch / hummingbird-ml are not installed.

Why the booster is rewritten before Hummingbird compiles it
-----------------------------------------------------------
Hummingbird 0.4.12 compiles a ``lightgbm.Booster`` from ``dump_model()``, and for our models that
is silently wrong in three ways:

1. categorical splits (``decision_type "=="``, our ``plan`` and ``segment``) are compiled as
   numeric ``x <= threshold`` splits, the threshold being the category list's text ("0", "0||2"):
   on our simulated tenants the churn probabilities are off by up to 0.17;
2. ``missing_type``/``default_left`` are ignored, so NaN (an unseen category, a missing value)
   goes the wrong way;
3. its executor casts float64 input to float32, so a value within one float32 step of a threshold
   can take the other branch.

So the booster is compiled *exactly* into a surrogate booster over derived integer columns, with
numeric ``<=`` splits only, which Hummingbird compiles correctly:

- for each (feature, missing-value rule) used by numeric splits, a column holding the feature's
  rank among that feature's sorted split thresholds ``u``: ``code = #{u_j < x}``, so
  ``x <= u_k  <=>  code <= k`` and the split becomes ``code <= k + 0.5``. Missing values get
  ``-1`` (go left) or ``len(u)`` (go right), as LightGBM's rules for that split say;
- for each (categorical feature, category set) used by categorical splits, a 0/1 column that is 0
  exactly when LightGBM sends the row left (``int(x)`` in the set; NaN and negatives go right).

Codes are small integers, exact in float32, so Hummingbird's cast loses nothing. The surrogate is
itself a LightGBM model, and the scorer checks at start-up, on probe rows built from every
threshold and category of the model (and NaN, zero, out-of-range values), that the compiled
program reproduces LightGBM; if it does not, ``device="auto"`` falls back to LightGBM.

On the GPU the derived columns are computed on the device (``torch.searchsorted`` on float64), so
only the raw float64 matrix crosses the bus; on CPU PyTorch, in numpy. Leaf values are summed in float64 and the sigmoid is applied
in float64 by the scorer (Hummingbird returns raw scores for a ``Booster``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np

BACKENDS = ("hummingbird-cuda", "hummingbird-cpu", "lightgbm")
DEVICES = ("auto", "cuda", "cpu", "lightgbm")
INSTALL_HINT = (
    "the GPU scorer needs torch and hummingbird-ml, which are not part of the default dependency set; "
    "install them into the project venv (the versions bentos/gpu-extras.txt pins) with: "
    "python3 -m pip --python .venv/bin/python install -r bentos/gpu-extras.txt"
)
# LightGBM treats |x| <= kZeroThreshold (1e-35f, widened to double) as zero.
K_ZERO_THRESHOLD = 1.0000000180025095e-35
# Scores must match LightGBM to this (probability scale); the compiled program is exact up to
# float64 summation order, ~1e-15.
DEFAULT_TOLERANCE = 1e-9
# decision_type bits in the LightGBM model text
_CATEGORICAL_MASK = 1
_DEFAULT_LEFT_MASK = 2


class HummingbirdUnavailable(RuntimeError):
    """torch or hummingbird-ml cannot be imported, or CUDA was asked for and is not there."""


class CompilationMismatch(RuntimeError):
    """The compiled tensor program does not reproduce LightGBM's scores."""


# --- the surrogate model -----------------------------------------------------------------------
@dataclass(frozen=True)
class NumericColumn:
    """Rank of ``feature`` among ``thresholds``; ``missing`` says where NaN (and zero) go."""

    feature: int
    missing: str  # "none": NaN -> 0.0; "nan-left"/"nan-right"; "zero-left"/"zero-right"
    thresholds: np.ndarray = field(compare=False)

    def missing_code(self) -> float:
        return -1.0 if self.missing.endswith("-left") else float(len(self.thresholds))


@dataclass(frozen=True)
class CategoryColumn:
    """0.0 where LightGBM sends ``feature`` left (its integer value is in ``categories``), else 1.0."""

    feature: int
    categories: tuple[int, ...]


@dataclass(frozen=True)
class CompiledModel:
    """A booster rewritten over derived columns, with numeric ``<=`` splits only."""

    model_string: str
    columns: tuple[NumericColumn | CategoryColumn, ...]
    num_features: int
    sigmoid: float
    max_depth: int
    num_trees: int

    def derive(self, matrix: np.ndarray) -> np.ndarray:
        """The derived columns (float32 codes) of a float64 matrix, in numpy."""
        x = np.where(np.abs(matrix) <= K_ZERO_THRESHOLD, 0.0, matrix)
        out = np.zeros((len(x), max(len(self.columns), 1)), dtype=np.float32)  # >= 1 column, as the surrogate
        for j, col in enumerate(self.columns):
            v = x[:, col.feature]
            nan = np.isnan(v)
            if isinstance(col, CategoryColumn):
                whole = np.trunc(np.where(nan, -1.0, v))
                left = ~nan & (whole >= 0) & np.isin(whole, np.asarray(col.categories, dtype=np.float64))
                out[:, j] = np.where(left, 0.0, 1.0)
                continue
            code = np.searchsorted(col.thresholds, np.where(nan, 0.0, v), side="left").astype(np.float64)
            if col.missing.startswith("nan"):
                code[nan] = col.missing_code()
            elif col.missing.startswith("zero"):
                code[nan | (v == 0.0)] = col.missing_code()
            out[:, j] = code
        return out


def _parse_tree(block: str) -> tuple[list[str], dict[str, str]]:
    lines = [ln for ln in block.strip("\n").split("\n") if ln]
    values = {}
    for ln in lines[1:]:
        key, _, value = ln.partition("=")
        values[key] = value
    return lines, values


def compile_booster(booster: lgb.Booster) -> CompiledModel:
    """Rewrite ``booster`` into a surrogate LightGBM model that Hummingbird compiles exactly."""
    text = booster.model_to_string()
    head, sep, rest = text.partition("\nTree=")
    if not sep:
        raise ValueError("the booster has no trees")
    header = dict(ln.partition("=")[::2] for ln in head.split("\n") if "=" in ln)
    objective = header.get("objective", "")
    if not objective.startswith("binary") or int(header.get("num_class", "1")) != 1:
        raise NotImplementedError(f"only binary models can be compiled, not objective {objective!r}")
    if "average_output" in head.split("\n"):
        raise NotImplementedError("random-forest boosting (average_output) is not supported")
    match = re.search(r"sigmoid:([0-9.eE+-]+)", objective)
    sigmoid = float(match.group(1)) if match else 1.0
    num_features = int(header["max_feature_idx"]) + 1
    trees_text, end_sep, _ = ("Tree=" + rest).partition("end of trees")
    if not end_sep:
        raise ValueError("malformed model text: no 'end of trees'")
    blocks = [b for b in re.split(r"\n(?=Tree=\d+\n)", trees_text.strip("\n")) if b.strip()]

    numeric_thresholds: dict[tuple[int, str], set[float]] = {}
    category_sets: list[tuple[int, tuple[int, ...]]] = []
    parsed = []
    for block in blocks:
        lines, values = _parse_tree(block)
        if values.get("is_linear", "0") != "0":
            raise NotImplementedError("linear trees are not supported")
        n_internal = int(values["num_leaves"]) - 1
        nodes = []
        if n_internal > 0:
            features = [int(v) for v in values["split_feature"].split()]
            thresholds = [float(v) for v in values["threshold"].split()]
            decisions = [int(v) for v in values["decision_type"].split()]
            boundaries = [int(v) for v in values.get("cat_boundaries", "0").split()]
            words = [int(v) for v in values.get("cat_threshold", "").split()]
            for f, thr, dt in zip(features, thresholds, decisions, strict=True):
                if dt & _CATEGORICAL_MASK:
                    idx = int(thr)
                    bits = words[boundaries[idx] : boundaries[idx + 1]]
                    cats = tuple(32 * w + b for w, word in enumerate(bits) for b in range(32) if word >> b & 1)
                    key = (f, cats)
                    if key not in category_sets:
                        category_sets.append(key)
                    nodes.append(("cat", key))
                else:
                    missing_type = (dt >> 2) & 3
                    side = "left" if dt & _DEFAULT_LEFT_MASK else "right"
                    rule = {0: "none", 1: f"zero-{side}", 2: f"nan-{side}"}[missing_type]
                    numeric_thresholds.setdefault((f, rule), set()).add(thr)
                    nodes.append(("num", (f, rule), thr))
        parsed.append((lines, nodes))

    columns: list[NumericColumn | CategoryColumn] = []
    index: dict[tuple, int] = {}
    for (f, rule), thrs in sorted(numeric_thresholds.items()):
        index[("num", f, rule)] = len(columns)
        columns.append(NumericColumn(f, rule, np.array(sorted(thrs), dtype=np.float64)))
    for f, cats in category_sets:
        index[("cat", f, cats)] = len(columns)
        columns.append(CategoryColumn(f, cats))
    ranks = {key: {t: k for k, t in enumerate(col.thresholds)} for key, col in
             ((("num", c.feature, c.missing), c) for c in columns if isinstance(c, NumericColumn))}

    out_blocks = []
    for lines, nodes in parsed:
        if nodes:
            new_features, new_thresholds = [], []
            for node in nodes:
                if node[0] == "cat":
                    f, cats = node[1]
                    new_features.append(index[("cat", f, cats)])
                    new_thresholds.append("0.5")
                else:
                    (f, rule), thr = node[1], node[2]
                    new_features.append(index[("num", f, rule)])
                    new_thresholds.append(f"{ranks[('num', f, rule)][thr]}.5")
            replaced = {
                "split_feature": " ".join(map(str, new_features)),
                "threshold": " ".join(new_thresholds),
                "decision_type": " ".join("0" for _ in nodes),  # numeric, no missing values, default right
                "num_cat": "0",
            }
            lines = [
                f"{key}={replaced.get(key, value)}"
                for key, _, value in (ln.partition("=") for ln in lines[1:])
                if key not in ("cat_boundaries", "cat_threshold")
            ]
            lines = [f"Tree={len(out_blocks)}", *lines]
        out_blocks.append("\n".join(lines))

    n_cols = max(len(columns), 1)  # a model of constant trees still needs one input column
    infos = []
    for col in columns:
        hi = len(col.thresholds) if isinstance(col, NumericColumn) else 1
        infos.append(f"[-1:{hi}]")
    infos = infos or ["none"]
    new_header = []
    for ln in head.split("\n"):
        key = ln.partition("=")[0]
        if key == "max_feature_idx":
            ln = f"max_feature_idx={n_cols - 1}"
        elif key == "feature_names":
            ln = "feature_names=" + " ".join(f"c{j}" for j in range(n_cols))
        elif key == "feature_infos":
            ln = "feature_infos=" + " ".join(infos)
        elif key == "tree_sizes":
            continue  # block sizes changed; LightGBM parses trees sequentially without them
        new_header.append(ln)
    model_string = "\n".join(new_header).rstrip("\n") + "\n\n" + "\n\n\n".join(out_blocks) + "\n\n\nend of trees\n"

    depth = _max_depth(booster)
    return CompiledModel(model_string, tuple(columns), num_features, sigmoid, depth, len(out_blocks))


def _max_depth(booster: lgb.Booster) -> int:
    def depth(node: dict) -> int:
        if "leaf_value" in node:
            return 0
        return 1 + max(depth(node["left_child"]), depth(node["right_child"]))

    return max((depth(t["tree_structure"]) for t in booster.dump_model()["tree_info"]), default=0)


def probe_matrix(compiled: CompiledModel, rows: int = 4096, seed: int = 0) -> np.ndarray:
    """Rows that exercise every split: each threshold and its float neighbours, NaN, zero, tiny and
    out-of-range values, every category of every categorical split and values around them."""
    rng = np.random.default_rng(seed)
    candidates: dict[int, list[float]] = {f: [0.0, np.nan, -1.0, 1e-36, -1e-36] for f in range(compiled.num_features)}
    for col in compiled.columns:
        values = candidates[col.feature]
        if isinstance(col, NumericColumn):
            for t in col.thresholds:
                values += [t, np.nextafter(t, -np.inf), np.nextafter(t, np.inf),
                           float(np.float32(t)), t - 1.0, t + 1.0]
        else:
            top = max(col.categories, default=0)
            values += [float(c) for c in range(-1, top + 3)] + [c + 0.5 for c in col.categories] + [-0.5]
    columns = []
    for f in range(compiled.num_features):
        values = np.array(candidates[f], dtype=np.float64)
        columns.append(rng.choice(values, size=rows))
    return np.column_stack(columns)


# --- the scorer --------------------------------------------------------------------------------
def torch_available() -> bool:
    try:
        import hummingbird.ml  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class BatchScorer:
    """Churn probabilities of large batches, from a LightGBM binary booster.

    ``device``: ``"auto"`` (Hummingbird on CUDA when a GPU is there, else LightGBM), ``"cuda"``,
    ``"cpu"`` (Hummingbird on CPU PyTorch; for tests and debugging) or ``"lightgbm"``.
    ``.backend`` tells which one scores: "hummingbird-cuda", "hummingbird-cpu" or "lightgbm";
    ``.fallback_reason`` why ``"auto"`` chose LightGBM.
    """

    def __init__(
        self,
        booster: lgb.Booster,
        device: str = "auto",
        *,
        batch_rows: int | None = None,
        num_threads: int = 0,
        tree_implementation: str | None = None,
        verify: bool = True,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        self.booster = booster
        self.num_threads = num_threads
        self.num_features = booster.num_feature()
        self.fallback_reason: str | None = None
        self.compiled: CompiledModel | None = None
        self.tree_implementation: str | None = None
        self._program = None
        self._torch_columns: list = []

        self.batch_rows = batch_rows
        if device == "lightgbm":
            self.backend = "lightgbm"
            return
        explicit = device != "auto"
        if not torch_available():
            if explicit:
                raise HummingbirdUnavailable(INSTALL_HINT)
            self._fall_back("torch or hummingbird-ml is not installed")
            return
        if device == "auto":
            if not cuda_available():
                self._fall_back("CUDA is not available (torch.cuda.is_available() is False)")
                return
            device = "cuda"
        elif device == "cuda" and not cuda_available():
            raise HummingbirdUnavailable("device='cuda' was asked for, but torch.cuda.is_available() is False")

        self.backend = f"hummingbird-{device}"
        try:
            self._compile(device, tree_implementation)
            if verify:
                self.verify(tolerance=tolerance)
        except Exception as exc:
            if explicit:
                raise
            self._program = None
            self._fall_back(f"cannot compile this booster for {device}: {exc!r}")

    def _fall_back(self, reason: str) -> None:
        self.backend = "lightgbm"
        self.fallback_reason = reason

    def _compile(self, device: str, tree_implementation: str | None) -> None:
        import hummingbird.ml as hb
        import torch

        self.compiled = compile_booster(self.booster)
        surrogate = lgb.Booster(model_str=self.compiled.model_string)
        self.device = torch.device(device)
        extra = {hb.constants.TREE_OP_PRECISION_DTYPE: "float64"}
        if tree_implementation is not None:
            extra[hb.constants.TREE_IMPLEMENTATION] = tree_implementation
        sample = self.compiled.derive(probe_matrix(self.compiled, rows=64))
        container = hb.convert(surrogate, "torch", sample, device=device, extra_config=extra)
        self._program = container.model.eval()
        self.tree_implementation = next(
            (type(m).__name__ for m in self._program.modules() if type(m).__name__.endswith("Impl")), None
        )
        self._torch_columns = [
            (col, torch.as_tensor(col.thresholds, dtype=torch.float64, device=self.device))
            if isinstance(col, NumericColumn)
            else (col, torch.as_tensor(col.categories or (-1,), dtype=torch.float64, device=self.device))
            for col in self.compiled.columns
        ]
        if self.batch_rows is None:
            self.batch_rows = self._default_batch_rows()

    def _default_batch_rows(self) -> int:
        """Rows per device batch: tree traversal keeps ~10 (rows x trees) 8-byte tensors alive."""
        import torch

        per_row = 96 * max(self.compiled.num_trees, 1) + 16 * (self.num_features + len(self.compiled.columns))
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(min(max(free * 0.35 // per_row, 4096), 1_000_000))
        return int(min(max((256 << 20) // per_row, 1024), 65_536))

    def verify(self, matrix: np.ndarray | None = None, tolerance: float = DEFAULT_TOLERANCE) -> float:
        """Max |score - LightGBM score| on ``matrix`` (default: probe rows); raises above ``tolerance``."""
        if matrix is None:
            if self.compiled is None:
                return 0.0
            matrix = probe_matrix(self.compiled)
        ours = self.predict(matrix)
        reference = self.booster.predict(np.asarray(matrix, dtype=np.float64), num_threads=self.num_threads)
        diff = float(np.max(np.abs(ours - reference), initial=0.0))
        if not diff <= tolerance:
            raise CompilationMismatch(
                f"{self.backend} differs from LightGBM by up to {diff:.3g} (tolerance {tolerance:g})"
            )
        return diff

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Churn probabilities (float64, one per row) of a ``to_model_matrix`` matrix."""
        matrix = np.ascontiguousarray(matrix, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[1] != self.num_features:
            raise ValueError(f"expected a (rows, {self.num_features}) matrix, got shape {matrix.shape}")
        if len(matrix) == 0:
            return np.empty(0, dtype=np.float64)
        if self.backend == "lightgbm":
            return self.booster.predict(matrix, num_threads=self.num_threads)
        return self._predict_torch(matrix)

    def _predict_torch(self, matrix: np.ndarray) -> np.ndarray:
        import torch

        out = np.empty(len(matrix), dtype=np.float64)
        start = 0
        with torch.inference_mode():
            while start < len(matrix):
                chunk = matrix[start : start + self.batch_rows]
                try:
                    out[start : start + len(chunk)] = self._score_chunk(chunk)
                except torch.cuda.OutOfMemoryError:
                    if self.batch_rows <= 1024:
                        raise
                    torch.cuda.empty_cache()
                    self.batch_rows //= 2  # the device is shared or smaller than estimated: retry smaller
                    continue
                start += len(chunk)
        return out

    def _score_chunk(self, chunk: np.ndarray) -> np.ndarray:
        import torch

        if self.device.type == "cpu":
            # numpy beats a pool of torch threads on these small element-wise steps
            derived = torch.from_numpy(self.compiled.derive(chunk))
        else:
            derived = self.derive_tensor(torch.from_numpy(chunk).to(self.device))
        raw = self._program(derived)
        if isinstance(raw, tuple):
            raw = raw[-1]
        raw = raw.reshape(len(chunk), -1)[:, 0].to(torch.float64)
        return torch.sigmoid(raw * self.compiled.sigmoid).cpu().numpy()

    def derive_tensor(self, x):
        """``CompiledModel.derive`` in torch, on the tensor's device (the GPU path): float64 rows in,
        exact small-integer float32 codes out."""
        import torch

        xt = x.t().contiguous()  # one contiguous row per feature
        xt = xt.masked_fill(xt.abs() <= K_ZERO_THRESHOLD, 0.0)  # LightGBM reads |x| <= 1e-35 as 0
        out = torch.zeros((xt.shape[1], max(len(self._torch_columns), 1)), dtype=torch.float32, device=x.device)
        for j, (col, table) in enumerate(self._torch_columns):
            v = xt[col.feature]
            nan = torch.isnan(v)
            if isinstance(col, CategoryColumn):
                whole = torch.trunc(torch.nan_to_num(v, nan=-1.0))
                left = ~nan & (whole >= 0) & torch.isin(whole, table)
                out[:, j] = (~left).to(torch.float32)
                continue
            code = torch.searchsorted(table, torch.nan_to_num(v, nan=0.0), right=False).to(torch.float32)
            if col.missing != "none":
                missing = nan | (v == 0.0) if col.missing.startswith("zero") else nan
                code = code.masked_fill(missing, col.missing_code())
            out[:, j] = code
        return out

    def describe(self) -> dict:
        """What scores and how (for logs and the benchmark)."""
        info = {"backend": self.backend, "fallback_reason": self.fallback_reason}
        if self.compiled is not None:
            info.update(
                trees=self.compiled.num_trees,
                max_depth=self.compiled.max_depth,
                derived_columns=len(self.compiled.columns),
                tree_implementation=self.tree_implementation,
                batch_rows=getattr(self, "batch_rows", None),
            )
        return info


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


__all__ = [
    "BACKENDS",
    "BatchScorer",
    "CompilationMismatch",
    "CompiledModel",
    "HummingbirdUnavailable",
    "compile_booster",
    "cuda_available",
    "default_threads",
    "probe_matrix",
    "torch_available",
]
