"""readmission.model_files without a server: digests of a directory, what a document may pin,
and every kind of difference named. The real MLflow round trips are in tests/test_training.py
and tests/test_aggregate.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from readmission import model_files
from readmission.model_files import ModelFilesMismatch


def model_dir(root: Path) -> Path:
    directory = root / "model"
    directory.mkdir()
    (directory / "MLmodel").write_text("flavors: {}\n")
    (directory / "model.skops").write_bytes(b"PK\x03\x04 skops")
    (directory / "metadata").mkdir()
    (directory / "metadata" / "requirements.txt").write_text("scikit-learn\n")
    return directory


def test_digests_are_the_sha256_of_every_file_by_relative_path(tmp_path: Path) -> None:
    directory = model_dir(tmp_path)
    digests = model_files.digests_of(directory)
    assert list(digests) == ["MLmodel", "metadata/requirements.txt", "model.skops"]
    assert digests["model.skops"] == hashlib.sha256(b"PK\x03\x04 skops").hexdigest()
    assert model_files.parse_digests(digests) == digests
    assert model_files.from_tag({model_files.DIGESTS_TAG: model_files.to_tag(digests)}) == digests
    assert model_files.from_tag({}) is None


def test_a_changed_missing_or_added_file_is_named_and_refused(tmp_path: Path) -> None:
    directory = model_dir(tmp_path)
    expected = model_files.digests_of(directory)
    model_files.compare(model_files.digests_of(directory), expected, "runs:/r/model")

    (directory / "MLmodel").write_text("flavors: {}\nskops_trusted_types: [builtins.eval]\n")
    (directory / "model.skops").unlink()
    (directory / "extra.py").write_text("import os\n")
    with pytest.raises(ModelFilesMismatch) as caught:
        model_files.compare(model_files.digests_of(directory), expected, "runs:/r/model")
    message = str(caught.value)
    assert "runs:/r/model" in message and "refusing to load it" in message
    assert "changed: MLmodel" in message
    assert "missing: model.skops" in message and "added: extra.py" in message


def test_a_symbolic_link_in_a_model_directory_is_refused(tmp_path: Path) -> None:
    directory = model_dir(tmp_path)
    (directory / "link").symlink_to(tmp_path)
    with pytest.raises(ModelFilesMismatch, match="symbolic link"):
        model_files.digests_of(directory)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "non-empty object"),
        ({}, "non-empty object"),
        (["MLmodel"], "non-empty object"),
        ({"MLmodel": "ab"}, "not a sha256"),
        ({"MLmodel": "A" * 64}, "not a sha256"),
        ({"MLmodel": "a" * 64, "../x": "a" * 64}, "not relative"),
        ({"MLmodel": "a" * 64, "/etc/passwd": "a" * 64}, "not relative"),
        ({"MLmodel": "a" * 64, 3: "a" * 64}, "not relative"),
        ({"model.skops": "a" * 64}, "does not pin MLmodel"),
    ],
)
def test_pinned_digests_must_be_relative_paths_to_sha256_and_pin_mlmodel(
    value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        model_files.parse_digests(value)


def test_a_malformed_digest_tag_on_a_run_is_a_mismatch() -> None:
    with pytest.raises(ModelFilesMismatch, match="not valid"):
        model_files.from_tag({model_files.DIGESTS_TAG: "{not json"})
