"""`deqguard train`: adversarial training runs from presets.

    deqguard train --preset fashion-tiny-regulated
    deqguard train --preset fashion-tiny-pgdat --epochs 1 --limit 2048 --out runs/smoke
    deqguard train --preset fashion-tiny-regulated --name my-model --threads 4
    deqguard train --preset cifar-large-trades-regulated --data-dir data/cifar10 --download
    deqguard train --preset fashion-tiny-regulated --set objective.eps=0.15 --set jacobian.weight=1
    deqguard train --preset fashion-tiny-regulated --resume          # continue after a crash
    deqguard train --preset fashion-wk-regulated --init default   # train the default further
    torchrun --nproc_per_node=2 -m deqguard.cli train --preset ...   # data parallel

Every field of the training config can be set with `--set section.field=value` (value parsed as
YAML); the explicit flags below are shortcuts for the common ones. `--show-config` prints the
config a run would use.

`--limit N` is for quick runs, so it shortens the whole run: validation (every epoch, PGD attacks
included) and the final test check use at most N images as well, unless `--set eval.val_limit=`
or `--set eval.test_limit=` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from deqguard.errors import DeqguardError
from deqguard.threads import add_threads_argument, apply_threads

if TYPE_CHECKING:  # the config imports torch (via the models); the handler imports it
    from .config import TrainConfig

_FLAG_FIELDS = {
    "epochs": "train.epochs", "limit": "data.limit", "device": "train.device",
    "data_dir": "data.data_dir", "seed": "train.seed", "batch_size": "train.batch_size",
    "workers": "train.num_workers", "init": "train.init_from",
}


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    out = [f"{field}={json.dumps(getattr(args, flag))}" for flag, field in _FLAG_FIELDS.items()
           if getattr(args, flag) is not None]
    if args.download:
        out.append("data.download=true")
    if args.no_progress:
        out.append("train.progress=false")
    return out


def _limit_overrides(cfg: TrainConfig, limit: int | None, sets: list[str]) -> list[str]:
    """eval.val_limit / eval.test_limit capped at `--limit`, where no --set names them.

    Why: a 300-image smoke run that still attacks 1,000 validation images spends most of its
    time validating; a quick run should be quick throughout.
    """
    from .config import parse_override

    if limit is None:
        return []
    given = {".".join(parse_override(text)[0]) for text in sets}
    out = []
    e = cfg.eval
    val = e.val_limit if e.val_limit is not None else cfg.data.val_size
    if val > limit and not given & {"eval", "eval.val_limit"}:
        out.append(f"eval.val_limit={limit}")
    if e.test_limit > limit and not given & {"eval", "eval.test_limit"}:
        out.append(f"eval.test_limit={limit}")
    return out


def _run_name(text: str | None) -> str | None:
    if text is None:
        return None
    name = text.strip()
    if not name or not name.isprintable():
        raise DeqguardError(f"--name {text!r}: give a non-empty name on one line")
    return name


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
    name = _run_name(args.name)
    flags, sets = _flag_overrides(args), list(args.set or [])
    cfg = build_config(args.preset, flags + sets)
    scaled = _limit_overrides(cfg, args.limit, sets)
    if scaled:
        cfg = build_config(args.preset, flags + scaled + sets)
    if args.show_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    apply_threads(args.threads)
    from .loop import train

    out = args.out or f"runs/{cfg.name}"
    result = train(cfg, out_dir=out, resume=args.resume, argv=sys.argv, preset=args.preset,
                   name=name)
    print(json.dumps({"out": str(result.out_dir), "last": str(result.last),
                      "best": str(result.best), **result.metrics}))
    if result.is_main and result.best.exists():
        from deqguard.models import read_metadata

        from .run_files import EMA_BEST
        from .summary import run_summary

        ema = result.out_dir / EMA_BEST
        average = (read_metadata(ema), ema) if ema.exists() and cfg.train.ema_decay > 0 else None
        print(run_summary(read_metadata(result.best), result.best, average, result.epochs),
              file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="adversarially train a model from a preset",
        description="Train from a preset (training/presets/*.yaml). Any config field can be "
                    "overridden with --set section.field=value. Output folder: last.safetensors, "
                    "best.safetensors (best validation PGD accuracy), train_log.jsonl, resume.pt. "
                    "At the end a summary on stderr says what the numbers mean; the last line on "
                    "stdout is the result as JSON.")
    p.add_argument("--preset", help="shipped preset name or a path to a YAML preset")
    p.add_argument("--list-presets", action="store_true",
                   help="print the shipped presets, each with its description")
    p.add_argument("--show-config", action="store_true",
                   help="print the config (preset + overrides), exit")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--limit", type=int, metavar="N",
                   help="data.limit: use the first N training images; validation and the final "
                        "test check then use at most N images each too (eval.val_limit, "
                        "eval.test_limit; a --set of either wins)")
    p.add_argument("--out", help="output folder (default runs/<preset name>)")
    p.add_argument("--name",
                   help="the checkpoints' name, which `deqguard serve` (/model, /ui), `eval` "
                        "reports and `models push` show (default: the output folder's name; "
                        "the preset is recorded apart, as training.preset)")
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
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (training, validation, test)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set objective.eps=0.1 (repeatable)")
    p.set_defaults(func=_train)
