"""Training configuration: YAML -> typed dataclasses, `key.sub=value` overrides, one-line errors.

Every key is declared once, on its dataclass, with `common.settings.setting`: type, default, range
and help; the allowed values of a choice are its `Literal[...]` type. At load every value is checked:
its type (floats also as YAML 1.1 leaves them, `1e-3`), its range (from the field), and the rules
across keys (`check`). Each error is one UserError line naming the key and where the value came
from (the file, or the `key=value` override), and an unknown key names the nearest valid one. The
names from before the margin and synthetic sections (`head.m1`, `data.synthetic_classes`) are read
as their nested keys (`RENAMED`). `describe_config` is the table `trainer/main.py --help-config`
prints. The resolved config is written to the run folder as YAML, with the nested names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from common.bounded_yaml import parse_yaml, read_yaml
from common.cli import UserError
from common.fileio import atomic_write_text
from common.settings import (
    AT_LEAST_0,
    FRACTION,
    POSITIVE,
    Range,
    all_keys,
    describe,
    format_table,
    hints,
    is_section,
    range_error,
    section,
    setting,
    type_name,
)
from shards.augment import AugmentConfig

# Upper bounds on what a key makes the trainer allocate or start, far above any real run: a typo of
# a few zeros is refused in one line instead of filling the memory (or the process table).
BATCH = Range(1, 16384)  # images per process: 16384 x 3 x 112 x 112 float32 is 2.4 GB
PROCESSES = Range(0, 256)  # reader processes per training process


@dataclass
class RunConfig:
    name: str = setting("run", "the run's name (logs, TensorBoard)")
    dir: str = setting("runs/run", "run folder: checkpoints/, metrics.jsonl, config.yaml")
    seed: int = setting(0, "seeds the weights, the data order and the augmentation", range=AT_LEAST_0)
    devices: list[int] | Literal["auto", "cpu"] = setting(
        "auto", "GPU ids for this node, or auto (all visible) or cpu"
    )
    deterministic: bool = setting(False, "cuDNN deterministic algorithms (slower)")
    collective_timeout_s: float = setting(
        300.0, "a rank stuck this long in a collective ends the job (torchrun)", range=POSITIVE
    )


@dataclass
class SyntheticConfig:
    """data.source=synthetic: in-memory patterns, one per class, plus noise (trainer/synthetic.py)."""

    classes: int = setting(16, "identities", range=POSITIVE)
    per_class: int = setting(8, "images per identity (an epoch: classes * per_class)", range=POSITIVE)
    image_size: tuple[int, int] = setting((112, 112), "[H, W] in pixels", range=Range(8, 1024))
    noise: float = setting(0.5, "noise added to each pattern (higher: harder)", range=AT_LEAST_0)


@dataclass
class DataConfig:
    source: Literal["shards", "synthetic"] = setting(
        "shards", "shards: data.train_shards; synthetic: in-memory patterns (tests, GPU benches)"
    )
    train_shards: str | None = setting(None, "folder with manifest.json (preprocess/build_shards.py)")
    verify: Literal["none", "size", "sha256"] = setting("size", "how the manifest's shards are checked")
    augment: AugmentConfig = section(AugmentConfig, "training augmentation (shards/augment.py)")
    synthetic: SyntheticConfig = section(SyntheticConfig, "the synthetic source (data.source=synthetic)")


@dataclass
class ModelConfig:
    backbone: str = setting("tiny", "a name of models.backbones.available_backbones()")
    embedding_size: int = setting(128, "embedding dimension", range=Range(1, 8192))
    kwargs: dict[str, Any] = setting({}, "the backbone's own options (width, width_mult, depths, ...)")
    channels_last: bool = setting(True, "channels-last memory format (faster convolutions on GPUs)")
    compile: bool = setting(False, "torch.compile the backbone (the head stays eager)")
    compile_backend: str = setting("inductor", "torch.compile's backend: inductor, cudagraphs, ...")
    init_from: str | None = setting(
        None,
        "start the backbone from this embedding-model file or checkpoint "
        "(eval/import_insightface.py makes one); the head starts new",
    )


# A margin's own options: a section of HeadConfig named after the margin (head.<margin>.<key>), None
# leaving the margin's default. Adding a margin's options = its dataclass + its line in HeadConfig.
@dataclass
class SphereFaceConfig:
    """lambda = max(lambda_min, lambda_base * (1 + gamma * step) ** -power), the paper's annealing."""

    lambda_base: float | None = setting(None, "annealing start (default 1000)", range=AT_LEAST_0)
    lambda_min: float | None = setting(None, "annealing floor (default 5)", range=AT_LEAST_0)
    gamma: float | None = setting(None, "annealing speed (default 0.12)", range=AT_LEAST_0)
    power: float | None = setting(None, "annealing power (default 1)", range=AT_LEAST_0)


