"""Config: YAML into dataclasses, overrides, one-line errors naming the key, shipped configs load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common import settings
from common.cli import UserError
from common.settings import Range
from tests._heads_util import needs_grad_dtype
from tests._trainer_util import SHIPPED_CONFIGS
from trainer.config import TrainConfig, from_dict, load_config, save_resolved, to_dict
from trainer.main import main

ROOT = Path(__file__).resolve().parents[2]
SYNTH = ["data.source=synthetic", "schedule.steps=5"]


def test_defaults_and_overrides_are_typed():
    cfg = load_config(
        None,
        [
            *SYNTH,
            "optim.lr=1",
            "run.devices=[0,1]",
            "head.margin=arcface",
            "data.augment.crop_scale=[0.8,1.0]",
            "model.kwargs.width=16",
        ],
    )
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


def test_fused_head_needs_an_embedding_size_its_kernels_read() -> None:
    with pytest.raises(
        UserError, match=r"'head\.impl' fused needs model\.embedding_size to be a multiple of 8"
    ):
        load_config(None, [*SYNTH, "head.impl=fused", "model.embedding_size=100"])
    assert load_config(None, [*SYNTH, "head.impl=auto", "model.embedding_size=100"]).head.impl == "auto"


@needs_grad_dtype
def test_head_grad_dtype_defaults_to_float32_and_takes_bfloat16_with_sgd() -> None:
    assert load_config(None, SYNTH).head.grad_dtype == "float32"
    assert load_config(None, [*SYNTH, "head.grad_dtype=bfloat16"]).head.grad_dtype == "bfloat16"
    with pytest.raises(UserError, match="'head.grad_dtype' must be one of float32, bfloat16, got 'fp16'"):
        load_config(None, [*SYNTH, "head.grad_dtype=fp16"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        (
            "optim.name=adamw",
            "'head.grad_dtype' bfloat16 needs optim.name=sgd (torch's adamw cannot step an fp32 "
            "weight with a bf16 gradient), got optim.name=adamw",
        ),
        (
            "optim.accumulate=2",
            "'head.grad_dtype' bfloat16 needs optim.accumulate=1 (autograd would sum the "
            "micro-batches' gradients in bf16), got optim.accumulate=2",
        ),
    ],
)
def test_head_grad_dtype_bfloat16_is_refused_where_its_gradient_cannot_go(override, fragment) -> None:
    with pytest.raises(UserError) as err:
        load_config(None, [*SYNTH, "head.grad_dtype=bfloat16", override])
    assert str(err.value) == f"override 'head.grad_dtype=bfloat16': {fragment}"


def test_head_grad_dtype_bfloat16_is_refused_by_a_torch_without_grad_dtype(monkeypatch) -> None:
    import torch

    import heads.core

    # as torch < 2.10: a parameter without the grad_dtype attribute
    monkeypatch.setattr(heads.core, "GRAD_DTYPE_SUPPORTED", False)
    monkeypatch.setattr(torch, "__version__", "2.9.1")
    with pytest.raises(UserError) as err:
        load_config(None, [*SYNTH, "head.grad_dtype=bfloat16"])
    assert str(err.value) == (
        "override 'head.grad_dtype=bfloat16': 'head.grad_dtype' bfloat16 needs torch >= 2.10 "
        "(a parameter's grad_dtype); this is torch 2.9.1"
    )


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lrr=0.1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (
            "head.lambda_bse=1",
            "unknown config key 'head.lambda_bse' (did you mean 'head.sphereface.lambda_base",
        ),
        ("optim.lr=fast", "'optim.lr' must be float"),
        ("schedule.steps=1.5", "'schedule.steps' must be int"),
        ("head.margin=cosine", "'head.margin' must be one of"),
        ("loader.batch_size=0", "'loader.batch_size' must be in [1, 16384], got 0"),
        ("optim=3", "'optim' is a section"),
        ("nonsense", "expected key.sub=value"),
    ],
)
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
    path.write_text("data: {source: synthetic, synthetic_clases: 3}\nschedule: {steps: 3}\n")
    with pytest.raises(UserError, match=r"'data\.synthetic_clases' \(did you mean 'data\.synthetic\.classes"):
        load_config(path)  # a misspelt old flat name: the nearest key inside the section's sections


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
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
        [
            "--config",
            str(ROOT / "configs" / "demo_cpu.yaml"),
            f"validation.lfw_shards={tmp_path / 'nolfw'}",
            f"run.dir={tmp_path / 'run'}",
        ],
        [
            "--config",
            str(ROOT / "configs" / "demo_cpu.yaml"),
            f"data.train_shards={tmp_path / 'noshards'}",
            "validation.lfw_shards=null",
            f"run.dir={tmp_path / 'run'}",
        ],
    ]
    errors = []
    for argv in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        errors.append(err)
    assert "nolfw" in errors[2] and "noshards" in errors[3]  # the missing shard folder is named


def test_yaml_1_1_floats_are_floats(tmp_path):
    # PyYAML reads 1e-3 and 1e6 as strings (YAML 1.1 wants a dot and a signed exponent).
    cfg = load_config(
        None,
        [
            *SYNTH,
            "optim.lr=1e-3",
            "optim.weight_decay=5e-4",
            "head.s=1e1",
            "data.augment.crop_scale=[8e-1,1]",
        ],
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.head.s) == (1e-3, 5e-4, 10.0)
    assert cfg.data.augment.crop_scale == (0.8, 1.0)
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: synthetic}\nschedule: {steps: 3}\noptim: {lr: 1e6, weight_decay: 1E-4}\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e6 and isinstance(cfg.optim.lr, float) and cfg.optim.weight_decay == 1e-4
    with pytest.raises(UserError, match="'schedule.steps' must be int"):
        load_config(None, [*SYNTH, "schedule.steps=1e3"])  # an int stays an int


def test_an_override_error_names_the_override_a_file_error_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: synthetic}\nschedule: {steps: 3}\nhead: {s: -1.0}\n")
    with pytest.raises(UserError, match=r"c\.yaml: 'head\.s' must be positive, got -1\.0"):
        load_config(path)
    with pytest.raises(UserError, match=r"^override 'head\.s=-30': 'head\.s' must be positive"):
        load_config(path, ["head.s=-30"])
    with pytest.raises(UserError, match=r"^override 'optim\.lr=fast': 'optim\.lr' must be float"):
        load_config(path, ["head.s=30", "optim.lr=fast"])
    with pytest.raises(UserError, match=r"^override 'optim={lr: x}': 'optim\.lr' must be float"):
        load_config(path, ["head.s=30", "optim={lr: x}"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("head.impl=gpu", "'head.impl' must be one of auto, reference, chunked, fused, got 'gpu'"),
        ("head.m=10", "'head.m' for arcface must be in [0, pi/2) radians, got 10.0"),
        ("head.t=0.5", "'head.t' must be >= 1"),
        ("optim.momentum=1.5", "'optim.momentum' must be in [0, 1)"),
        ("head.combined.m1=1.0", "'head.combined.m1' applies to head.margin=combined, not arcface"),
        ("head.m1=1.0", "'head.combined.m1' applies to head.margin=combined, not arcface"),  # the old name
        (
            "head.sphereface.lambda_min=3",
            "'head.sphereface.lambda_min' applies to head.margin=sphereface, not",
        ),
        ("data.augment.blur_p=2", "'data.augment.blur_p' must be in [0, 1], got 2.0"),
        ("data.augment.crop_scale=[0.9,0.5]", "data.augment.crop_scale=[0.9, 0.5]: need low <= high"),
        ("run.devices=gpu", "'run.devices' must be one of auto, cpu, got 'gpu'"),
        ("loader.workers=-1", "'loader.workers' must be in [0, 256], got -1"),
    ],
)
def test_values_out_of_range_name_the_key(override, fragment):
    with pytest.raises(UserError) as info:
        load_config(None, [*SYNTH, "head.margin=arcface", override])
    assert fragment in str(info.value) and str(info.value).startswith(f"override '{override}'")


def test_every_margin_option_reaches_the_head():
    from heads import MarginHead
    from trainer.config import head_kwargs

    sphere = load_config(
        None,
        [
            *SYNTH,
            "head.margin=sphereface",
            "head.sphereface.lambda_base=100",
            "head.sphereface.gamma=0.5",
            "head.gamma_focal=2",
        ],
    ).head
    head = MarginHead(10, 8, **head_kwargs(sphere))
    margin = head.margin
    assert (margin.m, margin.lambda_base, margin.gamma, head.gamma_focal) == (4, 100.0, 0.5, 2.0)
    combined = load_config(
        None,
        [
            *SYNTH,
            "head.margin=combined",
            "head.combined.m1=1.0",
            "head.combined.m2=0.4",
            "head.combined.m3=0.1",
        ],
    ).head
    head = MarginHead(10, 8, **head_kwargs(combined))
    assert (head.margin.m1, head.margin.m2, head.margin.m3) == (1.0, 0.4, 0.1)
    with pytest.raises(UserError, match="'head.m' does not apply to head.margin=combined"):
        load_config(None, [*SYNTH, "head.margin=combined", "head.m=0.3"])
    with pytest.raises(UserError, match="'head.m' for sphereface must be an integer"):
        load_config(None, [*SYNTH, "head.margin=sphereface", "head.m=2.5"])


def test_the_margins_after_arcface_reach_the_head_and_their_mistakes_name_the_key():
    from heads import MarginHead
    from trainer.config import head_kwargs

    ada = load_config(
        None, [*SYNTH, "head.margin=adaface", "head.m=0.3", "head.adaface.h=0.5", "head.adaface.t_alpha=0.1"]
    ).head
    margin = MarginHead(10, 8, **head_kwargs(ada)).margin
    assert (margin.name, margin.m, margin.h, margin.t_alpha) == ("adaface", 0.3, 0.5, 0.1)
    mag = load_config(
        None,
        [
            *SYNTH,
            "head.margin=magface",
            "head.magface.l_a=5",
            "head.magface.u_a=50",
            "head.magface.l_m=0.4",
            "head.magface.u_m=0.7",
            "head.magface.lambda_g=20",
        ],
    ).head
    margin = MarginHead(10, 8, **head_kwargs(mag)).margin
    assert (margin.l_a, margin.u_a, margin.l_m, margin.u_m, margin.lambda_g) == (5, 50, 0.4, 0.7, 20)
    cur = load_config(None, [*SYNTH, "head.margin=curricularface", "head.m=0.45"]).head
    assert MarginHead(10, 8, **head_kwargs(cur)).margin.m == 0.45
    for overrides, fragment in [
        (["head.margin=magface", "head.m=0.3"], "'head.m' does not apply to head.margin=magface"),
        (["head.margin=magface", "head.magface.u_a=5"], "'head.magface.u_a' must be above head.magface.l_a"),
        (["head.margin=curricularface", "head.t=1.2"], "'head.t' (SV-Softmax) must be 1 with"),
        (["head.margin=arcface", "head.adaface.h=0.3"], "'head.adaface.h' applies to head.margin=adaface"),
        (["head.margin=adaface", "head.adaface.t_alpha=0"], "'head.adaface.t_alpha' must be in (0, 1]"),
    ]:
        with pytest.raises(UserError) as info:
            load_config(None, [*SYNTH, *overrides])
        assert fragment in str(info.value) and "\n" not in str(info.value), (overrides, str(info.value))


def test_config_and_run_folder_mistakes_are_one_line(tmp_path, capsys):
    binary = tmp_path / "model.pt"
    binary.write_bytes(bytes(range(256)) * 4)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    synth = [
        *SYNTH,
        "run.devices=cpu",
        "data.synthetic.image_size=[32,32]",
        "model.embedding_size=16",
        "loader.batch_size=8",
        "model.channels_last=false",
        "logging.tensorboard=off",
    ]
    cases = [
        (["--config", str(binary)], "not a text file"),
        ([*synth, f"run.dir={a_file}"], "is a file, not a folder"),
        (
            [*synth, f"run.dir={tmp_path / 'r1'}", "model.kwargs.width=0"],
            "cannot build backbone 'tiny' (width must be positive, got 0)",
        ),
        ([*synth, f"run.dir={tmp_path / 'r2'}", "head.impl=fused"], "head.impl=fused needs a CUDA GPU"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and fragment in err, err


def test_sphereface_from_the_command_line_trains(tmp_path):
    from tests._trainer_util import tiny_overrides
    from trainer.engine import train

    cfg = load_config(
        None, tiny_overrides(tmp_path / "run", steps=2, **{"head.margin": "sphereface", "head.m": "null"})
    )
    assert train(cfg)["step"] == 2


# ---- one home per key: type, default, range and help on the field (common/settings.py) -----------


def test_every_key_has_help():
    missing = [key for key, f, _ in settings.fields(TrainConfig) if not f.metadata.get("help")]
    assert missing == []


def _outside(allowed: Range, tp) -> object:
    """A value just outside `allowed`, shaped as the key's type wants it (a list for a list key)."""
    if allowed.lo != float("-inf"):
        value = allowed.lo - 1 if allowed.ends[0] == "[" else allowed.lo
    else:
        value = allowed.hi + 1 if allowed.ends[1] == "]" else allowed.hi
    text = settings.type_name(tp)
    return [value, value] if text.startswith("[") else [value] if text.startswith("list") else value


