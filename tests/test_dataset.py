"""Finding, extracting and verifying the UCI data set (no network: archives built here)."""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support.seaweed_server import real_csv_bytes

from readmission import dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = b"encounter_id,patient_nbr\r\n1,2\r\n"


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_csv_is_found_in_a_flat_archive() -> None:
    archive = _zip(
        {"dataset_diabetes/IDs_mapping.csv": b"x", "dataset_diabetes/diabetic_data.csv": SMALL}
    )
    assert dataset.csv_from_archive(archive) == SMALL


def test_csv_is_found_in_a_nested_archive() -> None:
    inner = _zip({"dataset_diabetes/diabetic_data.csv": SMALL})
    outer = _zip(
        {"README.txt": b"hello", "other.zip": _zip({"a.txt": b"a"}), "dataset_diabetes.zip": inner}
    )
    assert dataset.csv_from_archive(outer) == SMALL


def test_archive_without_the_csv_fails_loudly() -> None:
    with pytest.raises(dataset.DatasetError, match=r"diabetic_data\.csv not found"):
        dataset.csv_from_archive(_zip({"dataset_diabetes/IDs_mapping.csv": b"x"}))


def test_checksum_mismatch_fails_loudly(tmp_path: Path) -> None:
    archive = _zip({"dataset_diabetes/diabetic_data.csv": SMALL})
    with pytest.raises(dataset.DatasetError, match="does not match the published"):
        dataset.from_archive_to(archive, tmp_path)
    assert not (tmp_path / dataset.CSV_NAME).exists(), "an unverified file must not be kept"


def test_real_csv_passes_the_published_checksum(tmp_path: Path) -> None:
    data = real_csv_bytes()
    assert hashlib.sha256(data).hexdigest() == dataset.CSV_SHA256
    archive = _zip({"dataset_diabetes/diabetic_data.csv": data}, zipfile.ZIP_STORED)
    path = dataset.from_archive_to(
        _zip({"dataset_diabetes.zip": archive}, zipfile.ZIP_STORED), tmp_path
    )
    assert path == tmp_path / dataset.CSV_NAME and path.read_bytes() == data


def test_download_path_uses_the_archive_at_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # file:// stands in for the UCI host (no internet here); the code path is the real one
    archive = tmp_path / "uci.zip"
    archive.write_bytes(_zip({"dataset_diabetes/diabetic_data.csv": real_csv_bytes()}))
    monkeypatch.delenv(dataset.ENV_VAR, raising=False)
    monkeypatch.setattr(dataset, "SHARED_COPY", tmp_path / "absent.csv.gz")
    monkeypatch.setattr(dataset, "UCI_URL", archive.as_uri())
    dest = tmp_path / "data"
    path = dataset.ensure_dataset(dest)
    assert path == dest / dataset.CSV_NAME
    assert hashlib.sha256(path.read_bytes()).hexdigest() == dataset.CSV_SHA256
    archive.unlink()  # the second call uses the verified cached copy
    assert dataset.ensure_dataset(dest) == path


def test_unreachable_download_names_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(dataset.ENV_VAR, raising=False)
    monkeypatch.setattr(dataset, "SHARED_COPY", tmp_path / "absent.csv.gz")
    monkeypatch.setattr(dataset, "UCI_URL", (tmp_path / "nowhere.zip").as_uri())
    with pytest.raises(dataset.DatasetError, match="set DIABETES_CSV"):
        dataset.ensure_dataset(tmp_path / "data")


@pytest.mark.parametrize("name", ["d.csv", "d.csv.gz"])
def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(gzip.compress(SMALL) if name.endswith(".gz") else SMALL)
    monkeypatch.setenv(dataset.ENV_VAR, str(path))
    assert dataset.ensure_dataset() == path
    assert dataset.read_dataset_bytes(path) == SMALL


def test_relative_env_var_is_relative_to_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dataset.ENV_VAR, "../shared/data/diabetic_data.csv.gz")
    path = dataset.ensure_dataset()
    assert path.resolve() == (ROOT.parent / "shared/data/diabetic_data.csv.gz").resolve()
    assert len(dataset.read_dataset_bytes(path)) == 19_159_383


def test_cli_prints_the_path(tmp_path: Path) -> None:
    path = tmp_path / "diabetic_data.csv"
    path.write_bytes(SMALL)
    result = subprocess.run(
        [sys.executable, "-m", "readmission.dataset"],
        cwd=ROOT,
        env={"DIABETES_CSV": str(path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == str(path)