@dataclass
class CombinedConfig:
    """cos(m1 theta + m2) - m3."""

    m1: float | None = setting(None, "angle factor (default 1.0)", range=POSITIVE)
    m2: float | None = setting(
        None, "additive angular margin (default 0.3)", range=Range(0, math.pi / 2, "[)")
    )
    m3: float | None = setting(None, "additive cosine margin (default 0.2)", range=FRACTION)


@dataclass
class AdaFaceConfig:
    """The margin follows the norm's place in running statistics of the batches' norms (head.m: 0.4)."""

    h: float | None = setting(
        None, "the standardized norm's factor before clipping to [-1, 1] (default 0.333)", range=POSITIVE
    )
    t_alpha: float | None = setting(
        None, "the running statistics' momentum (default 0.01)", range=Range(0, 1, "(]")
    )


@dataclass
class MagFaceConfig:
    """m(a) linear in the clamped norm a, from l_m at l_a to u_m at u_a, and lambda_g (a/u_a^2 + 1/a)."""

    l_a: float | None = setting(None, "the norm's lower clamp (default 10)", range=POSITIVE)
    u_a: float | None = setting(None, "the norm's upper clamp (default 110), above l_a", range=POSITIVE)
    l_m: float | None = setting(None, "the margin at l_a (default 0.45)", range=Range(0, math.pi / 2, "[)"))
    u_m: float | None = setting(None, "the margin at u_a (default 0.8)", range=Range(0, math.pi / 2, "[)"))
    lambda_g: float | None = setting(None, "the norm regularizer's weight (default 35)", range=AT_LEAST_0)


@dataclass
class HeadConfig:
    """The margin head (heads.MarginHead). Options of another margin than the chosen one are refused."""

    margin: Literal[
        "cosface", "arcface", "sphereface", "combined", "adaface", "magface", "curricularface"
    ] = setting("cosface", "the margin")
    s: float = setting(64.0, "logit scale", range=POSITIVE)
    m: float | None = setting(
        None,
        "margin: cosface 0.35, arcface 0.5, sphereface 4 (an integer), adaface "
        "0.4, curricularface 0.5 when null; not for combined or magface",
    )
    t: float = setting(1.0, "SV-Softmax t (1 turns it off)", range=Range(1))
    impl: Literal["auto", "reference", "chunked", "fused"] = setting(
        "auto", "the head's engine (heads/); fused: CUDA + Triton"
    )
    gamma_focal: float = setting(0.0, "> 0 adds the focal term", range=AT_LEAST_0)
    save_logits: bool = setting(
        False,
        "fused: keep the forward's B x C cosines (2 bytes each) so the "
        "backward skips recomputing them (about 1.2x faster backward)",
    )
    parallel: Literal["auto", "replicate", "shard"] = setting(
        "auto",
        "several processes: shard splits the classes over the ranks (outside DDP), replicate "
        "keeps the whole head on every rank (in DDP); auto = shard with more than one process",
    )
    sample_rate: float = setting(
        1.0, "Partial FC (shard): share of each rank's classes per step", range=Range(0, 1, "(]")
    )
    subcenters: int = setting(
        1,
        "sub-center ArcFace (any margin): K centres per class, a class's cosine the "
        "largest of its K; every impl, replicated or sharded (whole classes per rank)",
        range=POSITIVE,
    )
    grad_dtype: Literal["float32", "bfloat16"] = setting(
        "float32",
        "the head weight's gradient (C x D): bfloat16 halves its memory and the backward's and "
        "the step's traffic over it (summed over the batch in fp32, each element then rounded, "
        "2^-8 relative at most); needs optim.name=sgd, optim.accumulate=1, torch >= 2.10 and, on "
        "several processes, a sharded head",
    )
    sphereface: SphereFaceConfig = section(SphereFaceConfig, "head.margin=sphereface: the annealing")
    combined: CombinedConfig = section(CombinedConfig, "head.margin=combined: cos(m1 theta + m2) - m3")
    adaface: AdaFaceConfig = section(AdaFaceConfig, "head.margin=adaface: the norm-adaptive margin")
    magface: MagFaceConfig = section(
        MagFaceConfig, "head.margin=magface: the norm-dependent margin and regularizer"
    )