RANGED = [
    (key, f.metadata["range"], tp)
    for key, f, tp in settings.fields(TrainConfig)
    if f.metadata.get("range") is not None
]


@pytest.mark.parametrize("key, allowed, tp", RANGED, ids=[key for key, _, _ in RANGED])
def test_every_range_is_checked_from_its_field(key, allowed, tp):
    # The check reads the field's Range: a value just outside it fails, naming the key and the override.
    text = f"{key}={json.dumps(_outside(allowed, tp))}"
    with pytest.raises(UserError) as info:
        load_config(None, [*SYNTH, text])
    assert str(info.value).startswith(f"override '{text}': '{key}' must be {allowed}, got ")


def test_a_range_error_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: synthetic, synthetic: {image_size: [4, 32]}}\nschedule: {steps: 3}\n")
    expected = r"c\.yaml: 'data\.synthetic\.image_size' must be in \[8, 1024\], got \[4, 32\]$"
    with pytest.raises(UserError, match=expected):
        load_config(path)
    path.write_text("data: {source: synthetic}\nschedule: {steps: 3}\nhead: {margin: combined, m2: 2.0}\n")
    with pytest.raises(UserError, match=r"c\.yaml: 'head\.combined\.m2' must be in \[0, pi/2\), got 2\.0$"):
        load_config(path)  # an old flat name in a file: the error names the nested key


