"""Benchmark an original model against its evoplug-converted copies, side by side.

One implementation, used by the ``evoplug bench`` command, ``benchmarks/throughput.py`` and
the examples:

* :func:`interleaved` times several callables on the same input in the same process,
  interleaved run by run (A, B, C, A, B, C, ...), each call a whole batch under
  ``torch.inference_mode`` (CUDA synchronised around each call); the figure reported is the
  **median** of the repeats, so a noisy neighbour hits every model alike.
* :func:`flops` counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
  convolutions, attention; 2 FLOPs per multiply-add), no extra dependency; :func:`flop_counter`
  mends two of torch's formulas (the CPU's fused attention, a grouped convolution's backward).
* :func:`run_bench` builds timm models, converts them at several keep ratios, optionally
  compiles everything with ``torch.compile``, and returns one row (a dict) per
  (model, batch size, keep ratio); :func:`format_table`, :func:`write_csv`,
  :func:`write_json` and :func:`plot` present them.
* :func:`bench_train` times training steps instead (forward + backward + optimizer step,
  optionally under autocast), interleaved the same way (``evoplug bench --train``).
* :func:`kernel_profile` and :func:`format_profile`: the top kernels (by self device time) of
  one forward of each model, side by side (``torch.profiler``).

Tests never assert timings: figures measured on a shared machine are indicative only.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import csv
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.utils import flop_counter as _fc
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode

from .models import check_model_name, create_model, input_size  # noqa: F401  (public)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Machine, FLOPs, timing
# --------------------------------------------------------------------------------------------

class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active, by name (``ops``): the measure of the
    runtime's cost per evolving block (tests/test_op_budget.py, benchmarks/family_ops.py and
    reselect.py; benchmarks/host_time.py keeps its own, to run against older commits)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


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


def _sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(q, k, v)


def _sdpa_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_backward_flop_count(grad_out, q, k, v)


def _conv_backward(grad_out, x, w, _bias, _stride, _padding, _dilation, transposed,
                   _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    # each gradient (input, weight) takes as many multiply-adds as the forward
    forward = _fc.conv_flop_count(x, w, grad_out, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _formulas() -> dict:
    aten = torch.ops.aten
    names = {"_scaled_dot_product_flash_attention_for_cpu": _sdpa,
             "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_backward}
    out = {getattr(aten, n): f for n, f in names.items()
           if hasattr(aten, n) and getattr(aten, n) not in _fc.flop_registry}
    out[aten.convolution_backward] = _conv_backward
    return out


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` with two corrections to torch's formulas (torch 2.14):

    * ``F.scaled_dot_product_attention`` on the CPU is counted. torch registers formulas for
      the CUDA attention kernels only, so the CPU count of a timm ViT left out the ``N^2`` part
      of every attention (QK^T and AV), and a FLOP ratio counted on the CPU differed from the
      one counted on a GPU.
    * The backward of a grouped convolution (PVTv2's depthwise 3x3) counts its weight gradient
      as the forward's multiply-adds; torch's formula ignores the groups there and counts it
      ``in_channels / groups`` times over (PVTv2-b1's training FLOPs: 91 GFLOP an image instead
      of about 13)."""
    return FlopCounterMode(display=False, custom_mapping=_formulas())


