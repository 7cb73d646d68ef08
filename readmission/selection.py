"""Noise-aware selection of a version's model: candidates within the noise of the best are tied.

Pure computation (reads and writes nothing). Input: the version's result documents and each
candidate's probabilities on the SAME validation rows (written by training beside its result),
with the rows' true class codes. Rule (`select`):

1. the leader is the candidate of highest validation `metric` (the selection metric; ties:
   ROC-AUC, then the smaller job key);
2. every candidate is compared with the leader by the champion gate's paired bootstrap
   (readmission.gate.resample_scores: the same rows resampled for all, `resamples`
   resamples, `seed`; the leader scored once): the interval of
   `metric(candidate) - metric(leader)` at `confidence`.
   A candidate whose upper bound is >= 0 is TIED with the leader: the validation split cannot
   tell that it is worse;
3. among the tied candidates the selected one has the highest validation ROC-AUC (a ranking
   quality the argmax metrics ignore), then more training rows (an estimate from more data),
   then the smaller fit CPU time (the cheaper model), then the smaller job key.

Deterministic for any order of the results. The test split is never looked at.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from readmission import keys
from readmission.gate import difference_interval, resample_scores

TIE_BREAK_METRIC = "roc_auc_ovr"
CONFIDENCE = 0.95


def validation_score(result: Mapping[str, Any], metric: str) -> float:
    """A result's validation `metric`, -inf where it is missing or NaN."""
    value = result.get("metrics", {}).get("validation", {}).get(metric)
    if not isinstance(value, int | float) or math.isnan(value):
        return -math.inf
    return float(value)


def job_of(result: Mapping[str, Any]) -> str:
    """The job name of a result (`02-gradient_boosting`)."""
    return keys.job_name(int(result["cumulative_index"]), str(result["algorithm"]))


def leader(results: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any]:
    """Highest validation `metric`; ties: higher validation ROC-AUC, then the smaller job key.
    ValueError when there is no result or none has the metric."""
    if not results:
        raise ValueError("no results to select from")
    if all(validation_score(r, metric) == -math.inf for r in results):
        raise ValueError(f"no result has the validation metric {metric!r} (SELECTION_METRIC)")

    def order(result: Mapping[str, Any]) -> tuple[float, float, str]:
        return (
            -validation_score(result, metric),
            -validation_score(result, TIE_BREAK_METRIC),
            job_of(result),
        )

    return min(results, key=order)


