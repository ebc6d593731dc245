"""The README is the user's manual, so it is run: its two commands stay at its top, CI runs exactly the
README's test command, and every shell block (and every Python snippet) runs in order, as written, against a
fresh registry.

How the README's blocks are run (``test_readme_runs_top_to_bottom``):

- ```` ```bash ````, ```` ```sh ```` and ```` ```console ```` blocks run line by line with bash (a ``$ `` prompt is
  stripped; in a console block lines without a prompt are output and are not run); ```` ```python ```` blocks run
  with this interpreter. All of them run in one scratch directory (where ``registry demo ./demo`` writes), with
  ``REGISTRY_HOME`` a fresh directory, the server on a free port (``REGISTRY_PORT`` / ``REGISTRY_URL``) and
  ``registry`` meaning this checkout.
- A ``# -> REF`` comment after a command is a promise about its last stdout line, and is checked.
- ``python3 -m pip install …`` steps are not repeated: the test runs this checkout, already installed.
- An HTML comment right before a block changes how it runs:
  ``<!-- readme-test: background -->`` starts it as a server (the test waits for ``/health`` and stops it at the
  end), ``<!-- readme-test: skip (why) -->`` leaves it out, saying why.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _commands() -> list[str]:
    text = README.read_text()
    head = text[: text.index("---")]
    return re.findall(r"```bash\n(.+?)\n```", head)


def test_readme_opens_with_two_commands() -> None:
    cmds = _commands()
    assert len(cmds) == 2
    assert "registry up" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert _commands()[1] in ci.splitlines()


# ----------------------------------------------------------------------------- the README, run

SHELLS = ("bash", "sh", "console")
BLOCK = re.compile(r"(?:^<!--[ \t]*readme-test:[ \t]*(?P<marker>[^\n]*?)[ \t]*-->[ \t]*\n)?^```(?P<lang>[\w-]*)[ \t]*\n"
                   r"(?P<body>.*?)^```[ \t]*$", re.S | re.M)
PIP = re.compile(r"^python3? -m pip install\b[^&;]*&&\s*")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    marker: str  # "" (run), "background", "skip (why)"


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for m in BLOCK.finditer(text):
        blocks.append(Block(text.count("\n", 0, m.start("lang")) + 1, m["lang"], m["body"], (m["marker"] or "")))
    return blocks


def shell_lines(block: Block) -> list[str]:
    """The commands of a shell block: comments and blank lines dropped, ``\\`` continuations joined,
    console prompts stripped (console lines without one are output)."""
    cmds: list[str] = []
    pending = ""
    for raw in block.body.splitlines():
        line = raw.rstrip()
        if block.lang == "console":
            if pending:
                pass
            elif line.startswith("$ "):
                line = line[2:]
            else:
                continue
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        cmds.append(PIP.sub("", pending + line))
        pending = ""
    return cmds


def promised_ref(cmd: str) -> str | None:
    """``registry push … # -> demo-base@1 (…)``: the ref the command's last stdout line must be."""
    m = re.search(r"\s#\s*->\s*(\S+)", cmd)
    return m[1] if m else None


def test_readme_blocks_are_found_and_markers_are_known() -> None:
    """Every fenced block of a language the test runs is found, and every marker is one the test knows
    (a typo would silently run a block meant to be skipped, or skip one meant to run)."""
    text = README.read_text()
    blocks = readme_blocks(text)
    assert len(blocks) == len(re.findall(r"^```", text, re.M)) // 2
    runnable = [b for b in blocks if b.lang in (*SHELLS, "python")]
    assert runnable and runnable[0].marker == "background"  # the top command starts the service
    for b in runnable:
        assert b.marker in ("", "background") or re.fullmatch(r"skip \(.+\)", b.marker), (b.line, b.marker)
    skipped = [b for b in runnable if b.marker.startswith("skip")]
    assert len(skipped) <= 4, [(b.line, b.marker) for b in skipped]  # skips stay few
    # the README's test command is never run from inside the tests
    assert all("pytest" not in b.body for b in runnable if not b.marker.startswith("skip"))
    assert [shell_lines(b) for b in runnable if b.marker == "background"][0] == ["python3 -m registry up"]


def test_readme_pulls_go_to_distinct_folders() -> None:
    """Two examples pulling into one folder mix two downloads (`out/` once held a delta and a merged
    checkpoint side by side): every pull of the README has a folder of its own."""
    text = README.read_text()
    pulls: dict[str, tuple[str, str]] = {}
    for b in readme_blocks(text):
        if b.lang in SHELLS:
            for cmd in shell_lines(b):
                words = shlex.split(cmd.split(" #")[0])
                if words[:2] == ["registry", "pull"]:
                    args = [w for w in words[2:] if not w.startswith("-")]
                    fmt = words[words.index("--format") + 1] if "--format" in words else "native"
                    ref, dest = args[0], args[1]
                    pulls.setdefault(dest.rstrip("/"), (ref, fmt))
                    assert pulls[dest.rstrip("/")] == (ref, fmt), f"two pulls into {dest}: {cmd}"
        elif b.lang == "python":
            for ref, dest in re.findall(r"\.pull\(([^,]+),\s*\"([^\"]+)\"", b.body):
                pulls.setdefault(dest.rstrip("/"), (ref, "native"))
                assert pulls[dest.rstrip("/")] == (ref, "native"), f"two pulls into {dest}"
    assert len(pulls) >= 4, pulls


