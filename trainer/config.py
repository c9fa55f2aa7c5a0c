"""Training configuration: YAML -> typed dataclasses, `key.sub=value` overrides, one-line errors.

Every section is a dataclass; unknown keys and values of the wrong type raise UserError naming
the key (and the nearest valid key). The resolved config is written to the run folder as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shards.errors import UserError


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs/run"              # run folder: checkpoints/, metrics.jsonl, config.yaml
    seed: int = 0
    devices: list[int] | str = "auto"  # GPU ids for this node, or "auto" (all visible) / "cpu"
    deterministic: bool = False        # cuDNN deterministic algorithms (slower)


@dataclass
class AugmentSection:
    flip: bool = True
    crop_scale: list[float] | None = None
    color_jitter: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    erase_p: float = 0.0


@dataclass
class DataConfig:
    source: str = "shards"             # "shards" | "synthetic" (in-memory patterns: tests, GPU benches)
    train_shards: str | None = None    # folder with manifest.json (preprocess/build_shards.py)
    verify: str = "size"               # manifest check: none | size | sha256
    augment: AugmentSection = field(default_factory=AugmentSection)
    synthetic_classes: int = 16
    synthetic_per_class: int = 8
    synthetic_image_size: list[int] = field(default_factory=lambda: [112, 112])
    synthetic_noise: float = 0.5


@dataclass
class ModelConfig:
    backbone: str = "tiny"
    embedding_size: int = 128
    kwargs: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = True
    compile: bool = False


@dataclass
class HeadConfig:
    margin: str = "cosface"            # cosface | arcface | sphereface | combined
    s: float = 64.0
    m: float = 0.35
    t: float = 1.0                     # SV-softmax t (1.0 = off)
    impl: str = "auto"


@dataclass
class OptimConfig:
    name: str = "sgd"                  # sgd | adamw
    lr: float = 0.1                    # for the global batch of the config (no implicit scaling)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4         # not applied to norms and biases
    head_weight_decay: float | None = None   # default: weight_decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad_norm: float = 0.0        # 0 = off
    accumulate: int = 1                # micro-batches per optimizer step
    max_nonfinite_in_row: int = 20     # divergence guard: stop after this many skipped steps in a row


@dataclass
class ScheduleConfig:
    steps: int = 0                     # optimizer steps in total; 0 = from epochs
    epochs: float = 0.0
    warmup_steps: int = 0
    decay: str = "cosine"              # cosine | poly | step | constant
    min_lr_ratio: float = 0.0
    power: float = 2.0                 # poly
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])   # step: fractions of steps
    gamma: float = 0.1                 # step


@dataclass
class PrecisionConfig:
    dtype: str = "auto"                # auto (bf16 on a GPU that has it, else fp32) | bf16 | fp16 | fp32


@dataclass
class LoaderConfig:
    batch_size: int = 128              # per process (rank); global = batch_size * world * accumulate
    backend: str = "auto"              # auto | dali | torch
    workers: int = 2
    prefetch: int = 2


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 3
    resume: str = "auto"               # auto | never | path to a checkpoint
    save_untrained: bool = False       # write checkpoints/untrained.pt before the first step


@dataclass
class ValidationConfig:
    lfw_shards: str | None = None      # LFW shard folder with pairs; None = no validation
    every_steps: int = 500
    batch_size: int = 256


@dataclass
class LoggingConfig:
    every_steps: int = 20
    display: str = "auto"              # auto (rich when stderr is a TTY) | rich | plain | none
    tensorboard: str = "auto"          # auto (when installed) | on | off


@dataclass
class DebugConfig:
    # Test hooks, off by default.
    nonfinite_steps: list[int] = field(default_factory=list)   # make the loss at these steps inf
    checkpoint_pause_s: float = 0.0    # hold a half-written checkpoint this long (crash test) ...
    checkpoint_pause_step: int = 0     # ... when writing this step's checkpoint (0 = every one)
    dump_params: bool = False          # every rank writes its final parameters (DDP test)
    step_sleep_s: float = 0.0          # slow each step down (crash test)


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


CHOICES = {
    "data.source": ("shards", "synthetic"),
    "data.verify": ("none", "size", "sha256"),
    "head.margin": ("cosface", "arcface", "sphereface", "combined"),
    "optim.name": ("sgd", "adamw"),
    "schedule.decay": ("cosine", "poly", "step", "constant"),
    "precision.dtype": ("auto", "bf16", "fp16", "fp32"),
    "loader.backend": ("auto", "dali", "torch"),
    "logging.display": ("auto", "rich", "plain", "none"),
    "logging.tensorboard": ("auto", "on", "off"),
}


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, key + ".")
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, where: str, valid: list[str]) -> UserError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{near[0]}'?)" if near else f" (valid: {', '.join(sorted(valid))})"
    return UserError(f"{where}: unknown config key '{key}'{hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and minimally convert: int -> float) a YAML value against a type hint."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key, where)
            except UserError as err:
                errors.append(err)
        raise UserError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is Any:
        return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        path_key = key.endswith(("shards", "dir"))
        if path_key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a folder named "2024" is still a path
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key + ".", where)
        raise UserError(f"{where}: '{key}' is a section; give it as a mapping of keys, not {value!r}")
    raise UserError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: dict[str, Any], prefix: str, where: str) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise _unknown(f"{prefix}{k}", where, [f"{prefix}{n}" for n in names])
        choices = CHOICES.get(f"{prefix}{k}")
        if isinstance(v, bool) and choices and {"on", "off"} <= set(choices):
            v = "on" if v else "off"  # YAML 1.1 reads a bare on/off as a boolean
        value = _coerce(v, hints[k], f"{prefix}{k}", where)
        if choices and value not in choices:
            raise UserError(f"{where}: '{prefix}{k}' must be one of {', '.join(choices)}, got {value!r}")
        kwargs[k] = value
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    node = tree
    valid = _all_keys(TrainConfig)
    for i, part in enumerate(parts[:-1]):
        sub = node.setdefault(part, {})
        if not isinstance(sub, dict):
            # The prefix is a leaf: the full key cannot exist.
            raise _unknown(dotted, where, valid)
        node = sub
        del i
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key, YAML scalar/list value)."""
    if "=" not in text or text.startswith("="):
        raise UserError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        raise UserError(f"override '{text}': value is not valid YAML") from None
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or only defaults when path is None), apply overrides, check everything."""
    tree: dict[str, Any] = {}
    where = str(path) if path is not None else "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"{p}: invalid YAML{at}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: a config is a mapping of sections (run, data, model, ...)")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        free = key.startswith("model.kwargs.")  # backbone kwargs are the backbone's to check
        if key not in _all_keys(TrainConfig) and not free:
            raise _unknown(key, f"override '{text}'", _all_keys(TrainConfig))
        _set_dotted(tree, key, value, f"override '{text}'")
    cfg = _build(TrainConfig, tree, "", where)
    _check(cfg, where)
    return cfg


def _check(cfg: TrainConfig, where: str) -> None:
    positive = {
        "loader.batch_size": cfg.loader.batch_size, "model.embedding_size": cfg.model.embedding_size,
        "optim.accumulate": cfg.optim.accumulate, "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "logging.every_steps": cfg.logging.every_steps, "validation.every_steps": cfg.validation.every_steps,
        "optim.max_nonfinite_in_row": cfg.optim.max_nonfinite_in_row,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{where}: '{key}' must be positive, got {value}")
    if cfg.optim.lr <= 0:
        raise UserError(f"{where}: 'optim.lr' must be positive, got {cfg.optim.lr}")
    if cfg.schedule.steps <= 0 and cfg.schedule.epochs <= 0:
        raise UserError(f"{where}: set 'schedule.steps' or 'schedule.epochs' (both are 0)")
    if cfg.data.source == "shards" and not cfg.data.train_shards:
        raise UserError(f"{where}: 'data.train_shards' is not set (a shard folder from build_shards.py)")
    from trainer.backbones import available_backbones

    if cfg.model.backbone not in available_backbones():
        raise UserError(f"{where}: 'model.backbone' {cfg.model.backbone!r} is not one of "
                        f"{', '.join(available_backbones())}")
    if not isinstance(cfg.run.devices, list) and cfg.run.devices not in ("auto", "cpu"):
        raise UserError(f"{where}: 'run.devices' must be a list of GPU ids, 'auto' or 'cpu'")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], where: str = "checkpoint config") -> TrainConfig:
    return _build(TrainConfig, data, "", where)


def save_resolved(cfg: TrainConfig, path: Path | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
