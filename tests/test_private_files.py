"""Private files of the local stack (readmission.localstack.private_files)."""

from __future__ import annotations

import stat
from pathlib import Path

from readmission.localstack.private_files import write_private


def test_a_private_file_is_0600_even_where_a_world_readable_one_was(tmp_path: Path) -> None:
    path = tmp_path / "run" / "credentials.json"  # its directory does not exist yet
    write_private(path, "first")
    assert path.read_text() == "first"
    path.chmod(0o644)
    write_private(path, b"second")
    assert path.read_bytes() == b"second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_symlink_in_its_place_is_replaced_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("untouched")
    path = tmp_path / "grpc.key"
    path.symlink_to(target)
    write_private(path, "key")
    assert not path.is_symlink() and path.read_text() == "key"
    assert target.read_text() == "untouched"
