"""`maelab detect train | eval | predict`: Mask R-CNN on a ViTDet simple feature pyramid over any
encoder maelab can load, on COCO-format data.

``train`` runs the one training loop (:class:`maelab.train.loop.Trainer`) with a
:class:`~maelab.transfer.detection.DetectTask`: large-scale jitter to a fixed square, AdamW with
layer-wise lr decay, warm-up + cosine, drop path, optional windowed attention with a few global blocks;
box and mask AP (COCOeval) on the validation file every ``--eval-every`` epochs and at the end, and a
picture of detections beside the ground truth. ``eval`` scores a trained run on an annotation file;
``predict`` draws its detections on any images.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch

from maelab.commands.options.detect import ACTIONS, CocoDataConfig
from maelab.commands.options.sections import at_least, check_run_numbers, check_schedule
from maelab.commands.session import Session, device_name, encoder_header
from maelab.config import config_from_args
from maelab.data.coco import (CocoData, boxes_beyond, find_split, instance_targets, load_coco, pixels_of, read_image,
                              training_images)
from maelab.data.detection_feed import DetectionFeeder
from maelab.data.folders import image_files, open_rgb
from maelab.data.loader import StepPlan
from maelab.data.lsj import check_scale_range
from maelab.data.splits import warn_if_training_split
from maelab.data.workers import default_workers
from maelab.errors import MaelabError, same_on_every_rank, warn_for_job
from maelab.interop.encoders import resolve_encoder
from maelab.io import check_output_file, write_json
from maelab.train.budget import timed_sample
from maelab.train.loop import Trainer
from maelab.train.optim import adamw, scaled_lr
from maelab.transfer.detection import (DetectTask, build_detector, detect, detector_groups, detector_spec,
                                       evaluate_detector, load_detector)
from maelab.viz.curves import png_out
from maelab.viz.detection import save_detection_grid


def run(args: argparse.Namespace) -> dict[str, Any]:
    cls = ACTIONS[args.action][0]
    cfg = config_from_args(cls, args)
    args.out = cfg.run.out  # named by the CLI's file-system error line
    return {"train": train, "eval": evaluate, "predict": predict}[args.action](cfg)


# --- data ------------------------------------------------------------------------------------------
def _limited(data: CocoData, limit: int, seed: int) -> CocoData:
    if not limit or limit >= len(data):
        return data
    g = torch.Generator().manual_seed(seed)
    return data.subset(sorted(torch.randperm(len(data), generator=g)[:limit].tolist()))


def coco_files(folder: str, ann: str, images: str, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder): the explicit flags, else the split's files in ``folder``."""
    if ann:
        if images:
            return Path(ann).expanduser(), Path(images).expanduser()
        if folder:
            return Path(ann).expanduser(), find_split(folder, split)[1]
        raise MaelabError("--images is required with --ann (the folder its file_names are relative to) unless --data "
                          "holds an images/ folder")
    if not folder:
        raise MaelabError("give the data: --data FOLDER (instances_train.json, instances_val.json, images/) or "
                          "--ann FILE --images FOLDER")
    found_ann, found_images = find_split(folder, split)
    return found_ann, Path(images).expanduser() if images else found_images


def load_train_val(d: CocoDataConfig, seed: int) -> tuple[CocoData, CocoData | None]:
    """The training file and the validation file (``--val-ann``, else ``instances_val.json`` in ``--data``
    when there is one, else None: no evaluation), sharing one category list."""
    ann, images = coco_files(d.data, d.ann, d.images, "train")
    train_data = _limited(load_coco(ann, images), d.limit_images, seed)
    warn_beyond(train_data, "training")
    val_ann = Path(d.val_ann).expanduser() if d.val_ann else None
    if val_ann is None and d.data:
        val_ann = next((c for c in (Path(d.data).expanduser() / "instances_val.json",) if c.is_file()), None)
    if val_ann is None:
        return train_data, None
    warn_if_training_split(ann, val_ann, "AP", "detected (--val-ann is the training annotations)")
    val_images = Path(d.val_images).expanduser() if d.val_images else images
    val = load_coco(val_ann, val_images, categories=train_data.dataset["categories"])
    val = _limited(val, d.limit_images, seed)
    warn_beyond(val, "validation")
    return train_data, val