def test_readme_shows_how_to_create_a_policy() -> None:
    """`registry policy create` with its options, in a block the README run executes."""
    runnable = [c for b in readme_blocks(README.read_text()) if b.lang in SHELLS and not b.marker
                for c in shell_lines(b)]
    creates = [c for c in runnable if c.startswith("registry policy create ")]
    assert {t for c in creates for t in ("transfer_on_base_update", "refresh_basis") if f"--type {t}" in c} == {
        "transfer_on_base_update", "refresh_basis"}
    assert all("--base-model" in c for c in creates)


class ReadmeRun:
    def __init__(self, tmp: Path) -> None:
        self.cwd = tmp / "work"
        self.cwd.mkdir()
        self.home = tmp / "home"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        shim = tmp / "bin"
        shim.mkdir()
        # `registry` runs this checkout (the installed console script may point at another one)
        (shim / "registry").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m registry \"$@\"\n")
        (shim / "registry").chmod(0o755)
        (shim / "python3").symlink_to(sys.executable)
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        env.update({
            "PATH": f"{shim}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
            "REGISTRY_HOME": str(self.home), "REGISTRY_PORT": str(self.port), "REGISTRY_URL": self.url,
            "REGISTRY_CLIENT_RETRY_SECONDS": "0",
            # the MLflow UI is a web app for people; its own start-up is tested in test_supervisor.py
            "REGISTRY_MLFLOW_UI": "false", "REGISTRY_MLFLOW_UI_PORT": str(free_port()),
            "REGISTRY_TORCH_THREADS": "1", "REGISTRY_DISPATCH_INTERVAL": "0.3",
            "COLUMNS": "200", "TERM": "dumb",
        })
        self.env = env
        self.servers: list[subprocess.Popen[bytes]] = []
        self.transcript: list[str] = []

    def log(self) -> str:
        text = "\n".join(self.transcript)[-20000:]
        for f in sorted((self.home / "logs").glob("*.log")) if (self.home / "logs").exists() else []:
            text += f"\n===== {f.name}\n" + f.read_text(errors="replace")[-4000:]
        return text

    def background(self, block: Block) -> None:
        (cmd,) = shell_lines(block)
        out = open(self.cwd / f"server-{block.line}.log", "wb")  # noqa: SIM115 - kept open for the process
        p = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=self.cwd, env=self.env, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append(p)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert p.poll() is None, f"line {block.line}: {cmd} exited:\n" + (self.cwd / out.name).read_text()
            try:
                if httpx.get(self.url + "/api/v1/health", timeout=2).status_code == 200:
                    self.transcript.append(f"[line {block.line}] started: {cmd}")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"line {block.line}: {cmd} did not answer within 120 s")

    def shell(self, block: Block) -> None:
        for cmd in shell_lines(block):
            p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=self.cwd, env=self.env,
                               capture_output=True, text=True, timeout=300)
            self.transcript.append(f"[line {block.line}] $ {cmd}\n{p.stdout}{p.stderr}")
            assert p.returncode == 0, f"README line {block.line}: `{cmd}` failed ({p.returncode}):\n{self.log()}"
            ref = promised_ref(cmd)
            if ref is not None:
                last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
                assert last == ref, f"README line {block.line}: `{cmd}` printed {last!r}, not {ref!r}"

    def python(self, block: Block) -> None:
        p = subprocess.run([sys.executable, "-c", block.body], cwd=self.cwd, env=self.env, capture_output=True,
                           text=True, timeout=300)
        self.transcript.append(f"[line {block.line}] python\n{p.stdout}{p.stderr}")
        assert p.returncode == 0, f"README python block at line {block.line} failed:\n{self.log()}"

    def stop(self) -> None:
        for p in self.servers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.servers:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_readme_runs_top_to_bottom(tmp_path: Path) -> None:
    """Every runnable block of the README, in order, on a fresh registry started as the README starts it."""
    run = ReadmeRun(tmp_path)
    ran = []
    try:
        for block in readme_blocks(README.read_text()):
            if block.lang not in (*SHELLS, "python") or block.marker.startswith("skip"):
                continue
            if block.marker == "background":
                run.background(block)
            elif block.lang == "python":
                run.python(block)
            else:
                run.shell(block)
            ran.append(block.line)
    finally:
        run.stop()
        (tmp_path / "transcript.txt").write_text("\n".join(run.transcript))  # what a user would have seen
    assert len(ran) >= 8, ran