FLAT = """data: {source: synthetic, synthetic_classes: 5, synthetic_per_class: 3,
       synthetic_image_size: [16, 24], synthetic_noise: 0.1}
schedule: {steps: 3}
head: {margin: sphereface, lambda_base: 100, lambda_min: 1, gamma: 0.5, power: 2}
"""
NESTED = """data:
  source: synthetic
  synthetic: {classes: 5, per_class: 3, image_size: [16, 24], noise: 0.1}
schedule: {steps: 3}
head:
  margin: sphereface
  sphereface: {lambda_base: 100, lambda_min: 1, gamma: 0.5, power: 2}
"""


def test_flat_and_nested_names_give_the_same_config(tmp_path):
    (tmp_path / "flat.yaml").write_text(FLAT)
    (tmp_path / "nested.yaml").write_text(NESTED)
    flat, nested = load_config(tmp_path / "flat.yaml"), load_config(tmp_path / "nested.yaml")
    assert to_dict(flat) == to_dict(nested)
    assert nested.data.synthetic.image_size == (16, 24) and nested.head.sphereface.gamma == 0.5
    by_flat = load_config(
        None,
        [
            *SYNTH,
            "head.margin=combined",
            "head.m1=1.1",
            "head.m2=0.2",
            "head.m3=0.1",
            "data.synthetic_classes=7",
        ],
    )
    by_nested = load_config(
        None,
        [
            *SYNTH,
            "head.margin=combined",
            "head.combined.m1=1.1",
            "head.combined.m2=0.2",
            "head.combined.m3=0.1",
            "data.synthetic.classes=7",
        ],
    )
    assert to_dict(by_flat) == to_dict(by_nested) and by_nested.head.combined.m1 == 1.1
    # An override wins over the file in either spelling.
    assert load_config(tmp_path / "flat.yaml", ["head.sphereface.gamma=0.25"]).head.sphereface.gamma == 0.25
    assert load_config(tmp_path / "nested.yaml", ["head.gamma=0.25"]).head.sphereface.gamma == 0.25
    whole_section = load_config(tmp_path / "nested.yaml", ["head={margin: sphereface, power: 3}"])
    assert whole_section.head.sphereface.power == 3


