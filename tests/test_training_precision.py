"""`train.amp` and `train.channels_last`: the bf16 path on any CPU, its refusal, fp32.

The CPU detection is overridden with DEQGUARD_CPU_BF16 (force / off), so every test here runs the
same way on a CPU with or without AMX-BF16 / AVX512-BF16.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import env_seed
from test_training_run import tiny_args, tiny_config

from deqguard.cli import main
from deqguard.models import load_checkpoint
from deqguard.models.errors import DeqguardError
from deqguard.training import precision
from deqguard.training.config import config_differences
from deqguard.training.epoch import _Tally
from deqguard.training.loop import Trainer
from deqguard.training.seeds import EpochBatches
from deqguard.training.validation import validate

ENV = precision.ENV


def _first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def _fixed_batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    sampler = EpochBatches(len(trainer.train_set), trainer.cfg.train.batch_size, seed=0, epoch=0)
    return next(iter(trainer._train_batches(sampler)))


def _conv_dtypes(trainer: Trainer) -> list[torch.dtype]:
    """Records the output dtype of the model's first convolution on every call."""
    seen: list[torch.dtype] = []
    _first_conv(trainer.model).register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


def test_detection_reads_torch_then_proc_cpuinfo(monkeypatch, tmp_path):
    """Each source is used when the one before it is missing, and says no without the flags."""
    precision.cpu_native_bf16.cache_clear()
    monkeypatch.setattr(precision, "_torch_capabilities",
                        lambda: {"avx512_f": True, "avx512_bf16": False, "amx_bf16": True})
    assert precision.cpu_native_bf16()
    precision.cpu_native_bf16.cache_clear()
    monkeypatch.setattr(precision, "_torch_capabilities",
                        lambda: {"avx512_f": True, "avx512_bf16": False, "amx_bf16": False})
    assert not precision.cpu_native_bf16()
    # torch 2.11 to 2.13: no capability map, the private probes
    monkeypatch.setattr(precision, "_torch_capabilities", lambda: None)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    precision.cpu_native_bf16.cache_clear()
    assert precision.cpu_native_bf16()
    # neither: the flags of /proc/cpuinfo
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    info, read_flags = tmp_path / "cpuinfo", precision._cpuinfo_flags
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: read_flags(info))
    for flags, want in (("fpu avx512f avx512_vnni", False), ("fpu avx512f avx512_bf16", True),
                        ("fpu amx_tile amx_bf16", True)):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        precision.cpu_native_bf16.cache_clear()
        assert precision.cpu_native_bf16() is want, flags
    info.unlink()
    precision.cpu_native_bf16.cache_clear()
    assert precision.cpu_native_bf16() is False
    precision.cpu_native_bf16.cache_clear()


def test_detection_on_this_cpu_matches_its_flags():
    """torch's answer agrees with the kernel's flags (where Linux lists them)."""
    precision.cpu_native_bf16.cache_clear()
    flags = precision._cpuinfo_flags()
    if flags is None or not {"avx512f", "avx2", "fpu"} & flags:
        pytest.skip("no x86 /proc/cpuinfo here")
    assert precision.cpu_native_bf16() is bool({"amx_bf16", "avx512_bf16"} & flags)


def test_choose_precision_and_the_override(monkeypatch):
    monkeypatch.setenv(ENV, "force")
    assert precision.choose_precision("auto", "cpu").bf16
    assert precision.choose_precision("bf16", "cpu").bf16
    assert not precision.choose_precision("off", "cpu").bf16
    assert precision.choose_precision("auto", "cuda").bf16
    monkeypatch.setenv(ENV, "off")
    auto = precision.choose_precision("auto", "cpu")
    assert not auto.bf16 and auto.label == "fp32" and "AVX512-BF16" in auto.note
    assert precision.choose_precision("off", "cpu").note is None
    assert precision.choose_precision("bf16", "cuda").bf16  # the CPU override is for CPUs
    bench = precision.choose_precision("bf16", "cpu", emulate=True)
    assert bench.bf16 and (bench.emulated or precision.cpu_native_bf16())
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(DeqguardError, match="force, off or auto"):
        precision.choose_precision("auto", "cpu")


