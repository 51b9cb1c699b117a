"""What `deqguard eval` does once parsed: load the checkpoint and its data, run the evaluation,
write what was asked (calibrations into the checkpoint, the JSON, the report) and print a summary.

torch and the rest are imported inside the steps, so the parser (`cli.py`) stays light.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .choices import DATASETS
from .eval_settings import eval_settings, requested_parts, selective_settings
from .eval_summary import for_people, summary


def run(args: argparse.Namespace) -> int:
    if args.schema:
        from .schema import EvalReport

        print(json.dumps(EvalReport.model_json_schema(), indent=2))
        return 0
    parts = requested_parts(args)
    import torch

    from deqguard.models.checkpoint import load_checkpoint, resolve_checkpoint
    from deqguard.models.defense import default_eps

    from .runner import evaluate

    device = _device(args)
    path = resolve_checkpoint(args.checkpoint)
    model, meta = load_checkpoint(path, device=device)
    data, data_dir = _resolve_data(args, meta, path)
    x, y, size = _test_images(args, model, meta, data, data_dir)
    selective = selective_settings(args, parts)
    x_val = y_val = None
    if ("detect" in parts or selective is not None or "adaptive-selective" in parts
            or "rectifier-aware" in parts):
        x_val, y_val = _validation_images(args, meta, data, data_dir, size, selective)
    eps = args.eps if args.eps is not None else default_eps(meta.input.channels,
                                                             meta.input.height)
    settings = eval_settings(args, path=path, data=data, data_dir=data_dir, n=len(x), eps=eps,
                             parts=parts, selective=selective, device=device)
    aa_earlier = _aa_earlier(args, settings, meta, parts, len(x))
    torch.manual_seed(args.seed)
    detector = _learned_detector(meta, model, parts, selective)
    report = evaluate(model, x, y, settings, checkpoint=_checkpoint_info(path, meta, model),
                      x_val=x_val, y_val=y_val, progress=not args.no_progress,
                      learned_detector=detector, aa_earlier=aa_earlier)
    _write_calibrations(args, path, report)
    _write_outputs(args, report)
    print(json.dumps(for_people(summary(report)), indent=2))
    return 0


def _device(args: argparse.Namespace) -> str:
    from deqguard.models.device import resolve_device
    from deqguard.threads import apply_threads

    device = resolve_device(args.device)
    apply_threads(args.threads)
    return device


def recorded_data(meta) -> dict:
    """The data section of the checkpoint's training config ({} when it records none).

    A checkpoint trained by `deqguard train` names its dataset there (and in training.data), so
    evaluating it on the data it was made for needs no --data.
    """
    data = meta.trained_config("data")
    if not data.get("dataset"):
        named = ((meta.training or {}).get("data") or {}).get("dataset")
        if named:
            data["dataset"] = named
    return data


def _resolve_data(args: argparse.Namespace, meta, path) -> tuple[str, str | None]:
    """(dataset, data_dir): --data and --data-dir, else what the checkpoint records."""
    from deqguard.models.errors import DeqguardError

    if args.data is not None:
        return args.data, args.data_dir
    recorded = recorded_data(meta)
    data = recorded.get("dataset")
    if not data:
        raise DeqguardError(f"{path} records no dataset in its metadata (training.config.data): "
                            f"pass --data {'|'.join(DATASETS)}")
    if data not in DATASETS:
        raise DeqguardError(f"{path} was trained on {data!r}, which deqguard eval cannot load: "
                            f"pass --data {'|'.join(DATASETS)}")
    data_dir = args.data_dir
    if data_dir is None and recorded.get("data_dir") and Path(recorded["data_dir"]).is_dir():
        # where training read it; on another machine the dataset's default location instead
        data_dir = str(recorded["data_dir"])
    return data, data_dir


def _stack(ds) -> tuple:
    import torch

    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(list(xs)), torch.tensor(ys, dtype=torch.long)


def _test_images(args: argparse.Namespace, model, meta, data: str, data_dir: str | None):
    """(x, y, image_size): --n images of --split after the first --start, checked against the
    checkpoint's input shape and classes; image_size is what imagefolder images are resized to
    (else None)."""
    from deqguard.models.errors import DeqguardError
    from deqguard.training.data import dataset_info, load_dataset

    info = dataset_info(data, data_dir)
    c, s = meta.input.channels, meta.input.height
    if (info.in_channels, info.image_size) != (c, s) and data != "imagefolder":
        raise DeqguardError(f"{data} images are {info.in_channels}x{info.image_size}px, the "
                            f"checkpoint expects {c}x{s}px")
    size = s if data == "imagefolder" else None
    x, y = _stack(load_dataset(data, args.split, data_dir=data_dir, start=args.start,
                               limit=args.n, image_size=size))
    if len(y) and int(y.max()) >= model.config.num_classes:
        raise DeqguardError(f"{data} has label {int(y.max())}, the checkpoint only "
                            f"{model.config.num_classes} classes")
    return x, y, size


def _validation_images(args: argparse.Namespace, meta, data: str, data_dir: str | None,
                       size: int | None, selective: Any):
    """The checkpoint's own validation split (never trained on), unless overridden; a selective
    calibration records where its images came from."""
    from deqguard.training.data import load_dataset

    trained = recorded_data(meta)
    val_size = args.val_size or int(trained.get("val_size", 5000))
    split_seed = args.split_seed if args.split_seed is not None else int(
        trained.get("split_seed", 0))
    x_val, y_val = _stack(load_dataset(data, "val", data_dir=data_dir, limit=args.val_n,
                                       image_size=size, val_size=val_size, seed=split_seed))
    if selective is not None:
        selective.provenance = {
            "data": data, "data_dir": data_dir, "split": "val",
            "val_size": val_size, "split_seed": split_seed, "command": _command(args)}
    return x_val, y_val


def _command(args: argparse.Namespace) -> str:
    return " ".join(["deqguard", *getattr(args, "argv", sys.argv[1:])])


def _checkpoint_info(path: Path, meta, model):
    from .schema import CheckpointInfo

    return CheckpointInfo(path=str(path), name=meta.name, sha256=meta.sha256,
                          arch=str(meta.model.get("arch", "")), is_deq=model.is_deq,
                          solver=meta.model.get("solver"))


def _aa_earlier(args: argparse.Namespace, settings, meta, parts: list[str], n: int) -> Any:
    """--aa-from: the earlier report's AutoAttack stages, checked before anything is attacked."""
    if not args.aa_from:
        return None
    from deqguard.models.errors import DeqguardError

    from .aa_from import earlier_stages

    if "aa" not in parts:
        raise DeqguardError("--aa-from continues AutoAttack: add aa to --attacks")
    if "detect" in parts:
        raise DeqguardError("--aa-from cannot run with the detect part: detection scores the "
                            "adversarial images of every AutoAttack stage, and the earlier "
                            "report kept none")
    return earlier_stages(args.aa_from, settings, meta.sha256, min(args.aa_n or n, n))


