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
    deqguard eval default --attacks clean,adaptive-selective --n 500 \
        --selective-cache runs/selective --json as.json     # doubt scores under aimed attack
    deqguard eval --schema                                                         # JSON schema

The dataset is the one the checkpoint records (its training config), so the commands the
server and the errors print run as written; --data names another. The default parts finish in
minutes on a CPU; AutoAttack, which takes hours there at the default --n, runs only when asked.
This module is the parser; the handler is `eval_command.run`, which imports torch only when it
runs, so `deqguard eval --help` is fast."""

from __future__ import annotations

import argparse

from deqguard.shipped import SHIPPED_NAMES
from deqguard.solve_rules import DEFENSES
from deqguard.threads import add_threads_argument

from .choices import (
    DATASETS,
    DEFAULT_PARTS,
    GRAD_MODES,
    PARTS,
    SELECTIVE_COVERAGES,
    SELECTIVE_SCORES,
)
from .eval_command import run
from .rectifier_cli import add_rectifier_arguments
from .slowdown_cli import add_slowdown_arguments


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


def add_gradient_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str,
                          help: str) -> None:
    """An attack's gradient-path option on a DEQ: every one offers the same paths and starts at
    exact (backprop through the solver), the path robustness is judged by."""
    parser.add_argument(flag, default="exact", choices=GRAD_MODES, help=help)


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
             and --aa-attacks; --aa-from adds later stages (square) to an
             earlier report without rerunning its stages
  selective  risk-coverage of the doubt scores on clean, PGD-40 and detector-
             aware inputs; not in the default: several minutes
  slowdown   inputs crafted to stall the solver: iterations and ms per answer,
             clean against attacked; not in the default: ~2 min per solver at
             --slowdown-n 100
  adaptive-selective
             per doubt score and coverage (--adaptive-coverages), an attack aimed
             at a wrong answer the score lets through, against PGD-40 on the same
             images; not in the default: about 1 hour per score at --n 500 with
             the default --iters/--targets (the detector about 2), estimated
  rectifier-aware
             a checkpoint with a rectifier head: attacks aimed at the head (CE +
             lam BCE, targeted log p_t + log sigmoid(A)) and the abstentions a
             doubt-raising nudge causes, rectified against max_softmax; not in
             the default: about 10 min at --n 100 (measured under load)
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
                   help=f"a .safetensors checkpoint, a shipped name ({SHIPPED_NAMES}) or a "
                        "model-store tag (name:version)")
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
    p.add_argument("--start", type=int, default=0, metavar="K",
                   help="leave out the first K images of --split: --start 1000 --n 1000 scores "
                        "images 1,001-2,000, recorded in the report, where `deqguard compare` "
                        "pairs them by image number with reports that scored from 1 (default: 0)")
    p.add_argument("--eps", type=float,
                   help="L-inf radius (default: 0.1 for 28px grey images, 8/255 otherwise)")
    p.add_argument("--attacks", default=DEFAULT_PARTS, metavar="PARTS",
                   help="comma list of parts, from " + ",".join(PARTS) + " (see above)")
    p.add_argument("--defense", default="none", choices=DEFENSES,
                   help="evaluate the plain solve, or the entropy-reduction defense (input "
                        "updates at inference)")
    p.add_argument("--defense-set", action="append", metavar="KEY=VALUE",
                   help="an EntropyReductionConfig field, repeatable, e.g. rounds=4 "
                        "input_steps=10 eps=0.1 (default: the config's defaults)")
    p.add_argument("--defense-config", metavar="FILE",
                   help="start from the settings in FILE: an EntropyReductionConfig as JSON, or "
                        "the report of python -m deqguard.evaluation.defense_tune (its choice, "
                        "made on validation images); --defense-set overrides single fields")
    p.add_argument("--json", metavar="FILE",
                   help="write the full report (EvalReport JSON, exact numbers) here")
    p.add_argument("--report", metavar="DIR", help="write report.md and PNG plots into DIR")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when available, else cpu")
    add_threads_argument(p, default=0)
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
                        "implicit, or full (exact through the input updates too) "
                        "(default: exact)")
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
    add_gradient_argument(p, "--sweep-gradient",
                          "gradient path of the gradient-masking sweeps on a DEQ")
    p.add_argument("--aa-attacks", metavar="ATTACKS",
                   help="part aa: a subset of apgd-ce,apgd-t,fab-t,square (default: all four, "
                        "standard AutoAttack)")
    p.add_argument("--aa-from", metavar="REPORT",
                   help="part aa: take the AutoAttack stages of an earlier --json report of "
                        "this checkpoint and these images as they are, and run only the stages "
                        "--aa-attacks adds after them (e.g. square after apgd-ce,apgd-t)")
    add_gradient_argument(p, "--aa-gradient",
                          "part aa: gradient path of AutoAttack's gradient attacks on a DEQ "
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
    add_gradient_argument(g, "--selective-gradient", "gradient path of that PGD on a DEQ")
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
    add_slowdown_arguments(p)
    g = p.add_argument_group(
        "attacks on the doubt scores (part adaptive-selective)",
        "Per doubt score and coverage, an attack aimed at a wrong answer the score lets through "
        "at its clean-calibrated threshold (the checkpoint's for its served score, else set on "
        "--val-n validation images): APGD schedule, exact gradient through the solver, stage 1 "
        "makes the answer wrong, stage 2 lowers the score while it stays wrong. Compared with "
        "PGD (--selective-pgd-steps) on the same images; cached under --selective-cache.")
    g.add_argument("--adaptive-scores", default=",".join(SELECTIVE_SCORES),
                   help="doubt scores to attack (detector: needs a learned detector)")
    g.add_argument("--adaptive-coverages", default="0.8,0.9",
                   help="clean coverages whose thresholds are attacked")
    g.add_argument("--iters", type=int, default=100, help="iterations of each attack run")
    g.add_argument("--adaptive-restarts", type=int, default=1,
                   help="untargeted runs from random starts")
    g.add_argument("--targets", type=int, default=3, metavar="K",
                   help="targeted DLR runs towards the K top wrong classes of the clean answer")
    g.add_argument("--adaptive-loss", default="ce", choices=["ce", "dlr"],
                   help="stage-1 loss of the untargeted runs")
    add_rectifier_arguments(p)
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
    p.set_defaults(func=run)
