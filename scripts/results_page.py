"""Write docs/results.md from the outputs of `maelab recipe` and `maelab ablate` runs -- no hand-typed numbers.

    python scripts/results_page.py --recipe runs/recipe_quick [--recipe runs/recipe_full] \
        [--ablation runs/ablate_mask_ratio ...] --out docs/results.md

Each recipe folder contributes its results.json (accuracy per step, minutes, machine, seed, budgets) and
the command that re-creates it; each ablation folder its results.json table. A recipe that has not been
run (no results.json) is listed as not run, so the page never implies a number nobody measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RECIPES = {"recipe_quick": "about 30 minutes on 2 CPU cores", "recipe_full": "the public small-scale recipe; needs a GPU"}
STEPS = (("knn_mae_top1", "kNN (k=20, T=0.07), MAE encoder", "knn_mae"),
         ("knn_random_top1", "kNN, random-init encoder", "knn_random"),
         ("linprobe_top1", "linear probe, MAE encoder", "linprobe"),
         ("finetune_mae_top1", "fine-tune from the MAE encoder", "finetune_mae"),
         ("finetune_scratch_top1", "fine-tune from scratch (same budget)", "finetune_scratch"))


def recipe_section(folder: Path) -> list[str]:
    name = folder.name
    res_file = folder / "results.json"
    lines = [f"## `{name}`", ""]
    if not res_file.is_file():
        what = RECIPES.get(name, "")
        return lines + [f"Not run yet{f' ({what})' if what else ''}. Run `maelab recipe --config {name} --data "
                        f".../cifar10/train --out runs/{name}` and regenerate this page.", ""]
    res = json.loads(res_file.read_text())
    b = res["budgets"]
    lines += [f"Command: `maelab recipe --config {name} --data {res['data']} --out {res['recipe']}` "
              f"(seed {res['seed']}; pre-training budget {b['pretrain']}, fine-tune budget {b['finetune']} each).",
              f"Machine: {res['machine']}. Accuracy: final epoch, on `{res['val_data']}`; one seed.", "",
              "| step | top-1 (%) | minutes |", "|---|---|---|",
              f"| pre-training (MAE) | – | {res['minutes'].get('pretrain', '–')} |"]
    for key, title, step in STEPS:
        lines.append(f"| {title} | {res[key]:.2f} | {res['minutes'].get(step, '–')} |")
    s = res["signals"]
    total = sum(v for v in res["minutes"].values() if isinstance(v, (int, float)))
    lines += ["", f"Total {total:.1f} minutes. MAE kNN beats random init: "
                  f"**{'yes' if s['knn_mae_beats_random'] else 'no'}** "
                  f"({res['knn_mae_top1']:.2f} vs {res['knn_random_top1']:.2f}); MAE fine-tune beats from scratch "
                  f"at equal fine-tune time: **{'yes' if s['finetune_mae_beats_scratch'] else 'no'}** "
                  f"({res['finetune_mae_top1']:.2f} vs {res['finetune_scratch_top1']:.2f}).", ""]
    if Path(res["pictures"]).is_file():
        lines += [f"Reconstructions of validation images at mask ratios 0.75 / 0.85 / 0.95 (paper Fig. 4): "
                  f"`{res['pictures']}`. Loss curves: " + ", ".join(f"`{p}`" for p in res["curves"].values()), ""]
    return lines


def ablation_section(folder: Path) -> list[str]:
    res_file = folder / "results.json"
    if not res_file.is_file():
        return [f"## Ablation `{folder.name}`", "", "Not run yet.", ""]
    res = json.loads(res_file.read_text())
    table = (folder / "results.md").read_text() if (folder / "results.md").is_file() else ""
    return [f"## Ablation: `{res['setting']}`", "",
            f"Each value pre-trained to {res['budget']} on `{res['data']}`, then evaluated.", "", table, ""]


def quality_section(folder: Path) -> list[str]:
    lines = ["## Quality per CPU-minute: maelab against HF ViTMAE + torchvision", ""]
    res_file = folder / "results.json"
    if not res_file.is_file():
        return lines + ["Not run yet: `python benchmarks/quality_per_minute.py --data .../cifar10/train --val-data "
                        ".../cifar10/test --budget 30m --out runs/quality_per_minute` (about 1.5 hours on 2 CPU "
                        "cores: two 30-minute pre-trainings, then kNN of every snapshot).", ""]
    res = json.loads(res_file.read_text())
    return lines + [f"Command: `{res['command']}`; {res['machine']}; {res['load']}. kNN k=20, T=0.07 on "
                    f"{res['eval_images'] or 'all'} images of each split; seed {res['seed']}.", "",
                    (folder / "results.md").read_text(), f"Curve: `{folder / 'curve.png'}`.", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", nargs="*", default=["runs/recipe_quick", "runs/recipe_full"])
    ap.add_argument("--ablation", nargs="*", default=[])
    ap.add_argument("--quality", default="runs/quality_per_minute",
                    help="output folder of benchmarks/quality_per_minute.py (maelab vs HF ViTMAE + torchvision)")
    ap.add_argument("--out", default="docs/results.md")
    args = ap.parse_args()
    out = Path(args.out)
    lines = ["# Results", "",
             "Generated by `python scripts/results_page.py` from the run folders named below; nothing on this page",
             "is typed by hand. Re-run the commands to check any number.", ""]
    for folder in args.recipe:
        lines += recipe_section(Path(folder))
    for folder in args.ablation:
        lines += ablation_section(Path(folder))
    if not args.ablation:
        lines += ["## Ablations", "", "No ablation sweep has been run for this page yet (`maelab ablate`, see the README: "
                  "a sweep of four values at the quick budget takes about two hours on 2 CPU cores).", ""]
    lines += quality_section(Path(args.quality))
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
