"""The local stack supervisor: the production topology as local processes.

    python -m readmission.localstack up|down|status|upload FILE|wait|report|dead-letters|logs

``up`` starts, detached, each with a pid file (``STATE_DIR/run``) and a log file
(``STATE_DIR/logs``): SeaweedFS (S3 with generated credentials, filer webhook -> adapter), the
MLflow server (SQLite + artifacts proxied to ``s3://BUCKET_MLFLOW``), the broker
(events/broker.py) and one functions-framework process per Knative Service: ``--target``,
``--source`` and ``--signature-type`` come from the Service manifests in infra/knative (the
table of docs/design.md where a manifest is missing); ``TRAIN_WORKERS`` processes for train.
A function whose file does not exist yet is skipped with a warning. ``up`` waits for every
process to answer, creates the buckets and writes ``STATE_DIR/env`` (``source .state/env``).
``down`` stops the process groups it started.

Env (defaults): ``STATE_DIR`` (.state), ``LOCAL_PORTS`` (set to ``free`` to pick free ports,
as the tests do), ``S3_PORT`` (8333), ``FILER_PORT`` (8888), ``MASTER_PORT`` (9333),
``VOLUME_PORT`` (9340; SeaweedFS gRPC ports are these + 10000), ``MLFLOW_PORT`` (5000),
``BROKER_PORT`` (8100), ``FUNCTIONS_PORT`` (8101: events-adapter, then dead-letter +1,
ingest +2, aggregate +3, predict +4, reconcile +5, other Services +6.., train replicas from
+10), ``TRAIN_WORKERS`` (cores),
``MLFLOW_WORKERS`` (1), ``STACK_START_TIMEOUT`` (180 s), ``STACK_STRICT`` (unset: a pipeline
function that crashes at start is reported and its Service left without replicas; ``1``: fail).
"""

from readmission.localstack.config import (
    FUNCTIONS,
    HOST,
    ROOT,
    FunctionSpec,
    StackConfig,
    StackError,
    StackInfo,
    settings_for,
    store_for,
)
from readmission.localstack.progress import (
    DoneCondition,
    Snapshot,
    dead_letters,
    done_condition,
    report,
    snapshot,
    upload,
    wait,
)
from readmission.localstack.supervisor import Supervisor

__all__ = [
    "FUNCTIONS",
    "HOST",
    "ROOT",
    "DoneCondition",
    "FunctionSpec",
    "Snapshot",
    "StackConfig",
    "StackError",
    "StackInfo",
    "Supervisor",
    "dead_letters",
    "done_condition",
    "report",
    "settings_for",
    "snapshot",
    "store_for",
    "upload",
    "wait",
]
