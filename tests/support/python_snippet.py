"""Run a Python snippet in a new interpreter, as a fresh process of the project sees it.

For what only a new process shows: which modules an import pulls in, at-fork hooks and exit
handlers, byte-identical output across interpreters.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_python(
    script: str, *, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -c script` from the project root with os.environ plus `env`; asserts it exited
    with 0 (its stderr as the message) and returns the finished process."""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result