def test_bf16_training_steps_learn_and_keep_fp32_weights(pattern_idx_dir, tmp_path, monkeypatch,
                                                        capsys):
    """bf16 autocast really runs (bf16 convolutions), the loss on one fixed batch falls over 20
    steps, and parameters, optimizer state and the checkpoint stay float32."""
    monkeypatch.setenv(ENV, "force")
    cfg = tiny_config(pattern_idx_dir, "train.amp=bf16", f"train.seed={env_seed()}",
                      "optim.lr=3e-3", "train.epochs=2")
    trainer = Trainer(cfg, out_dir=tmp_path / "run", argv=["x"])
    assert trainer.amp and trainer.precision.label in ("bf16", "bf16-emulated")
    x, y = _fixed_batch(trainer)
    dtypes = _conv_dtypes(trainer)
    tally = _Tally()
    losses = [trainer.train_step(x, y, tally) for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    state = trainer.optimizer.state_dict()["state"]
    assert state and {t.dtype for s in state.values() for k, t in s.items() if k != "step"} \
        == {torch.float32}
    trainer.epoch = 1
    meta = trainer._metadata({})
    assert meta["training"]["bf16_autocast"] is True
    assert meta["training"]["precision"] == trainer.precision.label
    from deqguard.models import save_checkpoint
    save_checkpoint(trainer.model, tmp_path / "m.safetensors", meta)
    model, _ = load_checkpoint(tmp_path / "m.safetensors", device="cpu")
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} \
        == {torch.float32}
    capsys.readouterr()


def test_bf16_is_refused_on_a_cpu_without_bf16(pattern_idx_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV, "off")
    assert main(tiny_args(pattern_idx_dir, tmp_path / "run", "--set", "train.amp=bf16",
                          epochs=1)) == 2
    err = capsys.readouterr().err
    assert "AMX / AVX512-BF16" in err and "train.amp=auto" in err and "train.amp=off" in err
    assert not (tmp_path / "run").exists()


