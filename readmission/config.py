"""Settings from environment variables, each with a documented default (see docs/design.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from readmission import env

# The original project's four algorithms (the project's subject) and hist_gradient_boosting,
# which beats them on the real file (docs/training.md).
DEFAULT_ALGORITHMS = (
    "logistic_regression",
    "decision_tree",
    "random_forest",
    "gradient_boosting",
    "hist_gradient_boosting",
)


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
            raw=env.text("BUCKET_RAW", cls.raw),
            datasets=env.text("BUCKET_DATASETS", cls.datasets),
            jobs=env.text("BUCKET_JOBS", cls.jobs),
            results=env.text("BUCKET_RESULTS", cls.results),
            models=env.text("BUCKET_MODELS", cls.models),
            rejected=env.text("BUCKET_REJECTED", cls.rejected),
            dead_letter=env.text("BUCKET_DEAD_LETTER", cls.dead_letter),
            mlflow=env.text("BUCKET_MLFLOW", cls.mlflow),
            scoring=env.text("BUCKET_SCORING", cls.scoring),
            predictions_log=env.text("BUCKET_PREDICTIONS_LOG", cls.predictions_log),
            outcomes=env.text("BUCKET_OUTCOMES", cls.outcomes),
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
            for name in env.text("ALGORITHMS", ",".join(DEFAULT_ALGORITHMS)).split(",")
            if name.strip()
        )
        batch_rows = env.integer("BATCH_ROWS", cls.batch_rows, minimum=1)
        linear_sets = env.integer("CUMULATIVE_LINEAR_SETS", cls.cumulative_linear_sets, minimum=1)
        growth = env.number("CUMULATIVE_GROWTH", cls.cumulative_growth)
        if growth <= 1:
            raise ValueError(f"CUMULATIVE_GROWTH must be more than 1, got {growth}")
        prepare_ahead_missing = env.integer(
            "PREPARE_AHEAD_MISSING", cls.prepare_ahead_missing, minimum=0
        )
        gate_resamples = env.integer(
            "GATE_RESAMPLES", cls.gate_resamples, minimum=MIN_GATE_RESAMPLES
        )
        drift_psi_watch = env.number("DRIFT_PSI_WATCH", cls.drift_psi_watch)
        drift_psi_drifted = env.number("DRIFT_PSI_DRIFTED", cls.drift_psi_drifted)
        if not 0 <= drift_psi_watch <= drift_psi_drifted:
            raise ValueError(
                f"need 0 <= DRIFT_PSI_WATCH <= DRIFT_PSI_DRIFTED, got {drift_psi_watch} and "
                f"{drift_psi_drifted}"
            )
        drift_sample_rows = env.integer("DRIFT_SAMPLE_ROWS", cls.drift_sample_rows, minimum=1)
        return cls(
            s3_endpoint_url=env.text("S3_ENDPOINT_URL", cls.s3_endpoint_url),
            aws_region=env.text("AWS_REGION", cls.aws_region),
            buckets=Buckets.from_env(),
            batch_rows=batch_rows,
            split_seed=env.integer("SPLIT_SEED", cls.split_seed),
            cumulative_linear_sets=linear_sets,
            cumulative_growth=growth,
            max_upload_bytes=env.integer("MAX_UPLOAD_BYTES", cls.max_upload_bytes),
            algorithms=algorithms,
            selection_metric=env.text("SELECTION_METRIC", cls.selection_metric),
            mlflow_tracking_uri=env.text("MLFLOW_TRACKING_URI", cls.mlflow_tracking_uri),
            mlflow_experiment=env.text("MLFLOW_EXPERIMENT", cls.mlflow_experiment),
            registered_model=env.text("REGISTERED_MODEL", cls.registered_model),
            prepare_ahead_missing=prepare_ahead_missing,
            gate_margin=env.number("GATE_MARGIN", cls.gate_margin),
            gate_resamples=gate_resamples,
            gate_seed=env.integer("GATE_SEED", cls.gate_seed),
            drift_psi_watch=drift_psi_watch,
            drift_psi_drifted=drift_psi_drifted,
            drift_sample_rows=drift_sample_rows,
        )
