"""Config: YAML into dataclasses, overrides, one-line errors naming the key, shipped configs load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shards.errors import UserError
from trainer.config import TrainConfig, from_dict, load_config, save_resolved, to_dict
from trainer.main import main

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ["data.source=synthetic", "schedule.steps=5"]


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, [*SYNTH, "optim.lr=1", "run.devices=[0,1]", "head.margin=arcface",
                             "data.augment.crop_scale=[0.8,1.0]", "model.kwargs.width=16"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.run.devices == [0, 1]
    assert cfg.head.margin == "arcface"
    assert cfg.data.augment.crop_scale == (0.8, 1.0)  # shards.augment.AugmentConfig holds a tuple
    assert cfg.model.kwargs == {"width": 16}


def test_on_off_choices_survive_yaml_booleans():
    # YAML 1.1 reads a bare off/on as False/True; the on/off choice keys take them as meant.
    assert load_config(None, [*SYNTH, "logging.tensorboard=off"]).logging.tensorboard == "off"
    assert load_config(None, [*SYNTH, "logging.tensorboard=on"]).logging.tensorboard == "on"
    with pytest.raises(UserError, match="'logging.display' must be str"):
        load_config(None, [*SYNTH, "logging.display=off"])  # no on/off choice there: still an error


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("optim.lr=fast", "'optim.lr' must be float"),
    ("schedule.steps=1.5", "'schedule.steps' must be int"),
    ("head.margin=cosine", "'head.margin' must be one of"),
    ("loader.batch_size=0", "'loader.batch_size' must be positive"),
    ("optim=3", "'optim' is a section"),
    ("nonsense", "expected key.sub=value"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(UserError) as info:
        load_config(None, [*SYNTH, override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: synthetic}\nschedule: {steps: 3}\nmodel: {backbnoe: tiny}\n")
    expected = r"c\.yaml: unknown config key 'model\.backbnoe' \(did you mean 'model\.backbone'"
    with pytest.raises(UserError, match=expected):
        load_config(path)


@pytest.mark.parametrize("name", ["demo_cpu", "mobilefacenet_cosface_vggface2", "ir50_arcface_vggface2"])
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    save_resolved(cfg, tmp_path / "config.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)


def test_reference_recipe_has_a_home_for_every_value():
    cfg = load_config(ROOT / "configs" / "mobilefacenet_cosface_vggface2.yaml")
    assert (cfg.model.backbone, cfg.model.embedding_size) == ("mobilefacenet", 256)
    assert (cfg.head.margin, cfg.head.s, cfg.head.m, cfg.head.t) == ("cosface", 30.0, 0.35, 1.1)
    assert (cfg.optim.name, cfg.optim.lr, cfg.loader.batch_size) == ("sgd", 0.1, 256)
    assert cfg.run.devices == "auto" and cfg.data.train_shards and cfg.validation.lfw_shards


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    cases = [
        ["--config", str(ROOT / "configs" / "demo_cpu.yaml"), "optim.lrr=1"],
        ["--config", str(tmp_path / "missing.yaml")],
        ["--config", str(ROOT / "configs" / "demo_cpu.yaml"), f"validation.lfw_shards={tmp_path / 'nolfw'}",
         f"run.dir={tmp_path / 'run'}"],
        ["--config", str(ROOT / "configs" / "demo_cpu.yaml"), f"data.train_shards={tmp_path / 'noshards'}",
         "validation.lfw_shards=null", f"run.dir={tmp_path / 'run'}"],
    ]
    errors = []
    for argv in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        errors.append(err)
    assert "nolfw" in errors[2] and "noshards" in errors[3]  # the missing shard folder is named
