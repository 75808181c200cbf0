"""The config base: the dataclass defaults, documented once, are the `small` preset but for its map."""

from __future__ import annotations

import dataclasses
import inspect

from train import config as config_module
from train.config import TrainConfig, load


def test_small_is_the_base_but_for_its_name_precision_map_and_curriculum():
    small, base = load("configs/small.toml").to_dict(), TrainConfig().to_dict()
    differs = {f"{section}.{key}" for section, values in small.items() if isinstance(values, dict)
               for key, value in values.items() if value != base[section][key]}
    assert differs == {"run.name", "precision.map"}


def test_every_config_field_is_documented_once_in_the_dataclasses():
    """The defaults are the base; each field carries a comment on its line or just above it."""
    for cls in (config_module.ModelConfig, config_module.PrecisionConfig, config_module.AttentionConfig,
                config_module.StageConfig, config_module.OptimConfig, config_module.DataConfig,
                config_module.RunConfig):
        lines = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            i = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{f.name}:"))
            assert "#" in lines[i] or lines[i - 1].strip().startswith("#"), f"{cls.__name__}.{f.name}"
