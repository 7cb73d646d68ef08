"""Where the UCI "Diabetes 130-US hospitals 1999-2008" CSV comes from (dataset 296, CC BY 4.0).

`ensure_dataset()` returns a path to `diabetic_data.csv` (or its `.gz`): the file named by env
DIABETES_CSV if it exists, else the shared copy `../shared/data/diabetic_data.csv.gz` next to the
repository, else the UCI archive downloaded into `dest_dir` (checked against its published
sha256). `python -m readmission.dataset` prints the path.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

ENV_VAR = "DIABETES_CSV"
CSV_NAME = "diabetic_data.csv"
CSV_SHA256 = "0689e7ec031237dc63031b938805c48377748761a3b26acab621567afa24df97"
UCI_URL = (
    "https://archive.ics.uci.edu/static/public/296/"
    "diabetes+130-us+hospitals+for+years+1999-2008.zip"
)
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_COPY = REPO_ROOT.parent / "shared" / "data" / f"{CSV_NAME}.gz"
DEFAULT_DEST = REPO_ROOT / ".state" / "data"
MAX_NESTING = 3


class DatasetError(RuntimeError):
    """The data set could not be found, downloaded or verified."""


def read_dataset_bytes(path: Path | str) -> bytes:
    """The CSV bytes of `path` (.csv, or .csv.gz decompressed)."""
    path = Path(path)
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(data: bytes, expected: str = CSV_SHA256, what: str = CSV_NAME) -> None:
    actual = sha256_hex(data)
    if actual != expected:
        raise DatasetError(
            f"{what}: sha256 {actual} does not match the published {expected}; the file is "
            f"corrupt or not the UCI original: delete it and download it again"
        )


def csv_from_archive(archive: bytes, name: str = CSV_NAME, depth: int = 0) -> bytes:
    """The bytes of `name` inside a zip archive, looking into nested zips too."""
    with zipfile.ZipFile(io.BytesIO(archive)) as outer:
        members = outer.namelist()
        for member in members:
            if member.rsplit("/", 1)[-1] == name:
                return outer.read(member)
        if depth < MAX_NESTING:
            for member in members:
                if member.lower().endswith(".zip"):
                    try:
                        return csv_from_archive(outer.read(member), name, depth + 1)
                    except DatasetError:
                        continue
    raise DatasetError(f"{name} not found in the archive (members: {', '.join(members[:10])})")


def download(url: str | None = None, timeout: float = 120.0) -> bytes:
    url = url or UCI_URL
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except OSError as error:
        raise DatasetError(
            f"could not download {url}: {error}; download it by hand and set {ENV_VAR} to the "
            f"path of {CSV_NAME}"
        ) from error


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        tmp.write(data)
    Path(tmp.name).replace(path)


def from_archive_to(archive: bytes, dest_dir: Path) -> Path:
    """Extract and verify the CSV from the UCI archive bytes into dest_dir."""
    data = csv_from_archive(archive)
    verify(data)
    path = dest_dir / CSV_NAME
    _write_atomic(path, data)
    return path


def ensure_dataset(dest_dir: Path | None = None) -> Path:
    """Path of diabetic_data.csv (or .csv.gz): env DIABETES_CSV, the shared copy, or download."""
    configured = os.environ.get(ENV_VAR, "").strip()
    if configured:
        path = Path(configured)
        if not path.is_absolute():
            path = REPO_ROOT / path
        if path.is_file():
            return path
    if SHARED_COPY.is_file():
        return SHARED_COPY
    dest_dir = dest_dir or DEFAULT_DEST
    cached = dest_dir / CSV_NAME
    if cached.is_file():
        verify(cached.read_bytes(), what=str(cached))
        return cached
    return from_archive_to(download(), dest_dir)


def main() -> int:
    try:
        print(ensure_dataset())
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