def scores_key(
    metric: str, y_codes: np.ndarray, probabilities: np.ndarray, resamples: int, seed: int
) -> str:
    """The digest of everything one model's per-resample scores depend on (the metric, the
    resamples, the seed, the true codes and the model's probabilities): equal keys, equal
    scores, so a memo of them can never answer for other inputs."""
    digest = hashlib.sha256(f"{metric}|{resamples}|{seed}|{probabilities.shape}|".encode())
    digest.update(np.ascontiguousarray(y_codes, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(probabilities, dtype=np.float64).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Comparison:
    """One candidate against the leader on the validation rows."""

    job: str
    score: float  # validation metric
    roc_auc: float  # validation ROC-AUC (-inf where undefined)
    training_rows: int
    fit_cpu_seconds: float
    difference: float  # score - leader's score
    interval: tuple[float, float]  # paired-bootstrap interval of the difference
    tied: bool  # interval[1] >= 0: not distinguishable from the leader

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "score": self.score,
            "roc_auc": None if math.isinf(self.roc_auc) else self.roc_auc,
            "training_rows": self.training_rows,
            "difference": self.difference,
            "interval": list(self.interval),
            "tied": self.tied,
        }


@dataclass(frozen=True)
class Selection:
    """The selected result, the leader and every candidate's comparison with it."""

    best: Mapping[str, Any]
    leader: Mapping[str, Any]
    metric: str
    rows: int
    resamples: int
    seed: int
    confidence: float
    comparisons: tuple[Comparison, ...]  # in job order

    @property
    def tied(self) -> tuple[str, ...]:
        return tuple(c.job for c in self.comparisons if c.tied)

    def comparison(self, job: str) -> Comparison | None:
        return next((c for c in self.comparisons if c.job == job), None)

    def rule(self) -> str:
        """The selection rule in words."""
        return (
            f"leader: highest validation {self.metric}; tied with it: every candidate whose "
            f"{self.confidence:.0%} paired-bootstrap upper bound ({self.resamples} resamples, "
            f"seed {self.seed}, {self.rows:,} validation rows) of {self.metric}(candidate) - "
            f"{self.metric}(leader) is >= 0; among the tied: highest validation ROC-AUC, then "
            "more training rows, then less fit CPU time"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the rule, the leader, the selected job and every comparison."""
        return {
            "rule": self.rule(),
            "metric": self.metric,
            "rows": self.rows,
            "resamples": self.resamples,
            "seed": self.seed,
            "confidence": self.confidence,
            "leader": job_of(self.leader),
            "selected": job_of(self.best),
            "tied": list(self.tied),
            "comparisons": [c.as_dict() for c in self.comparisons],
        }


def select(
    results: Sequence[Mapping[str, Any]],
    probabilities: Mapping[str, np.ndarray],
    y_codes: np.ndarray,
    metric: str,
    resamples: int,
    seed: int,
    confidence: float = CONFIDENCE,
    memo: MutableMapping[str, np.ndarray] | None = None,
) -> Selection:
    """The selection rule of the module docstring. `probabilities`: job name -> n x classes
    validation probabilities (columns in the sorted class order of `y_codes`), for every
    result. ValueError if one is missing or of another shape. `memo`: per-resample scores of
    earlier selections (`scores_key` -> scores), read and added to: a model's scores are
    computed once for the same rows, metric, resamples and seed."""
    top = leader(results, metric)
    top_job = job_of(top)
    reference = probabilities.get(top_job)
    if reference is None:
        raise ValueError(f"no validation probabilities for {top_job}")
    ordered = sorted(results, key=job_of)
    for result in ordered:
        job = job_of(result)
        own = probabilities.get(job)
        if own is None or own.shape != reference.shape:
            raise ValueError(
                f"validation probabilities of {job}: {None if own is None else own.shape}, "
                f"expected {reference.shape}"
            )
    # every scored candidate and the leader on the same resamples, each scored once: the
    # leader's per-resample scores pair with every candidate's
    scored = [top_job] + [
        job_of(r)
        for r in ordered
        if job_of(r) != top_job and validation_score(r, metric) != -math.inf
    ]
    per_resample: dict[str, np.ndarray] = {}
    if len(scored) > 1:
        memo = {} if memo is None else memo
        memo_keys = {
            job: scores_key(metric, y_codes, probabilities[job], resamples, seed) for job in scored
        }
        missing = [job for job in scored if memo_keys[job] not in memo]
        if missing:
            models = [probabilities[job] for job in missing]
            scores = resample_scores(metric, y_codes, models, resamples, seed)
            for job, row in zip(missing, scores, strict=True):
                memo[memo_keys[job]] = row
        per_resample = {job: memo[memo_keys[job]] for job in scored}
    comparisons: list[Comparison] = []
    for result in ordered:
        job = job_of(result)
        score = validation_score(result, metric)
        if job == top_job:
            interval = (0.0, 0.0)
        elif score == -math.inf:
            interval = (-math.inf, -math.inf)
        else:
            differences = per_resample[job] - per_resample[top_job]
            interval = difference_interval(metric, differences, confidence)
        comparisons.append(
            Comparison(
                job=job,
                score=score,
                roc_auc=validation_score(result, TIE_BREAK_METRIC),
                training_rows=int(result["training_rows"]),
                fit_cpu_seconds=float(result.get("fit_cpu_seconds") or 0.0),
                difference=score - validation_score(top, metric),
                interval=interval,
                tied=interval[1] >= 0.0,
            )
        )
    tied = [c for c in comparisons if c.tied]
    chosen = min(tied, key=lambda c: (-c.roc_auc, -c.training_rows, c.fit_cpu_seconds, c.job))
    best = next(r for r in results if job_of(r) == chosen.job)
    return Selection(
        best=best,
        leader=top,
        metric=metric,
        rows=int(np.shape(y_codes)[0]),
        resamples=resamples,
        seed=seed,
        confidence=confidence,
        comparisons=tuple(comparisons),
    )
