"""`deqguard eval`: robustness, defense and detection report for one checkpoint.

    deqguard eval default --json eval.json --report eval/     # its dataset, the default parts
    deqguard eval run/best.safetensors --attacks clean,pgd --n 200
    deqguard eval default --data fashion-mnist --defense entropy-reduction --n 200
    deqguard eval default --attacks clean,pgd,aa --aa-n 100 --aa-attacks apgd-ce,apgd-t
    deqguard eval default --attacks clean,detect --calibrate                    # metadata
    deqguard eval CKPT --attacks clean,selective --n 1000 --val-n 2000 \
        --selective-attack-n 500 --selective-cache runs/selective --report eval/  # risk-coverage
    deqguard eval CKPT --attacks clean --val-n 2000 \
        --calibrate-selective --selective-score max_softmax        # metadata["selective"]
    deqguard eval --schema                                                         # JSON schema

The dataset is the one the checkpoint records (its training config), so the commands the
server and the errors print run as written; --data names another. The default parts finish in
minutes on a CPU; AutoAttack, which takes hours there at the default --n, runs only when asked.
The command modules import torch only inside their handlers, so `deqguard eval --help` is fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_PARTS = ("clean", "budget", "pgd", "adaptive", "aa", "detect", "selective")
# deqguard.training.data.DATASETS, spelled out: importing it would load torch for --help.
DATASETS = ("fashion-mnist", "cifar10", "imagefolder")
# models.selective.SCORE_NAMES and DEFAULT_COVERAGES, spelled out: importing them would load
# torch for --help (tests/test_selective_eval_cli.py checks they agree).
SELECTIVE_SCORES = ("detector", "mean_entropy", "final_entropy", "max_softmax", "iterations")
SELECTIVE_COVERAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
# deqguard.models.config.GradMode, spelled out: importing it would load torch for --help.
GRAD_MODES = ("exact", "implicit", "phantom")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _stack(ds) -> tuple:
    import torch

    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(list(xs)), torch.tensor(ys, dtype=torch.long)


def _defense_config(pairs: list[str] | None):
    import yaml

    from deqguard.models.defense import EntropyReductionConfig
    from deqguard.models.errors import DeqguardError

    fields = {}
    for item in pairs or []:
        if "=" not in item:
            raise DeqguardError(f"--defense-set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        fields[key.strip()] = yaml.safe_load(value)
    return EntropyReductionConfig.model_validate(fields)


def _recorded_data(meta) -> dict:
    """The data section of the checkpoint's training config ({} when it records none).

    A checkpoint trained by `deqguard train` names its dataset there (and in training.data), so
    evaluating it on the data it was made for needs no --data.
    """
    training = meta.training or {}
    data = dict((training.get("config") or {}).get("data") or {})
    if not data.get("dataset"):
        named = (training.get("data") or {}).get("dataset")
        if named:
            data["dataset"] = named
    return data


def _resolve_data(args: argparse.Namespace, meta, path) -> tuple[str, str | None]:
    """(dataset, data_dir): --data and --data-dir, else what the checkpoint records."""
    from deqguard.models.errors import DeqguardError

    if args.data is not None:
        return args.data, args.data_dir
    recorded = _recorded_data(meta)
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


def _eval(args: argparse.Namespace) -> int:
    if args.schema:
        from .schema import EvalReport

        print(json.dumps(EvalReport.model_json_schema(), indent=2))
        return 0
    from deqguard.models.errors import DeqguardError

    if not args.checkpoint:
        raise DeqguardError("a CHECKPOINT is required (a .safetensors file or a shipped name "
                            "such as default)")
    parts = _names(args.attacks)
    unknown = sorted(set(parts) - set(_PARTS))
    if unknown:
        raise DeqguardError(f"unknown --attacks {unknown}; choose from {', '.join(_PARTS)}")
    import torch

    from deqguard.models.checkpoint import load_checkpoint, resolve_checkpoint, update_metadata
    from deqguard.models.defense import default_eps
    from deqguard.training.data import dataset_info, load_dataset

    from .runner import evaluate
    from .schema import CheckpointInfo, EvalSettings

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_checkpoint(args.checkpoint)
    model, meta = load_checkpoint(path, device=device)
    data, data_dir = _resolve_data(args, meta, path)
    info = dataset_info(data, data_dir)
    c, s = meta.input.channels, meta.input.height
    if (info.in_channels, info.image_size) != (c, s) and data != "imagefolder":
        raise DeqguardError(f"{data} images are {info.in_channels}x{info.image_size}px, the "
                            f"checkpoint expects {c}x{s}px")
    size = s if data == "imagefolder" else None
    x, y = _stack(load_dataset(data, args.split, data_dir=data_dir, limit=args.n,
                               image_size=size))
    if len(y) and int(y.max()) >= model.config.num_classes:
        raise DeqguardError(f"{data} has label {int(y.max())}, the checkpoint only "
                            f"{model.config.num_classes} classes")
    selective = _selective_settings(args, parts)
    x_val = y_val = None
    if "detect" in parts or selective is not None:
        # the checkpoint's own validation split (never trained on), unless overridden
        trained = _recorded_data(meta)
        val_size = args.val_size or int(trained.get("val_size", 5000))
        split_seed = args.split_seed if args.split_seed is not None else int(
            trained.get("split_seed", 0))
        x_val, y_val = _stack(load_dataset(data, "val", data_dir=data_dir,
                                           limit=args.val_n, image_size=size,
                                           val_size=val_size, seed=split_seed))
        if selective is not None:
            selective.provenance = {
                "data": data, "data_dir": data_dir, "split": "val",
                "val_size": val_size, "split_seed": split_seed,
                "command": " ".join(["deqguard", *getattr(args, "argv", sys.argv[1:])])}
    eps = args.eps if args.eps is not None else default_eps(c, s)
    settings = EvalSettings(
        checkpoint=str(path), data=data, data_dir=data_dir, split=args.split,
        n=len(x), eps=eps, parts=parts, defense=args.defense,
        defense_config=_defense_config(args.defense_set) if args.defense != "none" else None,
        pgd_steps=args.pgd_steps, pgd_restarts=args.restarts, step_size=args.step_size,
        gradient_paths=_names(args.paths) if args.paths else None,
        intermediate=_grid(args.intermediate), intermediate_tau=args.intermediate_tau,
        bpda_paths=_names(args.bpda_paths) if args.bpda_paths else None,
        steps_sweep=_ints(args.steps_sweep), eps_sweep=_floats(args.eps_sweep),
        large_eps=args.large_eps, budgets=_ints(args.budgets),
        aa_attacks=_names(args.aa_attacks) if args.aa_attacks else None, aa_n=args.aa_n,
        aa_gradient=args.aa_gradient,
        sweep_n=args.sweep_n or None, sweep_gradient=args.sweep_gradient,
        detect_scores=_names(args.scores), early_index=args.early_index,
        detector_lambda=args.detector_lambda, fpr=args.fpr, logistic=args.logistic,
        calibrate=args.calibrate, calibration_score=args.calibration_score,
        val_n=args.val_n, selective=selective, batch_size=args.batch_size, seed=args.seed,
        device=device)
    torch.manual_seed(args.seed)
    ckpt = CheckpointInfo(path=str(path), name=meta.name, sha256=meta.sha256,
                          arch=str(meta.model.get("arch", "")), is_deq=model.is_deq,
                          solver=meta.model.get("solver"))
    from deqguard.models.learned_detector import detector_from_metadata

    if selective is not None and selective.calibrate and selective.score == "detector" and (
            detector_from_metadata(meta) is None or not model.is_deq):
        raise DeqguardError("--selective-score detector needs a learned detector in the "
                            "checkpoint (deqguard detect fit CKPT --write)")
    report = evaluate(model, x, y, settings, checkpoint=ckpt, x_val=x_val, y_val=y_val,
                      progress=not args.no_progress,
                      learned_detector=detector_from_metadata(meta)
                      if "detect" in parts or selective is not None else None)
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
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(report.model_dump_json(indent=2))
    if args.report:
        from .report import write_report

        write_report(report, args.report, command=" ".join(
            ["deqguard", *getattr(args, "argv", sys.argv[1:])]))
    print(json.dumps(for_people(_summary(report)), indent=2))
    return 0


def _selective_settings(args: argparse.Namespace, parts: list[str]):
    """SelectiveSettings when the selective part runs or --calibrate-selective asks for it."""
    from deqguard.models.errors import DeqguardError

    if "selective" not in parts and not args.calibrate_selective:
        return None
    from .schema import SelectiveSettings

    scores = _names(args.selective_scores)
    unknown = sorted(set(scores + [args.selective_score]) - set(SELECTIVE_SCORES))
    if unknown:
        raise DeqguardError(f"unknown selective scores {unknown}; choose from "
                            f"{', '.join(SELECTIVE_SCORES)}")
    coverages = _floats(args.coverages)
    if not coverages or not all(0 < c <= 1 for c in coverages):
        raise DeqguardError(f"--coverages must be numbers in (0, 1], got {args.coverages!r}")
    return SelectiveSettings(
        scores=scores, target_coverage=args.target_coverage, coverages=coverages,
        attack_n=args.selective_attack_n, pgd_steps=args.selective_pgd_steps,
        pgd_gradient=args.selective_gradient, adaptive_n=args.selective_adaptive_n,
        adaptive_lambda=args.selective_lambda, adaptive_steps=args.selective_adaptive_steps,
        reps=args.reps, calibrate=args.calibrate_selective, score=args.selective_score,
        cache=args.selective_cache)


def _grid(text: str) -> list[tuple[int, int]]:
    from .attacks import parse_grid

    return parse_grid(text)


def for_people(value: Any) -> Any:
    """`value` with every float cut to 4 significant digits (0.14000000059604645 -> 0.14).

    For the printed summary only: the JSON report (--json, --report) keeps the exact numbers.
    Four digits resolve one image in 10,000 of an accuracy.
    """
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: for_people(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [for_people(v) for v in value]
    return value


def _summary(report) -> dict:
    from .report import detection_note

    out = {"checkpoint": report.checkpoint.path, "data": report.settings.data,
           "n": report.settings.n, "eps": report.settings.eps,
           "defense": report.settings.defense}
    if report.clean:
        out["clean_accuracy"] = report.clean.accuracy
    for a in report.attacks:
        out[f"acc/{a.name}"] = a.accuracy
    if report.autoattack:
        out["autoattack"] = report.autoattack.accuracy
    if report.worst_case:
        out["robust_accuracy_worst_case"] = report.worst_case.accuracy
    if report.detection:
        note = detection_note(report.detection)
        if note:
            out["detection_note"] = note
        if report.detection.calibration:
            out["detection"] = report.detection.calibration
    if report.selective:
        sel = report.selective
        out["selective"] = {
            k.kind: {name: {"aurc": r.aurc, "coverage": r.coverage,
                            "accuracy_answered": r.accuracy_answered,
                            "successful_answered": r.successful_answered}
                     for name, r in k.scores.items()} for k in sel.kinds}
        if sel.calibration:
            out["selective_calibration"] = {
                "score": sel.calibration["score"], "n": sel.calibration["n_calibration"],
                "written": sel.written_to_checkpoint}
    out["warnings"] = report.warnings
    out["seconds"] = round(report.seconds_total, 1)
    return out


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps a description's line breaks and ends each option's help with its default.

    argparse.ArgumentDefaultsHelpFormatter would also print "(default: None)" and
    "(default: False)", which say nothing; those options say in words what unset means.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "%(default)" in text or default is None
                or default is False or default == "" or default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


DEFAULT_PARTS = "clean,budget,pgd,adaptive,detect"

_DESCRIPTION = f"""\
Evaluate a checkpoint on the test images of the dataset it was trained on (recorded in its
metadata; --data names another). Prints a summary; --json and --report keep every number.

