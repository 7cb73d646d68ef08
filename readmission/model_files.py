"""The files of a logged MLflow model pinned by their sha256: recorded when the model is
logged, checked before anything deserialises it.

MLflow's tracking server has no authentication of its own, and what `mlflow.sklearn.load_model`
does is decided by the model's files: the `MLmodel` file names the skops types to trust, the
skops file holds the objects. So the train step records, in its result document
(`model_files`: relative path -> sha256 hex), the digest of every file of the model directory
it logged, and every load of a pipeline for a decision goes through `load_verified`, which

* downloads the whole model directory to a fresh local directory,
* compares every file with the recorded digests: a file changed, missing or added is a
  ModelFilesMismatch (nothing is loaded),
* and loads the pipeline from that very local copy (no second download to swap in between).

Contract: `digests_of` never follows a path given by a document (it walks the directory it is
given); `parse_digests` accepts only a non-empty mapping of relative POSIX paths to 64-hex
digests that names `MLmodel`. A mismatch is permanent: retrying downloads the same files.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.artifacts

from readmission import tracking

# Run tag holding the digests as canonical JSON (set with the run's completion, so a complete
# run always carries them; a reused fit's result carries the same digests forward).
DIGESTS_TAG = "readmission.model_files"
# Key of the digests in a result document.
RESULT_KEY = "model_files"
MLMODEL = "MLmodel"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class ModelFilesMismatch(ValueError):
    """The model directory MLflow serves is not the one the training run logged (a file
    changed, missing or added): no retry can fix it, a person must look."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digests_of(directory: Path) -> dict[str, str]:
    """relative POSIX path -> sha256 of every regular file under `directory`, sorted by path."""
    found = {}
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            raise ModelFilesMismatch(f"{path.relative_to(directory)} is a symbolic link")
        if path.is_file():
            found[path.relative_to(directory).as_posix()] = _sha256(path)
    return found


def parse_digests(value: Any) -> dict[str, str]:
    """The digests of a document or tag, checked (ValueError saying what is wrong)."""
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{RESULT_KEY} must be a non-empty object of path -> sha256")
    out = {}
    for path, digest in value.items():
        parts = str(path).split("/")
        if not isinstance(path, str) or not path or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{RESULT_KEY} names a path that is not relative: {path!r}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ValueError(f"{RESULT_KEY}[{path!r}] is not a sha256 hex digest")
        out[path] = digest
    if MLMODEL not in out:
        raise ValueError(f"{RESULT_KEY} does not pin {MLMODEL}")
    return dict(sorted(out.items()))


def to_tag(digests: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(digests.items())), separators=(",", ":"))


def from_tag(tags: Mapping[str, str]) -> dict[str, str] | None:
    """The digests recorded on a run (None if the run has none: logged before they were)."""
    text = tags.get(DIGESTS_TAG)
    if text is None:
        return None
    try:
        return parse_digests(json.loads(text))
    except (json.JSONDecodeError, ValueError) as error:
        raise ModelFilesMismatch(f"run tag {DIGESTS_TAG} is not valid: {error}") from error


def compare(found: Mapping[str, str], expected: Mapping[str, str], where: str) -> None:
    """ModelFilesMismatch naming every file that differs from the recorded digests."""
    changed = sorted(p for p in expected if p in found and found[p] != expected[p])
    missing = sorted(p for p in expected if p not in found)
    added = sorted(p for p in found if p not in expected)
    if changed or missing or added:
        problems = [
            f"{label}: {', '.join(paths)}"
            for label, paths in (("changed", changed), ("missing", missing), ("added", added))
            if paths
        ]
        raise ModelFilesMismatch(
            f"the model files of {where} are not the ones its training run logged "
            f"({'; '.join(problems)}): refusing to load it"
        )


def download(model_uri: str, destination: Path) -> Path:
    """The model directory behind `model_uri`, downloaded under `destination`."""
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(destination))
    return Path(local)


def logged_digests(model_uri: str) -> dict[str, str]:
    """The digests of the model directory as the store holds it now."""
    with tempfile.TemporaryDirectory(prefix="model-files-") as tmp:
        return digests_of(download(model_uri, Path(tmp)))


def load_verified(model_uri: str, expected: Mapping[str, str]) -> Any:
    """The pipeline behind `model_uri`, loaded from a local copy whose files all match
    `expected` (ModelFilesMismatch otherwise, before any deserialisation)."""
    with tempfile.TemporaryDirectory(prefix="model-files-") as tmp:
        local = download(model_uri, Path(tmp))
        compare(digests_of(local), expected, model_uri)
        return tracking.load_pipeline(str(local))
