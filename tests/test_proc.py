"""The subprocess helper and the exit-code mapping."""

from __future__ import annotations

import logging

import pytest

from shim import proc
from shim.errors import (
    EXIT_CLEANUP_FAILED,
    EXIT_ERROR,
    CleanupFailed,
    CommandFailed,
    InputError,
    exit_code_for,
)


def test_output_is_captured_and_failures_raise() -> None:
    assert proc.run(["echo", "hi"]).stdout == "hi\n"
    with pytest.raises(CommandFailed, match="exit code 3"):
        proc.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert proc.run(["false"], check=False).returncode == 1


def test_timeout_and_missing_program() -> None:
    with pytest.raises(CommandFailed, match="timed out"):
        proc.run(["sleep", "5"], timeout=0.2)
    with pytest.raises(CommandFailed, match="not found"):
        proc.run(["/nonexistent/program"])


def test_secrets_are_masked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(CommandFailed) as info:
        proc.run(["sh", "-c", "echo bad s3cret >&2; exit 1", "s3cret"], secrets=["s3cret"])
    assert "s3cret" not in str(info.value) and "s3cret" not in caplog.text
    assert "***" in caplog.text


def test_exit_codes_are_chosen_in_one_place() -> None:
    assert exit_code_for(InputError("x")) == EXIT_ERROR == 1
    assert exit_code_for(CleanupFailed("x")) == EXIT_CLEANUP_FAILED == 20
    assert exit_code_for(ValueError("unexpected")) == 1
