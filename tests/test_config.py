"""Config files: `extends` chains, their merge rules and errors, and the presets as diffs of the base."""

from __future__ import annotations

import dataclasses
import inspect
import tomllib
from pathlib import Path

import pytest

from train import config as config_module
from train.config import ConfigError, TrainConfig, apply_settings, from_dict, load

PRESETS = sorted(Path("configs").glob("*.toml"))
STAGE = "[[curriculum]]\nseq_len = 64\ntokens = 1000\nmicro_batch = {}\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_merges_tables_key_by_key_through_a_chain(tmp_path):
    write(tmp_path / "parent.toml", '[model]\nd_model = 384\nn_layers = 2\n[precision.map]\nq = "bf16"\n'
                                    '[optim]\nlr = 1e-3\n' + STAGE.format(8))
    write(tmp_path / "child.toml", 'extends = "parent.toml"\n[model]\nn_layers = 3\n[precision.map]\nk = "bf16"\n')
    grandchild = write(tmp_path / "sub/grandchild.toml", 'extends = "../child.toml"\n[optim]\nlr = 2e-3\n')
    config = load(grandchild)
    assert (config.model.d_model, config.model.n_layers, config.model.n_heads) == (384, 3, 12)
    assert (config.precision.map["q"], config.precision.map["k"], config.precision.map["v"]) == ("bf16", "bf16", "fp8")
    assert config.optim.lr == 2e-3 and config.curriculum[0].micro_batch == 8


def test_a_childs_curriculum_replaces_the_parents_whole(tmp_path):
    write(tmp_path / "parent.toml", STAGE.format(8) + STAGE.format(4))
    child = write(tmp_path / "child.toml", 'extends = "parent.toml"\n' + STAGE.format(2))
    assert [stage.micro_batch for stage in load(child).curriculum] == [2]


def test_an_extends_cycle_is_a_one_line_error(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n' + STAGE.format(8))
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "a.toml")
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    assert str(err.value) == f"extends cycle: {a} -> {b} -> {a}"
    with pytest.raises(ConfigError, match="extends cycle"):
        load(write(tmp_path / "self.toml", 'extends = "self.toml"\n'))


@pytest.mark.parametrize("text,message", [
    ('extends = "nope.toml"\n', "extends {dir}/nope.toml, which is not a file"),
    ("extends = 3\n", "extends must be a file name, got 3"),
    ('extends = "parent.toml"\n[model]\nd_modle = 64\n', "unknown key(s) ['d_modle'] in [model]"),
    ('extends = "parent.toml"\nextend = "parent.toml"\n', "unknown section(s) ['extend']"),
])
def test_extends_errors(tmp_path, text, message):
    write(tmp_path / "parent.toml", STAGE.format(8))
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path / "child.toml", text))
    assert message.format(dir=tmp_path) in str(err.value)


def test_a_resolved_config_has_no_extends_and_takes_settings(tmp_path):
    write(tmp_path / "parent.toml", STAGE.format(8))
    config = load(write(tmp_path / "child.toml", 'extends = "parent.toml"\n[run]\nname = "child"\n'))
    raw = config.to_dict()
    assert "extends" not in raw and from_dict(raw) == config
    config = apply_settings(config, ["optim.lr=1e-3", 'precision.map.q="bf16"'])
    assert (config.optim.lr, config.precision.map["q"], config.run.name) == (1e-3, "bf16", "child")


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads(path):
    assert load(path).curriculum


def inherited_by(path: Path) -> dict:
    """What the preset at `path` would resolve to without its own keys: its parent, or the base."""
    parent = tomllib.loads(path.read_text()).get("extends")
    return load(path.parent / parent).to_dict() if parent else TrainConfig().to_dict()


def restated(raw: dict, inherited: dict, where: str = "") -> list[str]:
    """The keys of `raw` whose value equals the inherited one, tables compared key by key."""
    keys = []
    for key, value in raw.items():
        if key == "extends":
            continue
        if isinstance(value, dict):
            keys += restated(value, inherited[key], f"{where}{key}.")
        elif value == inherited[key]:
            keys.append(f"{where}{key}")
    return keys


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_name_only_what_differs(path):
    """A preset restating an inherited value is a full copy in the making: it would drift from the base."""
    assert restated(tomllib.loads(path.read_text()), inherited_by(path)) == []


def test_small_is_the_base_but_for_its_name_precision_map_and_curriculum():
    small, base = load("configs/small.toml").to_dict(), TrainConfig().to_dict()
    differs = {f"{section}.{key}" for section, values in small.items() if isinstance(values, dict)
               for key, value in values.items() if value != base[section][key]}
    assert differs == {"run.name", "precision.map"}
    # The per-projection policy measured with `just bench-linear` at d768 (docs/benchmarks.md).
    assert small["precision"]["map"] == {"q": "bf16", "k": "bf16", "v": "bf16", "o": "bf16", "gate": "fp8",
                                         "up": "fp8", "down": "bf16", "lm_head": "fp8"}


def test_small_q_bf16_is_small_with_its_own_map():
    small, q_bf16 = load("configs/small.toml"), load("configs/small-q-bf16.toml")
    assert q_bf16.precision.map == {**dict.fromkeys(config_module.PROJECTIONS, "fp8"), "q": "bf16", "lm_head": "bf16"}
    assert (q_bf16.model, q_bf16.optim, q_bf16.curriculum) == (small.model, small.optim, small.curriculum)


def test_every_config_field_is_documented_once_in_the_dataclasses():
    """The defaults are the base; each field carries a comment on its line or just above it."""
    for cls in (config_module.ModelConfig, config_module.PrecisionConfig, config_module.AttentionConfig,
                config_module.StageConfig, config_module.OptimConfig, config_module.DataConfig,
                config_module.RunConfig):
        lines = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            i = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{f.name}:"))
            assert "#" in lines[i] or lines[i - 1].strip().startswith("#"), f"{cls.__name__}.{f.name}"
