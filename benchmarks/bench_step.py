"""Training-step throughput of maelab against its peers, model FLOP utilisation and peak memory.

One *step* = forward + backward + AdamW step (+ zero_grad), on a fixed batch of random images, mask
ratio 0.75, per-patch normalised target. Configurations:

* ``tiny``: ViT-Tiny/4 at 32 px with the CIFAR preset decoder (128 wide, 4 blocks, 4 heads), batch 128
* ``base``: ViT-Base/16 at 224 px with the paper decoder (512 wide, 8 blocks, 16 heads), batch 16

each in fp32 and under ``torch.autocast(dtype=torch.bfloat16)``. Peers: Hugging Face
``ViTMAEForPreTraining`` (sdpa attention, eps 1e-6, exact GELU) and an MAE built from lightly's blocks
(when lightly imports). All peers use the same optimizer (fused AdamW where the build has it), so the
ratio compares the models. maelab levers measured: ``return_pred=False`` (default training path) vs
``True``; fused / foreach / for-loop AdamW (optimizer step timed on its own); torch.compile (in a child
process with a time budget); the thread count.

MFU = (FLOPs of one step, counted with ``torch.utils.flop_counter.FlopCounterMode``) / (median step
time) / (dense GEMM rate measured in the same rounds, same dtype).

Peak memory: one fresh subprocess per (configuration, precision, implementation) runs two steps; on
CPU we report peak RSS (VmHWM, reset right before the first step) and its increase over the RSS at
that point (activations + gradients + optimizer state); on CUDA ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_step.py                 # both configs, both precisions -> docs/benchmarks.md
    python benchmarks/bench_step.py --config tiny --reps 9
    python benchmarks/bench_step.py --quick         # smoke test: 2 rounds, no compile, no memory
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import common, peers  # noqa: E402

PRECISIONS = ("fp32", "bf16")
DEFAULT_REPS = {"tiny": 7, "base": 4}
GEMM = {"cpu": (2048, {"fp32": 4, "bf16": 8}), "cuda": (8192, {"fp32": 10, "bf16": 20})}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def images(size: peers.Size, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size.batch, 3, size.img, size.img, generator=g).to(device)


def make_step(cand: peers.Candidate, opt: torch.optim.Optimizer, imgs, device, precision):
    def step():
        with common.autocast(device, precision):
            loss = cand.loss(imgs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def step_flops(cand: peers.Candidate, imgs, device, precision) -> int:
    def fwd_bwd():
        with common.autocast(device, precision):
            loss = cand.loss(imgs)
        loss.backward()

    flops = common.count_flops(fwd_bwd)
    cand.model.zero_grad(set_to_none=True)
    return flops


def with_threads(fn, n: int):
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


# --- one (config, precision) cell, in this process ------------------------------------------------
def measure_cell(size: peers.Size, precision: str, device: torch.device, args) -> dict:
    log(f"[{size.key} {precision}] building models")
    torch.manual_seed(0)
    imgs = images(size, device)
    cands: dict[str, peers.Candidate] = {}
    mae = peers.maelab_candidate(size)
    mae.model.to(device)
    cands["maelab"] = mae
    cands["maelab return_pred=True"] = peers.maelab_candidate(size, return_pred=True, model=mae.model)
    if args.math_attn:
        c = peers.maelab_candidate(size, model=mae.model, math_attn=True)
        cands[c.name] = c
    cands["HF transformers"] = peers.hf_candidate(size)
    if args.hf_eager == "on" or (args.hf_eager == "auto" and size.key == "tiny"):
        c = peers.hf_candidate(size, "eager")
        cands[c.name] = c
    why_no_lightly = peers.lightly_available()
    if why_no_lightly is None:
        cands["lightly blocks"] = peers.lightly_candidate(size)
    for c in cands.values():
        c.model.to(device).train()

    opt_kind = "fused"
    opts, steps, flops = {}, {}, {}
    for name, c in cands.items():
        if c.model is mae.model and "maelab" in opts:
            opts[name] = opts["maelab"]  # same model, same optimizer
        else:
            opts[name], opt_kind = peers.adamw(c.model.parameters(), "fused")
        flops[name] = step_flops(c, imgs, device, precision)
        steps[name] = make_step(c, opts[name], imgs, device, precision)

    threads = torch.get_num_threads()
    other = 1 if threads > 1 else (os.cpu_count() or 1)
    thread_lever = device.type == "cpu" and other != threads and (
        args.threads_lever == "on" or (args.threads_lever == "auto" and size.key == "tiny")
    )
    if thread_lever:
        name = f"maelab {other} thread{'s' if other > 1 else ''}"
        steps[name] = with_threads(steps["maelab"], other)
        flops[name] = flops["maelab"]

    n, calls = GEMM[device.type]
    gemm_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    steps["GEMM"], gemm_flops = common.gemm_callable(device, gemm_dtype, n, calls[precision])

    log(f"[{size.key} {precision}] {args.reps} interleaved rounds of: {', '.join(steps)}")
    times = common.interleaved(steps, args.reps, device, warmup=1, log=log, quiet_wait=args.quiet_wait)
    gemm_rate = gemm_flops / common.median(times["GEMM"])
    med = {k: common.median(v) for k, v in times.items()}

    # Optimizer lever, timed on its own: the AdamW step over maelab's parameters with gradients set.
    opt_times = {}
    if args.opt_lever:
        with common.autocast(device, precision):
            loss = mae.loss(imgs)
        loss.backward()
        built = {}
        for kind in ("fused", "foreach", "for-loop"):
            o, got = peers.adamw(mae.model.parameters(), kind)
            if got != kind:
                continue
            built[kind] = o
        fns = {k: (lambda o=o: o.step()) for k, o in built.items()}
        opt_times = common.interleaved(fns, max(5, 2 * args.reps), device, warmup=1, log=None)
        opt_times = {k: common.median(v) for k, v in opt_times.items()}
        del built, fns
        mae.model.zero_grad(set_to_none=True)

    if args.profile:
        profile(steps, ["maelab", "HF transformers"], device)

    res = {
        "precision": precision,
        "median": med,
        "spread": {k: common.spread(v) for k, v in times.items()},
        "ratio_vs_hf": {k: common.ratio(times, "HF transformers", k) for k in times if k != "GEMM"},
        "flops": flops,
        "gemm_rate": gemm_rate,
        "rounds": common.rounds_note(times),
        "gemm": f"{n}x{n} {str(gemm_dtype).replace('torch.', '')} torch.mm",
        "opt_kind": opt_kind,
        "opt_times": opt_times,
        "lightly": why_no_lightly,
        "threads": threads,
    }
    del cands, opts, steps, mae
    gc.collect()
    return res


def profile(steps: dict, names: list[str], device: torch.device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in names:
        steps[name]()
        with tprofile(activities=acts) as prof:
            steps[name]()
            common.synchronize(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n=== profile of one {name} step ===")
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


# --- child processes ------------------------------------------------------------------------------
def child_memory(args) -> dict:
    device = common.pick_device(args.device)
    size = peers.SIZES[args.config]
    torch.manual_seed(0)
    cand = peers.build(args.impl, size)
    cand.model.to(device).train()
    opt, _ = peers.adamw(cand.model.parameters(), "fused")
    imgs = images(size, device)
    step = make_step(cand, opt, imgs, device, args.precision)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"base": base, "peak": peak, "delta": peak - base, "kind": "cuda"}
    base = common.current_rss_bytes()
    common.reset_peak_rss()  # peak from here on only
    for _ in range(2):
        step()
    peak = max(common.peak_rss_bytes(), base)
    return {"base": base, "peak": peak, "delta": peak - base, "kind": "rss"}


def child_compile(args) -> dict:
    """maelab eager vs maelab torch.compile'd vs HF, interleaved; compile time = first two steps."""
    device = common.pick_device(args.device)
    size = peers.SIZES[args.config]
    torch.manual_seed(0)
    imgs = images(size, device)
    eager = peers.maelab_candidate(size)
    comp_model = peers.maelab_model(size)
    comp_model.load_state_dict(eager.model.state_dict())
    compiled = torch.compile(comp_model)
    comp = peers.Candidate("maelab compiled", compiled, lambda x: compiled(x, return_pred=False)[0])
    hf = peers.hf_candidate(size)
    steps = {}
    for name, c in (("maelab", eager), ("maelab compiled", comp), ("HF transformers", hf)):
        c.model.to(device).train()
        opt, _ = peers.adamw((comp_model if c is comp else c.model).parameters(), "fused")
        steps[name] = make_step(c, opt, imgs, device, args.precision)
    t0 = time.perf_counter()
    steps["maelab compiled"]()
    common.synchronize(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps["maelab compiled"]()
    common.synchronize(device)
    second = time.perf_counter() - t0
    log(f"compile: first step {first:.1f}s, second {second:.1f}s")
    times = common.interleaved(steps, args.reps, device, warmup=1, log=log, quiet_wait=args.quiet_wait)
    return {
        "compile_s": first + second,
        "median": {k: common.median(v) for k, v in times.items()},
        "compiled_vs_eager": common.ratio(times, "maelab", "maelab compiled"),
        "compiled_vs_hf": common.ratio(times, "HF transformers", "maelab compiled"),
        "eager_vs_hf": common.ratio(times, "HF transformers", "maelab"),
    }


def child_args(args, kind: str, precision: str, **extra) -> list[str]:
    out = [str(Path(__file__).resolve()), "--child", kind, "--config", args.config_one,
           "--precision", precision, "--device", args.device, "--quiet-wait", str(args.quiet_wait)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    for k, v in extra.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


# --- report ---------------------------------------------------------------------------------------
def fmt_s(t: float) -> str:
    return f"{t * 1e3:.0f} ms" if t < 10 else f"{t:.1f} s"


def targets(cell: dict, comp: dict | None) -> str:
    """The issue's targets, judged from this cell: maelab >= 1.3x HF, MFU >= 60% of the GEMM rate."""
    ratios = cell["ratio_vs_hf"]
    r = ratios["maelab"]
    mfu = cell["flops"]["maelab"] / cell["median"]["maelab"] / cell["gemm_rate"]
    best = max((k for k in ratios if k.startswith("maelab") and "thread" not in k), key=lambda k: ratios[k])
    lines = [
        f"**Targets** (maelab as shipped: `return_pred=False`, fused AdamW, eager): "
        f"step vs HF {r:.2f}x (target 1.3x: **{'met' if r >= 1.3 else 'not met'}**); "
        f"MFU {mfu * 100:.0f}% (target 60%: **{'met' if mfu >= 0.6 else 'not met'}**)."
    ]
    if best != "maelab":
        mfu_b = cell["flops"][best] / cell["median"][best] / cell["gemm_rate"]
        lines.append(f"Best maelab row: {best}, {ratios[best]:.2f}x HF, MFU {mfu_b * 100:.0f}%.")
    if comp and "error" not in comp:
        lines.append(f"torch.compile'd maelab: {comp['compiled_vs_hf']:.2f}x HF.")
    return " ".join(lines) + "\n"


def report(size: peers.Size, cells: list[dict], compiles: dict, memory: dict, device, args) -> str:
    threads = f", {args.threads} thread{'s' if args.threads > 1 else ''}" if args.threads else ""
    out = [f"## Training step: {size.label}{threads}\n", common.stamp(device)]
    out.append(
        "One step = forward + backward + AdamW step on a fixed batch; interleaved rounds "
        "(order rotated each round) after one warm-up round; **time = median step**, spread = "
        "min/max vs the median; **vs HF** = median over rounds of t(HF)/t(row) (>1: faster than HF). "
        "Every model uses the same optimizer (fused AdamW where the build has it). "
        "MFU = counted step FLOPs / median step time / dense GEMM rate measured in the same rounds.\n"
    )
    for cell in cells:
        p = cell["precision"]
        title = "fp32" if p == "fp32" else "bf16 autocast (`torch.autocast(..., dtype=torch.bfloat16)`)"
        out.append(f"### {title}\n")
        rows = []
        for name, t in cell["median"].items():
            if name == "GEMM":
                continue
            fl = cell["flops"][name]
            rate = fl / t
            rows.append([
                name, fmt_s(t), cell["spread"][name], f"{size.batch / t:.1f}",
                f"{cell['ratio_vs_hf'][name]:.2f}x", f"{fl / 1e9:.1f}", f"{rate / 1e9:.0f}",
                "-" if "thread" in name else f"{rate / cell['gemm_rate'] * 100:.0f}%",
            ])
        out.append(common.md_table(
            ["implementation", "time / step", "spread", "img/s", "vs HF", "GFLOP / step", "GFLOP/s", "MFU"],
            rows,
        ))
        thread_rows = [k for k in cell["median"] if "thread" in k]
        if thread_rows:
            out.append(f"\n{thread_rows[0]}: the maelab row run with another `torch.set_num_threads` (the "
                       f"GEMM reference uses {cell['threads']}, so no MFU for it).")
        out.append(
            f"\nGEMM reference ({cell['gemm']}, same rounds): **{cell['gemm_rate'] / 1e9:.0f} GFLOP/s** "
            f"(spread {cell['spread']['GEMM']}). Optimizer in the rows: {cell['opt_kind']} AdamW. "
            f"{cell['rounds']}.\n"
        )
        if cell["opt_times"]:
            t_step = cell["median"]["maelab"]
            parts = [f"{k} {v * 1e3:.1f} ms ({v / t_step * 100:.1f}% of the maelab step)"
                     for k, v in cell["opt_times"].items()]
            out.append("AdamW step alone over maelab's parameters (median): " + "; ".join(parts) + ".\n")
        c = compiles.get(p)
        if c is not None:
            if "error" in c:
                out.append(f"torch.compile (budget {args.compile_budget:.0f} s): not measured -- {c['error']}.\n")
            else:
                m = c["median"]
                pays = c["compiled_vs_eager"] > 1.03
                out.append(
                    f"torch.compile (default mode, inductor, separate process, cold cache): compiling took "
                    f"{c['compile_s']:.0f} s (first two steps); then maelab eager {fmt_s(m['maelab'])}, "
                    f"compiled {fmt_s(m['maelab compiled'])}, HF {fmt_s(m['HF transformers'])} -> compiled is "
                    f"**{c['compiled_vs_eager']:.2f}x** eager and **{c['compiled_vs_hf']:.2f}x** HF "
                    f"(eager vs HF in that process: {c['eager_vs_hf']:.2f}x). "
                    + ("It pays once a run is longer than "
                       f"~{c['compile_s'] / max(1e-9, m['maelab'] - m['maelab compiled']):.0f} steps.\n"
                       if pays else "It does not pay here.\n")
                )
        if cell["lightly"]:
            out.append(f"lightly: not measured ({cell['lightly']}).\n")
        out.append(targets(cell, c))
    if memory:
        kind = next((v.get("kind") for v in memory.values() if "kind" in v), "rss")
        out.append("### Peak memory (fresh process per row, two steps)\n")
        if kind == "cuda":
            head = ["implementation", "precision", "allocated before", "peak allocated", "increase"]
        else:
            head = ["implementation", "precision", "RSS before first step", "peak RSS", "increase"]
        rows = []
        for (impl, p), v in memory.items():
            if "error" in v:
                rows.append([impl, p, "-", "-", v["error"]])
            else:
                rows.append([impl, p, common.gib(v["base"]), common.gib(v["peak"]), common.gib(v["delta"])])
        out.append(common.md_table(head, rows))
        out.append(
            "\nIncrease = activations + gradients + AdamW state (+ allocator slack); the RSS before the step "
            "holds the interpreter, libraries and the fp32 weights.\n"
        )
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=["tiny", "base", "all"], default="all")
    ap.add_argument("--precision", choices=["fp32", "bf16", "all"], default="all")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument("--threads", type=common.at_least(1), default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="seconds per measurement that may be spent waiting for other processes to go quiet")
    ap.add_argument("--reps", type=common.at_least(1), default=None, help="interleaved rounds (default: tiny 7, base 4)")
    ap.add_argument("--quick", action="store_true", help="2 rounds, no compile, no memory, no opt lever")
    ap.add_argument("--compile-budget", type=float, default=300.0,
                    help="seconds allowed for torch.compile's first two steps (0: skip compile)")
    ap.add_argument("--compile-reps", type=common.at_least(1), default=None, help="rounds in the compile process")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads-lever", choices=["auto", "on", "off"], default="auto",
                    help="also time maelab with 1 thread (or all cores when --threads 1; auto: tiny config only)")
    ap.add_argument("--no-math-attn", dest="math_attn", action="store_false",
                    help="skip the experiment row: maelab with timm's math attention (fused_attn=False)")
    ap.add_argument("--hf-eager", choices=["auto", "on", "off"], default="auto",
                    help="context row: HF with eager attention (auto: tiny config only)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table per step kind")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing docs")
    ap.add_argument("--tag", default="", help="appended to the section's name (e.g. avx2), so that runs on "
                    "other machines sit beside the existing sections instead of replacing them")
    ap.add_argument("--child", choices=["memory", "compile"], help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        args.reps = args.reps or 3
        fn = child_memory if args.child == "memory" else child_compile
        print(json.dumps(fn(args)), flush=True)
        return

    device = common.pick_device(args.device)
    configs = ["tiny", "base"] if args.config == "all" else [args.config]
    precisions = list(PRECISIONS) if args.precision == "all" else [args.precision]
    args.opt_lever = not args.quick
    for key in configs:
        size = peers.SIZES[key]
        args.config_one = key
        user_reps = args.reps
        args.reps = 2 if args.quick and user_reps is None else (user_reps or DEFAULT_REPS[key])
        t_start = time.perf_counter()
        cells = [measure_cell(size, p, device, args) for p in precisions]

        compiles = {}
        if not args.quick and args.compile_budget > 0:
            for cell in cells:
                p = cell["precision"]
                reps = args.compile_reps or max(3, args.reps - 1)
                per_round = cell["median"]["maelab"] * 2 + cell["median"]["HF transformers"]
                timeout = args.compile_budget + (reps + 1) * per_round * 3 + 60
                log(f"[{key} {p}] torch.compile in a child process (timeout {timeout:.0f} s)")
                env_before = os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES")
                os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # cold compile time
                compiles[p] = common.run_child(child_args(args, "compile", p, reps=reps), timeout)
                if env_before is None:
                    del os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"]
                else:
                    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = env_before
                if "error" in compiles[p] and "timed out" in compiles[p]["error"]:
                    compiles[p]["error"] = (f"compile + {reps} rounds did not finish within {timeout:.0f} s "
                                            f"(compile budget {args.compile_budget:.0f} s)")
                log(f"  -> {compiles[p]}")

        memory = {}
        if not args.quick and not args.no_memory:
            impls = ["maelab", "maelab-rp"] + (["maelab-math"] if args.math_attn else []) + ["hf"]
            impls += ["lightly"] if cells[0]["lightly"] is None else []
            names = {"maelab": "maelab", "maelab-rp": "maelab return_pred=True", "hf": "HF transformers",
                     "lightly": "lightly blocks", "maelab-math": "maelab, math attention (experiment)"}
            for cell in cells:
                p = cell["precision"]
                for impl in impls:
                    timeout = 120 + 10 * cell["median"][names[impl]]
                    log(f"[{key} {p}] peak memory of {impl} (child process)")
                    memory[(names[impl], p)] = common.run_child(
                        child_args(args, "memory", p, impl=impl), timeout)
                    log(f"  -> {memory[(names[impl], p)]}")

        raw = Path(tempfile.gettempdir()) / f"maelab_bench_step_{key}.json"
        raw.write_text(json.dumps({"cells": cells, "compiles": compiles,
                                   "memory": [[k[0], k[1], v] for k, v in memory.items()]}, indent=1))
        log(f"raw results: {raw}")
        section = report(size, cells, compiles, memory, device, args)
        section += f"\nWall time of this run: {time.perf_counter() - t_start:.0f} s.\n"
        if args.no_write:
            print(section)
        else:
            name = f"bench_step:{key}" + (f":{args.threads}t" if args.threads else "") + (f":{args.tag}" if args.tag else "")
            common.write_section(name, section)
            print(f"wrote section {name} of {common.DOC.relative_to(common.REPO)}")
        print(f"produced by: {common.command_line()}")
        args.reps = user_reps


if __name__ == "__main__":
    common.cli(main)
