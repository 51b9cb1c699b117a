"""Every `deqguard ...` command the package suggests to its user runs as printed.

A suggestion is `deqguard COMMAND ...` written in backticks or in parentheses inside a string
literal of the package: an error message, a hint, a help text. Docstrings count only where a
parser prints one (`description=__doc__`), and then every line that starts with `deqguard `.
The list is collected from the source at collection time, so a new message is covered without
editing this file.

What a suggestion's placeholders become:
    CKPT   a fresh copy of the fixture checkpoint, carrying a (hand-made) learned detector, as
           the messages that suggest detector commands assume
    {tag}  a model-store tag

How each command is checked (by its first word; a new command must be given one here):
    run        run to exit 0 on the copy: `info`, `eval` in this process; `models` in a
               subprocess with its own BENTOML_HOME (BentoML fixes its home once per process).
               `eval` gets `EVAL_FIXTURE_ARGS` appended: where the fixture data lies and small
               sizes, which change how long it runs, not what it does.
    parse      argparse must accept it as printed (no usage error), for commands that cannot
               finish here; the reason is in `PARSE_ONLY`.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from deqguard.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("deqguard", "models", "training", "serving", "clients")

RUN_IN_PROCESS = {"info", "eval"}
RUN_IN_STORE = {"models"}
PARSE_ONLY = {
    "serve": "starts a server that runs until it is stopped",
    "detect": "crafts attacked sets of the real Fashion-MNIST for minutes",
    "train": "trains for minutes, on the real data set",
    "window": "trains and evaluates several presets for minutes",
    "export-onnx": "exports through torch.onnx, tens of seconds per graph",
    "score": "scores a folder of images it would name; no such folder here",
}
# suggestions that only name a command (what wrote a file), with why that is not advice to run it
NAMES_ONLY = {
    "deqguard export-onnx": "names the command an ONNX file must come from "
                            "(its options are in `deqguard export-onnx --help`)",
}
# suggestion -> why it fails now (xfail strict: remove the entry once it runs)
BROKEN: dict[str, str] = {}
TAG = "deqguard-tiny-test:latest"


def _subcommand_names() -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices, key=len, reverse=True)  # longest first, for the alternation


def _subcommands() -> str:
    return "|".join(re.escape(name) for name in _subcommand_names())


def _patterns(subs: str) -> list[re.Pattern]:
    return [re.compile(rf"`(deqguard (?:{subs})(?![\w-])[^`]*)`"),
            re.compile(rf"\((deqguard (?:{subs})(?![\w-])[^()]*)\)")]


def _strings(tree: ast.Module) -> Iterator[str]:
    """The module's string literals as printed (f-strings with `{expr}` for their fields),
    docstrings left out."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    docstrings = {node.body[0].value for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                                | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node not in docstrings and not isinstance(parents.get(node), ast.JoinedStr):
                yield node.value
        elif isinstance(node, ast.JoinedStr):
            yield "".join(v.value if isinstance(v, ast.Constant)
                          else "{" + ast.unparse(v.value) + "}" for v in node.values)


def _printed_docstring_commands(tree: ast.Module, source: str) -> Iterator[str]:
    """`deqguard ...` example lines of a module docstring that a parser prints as its help."""
    doc = ast.get_docstring(tree, clean=False)
    if not doc or not re.search(r"(description|epilog)\s*=\s*__doc__", source):
        return
    joined = re.sub(r"\\\n\s*", " ", doc)  # shell line continuations
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("deqguard "):
            yield line


def suggestions(source: str, subs: str) -> set[str]:
    """The suggested commands in one module's source, whitespace collapsed."""
    tree = ast.parse(source)
    found = {m.group(1) for text in _strings(tree) for p in _patterns(subs)
             for m in p.finditer(text)}
    found |= set(_printed_docstring_commands(tree, source))
    return {" ".join(cmd.split()) for cmd in found}


def _collect() -> dict[str, list[str]]:
    subs = _subcommands()
    out: dict[str, list[str]] = {}
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for cmd in suggestions(path.read_text(), subs):
                out.setdefault(cmd, []).append(str(path.relative_to(ROOT)))
    return out


SUGGESTIONS = _collect()