def test_auto_on_a_cpu_without_bf16_trains_in_fp32_and_says_why(pattern_idx_dir, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setenv(ENV, "off")
    trainer = Trainer(tiny_config(pattern_idx_dir, "train.amp=auto"), out_dir=tmp_path / "r",
                      argv=["x"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "training in fp32" in line]
    assert len(lines) == 1 and lines[0].startswith("deqguard train: this CPU has no AMX")
    assert not trainer.amp and trainer.precision.label == "fp32"
    dtypes = _conv_dtypes(trainer)
    trainer.train_step(*_fixed_batch(trainer), _Tally())
    assert dtypes and set(dtypes) == {torch.float32}
    assert trainer._metadata({})["training"]["bf16_autocast"] is False
    # asked for fp32 outright, nothing to explain
    Trainer(tiny_config(pattern_idx_dir, "train.amp=off"), out_dir=tmp_path / "r2", argv=["x"])
    assert "fp32" not in capsys.readouterr().err


def test_channels_last_model_and_batches(pattern_idx_dir, tmp_path, monkeypatch):
    """Weights and the batch a step computes on are channels_last. With one channel both formats
    are the same strides, so the model is given 3 input channels and the batch repeated to 3."""
    monkeypatch.setenv(ENV, "off")
    trainer = Trainer(tiny_config(pattern_idx_dir, "train.channels_last=true",
                                  "model.overrides.in_channels=3"),
                      out_dir=tmp_path / "r", argv=["x"])
    conv = _first_conv(trainer.model)
    assert conv.in_channels == 3 and not conv.weight.is_contiguous()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    inputs: list[torch.Tensor] = []
    conv.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    x, y = _fixed_batch(trainer)
    x = x.repeat(1, 3, 1, 1)
    assert x.is_contiguous()  # given in the default format...
    trainer.train_step(x, y, _Tally())
    assert inputs and inputs[0].is_contiguous(memory_format=torch.channels_last)  # ...converted
    assert not inputs[0].is_contiguous()
    assert trainer._metadata({})["training"]["channels_last"] is True


def test_a_resume_state_from_before_an_added_field_still_matches():
    """Resume states written before a field existed ran with its recorded old value: no
    difference at that value, a reported one at another."""
    old = {"train": {"epochs": 2}}
    assert config_differences(old, {"train": {"epochs": 2}, "rectifier": {"weight": 0.0}}) == []
    assert config_differences(old, {"train": {"epochs": 2}, "rectifier": {"weight": 0.5}}) == [
        "rectifier.weight: 0.0 -> 0.5"]


def test_the_memory_format_may_change_on_resume_the_precision_may_not():
    """channels_last picks other kernels, like the device; bf16 is other arithmetic."""
    old = {"train": {"epochs": 2, "amp": "off"}}
    assert config_differences(old, {"train": {"epochs": 2, "amp": "off",
                                              "channels_last": True}}) == []
    assert config_differences(old, {"train": {"epochs": 2, "amp": "bf16",
                                              "channels_last": True}}) == [
        "train.amp: 'off' -> 'bf16'"]


def test_resuming_in_another_precision_is_reported(pattern_idx_dir, tmp_path, monkeypatch,
                                                   capsys):
    """train.amp=auto can resolve to bf16 on one machine and fp32 on another: say so."""
    monkeypatch.setenv(ENV, "force")
    out = tmp_path / "run"
    assert main(tiny_args(pattern_idx_dir, out, epochs=1)) == 0
    capsys.readouterr()
    monkeypatch.setenv(ENV, "off")
    cfg = tiny_config(pattern_idx_dir, "train.epochs=1")
    Trainer(cfg, out_dir=out, resume=True, argv=["x"])
    err = capsys.readouterr().err
    assert "started with bf16 autocast on and continues with it off" in err


def test_validation_of_a_bf16_run_solves_in_fp32(pattern_idx_dir, tmp_path, monkeypatch, capsys):
    """The epoch's validation numbers are those of the fp32 solve that serving runs, not of a bf16
    one (whose residual cannot meet the solver's tolerance): recomputed here in fp32 from the
    epoch's checkpoint, they agree."""
    monkeypatch.setenv(ENV, "force")
    cfg = tiny_config(pattern_idx_dir, "train.amp=bf16", "train.epochs=1", "eval.steps=0")
    trainer = Trainer(cfg, out_dir=tmp_path / "run", argv=["x"])
    assert trainer.amp
    trainer.run()
    row = next(r for r in map(json.loads, (tmp_path / "run" / "train_log.jsonl").read_text()
                               .splitlines()) if r.get("epoch") == 1)
    model, _ = load_checkpoint(tmp_path / "run" / "last.safetensors", device="cpu")
    fp32 = validate(model, trainer._eval_loader(trainer.val_set), eps=0.0, step_size=0.0, steps=0,
                    device=torch.device("cpu"))
    assert row["val_mean_iterations"] == pytest.approx(fp32["mean_iterations"])
    assert row["val_converged_fraction"] == pytest.approx(fp32["converged_fraction"])
    assert row["val_clean_accuracy"] == pytest.approx(fp32["clean_accuracy"])
    capsys.readouterr()


def test_validation_runs_without_tf32_and_restores_it(tiny_checkpoint):
    """TF32 (a GPU's default for convolutions) is off while validation solves and attacks, and
    back as it was afterwards; the flags are settable without a GPU, so this runs anywhere."""
    model, _ = load_checkpoint(tiny_checkpoint, device="cpu")
    seen: list[tuple[bool, bool]] = []
    model.register_forward_pre_hook(lambda m, a: seen.append(
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)))
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        x = torch.rand(4, 1, 28, 28)
        y = torch.arange(4)
        validate(model, [(x, y)], eps=0.1, step_size=0.05, steps=1, device=torch.device("cpu"))
        assert seen and set(seen) == {(False, False)}
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (
            True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_validation_keeps_per_image_outcomes_only_when_asked(tiny_checkpoint):
    """`per_image`: which images were right, in the loaders' order across batches, and the same
    counts as without it; without it the numbers carry no outcome (training logs stay small)."""
    model, meta = load_checkpoint(tiny_checkpoint, device="cpu")
    x, y = torch.rand(10, 1, 28, 28), torch.arange(10) % len(meta.classes)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    kw = {"eps": 0.1, "step_size": 0.05, "steps": 2, "device": torch.device("cpu")}
    plain = validate(model, batches, **kw, generator=torch.Generator().manual_seed(0))
    kept = validate(model, batches, **kw, generator=torch.Generator().manual_seed(0),
                    per_image=True)
    assert "clean_correct" not in plain and "pgd_correct" not in plain
    assert {k: v for k, v in kept.items() if not k.endswith("_correct")} == plain
    with torch.no_grad():
        assert torch.equal(kept["clean_correct"], model(x).argmax(1) == y)
    assert kept["pgd_correct"].shape == (10,)
    assert kept["pgd_correct"].float().mean().item() == pytest.approx(plain["pgd_accuracy"])