def warn_beyond(data: CocoData, split: str) -> None:
    """Say how many boxes reach past their image: training clips them (and leaves out those with nothing
    inside), while the COCO protocol scores the file as written, where no detector can match them exactly."""
    clipped, dropped = boxes_beyond(data)
    if not clipped + dropped:
        return
    parts = ([f"{clipped} reach{'es' if clipped == 1 else ''} more than a pixel past its image"] if clipped else []) + \
        ([f"{dropped} ha{'s' if dropped == 1 else 've'} no area inside its image"] if dropped else [])
    what = f"of the {split} boxes, " + " and ".join(parts)
    if split == "training":
        warn_for_job(f"{data.ann_file}: {what}; training clips such boxes to the image and leaves out those with no "
                     f"area inside")
    else:
        warn_for_job(f"{data.ann_file}: {what}; they are scored as written (the COCO protocol), so even a perfect "
                     f"detector, which predicts inside the image, cannot match them exactly")


def square_size(img_size: list[int]) -> int:
    if len(img_size) not in (1, 2) or (len(img_size) == 2 and img_size[0] != img_size[1]) or min(img_size) < 1:
        raise MaelabError(f"--img-size is the side of the training square: one positive number (or two equal), got "
                          f"{img_size}")
    return int(img_size[0])


# --- train -----------------------------------------------------------------------------------------
def check_score(flag: str, value: float) -> None:
    """A detection score threshold: scores are probabilities (2 drew nothing, -1 everything, without a word)."""
    if not 0 <= value <= 1:
        raise MaelabError(f"{flag} must be in [0, 1], got {value}")


def validate(cfg) -> int:
    m, d, o = cfg.model, cfg.data, cfg.optim
    size = square_size(m.img_size)
    check_schedule(o, d.batch_size)
    check_run_numbers(cfg.run)
    at_least(batch_size=(d.batch_size, 1), out_channels=(m.out_channels, 1), eval_every=(cfg.run.eval_every, 0),
             vis_images=(cfg.run.vis_images, 0), limit_images=(d.limit_images, 0))
    default_workers(d.num_workers)
    if not 0 < o.layer_decay <= 1:
        raise MaelabError(f"--layer-decay must be in (0, 1], got {o.layer_decay}")
    check_score("--score-threshold", cfg.run.score_threshold)
    if not 0 <= m.drop_path < 1:
        raise MaelabError(f"--drop-path must be in [0, 1), got {m.drop_path}")
    if len(cfg.augment.scale_range) != 2:
        raise MaelabError(f"--scale-range takes two numbers, got {cfg.augment.scale_range}")
    check_scale_range(tuple(cfg.augment.scale_range))
    if m.global_blocks and m.window_size is None:
        raise MaelabError("--global-blocks only means something with --window-size (windowed attention elsewhere)")
    return size


