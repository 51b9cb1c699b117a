"""`deqguard info`: a checkpoint's metadata as JSON."""

from __future__ import annotations

import argparse
import json

from deqguard.shipped import SHIPPED_NAMES


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import read_metadata, resolve_checkpoint

    meta = read_metadata(args.checkpoint)
    out = meta.model_dump(mode="json")
    out["path"] = str(resolve_checkpoint(args.checkpoint))
    print(json.dumps(out, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a checkpoint's metadata as JSON")
    p.add_argument("checkpoint",
                   help=f"path to a .safetensors checkpoint, or a shipped name ({SHIPPED_NAMES})")
    p.set_defaults(func=_info)