def flops(model: Callable, x1: torch.Tensor, counter: Optional[Callable] = None) -> int:
    """FLOPs of one forward of ``model`` on ``x1`` (use a batch of one: FLOPs scale with it);
    ``counter`` makes the ``FlopCounterMode`` (default :func:`flop_counter`)."""
    with (counter or flop_counter)() as fc, torch.no_grad():
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
                progress: Optional[Callable[[int, int], None]] = None,
                inference: bool = True) -> Dict[str, Timing]:
    """Time each callable on ``x``, interleaved (one call of each per round, the order rotated
    from round to round), ``repeats`` times after ``warmup`` rounds.

    ``progress(done_rounds, total_rounds)`` is called after every round. The calls run under
    ``torch.inference_mode`` unless ``inference`` is False (training steps).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    res = {n: Timing(n, []) for n in models}
    names = list(models)
    with torch.inference_mode() if inference else contextlib.nullcontext():
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


def converted_copies(model: torch.nn.Module, keep_ratios: Sequence[float],
                     example: Optional[torch.Tensor] = None, convert_options: Optional[dict] = None,
                     base: Optional[torch.nn.Module] = None) -> Dict[float, torch.nn.Module]:
    """Converted copies of ``model`` (eval mode), one per keep ratio, from one conversion.

    ``keep_ratio`` is read at run time, so one conversion (or ``base``, a model converted from
    ``model`` earlier, e.g. cached by a benchmark suite; left untouched), copied with
    ``copy.deepcopy`` and set to each ratio with :func:`evoplug.set_options`, gives the models
    a conversion at each ratio would, for the cost of one analysis.
    """
    import evoplug
    own = base is None
    if own:
        base = evoplug.convert(model, keep_ratio=keep_ratios[0], example_input=example,
                               **dict(convert_options or {}))
    out = {}
    for i, keep in enumerate(keep_ratios):
        m = base if own and i == len(keep_ratios) - 1 else copy.deepcopy(base)
        evoplug.set_options(m, keep_ratio=keep)
        m.eval()            # (not chained: MMPretrain's backbones' train() returns None)
        out[keep] = m
    return out


@dataclasses.dataclass
class _Setup:
    """An original model and its converted copies on the benchmark's device, with FLOPs."""
    model: torch.nn.Module
    fast: Dict[float, torch.nn.Module]
    size: Tuple[int, int]
    f_orig: int
    f_evo: Dict[float, int]
    blocks: Dict[str, object] = dataclasses.field(default_factory=dict)    # :func:`_blocks`


def _setup(name: str, model: torch.nn.Module, keep_ratios: Sequence[float], size, dev, dtype,
           convert_options, progress, seed: int, base, count=None) -> _Setup:
    """Convert (on the CPU, float32), move everything to ``dev``/``dtype``, count FLOPs per
    image with ``count`` (default :func:`flops`)."""
    h, w = input_size(model, size)
    model.eval()
    example = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    if progress:
        progress.set_note(f"{name}: converting at keep {', '.join(map(str, keep_ratios))}")
    fast = converted_copies(model, keep_ratios, example, convert_options, base)
    model = model.to(dev, dtype)
    fast = {k: m.to(dev, dtype) for k, m in fast.items()}
    x1 = example.to(dev, dtype)
    if progress:
        progress.set_note(f"{name}: counting FLOPs")
    count = count or flops
    return _Setup(model, fast, (h, w), count(model, x1), {k: count(m, x1) for k, m in fast.items()},
                  _blocks(next(iter(fast.values()))))


def _blocks(fast: torch.nn.Module) -> Dict[str, object]:
    """What a row's figures come from: the converted and evolving blocks, and the blocks left
    as they are (``strict=False``), with a ``converted`` cell for the table where some were."""
    import evoplug
    report = evoplug.get_report(fast)
    out = dict(blocks_converted=len(report.blocks),
               blocks_evolving=sum(s.role == "evolve" for s in report.blocks),
               blocks_not_converted=len(report.failed))
    if report.failed:
        out["converted"] = f"{len(report.blocks)} of {len(report.blocks) + len(report.failed)} blocks"
    return out


def _batch(size: Tuple[int, int], batch: int, dev, dtype, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed)).to(dev, dtype)


def _img_size(size: Tuple[int, int]):
    return f"{size[0]}x{size[1]}" if size[0] != size[1] else size[0]


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
                progress: Optional[Progress] = None, seed: int = 0,
                base: Optional[torch.nn.Module] = None) -> List[dict]:
    """Benchmark ``model`` (in eval mode) against evoplug-converted copies of it.

    One conversion (on the CPU in float32; or ``base``, see :func:`converted_copies`) gives
    a copy per keep ratio; ``model`` and the copies are then moved to ``device``/``dtype``. For
    each batch size, the original and all converted copies (and, with ``compile=True`` or a
    mode, ``torch.compile`` of each) are timed interleaved in one loop. Returns one row per
    (batch size, keep ratio).
    """
    dev = resolve_device(device)
    s = _setup(name, model, keep_ratios, size, dev, dtype, convert_options, progress, seed, base)
    xd = _batch(s.size, 2, dev, dtype, seed + 1)
    diffs = {k: _max_diff(m, s.model, xd) for k, m in s.fast.items()}
    variants: Dict[str, Callable] = {"orig": s.model}
    variants.update({f"evo{k}": m for k, m in s.fast.items()})
    if compile:
        variants.update(_compiled(variants, len(batch_sizes), compile))
        warmup = max(1, warmup)
    rows = []
    for batch in batch_sizes:
        x = _batch(s.size, batch, dev, dtype, seed + 2)
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
            row = dict(model=name, img_size=_img_size(s.size), batch=batch,
                       keep_ratio=keep, device=str(dev), dtype=str(dtype).replace("torch.", ""),
                       **_speeds(ips, f"evo{keep}", s.f_orig, s.f_evo[keep]),
                       max_abs_diff=float(f"{diffs[keep]:.3g}"), repeats=repeats, warmup=warmup,
                       **s.blocks)
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


