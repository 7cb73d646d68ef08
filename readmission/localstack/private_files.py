"""Files of the local stack that only the user running it may read: credentials, keys, the
environment file, the watchdog's launch records (they hold the S3 keys).

Contract: `write_private(path, data)` leaves `path` holding exactly `data` with mode 0600 from
its creation on. An existing file (or symlink) at `path` is removed first and the new one is
created exclusively (O_CREAT | O_EXCL), so no other user can read it between a write and a
chmod, a symlink planted there is never followed, and a file created with a wider mode before
is not kept. The parent directory is created if missing.
"""

from __future__ import annotations

import os
from pathlib import Path

MODE = 0o600


def write_private(path: Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path`, readable and writable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, MODE)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
