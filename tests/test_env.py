"""readmission.env: settings parsed from environment variables, errors that name them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from readmission import env

NAME = "READMISSION_TEST_SETTING"


@pytest.fixture
def setting(monkeypatch: pytest.MonkeyPatch):
    """Sets the test variable to a value (None: unsets it)."""
    monkeypatch.delenv(NAME, raising=False)

    def set_to(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(NAME, raising=False)
        else:
            monkeypatch.setenv(NAME, value)

    return set_to


def _raises(message: str):
    return pytest.raises(ValueError, match=f"^{re.escape(message)}$")


# --------------------------------------------------------------------------- text


def test_text_is_the_default_when_unset_or_blank(setting) -> None:
    assert env.text(NAME, "fallback") == "fallback"
    setting("  \t ")
    assert env.text(NAME, "fallback") == "fallback"
    assert env.text(NAME) == ""


def test_text_is_the_stripped_value(setting) -> None:
    setting("  s3://bucket \n")
    assert env.text(NAME, "fallback") == "s3://bucket"


# --------------------------------------------------------------------------- number


def test_number_is_the_default_when_unset_or_blank(setting) -> None:
    assert env.number(NAME, 2.5) == 2.5
    setting(" ")
    assert env.number(NAME, 3) == 3.0
    assert isinstance(env.number(NAME, 3), float)


def test_number_parses_a_valid_value(setting) -> None:
    setting(" 0.25 ")
    assert env.number(NAME, 1.0) == 0.25
    setting("1e3")
    assert env.number(NAME, 1.0) == 1000.0
    setting("-4")
    assert env.number(NAME, 1.0) == -4.0


def test_number_names_the_variable_and_value_when_invalid(setting) -> None:
    setting("ten")
    with _raises(f"{NAME} must be a number, got 'ten'"):
        env.number(NAME, 1.0)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "Infinity"])
def test_number_refuses_a_non_finite_value(setting, value: str) -> None:
    setting(value)
    with _raises(f"{NAME} must be a finite number, got {value!r}"):
        env.number(NAME, 1.0)


def test_number_refuses_a_value_below_the_minimum(setting) -> None:
    setting("0.001")
    with _raises(f"{NAME} must be >= 0.01, got '0.001'"):
        env.number(NAME, 1.0, minimum=0.01)
    setting("0.01")
    assert env.number(NAME, 1.0, minimum=0.01) == 0.01


def test_number_does_not_check_the_default_against_the_minimum(setting) -> None:
    assert env.number(NAME, 0.0, minimum=1) == 0.0


# --------------------------------------------------------------------------- seconds


def test_seconds_is_the_default_when_unset_or_blank(setting) -> None:
    assert env.seconds(NAME, 10) == 10.0
    setting(" ")
    assert isinstance(env.seconds(NAME, 10), float)


def test_seconds_parses_a_positive_value(setting) -> None:
    setting(" 0.5 ")
    assert env.seconds(NAME, 10.0) == 0.5


@pytest.mark.parametrize("value", ["0", "-1", "0.0"])
def test_seconds_refuses_zero_and_negative_values(setting, value: str) -> None:
    setting(value)
    with _raises(f"{NAME} must be a positive number of seconds, got {value!r}"):
        env.seconds(NAME, 10.0)


@pytest.mark.parametrize(
    ("value", "message"), [("soon", "must be a number"), ("inf", "must be a finite number")]
)
def test_seconds_refuses_what_number_refuses(setting, value: str, message: str) -> None:
    setting(value)
    with _raises(f"{NAME} {message}, got {value!r}"):
        env.seconds(NAME, 10.0)


# --------------------------------------------------------------------------- integer


def test_integer_is_the_default_when_unset_or_blank(setting) -> None:
    assert env.integer(NAME, 7) == 7
    setting("")
    assert env.integer(NAME, 7) == 7


def test_integer_parses_a_valid_value(setting) -> None:
    setting(" 15000 ")
    assert env.integer(NAME, 7) == 15000
    setting("-3")
    assert env.integer(NAME, 7) == -3


@pytest.mark.parametrize("value", ["x", "1.5", "1e3", "0x10"])
def test_integer_names_the_variable_and_value_when_invalid(setting, value: str) -> None:
    setting(value)
    with _raises(f"{NAME} must be an integer, got {value!r}"):
        env.integer(NAME, 7)


def test_integer_refuses_a_value_below_the_minimum(setting) -> None:
    setting("10")
    with _raises(f"{NAME} must be >= 65536, got '10'"):
        env.integer(NAME, 1024 * 1024, minimum=64 * 1024)
    setting("65536")
    assert env.integer(NAME, 1024 * 1024, minimum=64 * 1024) == 65536


def test_integer_without_minimum_takes_zero_and_negatives(setting) -> None:
    setting("0")
    assert env.integer(NAME, 7) == 0


# --------------------------------------------------------------------------- flag


def test_flag_is_the_default_when_unset_or_blank(setting) -> None:
    assert env.flag(NAME, True) is True
    assert env.flag(NAME, False) is False
    setting("  ")
    assert env.flag(NAME, True) is True


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", "TRUE", " Yes ", "On"])
def test_flag_spellings_of_true(setting, value: str) -> None:
    setting(value)
    assert env.flag(NAME, False) is True


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "FALSE", " No ", "Off"])
def test_flag_spellings_of_false(setting, value: str) -> None:
    setting(value)
    assert env.flag(NAME, True) is False


@pytest.mark.parametrize("value", ["maybe", "2", "enabled", "y"])
def test_flag_names_the_variable_and_value_when_invalid(setting, value: str) -> None:
    setting(value)
    with _raises(f"{NAME} must be one of 1, true, yes, on, 0, false, no, off, got {value!r}"):
        env.flag(NAME, True)


# --------------------------------------------------------------------------- contract


def test_every_read_sees_the_environment_of_its_call(setting) -> None:
    setting("1")
    assert env.integer(NAME, 0) == 1
    setting("2")
    assert env.integer(NAME, 0) == 2
    setting(None)
    assert env.integer(NAME, 0) == 0


def test_the_module_imports_nothing_of_the_project() -> None:
    source = Path(env.__file__).read_text(encoding="utf-8")
    imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", source, flags=re.MULTILINE)
    assert set(imports) <= {"__future__", "math", "os"}
