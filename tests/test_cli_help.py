"""The command's help: every option explained, no ticket numbers, preset descriptions, and
`--help` without loading torch.

Each check runs per top-level command. The `xfail(strict=True)` entries below name the commands
whose modules are still being fixed; a fixed command then XPASSes, which fails the run, so the
entry must go once the fix is in (never add one to hide a regression).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from deqguard.cli import _COMMAND_MODULES, build_parser, main

HEAVY = ("torch", "torchvision", "bentoml", "onnx", "onnxruntime", "ray", "matplotlib")

# command -> why some of its options still have no help
HELP_MISSING: dict[str, str] = {}
# command -> why its help still cites a ticket number
TICKET_NUMBERS: dict[str, str] = {}
# command module -> why importing it still loads torch or another heavy package
NOT_LAZY: dict[str, str] = {}

_TICKET = re.compile(r"\b(issue|ticket|bug)s?\s*#?\s*\d+|#\d+\b|\bticket", re.IGNORECASE)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = _subparsers(build_parser())
    assert sub is not None
    return dict(sub.choices)


COMMANDS = sorted(_commands())


def _params(names: list[str], xfails: dict[str, str]) -> list:
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=xfails[n]))
            if n in xfails else n for n in names]


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]
          ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """The parser and its nested ones (`models push`, `detect fit`), each with its path."""
    yield path, parser
    sub = _subparsers(parser)
    if sub is not None:
        for name, child in sub.choices.items():
            yield from _walk(child, (*path, name))


def _one_line_helps(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """What a parser's listing of its subcommands says about each (`deqguard --help`)."""
    sub = _subparsers(parser)
    return {} if sub is None else {a.dest: a.help for a in sub._choices_actions}


def test_the_expected_failures_name_real_commands():
    """An entry for a command or module that is gone would hide nothing and mean nothing."""
    assert set(HELP_MISSING) | set(TICKET_NUMBERS) <= set(COMMANDS)
    assert set(NOT_LAZY) <= set(_COMMAND_MODULES)


@pytest.mark.parametrize("command", _params(COMMANDS, HELP_MISSING))
def test_every_option_has_help(command):
    """Every argument, positional or option, of the command and of its nested actions says what
    it is for, and so does every nested action in its parent's listing."""
    missing = []
    for path, parser in _walk(_commands()[command], (command,)):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{' '.join(path)} {name}" for name, text in
                            _one_line_helps(parser).items() if not (text or "").strip()]
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                names = "/".join(action.option_strings) or action.dest
                missing.append(f"{' '.join(path)} {names}")
    assert not missing, "no help: " + ", ".join(missing)


@pytest.mark.parametrize("command", _params(COMMANDS, TICKET_NUMBERS))
def test_help_cites_no_ticket_numbers(command):
    """Help says what a command does, not which ticket asked for it."""
    texts = [f"deqguard --help: {_one_line_helps(build_parser())[command]}"]
    texts += [f"deqguard {' '.join(path)} --help: {line}"
              for path, parser in _walk(_commands()[command], (command,))
              for line in parser.format_help().splitlines()]
    hits = [t for t in texts if _TICKET.search(t)]
    assert not hits, "\n".join(hits)


def test_ticket_pattern_sees_the_usual_spellings():
    for text in ("(issue 11)", "see Issue #22", "ticket 3", "fixes #7", "bug 12"):
        assert _TICKET.search(text), text
    for text in ("images that issue no answer", "7x7x32 state", "--n 1000"):
        assert not _TICKET.search(text), text


