"""`maelab finetune`: end-to-end fine-tuning of the encoder as a timm ViT classifier (the official
recipe: global average pool + fc_norm head, layer-wise lr decay, drop path, RandAugment, mixup /
cutmix, label smoothing, random erasing, AdamW, warm-up + cosine), evaluated on the validation split
after every epoch. ``--init none`` trains the same ViT from scratch: the baseline MAE is measured
against. Runs in the one training loop (:class:`maelab.train.loop.Trainer`) with a
:class:`~maelab.train.tasks.FinetuneTask`.
"""

from __future__ import annotations

from typing import Any

from timm.data import Mixup
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

from maelab.commands.options.finetune import AugmentConfig, FinetuneConfig
from maelab.commands.options.sections import check_crop_scale, check_data_numbers, check_run_numbers, check_schedule
from maelab.commands.session import Session, encoder_header
from maelab.data.loader import Feeder, plan_for
from maelab.data.splits import load_splits
from maelab.data.transforms import finetune_transform
from maelab.data.workers import default_workers
from maelab.errors import MaelabError
from maelab.evaluate.metrics import evaluate_classifier
from maelab.interop.encoders import resolve_encoder
from maelab.models.vit import build_vit, init_head, load_encoder_into, vit_meta
from maelab.train.budget import timed_pass
from maelab.train.loop import Trainer
from maelab.train.optim import adamw, batch_and_lr, layer_decay_groups, scaled_lr
from maelab.train.tasks import FinetuneTask

HEAD_INIT_STD = 2e-5  # official fine-tuning: trunc_normal(head.weight, std=2e-5) on a pre-trained encoder


AUTO_AUGMENT_EXAMPLES = "rand-m9-mstd0.5-inc1, rand-m7-n2, augmix-m5-w4-d2, original, originalr, v0, v0r, 3a, none"
_AA_POLICIES = ("original", "originalr", "v0", "v0r", "3a")


def check_augment(augment: AugmentConfig) -> None:
    """``--auto-augment``: a policy timm can build (RandAugment ``rand-...``, AugMix ``augmix-...`` or an
    AutoAugment policy name), or none. The transform is built once here, so a typo fails before the run
    starts instead of as an assertion inside timm."""
    policy = augment.auto_augment
    if not policy or policy.lower() == "none":
        return
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


def validate(cfg: FinetuneConfig) -> None:
    check_data_numbers(cfg.data)
    o, a = cfg.optim, cfg.augment
    check_schedule(o, cfg.data.batch_size)
    check_augment(a)
    check_run_numbers(cfg.run)
    if not 0 < o.layer_decay <= 1:
        raise MaelabError(f"--layer-decay must be in (0, 1], got {o.layer_decay}")
    check_crop_scale(a.min_crop_scale)
    for name, v in (("mixup", a.mixup), ("cutmix", a.cutmix)):
        if v < 0:
            raise MaelabError(f"--{name} must be >= 0, got {v}")
    for name, v in (("reprob", a.reprob), ("mixup-prob", a.mixup_prob), ("mixup-switch-prob", a.mixup_switch_prob)):
        if not 0 <= v <= 1:
            raise MaelabError(f"--{name} must be in [0, 1], got {v}")
    if not 0 <= a.smoothing < 1:
        raise MaelabError(f"--smoothing must be in [0, 1), got {a.smoothing}")
    if uses_mixup(cfg) and cfg.data.batch_size % 2:
        raise MaelabError(f"mixup / cutmix pair images within a batch: --batch-size must be even, got "
                          f"{cfg.data.batch_size} (or turn them off with --mixup 0 --cutmix 0)")


def uses_mixup(cfg: FinetuneConfig) -> bool:
    a = cfg.augment
    return (a.mixup > 0 or a.cutmix > 0) and a.mixup_prob > 0


def make_mixup(cfg: FinetuneConfig, num_classes: int):
    if not uses_mixup(cfg):
        return None
    a = cfg.augment
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                 mode="batch", label_smoothing=a.smoothing, num_classes=num_classes)


