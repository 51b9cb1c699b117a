"""The `deqguard` command.

Each part of the package contributes its subcommands through a `register(subparsers)` function in
its own `cli` module, so this file never grows. Those modules import nothing heavy at the top (the
handlers import torch, BentoML and the rest when they run), so building the parser, which is all
`deqguard --help` and `deqguard COMMAND --help` do, stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from deqguard import __version__
from deqguard.errors import DeqguardError

# import name of an optional dependency -> the extra that installs it
_OPTIONAL_DEPENDENCIES = {
    "torch": "train", "torchvision": "train", "safetensors": "train", "yaml": "train",
    "tqdm": "train", "pyautoattack": "train", "matplotlib": "train",
    "bentoml": "serve", "onnx": "serve", "onnxscript": "serve", "onnxruntime": "serve",
    "prometheus_client": "serve", "psutil": "serve",
    "ray": "ray", "pyarrow": "parquet",
}

# Modules that contribute subcommands -> the optional packages every one of their commands needs.
# A command whose needs are not installed (the client-only base install has no torch) is not
# offered; the check finds the packages without importing them.
_COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "deqguard.models.cli": ("torch",),
    "deqguard.models.store_cli": ("torch",),
    "deqguard.training.cli": ("torch",),
    "deqguard.training.device_window": ("torch",),
    "deqguard.evaluation.cli": ("torch",),
    "deqguard.evaluation.detector_cli": ("torch",),
    "deqguard.evaluation.compare_cli": (),
    "deqguard.evaluation.merge_cli": ("torch",),
    "deqguard.serving.cli": ("torch",),
    "deqguard.clients.cli": (),
}


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-removed install counts as missing
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deqguard", description="Adversarially robust Deep Equilibrium classifiers.")
    parser.add_argument("--version", action="version", version=f"deqguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, needs in _COMMAND_MODULES.items():
        if not all(_installed(n) for n in needs):
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A partial install that the table above does not foresee: hide, do not crash.
            if exc.name == name or (exc.name or "").split(".")[0] in _OPTIONAL_DEPENDENCIES:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what ran, for provenance records
    try:
        return int(args.func(args) or 0)
    except DeqguardError as exc:
        print(f"deqguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        # an optional dependency this command needs only for what was asked of it
        top = (exc.name or "").split(".")[0]
        if top not in _OPTIONAL_DEPENDENCIES:
            raise
        print(f"deqguard {args.command}: error: this needs {top}, which is not installed: "
              f"pip install 'deqguard[{_OPTIONAL_DEPENDENCIES[top]}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
