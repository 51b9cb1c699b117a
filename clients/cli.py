"""`deqguard score`: batch scoring of an image folder (locally, on Ray, or through the service).

Nothing heavy is imported here: `--url` scoring works on the client-only install (no torch).
"""

from __future__ import annotations

import argparse
import sys

from deqguard.solve_rules import DEFENSES, SOLVERS


def _score(args: argparse.Namespace) -> int:
    from .client import ClientError
    from .output import ScoreError
    from .score import ScoreConfig, score_folder

    if args.url and args.checkpoint:
        print("deqguard score: error: give --checkpoint or --url, not both", file=sys.stderr)
        return 2
    if args.url and args.engine != "local":
        print("deqguard score: error: --engine applies to local scoring, not --url",
              file=sys.stderr)
        return 2
    options = {k: v for k, v in {"max_iter": args.max_iter, "tol": args.tol,
                                 "solver": args.solver, "defense": args.defense,
                                 "coverage": args.coverage}.items()
               if v is not None}
    cfg = ScoreConfig(
        input_dir=args.input_dir, out=args.out, checkpoint=args.checkpoint, url=args.url,
        engine=args.engine, batch_size=args.batch_size, workers=args.workers, options=options,
        chunk_rows=args.chunk_rows, concurrency=args.concurrency, overwrite=args.overwrite,
        progress=not args.quiet, device=args.device, threads=args.threads)
    try:
        summary = score_folder(cfg)
    except (ScoreError, ClientError, FileNotFoundError) as exc:
        print(f"deqguard score: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad options or output suffix, said before any work is done
        print(f"deqguard score: error: {exc}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


DESCRIPTION = (
    "One row per image file (found recursively, sorted): prediction, entropy trajectory, "
    "detection flag, abstention. Labels: a top-level folder named after one of the model's "
    "classes labels the images under it, and the summary gives an accuracy. Characters a folder "
    "name cannot hold (/ \\ : * ? \" < > |) and spaces stand as _ and case is ignored, so the "
    "class T-shirt/top is the folder T-shirt_top; a top-level folder that names no class is "
    "warned about. An output records the model and options that made it: a rerun with the same "
    "ones resumes an interrupted run (or adds new files), a rerun with other ones is refused "
    "unless --overwrite is given.")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help="score every image of a folder into a Parquet/CSV/JSONL table",
        description=DESCRIPTION)
    p.add_argument("input_dir", help="folder of images, searched recursively; optionally "
                   "INPUT_DIR/<class folder>/... for labels")
    p.add_argument("--out", required=True,
                   help="output table, by suffix: .parquet, .csv or .jsonl (required)")
    src = p.add_argument_group("model (one of)")
    src.add_argument("--checkpoint", help="checkpoint path or shipped name (default: default)")
    src.add_argument("--url", help="score through a running service, e.g. http://127.0.0.1:3000 "
                     "(default: none, score locally)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: Ray Data (RAY_ADDRESS or a local cluster) "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=64,
                   help="images per model batch, local and ray engines (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (local; 0: decode in this process) or model actors "
                        "(ray) (default: local, the cores but one, at most 8; ray, one per GPU or "
                        "the cluster's CPUs but one)")
    p.add_argument("--concurrency", type=_positive, default=16,
                   help="requests in flight with --url (default: %(default)s)")
    p.add_argument("--max-iter", type=_positive, default=None,
                   help="solver iterations (default: the checkpoint's; with --url the server's)")
    p.add_argument("--tol", type=float, default=None,
                   help="relative residual to stop at (default: the checkpoint's; with --url "
                        "the server's)")
    p.add_argument("--solver", choices=SOLVERS, default=None,
                   help="fixed-point solver (default: the checkpoint's; with --url the server's)")
    p.add_argument("--defense", choices=DEFENSES, default=None,
                   help="inference-time defence (default: none)")
    p.add_argument("--coverage", type=float, default=None,
                   help="selective answers: the share of clean inputs to answer, 0 < C <= 1 "
                        "(default 1: always); rows over the checkpoint's calibrated threshold "
                        "get abstained=true (the prediction is still given)")
    p.add_argument("--device", default=None, help="torch device for local scoring "
                   "(default: cuda when present, else cpu)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch threads for local scoring (default: cores minus decoding workers)")
    p.add_argument("--chunk-rows", type=_positive, default=512,
                   help="rows per flushed part file, what a killed run can lose at most "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an existing output or unfinished run and score again, "
                        "e.g. with other options (default: off, resume or refuse)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar; the summary still prints (default: off)")
    p.set_defaults(func=_score)
