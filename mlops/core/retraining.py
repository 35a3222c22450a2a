"""How a retrain inside a decay episode chooses its data: the evidence decides, not a fixed window.

A routine retrain fits every matured label alike. A retrain launched by a decay alert
(``mlops.core.loop``) must learn a concept that changed, from the few labels that saw the change:

- **early labels**: besides the matured labels, it trains on the censoring-aware ones of the weeks
  whose label window has not closed yet (a churn or chargeback that already happened is a known
  positive; the rest are provisional negatives): they are the freshest evidence of the new concept.
  They are training evidence only: the holdout (the gates, the monitoring reference) keeps the
  matured labels, and the challenger proves itself on shadow traffic;
- **the change point** (the episode's onset estimate) splits the matured rows into those whose label
  window closed before the change and the rest;
- **candidate weightings** of the pre-change rows (kept, down-weighted, dropped) and of the early
  rows are each trained without the newest two weeks of early labels and compared on them (the
  freshest evidence of the new concept; on the matured holdout when they hold too few positives);
  the best one, trained on everything, is the challenger. The comparison is recorded with the model.

Plain Python: the training assets and the simulated-clock replay call the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlops.core.modeling import VALIDATION_FRACTION, TimeSplit, time_split


@dataclass(frozen=True)
class Candidate:
    name: str
    pre_change_weight: float  # of matured rows whose label window closed before the change point
    early_weight: float = 1.0  # of the early (censoring-aware) rows


CANDIDATES = (Candidate("all history", 1.0), Candidate("pre-change down-weighted", 0.2),
              Candidate("post-change only", 0.0), Candidate("early labels up-weighted", 0.2, 3.0))
MIN_POSITIVES = 20  # a candidate with fewer positive training rows is not tried
MIN_VALIDATION_POSITIVES = 10  # fewer early positives: candidates are compared on the matured holdout
VALIDATION_DAYS = 14  # the newest early labels that compare the candidates


@dataclass
class Retrained:
    booster: object
    split: TimeSplit
    holdout_scores: np.ndarray
    candidate: Candidate
    comparison: list[dict] = field(default_factory=list)
    change_point: pd.Timestamp | None = None
    early_rows: int = 0

    def summary(self) -> dict:
        return {"candidate": self.candidate.name, "change_point": None if self.change_point is None
                else str(self.change_point.date()), "early_label_rows": self.early_rows,
                "candidates": self.comparison}


def retrain_for_episode(training: pd.DataFrame, early: pd.DataFrame | None, change_point, *, horizon_days: int,
                        fit: Callable[[pd.DataFrame, np.ndarray], object],
                        score: Callable[[object, pd.DataFrame], np.ndarray],
                        metric: Callable[[np.ndarray, np.ndarray], float], label: str = "churned",
                        holdout_fraction: float = VALIDATION_FRACTION, who: str = "the tenant",
                        candidates: tuple[Candidate, ...] = CANDIDATES,
                        acceptable: Callable[[np.ndarray, np.ndarray], str | None] | None = None,
                        embargo_days: int | None = None) -> Retrained:
    """Train the candidates on the matured labels plus the early ones (``early``), weighted by the
    change point, compare them on the newest early labels (the freshest evidence of the new concept;
    the matured holdout when there are too few), and train the best one on everything (module
    docstring). ``fit(rows, weights)`` trains a model, ``score(model, rows)`` scores rows;
    ``acceptable(y_holdout, holdout_scores)`` names what the gates would refuse (None: nothing), and a
    candidate the gates would refuse is chosen only if every one would be. ``embargo_days``: the time
    split's purge (default ``horizon_days``, churn's; a use case whose routine split has none, as a
    payment's own label, passes 0 so that the holdout is the routine one)."""
    early = early if early is not None and len(early) else None
    split = time_split(training, holdout_fraction, label=label, who=who,
                       embargo_days=horizon_days if embargo_days is None else embargo_days)
    change = None if change_point is None else pd.Timestamp(change_point)
    if early is None or change is None:
        candidates = candidates[:1]
    validation, fitting = split.holdout, early
    if early is not None:
        newest = early["prediction_time"] >= early["prediction_time"].max() - pd.Timedelta(days=VALIDATION_DAYS - 1)
        if int(early.loc[newest, label].sum()) >= MIN_VALIDATION_POSITIVES and early.loc[newest, label].nunique() == 2:
            validation, fitting = early[newest], early[~newest]
    compared_on = "newest early labels" if validation is not split.holdout else "matured holdout"

    def rows_and_weights(candidate: Candidate, extra: pd.DataFrame | None) -> tuple[pd.DataFrame, np.ndarray]:
        closed = split.train["prediction_time"] + pd.Timedelta(days=horizon_days)
        pre = (closed <= change).to_numpy() if change is not None else np.zeros(len(split.train), dtype=bool)
        weight = np.where(pre, candidate.pre_change_weight, 1.0)
        if extra is None or extra.empty:
            return split.train, weight
        rows = pd.concat([split.train, extra[list(split.train.columns)]], ignore_index=True)
        return rows, np.concatenate([weight, np.full(len(extra), candidate.early_weight)])

    y_validation = validation[label].to_numpy()
    tried, best = [], None
    for candidate in candidates:
        rows, weight = rows_and_weights(candidate, fitting)
        if int((rows[label].to_numpy()[weight > 0] > 0).sum()) < MIN_POSITIVES:
            tried.append({"candidate": candidate.name, "skipped": f"fewer than {MIN_POSITIVES} positive rows"})
            continue
        if len(candidates) == 1:
            tried.append({"candidate": candidate.name, "train_rows": int((weight > 0).sum())})
            best = (True, None, candidate)
            break
        model = fit(rows, weight)
        value = float(metric(y_validation, score(model, validation)))
        refused = acceptable(split.holdout[label].to_numpy(), score(model, split.holdout)) if acceptable else None
        tried.append({"candidate": candidate.name, "compared_on": compared_on, "metric": round(value, 4),
                      "train_rows": int((weight > 0).sum()), **({"gates_would_refuse": refused} if refused else {})})
        rank = (refused is None, value, candidate)
        if best is None or rank[:2] > best[:2]:
            best = rank
    if best is None:
        raise ValueError(f"{who}: no training candidate had {MIN_POSITIVES} positive rows")
    candidate = best[2]
    rows, weight = rows_and_weights(candidate, early)  # the chosen one, on every label
    model = fit(rows, weight)
    final = TimeSplit(rows, split.holdout, split.cutoff)
    return Retrained(model, final, score(model, split.holdout), candidate, tried, change,
                     0 if early is None else len(early))
