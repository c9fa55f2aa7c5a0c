"""Training configuration: YAML -> typed dataclasses, `key.sub=value` overrides, one-line errors.

Every section is a dataclass; the allowed values of a choice are its `Literal[...]` type. At load
every value is checked: its type (floats also as YAML 1.1 leaves them, `1e-3`), its range
(`_RANGES`), and the rules across keys (`check`). Each error is one UserError line naming the key
and where the value came from (the file, or the `key=value` override), and an unknown key names
the nearest valid one. The resolved config is written to the run folder as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from common.cli import UserError
from common.fileio import atomic_write_text
from shards.augment import AugmentConfig


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs/run"              # run folder: checkpoints/, metrics.jsonl, config.yaml
    seed: int = 0
    devices: list[int] | Literal["auto", "cpu"] = "auto"  # GPU ids for this node, or all visible / cpu
    deterministic: bool = False        # cuDNN deterministic algorithms (slower)
    collective_timeout_s: float = 300.0  # a rank stuck this long in a collective ends the job (torchrun)


@dataclass
class DataConfig:
    source: Literal["shards", "synthetic"] = "shards"   # synthetic: in-memory patterns (tests, GPU benches)
    train_shards: str | None = None    # folder with manifest.json (preprocess/build_shards.py)
    verify: Literal["none", "size", "sha256"] = "size"  # manifest check
    augment: AugmentConfig = field(default_factory=AugmentConfig)   # the loader's own type
    synthetic_classes: int = 16
    synthetic_per_class: int = 8
    synthetic_image_size: list[int] = field(default_factory=lambda: [112, 112])
    synthetic_noise: float = 0.5


@dataclass
class ModelConfig:
    backbone: str = "tiny"             # a name of models.backbones.available_backbones()
    embedding_size: int = 128
    kwargs: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = True
    compile: bool = False              # torch.compile the backbone (the head stays eager)
    compile_backend: str = "inductor"  # torch.compile's backend: inductor, cudagraphs, aot_eager, ...


@dataclass
class HeadConfig:
    """The margin head (heads.MarginHead). A None leaves the margin's own default; margin options of
    another margin than the chosen one are refused."""

    margin: Literal["cosface", "arcface", "sphereface", "combined"] = "cosface"
    s: float = 64.0
    m: float | None = None             # cosface 0.35, arcface 0.5, sphereface 4 (an integer); not combined
    t: float = 1.0                     # SV-softmax t (1.0 = off)
    impl: Literal["auto", "reference", "chunked", "fused"] = "auto"   # fused: CUDA + Triton
    gamma_focal: float = 0.0           # > 0 adds the focal term
    m1: float | None = None            # combined: cos(m1 theta + m2) - m3 (defaults 1.0, 0.3, 0.2)
    m2: float | None = None
    m3: float | None = None
    lambda_base: float | None = None   # sphereface annealing: lambda = max(lambda_min,
    lambda_min: float | None = None    #   lambda_base * (1 + gamma * step) ** -power)
    gamma: float | None = None         #   (defaults 1000, 5, 0.12, 1)
    power: float | None = None
    # several processes: "shard" splits the classes over the ranks (outside DDP), "replicate" keeps the
    # whole head on every rank (in DDP); auto = shard when there is more than one process
    parallel: Literal["auto", "replicate", "shard"] = "auto"
    sample_rate: float = 1.0           # Partial FC (shard): share of each rank's classes per step


MARGIN_OPTIONS = {"combined": ("m1", "m2", "m3"),
                  "sphereface": ("lambda_base", "lambda_min", "gamma", "power")}


def head_kwargs(head: HeadConfig) -> dict[str, Any]:
    """The keyword arguments of heads.MarginHead for this section (None: the head's default)."""
    kwargs: dict[str, Any] = {"margin": head.margin, "s": head.s, "m": head.m, "t": head.t,
                              "impl": head.impl, "gamma_focal": head.gamma_focal}
    for name in MARGIN_OPTIONS.get(head.margin, ()):
        if getattr(head, name) is not None:
            kwargs[name] = getattr(head, name)
    return kwargs


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
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
    decay: Literal["cosine", "poly", "step", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    power: float = 2.0                 # poly
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])   # step: fractions of steps
    gamma: float = 0.1                 # step


