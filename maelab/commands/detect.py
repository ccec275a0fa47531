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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maelab.commands.sections import (EncoderConfig, OptimConfig, ProcessConfig, TrainRunConfig, at_least,
                                      check_run_numbers, check_schedule)
from maelab.commands.session import Session, device_name, encoder_header
from maelab.config import add_config_args, command_config, config_from_args, option, redefault
from maelab.data.coco import (EMPTY_POLICIES, CocoData, find_split, instance_targets, load_coco, pixels_of,
                              read_image, training_images)
from maelab.data.detection_feed import DetectionFeeder
from maelab.data.folders import image_files, open_rgb
from maelab.data.loader import StepPlan
from maelab.data.lsj import check_scale_range
from maelab.data.workers import default_workers
from maelab.errors import MaelabError
from maelab.interop.encoders import resolve_encoder
from maelab.io import check_output_file, write_json
from maelab.train.budget import timed_sample
from maelab.train.loop import Trainer
from maelab.train.optim import adamw, scaled_lr
from maelab.transfer.detection import (ANCHOR_SIZES, HEADS, DetectTask, build_detector, detect, detector_groups,
                                       detector_spec, evaluate_detector, load_detector)
from maelab.viz.detection import save_detection_grid

NAME = "detect"
DESCRIPTION = ("Object detection and instance segmentation: torchvision's Mask R-CNN on ViTDet's simple feature "
               "pyramid over any encoder maelab reads; COCO-format data, large-scale jitter, box and mask AP "
               "(pycocotools). `maelab detect train --help` lists the flags of each action.")
Config = None  # three actions, each with its own config (add_arguments)


@dataclass
class DetectModelConfig:
    init: str = redefault(EncoderConfig, "init", "")
    model: str | None = redefault(EncoderConfig, "model", None)
    num_heads: int | None = redefault(EncoderConfig, "num_heads", None)
    img_size: list[int] = option([1024], "training square (large-scale jitter crops / pads to it) and the longer "
                                         "side at inference; the patch size must divide it (ViTDet: 1024)")
    drop_path: float = option(0.1, "stochastic depth rate of the ViT (ViTDet: B 0.1, L 0.4)")
    window_size: int | None = option(None, "windowed attention: window side in patches for the blocks not in "
                                           "--global-blocks (ViTDet at 1024 px: 14); none = global attention everywhere")
    global_blocks: list[int] | None = option(None, "blocks that keep global attention when --window-size is set "
                                                    "(ViTDet-B: 2 5 8 11)")
    out_channels: int = option(256, "channels of every pyramid level")
    anchor_sizes: list[int] = option(list(ANCHOR_SIZES), "RPN anchor size per level (strides 4, 8, 16, 32, 64)")
    head_width: int = option(HEADS["head_width"], "channels of the RPN / box / mask head convolutions")
    fc_width: int = option(HEADS["fc_width"], "width of the box head's fully connected layer")
    roi_batch: int = option(HEADS["roi_batch"], "RoIs sampled per image for the box and mask losses")
    proposals: int = option(HEADS["proposals"], "RPN proposals per image in training (half at inference)")


@dataclass
class CocoDataConfig:
    data: str = option("", "a COCO-style folder holding instances_train.json, instances_val.json and images/ "
                           "(the coco128 layout); --ann / --images / --val-ann / --val-images override its parts")
    ann: str = option("", "training annotation file (COCO instances JSON)")
    images: str = option("", "folder the training file's image file_names are relative to")
    val_ann: str = option("", "validation annotation file (default: instances_val.json in --data; none = no "
                              "evaluation)")
    val_images: str = option("", "folder of the validation images (default: --images)")
    batch_size: int = option(2, "images per process per (micro-)batch (ViTDet: 64 in total)")
    num_workers: int = option(-1, "data-loading processes; -1 = one per CPU core, at most 8")
    limit_images: int = option(0, "use a fixed seeded random subset of N images of each split (0 = all); for "
                                  "quick runs")
    empty_images: str = option("skip", "training images without a usable annotation: skip (detectron2 / ViTDet) "
                                      "or keep as negatives; evaluation always keeps them", choices=EMPTY_POLICIES)