def _compiled_speeds(ips: Dict[str, float], evo: str, cdiffs: Optional[Dict[str, float]]) -> dict:
    """The compiled columns of a row (``cdiffs`` None: training steps, no output compared)."""
    return dict(orig_compiled_img_s=round(ips["orig_c"], 2),
                evo_compiled_img_s=round(ips[evo + "_c"], 2),
                compiled_speedup=round(ips[evo + "_c"] / ips["orig_c"], 3),
                compiled_vs_eager_orig=round(ips[evo + "_c"] / ips["orig"], 3),
                compile_max_abs_diff=(None if cdiffs is None else
                                      float(f"{max(cdiffs[evo], cdiffs['orig']):.3g}")))


def _checked(model_names, keep_ratios, batch_sizes, dtype, device):
    """The arguments of :func:`run_bench`, checked and normalised (raises ValueError)."""
    from ..options import check_keep_ratio
    model_names = list(model_names)
    for n in model_names:
        check_model_name(n)
    # (each once, in their order, as the command takes them: a ratio given twice gave two
    # rows of the same measurement until the thirty-sixth session; audit U2)
    keep_ratios = list(dict.fromkeys(check_keep_ratio(k) for k in keep_ratios))
    batch_sizes = list(dict.fromkeys(int(b) for b in batch_sizes))
    if not keep_ratios or not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError("need at least one keep ratio and batch sizes >= 1")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    resolve_device(device)
    return model_names, keep_ratios, batch_sizes, dtype


def run_bench(model_names: Iterable[str], keep_ratios: Sequence[float] = (0.5, 1.0),
              batch_sizes: Sequence[int] = (32,), *, img_size: Optional[int] = None,
              device: str = "cpu", dtype="float32", repeats: int = 7, warmup: int = 2,
              compile=False, model_kwargs: Optional[dict] = None,
              convert_options: Optional[dict] = None, progress: Optional[bool] = None,
              log: Optional[Callable[[str], None]] = None, train: bool = False,
              optimizer: str = "adamw") -> List[dict]:
    """Benchmark timm models (random weights, no hub) by name; see :func:`bench_model`, or
    with ``train=True`` :func:`bench_train` (training steps, ``compile`` as there).

    Checks every name, keep ratio, device and dtype before building anything.
    """
    model_names, keep_ratios, batch_sizes, dtype = _checked(model_names, keep_ratios,
                                                            batch_sizes, dtype, device)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if img_size is None and (model_kwargs or {}).get("img_size") is not None:
        img_size = model_kwargs["img_size"]    # (the input size too: PVTv2 takes no img_size)
    rounds = (max(1, warmup) if compile or train else warmup) + repeats
    bar = Progress(len(model_names) * len(batch_sizes) * rounds, enabled=progress)
    common = dict(size=img_size, device=device, dtype=dtype, repeats=repeats, warmup=warmup,
                  convert_options=convert_options, progress=bar)
    rows = []
    try:
        for n in model_names:
            torch.manual_seed(0)
            kwargs = dict(model_kwargs or {})
            if img_size is not None:
                kwargs["img_size"] = img_size
            model = create_model(n, **kwargs)
            new = (bench_train(n, model, keep_ratios, batch_sizes, optimizer=optimizer,
                               compile=compile, **common)
                   if train else
                   bench_model(n, model, keep_ratios, batch_sizes, compile=compile, **common))
            rows += new
            if log:
                bar.close()
                log(format_table(new, header=False))
            del model
    finally:
        bar.close()
    return rows


# --------------------------------------------------------------------------------------------
# Training steps
# --------------------------------------------------------------------------------------------

