"""`deqguard models push|list`: checkpoints in the BentoML model store, from the command line."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import CheckpointError


def _need_bentoml() -> None:
    from deqguard.store import bentoml_available

    if not bentoml_available():
        raise CheckpointError("the model store is BentoML's: install deqguard[serve]")


def _push(args: argparse.Namespace) -> int:
    _need_bentoml()
    from deqguard.store import store_location

    from .publish import push_checkpoint

    tag = push_checkpoint(args.checkpoint, name=args.name)
    print(tag)
    print(f"stored in {store_location()}; serve it with DEQGUARD_CHECKPOINT={tag} "
          f"(or `deqguard serve {tag}`)", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    _need_bentoml()
    from deqguard.store import stored_checkpoints

    models = stored_checkpoints()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    rows = [("TAG", "CHECKPOINT", "CLASSES", "SHA256", "CREATED")]
    rows += [(m["tag"], m["checkpoint"], str(m["classes"]), m["sha256"][:12], m["created"])
             for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="checkpoints in the BentoML model store (push, list)")
    models = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    push = models.add_parser("push", help="verify a checkpoint and store it; prints its tag")
    push.add_argument("checkpoint", help="path to a .safetensors checkpoint, a shipped name "
                                         "(default), or a stored tag")
    push.add_argument("--name", help="model name in the store (default: deqguard-<the "
                                     "checkpoint's metadata name>); BentoML adds the version")
    push.set_defaults(func=_push)
    ls = models.add_parser("list", help="the deqguard checkpoints in the model store")
    ls.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    ls.set_defaults(func=_list)
