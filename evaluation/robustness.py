"""The robustness parts of an evaluation: clean accuracy and timing, the solver budget, PGD and
the intermediate-state attacks, adaptive attacks, gradient-masking sweeps, AutoAttack, and the
per-sample worst case over all of them (the headline robust accuracy)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from deqguard.models.classifier import Classifier, SolveResult
from deqguard.models.config import GradMode
from deqguard.models.defense import DefendedClassifier

from .attacks import gradient_paths, path_logits, worst_case
from .detection import solve_all
from .per_sample import bits
from .schema import (
    AutoAttackSection,
    BudgetPoint,
    CleanResult,
    DefenseSummary,
    EarlierAutoAttack,
    SweepPoint,
    Sweeps,
    WorstCase,
)
from .state import EvalState, mean, monotone, slack

Task = tuple[str, Callable[[], None]]


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


def _timed(ev: EvalState, solve: Callable[[Tensor], SolveResult]) -> tuple[SolveResult, float]:
    solve_all(solve, ev.x[:2], 2)  # warm-up: CUDA context, kernel selection, caches
    _sync(ev.x.device)
    t0 = time.perf_counter()
    out = solve_all(solve, ev.x, ev.s.batch_size)
    _sync(ev.x.device)
    return out, time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clean(ev: EvalState) -> None:
    undef, t_undef = _timed(ev, ev.solve_undefended)
    if ev.defended:
        main, t_main = _timed(ev, ev.solve_main)
    else:
        main, t_main = undef, t_undef
    ev.clean_main = main
    n = len(ev.x)
    ev.clean_correct = main.logits.argmax(1) == ev.y
    ev.report.clean = CleanResult(
        n=n, accuracy=mean(ev.clean_correct),
        accuracy_undefended=mean(undef.logits.argmax(1) == ev.y),
        converged_fraction=mean(main.converged),
        mean_iterations=float(main.iterations.float().mean()),
        seconds_per_sample=t_main / n, seconds_per_sample_undefended=t_undef / n,
        overhead_ratio=t_main / t_undef if t_undef > 0 else 1.0, correct=bits(ev.clean_correct))


def budget(ev: EvalState) -> None:
    if not ev.model.is_deq:
        return
    default = ev.model.config.solver.max_iter
    points = []
    for k in sorted(set(ev.s.budgets) | {default}):
        r = solve_all(lambda xb, k=k: ev.model.solve(xb, max_iter=k, trajectory=False),
                      ev.x, ev.s.batch_size)
        points.append(BudgetPoint(max_iter=k, accuracy=mean(r.logits.argmax(1) == ev.y),
                                  converged_fraction=mean(r.converged),
                                  mean_iterations=float(r.iterations.float().mean()),
                                  is_default=k == default))
    ev.report.budget = points
    at_default = next(p for p in points if p.is_default)
    largest = points[-1]
    if largest.accuracy < at_default.accuracy - slack(len(ev.x)):
        ev.warn(f"accuracy drops with a larger solver budget: {at_default.accuracy:.3f} at "
                f"the default {default} iterations, {largest.accuracy:.3f} at "
                f"{largest.max_iter}; the DEQ is not settling to a useful fixed point")
    if at_default.converged_fraction < 0.5:
        ev.warn(f"only {at_default.converged_fraction:.0%} of clean test inputs converge "
                f"within the default budget of {default} iterations")


def pgd_tasks(ev: EvalState) -> list[Task]:
    paths = ev.s.gradient_paths or gradient_paths(ev.model)
    tasks = []
    for p in paths:
        spec = ev.spec(f"pgd{ev.s.pgd_steps}-{p}", "pgd", gradient=p)
        tasks.append((spec.name, lambda spec=spec: ev.attack(spec, transfer=True)))
    if ev.model.is_deq:
        for i, k in ev.s.intermediate:
            tau = ev.s.intermediate_tau
            tag = "M" if tau == 0.5 else "F" if tau == 1.0 else f"tau{tau}"
            spec = ev.spec(f"{tag}unroll-{i}-{k}", "intermediate", state=i, unroll=k, tau=tau)
            tasks.append((spec.name, lambda spec=spec: ev.attack(spec, transfer=True)))
    return tasks


def adaptive_tasks(ev: EvalState) -> list[Task]:
    tasks = []
    if ev.defended:
        for p in ev.s.bpda_paths or ["exact"]:
            spec = ev.spec(f"bpda-pgd{ev.s.pgd_steps}-{p}", "bpda", gradient=p)
            tasks.append((spec.name, lambda spec=spec: ev.attack(spec, transfer=False)))
    spec = ev.spec(f"detector-adaptive-lam{ev.s.detector_lambda:g}", "detector",
                   gradient="exact" if ev.model.is_deq else "direct",
                   lam=ev.s.detector_lambda)
    tasks.append((spec.name, lambda spec=spec: ev.attack(spec, transfer=ev.defended)))
    return tasks


def sweeps(ev: EvalState) -> None:
    # Through the exact gradient by default: a sweep through the weak phantom path could
    # pass its checks while the stronger attacks behind the headline numbers mask.
    n = min(ev.s.sweep_n or len(ev.x), len(ev.x))
    grad = ev.s.sweep_gradient or "exact"
    base = ev.primary_spec(gradient=grad)
    steps_pts, eps_pts = [], []
    for k in sorted(set(ev.s.steps_sweep)):
        spec = ev.primary_spec(steps=k, gradient=grad)
        _, ok = ev.attack(spec, transfer=False, record=False, n=n)
        steps_pts.append(SweepPoint(value=k, accuracy=mean(ok)))
    radii = sorted({ev.s.eps * m for m in ev.s.eps_sweep} | {ev.s.large_eps})
    for e in radii:
        spec = ev.primary_spec(eps=e, gradient=grad)
        _, ok = ev.attack(spec, transfer=False, record=False, n=n)
        eps_pts.append(SweepPoint(value=e, accuracy=mean(ok)))
    mono_steps = monotone([p.accuracy for p in steps_pts], slack(n))
    mono_eps = monotone([p.accuracy for p in eps_pts], slack(n))
    large = next(p.accuracy for p in eps_pts if p.value == ev.s.large_eps)
    if not mono_steps:
        ev.warn("robust accuracy rises with more PGD steps "
                f"({[round(p.accuracy, 3) for p in steps_pts]}): gradient masking?")
    if not mono_eps:
        ev.warn("robust accuracy rises with a larger eps "
                f"({[round(p.accuracy, 3) for p in eps_pts]}): gradient masking?")
    if large > 0.05:
        ev.warn(f"robust accuracy is still {large:.1%} at eps={ev.s.large_eps}: the "
                "attack does not reach ~0%, suspect gradient masking")
    ev.report.sweeps = Sweeps(attack=base.name, steps=steps_pts, eps=eps_pts,
                              monotone_steps=mono_steps, monotone_eps=mono_eps,
                              large_eps_accuracy=large)


def autoattack(ev: EvalState) -> None:
    from .autoattack import run_autoattack

    m = min(ev.s.aa_n or len(ev.x), len(ev.x))
    grad = ev.s.aa_gradient or "exact"
    module = (DefendedClassifier(ev.model, ev.defense_cfg, grad=grad) if ev.defended
              else _Logits(ev.model, grad))
    earlier = ev.aa_earlier
    res = run_autoattack(module, ev.x[:m], ev.y[:m], eps=ev.s.eps,
                         num_classes=ev.model.config.num_classes, seed=ev.s.seed,
                         batch_size=ev.s.batch_size, attacks=ev.s.aa_attacks,
                         device=ev.x.device,
                         done=earlier.correct_after if earlier else None,
                         done_seconds=earlier.seconds if earlier else None)
    source = None
    if earlier is not None:
        differs = int((earlier.correct_after["clean"].to(res.correct.device)
                       != res.correct_after["clean"]).sum())
        source = EarlierAutoAttack(report=earlier.report, created=earlier.created,
                                   stages=earlier.stages, clean_differs=differs)
        if differs:
            ev.warn(f"--aa-from: {differs} images are classified otherwise clean than in "
                    f"{earlier.report} (another machine's arithmetic?); the stages run here "
                    "attacked only images both runs got right")
    ev.aa_correct, ev.aa_x_adv = res.correct, res.x_adv
    ev.report.autoattack = AutoAttackSection(
        version=ev.s.aa_version, attacks=res.attacks, eps=ev.s.eps, n=m,
        forward="defended (BPDA gradient)" if ev.defended else "deterministic",
        gradient=grad if ev.model.is_deq else "direct",
        accuracy=mean(res.correct), accuracy_after=res.accuracy_after,
        correct_after={k: bits(v) for k, v in res.correct_after.items()},
        seconds=res.seconds, warnings=list(dict.fromkeys([*(earlier.warnings if earlier else []),
                                                     *res.warnings])),
        earlier=source)
    for w in res.warnings:
        ev.warn(f"AutoAttack: {w}")
    order = [k for k in res.accuracy_after if k != "clean"]
    if "square" in order and order.index("square") > 0:
        before = res.accuracy_after[order[order.index("square") - 1]]
        gain = before - res.accuracy_after["square"]
        if gain > slack(m):
            ev.warn(f"Square (black-box) lowered accuracy by {gain:.1%} beyond the "
                    "white-box attacks: their gradients are unreliable (masking?)")


def combine(ev: EvalState) -> None:
    """The per-sample worst case over every recorded attack and AutoAttack."""
    names = list(ev.correct)
    flags = dict(ev.correct)
    m = len(ev.x)
    if ev.report.autoattack is not None:
        m = ev.report.autoattack.n
        flags = {k: v[:m] for k, v in flags.items()}
        flags["autoattack"] = ev.aa_correct
        names.append("autoattack")
    if not flags:
        return
    wc = worst_case(flags)
    ev.report.worst_case = WorstCase(accuracy=mean(wc), attacks=names, n=m, correct=bits(wc))
    if ev.report.autoattack is not None and len(flags) > 1:
        pgd_wc = mean(worst_case({k: v for k, v in flags.items() if k != "autoattack"}))
        if ev.report.autoattack.accuracy < pgd_wc - slack(m):
            ev.warn(f"AutoAttack ({ev.report.autoattack.accuracy:.3f}) beats the PGD "
                    f"worst case ({pgd_wc:.3f}): PGD alone would overstate robustness")
    if ev.defended:
        def wc_of(threat: str) -> float | None:
            sel = {r.name: flags[r.name] for r in ev.report.attacks if r.threat == threat}
            return mean(worst_case(sel)) if sel else None

        ev.report.defense = DefenseSummary(
            transfer_accuracy=wc_of("transfer"), adaptive_accuracy=wc_of("adaptive"),
            autoattack_accuracy=(ev.report.autoattack.accuracy
                                 if ev.report.autoattack else None),
            robust_accuracy=mean(wc),
            overhead_ratio=ev.report.clean.overhead_ratio if ev.report.clean else 1.0)