VITDET_TOKENS = (1024 // 16) ** 2  # ViTDet's input: 1024 px at patch 16


def warn_token_count(size: int, patch: int, window_size: int | None) -> None:
    """A small-patch encoder at the default 1024 px gives a token count whose global attention makes one step
    take hours on a CPU (a patch-4 CIFAR encoder: 65 536 tokens, 16x ViTDet's), which looks like a hang."""
    tokens = (size // patch) ** 2
    if window_size is None and tokens > 4 * VITDET_TOKENS:
        fit = int(patch * VITDET_TOKENS ** 0.5)
        warnings.warn(f"--img-size {size} with patch {patch} gives {tokens} tokens per image in global attention, "
                      f"{tokens // VITDET_TOKENS}x ViTDet's {VITDET_TOKENS}: a step may take very long; --img-size {fit} "
                      f"gives {VITDET_TOKENS}, or --window-size 14 attends in windows", stacklevel=2)


def train(cfg) -> dict[str, Any]:
    size = validate(cfg)
    m, d, r = cfg.model, cfg.data, cfg.run
    with Session(r.device, r.precision, r.seed) as s:
        run_dir, resume = s.run_folder(r)
        with same_on_every_rank():  # every process reads the same files: under torchrun, said once
            train_all, val = load_train_val(d, r.seed)
        train_data, skipped = training_images(train_all, d.empty_images)
        enc, arch, _ = resolve_encoder(argparse.Namespace(init=m.init, model=m.model, num_heads=m.num_heads,
                                                          img_size=[size, size]))
        if s.is_main:
            warn_token_count(size, int(arch["patch_size"]), m.window_size)
        categories = [{"id": c, "name": n} for c, n in zip(train_data.cat_ids, train_data.names)]
        spec = detector_spec(arch, size, categories, m.window_size, m.global_blocks or [], m.out_channels,
                             m.anchor_sizes, {"head_width": m.head_width, "fc_width": m.fc_width,
                                              "roi_batch": m.roi_batch, "proposals": m.proposals})
        model = build_detector(spec, enc, m.drop_path).to(s.device)
        plan = StepPlan(len(train_data), d.batch_size, cfg.optim.accum_iter, s.info.world, s.info.rank, r.seed)
        workers = default_workers(d.num_workers)
        feeder = DetectionFeeder(train_data, plan, s.device, size, tuple(cfg.augment.scale_range),
                                 cfg.augment.hflip, workers)
        lr = scaled_lr(cfg.optim.base_lr, cfg.optim.lr, plan.global_size)

        def scores(images: CocoData | None = None) -> dict[str, float]:
            return evaluate_detector(model, val if images is None else images, s.device, s.precision, s.info, 1, workers)

        def after_epoch(epoch: int, last: bool) -> dict[str, float]:
            if val is None or not (last or (r.eval_every and (epoch + 1) % r.eval_every == 0)):
                return {}
            return scores()

        meta = dict(spec, init=m.init or "none")
        task = DetectTask(model, meta, detector_groups(model, lr, cfg.optim.weight_decay, cfg.optim.layer_decay),
                          after_epoch)
        trainer = Trainer(task=task, feeder=feeder, optim=cfg.optim, run=r, run_dir=run_dir, info=s.info,
                          device=s.device, optimizer_factory=lambda g: adamw(g, lr, tuple(cfg.optim.betas), s.device))

        def measure() -> tuple[float, float]:  # evaluation after epochs and at the end, timed on a few images
            if val is None:
                return 0.0, 0.0
            seconds = timed_sample(lambda keep: scores(val.subset(keep)), len(val))
            model.train()
            return (seconds if r.eval_every else 0.0), seconds

        s.plan_budget(trainer, cfg, resume, measure)
        header = (f"maelab detect train: Mask R-CNN, ViTDet pyramid ({m.out_channels} ch) over "
                  f"{encoder_header(enc, arch, (size, size))}; " + "".join(f"{n}; " for n in model.notes)
                  + f"{train_data.num_classes} classes, {len(train_data)} train images"
                  + (f" ({skipped} without annotations skipped)" if skipped else "")
                  + (f" / {len(val)} val images" if val is not None else " (no validation file: no AP)")
                  + f", on {s.where}, global batch {plan.global_size}, lr {lr:.3g}, layer decay "
                    f"{cfg.optim.layer_decay}, {plan.steps_per_epoch} steps/epoch, run folder {run_dir}")
        result = s.fit(trainer, cfg, resume, header)
        final = next((h for h in reversed(result.history) if "box_AP" in h), None)
        if final is None and val is not None:  # a finished run found again: score it now
            final = scores()
        results = {"command": "detect train", "epochs": result.epochs_done, "global_step": result.global_step,
                   "init": m.init or "none", "source": enc.source if enc else "none", "img_size": size,
                   "train_images": len(train_data), "skipped_empty": skipped,
                   "val_images": len(val) if val is not None else 0, "global_batch": plan.global_size,
                   "processes": s.info.world, "device": device_name(s.device), "precision": s.precision,
                   "checkpoint": str(run_dir / "checkpoints"),
                   **{k: v for k, v in (final or {}).items() if k != "epoch"}}
        if s.is_main:
            if val is not None and r.vis_images:
                results["picture"] = str(draw_split(model, val, spec, run_dir / "detections.png", r.vis_images,
                                                    r.score_threshold, s.device, s.precision))
            write_json(run_dir / "results.json", results)
            print(headline(results), flush=True)
        return results


def headline(results: dict[str, Any]) -> str:
    if "box_AP" not in results:
        return f"detect: no validation file, no AP (checkpoint {results.get('checkpoint', '')})"
    return ("detect: box AP {box_AP:.2f} (AP50 {box_AP50:.2f}, AP75 {box_AP75:.2f})  mask AP {mask_AP:.2f} "
            "(AP50 {mask_AP50:.2f}, AP75 {mask_AP75:.2f})".format(**results))


def draw_split(model, data: CocoData, spec: dict[str, Any], path: Path, count: int, threshold: float,
               device: torch.device, precision: str) -> Path:
    """Detections beside the ground truth for the first ``count`` images of ``data``."""
    rows = []
    for image in data.images[:count]:
        pixels = read_image(image)
        (pred,) = detect(model, [pixels], device, precision)
        gt = instance_targets(image, data)
        rows.append({"image": pixels, "title": Path(image.path).name, "pred": pred, "gt": gt})
    model.train()
    return save_detection_grid(path, rows, [c["name"] for c in spec["categories"]], threshold)


# --- eval ------------------------------------------------------------------------------------------
def evaluate(cfg) -> dict[str, Any]:
    d = cfg.data
    at_least(batch_size=(d.batch_size, 1), limit_images=(d.limit_images, 0))
    check_score("--min-score", cfg.run.min_score)
    workers = default_workers(d.num_workers)
    if cfg.run.out:
        check_output_file(cfg.run.out)
    if not cfg.model.checkpoint:
        raise MaelabError("--checkpoint is required: a `maelab detect train` run folder")
    with Session(cfg.run.device, cfg.run.precision, cfg.run.seed) as s:
        model, spec, weights = load_detector(cfg.model.checkpoint)
        model.roi_heads.score_thresh = cfg.run.min_score
        ann, images = coco_files(d.data, d.ann, d.images, d.split)
        data = _limited(load_coco(ann, images, categories=spec["categories"]), d.limit_images, cfg.run.seed)
        warn_beyond(data, "scored")
        model.to(s.device)
        results = {"command": "detect eval", "checkpoint": str(weights), "annotations": str(ann),
                   "images": len(data), "min_score": cfg.run.min_score, "processes": s.info.world,
                   "device": device_name(s.device), "precision": s.precision,
                   **evaluate_detector(model, data, s.device, s.precision, s.info, d.batch_size, workers)}
        if s.is_main:
            print(headline(results) + f"  ({len(data)} images of {ann})", flush=True)
            if cfg.run.out:
                write_json(Path(cfg.run.out).expanduser(), results)
        return results


# --- predict ---------------------------------------------------------------------------------------
def predict(cfg) -> dict[str, Any]:
    at_least(max_images=(cfg.input.max_images, 1))
    check_score("--score-threshold", cfg.run.score_threshold)
    if not cfg.model.checkpoint:
        raise MaelabError("--checkpoint is required: a `maelab detect train` run folder")
    out = png_out(cfg.run.out, "detect predict")
    check_output_file(out)
    paths = [Path(p) for p in image_files(cfg.input.images, "--images", cfg.input.max_images, "--max-images")]
    with Session(cfg.run.device, cfg.run.precision) as s:
        model, spec, weights = load_detector(cfg.model.checkpoint)
        model.to(s.device)
        names = [c["name"] for c in spec["categories"]]
        rows, listing = [], []
        for path in paths:
            pixels = pixels_of(open_rgb(path))
            (pred,) = detect(model, [pixels], s.device, s.precision)
            keep = pred["scores"] >= cfg.run.score_threshold
            rows.append({"image": pixels, "title": path.name, "pred": pred})
            listing.append({"image": str(path), "detections": [
                {"category_id": spec["categories"][int(label) - 1]["id"], "name": names[int(label) - 1],
                 "score": round(float(score), 4), "box_xyxy": [round(float(v), 1) for v in box]}
                for box, label, score in zip(pred["boxes"][keep], pred["labels"][keep], pred["scores"][keep])]})
        if s.is_main:
            save_detection_grid(out, rows, names, cfg.run.score_threshold)
            write_json(out.with_suffix(".json"), {"checkpoint": str(weights), "images": listing})
            total = sum(len(x["detections"]) for x in listing)
            print(f"detect predict: {total} detections (score >= {cfg.run.score_threshold:g}) on {len(paths)} "
                  f"image(s) -> {out}", flush=True)
        return {"picture": str(out), "images": listing}
