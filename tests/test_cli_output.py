"""The CLI against a real server, as scripts use it: exit codes per kind of failure, --json output
on stdout and errors as JSON on stderr, progress as plain lines when stderr is a pipe, whole
columns when stdout is one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from registry.demo import make_base

from .conftest import Server


def _last_json(text: str) -> dict[str, object]:
    return json.loads(text.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _run(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return server.cli(*args, check=False)


def test_exit_codes_per_failure(sqlite_server: Server, demo: dict[str, Path], name: str, tmp_path: Path) -> None:
    ok = _run(sqlite_server, "push", str(demo["base"]), "--name", name)
    assert ok.returncode == 0 and ok.stdout.strip().splitlines()[-1] == f"{name}@1"
    cases = [
        (("show", f"{name}@9"), 3, "version_not_found"),  # not found
        (("pull", f"{name}-nope", str(tmp_path / "x")), 3, "model_not_found"),
        (("push", str(tmp_path / "no-such-folder"), "--name", name), 3, "file_not_found"),  # a local path
        (("push", str(demo["adapter-sql"]), "--name", f"{name}-a", "--base", "no-such@1"), 4, "unknown_base"),
        (("tag", "set", f"{name}@1", "bad key=x"), 4, "invalid_tag"),  # invalid input
        (("push", str(demo["base"]), "--name", name), 5, "duplicate_content"),  # conflict
        (("show",), 2, "usage"),  # a bad command line
    ]
    for args, code, err_code in cases:
        p = _run(sqlite_server, *args, "--json")
        assert p.returncode == code, (args, p.returncode, p.stderr)
        assert p.stdout == "", (args, p.stdout)  # nothing but the error, and that on stderr
        err = _last_json(p.stderr)["error"]
        assert isinstance(err, dict) and err["code"] == err_code and err["exit_code"] == code, (args, err)
        plain = _run(sqlite_server, *args)
        assert plain.returncode == code and "error" in plain.stderr.lower(), (args, plain.stderr)


def test_json_output_on_stdout(sqlite_server: Server, demo: dict[str, Path], name: str, tmp_path: Path) -> None:
    pushed = json.loads(_run(sqlite_server, "push", str(demo["base"]), "--name", name, "--json").stdout)
    assert pushed["ref"] == f"{name}@1" and {f["path"] for f in pushed["files"]} >= {"model.safetensors"}
    pulled = json.loads(_run(sqlite_server, "pull", f"{name}@1", str(tmp_path / "out"), "--json").stdout)
    assert pulled["content_sha256"] == pushed["content_sha256"]
    outputs = {
        ("show", f"{name}@1"): lambda d: d["ref"] == f"{name}@1",
        ("ls", name): lambda d: [v["ref"] for v in d] == [f"{name}@1"],
        ("ls", "--models", name): lambda d: [m["name"] for m in d] == [name],
        ("lineage", f"{name}@1"): lambda d: d["root"] == f"{name}@1",
        ("alias", "set", name, "prod", "1"): lambda d: d["ref"] == f"{name}@1",
        ("alias", "ls", name): lambda d: [a["alias"] for a in d] == ["prod"],
        ("alias", "rm", name, "prod"): lambda d: d["removed"] is True,
        ("tag", "set", f"{name}@1", "k=v"): lambda d: d["tags"] == {"k": "v"},
        ("tag", "rm", f"{name}@1", "k"): lambda d: d["tags"] == {},
        ("storage",): lambda d: any(m["model"] == name for m in d["models"]),
        ("jobs",): lambda d: isinstance(d, list),
        ("basis", "ls"): lambda d: isinstance(d, list),
        ("policy", "ls"): lambda d: isinstance(d, list),
        ("pack", f"{name}@1"): lambda d: d["type"] == "pack" and d["state"] == "queued",
        ("db", "current"): lambda d: d["revision"],
        ("token", "ls"): lambda d: isinstance(d, list),
    }
    for args, check in outputs.items():
        p = _run(sqlite_server, *args, "--json")
        assert p.returncode == 0, (args, p.stderr)
        assert check(json.loads(p.stdout)), (args, p.stdout)


def test_progress_lines_and_whole_columns_when_piped(sqlite_server: Server, tmp_path: Path, name: str) -> None:
    """stderr and stdout are pipes here: progress comes as plain lines (no bars, no escape codes)
    and tables keep every column whole, one line per row."""
    folder = make_base(tmp_path / "m", seed=21)
    long_value = "v" * 150
    description = "a description far longer than the forty characters a terminal table shows " * 2
    with sqlite_server.client() as rc:
        rc.create_model(name, "base", description=description)
    push = _run(sqlite_server, "push", str(folder), "--name", name, "--tag", f"note={long_value}")
    assert push.returncode == 0, push.stderr
    lines = push.stderr.splitlines()
    assert any(line.startswith("hashing: ") for line in lines)
    assert lines[-1].startswith("uploading: ") and lines[-1].endswith("(100%)"), lines
    assert "\x1b" not in push.stderr and "\r" not in push.stderr
    pull = _run(sqlite_server, "pull", f"{name}@1", str(tmp_path / "out"))
    assert any(x.startswith("downloading: ") and x.endswith("(100%)") for x in pull.stderr.splitlines())

    listed = _run(sqlite_server, "ls", name).stdout
    (row,) = [line for line in listed.splitlines() if f"{name}@1" in line]
    assert f"note={long_value}" in row  # the whole tag, on the version's own line
    models = _run(sqlite_server, "ls", "--models", name).stdout
    (row,) = [line for line in models.splitlines() if name in line]
    assert description.strip() in row
    shown = _run(sqlite_server, "show", f"{name}@1").stdout
    sha = json.loads(_run(sqlite_server, "show", f"{name}@1", "--json").stdout)["files"][0]["sha256"]
    assert sha in shown  # 64 hex digits, not cut