@dataclass
class PrecisionConfig:
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"   # auto: bf16 on a GPU that has it, else fp32


@dataclass
class LoaderConfig:
    batch_size: int = 128              # per process (rank); global = batch_size * world * accumulate
    backend: Literal["auto", "dali", "torch"] = "auto"
    workers: int = 2
    prefetch: int = 2
    persistent_workers: bool = True    # keep the readers (torch workers, DALI pipeline) across epochs
    source_workers: int | None = None  # DALI: processes reading for its source; None = workers on a
                                       # GPU, 0 (in the training process) on the CPU; see shards/loader.py


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 3
    resume: str = "auto"               # auto | never | path to a checkpoint
    save_untrained: bool = False       # write checkpoints/untrained.pt before the first step


@dataclass
class ValidationConfig:
    lfw_shards: str | None = None      # LFW shard folder with pairs; None = no validation
    sets: dict[str, str] = field(default_factory=dict)  # name -> shard folder with pairs (eval/verify.py)
    best: str = "mean"                 # with sets, what picks best.pt: "mean" (of the accuracies) or a set
    every_steps: int = 500
    batch_size: int = 256


@dataclass
class LoggingConfig:
    every_steps: int = 20
    display: Literal["auto", "rich", "plain", "none"] = "auto"   # auto: rich when stderr is a TTY
    tensorboard: Literal["auto", "on", "off"] = "auto"            # auto: when installed


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


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, key + ".")
    return keys


class Sources:
    """Where each value came from, for error lines: the override that set a key, else the file."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.overrides: dict[str, str] = {}   # dotted key -> override text

    def where(self, key: str) -> str:
        for k in (key, *(key.rsplit(".", i)[0] for i in range(1, key.count(".") + 1))):
            if k in self.overrides:
                return f"override '{self.overrides[k]}'"
        return self.file


def _unknown(key: str, where: str, valid: list[str]) -> UserError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{near[0]}'?)" if near else f" (valid: {', '.join(sorted(valid))})"
    return UserError(f"{where}: unknown config key '{key}'{hint}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# YAML 1.1 (PyYAML) reads `1e-3` and `1e6` as strings (it wants a dot and a signed exponent).
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce_literal(value: Any, tp: Any, key: str, where: str) -> Any:
    choices = typing.get_args(tp)
    if isinstance(value, bool) and {"on", "off"} <= set(choices):
        value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be str ({_type_name(tp)}), got {value!r} "
                        f"({type(value).__name__})")
    if value not in choices:
        raise UserError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and minimally convert: int or float text -> float, list -> tuple) a YAML value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        for arm in arms:
            try:
                return _coerce(value, arm, key, where)
            except UserError as err:
                if typing.get_origin(arm) is Literal and isinstance(value, str):
                    raise err from None  # a string meant for the choices: name them
        raise UserError(f"{where}: '{key}' must be {' or '.join(_type_name(a) for a in arms)}, got {value!r}")
    if origin is Literal:
        return _coerce_literal(value, tp, key, where)
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
        if _is_number(value):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if key.endswith(("shards", "dir")) and _is_number(value):
            return str(value)  # a folder named "2024" is still a path
    elif origin in (list, tuple):
        items = typing.get_args(tp)
        if isinstance(value, list) and (origin is list or len(value) == len(items)):
            out = [_coerce(v, items[0] if origin is list else items[i], f"{key}[{i}]", where)
                   for i, v in enumerate(value)]
            return out if origin is list else tuple(out)
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key + ".", _single(where))
        raise UserError(f"{where}: '{key}' is a section; give it as a mapping of keys, not {value!r}")
    raise UserError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _single(where: str | Sources) -> Sources:
    if isinstance(where, Sources):
        return where
    return Sources(where)


def _build(cls: type, data: dict[str, Any], prefix: str, src: Sources | str) -> Any:
    src = _single(src)
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown(key, src.where(key), [f"{prefix}{n}" for n in names])
        tp = hints[k]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(v, dict):
            kwargs[k] = _build(tp, v, key + ".", src)
        else:
            kwargs[k] = _coerce(v, tp, key, src.where(key))
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        sub = node.setdefault(part, {})
        if not isinstance(sub, dict):
            # The prefix is a leaf: the full key cannot exist.
            raise _unknown(dotted, where, _all_keys(TrainConfig))
        node = sub
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


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (a config is UTF-8 YAML)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: invalid YAML{at}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: a config is a mapping of sections (run, data, model, ...)")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or only defaults when path is None), apply overrides, check everything."""
    tree = _read_yaml(Path(path)) if path is not None else {}
    src = Sources(str(path) if path is not None else "config")
    valid = _all_keys(TrainConfig)
    for text in overrides:
        key, value = parse_override(text)
        # backbone kwargs are the backbone's to check; set names are the user's
        free = key.startswith(("model.kwargs.", "validation.sets."))
        if key not in valid and not free:
            raise _unknown(key, f"override '{text}'", valid)
        _set_dotted(tree, key, value, f"override '{text}'")
        src.overrides[key] = text
    cfg = _build(TrainConfig, tree, "", src)
    check(cfg, src)
    return cfg