def test_the_collector_reads_messages_as_printed():
    """Backticks, parentheses, f-string fields and implicit concatenation are read; error
    prefixes, prose and unprinted docstrings are not; a printed docstring's examples are."""
    source = textwrap.dedent('''
        """`deqguard info NOTPRINTED` in a docstring that no parser prints."""
        def f(tag):
            """(deqguard info ALSO-NOT)"""
            a = f"stored; serve it with `deqguard serve {tag}`"
            b = ("calibrate it (deqguard eval CKPT "
                 "--calibrate-selective)")
            c = "deqguard eval: error: bad"          # an error prefix, not a suggestion
            d = "with the same deqguard eval line"  # prose
            e = "`deqguard evaluate x`"            # no such command
    ''')
    assert suggestions(source, "info|serve|eval") == {
        "deqguard serve {tag}", "deqguard eval CKPT --calibrate-selective"}
    printed = textwrap.dedent('''
        """Fit it.

            deqguard detect fit default --write          # a comment
            deqguard detect evaluate default --json a.json \\\\
                --plot p.png
        """
        p = sub.add_parser("detect", description=__doc__)
    ''')
    assert suggestions(printed, "detect") == {
        "deqguard detect fit default --write",
        "deqguard detect evaluate default --json a.json --plot p.png"}


def test_every_suggestion_has_a_way_to_be_checked():
    """A command new to the messages must be given one in this file, and no stale entries."""
    known = RUN_IN_PROCESS | RUN_IN_STORE | set(PARSE_ONLY)
    commands = {cmd.split()[1] for cmd in SUGGESTIONS if cmd not in NAMES_ONLY}
    assert commands <= known, f"decide how to check: {sorted(commands - known)}"
    assert set(BROKEN) | set(NAMES_ONLY) <= set(SUGGESTIONS), "entries for messages now gone"
    assert len(SUGGESTIONS) >= 5  # the collector found the package's messages


@pytest.mark.parametrize("printed", sorted(NAMES_ONLY))
def test_named_commands_exist(printed):
    argv = shlex.split(printed)[1:]
    assert argv[0] in _subcommand_names()


@pytest.fixture()
def ckpt(tiny_checkpoint, pattern_idx_dir, tmp_path) -> Path:
    """The fixture with a learned detector and, as a trained checkpoint has, its dataset."""
    from selective_ckpt import record_dataset, with_detector

    return record_dataset(with_detector(tiny_checkpoint, tmp_path / "tiny.safetensors"),
                          pattern_idx_dir)


def _argv(printed: str, ckpt: Path) -> list[str]:
    words = shlex.split(printed)
    assert words[0] == "deqguard"
    argv = [{"CKPT": str(ckpt), "{tag}": TAG}.get(w, w) for w in words[1:]]
    unknown = [w for w in argv if re.fullmatch(r"[A-Z][A-Z_]+|\{.*\}", w)]
    assert not unknown, f"a placeholder this test does not fill: {unknown}"
    return argv


EVAL_FIXTURE_ARGS = ["--n", "16", "--val-n", "60", "--val-size", "100", "--batch-size", "16",
                     "--threads", "1", "--no-progress"]

CHECKED = sorted(cmd for cmd in SUGGESTIONS if cmd not in NAMES_ONLY)


@pytest.mark.parametrize("printed", [
    pytest.param(cmd, id=cmd, marks=[pytest.mark.xfail(strict=True, reason=BROKEN[cmd])]
                 if cmd in BROKEN else []) for cmd in CHECKED])
def test_suggested_command_runs_as_printed(printed, request, tmp_path, capsys, monkeypatch):
    command = printed.split()[1]
    # a parse never opens the checkpoint, so it skips the fixture's training
    ckpt = (tmp_path / "CKPT.safetensors" if command in PARSE_ONLY
            else request.getfixturevalue("ckpt"))
    argv = _argv(printed, ckpt)
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{printed!r} (from {SUGGESTIONS[printed]}) is a usage error "
                    f"(exit {exc.code}): {capsys.readouterr().err.strip()}")
    if command in PARSE_ONLY:
        return
    if command in RUN_IN_STORE:
        env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"),
               "BENTOML_DO_NOT_TRACK": "true", "OMP_NUM_THREADS": "1"}
        env.pop("DEQGUARD_CHECKPOINT", None)
        proc = subprocess.run([sys.executable, "-m", "deqguard.cli", *argv], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        code, err = proc.returncode, proc.stderr
    else:
        monkeypatch.chdir(tmp_path)  # what a command writes by default lands here
        if command == "eval":  # the data comes from the checkpoint, as for a trained one
            argv += EVAL_FIXTURE_ARGS
        code = main(argv)
        err = capsys.readouterr().err
    assert code == 0, f"{printed!r} (from {SUGGESTIONS[printed]}) exited {code}: {err}"