def margin_options(head: HeadConfig) -> dict[str, Any]:
    """Each margin that has a section -> its section in `head`."""
    return {
        f.name: getattr(head, f.name)
        for f in dataclasses.fields(head)
        if dataclasses.is_dataclass(getattr(head, f.name))
    }


def head_kwargs(head: HeadConfig) -> dict[str, Any]:
    """The keyword arguments of heads.MarginHead for this section (None: the head's default)."""
    kwargs: dict[str, Any] = {
        "margin": head.margin,
        "s": head.s,
        "m": head.m,
        "t": head.t,
        "impl": head.impl,
        "gamma_focal": head.gamma_focal,
        "save_logits": head.save_logits,
        "subcenters": head.subcenters,
    }
    options = margin_options(head).get(head.margin)
    if options is not None:
        kwargs.update({k: v for k, v in dataclasses.asdict(options).items() if v is not None})
    return kwargs


@dataclass
class DistillConfig:
    """Knowledge distillation (trainer/distill.py): a frozen teacher embeds the same images; the loss
    between the student's and the teacher's unit-length embeddings is added to the margin loss."""

    teacher: str | None = setting(
        None,
        "the teacher: a checkpoint (.pt), ONNX (.onnx) or OpenVINO (.xml) model file, with this "
        "run's embedding size and the data's face size; null: no distillation",
    )
    weight: float = setting(
        1.0, "the distillation term's weight (0: computed and logged, not trained on)", range=AT_LEAST_0
    )
    loss: Literal["cosine", "l2"] = setting(
        "cosine", "cosine: mean of 1 - cos; l2: mean of |s - t|^2, which on unit vectors is 2 x cosine"
    )


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = setting("sgd", "the optimizer")
    lr: float = setting(0.1, "for the global batch of the config (no implicit scaling)", range=POSITIVE)
    momentum: float = setting(0.9, "sgd momentum", range=FRACTION)
    nesterov: bool = setting(False, "sgd Nesterov momentum")
    weight_decay: float = setting(5e-4, "not applied to norms and biases", range=AT_LEAST_0)
    head_weight_decay: float | None = setting(
        None, "the head's weight decay; null: weight_decay", range=AT_LEAST_0
    )
    betas: tuple[float, float] = setting((0.9, 0.999), "adamw betas", range=FRACTION)
    backbone_lr_mult: float = setting(
        1.0,
        "the backbone's learning rate is optim.lr times this (fine-tuning "
        "from model.init_from: < 1; 0 freezes it)",
        range=AT_LEAST_0,
    )
    clip_grad_norm: float = setting(0.0, "gradient norm clip (0 = off)", range=AT_LEAST_0)
    accumulate: int = setting(1, "micro-batches per optimizer step", range=POSITIVE)
    max_nonfinite_in_row: int = setting(
        20, "divergence guard: stop after this many skipped steps in a row", range=POSITIVE
    )


