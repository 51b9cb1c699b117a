"""`--threads`: one definition of the torch intra-op thread option for every command that runs a
model, so the flag reads and behaves the same in `train`, `eval`, `export-onnx` and the rest.

Why commands pin threads at all: torch's default is one thread per core, and on a shared or
small machine a process that takes every core runs many times slower than one that takes a few.
Torch is imported only when the setting is applied, so defining the option keeps `--help` light.
"""

from __future__ import annotations

import argparse


def thread_count(text: str) -> int:
    """argparse type: 0 (torch's own default) or a positive number of threads."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} threads: give 0 (torch default) or more")
    return value


def add_threads_argument(parser: argparse.ArgumentParser, *, default: int = 0) -> None:
    """Add `--threads N` (torch intra-op threads; 0 leaves torch's default)."""
    parser.add_argument(
        "--threads", type=thread_count, default=default, metavar="N",
        help="torch intra-op CPU threads; 0: torch's default (one per core, or "
             f"$OMP_NUM_THREADS) (default: {default})")


def apply_threads(threads: int) -> None:
    """Set torch's intra-op threads when `threads` > 0; 0 leaves torch's default alone."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