def test_list_presets_prints_each_description(capsys):
    from deqguard.training.config import load_preset, preset_names

    assert main(["train", "--list-presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = preset_names()
    assert len(lines) == len(names) >= 1
    for name, line in zip(names, lines, strict=True):
        description = load_preset(name).get("description", "")
        assert description.strip(), f"preset {name} has no description"
        assert line.split()[0] == name and line.endswith(description), line


# -- no torch for --help ------------------------------------------------------------------------

def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=180,
                          env={**os.environ, "BENTOML_DO_NOT_TRACK": "true",
                               "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("module", _params(sorted(_COMMAND_MODULES), NOT_LAZY))
def test_command_module_registers_without_heavy_imports(module):
    """Importing a command module and registering its parsers loads no torch (nor BentoML,
    ONNX, Ray, matplotlib): the handlers import what they need when they run."""
    proc = _python(f"""
        import argparse, importlib, json, sys
        module = importlib.import_module({module!r})
        module.register(argparse.ArgumentParser().add_subparsers())
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
    """)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_every_help_runs_without_heavy_imports():
    """`deqguard --help` and `deqguard COMMAND [ACTION] --help` for every command, in one fresh
    process: each prints its help, exits 0, and none of them loaded torch."""
    paths = [[]] + [list(path) for name, parser in _commands().items()
                    for path, _ in _walk(parser, (name,))]
    proc = _python(f"""
        import contextlib, io, json, sys
        from deqguard.cli import main
        out = {{}}
        for path in {paths!r}:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                try:
                    main([*path, "--help"])
                    code = None
                except SystemExit as exc:
                    code = exc.code
            out[" ".join(path)] = [code, buf.getvalue().startswith("usage: deqguard")]
        print(json.dumps({{"runs": out,
                          "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
    """)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {p: r for p, r in result["runs"].items() if r != [0, True]} == {}
    assert len(result["runs"]) == len(paths) > len(COMMANDS)
    assert result["heavy"] == []


def test_the_models_package_loads_its_names_on_first_use():
    """`deqguard.models` itself loads no torch (every `deqguard.models.*` module imports it
    first), and each name it offers still loads when asked for."""
    proc = _python("""
        import json, sys
        import deqguard.models as models
        before = "torch" in sys.modules
        loaded = [name for name in models.__all__ if getattr(models, name) is not None]
        print(json.dumps({"before": before, "after": "torch" in sys.modules,
                          "loaded": len(loaded), "all": len(models.__all__),
                          "unlisted": sorted(set(models.__all__) - set(dir(models)))}))
    """)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == {"before": False, "after": True, "loaded": out["all"], "all": out["all"],
                   "unlisted": []}
    assert out["all"] >= 20


# -- partial installs ---------------------------------------------------------------------------

def test_a_client_only_install_offers_only_the_client_commands(tmp_path):
    """Without torch (the base install) the commands that need it are not offered, so the
    client's `score` works and `--help` lists nothing that could only fail; `compare`, which
    reads two eval reports with numpy alone, is offered and runs."""
    report = {"settings": {"data": "fashion-mnist", "split": "test", "eps": 0.1},
              "clean": {"correct": "1101"}}
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(report))
    proc = _python(f"""
        import argparse, contextlib, io, json, sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from deqguard.cli import build_parser, main
        sub = next(a for a in build_parser()._actions
                   if isinstance(a, argparse._SubParsersAction))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                main(["score", "--help"])
            except SystemExit as exc:
                code = exc.code
        usage = buf.getvalue().startswith("usage: deqguard score")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            compared = main(["compare", {str(tmp_path / "a.json")!r},
                             {str(tmp_path / "b.json")!r}])
        row = "| a / b | clean | 4 | 75.0% | 75.0% | +0.0 |" in buf.getvalue()
        print(json.dumps({{"commands": sorted(sub.choices), "code": code, "usage": usage,
                          "compared": compared, "row": row}}))
    """)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"commands": ["compare", "score"], "code": 0, "usage": True,
                                       "compared": 0, "row": True}


def test_a_missing_optional_dependency_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    """A command that reaches for a package its install lacks names the package and the extra
    that brings it, exit 2, instead of a traceback."""
    import deqguard.models.cli as info_cli

    def needs_bentoml(args):
        raise ModuleNotFoundError("No module named 'bentoml'", name="bentoml")

    monkeypatch.setattr(info_cli, "_info", needs_bentoml)
    assert main(["info", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err == ("deqguard info: error: this needs bentoml, which is not installed: "
                   "pip install 'deqguard[serve]'\n")


def test_a_missing_module_of_our_own_is_not_hidden(monkeypatch, tmp_path):
    """Only optional dependencies get the install hint: a broken install of deqguard itself
    (a module missing from the wheel) still raises, so it gets reported and fixed."""
    import deqguard.models.cli as info_cli

    def broken(args):
        raise ModuleNotFoundError("No module named 'deqguard.gone'", name="deqguard.gone")

    monkeypatch.setattr(info_cli, "_info", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["info", str(tmp_path / "x.safetensors")])
