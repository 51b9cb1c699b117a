"""Every `deqguard` command README prints parses as written.

A newcomer copies README's commands; an option renamed or dropped since the text was written
fails for them with a usage error. This test takes each `deqguard ...` line from README's code
blocks and inline code, joins continued lines, and hands it to the CLI's own parser.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from deqguard.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
_ENV = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*")


def _strip_comment(line: str) -> str:
    """The command without a trailing `# comment` (a `#` inside quotes is kept)."""
    out, quote = [], None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            break
        out.append(ch)
    return "".join(out).strip()


def _code_lines(text: str) -> list[str]:
    """Lines of fenced code blocks, continuations joined, plus inline code spans with arguments.

    An inline span of two words (`deqguard detect`) names a command in prose; one with arguments
    is a command a reader may copy.
    """
    lines: list[str] = []
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
    for block in blocks:
        pending = ""
        for raw in block.splitlines():
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            lines.append(line)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    lines += [span for span in re.findall(r"`([^`\n]+)`", prose) if len(span.split()) >= 3]
    return lines


def readme_commands() -> list[str]:
    commands = []
    for line in _code_lines(README.read_text()):
        line = _ENV.sub("", _strip_comment(line))
        line = re.sub(r"^\.venv/bin/", "", line)
        if line.startswith("deqguard ") and "..." not in line:
            commands.append(line)
    return commands


def test_readme_has_commands_to_check():
    # README documents serving, scoring, training and evaluation by their commands
    subcommands = {shlex.split(c)[1] for c in readme_commands()}
    assert {"serve", "score", "train", "eval"} <= subcommands, subcommands


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    parser = build_parser()
    try:
        parser.parse_args(shlex.split(command)[1:])
    except SystemExit as exc:
        if exc.code != 0:  # `--help` exits 0
            pytest.fail(f"README command does not parse: {command}")