def test_resolved_config_uses_the_nested_names_and_round_trips(tmp_path):
    (tmp_path / "flat.yaml").write_text(FLAT)
    cfg = load_config(tmp_path / "flat.yaml", ["data.augment.crop_scale=[0.8, 1]", "optim.betas=[0.8, 0.9]"])
    save_resolved(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["head"]["sphereface"] == {"lambda_base": 100, "lambda_min": 1, "gamma": 0.5, "power": 2}
    assert saved["data"]["synthetic"]["image_size"] == [16, 24]
    assert not {"lambda_base", "m1"} & set(saved["head"]) and "synthetic_classes" not in saved["data"]
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and to_dict(from_dict(saved)) == to_dict(cfg)
    old_run = yaml.safe_load(FLAT)  # a config.yaml from a run folder written before the nesting
    assert to_dict(from_dict(old_run)) == to_dict(from_dict(yaml.safe_load(NESTED)))


def test_help_config_lists_every_key(capsys):
    assert main(["--help-config"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    starts = [header.index(name) for name in ("key", "type", "default", "range", "help")]
    rows = {}
    for line in lines:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        rows[cells[0]] = cells[1:]
    assert list(rows) == settings.all_keys(TrainConfig)
    for key, f, _ in settings.fields(TrainConfig):
        assert rows[key][3] == f.metadata["help"], key
        if f.metadata["range"] is not None:
            assert rows[key][2] == str(f.metadata["range"]), key
    assert rows["head.combined.m2"] == [
        "float or null",
        "null",
        "in [0, pi/2)",
        "additive angular margin (default 0.3)",
    ]
    assert rows["head.margin"][:3] == [
        "str",
        "cosface",
        "cosface|arcface|sphereface|combined|adaface|magface|curricularface",
    ]
    assert rows["optim.betas"][:3] == ["[float, float]", "[0.9, 0.999]", "in [0, 1)"]
    assert rows["head.sphereface"][0] == "section"


def test_help_config_works_without_a_terminal():
    # A pipe, not a TTY, and no torch import needed: the table is plain text.
    done = subprocess.run(
        [sys.executable, str(ROOT / "trainer" / "main.py"), "--help-config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0 and done.stderr == ""
    assert len(done.stdout.splitlines()) == len(settings.all_keys(TrainConfig)) + 1
