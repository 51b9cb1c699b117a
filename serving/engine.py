"""The model behind the service: a batch of [N, C, H, W] arrays + options -> ClassifyResult list.

Kept out of the BentoML service file so that the benchmark, the tests and any other host can run
exactly what the server runs. Two backends share `Engine`: torch (every solver, the defense) and
onnxruntime (`onnx_engine.py`: a fixed-iteration naive solver), chosen by `factory.load_engine`;
this module knows nothing of the ONNX one.

Batch invariance (a sample's answer does not depend on its batch mates): solvers stop per sample
at `tol` and freeze finished samples, so within one set of options results are per-sample; the
service runs each distinct `SolveOptions` as its own sub-batch (the options key), and every
trajectory is cut to the sample's own iteration count (the solver pads it to the batch's longest).
The entropy-reduction defense runs sample by sample, because its rounds are aligned across the
batch (see `_defended`).

Anytime inference: the settled exit (`settle_iters` / `settle_entropy`, models/anytime.py) is part
of the options key; a deadline is not (every request's is different) but travels per sample as an
absolute time, and the solver stops each sample at its own deadline only, so a batch mate's
deadline never changes an answer. `stopped` says which criterion ended a sample.

Trajectories are always computed, since detection scores read them; the `trajectory` flag only
decides whether they are returned.

Selective answers (`coverage` < 1, selective.py): the coverage is part of the options key, and
like a calibrated detector it reads full solves, so the settled exit stands aside for it.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .schema import ClassifyResult, Detection, ModelRef
from .selective import Selector, trace_result

log = logging.getLogger(__name__)

DEFENSES = ("none", "entropy-reduction")
STOP_REASONS = ("max_iter", "tol", "settled", "deadline")  # models.solvers.STOP_REASONS
# The settled exit's defaults for plain (undefended) requests, measured with bench/anytime.py on
# the shipped default and 300 Fashion-MNIST test images (README, Serving).
DEFAULT_SETTLE_ITERS = 3
DEFAULT_SETTLE_ENTROPY = 0.3


class OptionsError(ValueError):
    """Options the engine cannot honour (over the cap, unsupported by the backend)."""


@dataclass(frozen=True)
class SolveOptions:
    """Fully resolved solve options: the key requests are grouped by when batched."""

    max_iter: int
    tol: float
    solver: str
    defense: str = "none"
    settle_iters: int = 0  # 0: no settled exit
    settle_entropy: float = DEFAULT_SETTLE_ENTROPY
    detect: bool = True
    coverage: float = 1.0  # selective answering: 1 answers everything


@dataclass
class SampleTrace:
    """One sample's solve, its trajectories already cut to its own iterations."""

    logits: np.ndarray  # [K]
    entropy: np.ndarray  # [T]
    residual: np.ndarray  # [T]
    iterations: int
    converged: bool
    stopped: str = "max_iter"  # one of STOP_REASONS
    features: dict[str, float] | None = None  # dynamics features, when the detector needs them


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def entropy_of(logits: np.ndarray) -> np.ndarray:
    """Prediction entropy in nats over the last axis (numpy twin of models.prediction_entropy)."""
    p = softmax(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -(np.where(p > 0, p * np.log(p), 0.0)).sum(axis=-1)


def split_batch(logits: np.ndarray, entropy: np.ndarray | None, residual: np.ndarray,
                iterations: np.ndarray, converged: np.ndarray,
                stopped: np.ndarray | None = None,
                features: dict[str, np.ndarray] | None = None) -> list[SampleTrace]:
    """[T, B] batch trajectories -> per-sample traces cut to each sample's iteration count.

    `stopped`: indices into STOP_REASONS; without it, "tol" when converged, else "max_iter"."""
    out = []
    for i in range(logits.shape[0]):
        it = max(int(iterations[i]), 1)
        ent = (entropy[:it, i] if entropy is not None and entropy.size
               else entropy_of(logits[i])[None])
        res = residual[:it, i] if residual.size else np.zeros(1)
        why = (STOP_REASONS[int(stopped[i])] if stopped is not None
               else "tol" if converged[i] else "max_iter")
        out.append(SampleTrace(logits=logits[i], entropy=np.asarray(ent, np.float64),
                               residual=np.asarray(res, np.float64), iterations=it,
                               converged=bool(converged[i]), stopped=why,
                               features=None if features is None else
                               {k: float(v[i]) for k, v in features.items()}))
    return out


class Detector:
    """Applies the checkpoint's detector to one sample.

    The learned detector (metadata["detector"], models/detector.py) wins when the sample's trace
    carries the dynamics features it reads (torch engine, no defense, detect=true). Otherwise
    the single-score calibration (metadata["detection"]) applies as before; before one exists
    the score is the final prediction entropy, the threshold null and `suspicious` false. A
    calibration made for another defense than the request's is not applied (its threshold would
    be meaningless there): the score is still computed and returned.
    """

    def __init__(self, calibration: dict[str, Any] | None, learned: Any = None):
        from deqguard.models.detection_scores import DetectionCalibration

        self.calibration = (DetectionCalibration.model_validate(calibration)
                            if calibration else None)
        self.learned = learned  # LogisticDetector | None

    def wants_features(self, opts: SolveOptions) -> bool:
        return self.learned is not None and opts.detect and opts.defense == "none"

    def calibrated_for(self, defense: str) -> bool:
        """A calibration made for another defense is not applied: its threshold means nothing."""
        return self.calibration is not None and (self.calibration.defense or "none") == defense

    def reads_dynamics(self, opts: SolveOptions) -> bool:
        """Whether a calibrated detector will read this request's trajectory or features."""
        return opts.detect and (self.wants_features(opts) or self.calibrated_for(opts.defense))

    def __call__(self, trace: SampleTrace, defense: str, detect: bool = True) -> Detection:
        import torch

        from deqguard.models.detection_scores import detection_score

        if self.learned is not None and detect and trace.features is not None:
            det = self.learned
            feats = {k: torch.tensor([v], dtype=torch.float64)
                     for k, v in trace.features.items()}
            score = float(det.score(feats)[0])
            return Detection(score_name=det.name, score=score, threshold=float(det.threshold),
                             suspicious=bool(score > det.threshold), detector=det.name,
                             fpr=float(det.fpr))
        cal = self.calibration
        name = cal.score if cal else "final_entropy"
        result = trace_result(trace)
        kwargs = {"early_index": cal.early_index, "params": cal.params} if cal else {}
        score = float(detection_score(result, name, **kwargs)[0])
        if not detect:
            return Detection(score_name=name, score=score, threshold=None, suspicious=False,
                             detector="off")
        if cal is None or not self.calibrated_for(defense):
            return Detection(score_name=name, score=score, threshold=None, suspicious=False,
                             detector="uncalibrated")
        return Detection(score_name=name, score=score, threshold=float(cal.threshold),
                         suspicious=bool(score > cal.threshold), detector="calibration",
                         fpr=float(cal.fpr))


class Engine(ABC):
    """A loaded checkpoint that classifies batches of arrays; one call at a time (a lock)."""

    backend: str = "?"
    computes_features: bool = True  # dynamics features (the learned detector's inputs)

    def __init__(self, meta: Any, *, max_iter_cap: int):
        self.meta = meta  # deqguard.models.CheckpointMetadata
        self.spec = meta.input
        self.classes = list(meta.classes)
        self.max_iter_cap = int(max_iter_cap)
        from deqguard.models.learned_detector import detector_from_metadata
        from deqguard.models.selective import selective_from_metadata

        learned = detector_from_metadata(meta)
        self.detector = Detector(meta.detection, learned)
        self.selector = Selector(selective_from_metadata(meta), learned)
        self.model_ref = ModelRef(name=meta.name or "unnamed", sha256=meta.sha256)
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.pair_singles = True

    # -- options -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def is_deq(self) -> bool: ...

    @abstractmethod
    def default_options(self, defense: str = "none") -> SolveOptions: ...

    def check_options(self, opts: SolveOptions) -> None:
        """Raise OptionsError naming the problem (the front answers it with a 4xx)."""
        if not 1 <= opts.max_iter <= self.max_iter_cap:
            raise OptionsError(f"max_iter must be between 1 and the server cap "
                               f"{self.max_iter_cap}, got {opts.max_iter}")
        if not 0 < opts.tol <= 1:
            raise OptionsError(f"tol must be in (0, 1], got {opts.tol}")
        if opts.defense not in DEFENSES:
            raise OptionsError(f"unknown defense {opts.defense!r}; known: {list(DEFENSES)}")
        if opts.defense != "none" and not self.is_deq:
            raise OptionsError("the entropy-reduction defense needs a DEQ checkpoint; "
                               "this one is feed-forward")
        if opts.settle_iters < 0 or not opts.settle_entropy > 0:
            raise OptionsError(f"settle_iters must be >= 0 and settle_entropy > 0, got "
                               f"{opts.settle_iters} and {opts.settle_entropy}")
        if opts.settle_iters and opts.defense != "none":
            raise OptionsError("the settled exit applies to the plain solve, not to the "
                               f"{opts.defense} defense; leave settle_iters unset or 0")
        problem = self.selector.problem(opts, features=self.computes_features and self.is_deq)
        if problem:
            raise OptionsError(problem)

    def check_deadline(self, opts: SolveOptions) -> None:
        """Raise OptionsError when this engine cannot stop `opts` at a deadline."""
        if opts.defense != "none":
            raise OptionsError(f"deadline_ms applies to the plain solve, not to the "
                               f"{opts.defense} defense")
        problem = self.selector.problem(opts, features=self.computes_features and self.is_deq,
                                        deadline=True)
        if problem:
            raise OptionsError(problem)

    def wants_features(self, opts: SolveOptions) -> bool:
        """Whether the solve must compute the dynamics features (detector or selective score)."""
        return self.detector.wants_features(opts) or self.selector.needs_features(opts)

    def reads_dynamics(self, opts: SolveOptions) -> bool:
        """Whether a calibrated decision reads this request's full trajectory: the settled exit
        would truncate it, so it stands aside (the detector's or a coverage below 1)."""
        return self.detector.reads_dynamics(opts) or opts.coverage < 1

    def resolve(self, *, max_iter: int | None = None, tol: float | None = None,
                solver: str | None = None, defense: str | None = None,
                settle_iters: int | None = None, settle_entropy: float | None = None,
                deadline_ms: int | None = None, detect: bool | None = None,
                coverage: float | None = None) -> SolveOptions:
        """Fill unset options from the checkpoint's defaults, then check them. `deadline_ms` is
        only checked (deadlines travel per sample, see `trace`)."""
        d = self.default_options(defense or "none")
        opts = SolveOptions(max_iter=d.max_iter if max_iter is None else int(max_iter),
                            tol=d.tol if tol is None else float(tol),
                            solver=d.solver if solver is None else str(solver),
                            defense=defense or "none",
                            settle_iters=d.settle_iters if settle_iters is None
                            else int(settle_iters),
                            settle_entropy=d.settle_entropy if settle_entropy is None
                            else float(settle_entropy),
                            detect=True if detect is None else bool(detect),
                            coverage=1.0 if coverage is None else coverage)
        self.check_options(opts)
        if deadline_ms is not None:
            self.check_deadline(opts)
        return opts

    # -- running -------------------------------------------------------------------------------
    @abstractmethod
    def _solve(self, x: np.ndarray, opts: SolveOptions,
               deadlines: np.ndarray | None) -> list[SampleTrace]: ...

    def trace(self, x: np.ndarray, opts: SolveOptions, deadlines: np.ndarray | None = None
              ) -> list[SampleTrace]:
        """Per-sample traces for float32 x [N, C, H, W] in [0, 1] (validated by the caller).

        `deadlines`: [N] absolute `time.time()` seconds (inf: none); a sample past its deadline
        stops after its current iteration with `stopped="deadline"`.

        A lone sample runs as a pair (itself twice): oneDNN convolutions take another code path
        for a batch of one, whose sums differ in the last bit, and Anderson/Broyden amplify that
        to ~1e-4 over a solve. Batches of two or more agree bit for bit on CPU whatever their
        size and order, so this makes answers identical however requests were batched.
        On CUDA it is not enough: measured on an H200 (torch 2.11), cuDNN/cuBLAS results depend
        on the batch size itself, and a 30-step Broyden solve differed by up to 1e-2 in logits
        (iteration counts by one) between a batch of 20 and of 7.
        `pair_singles = False` (DEQGUARD_BATCH_INVARIANT=false) saves that compute for lone
        requests at the price of last-bit differences.
        """
        n = x.shape[0]
        if n == 0:
            return []
        x = np.ascontiguousarray(x, dtype=np.float32)
        if deadlines is not None:
            deadlines = np.asarray(deadlines, np.float64)
            if np.isinf(deadlines).all():
                deadlines = None
        if n == 1 and self.pair_singles:
            x = np.concatenate([x, x])
            deadlines = None if deadlines is None else np.concatenate([deadlines, deadlines])
        with self._lock:
            return self._solve(x, opts, deadlines)[:n]

    def result(self, trace: SampleTrace, opts: SolveOptions, trajectory: bool) -> ClassifyResult:
        probs = softmax(trace.logits)
        label = int(np.argmax(trace.logits))
        abstained, selective = self.selector(trace, opts)
        return ClassifyResult(
            label=label, class_name=self.classes[label],
            probabilities=[float(p) for p in probs],
            entropy=[float(v) for v in trace.entropy] if trajectory else [],
            residual=[float(v) for v in trace.residual] if trajectory else [],
            iterations=trace.iterations, converged=trace.converged, stopped=trace.stopped,
            detection=self.detector(trace, opts.defense, opts.detect), abstained=abstained,
            selective=selective, model=self.model_ref)

    def classify(self, x: np.ndarray, opts: SolveOptions, trajectory: bool = True,
                 deadlines: np.ndarray | None = None) -> list[ClassifyResult]:
        """The in-process twin of POST /classify_tensor with one set of options."""
        return [self.result(t, opts, trajectory) for t in self.trace(x, opts, deadlines)]

    def classify_grouped(self, xs: Sequence[np.ndarray], opts: Sequence[SolveOptions],
                         deadlines: Sequence[float] | None = None) -> list[SampleTrace]:
        """Items with mixed options: one sub-batch per distinct options, answers in input order.
        `deadlines` (absolute time.time() seconds, inf for none) stay per item."""
        groups: dict[SolveOptions, list[int]] = {}
        for i, o in enumerate(opts):
            groups.setdefault(o, []).append(i)
        out: list[SampleTrace | None] = [None] * len(xs)
        for o, idx in groups.items():
            dl = None if deadlines is None else np.array([deadlines[i] for i in idx], np.float64)
            traces = self.trace(np.stack([xs[i] for i in idx]), o, dl)
            for i, t in zip(idx, traces, strict=True):
                out[i] = t
        return out  # type: ignore[return-value]

    def warm_up(self) -> None:
        """Run the default path once (allocators, kernels, lazy init) and mark ready."""
        s = self.spec
        x = np.zeros((2, s.channels, s.height, s.width), np.float32)
        self.classify(x, self.default_options())
        self.ready.set()

    def describe(self) -> dict[str, Any]:
        """What GET /model answers: checkpoint metadata plus how this server runs it."""
        d = self.default_options()
        return {
            **self.meta.model_dump(mode="json"),
            "serving": {"backend": self.backend, "max_iter_cap": self.max_iter_cap,
                        "defaults": {"max_iter": d.max_iter, "tol": d.tol, "solver": d.solver,
                                     "settle_iters": d.settle_iters,
                                     "settle_entropy": d.settle_entropy},
                        "defenses": self.defenses(), "solvers": self.solvers(),
                        "selective": self.selector.describe()},
        }

    def defenses(self) -> list[str]:
        return list(DEFENSES) if self.is_deq else ["none"]

    def solvers(self) -> list[str]:
        return ["naive", "anderson", "broyden"]


class TorchEngine(Engine):
    """The checkpoint's own torch model: every solver, the entropy-reduction defense."""

    backend = "torch"

    def __init__(self, model: Any, meta: Any, *, device: str = "cpu", max_iter_cap: int = 100):
        super().__init__(meta, max_iter_cap=max_iter_cap)
        self.model = model.eval()
        self.device = device

    @classmethod
    def load(cls, checkpoint: str, *, device: str = "auto", threads: int = 1,
             max_iter_cap: int = 100) -> TorchEngine:
        import torch

        from deqguard.models import load_checkpoint

        set_torch_threads(threads)
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        model, meta = load_checkpoint(checkpoint, device=dev)
        return cls(model, meta, device=dev, max_iter_cap=max_iter_cap)

    @property
    def is_deq(self) -> bool:
        return bool(self.model.is_deq)

    def default_options(self, defense: str = "none") -> SolveOptions:
        cfg = getattr(self.model.config, "solver", None)
        max_iter = cfg.max_iter if cfg is not None else 1
        if defense == "entropy-reduction":
            from deqguard.models.defense import EntropyReductionConfig

            er = EntropyReductionConfig()
            max_iter = er.rounds * er.solver_steps_per_round
        return SolveOptions(max_iter=min(max_iter, self.max_iter_cap),
                            tol=cfg.tol if cfg is not None else 1e-3,
                            solver=cfg.solver if cfg is not None else "naive", defense=defense,
                            settle_iters=DEFAULT_SETTLE_ITERS if defense == "none" else 0)

    def _solve(self, x: np.ndarray, opts: SolveOptions,
               deadlines: np.ndarray | None) -> list[SampleTrace]:
        import torch

        from deqguard.models.anytime import SettleRule

        xt = torch.from_numpy(x).to(self.device)
        if opts.defense == "entropy-reduction":
            return self._defended(xt, opts)
        anytime: dict[str, Any] = {}
        if self.is_deq:
            # The detector was fitted and calibrated on full solves: a settled exit would feed
            # it truncated dynamics, so it only applies where no calibrated detector reads them.
            if opts.settle_iters and not self.reads_dynamics(opts):
                anytime["settle"] = SettleRule(opts.settle_iters, opts.settle_entropy)
            if deadlines is not None:
                anytime["deadline"] = torch.from_numpy(deadlines)
        features = (self.detector.learned.dynamics
                    if self.is_deq and self.wants_features(opts) else None)
        with torch.inference_mode():
            r = self.model.solve(xt, solver=opts.solver, max_iter=opts.max_iter, tol=opts.tol,
                                 trajectory=True, features=features, **anytime)
        return split_batch(
            r.logits.float().cpu().numpy(),
            None if r.entropy is None else r.entropy.float().cpu().numpy(),
            r.residual.float().cpu().numpy(), r.iterations.cpu().numpy(),
            r.converged.cpu().numpy(), None if r.stopped is None else r.stopped.cpu().numpy(),
            None if r.features is None else
            {k: v.double().cpu().numpy() for k, v in r.features.items()})

    def _defended(self, xt: Any, opts: SolveOptions) -> list[SampleTrace]:
        """Sample by sample: the defense's rounds are aligned across a batch, so a sample's
        trajectory rows would otherwise be padded to its batch mates' per-round step counts."""
        from deqguard.models.defense import EntropyReductionConfig, entropy_reduction_solve

        cfg = EntropyReductionConfig()
        out = []
        reps = 2 if self.pair_singles else 1
        for i in range(xt.shape[0]):
            pair = xt[i:i + 1].repeat(reps, 1, 1, 1)  # as a pair: see `trace`
            r = entropy_reduction_solve(self.model, pair, cfg, solver=opts.solver,
                                        max_iter=opts.max_iter, tol=opts.tol, trajectory=True)
            out += split_batch(
                r.logits.detach().float().cpu().numpy(),
                None if r.entropy is None else r.entropy.float().cpu().numpy(),
                r.residual.float().cpu().numpy(), r.iterations.cpu().numpy(),
                r.converged.cpu().numpy())[:1]
        return out


def set_torch_threads(threads: int) -> None:
    """Pin intra-op threads explicitly: BentoML does not, and an unpinned server on a small box
    fights its own clients for cores."""
    import torch

    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(max(1, min(int(threads), 4)))
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass

