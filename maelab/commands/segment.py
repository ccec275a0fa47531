"""`maelab segment train | eval | predict`: UPerNet semantic segmentation on an MAE (or any) encoder.

``train`` runs the one training loop (:class:`maelab.train.loop.Trainer`) with a
:class:`~maelab.transfer.segment.SegmentTask`: the BEiT / MAE ADE20K recipe (AdamW, layer-wise lr
decay, poly schedule with linear warm-up, drop path, cross-entropy that ignores void pixels, an
auxiliary FCN loss), joint image / mask augmentation, mIoU on the validation split after every
``--eval-every`` epochs, and a picture of predictions at the end. ``--init none`` trains the same
network from a random encoder: the baseline. ``eval`` measures a trained run (whole image or sliding
window); ``predict`` draws the predicted masks of any images (with the ground truth beside them when
``--labels`` has it) and writes each mask as a PNG of class indices.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maelab.commands.options.segment import (SUBCOMMANDS, SegDataConfig, SegEvalConfig, SegInferenceConfig,
                                             SegModelConfig, SegSplitConfig)
from maelab.commands.options.sections import at_least, check_run_numbers, check_schedule
from maelab.commands.session import Session, device_name, encoder_header, epoch_results
from maelab.config import config_from_args
from maelab.data.folders import image_files, open_rgb
from maelab.data.loader import Feeder, plan_for
from maelab.data.segmentation import (SPECS, LabelSpec, SegAugment, SegList, SegTrainDataset,
                                      SegTrainTransform, eval_image, label_spec, load_pair, read_label,
                                      scan_segmentation)
from maelab.data.splits import warn_if_training_split
from maelab.data.workers import default_workers
from maelab.errors import MaelabError, same_on_every_rank
from maelab.interop.encoders import resolve_encoder
from maelab.io import atomic_path, check_output_file, check_writable_folder, read_weights, write_json
from maelab.models.checks import pair
from maelab.models.vit import describe, vit_arch
from maelab.train.budget import spread, timed, timed_sample
from maelab.train.checkpoint import resolve_weights_path
from maelab.train.loop import Trainer
from maelab.train.optim import adamw, scaled_lr
from maelab.train.precision import autocast
from maelab.transfer.backbone import STRIDES, ViTBackbone, layer_decay_groups
from maelab.transfer.segment import SegmentTask, UPerNetSegmenter, evaluate_segmenter, predict_mask
from maelab.viz.curves import plot_curves, png_out
from maelab.viz.segmentation import save_segmentation_figure


def run(args: argparse.Namespace):
    cls = SUBCOMMANDS[args.segment_command]
    cfg = config_from_args(cls, args)
    args.out = cfg.run.out
    return {"train": train, "eval": evaluate, "predict": predict}[args.segment_command](cfg)


# --- shared pieces ---------------------------------------------------------------------------------
def spec_of(data: SegSplitConfig) -> LabelSpec:
    return label_spec(data.dataset, data.num_classes, data.ignore_value)


def check_data(data: SegSplitConfig) -> None:
    at_least(batch_size=(data.batch_size, 1), limit_images=(data.limit_images, 0))
    default_workers(data.num_workers)
    if data.base_size is not None:
        at_least(base_size=(data.base_size, 1))


def check_training_settings(data: SegDataConfig, ev: SegEvalConfig) -> None:
    """What only training takes: the augmentation's resize range, when it evaluates and draws."""
    if len(r := data.ratio_range) != 2 or not 0 < r[0] <= r[1]:
        raise MaelabError(f"--ratio-range takes two numbers 0 < low <= high, got {r}")
    at_least(eval_every=(ev.eval_every, 1), pictures=(ev.pictures, 0))


def check_eval(ev: SegInferenceConfig) -> None:
    if ev.eval_stride is not None and (len(ev.eval_stride) not in (1, 2) or min(ev.eval_stride) < 1):
        raise MaelabError(f"--eval-stride takes one or two positive numbers, got {ev.eval_stride}")


def split_items(data: SegSplitConfig, spec: LabelSpec, which: str, seed: int) -> SegList:
    if not data.data:
        raise MaelabError("--data is required: the dataset root (CamVid or ADE20K layout)")
    name = (data.train_split if which == "train" else data.val_split) or spec.splits[0 if which == "train" else 1]
    with same_on_every_rank():  # every process scans the same files: under torchrun, said once
        return scan_segmentation(data.data, name, spec, data.limit_images, seed)


