"""MLflow Model Registry helpers: register a dataset's champion exactly once, move the alias.

A registered version carries the tag `dataset_id`; it is the registry's own record of which
dataset a version belongs to, and what makes registration idempotent and race-safe:

* `register_once` registers only if no version of the model carries the dataset's tag;
* after registering it lists again and, if concurrent callers registered the same dataset
  twice, keeps the LOWEST version number and deletes the others, so every caller converges on
  the same version whatever the interleaving.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
# The last registered version the gate did not promote (cleared when it is promoted).
CHALLENGER_ALIAS = "challenger"
DATASET_TAG = "dataset_id"


def client_for(tracking_uri: str) -> MlflowClient:
    """A client for one tracking server; also points the fluent API at it."""
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def versions_for_dataset(client: MlflowClient, name: str, dataset_id: str) -> list[ModelVersion]:
    """Every version of `name` tagged with this dataset id, lowest version first."""
    try:
        found = client.search_model_versions(
            f"name = '{name}' and tags.{DATASET_TAG} = '{dataset_id}'"
        )
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return sorted(found, key=lambda v: int(v.version))


def _converge(client: MlflowClient, name: str, dataset_id: str) -> ModelVersion | None:
    """Keep the lowest version tagged with the dataset; delete the others (concurrent twins)."""
    versions = versions_for_dataset(client, name, dataset_id)
    if not versions:
        return None
    keep, *extra = versions
    for duplicate in extra:
        log.warning(
            "dataset %s was registered twice (versions %s and %s): deleting version %s",
            dataset_id,
            keep.version,
            duplicate.version,
            duplicate.version,
        )
        try:
            client.delete_model_version(name, duplicate.version)
        except MlflowException as error:  # another caller deleted it first
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    return keep


def register_once(
    client: MlflowClient,
    name: str,
    model_uri: str,
    dataset_id: str,
    tags: Mapping[str, str],
    description: str,
) -> tuple[ModelVersion, bool]:
    """The one version of `name` for this dataset: (version, True if this call created it).

    The description is set on the kept version if it has none yet (also when the caller that
    created it died before describing it).
    """
    kept = _converge(client, name, dataset_id)
    created_now = False
    if kept is None:
        created = mlflow.register_model(model_uri, name, tags={**tags, DATASET_TAG: dataset_id})
        kept = _converge(client, name, dataset_id)
        if kept is None:
            raise RuntimeError(f"registered version of dataset {dataset_id} disappeared")
        created_now = kept.version == created.version
        if not created_now:  # a concurrent caller's lower version won; ours was deleted
            log.warning(
                "registration raced: version %s kept for dataset %s (ours, %s, deleted)",
                kept.version,
                dataset_id,
                created.version,
            )
    if not kept.description:
        client.update_model_version(name, kept.version, description=description)
        kept = client.get_model_version(name, kept.version)
    return kept, created_now


def ensure_model_description(client: MlflowClient, name: str, description: str) -> None:
    """Describe the registered model itself (shown in the MLflow UI) unless it already is."""
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=description)


def aliased(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points to, None if it points nowhere (or the model is not there)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


def champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version the `champion` alias points to, None if there is none yet."""
    return aliased(client, name, CHAMPION_ALIAS)


def set_alias(client: MlflowClient, name: str, alias: str, version: str) -> bool:
    """Point `alias` at `version`; False (and no call) if it already does."""
    current = aliased(client, name, alias)
    if current is not None and current.version == str(version):
        return False
    client.set_registered_model_alias(name, alias, str(version))
    return True


def clear_alias(client: MlflowClient, name: str, alias: str) -> bool:
    """Remove `alias`; False if it pointed nowhere."""
    if aliased(client, name, alias) is None:
        return False
    client.delete_registered_model_alias(name, alias)
    return True


def set_champion(client: MlflowClient, name: str, version: str) -> bool:
    """Point the `champion` alias at `version`; False (and no call) if it already does."""
    return set_alias(client, name, CHAMPION_ALIAS, version)


def run_of(version: ModelVersion) -> str:
    """The training run a registered version came from."""
    return str(version.tags.get("run_id") or version.run_id)


def registered_at(version: ModelVersion) -> str:
    """The registration time of a version, ISO 8601 UTC: deterministic for a given version."""
    moment = datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
