"""What the CLI says when things go wrong (no server needed)."""

from __future__ import annotations

import pytest
import typer

from registry import cli
from registry.client import JobFailed


def test_a_failed_job_prints_its_own_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A job's failure is reported as the job's error, not as an HTTP error with status 0."""
    with pytest.raises(typer.Exit) as e, cli._errors():
        raise JobFailed(0, "invalid_weights", "job 7 failed: module [q_proj]: shapes differ")
    text = capsys.readouterr().err
    assert e.value.exit_code == 1
    assert "job 7 failed: module [q_proj]: shapes differ (invalid_weights)" in " ".join(text.split())
    assert "(0 " not in text