@dataclass
class ScheduleConfig:
    steps: int = setting(0, "optimizer steps in total; 0 = from epochs", range=AT_LEAST_0)
    epochs: float = setting(0.0, "epochs, when steps is 0", range=AT_LEAST_0)
    warmup_steps: int = setting(0, "linear warmup from 0", range=AT_LEAST_0)
    decay: Literal["cosine", "poly", "step", "constant"] = setting("cosine", "the learning-rate decay")
    min_lr_ratio: float = setting(0.0, "the lowest learning rate, as a share of optim.lr", range=Range(0, 1))
    power: float = setting(2.0, "poly: the power", range=POSITIVE)
    milestones: list[float] = setting(
        [0.5, 0.75], "step: where the rate drops, as fractions of the steps (or steps)", range=POSITIVE
    )
    gamma: float = setting(0.1, "step: the factor at each milestone", range=POSITIVE)


@dataclass
class PrecisionConfig:
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = setting(
        "auto", "auto: bf16 on a GPU that has it, else fp32"
    )


@dataclass
class LoaderConfig:
    batch_size: int = setting(
        128, "per process (rank); global = batch_size * world * accumulate", range=BATCH
    )
    backend: Literal["auto", "dali", "torch"] = setting(
        "auto", "auto: dali when installed and it can run on the device, else torch"
    )
    workers: int = setting(2, "reader processes", range=PROCESSES)
    prefetch: int = setting(
        2, "batches read ahead (DALI queue depth, torch prefetch_factor)", range=Range(1, 64)
    )
    persistent_workers: bool = setting(True, "keep the readers (torch workers, DALI pipeline) across epochs")
    source_workers: int | None = setting(
        None,
        "DALI: processes reading for its source; null = workers on a GPU, 0 (in the training "
        "process) on the CPU; see shards/loader.py",
        range=PROCESSES,
    )


@dataclass
class CheckpointConfig:
    every_steps: int = setting(500, "a checkpoint every this many steps", range=POSITIVE)
    keep_last: int = setting(3, "step checkpoints kept (last.pt and best.pt besides)", range=POSITIVE)
    resume: str = setting("auto", "auto | never | path to a checkpoint")
    save_untrained: bool = setting(False, "write checkpoints/untrained.pt before the first step")


@dataclass
class ValidationConfig:
    lfw_shards: str | None = setting(None, "LFW shard folder with pairs; null = no validation")
    sets: dict[str, str] = setting({}, "name -> shard folder with pairs (eval/verify.py)")
    best: str = setting("mean", "with sets, what picks best.pt: mean (of the accuracies) or a set name")
    every_steps: int = setting(500, "validate every this many steps", range=POSITIVE)
    batch_size: int = setting(256, "images per forward pass", range=BATCH)


@dataclass
class LoggingConfig:
    every_steps: int = setting(20, "a metrics line every this many steps", range=POSITIVE)
    display: Literal["auto", "rich", "plain", "none"] = setting("auto", "auto: rich when stderr is a TTY")
    tensorboard: Literal["auto", "on", "off"] = setting("auto", "auto: when installed")


@dataclass
class TrainConfig:
    run: RunConfig = section(RunConfig, "the run: name, folder, seed, devices")
    data: DataConfig = section(DataConfig, "training data")
    model: ModelConfig = section(ModelConfig, "the backbone")
    head: HeadConfig = section(HeadConfig, "the margin head")
    distill: DistillConfig = section(DistillConfig, "knowledge distillation from a frozen teacher")
    optim: OptimConfig = section(OptimConfig, "the optimizer")
    schedule: ScheduleConfig = section(ScheduleConfig, "length and learning-rate schedule")
    precision: PrecisionConfig = section(PrecisionConfig, "mixed precision")
    loader: LoaderConfig = section(LoaderConfig, "the shard loader")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints in the run folder")
    validation: ValidationConfig = section(ValidationConfig, "validation during training")
    logging: LoggingConfig = section(LoggingConfig, "progress, metrics.jsonl, TensorBoard")


# The names from before the margin and synthetic sections: still read (old configs, old run folders).
RENAMED = {
    **{f"head.{k}": f"head.combined.{k}" for k in ("m1", "m2", "m3")},
    **{f"head.{k}": f"head.sphereface.{k}" for k in ("lambda_base", "lambda_min", "gamma", "power")},
    **{f"data.synthetic_{k}": f"data.synthetic.{k}" for k in ("classes", "per_class", "image_size", "noise")},
}