def _learned_detector(meta, model, parts: list[str], selective: Any) -> Any:
    """The checkpoint's learned detector when a part scores with it (else None)."""
    from deqguard.models.errors import DeqguardError
    from deqguard.models.learned_detector import detector_from_metadata

    if "detect" not in parts and selective is None:
        return None
    detector = detector_from_metadata(meta)
    if (selective is not None and selective.calibrate and selective.score == "detector"
            and (detector is None or not model.is_deq)):
        raise DeqguardError("--selective-score detector needs a learned detector in the "
                            "checkpoint (deqguard detect fit CKPT --write)")
    if (selective is not None and selective.calibrate and selective.score == "rectified"
            and getattr(model, "rectifier", None) is None):
        raise DeqguardError("--selective-score rectified needs a checkpoint with a rectifier "
                            "head (deqguard train with model.overrides.rectifier)")
    return detector


def _write_calibrations(args: argparse.Namespace, path: Path, report) -> None:
    """--calibrate and --calibrate-selective: into the checkpoint's metadata, where the server
    reads them."""
    from deqguard.models.checkpoint import update_metadata
    from deqguard.models.errors import DeqguardError

    if args.calibrate:
        det = report.detection
        if det is None or det.calibration is None:
            raise DeqguardError("--calibrate needs the detect part (--attacks ...,detect) and a "
                                "validation split")
        update_metadata(path, detection=det.calibration)
        det.written_to_checkpoint = True
    if args.calibrate_selective:
        sel = report.selective
        if sel is None or sel.calibration is None:
            raise DeqguardError("--calibrate-selective made no calibration (see the warnings: "
                                "the selective part is skipped under --defense)")
        update_metadata(path, selective=sel.calibration)
        sel.written_to_checkpoint = True


def _write_outputs(args: argparse.Namespace, report) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(report.model_dump_json(indent=2))
    if args.report:
        from .report import write_report

        write_report(report, args.report, command=_command(args))
