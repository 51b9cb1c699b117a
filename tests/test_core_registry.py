"""The model registry: every architecture is listed and builds, a new one needs one module, and
the table refuses what would change what an existing name or checkpoint builds."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Literal

import pytest
import torch
from torch import Tensor, nn

import deqguard.models as models_pkg
from deqguard.models import (
    PRESETS,
    Classifier,
    ModelConfig,
    build_model,
    get_model,
    list_models,
    load_checkpoint,
    parse_model_config,
    register_model,
    resolve_config,
    save_checkpoint,
)
from deqguard.models import registry as registry_mod
from deqguard.models.classifier import FeedForwardClassifier


def architecture_configs() -> list[type[ModelConfig]]:
    """Every config class with a fixed `arch` in any module of deqguard.models, found by walking
    the package, not by asking the registry."""
    for info in pkgutil.walk_packages(models_pkg.__path__, "deqguard.models."):
        importlib.import_module(info.name)
    found, todo = [], list(ModelConfig.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        arch = cls.model_fields["arch"]
        if cls.__module__.startswith("deqguard.models.") and not arch.is_required():
            found.append(cls)
    return found


@pytest.fixture
def scratch_registry():
    """Registrations made by a test are undone after it."""
    archs, names = dict(registry_mod._ARCHITECTURES), dict(registry_mod._PRESETS)
    yield
    registry_mod._ARCHITECTURES.clear()
    registry_mod._ARCHITECTURES.update(archs)
    registry_mod._PRESETS.clear()
    registry_mod._PRESETS.update(names)


class ToyConfig(ModelConfig):
    arch: Literal["toy-test"] = "toy-test"
    hidden: int = 6


class Toy(FeedForwardClassifier):
    def __init__(self, config: ToyConfig):
        super().__init__(config)
        c = config
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c.in_channels * c.image_size ** 2,
                                                         c.hidden),
                                 nn.ReLU(), nn.Linear(c.hidden, c.num_classes))

    def forward(self, x: Tensor, **_: object) -> Tensor:
        return self.net(x)


def test_every_architecture_is_listed():
    archs = {cls.model_fields["arch"].default for cls in architecture_configs()}
    assert {"tiny-deq", "mdeq", "cnn", "cnn-wk", "deq-wk", "resnet18"} <= archs
    assert archs <= set(list_models())
    assert {"tiny", "large", "xl"} <= set(list_models())  # the named variants
    assert list_models() == sorted(PRESETS)


@pytest.mark.parametrize("name", list_models())
def test_get_model_builds_each_name(name):
    model = get_model(name)
    assert isinstance(model, Classifier)
    assert model.config == PRESETS[name] == resolve_config(name)
    assert parse_model_config(model.config.model_dump(mode="json")) == model.config
    assert type(build_model(model.config)) is type(model)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="unknown model preset 'huge'") as err:
        get_model("huge")
    assert all(name in str(err.value) for name in list_models())
    with pytest.raises(ValueError, match="unknown model architecture 'huge'") as err:
        parse_model_config({"arch": "huge"})
    assert "tiny-deq" in str(err.value) and "cnn-wk" in str(err.value)
    with pytest.raises(ValueError, match="unknown model architecture None"):
        parse_model_config('{"num_classes": 3}')


def test_a_new_architecture_needs_only_its_registration(scratch_registry, tmp_path):
    register_model("toy-test", ToyConfig, presets={"toy-wide": ToyConfig(hidden=12)})(Toy)
    assert {"toy-test", "toy-wide"} <= set(list_models())
    model = get_model("toy-wide", num_classes=3).eval()
    assert isinstance(model, Toy) and model.config.hidden == 12
    save_checkpoint(model, tmp_path / "toy.safetensors")
    loaded, meta = load_checkpoint(tmp_path / "toy.safetensors", device="cpu")
    assert isinstance(loaded, Toy) and meta.model["arch"] == "toy-test"
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x))


def test_a_taken_name_is_refused(scratch_registry):
    before = (dict(registry_mod._ARCHITECTURES), list_models())
    with pytest.raises(ValueError, match="cannot register Toy: model name.* tiny already"):
        register_model("toy-test", ToyConfig, presets={"tiny": ToyConfig()})(Toy)
    assert (dict(registry_mod._ARCHITECTURES), list_models()) == before  # nothing half-added
    register_model("toy-test", ToyConfig)(Toy)
    with pytest.raises(ValueError, match="toy-test already registered"):
        register_model("toy-test", ToyConfig)(Toy)


def test_a_name_other_than_the_configs_arch_is_refused(scratch_registry):
    with pytest.raises(ValueError, match="ToyConfig.arch must default to 'toy-other'"):
        register_model("toy-other", ToyConfig)
    with pytest.raises(TypeError, match="preset 'x' is a TinyDEQConfig, not a ToyConfig"):
        register_model("toy-test", ToyConfig, presets={"x": resolve_config("tiny")})
    assert "toy-other" not in list_models() and "toy-test" not in list_models()
