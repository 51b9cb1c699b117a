"""Cheap adversarial training: the single-step objectives, the overfitting guard, the one-cycle
schedule."""

from __future__ import annotations

import pytest
import torch

from deqguard.models import build_model
from deqguard.training.attacks import fgsm_rs, n_fgsm
from deqguard.training.config import ObjectiveConfig, build_config
from deqguard.training.objectives import TrainForward, objective_loss
from deqguard.training.overfit_guard import catastrophic_overfitting

torch.set_num_threads(1)
EPS = 0.1


@pytest.fixture()
def batch(pattern_data):
    x, y = pattern_data
    return torch.from_numpy(x[:32]), torch.from_numpy(y[:32])


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("tiny", num_classes=4, width=8, head_width=16)


def _loss(model, kind, x, y, *, regulated=True, clean_weight=0.0, seed=0):
    fwd = TrainForward(model, solver="anderson", max_iter=6, tol=1e-3, readout="unrolled",
                       random_depth=regulated, generator=torch.Generator().manual_seed(seed))
    step = 1.25 * EPS if kind == "fgsm-rs" else EPS
    cfg = ObjectiveConfig(kind=kind, eps=EPS, step_size=step, noise=2.0,
                          clean_weight=clean_weight)
    torch.manual_seed(seed)
    return objective_loss(cfg, fwd, x, y, noise=torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("kind", ["fgsm-rs", "n-fgsm"])
@pytest.mark.parametrize(("regulated", "clean_weight"), [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_single_step_objective_lowers_its_loss(batch, kind, regulated, clean_weight):
    """Same seeds before and after one SGD step: the robust loss itself goes down."""
    x, y = batch
    model = _model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = _loss(model, kind, x, y, regulated=regulated, clean_weight=clean_weight)
    opt.zero_grad()
    before.loss.backward()
    opt.step()
    after = _loss(model, kind, x, y, regulated=regulated, clean_weight=clean_weight)
    assert float(after.loss.detach()) < float(before.loss.detach())
    assert (before.clean_logits is not None) == (clean_weight > 0)


def test_fgsm_rs_stays_in_the_ball_and_moves(batch):
    x, y = batch
    model = _model().eval()
    x_adv = fgsm_rs(model, x, y, eps=EPS, step_size=1.25 * EPS,
                    generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    # the gradient step, not only the noise: most pixels that can move end on the ball's surface
    interior = (x > EPS) & (x < 1 - EPS)
    on_surface = ((x_adv - x).abs() > EPS - 1e-6) & interior
    assert float(on_surface.sum()) > 0.5 * float(interior.sum())


def test_n_fgsm_is_bounded_by_noise_plus_step_and_not_projected(batch):
    x, y = batch
    model = _model().eval()
    x_adv = n_fgsm(model, x, y, eps=EPS, step_size=EPS, noise=2.0,
                   generator=torch.Generator().manual_seed(0))
    delta = (x_adv - x).abs()
    assert float(delta.max()) <= 3 * EPS + 1e-6
    assert float(delta.max()) > 1.5 * EPS  # no projection back to the eps-ball
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def _epoch(epoch, val_pgd, train_adv):
    return {"epoch": epoch, "val_pgd_accuracy": val_pgd, "train_adv_accuracy": train_adv}


def test_overfitting_guard_fires_when_pgd_collapses_as_the_training_attack_gets_easy():
    history = [_epoch(1, 0.45, 0.40), _epoch(2, 0.52, 0.47), _epoch(3, 0.20, 0.80)]
    why = catastrophic_overfitting(history, drop=0.2)
    assert why is not None and "epoch 3" in why and "epoch 2" in why


@pytest.mark.parametrize("history", [
    [_epoch(1, 0.45, 0.40)],                                            # nothing to compare
    [_epoch(1, 0.45, 0.40), _epoch(2, 0.52, 0.47), _epoch(3, 0.49, 0.55)],  # a small dip
    [_epoch(1, 0.45, 0.60), _epoch(2, 0.52, 0.65), _epoch(3, 0.20, 0.30)],  # both fell: not CO
])
def test_overfitting_guard_stays_quiet_otherwise(history):
    assert catastrophic_overfitting(history, drop=0.2) is None


def test_trainer_stops_and_restores_the_best_epoch_on_overfitting(pattern_idx_dir, tmp_path,
                                                                  monkeypatch):
    """The metric history is fabricated (patched validation), not trained into collapse."""
    from deqguard.training.loop import Trainer, train

    fabricated = iter([(0.5, 0.2), (0.1, 0.9), (0.5, 0.2), (0.5, 0.2)])  # (val PGD, train adv)
    real_epoch = Trainer.run_epoch

    def run_epoch(self):
        entry = real_epoch(self)
        entry["val_pgd_accuracy"], entry["train_adv_accuracy"] = next(fabricated)
        return entry

    monkeypatch.setattr(Trainer, "run_epoch", run_epoch)
    cfg = build_config("fashion-small-regulated", [
        "data.dataset=fashion-mnist", f"data.data_dir={pattern_idx_dir}", "data.val_size=64",
        "data.limit=64", "model.overrides={width: 8, head_width: 16, stem_stride: 4}",
        "train.batch_size=32", "train.epochs=4", "train.progress=false", "solver.max_iter=3",
        "eval.val_limit=8", "eval.test_limit=8", "jacobian.weight=0"])
    result = train(cfg, out_dir=tmp_path / "run", argv=["test"])
    log = (tmp_path / "run" / "train_log.jsonl").read_text()
    assert '"event": "overfitting"' in log and '"restored_epoch": 1' in log
    assert result.metrics["best_epoch"] == 1
    from deqguard.models import load_checkpoint

    last, _ = load_checkpoint(tmp_path / "run" / "last.safetensors")
    best, _ = load_checkpoint(tmp_path / "run" / "best.safetensors")
    for (name, a), b in zip(last.state_dict().items(), best.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_one_cycle_rises_to_lr_then_falls_to_min_lr(pattern_idx_dir, tmp_path):
    from deqguard.training.loop import Trainer

    cfg = build_config("fashion-small-regulated", [
        f"data.data_dir={pattern_idx_dir}", "data.val_size=64", "data.limit=128",
        "model.overrides={width: 8, head_width: 16, stem_stride: 4}", "train.batch_size=32",
        "train.epochs=5", "optim.lr=0.01", "optim.min_lr=1e-5", "optim.warmup_fraction=0.3"])
    trainer = Trainer(cfg, out_dir=tmp_path / "run", argv=["test"])
    lrs = []
    for _ in range(trainer.steps_per_epoch * cfg.train.epochs):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert lrs[peak] == pytest.approx(0.01, rel=0.1)
    assert 0.2 * len(lrs) <= peak <= 0.4 * len(lrs)
    assert lrs[0] < 0.01 / 10 and lrs[-1] < 0.01 / 10 and min(lrs) > 0
