"""`deqguard train`: adversarial training runs from presets.

    deqguard train --preset fashion-tiny-regulated
    deqguard train --preset fashion-tiny-pgdat --epochs 1 --limit 2048 --out runs/smoke
    deqguard train --preset cifar-large-trades-regulated --data-dir data/cifar10 --download
    deqguard train --preset fashion-tiny-regulated --set objective.eps=0.15 --set jacobian.weight=1
    deqguard train --preset fashion-tiny-regulated --resume          # continue after a crash
    deqguard train --preset fashion-wk-regulated --init default   # train the default further
    torchrun --nproc_per_node=2 -m deqguard.cli train --preset ...   # data parallel

Every field of the training config can be set with `--set section.field=value` (value parsed as
YAML); the explicit flags below are shortcuts for the common ones. `--show-config` prints the
config a run would use.
"""

from __future__ import annotations

import argparse
import json
import sys

_FLAG_FIELDS = {
    "epochs": "train.epochs", "limit": "data.limit", "device": "train.device",
    "data_dir": "data.data_dir", "seed": "train.seed", "batch_size": "train.batch_size",
    "workers": "train.num_workers", "init": "train.init_from",
}


def _overrides(args: argparse.Namespace) -> list[str]:
    out = [f"{field}={json.dumps(getattr(args, flag))}" for flag, field in _FLAG_FIELDS.items()
           if getattr(args, flag) is not None]
    if args.download:
        out.append("data.download=true")
    if args.no_progress:
        out.append("train.progress=false")
    return out + list(args.set or [])


def _train(args: argparse.Namespace) -> int:
    from .config import build_config, load_preset, preset_names

    if args.list_presets:
        names = preset_names()
        width = max(map(len, names), default=0)
        for name in names:
            print(f"{name:<{width}}  {load_preset(name).get('description', '')}".rstrip())
        return 0
    if not args.preset:
        print("deqguard train: error: --preset is required (see --list-presets)", file=sys.stderr)
        return 2
    cfg = build_config(args.preset, _overrides(args))
    if args.show_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    from .loop import train

    out = args.out or f"runs/{cfg.name}"
    result = train(cfg, out_dir=out, resume=args.resume, argv=sys.argv, preset=args.preset)
    print(json.dumps({"out": str(result.out_dir), "last": str(result.last),
                      "best": str(result.best), **result.metrics}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="adversarially train a model from a preset",
        description="Train from a preset (training/presets/*.yaml). Any config field can be "
                    "overridden with --set section.field=value. Output folder: last.safetensors, "
                    "best.safetensors (best validation PGD accuracy), train_log.jsonl, resume.pt.")
    p.add_argument("--preset", help="shipped preset name or a path to a YAML preset")
    p.add_argument("--list-presets", action="store_true",
                   help="print the shipped presets, each with its description")
    p.add_argument("--show-config", action="store_true",
                   help="print the config (preset + overrides), exit")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--limit", type=int, help="data.limit: use the first N training images")
    p.add_argument("--out", help="output folder (default runs/<preset name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last saved step")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="train.init_from: start from this checkpoint's weights (same model)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="train.device")
    p.add_argument("--data-dir", help="data.data_dir (dataset files or image folder)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 (needs internet)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--batch-size", type=int, help="train.batch_size (per process)")
    p.add_argument("--workers", type=int, help="train.num_workers (data loader processes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set objective.eps=0.1 (repeatable)")
    p.set_defaults(func=_train)
