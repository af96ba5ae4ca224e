"""Benchmark an original model against its evoplug-converted copies, side by side.

One implementation, used by the ``evoplug bench`` command, ``benchmarks/throughput.py`` and
the examples:

* :func:`interleaved` times several callables on the same input in the same process,
  interleaved run by run (A, B, C, A, B, C, ...), each call a whole batch under
  ``torch.inference_mode`` (CUDA synchronised around each call); the figure reported is the
  **median** of the repeats, so a noisy neighbour hits every model alike.
* :func:`flops` counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
  convolutions, attention; 2 FLOPs per multiply-add), no extra dependency.
* :func:`run_bench` builds timm models, converts them at several keep ratios, optionally
  compiles everything with ``torch.compile``, and returns one row (a dict) per
  (model, batch size, keep ratio); :func:`format_table`, :func:`write_csv`,
  :func:`write_json` and :func:`plot` present them.

Tests never assert timings: figures measured on a shared machine are indicative only.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models import check_model_name, create_model, input_size  # noqa: F401  (public)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Machine, FLOPs, timing
# --------------------------------------------------------------------------------------------

def machine(device: str = "cpu") -> str:
    """A one-line description of where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
    if str(device).startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        text = f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}); host: {text}"
    return text


_ALLOCATOR = "system"


def retain_freed_memory() -> str:
    """Make glibc's malloc keep freed memory in the process (CPU benchmarks).

    By default glibc serves every allocation above its (dynamic, at most 32 MiB) mmap threshold
    with a fresh ``mmap`` and gives it back on ``free``, so every forward page-faults its large
    activations in again: on the 2-core machine of docs/benchmarks.md that is about 2 GB of minor faults
    per forward of PVTv2-b1 at batch 32, some 40% of its time, the same absolute cost for the
    original and the converted model (it scales with the full-size activations both allocate).
    ``mallopt(M_MMAP_THRESHOLD)`` / ``mallopt(M_TRIM_THRESHOLD)`` (the same as the
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables, and the effect
    PyTorch's CPU tuning guide gets from jemalloc or tcmalloc) keep such blocks for reuse.
    Affects this process only. Returns the allocator setting now in force (a description).
    """
    global _ALLOCATOR
    if _ALLOCATOR != "system":
        return _ALLOCATOR
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _ALLOCATOR + " (not glibc: left as is)"
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        limit = 2 ** 31 - 1
        ok = libc.mallopt(-3, limit) == 1 and libc.mallopt(-1, limit) == 1   # M_MMAP_/M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        ok = False
    if ok:
        _ALLOCATOR = "glibc malloc retaining freed memory (mmap/trim thresholds 2 GiB)"
    return _ALLOCATOR


def allocator() -> str:
    """The CPU allocator setting benchmarks ran under (see :func:`retain_freed_memory`), with
    the environment that changes it (``LD_PRELOAD`` of another malloc, glibc's variables)."""
    env = [f"{k}={os.environ[k]}" for k in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_",
                                            "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
           if os.environ.get(k)]
    return _ALLOCATOR + (f" ({', '.join(env)})" if env else "")


def flops(model: Callable, x1: torch.Tensor) -> int:
    """FLOPs of one forward of ``model`` on ``x1`` (use a batch of one: FLOPs scale with it)."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x1)
    return fc.get_total_flops()


@dataclasses.dataclass
class Timing:
    name: str
    seconds: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _sync(x: torch.Tensor):
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def interleaved(models: Dict[str, Callable], x: torch.Tensor, repeats: int = 7, warmup: int = 2,
                progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Timing]:
    """Time each callable on ``x``, interleaved (one call of each per round, the order rotated
    from round to round), ``repeats`` times after ``warmup`` rounds.

    ``progress(done_rounds, total_rounds)`` is called after every round.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    res = {n: Timing(n, []) for n in models}
    names = list(models)
    with torch.inference_mode():
        for r in range(warmup + repeats):
            # the order rotates every round, so no model always runs first
            for n in names[r % len(names):] + names[:r % len(names)]:
                m = models[n]
                _sync(x)
                t = time.perf_counter()
                m(x)
                _sync(x)
                dt = time.perf_counter() - t
                if r >= warmup:
                    res[n].seconds.append(dt)
            if progress:
                progress(r + 1, warmup + repeats)
    return res


