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
- **candidate weightings** of the pre-change rows (kept, down-weighted, dropped) are each trained on
  the earlier dates and compared on the freshest matured ones (the time split's holdout); the best
  one is the challenger. The comparison is recorded with the model.

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
    pre_change_weight: float


CANDIDATES = (Candidate("all history", 1.0), Candidate("pre-change down-weighted", 0.2),
              Candidate("post-change only", 0.0))
MIN_POSITIVES = 20  # a candidate with fewer positive training rows is not tried


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
                        candidates: tuple[Candidate, ...] = CANDIDATES) -> Retrained:
    """Train the candidates on the matured labels plus the early ones (``early``), weighted by the
    change point, and keep the one with the best ``metric`` on the freshest dates (module docstring).
    ``fit(train_rows, weights)`` trains a model, ``score(model, rows)`` scores rows."""
    early = early if early is not None and len(early) else None
    split = time_split(training, holdout_fraction, label=label, who=who)
    if early is not None:  # training evidence only: the holdout (gates, reference) keeps matured labels
        train = pd.concat([split.train, early[list(split.train.columns)]], ignore_index=True)
        split = TimeSplit(train, split.holdout, split.cutoff)
    change = None if change_point is None else pd.Timestamp(change_point)
    window_closed = split.train["prediction_time"] + pd.Timedelta(days=horizon_days)
    pre = (window_closed <= change).to_numpy() if change is not None else np.zeros(len(split.train), dtype=bool)
    y_holdout = split.holdout[label].to_numpy()
    tried, best = [], None
    for candidate in candidates if change is not None else candidates[:1]:
        weight = np.where(pre, candidate.pre_change_weight, 1.0)
        if int((split.train[label].to_numpy()[weight > 0] > 0).sum()) < MIN_POSITIVES:
            tried.append({"candidate": candidate.name, "skipped": f"fewer than {MIN_POSITIVES} positive rows"})
            continue
        model = fit(split.train, weight)
        scores = score(model, split.holdout)
        value = float(metric(y_holdout, scores))
        tried.append({"candidate": candidate.name, "holdout_metric": round(value, 4),
                      "train_rows": int((weight > 0).sum())})
        if best is None or value > best[0]:
            best = (value, candidate, model, scores)
    if best is None:
        raise ValueError(f"{who}: no training candidate had {MIN_POSITIVES} positive rows")
    _, candidate, model, scores = best
    return Retrained(model, split, scores, candidate, tried, change, 0 if early is None else len(early))