# Ranges: key -> (test, what the test says). Checked after the types, so values are typed.
def _pos(v: Any) -> bool:
    return v > 0


def _nonneg(v: Any) -> bool:
    return v >= 0


_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "run.seed": (_nonneg, "must be >= 0"),
    "data.synthetic_classes": (_pos, "must be positive"),
    "data.synthetic_per_class": (_pos, "must be positive"),
    "data.synthetic_image_size": (lambda v: len(v) == 2 and min(v) >= 8, "must be [H, W], each >= 8"),
    "data.synthetic_noise": (_nonneg, "must be >= 0"),
    "model.embedding_size": (_pos, "must be positive"),
    "head.s": (_pos, "must be positive"),
    "head.t": (lambda v: v >= 1.0, "must be >= 1 (1 turns SV-Softmax off)"),
    "head.gamma_focal": (_nonneg, "must be >= 0"),
    "head.m1": (lambda v: v is None or v > 0, "must be positive"),
    "head.m2": (lambda v: v is None or 0 <= v < math.pi / 2, "must be in [0, pi/2)"),
    "head.m3": (lambda v: v is None or 0 <= v < 1, "must be in [0, 1)"),
    "head.lambda_base": (lambda v: v is None or v >= 0, "must be >= 0"),
    "head.lambda_min": (lambda v: v is None or v >= 0, "must be >= 0"),
    "head.gamma": (lambda v: v is None or v >= 0, "must be >= 0"),
    "head.power": (lambda v: v is None or v >= 0, "must be >= 0"),
    "head.sample_rate": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "run.collective_timeout_s": (_pos, "must be positive"),
    "optim.lr": (_pos, "must be positive"),
    "optim.momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "optim.weight_decay": (_nonneg, "must be >= 0"),
    "optim.head_weight_decay": (lambda v: v is None or v >= 0, "must be >= 0"),
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two values in [0, 1)"),
    "optim.clip_grad_norm": (_nonneg, "must be >= 0 (0 = off)"),
    "optim.accumulate": (_pos, "must be positive"),
    "optim.max_nonfinite_in_row": (_pos, "must be positive"),
    "schedule.steps": (_nonneg, "must be >= 0"),
    "schedule.epochs": (_nonneg, "must be >= 0"),
    "schedule.warmup_steps": (_nonneg, "must be >= 0"),
    "schedule.min_lr_ratio": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "schedule.power": (_pos, "must be positive"),
    "schedule.milestones": (lambda v: all(m > 0 for m in v), "must be positive (fractions or steps)"),
    "schedule.gamma": (_pos, "must be positive"),
    "loader.batch_size": (_pos, "must be positive"),
    "loader.workers": (_nonneg, "must be >= 0"),
    "loader.prefetch": (_pos, "must be positive"),
    "checkpoint.every_steps": (_pos, "must be positive"),
    "checkpoint.keep_last": (_pos, "must be positive"),
    "validation.every_steps": (_pos, "must be positive"),
    "validation.batch_size": (_pos, "must be positive"),
    "logging.every_steps": (_pos, "must be positive"),
}

