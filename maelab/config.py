"""Typed configuration: dataclass sections, YAML presets, and command-line flags generated from them.

Precedence: dataclass defaults < ``--config file.yaml`` < explicit ``--flag value``. Field names are
unique across sections, so a YAML file may be flat (``epochs: 10``) or sectioned (``optim: {epochs:
10}``), and every field is one ``--flag``. Help texts live next to the fields, in ``metadata``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from maelab.errors import MaelabError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    model: str = _f("mae_vit_tiny_patch4", "model preset (see `maelab models`)")
    img_size: list[int] | None = _f(None, "input size: one number (square) or two (height width); default: the preset's")
    mask_ratio: float = _f(0.75, "fraction of patches removed, in (0, 1): at least one patch must be masked and "
                                 "one stay visible")
    norm_pix_loss: bool = _f(True, "regress per-patch normalised pixels (better representations)")
    decoder_embed_dim: int | None = _f(None, "decoder width (default: the preset's)")
    decoder_depth: int | None = _f(None, "decoder blocks (default: the preset's)")
    decoder_num_heads: int | None = _f(None, "decoder attention heads (default: the preset's)")


@dataclass
class DataConfig:
    data: str = _f("", "image folder: an ImageFolder tree (<class>/<image>) or a flat folder of images")
    batch_size: int = _f(128, "images per process per micro-step")
    num_workers: int = _f(-1, "data-loading processes; -1 = one per CPU core, at most 8")
    in_memory: str = _f("auto", "decode the dataset once into RAM and augment whole batches: auto | yes | no", choices=("auto", "yes", "no"))
    min_crop_scale: float = _f(0.2, "RandomResizedCrop minimum area fraction")
    hflip: bool = _f(True, "random horizontal flip")
    bad_files: str = _f("error", "unreadable image: stop with its path (error) or leave it out (skip)", choices=("error", "skip"))
    limit_images: int = _f(0, "train on a fixed seeded random subset of N images (0 = all); for quick runs")


@dataclass
class ScheduleConfig:
    """What every optimizer shares: length, per-iteration warm-up + cosine, decay, accumulation."""

    epochs: int = _f(10, "training epochs")
    warmup_epochs: float = _f(1.0, "linear warm-up length in epochs (per-iteration schedule)")
    base_lr: float = _f(1.5e-4, "learning rate per 256 images: lr = base_lr * effective batch / 256")
    lr: float | None = _f(None, "absolute learning rate (overrides base_lr)")
    min_lr: float = _f(0.0, "learning rate at the end of the cosine")
    weight_decay: float = _f(0.05, "AdamW weight decay (not applied to biases, norms, tokens, position embeddings)")
    accum_iter: int = _f(1, "micro-steps accumulated per optimizer step")
    clip_grad: float | None = _f(None, "clip the gradient norm to this value (> 0; none = no clipping)")


@dataclass
class OptimConfig(ScheduleConfig):
    betas: list[float] = _f([0.9, 0.95], "AdamW betas, two numbers in [0, 1)")


@dataclass
class TrainRunConfig:
    out: str = _f("runs/finetune", "run folder (config, checkpoints, logs, results.json); an existing run resumes")
    seed: int = _f(0, "seed for initialisation, data order, augmentation and mixup")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N | mps")
    precision: str = _f("auto", "auto | fp32 | bf16 | fp16 (autocast; fp16 uses a GradScaler). auto = bf16 on a CUDA "
                                "GPU that has it, fp32 elsewhere", choices=("auto", "fp32", "bf16", "fp16"))
    resume: str = _f("auto", "auto (continue a run found in --out) | never | PATH of a checkpoint")
    log_every: int = _f(20, "optimizer steps between log lines / host syncs")
    save_every: int = _f(5, "keep a checkpoint every N epochs (the latest is always saved)")
    keep: int = _f(3, "periodic checkpoints to keep (0 = all)")
    compile: bool = _f(False, "torch.compile the model")


@dataclass
class RunConfig(TrainRunConfig):
    out: str = _f("runs/pretrain", "run folder (config, checkpoints, logs, pictures); an existing run resumes")
    seed: int = _f(0, "seed for initialisation, data order, augmentation and masking")
    vis_every: int = _f(5, "reconstruction grid every N epochs (0 = only at the end)")


@dataclass
class MonitorConfig:
    knn_every: int = _f(0, "weighted kNN accuracy of the encoder's features every N epochs and at the end "
                           "(0 = off); needs class folders in --data")
    knn_data: str = _f("", "labelled held-out images for the kNN monitor (default: a sibling val / test folder of --data)")
    knn_max: int = _f(5000, "images of each split the kNN monitor uses (a fixed seeded subsample; 0 = all)")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


# --- generic machinery ----------------------------------------------------------------------------
def _leaf_fields(cls: type) -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Field name -> (section name or None, field) for a config made of sections or flat fields."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            for sub in fields(hints[f.name]):
                out[sub.name] = (f.name, sub)
        else:
            out[f.name] = (None, f)
    return out


def _field_type(cls: type, section: str | None, name: str) -> Any:
    owner = typing.get_type_hints(cls)[section] if section else cls
    return typing.get_type_hints(owner)[name]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, name: str) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise MaelabError(f"{name} needs a value")
    try:
        if typing.get_origin(inner) is list:
            (item,) = typing.get_args(inner)
            seq = value if isinstance(value, (list, tuple)) else [value]
            return [item(v) for v in seq]
        if inner is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if inner is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return inner(value)
    except (TypeError, ValueError):
        raise MaelabError(f"{name}: cannot read {value!r} as {getattr(inner, '__name__', inner)}") from None


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per config field (defaults suppressed so only explicit flags override)."""
    parser.add_argument("--config", metavar="YAML", help="YAML preset (a path, or a name in configs/)")
    for name, (section, f) in _leaf_fields(cls).items():
        tp, _ = _unwrap_optional(_field_type(cls, section, name))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f"{f.metadata.get('help', '')} [default: {default}]"
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, nargs="+", metavar=name.upper(), **kw)
        else:
            parser.add_argument(flag, metavar=name.upper(), **kw)


