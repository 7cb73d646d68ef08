"""Settings read from environment variables: the one place that parses them.

Contract: each function reads one variable from `os.environ` when it is called (no cache),
strips its value, and returns `default` when the variable is unset or blank. A value that is
set but cannot be parsed, or is below `minimum`, raises ValueError whose message names the
variable and quotes the stripped value, e.g. "BATCH_ROWS must be an integer, got 'x'" or
"SCORE_CHUNK_BYTES must be >= 65536, got '10'". Defaults are returned as given, unchecked.

* `text(name, default)`: the stripped value;
* `number(name, default, minimum=)`: a finite float (`nan` and `inf` are refused);
* `integer(name, default, minimum=)`: an int written as one (`"1.5"` and `"1e3"` are refused);
* `seconds(name, default)`: a timeout or deadline, a finite number above zero;
* `flag(name, default)`: `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`, in any case.

Checks a setting needs beyond these (an upper bound, a relation between two settings, a set
of words) stay with the settings that read it. This module imports nothing of the project, so
every package (`readmission`, its `serving` and `glue` cores, `events`, `functions`) may use it.
"""

from __future__ import annotations

import math
import os

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def text(name: str, default: str = "") -> str:
    """The variable's stripped value, or `default` when it is unset or blank."""
    return os.environ.get(name, "").strip() or default


def number(name: str, default: float, *, minimum: float | None = None) -> float:
    """The variable as a finite float (at least `minimum` if given), or `default` if unset."""
    raw = text(name)
    if not raw:
        return float(default)
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {raw!r}")
    _check_minimum(name, raw, value, minimum)
    return value


def seconds(name: str, default: float) -> float:
    """The variable as a finite number of seconds above zero, or `default` if unset."""
    raw = text(name)
    if not raw:
        return float(default)
    value = number(name, default)
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def integer(name: str, default: int, *, minimum: int | None = None) -> int:
    """The variable as an int (at least `minimum` if given), or `default` if unset."""
    raw = text(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc
    _check_minimum(name, raw, value, minimum)
    return value


def flag(name: str, default: bool) -> bool:
    """The variable as a bool (see the module docstring's words), or `default` if unset."""
    raw = text(name)
    if not raw:
        return default
    if raw.lower() in TRUE_WORDS:
        return True
    if raw.lower() in FALSE_WORDS:
        return False
    raise ValueError(f"{name} must be one of 1, true, yes, on, 0, false, no, off, got {raw!r}")


def _check_minimum(name: str, raw: str, value: float, minimum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {raw!r}")
