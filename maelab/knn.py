"""`maelab knn`: weighted k-nearest-neighbour accuracy of frozen features (k = 20, T = 0.07 on
L2-normalised features): the training split is the memory bank, the validation split the queries.
No training, so it is the quickest read of representation quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from maelab.config import KnnConfig
from maelab.data.loader import choose_in_memory, default_workers
from maelab.downstream import check_data_numbers, check_output_file, device_name, load_splits, resolve_encoder, write_json
from maelab.errors import MaelabError
from maelab.evaluate.features import EvalSplit, extract_features, gather_split
from maelab.evaluate.knn import knn_accuracy
from maelab.models.vit import describe, features_model
from maelab.train.distributed import cleanup, init_distributed
from maelab.train.precision import resolve_precision


def run_knn(cfg: KnnConfig) -> dict[str, Any]:
    check_data_numbers(cfg.data)
    if cfg.knn.k < 1 or cfg.knn.temperature <= 0:
        raise MaelabError(f"--k must be >= 1 and --temperature > 0, got {cfg.knn.k}, {cfg.knn.temperature}")
    if cfg.run.out:
        check_output_file(cfg.run.out)
    info, device = init_distributed(cfg.run.device)
    cfg.run.precision = resolve_precision(cfg.run.precision, device)
    try:
        train, val = load_splits(cfg.data, cfg.run.seed)
        torch.manual_seed(cfg.run.seed)
        enc, arch, size = resolve_encoder(cfg.model)
        encoder = features_model(enc, arch, size).to(device)
        d = cfg.data
        workers = default_workers(d.num_workers)
        feats = []
        for images in (train, val):
            split = EvalSplit(images, size, d.batch_size, choose_in_memory(d.in_memory, images, size), workers,
                              d.crop_pct, d.bad_files, info.rank, info.world, progress=info.is_main)
            f, y, i = extract_features(encoder, split, device, cfg.model.global_pool, cfg.run.precision, info.is_main)
            feats.append(gather_split(f, y, i, device))
        (ft, lt, _), (fv, lv, _) = feats
        results: dict[str, Any] = {"command": "knn"}
        if info.is_main:
            dev = device if device.type == "cuda" else torch.device("cpu")
            results.update(knn_accuracy(ft.to(dev), lt.to(dev), fv.to(dev), lv.to(dev), len(train.classes),
                                        cfg.knn.k, cfg.knn.temperature))
            results.update(k=cfg.knn.k, temperature=cfg.knn.temperature, global_pool=cfg.model.global_pool,
                           init=cfg.model.init, source=enc.source if enc else "none",
                           encoder=describe(dict(arch, img_size=size)), num_classes=len(train.classes),
                           train_images=len(train), val_images=len(val), processes=info.world,
                           device=device_name(device))
            top5 = f"top-5 {results['knn_top5']:.2f}  " if results.get("knn_top5") is not None else ""
            print(f"knn: top-1 {results['knn_top1']:.2f}  {top5}(k={cfg.knn.k}, "
                  f"T={cfg.knn.temperature}, {len(train)} bank / {len(val)} query images, {cfg.model.global_pool} "
                  f"features)", flush=True)
            if cfg.run.out:
                write_json(Path(cfg.run.out).expanduser(), results)
        return results
    finally:
        cleanup(info)