#: optimizer names of :func:`make_train_step` ("none": forward + backward only; "adamw-fused":
#: torch's single-kernel AdamW, ``fused=True``, on CPUs from torch 2.4)
OPTIMIZERS = ("adamw", "adamw-fused", "sgd", "none")


def _logits(out) -> torch.Tensor:
    # a distilled timm model returns (head, head_dist) in train mode
    return out[0] if isinstance(out, (tuple, list)) else out


def train_flops(model: torch.nn.Module, x1: torch.Tensor,
                counter: Optional[Callable] = None) -> int:
    """FLOPs per image of one training forward + backward of ``model`` on ``x1`` (train mode).
    Counted on ``x1`` twice over (a batch of two: BatchNorm, as in LeViT, refuses to train on
    one), halved; the gradients it leaves are cleared and the buffers (BatchNorm's running
    statistics) restored. ``counter`` as in :func:`flops`."""
    was_training = model.training
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    model.train()
    try:
        with (counter or flop_counter)() as fc:
            _logits(model(torch.cat([x1, x1]))).float().sum().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
    return fc.get_total_flops() // 2


def make_train_step(model: torch.nn.Module, amp_dtype: Optional[torch.dtype] = None,
                    optimizer: str = "adamw", lr: float = 1e-4, seed: int = 0) -> Callable:
    """``step(x)``: one training step of ``model`` (put in train mode) on the batch ``x``.

    Zero the gradients, forward (under ``torch.autocast(amp_dtype)`` when given: mixed
    precision, weights stay as they are), cross-entropy against random labels (drawn once per
    batch size), backward (the loss scaled by a ``GradScaler`` for float16), then the optimizer
    step: ``adamw`` (torch's default implementation), ``adamw-fused`` (``fused=True``), ``sgd``
    (momentum 0.9) or ``none``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=lr) if optimizer == "adamw" else
           torch.optim.AdamW(params, lr=lr, fused=True) if optimizer == "adamw-fused" else
           torch.optim.SGD(params, lr=lr, momentum=0.9) if optimizer == "sgd" else None)
    dev_type = params[0].device.type
    scaler = torch.amp.GradScaler(dev_type, enabled=amp_dtype == torch.float16)
    labels: Dict[int, torch.Tensor] = {}

    def step(x: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        with (torch.autocast(dev_type, dtype=amp_dtype) if amp_dtype is not None
              else contextlib.nullcontext()):
            out = _logits(model(x))
        y = labels.get(x.shape[0])
        if y is None:
            gen = torch.Generator().manual_seed(seed)
            y = torch.randint(out.shape[-1], (x.shape[0],), generator=gen).to(x.device)
            labels[x.shape[0]] = y
        scaler.scale(torch.nn.functional.cross_entropy(out.float(), y)).backward()
        if opt is not None:
            scaler.step(opt)
            scaler.update()
    return step


def bench_train(name: str, model: torch.nn.Module, keep_ratios: Sequence[float],
                batch_sizes: Sequence[int], *, size=None, device: str = "cpu",
                dtype: torch.dtype = torch.float32, repeats: int = 7, warmup: int = 2,
                optimizer: str = "adamw", convert_options: Optional[dict] = None,
                progress: Optional[Progress] = None, seed: int = 0,
                base: Optional[torch.nn.Module] = None, compile=False) -> List[dict]:
    """Training-step throughput of ``model`` against evoplug-converted copies of it.

    Weights stay float32; ``dtype`` float16/bfloat16 runs the forward under autocast (AMP).
    Each model gets its own optimizer (:func:`make_train_step`); the steps are timed
    interleaved (:func:`interleaved` without inference mode, at least one warm-up round for
    the optimizer state), median of ``repeats``. FLOPs are forward + backward per image. One
    row per (batch size, keep ratio), as :func:`bench_model` returns (no output difference).

    ``compile`` (True, or torch.compile's mode) also times steps whose forward and backward
    run ``torch.compile`` of each model (AOTAutograd: one compiled graph each way; the
    optimizer step stays eager), interleaved with the eager steps on separate copies of the
    models (same initial weights); the first compiled step compiles and is not timed.
    """
    dev = resolve_device(device)
    amp = None if dtype == torch.float32 else dtype
    s = _setup(name, model, keep_ratios, size, dev, torch.float32, convert_options, progress,
               seed, base, count=train_flops)
    models = {"orig": s.model, **{f"evo{k}": m for k, m in s.fast.items()}}
    steps = {n: make_train_step(m, amp, optimizer, seed=seed) for n, m in models.items()}
    if compile:
        _raise_recompile_limit(2 * len(models) * len(batch_sizes) + 8)
        mode = compile if isinstance(compile, str) else None
        steps.update({f"{n}_c": make_train_step(torch.compile(copy.deepcopy(m), dynamic=False, mode=mode),
                                                amp, optimizer, seed=seed)
                      for n, m in models.items()})
    warmup = max(1, warmup)
    label = "fwd+bwd" + ("" if optimizer == "none" else f"+{optimizer}")
    rows = []
    for batch in batch_sizes:
        x = _batch(s.size, batch, dev, torch.float32, seed + 2)
        if progress:
            progress.set_note(f"{name}: batch {batch}, {len(steps)} training steps interleaved")
        t = interleaved(steps, x, repeats, warmup,
                        (lambda r, n: progress.update(1)) if progress else None, inference=False)
        ips = {v: batch / t[v].median for v in steps}
        for keep in keep_ratios:
            row = dict(model=name, img_size=_img_size(s.size), batch=batch, keep_ratio=keep,
                       step=label + (f", {str(amp)[6:]} autocast" if amp else ""),
                       device=str(dev), dtype=str(dtype).replace("torch.", ""),
                       amp=amp is not None, optimizer=optimizer,
                       **_speeds(ips, f"evo{keep}", s.f_orig, s.f_evo[keep]),
                       repeats=repeats, warmup=warmup, **s.blocks)
            if compile:
                row.update(_compiled_speeds(ips, f"evo{keep}", None))
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Where the time goes: torch.profiler, side by side
# --------------------------------------------------------------------------------------------

def _per_call(m: Callable, x: torch.Tensor, n: int) -> Tuple[float, float]:
    """(host, wall) seconds per call: when the call returns (kernels launched, not finished)
    and when the device is done; equal on the CPU."""
    host = wall = 0.0
    for _ in range(n):
        _sync(x)
        t = time.perf_counter()
        m(x)
        host += time.perf_counter() - t
        _sync(x)
        wall += time.perf_counter() - t
    return host / n, wall / n


def _self_time(e, cuda: bool) -> float:
    if not cuda:
        return e.self_cpu_time_total
    t = getattr(e, "self_device_time_total", None)
    return t if t is not None else e.self_cuda_time_total


def _top_events(events, cuda: bool, rows: int) -> dict:
    """The top ``rows`` kernels (CUDA) or operators (CPU) by self time, in milliseconds."""
    from torch.autograd import DeviceType
    if cuda:
        sel = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
        # older profilers: kernels are the events with device time and no CPU time
        sel = sel or [e for e in events if _self_time(e, True) > 0 and e.self_cpu_time_total == 0]
    else:
        sel = [e for e in events if e.self_cpu_time_total > 0]
    total = sum(_self_time(e, cuda) for e in sel)
    top = sorted(sel, key=lambda e: _self_time(e, cuda), reverse=True)[:rows]
    return dict(unit="kernel" if cuda else "operator", total_ms=round(total / 1e3, 4),
                launches=sum(e.count for e in sel),
                top=[dict(name=e.key, ms=round(_self_time(e, cuda) / 1e3, 4), calls=e.count,
                          share=round(_self_time(e, cuda) / total, 4) if total else 0.0)
                     for e in top])


def kernel_profile(models: Dict[str, Callable], x: torch.Tensor, rows: int = 15,
                   repeats: int = 5) -> Dict[str, dict]:
    """Where one forward of each callable on ``x`` spends its time (``torch.profiler``).

    Per model: ``wall_ms`` (one forward, the device synchronised) and ``host_ms`` (when the
    call returns: the launch cost; on the CPU the same), means of ``repeats`` after two warm-up
    calls; then one profiled forward: ``total_ms`` and ``launches`` of all kernels (memory
    copies included) and the ``top`` ``rows`` by self device time. On the CPU (no CUDA
    activity) the same fields hold operators by self CPU time. Runs under inference mode.
    """
    from torch.profiler import ProfilerActivity, profile
    cuda = x.is_cuda
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = {}
    with torch.inference_mode():
        for name, m in models.items():
            for _ in range(2):
                m(x)
            host, wall = _per_call(m, x, repeats)
            with profile(activities=acts) as prof:
                m(x)
                _sync(x)
            out[name] = dict(wall_ms=round(wall * 1e3, 3), host_ms=round(host * 1e3, 3),
                             **_top_events(prof.key_averages(), cuda, rows))
    return out


def _cell(text: str, width: int = 60) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= width else text[:width - 3] + "..."


def format_profile(profiles: Dict[str, dict]) -> str:
    """Markdown: a line per model (wall, host, kernel time, launches), then the top kernels
    of each model side by side (rank, name, ms, calls, share of the model's kernel time)."""
    names = list(profiles)
    unit = profiles[names[0]]["unit"] if names else "kernel"
    out = [f"| model | wall ms / forward | host ms (call returns) | {unit} ms (sum) | {unit}s run |",
           "|---|---|---|---|---|"]
    out += [f"| {n} | {p['wall_ms']:.2f} | {p['host_ms']:.2f} | {p['total_ms']:.2f} | {p['launches']} |"
            for n, p in profiles.items()]
    head = " | ".join(f"{n}: {unit} | ms | calls | share" for n in names)
    out += ["", f"| # | {head} |", "|---|" + "---|---|---|---|" * len(names)]
    depth = max((len(p["top"]) for p in profiles.values()), default=0)
    for i in range(depth):
        cells = []
        for p in profiles.values():
            e = p["top"][i] if i < len(p["top"]) else None
            cells += ([f"`{_cell(e['name'])}`", f"{e['ms']:.3f}", str(e["calls"]), f"{e['share']:.0%}"]
                      if e else ["", "", "", ""])
        out.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Output: table, CSV, JSON, plot
# --------------------------------------------------------------------------------------------

_COLUMNS = [("model", "model", "{}"), ("img_size", "px", "{}"), ("batch", "batch", "{}"),
            ("keep_ratio", "keep", "{:g}"), ("step", "training step", "{}"),
            ("orig_img_s", "orig img/s", "{:.1f}"),
            ("evo_img_s", "evo img/s", "{:.1f}"), ("speedup", "speed-up", "{:.2f}x"),
            ("gflops_orig", "GFLOP orig", "{:.2f}"), ("gflops_evo", "GFLOP evo", "{:.2f}"),
            ("flop_ratio", "FLOP ratio", "{:.2f}x"),
            ("orig_compiled_img_s", "compiled orig", "{:.1f}"),
            ("evo_compiled_img_s", "compiled evo", "{:.1f}"),
            ("compiled_speedup", "compiled speed-up", "{:.2f}x"),
            ("max_abs_diff", "max|diff|", "{:.2g}"), ("converted", "converted", "{}")]


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


def _md_cell(text: str) -> str:
    """A table cell: a ``|`` in it (``max|diff|``) escaped, or it splits the row."""
    return text.replace("|", "\\|")


def format_markdown(rows: List[dict]) -> str:
    cols = [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    out = ["| " + " | ".join(_md_cell(h) for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_md_cell(fmt.format(r[k])) if k in r else "-" for k, _, fmt in cols)
            + " |" for r in rows]
    return "\n".join(out)


def write_csv(rows: List[dict], path: str) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)


def provenance() -> Dict[str, str]:
    """When and with what code a figure was measured: UTC time, package versions, and, when the
    evoplug that runs is a git checkout's own folder (not an installed copy), its commit, with
    ``+dirty`` when ``evoplug/`` or ``benchmarks/`` have uncommitted changes."""
    import datetime
    import subprocess

    from .. import __version__
    out = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "evoplug": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import timm
        out["timm"] = timm.__version__
    except ImportError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or os.path.realpath(top) != os.path.realpath(root):
            return out                     # an installed copy: no commit to name
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "evoplug", "benchmarks")
        out["commit"] = git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def write_json(rows: List[dict], path: str, machine_text: Optional[str] = None,
               settings: Optional[dict] = None) -> None:
    """Rows with the machine, the settings and :func:`provenance` (date, versions, commit)."""
    with open(path, "w") as f:
        json.dump(dict(machine=machine_text or machine(), **provenance(),
                       settings=settings or {}, rows=rows), f, indent=1)


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
