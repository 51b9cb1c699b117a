"""The `deqguard` command.

Each part of the package contributes its subcommands through a `register(subparsers)` function in
its own `cli` module, so this file never grows and the client's commands never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from deqguard import __version__
from deqguard.errors import DeqguardError

_OPTIONAL_DEPENDENCIES = {"torch", "torchvision", "safetensors", "bentoml", "onnx", "onnxruntime",
                          "yaml", "tqdm", "ray", "pyarrow", "matplotlib"}

# Modules that contribute subcommands; one missing (a partial install) only hides its commands.
_COMMAND_MODULES = (
    "deqguard.models.cli",
    "deqguard.models.store_cli",
    "deqguard.training.cli",
    "deqguard.training.window",
    "deqguard.training.evaluation.cli",
    "deqguard.training.evaluation.detector_cli",
    "deqguard.serving.cli",
    "deqguard.clients.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deqguard", description="Adversarially robust Deep Equilibrium classifiers.")
    parser.add_argument("--version", action="version", version=f"deqguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A partial install: the client-only base install has no torch, so the commands
            # that need it are simply not offered.
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


if __name__ == "__main__":
    sys.exit(main())
