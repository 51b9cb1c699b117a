"""The torch backend: the checkpoint's own model, every solver, the entropy-reduction defense.

Also where the server pins torch's threads (`set_torch_threads`): BentoML does not, and an
unpinned server on a small box fights its own clients for cores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deqguard.models import load_checkpoint
from deqguard.models.anytime import SettleRule
from deqguard.models.defense import EntropyReductionConfig, entropy_reduction_solve
from deqguard.models.device import resolve_device

from .engine import ModelEngine
from .options import DEFAULT_SETTLE_ITERS, SolveOptions
from .traces import SampleTrace, split_batch


class TorchEngine(ModelEngine):
    """The checkpoint's own torch model: every solver, the entropy-reduction defense."""

    backend = "torch"

    def __init__(self, model: Any, meta: Any, *, device: str = "cpu", max_iter_cap: int = 100):
        super().__init__(meta, max_iter_cap=max_iter_cap)
        self.model = model.eval()
        self.device = device

    @classmethod
    def load(cls, checkpoint: str, *, device: str = "auto", threads: int = 1,
             max_iter_cap: int = 100) -> TorchEngine:
        set_torch_threads(threads)
        dev = resolve_device(device)
        model, meta = load_checkpoint(checkpoint, device=dev)
        return cls(model, meta, device=dev, max_iter_cap=max_iter_cap)

    @property
    def is_deq(self) -> bool:
        return bool(self.model.is_deq)

    def checkpoint_options(self, defense: str = "none") -> SolveOptions:
        cfg = getattr(self.model.config, "solver", None)
        max_iter = cfg.max_iter if cfg is not None else 1
        if defense == "entropy-reduction":
            er = EntropyReductionConfig()
            max_iter = er.rounds * er.solver_steps_per_round
        return SolveOptions(max_iter=max_iter, tol=cfg.tol if cfg is not None else 1e-3,
                            solver=cfg.solver if cfg is not None else "naive", defense=defense,
                            settle_iters=DEFAULT_SETTLE_ITERS if defense == "none" else 0)

    def _solve(self, x: np.ndarray, opts: SolveOptions,
               deadlines: np.ndarray | None) -> list[SampleTrace]:
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
        return split_batch(r)

    def _defended(self, xt: torch.Tensor, opts: SolveOptions) -> list[SampleTrace]:
        """Sample by sample: the defense's rounds are aligned across a batch, so a sample's
        trajectory rows would otherwise be padded to its batch mates' per-round step counts."""
        cfg = EntropyReductionConfig()
        out = []
        reps = 2 if self.pair_singles else 1
        for i in range(xt.shape[0]):
            pair = xt[i:i + 1].repeat(reps, 1, 1, 1)  # as a pair: see `trace`
            r = entropy_reduction_solve(self.model, pair, cfg, solver=opts.solver,
                                        max_iter=opts.max_iter, tol=opts.tol, trajectory=True)
            out += split_batch(r)[:1]
        return out


def set_torch_threads(threads: int) -> None:
    """Pin intra-op threads explicitly: BentoML does not, and an unpinned server on a small box
    fights its own clients for cores."""
    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(max(1, min(int(threads), 4)))
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass
