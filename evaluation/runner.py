"""`deqguard eval`: how robust a checkpoint really is, and how well its trajectory detects attacks.

One run produces an `EvalReport` (`schema.py`). The pieces run in this order: clean
accuracy and timing, accuracy against the solver budget, PGD through every gradient path plus
the paper's intermediate-state attacks, adaptive attacks (BPDA through the defense, the
entropy-aware attack on the detector), gradient-masking sweeps, AutoAttack, detection, selective
answers (selective.py: risk-coverage, the calibration the server reads). With the
entropy-reduction defense on, PGD inputs are crafted on the undefended model (transfer, the
paper's protocol) and judged on the defended one; BPDA and AutoAttack attack the defended
forward itself. The headline robust accuracy is the per-sample worst case over all of them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deqguard.models.classifier import Classifier, SolveResult
from deqguard.models.config import GradMode
from deqguard.models.defense import (
    DefendedClassifier,
    EntropyReductionConfig,
    entropy_reduction_solve,
)

from .attacks import (
    AttackSpec,
    default_step_size,
    gradient_paths,
    path_logits,
    run_attack,
    worst_case,
)
from .detection import (
    calibrate,
    detect_attack,
    fit_logistic,
    score_all,
    solve_all,
    subset,
    trajectory_summary,
)
from .schema import (
    AttackResult,
    AutoAttackSection,
    BudgetPoint,
    CheckpointInfo,
    CleanResult,
    DefenseSummary,
    DetectionSection,
    EvalReport,
    EvalSettings,
    SweepPoint,
    Sweeps,
    WorstCase,
)


def _slack(n: int) -> float:
    """Tolerance for 'should not increase' checks: one sample, at least one point."""
    return max(0.01, 1.0 / max(n, 1))


class _Logits(torch.nn.Module):
    """The model's deterministic forward as a plain logits module (AutoAttack wraps this).

    Its gradient path is explicit: left to the checkpoint's default, a DEQ trained with the
    phantom gradient would be attacked through that approximation, which is weaker than exact
    backprop through the solver and so overstates robustness.
    """

    def __init__(self, model: Classifier, grad: GradMode):
        super().__init__()
        self.model, self.grad = model, grad

    def forward(self, x: Tensor) -> Tensor:
        return path_logits(self.model, x, self.grad)


class Evaluation:
    """State of one evaluation run; `run()` returns the report."""

    def __init__(self, model: Classifier, x: Tensor, y: Tensor, settings: EvalSettings, *,
                 checkpoint: CheckpointInfo, x_val: Tensor | None = None,
                 y_val: Tensor | None = None, progress: bool = True):
        self.model, self.s, self.ckpt = model.eval(), settings, checkpoint
        dev = torch.device(settings.device)
        self.x, self.y = x.to(dev), y.to(dev)
        self.x_val = None if x_val is None else x_val.to(dev)
        self.y_val = None if y_val is None else y_val.to(dev)
        self.progress = progress
        self.defended = settings.defense == "entropy-reduction"
        if self.defended and not model.is_deq:
            raise ValueError("the entropy-reduction defense needs a DEQ checkpoint")
        self.defense_cfg = ((settings.defense_config or EntropyReductionConfig()).resolved(model)
                            if self.defended else None)
        self.report = EvalReport(deqguard_version=_version(), created=_now(), seconds_total=0.0,
                                 checkpoint=checkpoint, settings=settings)
        self.correct: dict[str, Tensor] = {}  # attack -> correct on the evaluated predictor
        self.x_adv: dict[str, Tensor] = {}
        self.specs: dict[str, AttackSpec] = {}
        self.clean_main: SolveResult | None = None
        self._seed = settings.seed
        self.learned_detector: Any = None  # LogisticDetector from the checkpoint, if any

    # -- predictors ------------------------------------------------------------------------------
    def solve_undefended(self, x: Tensor) -> SolveResult:
        return self.model.solve(x)

    def solve_main(self, x: Tensor) -> SolveResult:
        if self.defended:
            return entropy_reduction_solve(self.model, x, self.defense_cfg)
        return self.model.solve(x)

    def predict_main(self, x: Tensor) -> Tensor:
        return self._predict(self.solve_main, x)

    def predict_undefended(self, x: Tensor) -> Tensor:
        return self._predict(self.solve_undefended, x)

    def _predict(self, solve: Callable[[Tensor], SolveResult], x: Tensor) -> Tensor:
        bs = self.s.batch_size
        with torch.no_grad():
            return torch.cat([solve(x[i:i + bs]).logits.argmax(1) for i in range(0, len(x), bs)])

    def _generator(self) -> torch.Generator:
        self._seed += 1
        return torch.Generator(device=self.x.device).manual_seed(self._seed)

    # -- parts ------------------------------------------------------------------------------------
    def _timed(self, solve: Callable[[Tensor], SolveResult]) -> tuple[SolveResult, float]:
        solve_all(solve, self.x[:2], 2)  # warm-up: CUDA context, kernel selection, caches
        _sync(self.x.device)
        t0 = time.perf_counter()
        out = solve_all(solve, self.x, self.s.batch_size)
        _sync(self.x.device)
        return out, time.perf_counter() - t0

    def clean(self) -> None:
        undef, t_undef = self._timed(self.solve_undefended)
        if self.defended:
            main, t_main = self._timed(self.solve_main)
        else:
            main, t_main = undef, t_undef
        self.clean_main = main
        n = len(self.x)
        self.clean_correct = main.logits.argmax(1) == self.y
        self.report.clean = CleanResult(
            n=n, accuracy=_mean(self.clean_correct),
            accuracy_undefended=_mean(undef.logits.argmax(1) == self.y),
            converged_fraction=_mean(main.converged),
            mean_iterations=float(main.iterations.float().mean()),
            seconds_per_sample=t_main / n, seconds_per_sample_undefended=t_undef / n,
            overhead_ratio=t_main / t_undef if t_undef > 0 else 1.0)

    def budget(self) -> None:
        if not self.model.is_deq:
            return
        default = self.model.config.solver.max_iter
        points = []
        for k in sorted(set(self.s.budgets) | {default}):
            r = solve_all(lambda xb, k=k: self.model.solve(xb, max_iter=k, trajectory=False),
                          self.x, self.s.batch_size)
            points.append(BudgetPoint(max_iter=k, accuracy=_mean(r.logits.argmax(1) == self.y),
                                      converged_fraction=_mean(r.converged),
                                      mean_iterations=float(r.iterations.float().mean()),
                                      is_default=k == default))
        self.report.budget = points
        at_default = next(p for p in points if p.is_default)
        largest = points[-1]
        if largest.accuracy < at_default.accuracy - _slack(len(self.x)):
            self._warn(f"accuracy drops with a larger solver budget: {at_default.accuracy:.3f} at "
                       f"the default {default} iterations, {largest.accuracy:.3f} at "
                       f"{largest.max_iter}; the DEQ is not settling to a useful fixed point")
        if at_default.converged_fraction < 0.5:
            self._warn(f"only {at_default.converged_fraction:.0%} of clean test inputs converge "
                       f"within the default budget of {default} iterations")

    def _spec(self, name: str, kind: str, *, eps: float | None = None, steps: int | None = None,
              **kw) -> AttackSpec:
        eps = self.s.eps if eps is None else eps
        steps = self.s.pgd_steps if steps is None else steps
        step_size = self.s.step_size if self.s.step_size is not None else default_step_size(
            eps, steps)
        if self.s.step_size is not None and steps != self.s.pgd_steps:
            step_size = self.s.step_size * self.s.pgd_steps / steps
        return AttackSpec(name=name, kind=kind, eps=eps, steps=steps, step_size=step_size,
                          restarts=self.s.pgd_restarts, **kw)

    def _attack(self, spec: AttackSpec, *, transfer: bool, record: bool = True,
                n: int | None = None) -> tuple[Tensor, Tensor]:
        """Craft on the undefended model (transfer) or the evaluated predictor; judge on both.

        `n` limits an unrecorded attack to the first n samples (the sweeps' `sweep_n`).
        """
        t0 = time.perf_counter()
        predict = self.predict_undefended if transfer else self.predict_main
        x, y = (self.x, self.y) if n is None or record else (self.x[:n], self.y[:n])
        x_adv, ok = run_attack(self.model, spec, x, y, predict,
                               defense=self.defense_cfg, batch_size=self.s.batch_size,
                               generator=self._generator())
        if self.defended and transfer:
            undef_ok, ok = ok, self.predict_main(x_adv) == y
        elif self.defended:
            undef_ok = self.predict_undefended(x_adv) == y
        else:
            undef_ok = ok
        if record:
            threat = ("transfer" if self.defended and transfer else
                      "adaptive" if spec.kind in ("bpda", "detector") else "white-box")
            self.report.attacks.append(AttackResult(
                name=spec.name, spec=spec.describe(), threat=threat, accuracy=_mean(ok),
                accuracy_undefended=_mean(undef_ok), n=len(ok),
                seconds=time.perf_counter() - t0))
            self.correct[spec.name] = ok
            self.x_adv[spec.name] = x_adv
            self.specs[spec.name] = spec
        return x_adv, ok

    def pgd_tasks(self) -> list[tuple[str, Callable[[], None]]]:
        paths = self.s.gradient_paths or gradient_paths(self.model)
        tasks = []
        for p in paths:
            spec = self._spec(f"pgd{self.s.pgd_steps}-{p}", "pgd", gradient=p)
            tasks.append((spec.name, lambda spec=spec: self._attack(spec, transfer=True)))
        if self.model.is_deq:
            for i, k in self.s.intermediate:
                tau = self.s.intermediate_tau
                tag = "M" if tau == 0.5 else "F" if tau == 1.0 else f"tau{tau}"
                spec = self._spec(f"{tag}unroll-{i}-{k}", "intermediate", state=i, unroll=k,
                                  tau=tau)
                tasks.append((spec.name, lambda spec=spec: self._attack(spec, transfer=True)))
        return tasks

    def primary_spec(self, *, eps: float | None = None, steps: int | None = None,
                     gradient: str | None = None) -> AttackSpec:
        """The attack the sweeps and the logistic detector use.

        On an undefended DEQ it goes through `gradient`, by default the checkpoint's training path
        (cheap, and the one the detector calibration is matched against).
        """
        k = self.s.pgd_steps if steps is None else steps
        if self.defended:
            path = (self.s.bpda_paths or ["exact"])[0]
            return self._spec(f"bpda-pgd{k}-{path}", "bpda", gradient=path, eps=eps, steps=k)
        path = (gradient or self.model.config.grad.mode) if self.model.is_deq else "direct"
        return self._spec(f"pgd{k}-{path}", "pgd", gradient=path, eps=eps, steps=k)

    def adaptive_tasks(self) -> list[tuple[str, Callable[[], None]]]:
        tasks = []
        if self.defended:
            for p in self.s.bpda_paths or ["exact"]:
                spec = self._spec(f"bpda-pgd{self.s.pgd_steps}-{p}", "bpda", gradient=p)
                tasks.append((spec.name, lambda spec=spec: self._attack(spec, transfer=False)))
        spec = self._spec(f"detector-adaptive-lam{self.s.detector_lambda:g}", "detector",
                          gradient="exact" if self.model.is_deq else "direct",
                          lam=self.s.detector_lambda)
        tasks.append((spec.name, lambda spec=spec: self._attack(spec, transfer=self.defended)))
        return tasks

    def sweeps(self) -> None:
        # Through the exact gradient by default: a sweep through the weak phantom path could
        # pass its checks while the stronger attacks behind the headline numbers mask.
        n = min(self.s.sweep_n or len(self.x), len(self.x))
        grad = self.s.sweep_gradient or "exact"
        base = self.primary_spec(gradient=grad)
        steps_pts, eps_pts = [], []
        for k in sorted(set(self.s.steps_sweep)):
            spec = self.primary_spec(steps=k, gradient=grad)
            _, ok = self._attack(spec, transfer=False, record=False, n=n)
            steps_pts.append(SweepPoint(value=k, accuracy=_mean(ok)))
        radii = sorted({self.s.eps * m for m in self.s.eps_sweep} | {self.s.large_eps})
        for e in radii:
            spec = self.primary_spec(eps=e, gradient=grad)
            _, ok = self._attack(spec, transfer=False, record=False, n=n)
            eps_pts.append(SweepPoint(value=e, accuracy=_mean(ok)))
        mono_steps = _monotone([p.accuracy for p in steps_pts], _slack(n))
        mono_eps = _monotone([p.accuracy for p in eps_pts], _slack(n))
        large = next(p.accuracy for p in eps_pts if p.value == self.s.large_eps)
        if not mono_steps:
            self._warn("robust accuracy rises with more PGD steps "
                       f"({[round(p.accuracy, 3) for p in steps_pts]}): gradient masking?")
        if not mono_eps:
            self._warn("robust accuracy rises with a larger eps "
                       f"({[round(p.accuracy, 3) for p in eps_pts]}): gradient masking?")
        if large > 0.05:
            self._warn(f"robust accuracy is still {large:.1%} at eps={self.s.large_eps}: the "
                       "attack does not reach ~0%, suspect gradient masking")
        self.report.sweeps = Sweeps(attack=base.name, steps=steps_pts, eps=eps_pts,
                                    monotone_steps=mono_steps, monotone_eps=mono_eps,
                                    large_eps_accuracy=large)

    def autoattack(self) -> None:
        from .autoattack import run_autoattack

        m = min(self.s.aa_n or len(self.x), len(self.x))
        grad = self.s.aa_gradient or "exact"
        module = (DefendedClassifier(self.model, self.defense_cfg, grad=grad) if self.defended
                  else _Logits(self.model, grad))
        res = run_autoattack(module, self.x[:m], self.y[:m], eps=self.s.eps,
                             num_classes=self.model.config.num_classes, seed=self.s.seed,
                             batch_size=self.s.batch_size, attacks=self.s.aa_attacks,
                             device=self.x.device)
        self.aa_correct, self.aa_x_adv = res.correct, res.x_adv
        self.report.autoattack = AutoAttackSection(
            version=self.s.aa_version, attacks=res.attacks, eps=self.s.eps, n=m,
            forward="defended (BPDA gradient)" if self.defended else "deterministic",
            gradient=grad if self.model.is_deq else "direct",
            accuracy=_mean(res.correct), accuracy_after=res.accuracy_after,
            seconds=res.seconds, warnings=res.warnings)
        for w in res.warnings:
            self._warn(f"AutoAttack: {w}")
        order = [k for k in res.accuracy_after if k != "clean"]
        if "square" in order and order.index("square") > 0:
            before = res.accuracy_after[order[order.index("square") - 1]]
            gain = before - res.accuracy_after["square"]
            if gain > _slack(m):
                self._warn(f"Square (black-box) lowered accuracy by {gain:.1%} beyond the "
                           "white-box attacks: their gradients are unreliable (masking?)")

    def combine(self) -> None:
        names = list(self.correct)
        flags = dict(self.correct)
        m = len(self.x)
        if self.report.autoattack is not None:
            m = self.report.autoattack.n
            flags = {k: v[:m] for k, v in flags.items()}
            flags["autoattack"] = self.aa_correct
            names.append("autoattack")
        if not flags:
            return
        wc = worst_case(flags)
        self.report.worst_case = WorstCase(accuracy=_mean(wc), attacks=names, n=m)
        if self.report.autoattack is not None and len(flags) > 1:
            pgd_wc = _mean(worst_case({k: v for k, v in flags.items() if k != "autoattack"}))
            if self.report.autoattack.accuracy < pgd_wc - _slack(m):
                self._warn(f"AutoAttack ({self.report.autoattack.accuracy:.3f}) beats the PGD "
                           f"worst case ({pgd_wc:.3f}): PGD alone would overstate robustness")
        if self.defended:
            def wc_of(threat: str) -> float | None:
                sel = {r.name: flags[r.name] for r in self.report.attacks if r.threat == threat}
                return _mean(worst_case(sel)) if sel else None

            self.report.defense = DefenseSummary(
                transfer_accuracy=wc_of("transfer"), adaptive_accuracy=wc_of("adaptive"),
                autoattack_accuracy=(self.report.autoattack.accuracy
                                     if self.report.autoattack else None),
                robust_accuracy=_mean(wc),
                overhead_ratio=self.report.clean.overhead_ratio if self.report.clean else 1.0)

    def detection(self) -> None:
        s, bs = self.s, self.s.batch_size
        assert self.clean_main is not None
        names = list(s.detect_scores)
        params: dict[str, dict] = {}
        val_clean = None
        if self.x_val is not None:
            val_clean = solve_all(self.solve_main, self.x_val, bs)
            if s.logistic:
                spec = self.primary_spec()
                x_adv, _ = run_attack(self.model, spec, self.x_val, self.y_val,
                                      self.predict_main, defense=self.defense_cfg,
                                      batch_size=bs, generator=self._generator())
                val_adv = solve_all(self.solve_main, x_adv, bs)
                params["logistic"] = fit_logistic(val_clean, val_adv)
                names.append("logistic")
        clean_scores = score_all(self.clean_main, names, s.early_index, params)
        learned = self._learned_scores()
        if learned is not None:
            clean_scores["learned_detector"] = learned(self.x)
        val_thresholds = None
        if val_clean is not None:
            from deqguard.models.detection_scores import calibrate_threshold

            val_scores = score_all(val_clean, names, s.early_index, params)
            if learned is not None:
                val_scores["learned_detector"] = learned(self.x_val)
            val_thresholds = {k: calibrate_threshold(v, s.fpr) for k, v in val_scores.items()}
        clean_ok = self.clean_correct.cpu().numpy()
        sets = dict(self.x_adv)
        if self.report.autoattack is not None:
            sets["autoattack"] = self.aa_x_adv
        det_attacks, trajs = [], [trajectory_summary("clean", self.clean_main)]
        for name, xa in sets.items():
            res = solve_all(self.solve_main, xa, bs)
            m = len(xa)
            fooled = (res.logits.argmax(1) != self.y[:m]).cpu().numpy()
            successful = clean_ok[:m] & fooled
            adv_scores = score_all(res, names, s.early_index, params)
            if learned is not None:
                adv_scores["learned_detector"] = learned(xa)
            det_attacks.append(detect_attack(name, clean_scores, adv_scores, successful, s.fpr,
                                             val_thresholds))
            mask = torch.from_numpy(successful) if successful.any() else torch.ones(m, dtype=bool)
            trajs.append(trajectory_summary(name, subset(res, mask.to(res.logits.device))))
        scored = names + (["learned_detector"] if learned is not None else [])
        section = DetectionSection(scores=scored, early_index=s.early_index, fpr=s.fpr,
                                   attacks=det_attacks, trajectories=trajs,
                                   logistic=params.get("logistic"))
        if val_clean is not None and s.calibration_score in names:
            want = self.primary_spec().name
            primary = next((a for a in det_attacks if a.attack == want), None)
            sc = primary.scores[s.calibration_score] if primary else None
            cal = calibrate(val_clean, s.calibration_score, s.fpr, early_index=s.early_index,
                            params=params.get(s.calibration_score),
                            auroc=sc.auroc if sc else None,
                            tpr=sc.tpr_at_val_threshold if sc else None,
                            attack=primary.attack if primary else None, eps=s.eps,
                            defense=s.defense,
                            defense_config=(self.defense_cfg.model_dump()
                                            if self.defense_cfg else None))
            section.calibration = cal.model_dump(mode="json")
            section.clean_test_fpr_at_val_threshold = float(
                np.mean(clean_scores[s.calibration_score] > cal.threshold))
        self.report.detection = section

    def selective(self) -> None:
        """Risk-coverage of the doubt scores and/or the selective calibration (selective.py)."""
        from .schema import SelectiveSettings
        from .selective import selective_section

        if self.defended:
            self._warn("the selective part measures the plain solve (what the server answers "
                       "selectively); it was skipped under --defense")
            return
        if self.x_val is None or self.y_val is None:
            raise ValueError("the selective part needs the validation split (x_val, y_val)")
        log = ((lambda m: print(m, file=sys.stderr, flush=True)) if self.progress
               else (lambda m: None))
        self.report.selective = selective_section(
            self.model, self.x, self.y, self.x_val, self.y_val,
            self.s.selective or SelectiveSettings(), measure="selective" in self.s.parts,
            eps=self.s.eps, batch_size=self.s.batch_size, seed=self.s.seed,
            sha256=self.ckpt.sha256, detector=self.learned_detector, log=log)

    def _learned_scores(self) -> Callable[[Tensor], np.ndarray] | None:
        """x -> the checkpoint's learned detector scores (its dynamics features per image)."""
        det = self.learned_detector
        if det is None or self.defended or not self.model.is_deq:
            return None
        from .detector_fit import compute_features, score_features

        return lambda x: score_features(det, compute_features(self.model, x, det.dynamics,
                                                              batch_size=self.s.batch_size))

    # -- driver ----------------------------------------------------------------------------------
    def _warn(self, msg: str) -> None:
        if msg not in self.report.warnings:
            self.report.warnings.append(msg)

    def plan(self) -> list[tuple[str, Callable[[], None]]]:
        parts = set(self.s.parts)
        tasks: list[tuple[str, Callable[[], None]]] = [("clean", self.clean)]
        if "budget" in parts:
            tasks.append(("budget", self.budget))
        if "pgd" in parts:
            tasks += self.pgd_tasks()
        if "adaptive" in parts or "detect" in parts:
            tasks += self.adaptive_tasks()
        if "pgd" in parts or "adaptive" in parts:
            tasks.append(("sweeps", self.sweeps))
        if "aa" in parts:
            tasks.append(("autoattack", self.autoattack))
        tasks.append(("worst case", self.combine))
        if "detect" in parts:
            tasks.append(("detection", self.detection))
        if "selective" in parts or (self.s.selective and self.s.selective.calibrate):
            tasks.append(("selective", self.selective))
        return tasks

    def run(self) -> EvalReport:
        from tqdm import tqdm

        t0 = time.perf_counter()
        tasks = self.plan()
        with tqdm(total=len(tasks), desc="eval", disable=not self.progress, unit="task") as bar:
            for label, fn in tasks:
                bar.set_postfix_str(label)
                fn()
                bar.update(1)
        self.report.seconds_total = time.perf_counter() - t0
        return self.report


def evaluate(model: Classifier, x: Tensor, y: Tensor, settings: EvalSettings, *,
             checkpoint: CheckpointInfo, x_val: Tensor | None = None,
             y_val: Tensor | None = None, progress: bool = True,
             learned_detector: Any = None) -> EvalReport:
    """Run every part of `settings.parts` on (x, y) and return the report.

    `learned_detector` (the checkpoint's LogisticDetector) adds its score, "learned_detector",
    to the detect part next to the trajectory scores and baselines (undefended DEQs only), and
    the "detector" doubt score and the detector-aware attack to the selective part.
    """
    ev = Evaluation(model, x, y, settings, checkpoint=checkpoint, x_val=x_val, y_val=y_val,
                    progress=progress)
    ev.learned_detector = learned_detector
    return ev.run()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _monotone(values: list[float], slack: float) -> bool:
    return all(b <= a + slack for a, b in zip(values, values[1:], strict=False))


def _mean(t: Tensor) -> float:
    return float(t.float().mean()) if t.numel() else float("nan")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version() -> str:
    from deqguard import __version__

    return __version__