def build_model(cfg: FinetuneConfig, num_classes: int):
    """(model, architecture, input size, encoder weights or None, notes)."""
    enc, arch, size = resolve_encoder(cfg.model)
    model = build_vit(arch, num_classes, cfg.model.global_pool, cfg.model.drop_path, size)
    notes: list[str] = []
    if enc is not None:
        notes = load_encoder_into(model, enc)
        init_head(model, HEAD_INIT_STD)
    return model, arch, size, enc, notes


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    validate(cfg)
    with Session(cfg.run.device, cfg.run.precision, cfg.run.seed) as s:
        train, val = load_splits(cfg.data, cfg.run.seed, say=s.is_main)  # first: it finds the validation folder
        run_dir, resume = s.run_folder(cfg.run, cfg.data.data, cfg.data.val_data)
        num_classes = len(train.classes)
        model, arch, size, enc, notes = build_model(cfg, num_classes)
        plan = plan_for(train, cfg.data.batch_size, cfg.optim.accum_iter, s.info.world, s.info.rank,
                        cfg.run.seed)
        a = cfg.augment
        aa = a.auto_augment if a.auto_augment and a.auto_augment.lower() != "none" else None
        feeder = Feeder(train, plan, s.device, size, in_memory=False,
                        transform=finetune_transform(size, a.min_crop_scale, a.hflip, aa, a.reprob),
                        num_workers=default_workers(cfg.data.num_workers), bad_files=cfg.data.bad_files)
        val_split = s.eval_split(val, size, cfg.data)
        model.to(s.device)

        def val_batches():
            return ((x, y) for x, y, _ in val_split.batches(s.device))

        def evaluate(batches=None) -> dict[str, float]:
            model.eval()
            return evaluate_classifier(model, val_batches() if batches is None else batches, s.device, s.precision)

        meta = vit_meta(arch, size, num_classes=num_classes, global_pool=cfg.model.global_pool,
                        classes=train.classes, init=cfg.model.init)
        groups = layer_decay_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
        task = FinetuneTask(model, meta, groups, evaluate, cfg.run.seed, s.info.rank,
                            make_mixup(cfg, num_classes), cfg.augment.smoothing)
        if cfg.model.global_pool == "token":  # a run begun before its final norm got the head's lr scale
            task.legacy_groups = (layer_decay_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay, False),
                                  "its final norm keeps the last block's lr scale (layer decay x the lr), as when "
                                  "it began; runs started now give it the head's scale 1, as the official code")
        lr = scaled_lr(cfg.optim.base_lr, cfg.optim.lr, plan.global_size)
        cfg.model.img_size = list(size)  # config.yaml records the size the run trains at
        trainer = Trainer(task=task, feeder=feeder, optim=cfg.optim, run=cfg.run, run_dir=run_dir, info=s.info,
                          device=s.device, optimizer_factory=lambda g: adamw(g, lr, tuple(cfg.optim.betas), s.device))
        def measure() -> tuple[float, float]:  # the validation pass after every epoch, from its first batches
            seconds = timed_pass(evaluate, val_batches(), val_split.num_batches)
            model.train()
            return seconds, 0.0

        s.plan_budget(trainer, cfg, resume, measure)
        header = (f"maelab finetune: {encoder_header(enc, arch, size, notes)}; "
                  + f"{num_classes} classes, {len(train)} train / {len(val)} val images, on {s.where}, "
                  + batch_and_lr(plan.batch_size, plan.accum, plan.world, cfg.optim.base_lr, cfg.optim.lr)
                  + f", layer decay {cfg.optim.layer_decay}, "
                    f"{plan.steps_per_epoch} steps/epoch, run folder {run_dir}")
        result = s.fit(trainer, cfg, resume, header)
        return s.finish(run_dir, "finetune", result, {
            "init": cfg.model.init, "source": enc.source if enc else "none", "img_size": list(size),
            "global_pool": cfg.model.global_pool, "num_classes": num_classes, "train_images": len(train),
            "val_images": len(val), "global_batch": plan.global_size})