def resolve_preset(path_or_name: str) -> Path:
    p = Path(path_or_name)
    candidates = [p, CONFIG_DIR / p, CONFIG_DIR / f"{path_or_name}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise MaelabError(f"config {path_or_name!r} not found (presets: {', '.join(names) or 'none'})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise MaelabError(f"cannot read config {path}: {e}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MaelabError(f"config {path} must be a mapping of field: value")
    return data


def _flatten(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    leaves = _leaf_fields(cls)
    sections = {s for s, _ in leaves.values() if s}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key in sections and isinstance(value, dict):
            flat.update(_flatten(cls, value, source))
        elif key in leaves:
            flat[key] = value
        else:
            raise MaelabError(f"unknown config field {key!r} in {source}; valid fields: {', '.join(leaves)}")
    return flat


def build_config(cls: type, overrides: dict[str, Any] | None = None, yaml_path: str | None = None):
    """Defaults, then the YAML preset, then explicit overrides; every value type-checked."""
    flat: dict[str, Any] = {}
    if yaml_path:
        path = resolve_preset(yaml_path)
        flat.update(_flatten(cls, load_yaml(path), str(path)))
    flat.update(_flatten(cls, overrides or {}, "the command line"))
    leaves = _leaf_fields(cls)
    hints = typing.get_type_hints(cls)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for name, value in flat.items():
        section, _ = leaves[name]
        value = _coerce(value, _field_type(cls, section, name), name)
        (sections.setdefault(section, {}) if section else top)[name] = value
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            top[f.name] = hints[f.name](**sections.get(f.name, {}))
    return cls(**top)


def config_from_args(cls: type, args: argparse.Namespace):
    leaves = _leaf_fields(cls)
    overrides = {k: v for k, v in vars(args).items() if k in leaves}
    return build_config(cls, overrides, getattr(args, "config", None))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    from maelab.train.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())


# --- downstream commands: finetune, linprobe, knn, features -----------------------------------------
# Defaults follow the official ViT-B recipes (fine-tune: AdamW, layer decay 0.65, drop path 0.1,
# RandAugment, mixup 0.8 / cutmix 1.0, smoothing 0.1, erasing 0.25, 100 epochs, 5 warm-up; linear
# probe: LARS, base lr 0.1, no weight decay, 90 epochs, 10 warm-up). Presets: configs/*.yaml.
POOLS = ("token", "avg")


@dataclass
class EncoderConfig:
    init: str = _f("", "encoder weights: a maelab run / checkpoint folder / .safetensors, an official MAE .pth, a "
                       "timm checkpoint, a Hugging Face ViTMAE folder, or `none` (random init, the baseline)")
    model: str | None = _f(None, "model preset: the architecture for --init none; with a checkpoint it must "
                                 "match (default: the checkpoint's)")
    img_size: list[int] | None = _f(None, "input size, one or two numbers (default: the checkpoint's); position "
                                          "embeddings are resized bicubically when it differs")
    global_pool: str = _f("token", "features: the cls token after the final norm (token) or the mean of the "
                                   "patch tokens after it (avg)", choices=POOLS)
    num_heads: int | None = _f(None, "encoder attention heads, for files that do not record them (official .pth, "
                                     "timm); default: the paper's table (192: 3, 384: 6, 768: 12, 1024/1280: 16)")


@dataclass
class FinetuneModelConfig(EncoderConfig):
    global_pool: str = _f("avg", "head input: mean of the patch tokens + a new fc_norm (avg, the recipe) or the "
                                 "cls token after the final norm (token)", choices=POOLS)
    drop_path: float = _f(0.1, "stochastic depth rate (recipe: ViT-B 0.1, L 0.2, H 0.3)")


@dataclass
class ImagesConfig:
    data: str = _f("", "image folder: an ImageFolder tree (<class>/<image>) or a flat folder of images")
    batch_size: int = _f(128, "images per process per (micro-)batch")
    num_workers: int = _f(-1, "data-loading processes; -1 = one per CPU core, at most 8")
    in_memory: str = _f("auto", "decode images once into RAM: auto (when they fit and already have the input "
                                "size) | yes | no", choices=("auto", "yes", "no"))
    crop_pct: float = _f(0.875, "evaluation view: resize to size / crop_pct and centre-crop (images already at "
                                "the input size are used as they are)")
    bad_files: str = _f("error", "unreadable image: stop with its path (error) or leave it out (skip)",
                        choices=("error", "skip"))


@dataclass
class ClassDataConfig(ImagesConfig):
    data: str = _f("", "training split: an ImageFolder tree (<class>/<image>)")
    val_data: str = _f("", "validation split, same class folders (default: a sibling val / validation / test "
                           "folder when --data is called train)")
    num_classes: int | None = _f(None, "expected number of classes, checked against the class folders")
    limit_images: int = _f(0, "use a fixed seeded random subset of N images of each split (0 = all); for quick runs")


@dataclass
class AugmentConfig:
    min_crop_scale: float = _f(0.08, "RandomResizedCrop minimum area fraction")
    hflip: bool = _f(True, "random horizontal flip")
    auto_augment: str | None = _f("rand-m9-mstd0.5-inc1", "RandAugment policy in timm syntax (rand-m9-mstd0.5-inc1, "
                                                          "augmix-m5-w4-d2, original, v0, ...); none = off")
    reprob: float = _f(0.25, "random erasing probability (pixel mode)")
    mixup: float = _f(0.8, "mixup alpha (0 = off)")
    cutmix: float = _f(1.0, "cutmix alpha (0 = off)")
    mixup_prob: float = _f(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = _f(0.5, "probability of cutmix instead of mixup when both are on")
    smoothing: float = _f(0.1, "label smoothing")


@dataclass
class FinetuneOptimConfig(OptimConfig):
    epochs: int = _f(100, "training epochs (recipe: ViT-B 100, L/H 50)")
    warmup_epochs: float = _f(5.0, "linear warm-up length in epochs (per-iteration schedule)")
    base_lr: float = _f(5e-4, "learning rate per 256 images: lr = base_lr * effective batch / 256 (ViT-B 5e-4, L/H 1e-3)")
    min_lr: float = _f(1e-6, "learning rate at the end of the cosine")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas, two numbers in [0, 1)")
    layer_decay: float = _f(0.65, "layer-wise lr decay: block i of d gets layer_decay^(d - i) (ViT-B 0.65, L/H 0.75; 1 = off)")


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: ClassDataConfig = field(default_factory=ClassDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    run: TrainRunConfig = field(default_factory=TrainRunConfig)


@dataclass
class ProbeAugmentConfig:
    augment: bool = _f(True, "RandomResizedCrop + flip on the training split (the paper); --no-augment trains "
                             "on the evaluation view")
    min_crop_scale: float = _f(0.08, "RandomResizedCrop minimum area fraction")
    hflip: bool = _f(True, "random horizontal flip")
    cache_features: bool = _f(True, "with --no-augment: extract the features once and train the head on the "
                                    "cached tensor (minutes instead of hours on a CPU; same result)")


@dataclass
class ProbeOptimConfig(ScheduleConfig):
    epochs: int = _f(90, "training epochs (recipe: 90 for ViT-B, 50 for L/H)")
    warmup_epochs: float = _f(10.0, "linear warm-up length in epochs (per-iteration schedule)")
    base_lr: float = _f(0.1, "learning rate per 256 images: lr = base_lr * effective batch / 256")
    weight_decay: float = _f(0.0, "LARS weight decay on the Linear weight (never on 1-D parameters)")
    momentum: float = _f(0.9, "LARS momentum")


@dataclass
class ProbeRunConfig(TrainRunConfig):
    out: str = _f("runs/linprobe", "run folder (config, head checkpoints, logs, results.json); an existing run resumes")


@dataclass
class LinprobeConfig:
    model: EncoderConfig = field(default_factory=EncoderConfig)
    data: ClassDataConfig = field(default_factory=ClassDataConfig)
    augment: ProbeAugmentConfig = field(default_factory=ProbeAugmentConfig)
    optim: ProbeOptimConfig = field(default_factory=ProbeOptimConfig)
    run: ProbeRunConfig = field(default_factory=ProbeRunConfig)


@dataclass
class KnnParams:
    k: int = _f(20, "neighbours that vote")
    temperature: float = _f(0.07, "vote weight exp(cosine similarity / temperature)")


@dataclass
class EvalRunConfig:
    out: str = _f("", "also write the results as JSON to this file")
    seed: int = _f(0, "seed for --limit-images subsets and --init none")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N | mps")
    precision: str = _f("auto", "auto | fp32 | bf16 | fp16 (autocast). auto = bf16 on a CUDA GPU that has it, fp32 "
                                "elsewhere", choices=("auto", "fp32", "bf16", "fp16"))


@dataclass
class KnnConfig:
    model: EncoderConfig = field(default_factory=EncoderConfig)
    data: ClassDataConfig = field(default_factory=ClassDataConfig)
    knn: KnnParams = field(default_factory=KnnParams)
    run: EvalRunConfig = field(default_factory=EvalRunConfig)


@dataclass
class FeaturesRunConfig(EvalRunConfig):
    seed: int = _f(0, "seed for the random encoder of --init none")
    out: str = _f("features.npy", "output: .npy (+ .paths.txt, and .labels.npy for class folders) or .safetensors "
                                  "(features, labels; paths in the header, and .paths.txt)")


@dataclass
class FeaturesConfig:
    model: EncoderConfig = field(default_factory=EncoderConfig)
    data: ImagesConfig = field(default_factory=ImagesConfig)
    run: FeaturesRunConfig = field(default_factory=FeaturesRunConfig)


# --- checks the commands' validate() share ---------------------------------------------------------
def _finite(flag: str, value: float) -> float:
    if not math.isfinite(value):
        raise MaelabError(f"{flag} must be a finite number, got {value}")
    return value


def check_schedule(optim: ScheduleConfig, batch_size: int | None = None) -> None:
    """The numbers of an optimizer section (``ScheduleConfig`` and its subclasses: ``OptimConfig``,
    ``FinetuneOptimConfig``, ``ProbeOptimConfig``), each refused with its flag: epochs, accumulation,
    warm-up, learning rates, weight decay, gradient clipping, and AdamW betas / LARS momentum where the
    section has them. ``batch_size`` (images per process per micro-step), when given, also checks
    ``--min-lr`` against the learning rate that ``--base-lr`` scales to (x accumulation x processes
    (WORLD_SIZE) / 256); an explicit ``--lr`` is always checked."""
    o = optim
    for flag, value in (("--epochs", o.epochs), ("--accum-iter", o.accum_iter)):
        if value < 1:
            raise MaelabError(f"{flag} must be at least 1, got {value}")
    if _finite("--warmup-epochs", o.warmup_epochs) < 0:
        raise MaelabError(f"--warmup-epochs must be >= 0, got {o.warmup_epochs}")
    if _finite("--base-lr", o.base_lr) <= 0:
        raise MaelabError(f"--base-lr must be positive, got {o.base_lr}")
    if o.lr is not None and _finite("--lr", o.lr) <= 0:
        raise MaelabError(f"--lr must be positive, got {o.lr} (leave it out to scale --base-lr)")
    if _finite("--min-lr", o.min_lr) < 0:
        raise MaelabError(f"--min-lr must be >= 0, got {o.min_lr}")
    peak, how = o.lr, f"--lr {o.lr}"
    if peak is None and batch_size is not None:
        import os

        world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
        batch = batch_size * o.accum_iter * world
        peak, how = o.base_lr * batch / 256, f"--base-lr {o.base_lr} x {batch} images per step / 256"
    if peak is not None and o.min_lr > peak:
        raise MaelabError(f"--min-lr {o.min_lr} is larger than the learning rate {peak:.4g} ({how}); the cosine "
                          f"decays from the learning rate down to --min-lr")
    if _finite("--weight-decay", o.weight_decay) < 0:
        raise MaelabError(f"--weight-decay must be >= 0, got {o.weight_decay}")
    if o.clip_grad is not None and _finite("--clip-grad", o.clip_grad) <= 0:
        raise MaelabError(f"--clip-grad must be positive, got {o.clip_grad} (leave it out, or `none`, for no clipping)")
    betas = getattr(o, "betas", None)
    if betas is not None:
        if len(betas) != 2:
            raise MaelabError(f"--betas takes two numbers, got {betas}")
        if not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
            raise MaelabError(f"--betas must both be in [0, 1), got {betas}")
    momentum = getattr(o, "momentum", None)
    if momentum is not None and not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise MaelabError(f"--momentum must be in [0, 1), got {momentum}")


AUTO_AUGMENT_EXAMPLES = "rand-m9-mstd0.5-inc1, rand-m7-n2, augmix-m5-w4-d2, original, originalr, v0, v0r, 3a, none"
_AA_POLICIES = ("original", "originalr", "v0", "v0r", "3a")


def check_augment(augment: AugmentConfig) -> None:
    """``--auto-augment``: a policy timm can build (RandAugment ``rand-...``, AugMix ``augmix-...`` or an
    AutoAugment policy name), or none. The transform is built once here, so a typo fails before the run
    starts instead of as an assertion inside timm."""
    policy = augment.auto_augment
    if not policy or policy.lower() == "none":
        return
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    head = policy.split("-")[0]
    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    if head == "rand":
        build = rand_augment_transform
    elif head == "augmix":
        build = augment_and_mix_transform
        hparams["translate_pct"] = 0.3
    elif head in _AA_POLICIES:
        build = auto_augment_transform
    else:
        build = None
    try:
        ok = build is not None and build(policy, hparams) is not None
    except (AssertionError, KeyError, ValueError, IndexError, TypeError, ZeroDivisionError):
        ok = False
    if not ok:
        raise MaelabError(f"--auto-augment {policy!r} is not a timm augmentation policy; examples: "
                          f"{AUTO_AUGMENT_EXAMPLES}")