# --------------------------------------------------------------------------------------------
# Progress bar (stderr; no dependency)
# --------------------------------------------------------------------------------------------

class Progress:
    """The benchmark's one-line progress bar (drawn by tqdm):
    ``[#####.....] 12/40  deit_small b32  00:31 left``.

    Off when ``enabled`` is False; by default on when ``stream`` is a terminal.
    """

    def __init__(self, total: int, stream=None, enabled: Optional[bool] = None, width: int = 28):
        from tqdm import tqdm
        self._bar = tqdm(total=max(1, int(total)), file=stream if stream is not None else sys.stderr,
                         disable=None if enabled is None else not enabled, leave=False,
                         mininterval=0, miniters=1,
                         ascii=".#", bar_format="[{bar:%d}] {n_fmt}/{total_fmt}  {desc}  "
                                                "{remaining} left" % width)

    def set_note(self, note: str):
        self._bar.set_description_str(note)

    def update(self, n: int = 1, note: Optional[str] = None):
        if note is not None:
            self._bar.set_description_str(note, refresh=False)
        self._bar.update(n)

    def close(self):
        self._bar.close()


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def resolve_device(device: str) -> torch.device:
    """``torch.device(device)``, with a clear error when CUDA is asked for but missing."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    return dev


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

def _max_diff(a, b, x) -> float:
    with torch.inference_mode():
        return float((a(x).float() - b(x).float()).abs().max())


def _raise_recompile_limit(n: int):
    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, attr) and getattr(cfg, attr) < n:
            setattr(cfg, attr, n)


def bench_model(name: str, model: torch.nn.Module, keep_ratios: Sequence[float],
                batch_sizes: Sequence[int], *, size=None, device: str = "cpu",
                dtype: torch.dtype = torch.float32, repeats: int = 7, warmup: int = 2,
                compile=False, convert_options: Optional[dict] = None,
                progress: Optional[Progress] = None, seed: int = 0) -> List[dict]:
    """Benchmark ``model`` (in eval mode) against evoplug-converted copies of it.

    Every keep ratio gets its own converted copy (conversion runs on the CPU in float32, the
    copies are then moved to ``device``/``dtype``). For each batch size, the original and all
    converted copies (and, with ``compile=True``, ``torch.compile`` of each) are timed
    interleaved in one loop. Returns one row per (batch size, keep ratio).
    """
    import evoplug
    dev = resolve_device(device)
    h, w = input_size(model, size)
    convert_options = dict(convert_options or {})
    model = model.eval()
    example = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    fast = {}
    for keep in keep_ratios:
        if progress:
            progress.set_note(f"{name}: converting at keep {keep}")
        fast[keep] = evoplug.convert(model, keep_ratio=keep, example_input=example,
                                     **convert_options).eval()
    model = model.to(dev, dtype)
    fast = {k: m.to(dev, dtype) for k, m in fast.items()}
    x1 = example.to(dev, dtype)
    if progress:
        progress.set_note(f"{name}: counting FLOPs")
    f_orig = flops(model, x1)
    f_evo = {k: flops(m, x1) for k, m in fast.items()}
    xd = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed + 1)).to(dev, dtype)
    diffs = {k: _max_diff(m, model, xd) for k, m in fast.items()}

    variants: Dict[str, Callable] = {"orig": model}
    variants.update({f"evo{k}": m for k, m in fast.items()})
    if compile:
        variants.update(_compiled(variants, len(batch_sizes), compile))
        warmup = max(1, warmup)

    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed + 2)).to(dev, dtype)
        cdiffs = {}
        for vname in [v for v in variants if v.endswith("_c")]:
            # the first call compiles (not timed); its output is checked against eager
            if progress:
                progress.set_note(f"{name}: batch {batch}: torch.compile {vname[:-2]}")
            cdiffs[vname[:-2]] = _max_diff(variants[vname], variants[vname[:-2]], x)
        if progress:
            progress.set_note(f"{name}: batch {batch}, {len(variants)} variants interleaved")
        t = interleaved(variants, x, repeats, warmup,
                        (lambda r, n: progress.update(1)) if progress else None)
        ips = {v: batch / t[v].median for v in variants}
        for keep in keep_ratios:
            row = dict(model=name, img_size=f"{h}x{w}" if h != w else h, batch=batch,
                       keep_ratio=keep, device=str(dev), dtype=str(dtype).replace("torch.", ""),
                       **_speeds(ips, f"evo{keep}", f_orig, f_evo[keep]),
                       max_abs_diff=float(f"{diffs[keep]:.3g}"), repeats=repeats, warmup=warmup)
            if compile:
                row.update(_compiled_speeds(ips, f"evo{keep}", cdiffs))
            rows.append(row)
    return rows


def _compiled(variants: Dict[str, Callable], num_batches: int, compile) -> Dict[str, Callable]:
    """``torch.compile`` of every variant (``compile``: True, or torch.compile's mode)."""
    # one static graph per (model, batch size); every variant is the same forward code, so
    # dynamo's per-code recompile limit must allow all of them
    _raise_recompile_limit(2 * len(variants) * num_batches + 8)
    mode = compile if isinstance(compile, str) else None
    return {f"{k}_c": torch.compile(m, dynamic=False, mode=mode) for k, m in variants.items()}


def _speeds(ips: Dict[str, float], evo: str, f_orig: float, f_evo: float) -> dict:
    return dict(orig_img_s=round(ips["orig"], 2), evo_img_s=round(ips[evo], 2),
                speedup=round(ips[evo] / ips["orig"], 3), gflops_orig=round(f_orig / 1e9, 3),
                gflops_evo=round(f_evo / 1e9, 3), flop_ratio=round(f_orig / f_evo, 3))


def _compiled_speeds(ips: Dict[str, float], evo: str, cdiffs: Dict[str, float]) -> dict:
    return dict(orig_compiled_img_s=round(ips["orig_c"], 2),
                evo_compiled_img_s=round(ips[evo + "_c"], 2),
                compiled_speedup=round(ips[evo + "_c"] / ips["orig_c"], 3),
                compiled_vs_eager_orig=round(ips[evo + "_c"] / ips["orig"], 3),
                compile_max_abs_diff=float(f"{max(cdiffs[evo], cdiffs['orig']):.3g}"))


def run_bench(model_names: Iterable[str], keep_ratios: Sequence[float] = (0.5, 1.0),
              batch_sizes: Sequence[int] = (32,), *, img_size: Optional[int] = None,
              device: str = "cpu", dtype="float32", repeats: int = 7, warmup: int = 2,
              compile=False, model_kwargs: Optional[dict] = None,
              convert_options: Optional[dict] = None, progress: Optional[bool] = None,
              log: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Benchmark timm models (random weights, no hub) by name; see :func:`bench_model`.

    Checks every name, keep ratio, device and dtype before building anything.
    """
    from ..options import check_keep_ratio
    model_names = list(model_names)
    for n in model_names:
        check_model_name(n)
    keep_ratios = [check_keep_ratio(k) for k in keep_ratios]
    batch_sizes = [int(b) for b in batch_sizes]
    if not keep_ratios or not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError("need at least one keep ratio and batch sizes >= 1")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    resolve_device(device)
    rounds = (max(1, warmup) if compile else warmup) + repeats
    total = len(model_names) * len(batch_sizes) * rounds
    bar = Progress(total, enabled=progress)
    rows = []
    try:
        for n in model_names:
            torch.manual_seed(0)
            kwargs = dict(model_kwargs or {})
            if img_size is not None:
                kwargs["img_size"] = img_size
            model = create_model(n, **kwargs)
            new = bench_model(n, model, keep_ratios, batch_sizes, size=img_size, device=device,
                              dtype=dtype, repeats=repeats, warmup=warmup, compile=compile,
                              convert_options=convert_options, progress=bar)
            rows += new
            if log:
                bar.close()
                log(format_table(new, header=False))
            del model
    finally:
        bar.close()
    return rows


# --------------------------------------------------------------------------------------------
# Output: table, CSV, JSON, plot
# --------------------------------------------------------------------------------------------

_COLUMNS = [("model", "model", "{}"), ("img_size", "px", "{}"), ("batch", "batch", "{}"),
            ("keep_ratio", "keep", "{:g}"), ("orig_img_s", "orig img/s", "{:.1f}"),
            ("evo_img_s", "evo img/s", "{:.1f}"), ("speedup", "speed-up", "{:.2f}x"),
            ("gflops_orig", "GFLOP orig", "{:.2f}"), ("gflops_evo", "GFLOP evo", "{:.2f}"),
            ("flop_ratio", "FLOP ratio", "{:.2f}x"),
            ("orig_compiled_img_s", "compiled orig", "{:.1f}"),
            ("evo_compiled_img_s", "compiled evo", "{:.1f}"),
            ("compiled_speedup", "compiled speed-up", "{:.2f}x"),
            ("max_abs_diff", "max|diff|", "{:.2g}")]


def format_table(rows: List[dict], header: bool = True, model_width: int = 0) -> str:
    """A plain-text table of benchmark rows (compiled columns only when measured).

    ``model_width``: minimum width of the model column, so that tables printed model by
    model line up."""
    cols = [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    cells = [[fmt.format(r[k]) if k in r else "-" for k, _, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, (_, h, _) in enumerate(cols)]
    if widths:
        widths[0] = max(widths[0], model_width)
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w)   # noqa: E731
                                  for i, (v, w) in enumerate(zip(vals, widths)))
    out = [line(h for _, h, _ in cols), line("-" * w for w in widths)] if header else []
    out += [line(c) for c in cells]
    return "\n".join(out)


def format_markdown(rows: List[dict]) -> str:
    cols = [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    out = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt.format(r[k]) if k in r else "-" for k, _, fmt in cols) + " |"
            for r in rows]
    return "\n".join(out)


def write_csv(rows: List[dict], path: str) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)


def write_json(rows: List[dict], path: str, machine_text: Optional[str] = None,
               settings: Optional[dict] = None) -> None:
    with open(path, "w") as f:
        json.dump(dict(machine=machine_text or machine(), settings=settings or {}, rows=rows),
                  f, indent=1)


def plot(rows: List[dict], path: str, title: Optional[str] = None) -> str:
    """Speed-up and FLOP ratio against keep_ratio, one line per (model, batch); PNG at ``path``.

    Needs matplotlib (``pip install matplotlib``).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["img_size"], r["batch"]), []).append(r)
    flop_done = set()
    for i, ((model, px, batch), rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["keep_ratio"])
        c = colors[i % len(colors)]
        ks = [r["keep_ratio"] for r in rs]
        ax.plot(ks, [r["speedup"] for r in rs], "o-", color=c,
                label=f"{model} {px}px b{batch}: speed-up")
        if "compiled_speedup" in rs[0]:
            ax.plot(ks, [r["compiled_speedup"] for r in rs], "s:", color=c,
                    label=f"{model} {px}px b{batch}: speed-up, both torch.compile'd")
        if (model, px) not in flop_done:
            flop_done.add((model, px))
            ax.plot(ks, [r["flop_ratio"] for r in rs], "^--", color=c, alpha=0.7,
                    label=f"{model} {px}px: FLOP ratio (dense / evo)")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_xlabel("keep_ratio (fraction of patch tokens on the slow path)")
    ax.set_ylabel("original / converted")
    dev = rows[0]["device"] if rows else "cpu"
    ax.set_title(title or f"evoplug bench ({dev}, {rows[0]['dtype'] if rows else ''}, "
                          f"median of {rows[0]['repeats'] if rows else '?'} interleaved runs)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="best")
    fig.text(0.01, 0.005, machine(dev)[:150], fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path