@dataclass
class JitterConfig:
    """Large-scale jitter (ViTDet): flip, resize by a random factor of the target size, crop / pad."""

    scale_range: list[float] = option([0.1, 2.0], "random resize factor of the target size (LSJ: 0.1 2.0)")
    hflip: bool = option(True, "random horizontal flip")


@dataclass
class DetectOptimConfig(OptimConfig):
    """ViTDet's recipe: AdamW (0.9, 0.999), lr 1e-4 at batch 64, weight decay 0.1, layer decay 0.7; the
    loop's warm-up + cosine replaces ViTDet's step decay."""

    epochs: int = redefault(OptimConfig, "epochs", 100)
    warmup_epochs: float = redefault(OptimConfig, "warmup_epochs", 0.25)
    base_lr: float = option(4e-4, "learning rate per 256 images: lr = base_lr * effective batch / 256 (ViTDet: 1e-4 "
                                  "at batch 64)")
    weight_decay: float = redefault(OptimConfig, "weight_decay", 0.1)
    betas: list[float] = option([0.9, 0.999], "AdamW betas, two numbers in [0, 1)")
    layer_decay: float = option(0.7, "layer-wise lr decay: block i of d gets layer_decay^(d - i) (ViTDet: B 0.7, "
                                     "L 0.8; 1 = off)")


@dataclass
class DetectRunConfig(TrainRunConfig):
    out: str = redefault(TrainRunConfig, "out", "runs/detect")
    eval_every: int = option(1, "box / mask AP on the validation file every N epochs (0 = only after the last)")
    vis_images: int = option(4, "validation images drawn with their detections at the end (0 = none)")
    score_threshold: float = option(0.5, "detections drawn from this score up")


DetectTrainConfig = command_config("DetectTrainConfig", __name__, model=DetectModelConfig, data=CocoDataConfig,
                                   augment=JitterConfig, optim=DetectOptimConfig, run=DetectRunConfig)


@dataclass
class CheckpointConfig:
    checkpoint: str = option("", "a `maelab detect train` run folder, checkpoint folder or model.safetensors")


@dataclass
class EvalDataConfig:
    data: str = option("", "a COCO-style folder (instances_<split>.json, images/)")
    split: str = option("val", "which instances_<split>.json of --data")
    ann: str = option("", "annotation file (overrides --data / --split)")
    images: str = option("", "image folder of --ann (default: <data>/images)")
    batch_size: int = option(1, "images per forward pass")
    num_workers: int = option(-1, "data-loading processes; -1 = one per CPU core, at most 8")
    limit_images: int = option(0, "a fixed seeded random subset of N images (0 = all)")


@dataclass
class DetectEvalRunConfig(ProcessConfig):
    out: str = option("", "also write the results as JSON to this file")
    seed: int = option(0, "seed of the --limit-images subset")
    min_score: float = option(0.05, "detections scored from this score up (torchvision / detectron2: 0.05); 0 keeps "
                                    "the 100 best per image, for weak models whose scores are all low")


DetectEvalConfig = command_config("DetectEvalConfig", __name__, model=CheckpointConfig, data=EvalDataConfig,
                                  run=DetectEvalRunConfig)


@dataclass
class PredictInputConfig:
    images: list[str] = option([], "image files or folders of images to detect on")
    max_images: int = option(16, "draw at most this many images (the first, in sorted order)")


@dataclass
class PredictRunConfig(ProcessConfig):
    out: str = option("detections.png", "the picture to write (PNG); the detections go beside it as JSON")
    score_threshold: float = option(0.5, "detections drawn and listed from this score up")