def inference_settings(ev: SegInferenceConfig, crop: tuple[int, int], base_size: int | None) -> dict[str, Any]:
    stride = pair(ev.eval_stride) if ev.eval_stride else (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
    return dict(mode=ev.eval_mode, base_size=base_size or min(crop), crop=crop, stride=stride)


def build_segmenter(enc, arch: dict[str, Any], crop: tuple[int, int], m: SegModelConfig,
                    num_classes: int) -> UPerNetSegmenter:
    if min(crop) < max(STRIDES):  # the coarsest level would have no pixel (a max-pool to size 0 in the first step)
        raise MaelabError(f"--img-size {crop[0]}x{crop[1]} is too small for the UPerNet pyramid: its stride-"
                          f"{max(STRIDES)} level needs at least {max(STRIDES)} px a side")
    backbone = ViTBackbone(enc, arch, crop, m.out_indices, m.drop_path, m.window_size, m.global_blocks)
    return UPerNetSegmenter(backbone, num_classes, m.decoder_channels, m.aux_weight)


def model_meta(arch, crop, m: SegModelConfig, spec: LabelSpec, backbone: ViTBackbone) -> dict[str, Any]:
    """What a segmenter's weights file records: enough to rebuild it for `eval` and `predict`."""
    return {"arch": "upernet", "vit": dict(arch, img_size=list(crop)), "out_indices": list(backbone.out_indices),
            "window_size": m.window_size, "global_blocks": list(m.global_blocks),
            "decoder_channels": m.decoder_channels, "aux_weight": m.aux_weight, "init": m.init,
            "dataset": spec.name, "classes": list(spec.classes), "label_offset": spec.offset,
            "ignore_values": list(spec.ignore)}


def load_segmenter(path: str) -> tuple[UPerNetSegmenter, dict[str, Any], LabelSpec]:
    """A trained segmenter from a `segment train` run, checkpoint folder or weights file."""
    if not path:
        raise MaelabError("--checkpoint is required: a `maelab segment train` run folder")
    weights_path = resolve_weights_path(path)
    weights, meta = read_weights(weights_path)
    if meta.get("arch") != "upernet":
        raise MaelabError(f"{weights_path} is not a segmentation model (it holds {meta.get('arch', 'unknown weights')!r}); "
                          f"point at a `maelab segment train` run")
    arch = vit_arch(meta["vit"])
    m = SegModelConfig(init="none", out_indices=meta["out_indices"], window_size=meta["window_size"],
                       global_blocks=meta["global_blocks"], decoder_channels=meta["decoder_channels"],
                       aux_weight=meta["aux_weight"], drop_path=0.0)
    splits = SPECS[meta["dataset"]].splits if meta["dataset"] in SPECS else ("train", "val")
    spec = LabelSpec(meta["dataset"], tuple(meta["classes"]), meta["label_offset"], tuple(meta["ignore_values"]), splits)
    model = build_segmenter(None, arch, tuple(arch["img_size"]), m, len(spec.classes))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise MaelabError(f"{weights_path} does not fit the segmenter it describes: {str(e).splitlines()[0]}") from None
    return model.eval(), meta, spec


def check_same_spec(trained: LabelSpec, data: SegSplitConfig) -> LabelSpec:
    """Evaluation labels are read as the model was trained on them; a --dataset other than the default
    (camvid) that reads them differently is an error, not a silently wrong mIoU."""
    if data.dataset != "camvid" or data.num_classes is not None:
        asked = spec_of(data)
        if asked.classes != trained.classes or asked.offset != trained.offset:
            raise MaelabError(f"the model was trained on {trained.name} labels ({len(trained.classes)} classes); "
                              f"--dataset {data.dataset} reads them differently")
    return trained


def draw_items(model, items: SegList, indices: list[int], device, precision: str, settings: dict[str, Any],
               path: Path) -> Path:
    """Predictions of ``items[indices]`` beside their ground truth, written to ``path`` (leaves the model
    in eval mode)."""
    model.eval()
    images, preds, targets, titles = [], [], [], []
    for i in indices:
        img, target = load_pair(items, i)
        pred = predict_one(model, img, device, precision, settings)
        images.append(np.asarray(img))
        preds.append(pred)
        targets.append(target.numpy())
        titles.append(Path(items.images[i]).name)
    return save_segmentation_figure(path, images, preds, targets, list(items.spec.classes), titles)


def predict_one(model, img: Image.Image, device, precision: str, settings: dict[str, Any]) -> np.ndarray:
    x, size = eval_image(img, settings["base_size"])
    with autocast(device, precision):
        pred = predict_mask(model, x.to(device), size, settings["mode"], settings["crop"], settings["stride"])
    return pred[0].cpu().numpy().astype(np.int64)


def print_metrics(what: str, m: dict[str, Any], prefix: str = "val") -> None:
    print(f"{what}: mIoU {m[f'{prefix}_mIoU']:.2f}  mAcc {m[f'{prefix}_mAcc']:.2f}  aAcc {m[f'{prefix}_aAcc']:.2f}  "
          f"({m[f'{prefix}_images']} images)", flush=True)


# --- train -----------------------------------------------------------------------------------------
def validate_train(cfg) -> None:
    check_data(cfg.data)
    check_eval(cfg.eval)
    check_training_settings(cfg.data, cfg.eval)
    check_schedule(cfg.optim, cfg.data.batch_size)
    check_run_numbers(cfg.run)
    if not 0 < cfg.optim.layer_decay <= 1:
        raise MaelabError(f"--layer-decay must be in (0, 1], got {cfg.optim.layer_decay}")
    if cfg.data.batch_size < 2:
        raise MaelabError(f"--batch-size must be at least 2 (the UPerNet head uses BatchNorm), got {cfg.data.batch_size}")
    m = cfg.model
    if m.out_indices is not None and len(m.out_indices) != len(STRIDES):  # the neck said it, after the encoder loaded
        raise MaelabError(f"--out-indices takes {len(STRIDES)} block numbers, one per level of the UPerNet pyramid "
                          f"(strides {', '.join(map(str, STRIDES))}), got {len(m.out_indices)}: {m.out_indices}")
    if not 0 <= cfg.model.aux_weight < float("inf"):
        raise MaelabError(f"--aux-weight must be >= 0 and finite, got {cfg.model.aux_weight}")
    spec_of(cfg.data)


def train(cfg) -> dict[str, Any]:
    validate_train(cfg)
    spec = spec_of(cfg.data)
    with Session(cfg.run.device, cfg.run.precision, cfg.run.seed) as s:
        run_dir, resume = s.run_folder(cfg.run)
        train_items = split_items(cfg.data, spec, "train", cfg.run.seed)
        val_items = split_items(cfg.data, spec, "val", cfg.run.seed)
        names = [split or default for split, default in zip((cfg.data.train_split, cfg.data.val_split), spec.splits)]
        warn_if_training_split(Path(cfg.data.data) / names[0], Path(cfg.data.data) / names[1], "mIoU",
                               f"segmented (--train-split {names[0]}, --val-split {names[1]})")
        enc, arch, crop = resolve_encoder(cfg.model)
        model = build_segmenter(enc, arch, crop, cfg.model, spec.num_classes)
        settings = inference_settings(cfg.eval, crop, cfg.data.base_size)
        aug = SegAugment(crop, settings["base_size"], tuple(cfg.data.ratio_range), cfg.data.hflip, cfg.data.photometric)
        images = train_items.image_list()
        plan = plan_for(images, cfg.data.batch_size, cfg.optim.accum_iter, s.info.world, s.info.rank, cfg.run.seed)
        feeder = Feeder(images, plan, s.device, crop, in_memory=False, num_workers=default_workers(cfg.data.num_workers),
                        dataset=SegTrainDataset(train_items, SegTrainTransform(aug)))
        load_pair(train_items, 0)  # a broken first label fails here, before the run folder is written
        model.to(s.device)

        def evaluate(every_epoch: bool = False, items: SegList = val_items) -> dict[str, Any]:
            """After an epoch (``trainer.epoch`` already counts it): every ``--eval-every`` epochs and the last."""
            if every_epoch and trainer.epoch % cfg.eval.eval_every and trainer.epoch < cfg.optim.epochs:
                return {}
            return evaluate_segmenter(model, items, s.device, s.precision, settings["mode"], settings["base_size"],
                                      settings["crop"], settings["stride"], s.info.rank, s.info.world)

        meta = model_meta(arch, crop, cfg.model, spec, model.backbone)
        groups = layer_decay_groups(model, 1.0, cfg.optim.weight_decay, cfg.optim.layer_decay)
        task = SegmentTask(model, meta, groups, lambda: evaluate(every_epoch=True))
        lr = scaled_lr(cfg.optim.base_lr, cfg.optim.lr, plan.global_size)
        cfg.model.img_size = list(crop)
        trainer = Trainer(task=task, feeder=feeder, optim=cfg.optim, run=cfg.run, run_dir=run_dir, info=s.info,
                          device=s.device, optimizer_factory=lambda g: adamw(g, lr, tuple(cfg.optim.betas), s.device))
        picture = run_dir / "segmentation.png"
        shown = spread(len(val_items), cfg.eval.pictures)

        def measure() -> tuple[float, float]:  # evaluation after every epoch (timed on a few images), the pictures
            seconds = timed_sample(lambda keep: evaluate(items=val_items.subset(keep)), len(val_items))
            seconds /= cfg.eval.eval_every
            drawing = timed(draw_items, model, val_items, shown, s.device, s.precision, settings, picture) if shown else 0.0
            model.train()
            return seconds, drawing

        s.plan_budget(trainer, cfg, resume, measure)
        header = (f"maelab segment train: {encoder_header(enc, arch, crop)}; "
                  + "".join(f"{n}; " for n in model.backbone.notes)
                  + f"UPerNet ({cfg.model.decoder_channels} channels) on blocks {list(model.backbone.out_indices)}, "
                    f"{spec.name} labels ({spec.num_classes} classes), {len(train_items)} train / {len(val_items)} val "
                    f"images, on {s.where}, global batch {plan.global_size}, lr {lr:.3g} ({cfg.optim.schedule}), layer "
                    f"decay {cfg.optim.layer_decay}, {plan.steps_per_epoch} steps/epoch, run folder {run_dir}")
        result = s.fit(trainer, cfg, resume, header)
        final = next((r for r in reversed(result.history) if "val_mIoU" in r), None)
        if final is None:  # a resumed run that had already finished: measure it again
            final = evaluate()
        results = {"command": "segment train", "init": cfg.model.init, "source": enc.source if enc else "none",
                   "encoder": describe(dict(arch, img_size=crop)), "dataset": spec.name, "classes": list(spec.classes),
                   "train_images": len(train_items), "val_images": len(val_items), "global_batch": plan.global_size,
                   "steps": trainer.global_step, "epochs": trainer.epoch, "processes": s.info.world,
                   "device": device_name(s.device), "precision": s.precision, "inference": settings["mode"],
                   "checkpoint": str(run_dir / "checkpoints"),
                   **{k: v for k, v in final.items() if k.startswith("val_")},
                   # every epoch's, from the run's metrics (also those of a process that was stopped and resumed)
                   "epoch_mIoU": [r["val_mIoU"] for r in epoch_results(run_dir, result.history, "val_mIoU")]}
        if s.is_main:
            if shown:
                draw_items(model, val_items, shown, s.device, s.precision, settings, picture)
                results["picture"] = str(picture)
            plot_curves(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
            write_json(run_dir / "results.json", results)
            print_metrics(f"segment train ({trainer.epoch} epochs)", final)
        return results


# --- eval ------------------------------------------------------------------------------------------
def evaluate(cfg) -> dict[str, Any]:
    check_data(cfg.data)
    check_eval(cfg.eval)
    if cfg.run.out:
        check_output_file(cfg.run.out)
    model, meta, trained = load_segmenter(cfg.weights.checkpoint)
    spec = check_same_spec(trained, cfg.data)
    with Session(cfg.run.device, cfg.run.precision, cfg.run.seed) as s:
        items = split_items(cfg.data, spec, "val", cfg.run.seed)
        settings = inference_settings(cfg.eval, tuple(meta["vit"]["img_size"]), cfg.data.base_size)
        model.to(s.device)
        metrics = evaluate_segmenter(model, items, s.device, s.precision, settings["mode"], settings["base_size"],
                                     settings["crop"], settings["stride"], s.info.rank, s.info.world)
        results = {"command": "segment eval", "checkpoint": cfg.weights.checkpoint, "dataset": spec.name,
                   "split": cfg.data.val_split or spec.splits[1], "inference": settings["mode"],
                   "base_size": settings["base_size"], "processes": s.info.world, "device": device_name(s.device),
                   "precision": s.precision,
                   **metrics}
        if s.is_main:
            print_metrics(f"segment eval ({settings['mode']})", metrics)
            if cfg.run.out:
                write_json(Path(cfg.run.out).expanduser(), results)
        return results


# --- predict ---------------------------------------------------------------------------------------
def mask_names(paths: list[str]) -> list[str]:
    """The file names of the predicted masks: ``<stem>.png``, and where images share a stem (``x.jpg`` and
    ``x.png``, ``a/x.jpg`` and ``b/x.jpg``; letter case aside, for case-blind disks) ``<folder>_<file>.png``,
    numbered if that still clashes: one image's mask was written over another's without a word."""
    stems = Counter(Path(p).stem.lower() for p in paths)
    names = [Path(p).stem if stems[Path(p).stem.lower()] == 1
             else f"{Path(os.path.abspath(p)).parent.name or 'root'}_{Path(p).name}" for p in paths]
    taken = {name.lower() for name in names}  # a number added may not give another image's own name
    used: set[str] = set()
    unique: list[str] = []
    for name in names:
        if name.lower() in used:
            k = 2
            while f"{name}_{k}".lower() in taken:
                k += 1
            name = f"{name}_{k}"
            taken.add(name.lower())
        used.add(name.lower())
        unique.append(name)
    return [name + ".png" for name in unique]


def predict(cfg) -> dict[str, Any]:
    check_eval(cfg.eval)
    out = png_out(cfg.run.out, "segment predict", " (its masks go beside it, in <name>_masks/)")
    check_output_file(out)
    masks_dir = out.with_name(out.stem + "_masks")
    check_writable_folder(masks_dir, "--out", masks_dir)
    model, meta, spec = load_segmenter(cfg.weights.checkpoint)
    paths = image_files(cfg.predict.images, "--images", cfg.predict.limit)
    labels_dir = Path(cfg.predict.labels).expanduser() if cfg.predict.labels else None
    if labels_dir is not None and not labels_dir.is_dir():
        raise MaelabError(f"--labels {labels_dir} is not a folder")
    with Session(cfg.run.device, cfg.run.precision) as s:
        settings = inference_settings(cfg.eval, tuple(meta["vit"]["img_size"]), cfg.predict.base_size)
        model.to(s.device)
        images, preds, targets = [], [], []
        for p in paths:
            img = open_rgb(p)
            pred = predict_one(model, img, s.device, s.precision, settings)
            target = None
            if labels_dir is not None and (labels_dir / (Path(p).stem + ".png")).is_file():
                target = read_label(str(labels_dir / (Path(p).stem + ".png")), spec, (img.height, img.width))
            images.append(np.asarray(img))
            preds.append(pred)
            targets.append(target)
        if not s.is_main:
            return {}
        masks_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for p, pred, name in zip(paths, preds, mask_names(paths)):
            mask_path = masks_dir / name
            with atomic_path(mask_path) as tmp:
                Image.fromarray(pred.astype(np.uint8 if spec.num_classes < 256 else np.uint16)).save(tmp, format="PNG")
            written.append(str(mask_path))
        save_segmentation_figure(out, images, preds, targets, list(spec.classes), [Path(p).name for p in paths])
        kept = set(written)
        others = sorted(f.name for f in masks_dir.glob("*.png") if str(f) not in kept)
        if others:  # not deleted: the folder may hold what the user keeps there
            warnings.warn(f"{masks_dir} also holds {len(others)} mask(s) not of these images ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}), from an earlier predict into the same --out? "
                          f"They are left there")
        shared = any(Path(w).name != Path(p).stem + ".png" for p, w in zip(paths, written))
        print(f"segment predict: {len(paths)} image(s) -> {out} and {masks_dir}/ (class indices 0.."
              f"{spec.num_classes - 1}" + ("; images that share a name have masks named <folder>_<file>.png" if shared
                                           else "") + ")", file=sys.stdout, flush=True)
        return {"picture": str(out), "masks": written}
