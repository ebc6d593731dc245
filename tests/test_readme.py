"""The README's two commands stay at its top, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
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