Parts (--attacks, a comma list). Rough cost for the shipped default checkpoint at --n 1000 on
one CPU thread (from its measured reports in docs/eval/wk/):
  clean      clean accuracy, converged fraction, time per image              ~5 s
  budget     accuracy and convergence against the solver budget max_iter     ~10 s
  pgd        PGD-10 through each gradient path, the paper's intermediate-
             state attacks, gradient-masking sweeps on --sweep-n images      ~5 min
  adaptive   the entropy-aware attack on the detector; with --defense, BPDA  ~2 min
  detect     AUROC / TPR of trajectory scores on the attacked inputs;
             calibration on --val-n validation images (--calibrate)         ~30 s
  aa         standard AutoAttack (pyautoattack); not in the default: hours at
             --n 1000 (APGD-CE + APGD-T alone took 85 min); bound it with --aa-n
             and --aa-attacks
  selective  risk-coverage of the doubt scores on clean, PGD-40 and detector-
             aware inputs; not in the default: several minutes
The default, {DEFAULT_PARTS}, takes about 7 minutes at --n 1000 and
about 3 at --n 200. A model with more solver iterations or a larger network costs more.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", formatter_class=HelpFormatter,
        help="robust accuracy (PGD through every gradient path, intermediate states, optional "
        "AutoAttack), the entropy-reduction defense and trajectory detection for a checkpoint",
        description=_DESCRIPTION)
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                   help="a .safetensors checkpoint, a shipped name (default) or a model-store "
                        "tag (name:version)")
    p.add_argument("--data", choices=DATASETS,
                   help="dataset to evaluate on (default: the one the checkpoint records)")
    p.add_argument("--data-dir",
                   help="folder of the dataset: Fashion-MNIST IDX files, CIFAR-10's "
                        "cifar-10-batches-py, or an imagefolder root/<class>/<image> tree "
                        "(default: for the recorded dataset, the folder it was trained from "
                        "when that exists here; else the dataset's standard location)")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="images to evaluate: the test set, or the validation split carved "
                        "from train")
    p.add_argument("--n", type=int, default=1000, help="evaluate the first N images of --split")
    p.add_argument("--eps", type=float,
                   help="L-inf radius (default: 0.1 for 28px grey images, 8/255 otherwise)")
    p.add_argument("--attacks", default=DEFAULT_PARTS, metavar="PARTS",
                   help="comma list of parts, from " + ",".join(_PARTS) + " (see above)")
    p.add_argument("--defense", default="none", choices=["none", "entropy-reduction"],
                   help="evaluate the plain solve, or the entropy-reduction defense (input "
                        "updates at inference)")
    p.add_argument("--defense-set", action="append", metavar="KEY=VALUE",
                   help="an EntropyReductionConfig field, repeatable, e.g. rounds=4 "
                        "input_steps=10 eps=0.1 (default: the config's defaults)")
    p.add_argument("--json", metavar="FILE",
                   help="write the full report (EvalReport JSON, exact numbers) here")
    p.add_argument("--report", metavar="DIR", help="write report.md and PNG plots into DIR")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--pgd-steps", type=int, default=10, help="steps of every PGD attack")
    p.add_argument("--restarts", type=int, default=1, help="PGD random restarts")
    p.add_argument("--step-size", type=float, help="PGD step (default: 2.5 eps / steps)")
    p.add_argument("--paths", metavar="PATHS",
                   help="gradient paths PGD goes through, a comma list of phantom,implicit,"
                        "exact (default: every path of the model; direct for a feedforward)")
    p.add_argument("--intermediate", default="1:5,4:5,8:9",
                   help="the paper's intermediate-state attacks as i:K pairs (solver iterate i, "
                        "K unrolled steps); '' for none")
    p.add_argument("--intermediate-tau", type=float, default=0.5,
                   help="damping of those unrolled steps")
    p.add_argument("--bpda-paths", metavar="PATHS",
                   help="with --defense: BPDA gradient paths, a comma list of exact,phantom,"
                        "implicit (default: exact)")
    p.add_argument("--steps-sweep", default="1,5,10,20",
                   help="gradient-masking check: PGD steps to sweep ('' for none)")
    p.add_argument("--eps-sweep", default="0.5,1,2,4",
                   help="gradient-masking check: radii to sweep, as multiples of --eps")
    p.add_argument("--large-eps", type=float, default=0.5,
                   help="gradient-masking check: radius where accuracy must fall to about 0")
    p.add_argument("--budgets", default="1,2,5,10,20,30,60",
                   help="part budget: solver max_iter values (the model's default is added)")
    p.add_argument("--aa-n", type=int,
                   help="part aa: AutoAttack on the first N images (default: all --n)")
    p.add_argument("--sweep-n", type=int, default=200,
                   help="gradient-masking sweeps on the first N images (0: all --n)")
    p.add_argument("--sweep-gradient", default="exact", choices=GRAD_MODES,
                   help="gradient path of the gradient-masking sweeps on a DEQ")
    p.add_argument("--aa-attacks", metavar="ATTACKS",
                   help="part aa: a subset of apgd-ce,apgd-t,fab-t,square (default: all four, "
                        "standard AutoAttack)")
    p.add_argument("--aa-gradient", default="exact", choices=GRAD_MODES,
                   help="part aa: gradient path of AutoAttack's gradient attacks on a DEQ "
                        "(exact: backprop through the solver; phantom overstates robustness)")
    p.add_argument("--scores", default="final_entropy,max_softmax,mean_entropy,early_entropy,"
                   "iterations,final_residual",
                   help="part detect: trajectory scores to measure (higher = more suspicious)")
    p.add_argument("--early-index", type=int, default=1,
                   help="part detect: the solver iterate early_entropy reads")
    p.add_argument("--detector-lambda", type=float, default=0.1,
                   help="attack on the detector: CE - lambda * summed trajectory entropy")
    p.add_argument("--fpr", type=float, default=0.05,
                   help="part detect: false-positive rate on clean images of the thresholds")
    p.add_argument("--logistic", action="store_true",
                   help="part detect: also fit a logistic detector over the trajectory on the "
                        "validation split")
    p.add_argument("--calibrate", action="store_true",
                   help="part detect: write the validation-calibrated threshold into the "
                        "checkpoint's metadata (what the server reads)")
    p.add_argument("--calibration-score", default="mean_entropy",
                   help="part detect: the score --calibrate stores")
    g = p.add_argument_group(
        "selective answers (part selective, --calibrate-selective)",
        "Risk-coverage of each doubt score on clean test images, exact-gradient PGD and the "
        "detector-aware attack, judged at the threshold that answers --target-coverage of clean "
        "validation images; --calibrate-selective writes the thresholds of one score at "
        "--coverages into the checkpoint's metadata['selective'] (what the server reads).")
    g.add_argument("--selective-scores", default=",".join(SELECTIVE_SCORES),
                   help="doubt scores to measure (detector: needs a learned detector)")
    g.add_argument("--target-coverage", type=float, default=0.9,
                   help="share of clean validation images the compared thresholds answer")
    g.add_argument("--coverages", default=",".join(f"{c:g}" for c in SELECTIVE_COVERAGES),
                   help="coverages the calibration stores (1 is always added)")
    g.add_argument("--selective-attack-n", type=int,
                   help="PGD on the first N test images (default: all --n)")
    g.add_argument("--selective-pgd-steps", type=int, default=40, help="steps of that PGD")
    g.add_argument("--selective-gradient", default="exact", choices=GRAD_MODES,
                   help="gradient path of that PGD on a DEQ")
    g.add_argument("--selective-adaptive-n", type=int, default=100,
                   help="detector-aware PGD on the first N test images (0: skip)")
    g.add_argument("--selective-lambda", type=float, default=2.0,
                   help="detector-aware PGD: CE - lambda * detector score")
    g.add_argument("--selective-adaptive-steps", type=int, default=10,
                   help="steps of the detector-aware PGD")
    g.add_argument("--reps", type=int, default=1000, help="bootstrap resamples")
    g.add_argument("--selective-cache", metavar="DIR",
                   help="cache the crafted attacked sets here, resumable, e.g. runs/selective "
                        "(default: no cache)")
    g.add_argument("--calibrate-selective", action="store_true",
                   help="write the selective calibration of --selective-score, on the "
                        "--val-n validation images, into the checkpoint's metadata")
    g.add_argument("--selective-score", default="max_softmax", choices=SELECTIVE_SCORES,
                   help="the score the server will use (choose the best measured on attacked "
                        "inputs at equal clean coverage)")
    p.add_argument("--val-n", type=int, default=500,
                   help="validation images for calibration (parts detect, selective)")
    p.add_argument("--val-size", type=int,
                   help="size of the validation split carved from train (default: the "
                        "checkpoint's training config, else 5000)")
    p.add_argument("--split-seed", type=int,
                   help="seed of that split (default: the checkpoint's training config, else 0)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--schema", action="store_true",
                   help="print the JSON schema of the report and exit")
    p.set_defaults(func=_eval)
