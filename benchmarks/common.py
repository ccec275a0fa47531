"""Shared helpers for the benchmark scripts: timing by interleaved repetitions, medians, FLOP
counting, a dense-GEMM reference rate, peak memory of a fresh subprocess, machine description and
writing one marked section of ``docs/benchmarks.md``.

Timing discipline (the machines these run on are small and shared): every variant under comparison
lives in the same process and the variants are run round-robin -- one step of each per round, the
order rotated every round -- so that a burst of outside load hits all of them alike. We report the
median step time per variant and, for comparisons, the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

DOC = REPO / "docs" / "benchmarks.md"


# --- device / precision ---------------------------------------------------------------------------
def at_least(low: int) -> Callable[[str], int]:
    """argparse type: a whole number >= ``low`` (rounds, threads, images), refused in argparse's one line
    instead of failing later in a median of nothing or in torch."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        return value
    return parse


def cli(main: Callable[[], None]) -> None:
    """Run a benchmark's ``main``: maelab's own errors (a missing data folder, an unknown model, a bad
    duration) end in one line and status 2, as the maelab command does, not in a traceback."""
    from maelab.errors import MaelabError

    try:
        main()
    except MaelabError as e:
        print(f"{Path(sys.argv[0]).stem}: error: {e}", file=sys.stderr)
        sys.exit(2)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    """fp32: no autocast; bf16: ``torch.autocast(device, dtype=torch.bfloat16)``."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}")


# --- machine description --------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        m = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return set(m.group(1).split()) if m else set()
    except OSError:
        return set()


def machine_info(device: torch.device) -> str:
    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    parts = [
        f"CPU: {cpu_model()} ({os.cpu_count()} logical cores"
        + (f", {'/'.join(isa)}" if isa else "")
        + f"; torch uses {torch.get_num_threads()} threads)",
        f"torch {torch.__version__}",
    ]
    try:
        import timm

        parts.append(f"timm {timm.__version__}")
    except ImportError:
        pass
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    try:
        import lightly

        parts.append(f"lightly {lightly.__version__}")
    except ImportError:
        pass
    if device.type == "cuda":
        parts.insert(0, f"GPU: {torch.cuda.get_device_name(device)}")
    parts.append(f"python {platform.python_version()}")
    return "; ".join(parts)


def load_note() -> str:
    try:
        return "load average at start: " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def command_line() -> str:
    """The exact command that produced a section (relative to the repository root)."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return " ".join(["python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])])


# --- timing ---------------------------------------------------------------------------------------
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_jiffies() -> tuple[int, int]:
    """(all CPUs' busy jiffies incl. steal, this process's user+system jiffies); (0, 0) off Linux."""
    try:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f[:8])
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return user + nice + system + irq + softirq + steal, int(mine[11]) + int(mine[12])
    except (OSError, ValueError, IndexError):
        return 0, 0


def foreign_load(seconds: float = 1.0) -> float:
    """Cores used by other processes over the next ``seconds`` (we sleep meanwhile)."""
    busy0, mine0 = _busy_jiffies()
    time.sleep(seconds)
    busy1, mine1 = _busy_jiffies()
    return max(0, (busy1 - busy0) - (mine1 - mine0)) / _HZ / seconds


class Rounds(dict):
    """name -> list of seconds (clean rounds only when there were enough of them), plus bookkeeping:
    ``total`` rounds run, ``clean`` rounds without outside load, ``foreign`` (cores used by other
    processes, per round)."""

    total: int = 0
    clean: int = 0
    foreign: list
    only_clean: bool = True


def interleaved(
    fns: dict[str, Callable[[], object]],
    reps: int,
    device: torch.device,
    warmup: int = 1,
    log: Callable[[str], None] | None = print,
    foreign_limit: float | None = None,
    max_extra: int | None = None,
    quiet_wait: float = 0.0,
) -> Rounds:
    """Run every callable ``warmup`` times, then rounds of one call each, round-robin with the order
    rotated every round, until ``reps`` rounds ran without outside load or ``reps + max_extra``
    rounds ran in all (default: up to twice as many).

    Outside load = CPU time used by *other* processes during a call (from /proc/stat minus our own),
    in cores; a round in which any call saw more than ``foreign_limit`` counts as disturbed (default: the cores our
    threads leave free + 0.25, i.e. 0.25 when torch uses every core; not checked on CUDA). Returns the wall-clock
    seconds per call and name over the undisturbed rounds when there are at least ``reps`` // 2 + 1 of
    them, else over all rounds (both counts are kept on the result). ``quiet_wait``: seconds (in all)
    this call may spend, before a round, waiting for other processes to go quiet."""
    names = list(fns)
    max_extra = reps if max_extra is None else max_extra
    if foreign_limit is None:
        free = max(0, (os.cpu_count() or 1) - torch.get_num_threads())
        foreign_limit = float("inf") if device.type == "cuda" else free + 0.25
    for _ in range(warmup):
        for name in names:
            fns[name]()
            synchronize(device)
    all_times: dict[str, list[float]] = {n: [] for n in names}
    foreign: list[float] = []
    clean_idx: list[int] = []
    r = 0
    waited = 0.0
    while len(clean_idx) < reps and r < reps + max_extra:
        while waited < quiet_wait:
            t_probe = time.perf_counter()
            if foreign_load(1.0) <= foreign_limit:
                break
            time.sleep(min(4.0, max(0.0, quiet_wait - waited - 1.0)))
            waited += time.perf_counter() - t_probe
        k = r % len(names)
        other = 0.0  # the worst call of the round: a burst during one call spoils that call's time
        for name in names[k:] + names[:k]:
            synchronize(device)
            busy0, mine0 = _busy_jiffies()
            t0 = time.perf_counter()
            fns[name]()
            synchronize(device)
            dt = time.perf_counter() - t0
            busy1, mine1 = _busy_jiffies()
            all_times[name].append(dt)
            other = max(other, max(0, (busy1 - busy0) - (mine1 - mine0)) / _HZ / max(dt, 1e-9))
        foreign.append(other)
        if other <= foreign_limit:
            clean_idx.append(r)
        if log:
            log(
                f"  round {r + 1} ({len(clean_idx)}/{reps} clean, other processes {other:.2f} cores): "
                + ", ".join(f"{n} {all_times[n][-1]:.3f}s" for n in names)
            )
        r += 1
    use = clean_idx if len(clean_idx) >= reps // 2 + 1 else list(range(r))
    out = Rounds({n: [all_times[n][i] for i in use] for n in names})
    out.total, out.clean, out.foreign = r, len(clean_idx), foreign
    out.only_clean = use is clean_idx
    out.waited = waited
    out.limit = foreign_limit
    return out


