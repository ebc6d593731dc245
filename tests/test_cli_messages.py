"""What the CLI says when things go wrong, and how it exits (no server needed): the exit-code table,
errors as JSON with --json, usage errors, --version, plain progress lines off a terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import typer

from registry import __version__, cli
from registry.client import (
    BadRequest,
    ChecksumMismatch,
    Conflict,
    DataCorrupt,
    Forbidden,
    InvalidInput,
    JobFailed,
    NotFound,
    RegistryAPIError,
    ServerError,
    ServerUnreachable,
    Unauthorized,
)
from registry.client_errors import error_from_response

from .conftest import free_port


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "registry", *args], capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}, **env})


def test_a_failed_job_prints_its_own_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A job's failure is reported as the job's error, not as an HTTP error with status 0."""
    with pytest.raises(typer.Exit) as e, cli._errors():
        raise JobFailed(0, "invalid_weights", "job 7 failed: module [q_proj]: shapes differ")
    text = capsys.readouterr().err
    assert e.value.exit_code == cli.EXIT_JOB_FAILED == 8
    assert "job 7 failed: module [q_proj]: shapes differ (invalid_weights)" in " ".join(text.split())
    assert "(0 " not in text


@pytest.mark.parametrize(("error", "code"), [
    (NotFound(404, "model_not_found", "m"), 3), (InvalidInput(422, "invalid_name", "m"), 4),
    (BadRequest(400, "checksum_mismatch", "m"), 4), (Conflict(409, "duplicate_content", "m"), 5),
    (Unauthorized(401, "missing_token", "m"), 6), (Forbidden(403, "insufficient_scope", "m"), 6),
    (ServerUnreachable("no answer"), 7), (JobFailed(0, "x", "m"), 8),
    (ChecksumMismatch(0, "checksum_mismatch", "m"), 9),
    (DataCorrupt(500, "data_corrupt", "m"), 9), (ServerError(500, "server_error", "m"), 1),
    (FileNotFoundError("no such directory"), 3), (ValueError("no files to push"), 4), (TimeoutError("slow"), 1),
])
def test_exit_codes_come_from_the_error_kind(error: BaseException, code: int,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.exit_code(error) == code
    with pytest.raises(typer.Exit) as e, cli._errors(as_json=True):
        raise error
    assert e.value.exit_code == code
    (line,) = capsys.readouterr().err.strip().splitlines()
    body = json.loads(line)["error"]
    assert body["exit_code"] == code and set(body) >= {"code", "message", "details", "status"}
    if isinstance(error, RegistryAPIError):
        assert body["code"] == error.code and body["status"] == error.status


def test_server_error_bodies_map_to_one_class_per_kind() -> None:
    """The client's exception for an answer is chosen by its status (and data_corrupt by code), in one place."""
    def body(code: str) -> bytes:
        return json.dumps({"error": {"code": code, "message": "m", "details": {"k": 1}}}).encode()

    for status, cls in ((400, BadRequest), (401, Unauthorized), (403, Forbidden), (404, NotFound), (409, Conflict),
                        (422, InvalidInput), (500, ServerError), (502, ServerError)):
        e = error_from_response(status, body("some_code"))
        assert type(e) is cls and (e.status, e.code, e.message, e.details) == (status, "some_code", "m", {"k": 1})
    assert type(error_from_response(500, body("data_corrupt"))) is DataCorrupt
    proxy = error_from_response(502, b"<html>Bad Gateway</html>")  # not the registry's body
    assert isinstance(proxy, ServerError) and proxy.code == "http_error" and "Bad Gateway" in proxy.message


def test_usage_errors_exit_2_and_speak_json_when_asked() -> None:
    plain = _cli("show", "--bogus")
    assert plain.returncode == 2 and "No such option" in plain.stderr
    p = _cli("show", "--bogus", "--json")
    assert p.returncode == 2 and p.stdout == ""
    err = json.loads(p.stderr.strip().splitlines()[-1])["error"]
    assert err["code"] == "usage" and err["exit_code"] == 2 and "--bogus" in err["message"]
    bad_tag = _cli("tag", "set", "m@1", "no-equals-sign", "--json")
    assert bad_tag.returncode == 2 and json.loads(bad_tag.stderr.strip().splitlines()[-1])["error"]["code"] == "usage"


def test_version() -> None:
    p = _cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"registry {__version__}"


def test_an_unreachable_server_exits_7_with_a_json_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    p = _cli("ls", "--json", REGISTRY_URL=url, REGISTRY_CLIENT_RETRY_SECONDS="0")
    assert p.returncode == 7 and p.stdout == ""
    err = json.loads(p.stderr.strip().splitlines()[-1])["error"]
    assert err["code"] == "server_unreachable" and url in err["message"] and err["details"]["url"] == url
    plain = _cli("ls", REGISTRY_URL=url, REGISTRY_CLIENT_RETRY_SECONDS="0")
    assert plain.returncode == 7 and "cannot reach the registry" in plain.stderr


def test_every_command_takes_json() -> None:
    """--json on every command (the long-running services up, worker and dispatcher excepted)."""
    root = typer.main.get_command(cli.app)

    def commands(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
        if hasattr(group, "commands"):  # a group (click's, or the copy newer typer releases vendor)
            return [c for name, sub in group.commands.items() for c in commands(sub, f"{prefix}{name} ")]
        return [(prefix.strip(), group)]

    found = commands(root)
    assert len(found) > 40
    missing = [name for name, cmd in found if name not in ("up", "worker", "dispatcher")
               and "--json" not in {o for p in cmd.params for o in getattr(p, "opts", [])}]
    assert missing == []


def test_progress_off_a_terminal_is_plain_lines(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli._state, "json", False)
    with cli._Lines() as bar:
        task = bar.add_task("uploading", total=1000)
        for _ in range(20):
            bar.advance(task, 50)
        hidden = bar.add_task("hashing", total=10, visible=False)
        bar.advance(hidden, 10)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("uploading: 50 B of 1000 B") and lines[-1] == "uploading: 1000 B of 1000 B (100%)"
    assert len(lines) == 11 and not any("hashing" in x or "\r" in x or "\x1b" in x for x in lines)
    monkeypatch.setitem(cli._state, "json", True)  # with --json: one JSON object per line
    with cli._Lines() as bar:
        bar.advance(bar.add_task("downloading", total=10), 10)
    (line,) = capsys.readouterr().err.splitlines()
    assert json.loads(line) == {"progress": {"task": "downloading", "message": None, "completed": 10,
                                             "total": 10, "percent": 100.0}}