# head.m per margin: (test, what the test says)
_MARGIN_M: dict[str, tuple[Callable[[float], bool], str]] = {
    "cosface": (lambda m: 0 <= m < 1, "in [0, 1)"),
    "arcface": (lambda m: 0 <= m < math.pi / 2, "in [0, pi/2) radians"),
    "sphereface": (lambda m: m == int(m) and 1 <= m <= 10, "an integer from 1 to 10"),
}


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_head(head: HeadConfig, src: Sources) -> None:
    if head.m is not None:
        if head.margin == "combined":
            raise UserError(f"{src.where('head.m')}: 'head.m' does not apply to head.margin=combined "
                            "(set head.m1, head.m2, head.m3)")
        test, says = _MARGIN_M[head.margin]
        if not test(head.m):
            raise UserError(f"{src.where('head.m')}: 'head.m' for {head.margin} must be {says}, got {head.m}")
    for margin, names in MARGIN_OPTIONS.items():
        for name in names:
            if getattr(head, name) is not None and head.margin != margin:
                raise UserError(f"{src.where('head.' + name)}: 'head.{name}' applies to "
                                f"head.margin={margin}, not {head.margin}")


def _check_validation(val: ValidationConfig, src: Sources) -> None:
    for name, folder in val.sets.items():
        key = f"validation.sets.{name}"
        if not (isinstance(name, str) and name and all(c.isalnum() or c in "_-." for c in name)):
            raise UserError(f"{src.where(key)}: '{key}': a set name is letters, digits, '_', '-' or '.'")
        if _is_number(folder):
            val.sets[name] = folder = str(folder)  # a folder named "2024" is still a path
        if not isinstance(folder, str) or not folder:
            raise UserError(f"{src.where(key)}: '{key}' must be a shard folder, got {folder!r}")
    names = sorted(set(val.sets) | ({"lfw"} if val.lfw_shards and val.sets else set()))
    if val.sets and val.best != "mean" and val.best not in names:
        raise UserError(f"{src.where('validation.best')}: 'validation.best' must be mean or one of "
                        f"{', '.join(names)}, got {val.best!r}")
    if val.lfw_shards and val.sets.get("lfw", val.lfw_shards) != val.lfw_shards:
        raise UserError(f"{src.where('validation.sets.lfw')}: 'validation.sets.lfw' and "
                        "'validation.lfw_shards' name different folders")


def check(cfg: TrainConfig, src: Sources | str = "config") -> None:
    """Every value in its range and the sections consistent; UserError naming the key otherwise."""
    src = _single(src)
    for key, (test, says) in _RANGES.items():
        value = _get(cfg, key)
        if not test(value):
            raise UserError(f"{src.where(key)}: '{key}' {says}, got {value}")
    _check_head(cfg.head, src)
    _check_validation(cfg.validation, src)
    try:
        dataclasses.replace(cfg.data.augment).validate()  # on a copy: validate() turns lists into tuples
    except UserError as err:  # its message starts "augment.<name>=<value>: ..."
        key = "data." + str(err).split("=", 1)[0]
        raise UserError(f"{src.where(key)}: data.{err}") from None
    if cfg.schedule.steps <= 0 and cfg.schedule.epochs <= 0:
        raise UserError(f"{src.where('schedule.steps')}: set 'schedule.steps' or 'schedule.epochs' "
                        "(both are 0)")
    if cfg.data.source == "shards" and not cfg.data.train_shards:
        raise UserError(f"{src.where('data.train_shards')}: 'data.train_shards' is not set "
                        "(a shard folder from build_shards.py)")
    from models.backbones import available_backbones

    if cfg.model.backbone not in available_backbones():
        raise UserError(f"{src.where('model.backbone')}: 'model.backbone' {cfg.model.backbone!r} is not "
                        f"one of {', '.join(available_backbones())}")
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{src.where('run.dir')}: 'run.dir' {run_dir} is a file, not a folder")


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: what yaml.safe_dump writes and the loader reads back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return _plain(dataclasses.asdict(cfg))


def from_dict(data: dict[str, Any], where: str = "checkpoint config") -> TrainConfig:
    return _build(TrainConfig, data, "", where)


def save_resolved(cfg: TrainConfig, path: Path | str) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False), what="resolved config")
