"""The README and docs/ say only what the code does: every quoted `fmrilm ...` command parses
(subcommands and options exist, as `--help` checks them) and every job or card file named exists."""

from __future__ import annotations

import glob
import os
import re
import shlex

import pytest
from typer.testing import CliRunner

from fmrilm.cli import app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "cluster/README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def _text(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def quoted_commands(text: str) -> list[str]:
    """`fmrilm ...` command lines in fenced blocks (continuations joined, comments dropped) and in inline code."""
    out, fence = [], False
    lines = text.replace("\\\n", " ").splitlines()
    for line in lines:
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence:
            cmd = re.sub(r"\s+#.*$", "", line.strip())
            if cmd.startswith("fmrilm "):
                out.append(cmd)
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        if span.startswith("fmrilm ") and "..." not in span:
            out.append(span)
    return out


COMMANDS = sorted({(page, cmd) for page in PAGES for cmd in quoted_commands(_text(page))})


def test_the_pages_quote_commands():
    assert os.path.exists(os.path.join(ROOT, "docs")) and len(COMMANDS) > 40
    assert len(_text("README.md").splitlines()) < 120, "the README holds what a newcomer needs first; the rest goes to docs/"


@pytest.mark.parametrize("page,command", COMMANDS)
def test_every_quoted_command_parses(page, command):
    args = shlex.split(command)[1:]
    r = CliRunner().invoke(app, [*args, "--help"])
    assert r.exit_code == 0, f"{page}: `{command}` does not parse: {' '.join(r.output.split())}"


def test_every_named_job_and_card_file_exists():
    missing = []
    for page in PAGES:
        for path in re.findall(r"(?<![\w/.])((?:jobs|datasets|cluster|infra)/[\w./-]*\w\.(?:yaml|py|tf|md))", _text(page)):
            for candidate in (os.path.join(ROOT, path), os.path.join(ROOT, os.path.dirname(page), path)):
                if os.path.exists(candidate):
                    break
            else:
                missing.append(f"{page}: {path}")
    assert not missing, missing
