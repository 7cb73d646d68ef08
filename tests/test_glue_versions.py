"""readmission.glue's version guards: the installed libraries are within the ranges the
reach-ins were checked against (else the fast paths are silently off), and outside a range,
or with an internal missing, a reach-in warns once and takes the public path."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from readmission.glue import http_close, onnxruntime_run, request_body, responses, versions

ROOT = Path(__file__).resolve().parent.parent


def test_parse_version() -> None:
    assert versions.parse_version("26.2.0") == (26, 2, 0)
    assert versions.parse_version("1.20.0rc1") == (1, 20, 0)
    assert versions.parse_version("2") == (2,)


def test_the_installed_libraries_are_within_the_checked_ranges() -> None:
    for distribution, (low, high) in (
        ("gunicorn", http_close.CHECKED_RANGE),
        ("gunicorn", request_body.CHECKED_RANGE),
        ("gunicorn", responses.CHECKED_RANGE),
        ("onnxruntime", onnxruntime_run.CHECKED_RANGE),
    ):
        installed = versions.installed_version(distribution)
        assert installed is not None and low <= installed < high, (distribution, installed)


def test_pyproject_pins_gunicorn_to_the_checked_range() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"gunicorn>=(\d+),<(\d+)"', text)
    assert pin is not None, "pyproject.toml must pin gunicorn"
    assert ((int(pin[1]),), (int(pin[2]),)) == http_close.CHECKED_RANGE


def test_outside_the_range_a_reach_in_warns_once_and_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="readmission.glue.versions"):
        assert not versions.checked("gunicorn", (0,), (1,), "test reach-in")
        assert not versions.checked("gunicorn", (0,), (1,), "test reach-in")
        assert not versions.checked("no-such-distribution", (1,), (2,), "test missing")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "outside the checked range" in messages[0]
    assert "not installed" in messages[1]


class _PlainSession:
    """A session without onnxruntime's `_sess` binding."""

    def run(self, outputs: Any, feeds: Any) -> str:
        return "public"


def test_fast_run_falls_back_to_the_public_run(monkeypatch: pytest.MonkeyPatch) -> None:
    session = _PlainSession()
    assert onnxruntime_run.fast_run(session) == session.run  # no binding: the public run
    monkeypatch.setattr(onnxruntime_run, "CHECKED_RANGE", ((0,), (1,)))
    session._sess = object()  # type: ignore[attr-defined]
    assert onnxruntime_run.fast_run(session) == session.run  # out of range: the public run


def test_http_close_keeps_gunicorns_close_outside_the_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gunicorn.util

    original = gunicorn.util.close_graceful
    monkeypatch.setattr(gunicorn.util, "close_graceful", original)
    monkeypatch.setattr(http_close, "CHECKED_RANGE", ((0,), (1,)))
    assert http_close.install() is False
    assert gunicorn.util.close_graceful is original