def rounds_note(times: Rounds) -> str:
    basis = "the undisturbed rounds" if times.only_clean else "all rounds (too few undisturbed ones)"
    waited = getattr(times, "waited", 0.0)
    return (
        f"{times.total} rounds, {times.clean} without outside load (other processes < "
        f"{times.limit:.2f} cores); "
        f"medians over {basis}" + (f"; waited {waited:.0f} s for quiet" if waited >= 1 else "")
    )


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of time[slow] / time[fast] (>1: ``fast`` is faster)."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def spread(xs: list[float]) -> str:
    """min-max as a percentage of the median, to show how noisy a row was."""
    m = statistics.median(xs)
    return f"{(min(xs) / m - 1) * 100:+.0f}/{(max(xs) / m - 1) * 100:+.0f}%"


# --- FLOPs ----------------------------------------------------------------------------------------
def _cpu_sdpa_mapping() -> dict:
    """FlopCounterMode knows the CUDA attention kernels but not the CPU flash-attention ops; count
    them with torch's own formulas (forward: 2 bmm; backward: 5 bmm incl. recomputing the scores),
    so CPU and CUDA counts agree."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        mapping[fwd] = lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)
    if bwd is not None:
        mapping[bwd] = lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v)
    return mapping


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (multiply-add = 2) of matmuls, convolutions and attention executed by ``fn``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


def gemm_callable(device: torch.device, dtype: torch.dtype, n: int, calls: int):
    """A callable doing ``calls`` dense (n x n) @ (n x n) products; returns (fn, flops per call)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def fn():
        for _ in range(calls):
            torch.mm(a, b, out=out)

    return fn, 2 * n**3 * calls


# --- memory ---------------------------------------------------------------------------------------
def current_rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: ``5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS of this process image: VmHWM from /proc/self/status (since the last
    :func:`reset_peak_rss`). Not ``ru_maxrss``: on Linux a child started by fork/exec inherits the
    parent's peak there, so a big parent would make every child look as big."""
    try:
        m = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024)


def run_child(args: list[str], timeout: float) -> dict:
    """Run ``python <args>`` in a fresh process; its last stdout line must be a JSON object."""
    cmd = [sys.executable, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


# --- docs/benchmarks.md ---------------------------------------------------------------------------
_DOC_HEADER = """# Benchmarks

Every section below is written by the script named in it; each script rewrites only the text between
its own `<!-- name:start -->` / `<!-- name:end -->` markers, so the scripts can be run independently.
How to run them: `benchmarks/README.md`.
"""


def write_section(name: str, body: str, path: Path = DOC) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else _DOC_HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def stamp(device: torch.device) -> str:
    """Lines that head every section: command, date, machine."""
    return (
        f"Command: `{command_line()}`  \n"
        f"Run: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; {load_note()}  \n"
        f"Machine: {machine_info(device)}\n"
    )


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def publish(name: str, body: str, write: bool = True) -> None:
    """Print a section and, unless ``--no-write``, put it into ``docs/benchmarks.md``."""
    print(body)
    if write:
        write_section(name, body)


def maelab_run(launcher: list[str], flags: list[str], threads: int = 1) -> str:
    """Run ``maelab`` (``-m maelab.cli``) from this checkout under ``launcher`` (the interpreter, or torchrun);
    its output, or exit with it when the run fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([*launcher, "-m", "maelab.cli", *flags], env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"maelab {' '.join(flags)} failed:\n{log[-3000:]}")
    return log


def torchrun(nproc: int) -> list[str]:
    """The launcher of ``nproc`` local processes (the plain interpreter for one)."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
