"""`maelab knn`: weighted k-nearest-neighbour accuracy of frozen features (k = 20, T = 0.07 on
L2-normalised features): the training split is the memory bank, the validation split the queries.
No training, so it is the quickest read of representation quality."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from maelab.commands.options.knn import KnnConfig
from maelab.commands.options.sections import check_data_numbers
from maelab.commands.session import Session, device_name, encoder_header
from maelab.data.splits import load_splits
from maelab.evaluate.features import extract_features, gather_split
from maelab.evaluate.knn import check_knn_settings, knn_accuracy
from maelab.io import check_output_file, write_json
from maelab.models.vit import describe


def run(cfg: KnnConfig) -> dict[str, Any]:
    check_data_numbers(cfg.data)
    check_knn_settings(cfg.knn.k, cfg.knn.temperature)  # before the features are extracted
    if cfg.run.out:
        check_output_file(cfg.run.out)
    with Session(cfg.run.device, cfg.run.precision, cfg.run.seed) as s:
        train, val = load_splits(cfg.data, cfg.run.seed, say=s.is_main)
        encoder, enc, arch, size, notes = s.frozen_encoder(cfg.model)
        if s.is_main:
            print(f"maelab knn: {encoder_header(enc, arch, size, notes)}; on {s.where}", flush=True)
        (ft, lt, _), (fv, lv, _) = (
            gather_split(*extract_features(encoder, s.eval_split(images, size, cfg.data), s.device,
                                           cfg.model.global_pool, s.precision, s.is_main), s.device)
            for images in (train, val))
        results: dict[str, Any] = {"command": "knn"}
        if s.is_main:
            dev = s.device if s.device.type == "cuda" else torch.device("cpu")
            results.update(knn_accuracy(ft.to(dev), lt.to(dev), fv.to(dev), lv.to(dev), len(train.classes),
                                        cfg.knn.k, cfg.knn.temperature))
            k = min(cfg.knn.k, len(train))  # a bank smaller than k votes with all it has
            if k < cfg.knn.k:
                warnings.warn(f"--k {cfg.knn.k} is more than the {len(train)} images of the bank: all {k} vote",
                              stacklevel=2)
            results.update(k=k, temperature=cfg.knn.temperature, global_pool=cfg.model.global_pool,
                           init=cfg.model.init, source=enc.source if enc else "none",
                           encoder=describe(dict(arch, img_size=size)), num_classes=len(train.classes),
                           train_images=len(train), val_images=len(val), processes=s.info.world,
                           device=device_name(s.device), precision=s.precision)
            top5 = f"top-5 {results['knn_top5']:.2f}  " if results.get("knn_top5") is not None else ""
            print(f"knn: top-1 {results['knn_top1']:.2f}  {top5}(k={k}, "
                  f"T={cfg.knn.temperature}, {len(train)} bank / {len(val)} query images, {cfg.model.global_pool} "
                  f"features)", flush=True)
            if cfg.run.out:
                write_json(Path(cfg.run.out).expanduser(), results)
        return results