def describe_config() -> str:
    """Every key: type, default, range, help (plain aligned text)."""
    return format_table(describe(TrainConfig), ("key", "type", "default", "range", "help"))


class Sources:
    """Where each value came from, for error lines: the override that set a key, else the file."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.overrides: dict[str, str] = {}  # dotted key -> override text

    def where(self, key: str) -> str:
        for k in (key, *(key.rsplit(".", i)[0] for i in range(1, key.count(".") + 1))):
            if k in self.overrides:
                return f"override '{self.overrides[k]}'"
        return self.file


def _unknown(key: str, where: str, valid: list[str]) -> UserError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{near[0]}'?)" if near else f" (valid: {', '.join(sorted(valid))})"
    return UserError(f"{where}: unknown config key '{key}'{hint}")


# YAML 1.1 (PyYAML) reads `1e-3` and `1e6` as strings (it wants a dot and a signed exponent).
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce_literal(value: Any, tp: Any, key: str, where: str) -> Any:
    choices = typing.get_args(tp)
    if isinstance(value, bool) and {"on", "off"} <= set(choices):
        value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
    if not isinstance(value, str):
        raise UserError(
            f"{where}: '{key}' must be str ({type_name(tp)}), got {value!r} ({type(value).__name__})"
        )
    if value not in choices:
        raise UserError(f"{where}: '{key}' must be {type_name(tp)}, got {value!r}")
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
        raise UserError(f"{where}: '{key}' must be {type_name(tp)}, got {value!r}")
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
            out = [
                _coerce(v, items[0] if origin is list else items[i], f"{key}[{i}]", where)
                for i, v in enumerate(value)
            ]
            return out if origin is list else tuple(out)
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key + ".", _single(where))
        raise UserError(f"{where}: '{key}' is a section; give it as a mapping of keys, not {value!r}")
    raise UserError(f"{where}: '{key}' must be {type_name(tp)}, got {value!r} ({type(value).__name__})")


def _single(where: str | Sources) -> Sources:
    if isinstance(where, Sources):
        return where
    return Sources(where)


def _nest_renamed(data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A section's mapping with the old flat names (RENAMED) moved to their nested keys; where the
    nested key is given too, it wins (so an override in either spelling beats the file's)."""
    out = dict(data)
    for old, new in RENAMED.items():
        name = old[len(prefix) :]
        if not old.startswith(prefix) or "." in name or name not in out:
            continue
        value = out.pop(name)
        *parents, leaf = new[len(prefix) :].split(".")
        node = out
        for part in parents:
            sub = node.get(part, {})
            if not isinstance(sub, dict):
                break  # not a mapping: building the section names the mistake
            node[part] = node = dict(sub)
        else:
            node.setdefault(leaf, value)
    return out


def _build(cls: type, data: dict[str, Any], prefix: str, src: Sources | str) -> Any:
    src = _single(src)
    data = _nest_renamed(data, prefix)
    types_ = hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown(key, src.where(key), [f"{prefix}{k}" for k in all_keys(cls)])
        tp = types_[k]
        if is_section(tp) and isinstance(v, dict):
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
            raise _unknown(dotted, where, all_keys(TrainConfig))
        node = sub
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key, YAML scalar/list value)."""
    if "=" not in text or text.startswith("="):
        raise UserError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    value = parse_yaml(raw, f"override '{text}'") if raw != "" else None
    return key.strip(), value


def _read_yaml(path: Path) -> dict[str, Any]:
    loaded = read_yaml(path, "config")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: a config is a mapping of sections (run, data, model, ...)")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or only defaults when path is None), apply overrides, check everything."""
    tree = _read_yaml(Path(path)) if path is not None else {}
    src = Sources(str(path) if path is not None else "config")
    valid = all_keys(TrainConfig)
    for text in overrides:
        key, value = parse_override(text)
        key = RENAMED.get(key, key)
        # backbone kwargs are the backbone's to check; set names are the user's
        free = key.startswith(("model.kwargs.", "validation.sets."))
        if key not in valid and not free:
            raise _unknown(key, f"override '{text}'", valid)
        _set_dotted(tree, key, value, f"override '{text}'")
        src.overrides[key] = text
    cfg = _build(TrainConfig, tree, "", src)
    check(cfg, src)
    return cfg