DetectPredictConfig = command_config("DetectPredictConfig", __name__, model=CheckpointConfig,
                                     input=PredictInputConfig, run=PredictRunConfig)

ACTIONS = {
    "train": (DetectTrainConfig, "train Mask R-CNN on the encoder (COCO-format data)"),
    "eval": (DetectEvalConfig, "box and mask AP of a trained detector on an annotation file"),
    "predict": (DetectPredictConfig, "draw a trained detector's boxes and masks on images (PNG)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    for name, (cls, help_text) in ACTIONS.items():
        p = sub.add_parser(name, help=help_text, description=help_text + ". Every flag is a config field; --config "
                           "loads a YAML preset first (flags override it).")
        add_config_args(p, cls)


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
    val_ann = Path(d.val_ann).expanduser() if d.val_ann else None
    if val_ann is None and d.data:
        val_ann = next((c for c in (Path(d.data).expanduser() / "instances_val.json",) if c.is_file()), None)
    if val_ann is None:
        return train_data, None
    val_images = Path(d.val_images).expanduser() if d.val_images else images
    val = load_coco(val_ann, val_images, categories=train_data.dataset["categories"])
    return train_data, _limited(val, d.limit_images, seed)


def square_size(img_size: list[int]) -> int:
    if len(img_size) not in (1, 2) or (len(img_size) == 2 and img_size[0] != img_size[1]) or min(img_size) < 1:
        raise MaelabError(f"--img-size is the side of the training square: one positive number (or two equal), got "
                          f"{img_size}")
    return int(img_size[0])


# --- train -----------------------------------------------------------------------------------------
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
    if not 0 <= m.drop_path < 1:
        raise MaelabError(f"--drop-path must be in [0, 1), got {m.drop_path}")
    if len(cfg.augment.scale_range) != 2:
        raise MaelabError(f"--scale-range takes two numbers, got {cfg.augment.scale_range}")
    check_scale_range(tuple(cfg.augment.scale_range))
    if m.global_blocks and m.window_size is None:
        raise MaelabError("--global-blocks only means something with --window-size (windowed attention elsewhere)")
    return size


def train(cfg) -> dict[str, Any]:
    size = validate(cfg)
    m, d, r = cfg.model, cfg.data, cfg.run
    with Session(r.device, r.precision, r.seed) as s:
        run_dir, resume = s.run_folder(r)
        train_all, val = load_train_val(d, r.seed)
        train_data, skipped = training_images(train_all, d.empty_images)
        enc, arch, _ = resolve_encoder(argparse.Namespace(init=m.init, model=m.model, num_heads=m.num_heads,
                                                          img_size=[size, size]))
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
                   "processes": s.info.world, "device": device_name(s.device),
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
    if not 0 <= cfg.run.min_score <= 1:
        raise MaelabError(f"--min-score must be in [0, 1], got {cfg.run.min_score}")
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
        model.to(s.device)
        results = {"command": "detect eval", "checkpoint": str(weights), "annotations": str(ann),
                   "images": len(data), "min_score": cfg.run.min_score, "processes": s.info.world, "device": device_name(s.device),
                   **evaluate_detector(model, data, s.device, s.precision, s.info, d.batch_size, workers)}
        if s.is_main:
            print(headline(results) + f"  ({len(data)} images of {ann})", flush=True)
            if cfg.run.out:
                write_json(Path(cfg.run.out).expanduser(), results)
        return results


# --- predict ---------------------------------------------------------------------------------------
def predict(cfg) -> dict[str, Any]:
    at_least(max_images=(cfg.input.max_images, 1))
    if not cfg.model.checkpoint:
        raise MaelabError("--checkpoint is required: a `maelab detect train` run folder")
    out = Path(cfg.run.out).expanduser()
    if out.suffix.lower() != ".png":
        raise MaelabError(f"--out {out} must be a .png file")
    check_output_file(out)
    paths = [Path(p) for p in image_files(cfg.input.images, "--images", cfg.input.max_images)]
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
