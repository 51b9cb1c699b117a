"""Checkpoints: bit-exact round trips, metadata, and a refusal for every kind of broken file.

Each broken file is a real file on disk, made the way it would break in practice (cut bytes,
flipped bytes, edited header), or written with the safetensors API with a correct hash so that
only the one problem under test is present.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deqguard.models import (
    CheckpointError,
    CheckpointMetadata,
    build_model,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    update_metadata,
)
from deqguard.models import checkpoint as ckpt_mod
from deqguard.models.checkpoint import FORMAT_VERSION, tensor_sha256

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", num_classes=3, width=8, head_width=8).eval()


@pytest.fixture
def saved(model, tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path, {
        "name": "unit", "classes": CLASSES,
        "input": {"channels": 1, "height": 28, "width": 28, "mean": [0.5], "std": [0.25]},
        "training": {"command": "deqguard train --preset tiny", "epochs": 3, "eps": 8 / 255},
        "metrics": {"clean_accuracy": 0.91, "pgd": {"steps": 10, "accuracy": 0.5}},
    })
    return path


def header_of(path: Path) -> tuple[dict, dict]:
    """(safetensors header metadata, deqguard metadata dict)."""
    with safe_open(str(path), framework="pt") as fh:
        extra = fh.metadata()
    return extra, json.loads(extra["deqguard"])


def rewrite(path: Path, out: Path, *, tensors=None, meta_edit=None, rehash=True) -> Path:
    """Write a variant of a checkpoint with the safetensors API."""
    t = load_file(str(path)) if tensors is None else tensors
    extra, meta = header_of(path)
    if meta_edit:
        meta_edit(meta)
    if rehash:
        meta["sha256"] = tensor_sha256(t)
    save_file(t, str(out), metadata={**extra, "deqguard": json.dumps(meta)})
    return out


def refuses(path: Path, pattern: str):
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(path, device="cpu")


# -- round trips ---------------------------------------------------------------------------------

def test_round_trip_is_bit_exact(model, saved):
    loaded, meta = load_checkpoint(saved, device="cpu")
    assert not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
        ra, rb = model.solve(x), loaded.solve(x)
    assert torch.equal(ra.entropy, rb.entropy) and torch.equal(ra.iterations, rb.iterations)
    assert loaded.config == model.config


def test_metadata_round_trip(model, saved):
    meta = read_metadata(saved)
    assert isinstance(meta, CheckpointMetadata)
    assert meta.format_version == FORMAT_VERSION
    assert meta.name == "unit" and meta.classes == CLASSES
    assert meta.model == model.config.model_dump(mode="json")
    assert (meta.input.channels, meta.input.height, meta.input.width) == (1, 28, 28)
    assert meta.input.mean == (0.5,) and meta.input.std == (0.25,)
    assert meta.input.value_range == (0.0, 1.0)
    assert meta.training == {"command": "deqguard train --preset tiny", "epochs": 3,
                             "eps": 8 / 255}
    assert meta.metrics["pgd"] == {"steps": 10, "accuracy": 0.5}
    assert meta.detection is None
    assert meta.created and meta.deqguard_version
    assert meta.sha256 == tensor_sha256(model.state_dict())
    _, loaded_meta = load_checkpoint(saved, device="cpu")
    assert loaded_meta == meta


def test_default_metadata_fills_classes_and_input(model, tmp_path):
    meta = save_checkpoint(model, tmp_path / "plain.safetensors")
    assert meta.classes == ["0", "1", "2"]
    assert (meta.input.channels, meta.input.height, meta.input.width) == (1, 28, 28)


def test_save_refuses_metadata_that_contradicts_the_model(model, tmp_path):
    with pytest.raises(CheckpointError, match="2 class names for a model with 3 classes"):
        save_checkpoint(model, tmp_path / "a.safetensors", {"classes": ["a", "b"]})
    with pytest.raises(CheckpointError, match="input spec 3x32x32 does not match"):
        save_checkpoint(model, tmp_path / "b.safetensors",
                        {"input": {"channels": 3, "height": 32, "width": 32}})
    assert not list(tmp_path.iterdir())


def test_update_metadata_keeps_tensors(model, saved):
    before = read_metadata(saved)
    detection = {"score": "entropy_auc", "threshold": 0.42, "fpr": 0.05}
    new = update_metadata(saved, detection=detection, metrics={"clean_accuracy": 0.9})
    assert new.detection == detection
    again = read_metadata(saved)
    assert again == new
    assert again.metrics == {"clean_accuracy": 0.9}
    assert (again.sha256, again.created, again.training) == (
        before.sha256, before.created, before.training)
    loaded, _ = load_checkpoint(saved, device="cpu")
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_update_metadata_refuses_writer_fields_and_bad_values(saved):
    for field, value in [("sha256", "0" * 64), ("model", {}), ("format_version", 2)]:
        with pytest.raises(CheckpointError, match=field):
            update_metadata(saved, **{field: value})
    with pytest.raises(CheckpointError, match="invalid metadata update"):
        update_metadata(saved, classes="not a list")
    assert read_metadata(saved).format_version == FORMAT_VERSION


def test_update_metadata_refuses_tampered_tensors(saved, tmp_path):
    broken = tmp_path / "flip.safetensors"
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0xFF
    broken.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fail their hash"):
        update_metadata(broken, metrics={})


# -- refusals ------------------------------------------------------------------------------------

def test_refuses_missing_file(tmp_path):
    refuses(tmp_path / "nope.safetensors", "checkpoint not found: .*nope.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        read_metadata(tmp_path / "nope.safetensors")


def test_refuses_directory(tmp_path):
    refuses(tmp_path, "not a file")


def test_refuses_random_bytes(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(os.urandom(4096))
    refuses(path, "not a safetensors file")


def test_refuses_text_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are not the weights you are looking for\n" * 20)
    refuses(path, "not a safetensors file")


def test_refuses_tiny_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"abc")
    refuses(path, "not a safetensors file .*too short")


def test_refuses_small_header_that_is_not_json(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 100)
    refuses(path, "not a safetensors file .*not JSON")


def test_refuses_pickle(model, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    refuses(path, "not a safetensors file")


def test_refuses_file_truncated_in_tensor_data(saved, tmp_path):
    path = tmp_path / "cut.safetensors"
    data = saved.read_bytes()
    path.write_bytes(data[:-100])
    refuses(path, "truncated: the header needs")


def test_refuses_file_truncated_in_header(saved, tmp_path):
    path = tmp_path / "cut_header.safetensors"
    path.write_bytes(saved.read_bytes()[:200])
    refuses(path, "header is truncated")


def test_refuses_safetensors_without_deqguard_metadata(model, tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "pt"})
    refuses(path, "not a deqguard checkpoint")


def test_refuses_missing_tensor(saved, tmp_path):
    tensors = load_file(str(saved))
    gone = next(k for k in tensors if k.startswith("cell."))
    del tensors[gone]
    refuses(rewrite(saved, tmp_path / "missing.safetensors", tensors=tensors),
            f"tensors do not match the model: missing \\['{gone}'\\]")


def test_refuses_extra_tensor(saved, tmp_path):
    tensors = load_file(str(saved))
    tensors["backdoor.weight"] = torch.zeros(3)
    refuses(rewrite(saved, tmp_path / "extra.safetensors", tensors=tensors),
            r"missing \[\], unexpected \['backdoor.weight'\]")


def test_refuses_tensor_of_wrong_shape(saved, tmp_path):
    tensors = load_file(str(saved))
    tensors["head.5.weight"] = torch.zeros(3, 9)
    refuses(rewrite(saved, tmp_path / "shape.safetensors", tensors=tensors),
            r"shapes do not match the model: \['head.5.weight: file \(3, 9\) vs model \(3, 8\)'")


def test_refuses_config_that_does_not_fit_the_tensors(saved, tmp_path):
    def widen(meta):
        meta["model"]["head_width"] = 16

    refuses(rewrite(saved, tmp_path / "config.safetensors", meta_edit=widen),
            "shapes do not match the model")


def test_refuses_tensor_of_wrong_dtype(saved, tmp_path):
    tensors = load_file(str(saved))
    tensors["head.5.bias"] = tensors["head.5.bias"].double()
    refuses(rewrite(saved, tmp_path / "dtype.safetensors", tensors=tensors),
            "dtypes do not match the model: .*head.5.bias: file torch.float64")


def test_refuses_flipped_byte_in_tensor_data(saved, tmp_path):
    path = tmp_path / "flipped.safetensors"
    data = bytearray(saved.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))
    refuses(path, "sha256 of the tensors is .*the file was altered or corrupted")


def test_refuses_edited_hash(saved, tmp_path):
    def forge(meta):
        meta["sha256"] = "0" * 64

    refuses(rewrite(saved, tmp_path / "hash.safetensors", meta_edit=forge, rehash=False),
            "metadata says 0000000000000000")


def test_refuses_unknown_format_version(saved, tmp_path):
    def future(meta):
        meta["format_version"] = 99

    path = rewrite(saved, tmp_path / "future.safetensors", meta_edit=future)
    refuses(path, "unknown checkpoint format version 99")
    with pytest.raises(CheckpointError, match="format version 99"):
        read_metadata(path)


def test_refuses_invalid_model_config(saved, tmp_path):
    def alien(meta):
        meta["model"]["arch"] = "transformer"

    refuses(rewrite(saved, tmp_path / "arch.safetensors", meta_edit=alien),
            "model config in its metadata is invalid")


# -- atomic writes -------------------------------------------------------------------------------

def test_write_leaves_no_temp_files_and_a_readable_mode(model, tmp_path):
    path = tmp_path / "sub" / "m.safetensors"
    save_checkpoint(model, path)
    save_checkpoint(model, path)  # overwrite in place
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("stage", ["fsync", "replace"])
def test_failed_write_keeps_the_old_checkpoint(model, saved, monkeypatch, stage):
    before = saved.read_bytes()

    def boom(*_args, **_kw):
        raise OSError(f"simulated failure in {stage}")

    monkeypatch.setattr(ckpt_mod.os, stage, boom)
    other = build_model("tiny", num_classes=3, width=8, head_width=8)
    with pytest.raises(OSError, match="simulated failure"):
        save_checkpoint(other, saved, {"classes": CLASSES})
    with pytest.raises(OSError, match="simulated failure"):
        update_metadata(saved, metrics={"x": 1})
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]
    load_checkpoint(saved, device="cpu")


def test_trained_config_reads_a_recorded_section_as_a_copy():
    meta = ckpt_mod.CheckpointMetadata(
        model={}, input={"channels": 1, "height": 28, "width": 28}, classes=["a", "b"],
        training={"config": {"eval": {"eps": 0.1}, "data": None}})
    section = meta.trained_config("eval")
    assert section == {"eps": 0.1}
    section["eps"] = 0.3
    assert meta.training["config"]["eval"] == {"eps": 0.1}
    assert meta.trained_config("data") == {} and meta.trained_config("optim") == {}
    assert ckpt_mod.CheckpointMetadata(model={}, input=meta.input, classes=["a"]
                                       ).trained_config("eval") == {}
