"""The choices the `deqguard eval` options offer, spelled out as plain tuples.

The parser (`cli.py`) and the handler (`eval_command.py`) both check against them; the sources
they mirror import torch, which `deqguard eval --help` must not load (the tests check that each
copy agrees with its source).
"""

PARTS = ("clean", "budget", "pgd", "adaptive", "aa", "detect", "selective", "slowdown",
         "adaptive-selective", "rectifier-aware")
DEFAULT_PARTS = "clean,budget,pgd,adaptive,detect"
# deqguard.training.data.DATASETS
DATASETS = ("fashion-mnist", "cifar10", "imagefolder")
# models.selective.SCORE_NAMES and DEFAULT_COVERAGES (tests/test_selective_eval_cli.py)
SELECTIVE_SCORES = ("detector", "mean_entropy", "final_entropy", "max_softmax", "iterations",
                    "rectified")
SELECTIVE_COVERAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
# deqguard.models.config.GradMode
GRAD_MODES = ("exact", "implicit", "phantom")
# deqguard.evaluation.detector_groups.GROUPS (tests/test_detector_groups.py)
FEATURE_GROUPS = ("trajectory", "residual", "restart", "entropy-step", "jacobian",
                  "residual+entropy-step", "all-but-restart", "all")
