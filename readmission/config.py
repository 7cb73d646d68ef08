"""Settings from environment variables, each with a documented default (see docs/design.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# The original project's four algorithms (the project's subject) and hist_gradient_boosting,
# which beats them on the real file (docs/training.md).
DEFAULT_ALGORITHMS = (
    "logistic_regression",
    "decision_tree",
    "random_forest",
    "gradient_boosting",
    "hist_gradient_boosting",
)


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def _env_int(name: str, default: int) -> int:
    raw = _env(name, str(default))
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc


def _env_float(name: str, default: float) -> float:
    raw = _env(name, str(default))
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from exc
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"environment variable {name} must be a finite number, got {raw!r}")
    return value


MIN_GATE_RESAMPLES = 1000


@dataclass(frozen=True)
class Buckets:
    raw: str = "raw"
    datasets: str = "datasets"
    jobs: str = "jobs"
    results: str = "results"
    models: str = "models"
    rejected: str = "rejected"
    dead_letter: str = "dead-letter"
    mlflow: str = "mlflow"
    scoring: str = "scoring"  # batch scoring: inputs, and the scorer's outputs under predictions/
    # the predict function's prediction log (Parquet batches) and the realized outcomes
    predictions_log: str = "predictions-log"
    outcomes: str = "outcomes"

    @classmethod
    def from_env(cls) -> Buckets:
        return cls(
            raw=_env("BUCKET_RAW", cls.raw),
            datasets=_env("BUCKET_DATASETS", cls.datasets),
            jobs=_env("BUCKET_JOBS", cls.jobs),
            results=_env("BUCKET_RESULTS", cls.results),
            models=_env("BUCKET_MODELS", cls.models),
            rejected=_env("BUCKET_REJECTED", cls.rejected),
            dead_letter=_env("BUCKET_DEAD_LETTER", cls.dead_letter),
            mlflow=_env("BUCKET_MLFLOW", cls.mlflow),
            scoring=_env("BUCKET_SCORING", cls.scoring),
            predictions_log=_env("BUCKET_PREDICTIONS_LOG", cls.predictions_log),
            outcomes=_env("BUCKET_OUTCOMES", cls.outcomes),
        )

    def all(self) -> list[str]:
        return [
            self.raw,
            self.datasets,
            self.jobs,
            self.results,
            self.models,
            self.rejected,
            self.dead_letter,
            self.mlflow,
            self.scoring,
            self.predictions_log,
            self.outcomes,
        ]


@dataclass(frozen=True)
class Settings:
    s3_endpoint_url: str = "http://127.0.0.1:8333"
    aws_region: str = "us-east-1"
    buckets: Buckets = field(default_factory=Buckets)
    batch_rows: int = 15_000
    split_seed: int = 42
    # The cumulative sets' schedule (readmission.corpus.set_sizes): sets of 1, 2, ... batches
    # up to CUMULATIVE_LINEAR_SETS sets, then CUMULATIVE_GROWTH times the previous set's.
    cumulative_linear_sets: int = 6
    cumulative_growth: float = 2.0
    max_upload_bytes: int = 2 * 1024 * 1024 * 1024
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    selection_metric: str = "f1_weighted"
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_experiment: str = "diabetes_readmission_prediction"
    registered_model: str = "diabetes_readmission_model"
    # The aggregator tests and exports the best result so far ahead once at most this many
    # results are missing (the last jobs then run on the other workers; 0: never).
    prepare_ahead_missing: int = 4
    # The promotion gate (readmission.gate): a challenger replaces the champion only if it beats
    # it on the new version's test rows by at least GATE_MARGIN (selection metric) and the
    # one-sided paired-bootstrap lower bound at the gate's confidence (GATE_RESAMPLES >= 1000
    # resamples, GATE_SEED) is above zero.
    gate_margin: float = 0.002
    gate_resamples: int = 1000
    gate_seed: int = 42
    # Drift reports (readmission.drift): a feature whose PSI against the champion's training
    # reference is above DRIFT_PSI_DRIFTED is drifted, above DRIFT_PSI_WATCH one to watch.
    drift_psi_watch: float = 0.1
    drift_psi_drifted: float = 0.2
    # Drift reports and training reference profiles are computed on a systematic sample of at
    # most DRIFT_SAMPLE_ROWS rows (readmission.drop_file.ParsedDrop.sample): memory is bounded
    # whatever the drop's or the training set's size; smaller ones are taken whole.
    drift_sample_rows: int = 200_000

    @classmethod
    def from_env(cls) -> Settings:
        algorithms = tuple(
            name.strip()
            for name in _env("ALGORITHMS", ",".join(DEFAULT_ALGORITHMS)).split(",")
            if name.strip()
        )
        batch_rows = _env_int("BATCH_ROWS", cls.batch_rows)
        if batch_rows < 1:
            raise ValueError(f"BATCH_ROWS must be positive, got {batch_rows}")
        linear_sets = _env_int("CUMULATIVE_LINEAR_SETS", cls.cumulative_linear_sets)
        if linear_sets < 1:
            raise ValueError(f"CUMULATIVE_LINEAR_SETS must be positive, got {linear_sets}")
        growth = _env_float("CUMULATIVE_GROWTH", cls.cumulative_growth)
        if growth <= 1:
            raise ValueError(f"CUMULATIVE_GROWTH must be more than 1, got {growth}")
        prepare_ahead_missing = _env_int("PREPARE_AHEAD_MISSING", cls.prepare_ahead_missing)
        if prepare_ahead_missing < 0:
            raise ValueError(f"PREPARE_AHEAD_MISSING must be >= 0, got {prepare_ahead_missing}")
        gate_resamples = _env_int("GATE_RESAMPLES", cls.gate_resamples)
        if gate_resamples < MIN_GATE_RESAMPLES:
            raise ValueError(
                f"GATE_RESAMPLES must be at least {MIN_GATE_RESAMPLES}, got {gate_resamples}"
            )
        drift_psi_watch = _env_float("DRIFT_PSI_WATCH", cls.drift_psi_watch)
        drift_psi_drifted = _env_float("DRIFT_PSI_DRIFTED", cls.drift_psi_drifted)
        if not 0 <= drift_psi_watch <= drift_psi_drifted:
            raise ValueError(
                f"need 0 <= DRIFT_PSI_WATCH <= DRIFT_PSI_DRIFTED, got {drift_psi_watch} and "
                f"{drift_psi_drifted}"
            )
        drift_sample_rows = _env_int("DRIFT_SAMPLE_ROWS", cls.drift_sample_rows)
        if drift_sample_rows < 1:
            raise ValueError(f"DRIFT_SAMPLE_ROWS must be positive, got {drift_sample_rows}")
        return cls(
            s3_endpoint_url=_env("S3_ENDPOINT_URL", cls.s3_endpoint_url),
            aws_region=_env("AWS_REGION", cls.aws_region),
            buckets=Buckets.from_env(),
            batch_rows=batch_rows,
            split_seed=_env_int("SPLIT_SEED", cls.split_seed),
            cumulative_linear_sets=linear_sets,
            cumulative_growth=growth,
            max_upload_bytes=_env_int("MAX_UPLOAD_BYTES", cls.max_upload_bytes),
            algorithms=algorithms,
            selection_metric=_env("SELECTION_METRIC", cls.selection_metric),
            mlflow_tracking_uri=_env("MLFLOW_TRACKING_URI", cls.mlflow_tracking_uri),
            mlflow_experiment=_env("MLFLOW_EXPERIMENT", cls.mlflow_experiment),
            registered_model=_env("REGISTERED_MODEL", cls.registered_model),
            prepare_ahead_missing=prepare_ahead_missing,
            gate_margin=_env_float("GATE_MARGIN", cls.gate_margin),
            gate_resamples=gate_resamples,
            gate_seed=_env_int("GATE_SEED", cls.gate_seed),
            drift_psi_watch=drift_psi_watch,
            drift_psi_drifted=drift_psi_drifted,
            drift_sample_rows=drift_sample_rows,
        )
