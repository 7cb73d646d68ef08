"""Version guards for the reach-ins into other libraries' internals.

Contract: `checked(distribution, low, high, what)` is True when the installed version of the
distribution is within [low, high) (the range the reach-in `what` was checked against); else,
or when the distribution is not installed, it logs one warning per `what` and returns False,
and the caller takes the library's public path.
"""

from __future__ import annotations

import functools
import logging
import re
from importlib import metadata

log = logging.getLogger(__name__)

Version = tuple[int, ...]


def parse_version(text: str) -> Version:
    """The leading numeric release of a version string: '26.2.0' -> (26, 2, 0),
    '1.20.0rc1' -> (1, 20, 0)."""
    numbers = []
    for part in text.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() != len(part):
            break
    return tuple(numbers)


@functools.cache
def installed_version(distribution: str) -> Version | None:
    """The installed release of `distribution` (read once per process), or None."""
    try:
        return parse_version(metadata.version(distribution))
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def checked(distribution: str, low: Version, high: Version, what: str) -> bool:
    """True if `distribution` is installed in [low, high); else warn once and return False."""
    version = installed_version(distribution)
    if version is not None and low <= version < high:
        return True
    shown = ".".join(map(str, version)) if version is not None else "not installed"
    log.warning(
        "%s: %s %s is outside the checked range [%s, %s); using the public path",
        what,
        distribution,
        shown,
        ".".join(map(str, low)),
        ".".join(map(str, high)),
    )
    return False


def warn_once(what: str, message: str) -> None:
    """One warning per `what`, for a reach-in whose internal is missing."""
    _warn_once(what, message)


@functools.cache
def _warn_once(what: str, message: str) -> None:
    log.warning("%s: %s; using the public path", what, message)