# head.m per margin: (test, what the test says)
_MARGIN_M: dict[str, tuple[Callable[[float], bool], str]] = {
    "cosface": (lambda m: 0 <= m < 1, "in [0, 1)"),
    "arcface": (lambda m: 0 <= m < math.pi / 2, "in [0, pi/2) radians"),
    "sphereface": (lambda m: m == int(m) and 1 <= m <= 10, "an integer from 1 to 10"),
    "adaface": (lambda m: 0 <= m < math.pi / 2, "in [0, pi/2) radians"),
    "curricularface": (lambda m: 0 <= m < math.pi / 2, "in [0, pi/2) radians"),
}
_NO_M = {
    "combined": "set head.combined.m1, head.combined.m2, head.combined.m3",
    "magface": "its margin goes from head.magface.l_m to head.magface.u_m with the norm",
}


def _check_head(head: HeadConfig, src: Sources) -> None:
    if head.m is not None:
        if head.margin in _NO_M:
            raise UserError(
                f"{src.where('head.m')}: 'head.m' does not apply to head.margin={head.margin} "
                f"({_NO_M[head.margin]})"
            )
        test, says = _MARGIN_M[head.margin]
        if not test(head.m):
            raise UserError(f"{src.where('head.m')}: 'head.m' for {head.margin} must be {says}, got {head.m}")
    if head.margin == "curricularface" and head.t != 1.0:
        raise UserError(
            f"{src.where('head.t')}: 'head.t' (SV-Softmax) must be 1 with "
            "head.margin=curricularface (both change the hard negatives)"
        )
    mag = head.magface
    if head.margin == "magface" and (mag.l_a or 10.0) >= (mag.u_a or 110.0):
        raise UserError(
            f"{src.where('head.magface.u_a')}: 'head.magface.u_a' must be above head.magface.l_a "
            f"({mag.u_a or 110.0} <= {mag.l_a or 10.0})"
        )
    for margin, options in margin_options(head).items():
        given = [name for name, value in dataclasses.asdict(options).items() if value is not None]
        if given and margin != head.margin:
            key = f"head.{margin}.{given[0]}"
            raise UserError(f"{src.where(key)}: '{key}' applies to head.margin={margin}, not {head.margin}")


def _check_head_grad_dtype(cfg: TrainConfig, src: Sources) -> None:
    """head.grad_dtype=bfloat16 where the gradient's consumers take a bf16 gradient of the fp32
    weight: FusedHeadSGD reads it (torch's AdamW fails on it), and a backward writes it whole (a
    second micro-batch's would be added in bf16)."""
    if cfg.head.grad_dtype == "float32":
        return
    where = f"{src.where('head.grad_dtype')}: 'head.grad_dtype' {cfg.head.grad_dtype}"
    if cfg.optim.name != "sgd":
        raise UserError(
            f"{where} needs optim.name=sgd (torch's {cfg.optim.name} cannot step an fp32 weight "
            f"with a bf16 gradient), got optim.name={cfg.optim.name}"
        )
    if cfg.optim.accumulate > 1:
        raise UserError(
            f"{where} needs optim.accumulate=1 (autograd would sum the micro-batches' gradients "
            f"in bf16), got optim.accumulate={cfg.optim.accumulate}"
        )
    import torch

    from heads.core import GRAD_DTYPE_SUPPORTED

    if not GRAD_DTYPE_SUPPORTED:
        raise UserError(
            f"{where} needs torch >= 2.10 (a parameter's grad_dtype); this is torch {torch.__version__}"
        )


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
        raise UserError(
            f"{src.where('validation.best')}: 'validation.best' must be mean or one of "
            f"{', '.join(names)}, got {val.best!r}"
        )
    if val.lfw_shards and val.sets.get("lfw", val.lfw_shards) != val.lfw_shards:
        raise UserError(
            f"{src.where('validation.sets.lfw')}: 'validation.sets.lfw' and "
            "'validation.lfw_shards' name different folders"
        )


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this OS
        return None


def _check_synthetic_fits(syn: SyntheticConfig, src: Sources) -> None:
    """The synthetic set is built in memory as float32, about four copies at its peak: refuse one
    that cannot fit before building it."""
    h, w = syn.image_size
    need = 4 * syn.classes * syn.per_class * 3 * h * w * 4
    have = _physical_memory()
    if have is not None and need > have:
        raise UserError(
            f"{src.where('data.synthetic.classes')}: 'data.synthetic' classes x per_class x "
            f"image_size {syn.classes} x {syn.per_class} x {h}x{w} needs about "
            f"{need / 2**30:.1f} GiB to build, more than this machine's {have / 2**30:.1f} GiB"
        )


def check(cfg: TrainConfig, src: Sources | str = "config") -> None:
    """Every value in its range and the sections consistent; UserError naming the key otherwise."""
    src = _single(src)
    outside = range_error(cfg)
    if outside is not None:
        key, value, allowed = outside
        raise UserError(f"{src.where(key)}: '{key}' must be {allowed}, got {_plain(value)}")
    _check_head(cfg.head, src)
    from heads.core import FUSED_DIM_MULTIPLE

    if cfg.head.impl == "fused" and cfg.model.embedding_size % FUSED_DIM_MULTIPLE:
        raise UserError(
            f"{src.where('head.impl')}: 'head.impl' fused needs model.embedding_size to be a multiple "
            f"of {FUSED_DIM_MULTIPLE} (its kernels read 16-byte rows), got {cfg.model.embedding_size}; "
            "use head.impl=auto (chunked for this size)"
        )
    _check_head_grad_dtype(cfg, src)
    _check_validation(cfg.validation, src)
    try:
        dataclasses.replace(cfg.data.augment).validate()  # its rules across keys; on a copy: it edits
    except UserError as err:  # its message starts "augment.<name>=<value>: ..."
        key = "data." + str(err).split("=", 1)[0]
        raise UserError(f"{src.where(key)}: data.{err}") from None
    if cfg.schedule.steps <= 0 and cfg.schedule.epochs <= 0:
        raise UserError(
            f"{src.where('schedule.steps')}: set 'schedule.steps' or 'schedule.epochs' (both are 0)"
        )
    if cfg.data.source == "synthetic":
        _check_synthetic_fits(cfg.data.synthetic, src)
    if cfg.data.source == "shards" and not cfg.data.train_shards:
        raise UserError(
            f"{src.where('data.train_shards')}: 'data.train_shards' is not set "
            "(a shard folder from build_shards.py)"
        )
    from models.backbones import available_backbones

    if cfg.model.backbone not in available_backbones():
        raise UserError(
            f"{src.where('model.backbone')}: 'model.backbone' {cfg.model.backbone!r} is not "
            f"one of {', '.join(available_backbones())}"
        )
    teacher = cfg.distill.teacher
    if teacher is not None and not Path(teacher).is_file():
        raise UserError(f"{src.where('distill.teacher')}: 'distill.teacher' {teacher}: no such file")
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{src.where('run.dir')}: 'run.dir' {run_dir} is a file, not a folder")


def recipe_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that load and run but are known to train badly: one warning line each (the trainer
    logs them at the start; `check` refuses only what cannot run)."""
    lines = []
    # the registered face ViTs are vit_t, vit_s, vit_b, vit_l (models/backbones/vit.py)
    if cfg.model.backbone.startswith("vit") and cfg.optim.name == "sgd":
        lines.append(
            f"warning: model.backbone={cfg.model.backbone} with optim.name=sgd: vision transformers "
            "stall or go NaN with SGD at a CNN's learning rate (insightface issues #2144, #2537); the "
            "published recipe is AdamW (lr 1e-3, weight decay 0.1) with a warm-up: "
            "configs/webface42m_vit_b.yaml"
        )
    return lines


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
