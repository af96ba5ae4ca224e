"""The GPU benchmark suite (issue 12): one process, a time budget, results written as they come.

    bash benchmarks/gpu.sh                         # the wrapper: checks, hard time limit, bundle
    python benchmarks/gpu_suite.py --out bench_out/gpu --budget-s 420
    python benchmarks/gpu_suite.py --list          # the plan and its time estimate, nothing run
    python benchmarks/gpu_suite.py --dry --out bench_out/gpu_dry   # the same code on the CPU

Original vs evoplug-converted timm models (random weights), timed side by side in this process
as ``evoplug bench`` does (``evoplug.tools.bench``: interleaved rounds, median):

* inference images/s, eager and ``torch.compile`` (modes default and reduce-overhead), float16
  and float32, keep 0.5 and 1.0 (the matrix: :func:`gpu_plan`);
* training steps (forward + backward + AdamW, float16 autocast): DeiT-S batch 64 and 256, eager
  and with forward and backward compiled, DeiT-T/S batch 32;
* the top CUDA kernels of one DeiT-S forward, original next to converted (``torch.profiler``).

The work is a list of units (one model in one setting), most wanted first. A unit starts only
if its estimated time fits in what is left of the budget (estimates: ``CONVERT_S`` and each
unit's ``est_s``, scaled by how long the finished units took against their estimates); one
that does not fit is skipped and recorded. After each unit its part's JSON and Markdown and
``summary.md`` are rewritten (and, with ``--bundle DIR``, ``DIR/gpu_results.tar.gz``), so a run
stopped from outside keeps everything finished before. Each model is built and converted once
(CPU, float32) for all its units; keep ratios are set on deep copies (``evoplug.set_options``).

``--dry``: the same code paths on the CPU with tiny settings (DeiT-Tiny, batch 4, 2 repeats,
one thread, ``torch.compile`` default only; reduce-overhead is skipped), to check the suite
without a GPU. Its figures mean nothing.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import hashlib
import os
import pathlib
import platform
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional, Tuple

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

DEIT_T, DEIT_S, DEIT_B = "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"
VIT_B384, VIT_L384 = "vit_base_patch16_384", "vit_large_patch16_384"
SWIN_T, PVT_B1 = "swin_tiny_patch4_window7_224", "pvt_v2_b1"
MODELS = (DEIT_T, DEIT_S, DEIT_B, VIT_B384, VIT_L384, SWIN_T, PVT_B1)
SHORT = {DEIT_T: "DeiT-T", DEIT_S: "DeiT-S", DEIT_B: "DeiT-B", VIT_B384: "ViT-B/16@384",
         VIT_L384: "ViT-L/16@384", SWIN_T: "Swin-T", PVT_B1: "PVTv2-b1"}
BATCH, BATCH_OVERRIDE, TRAIN_BATCH = 256, {VIT_L384: 64}, 64

#: seconds to build (timm, random init) and convert a model once on the GPU machine's host
#: (CPU, float32): measured here on one core of the shared 2-core machine (DeiT-S 1.5 s, DeiT-B
#: 4.6, ViT-B/384 11, ViT-L/384 32, Swin-T 2.7, PVTv2-b1 1.9), less for the 16-core host, with margin
CONVERT_S = {DEIT_T: 2, DEIT_S: 2, DEIT_B: 4, VIT_B384: 8, VIT_L384: 20, SWIN_T: 4, PVT_B1: 3}
#: seconds of an eager unit on an H100/H200 beside the conversion: copies to the GPU, FLOP count,
#: output check, 13 interleaved rounds of 3 variants (from the img/s of docs/bench/h100_*)
EAGER_S = {DEIT_T: 3, DEIT_S: 3, DEIT_B: 4, VIT_B384: 8, VIT_L384: 5, SWIN_T: 5, PVT_B1: 4}
FP32_S = {DEIT_S: 4, DEIT_B: 10, VIT_L384: 15}    # no TF32 (PyTorch's default): ~6x the fp16 time
#: seconds of a torch.compile unit (original + converted at keep 0.5, Inductor from a cold cache;
#: the second mode of a model reuses the Triton kernels): on the H200 of 2026-11-30 (16-core
#: host) reduce-overhead took DeiT-S 36-38 s, DeiT-B 21-26, ViT-L/384 36-48, Swin-T 75, with margin
COMPILE_S = {DEIT_S: 45, DEIT_B: 35, VIT_L384: 55, SWIN_T: 85}
SECOND_MODE = 0.55
STARTUP_S = 15        # python, torch, timm and CUDA start before the first unit


@dataclasses.dataclass
class Unit:
    """One model in one setting; ``part`` names the output files it is written to."""
    part: str
    kind: str                    # "infer", "train" or "profile"
    model: str
    dtype: str
    batch: int
    keeps: Tuple[float, ...] = (0.5, 1.0)
    compile: Optional[str] = None
    repeats: int = 10
    warmup: int = 3
    est_s: float = 5.0           # estimated seconds, conversion excluded (CONVERT_S)
    skip: Optional[str] = None   # a reason not to run it at all
    variant: Optional[str] = None  # a runtime variant (VARIANTS) the unit runs the converted model with

    @property
    def name(self) -> str:
        return f"{self.part}/{self.model}"

    @property
    def mode(self) -> str:
        mode = f"compile {self.compile}" if self.compile else "eager"
        mode = ("train" + (f" {mode}" if self.compile else "")) if self.kind == "train" else mode
        return f"{mode} [{self.variant}]" if self.variant else mode


#: runtime variants a unit can run with: a private switch of evoplug set for the unit's duration,
#: so two forms are timed in one run. The global-query logits (evoplug.runtime.rows.
#: query_logits) are by default batched matrix products in eager mode on a GPU and a product and
#: sum when compiled; "product-logits" / "matmul-logits" force one form everywhere. Token rows
#: and pair terms (evoplug.runtime.gather) take ``gather`` and one ``index`` off the CPU, row
#: copies and two gathers on it (fewer ATen ops against the CPU's faster kernels, fifty-second
#: session); "cpu-form" runs the CPU's form on the GPU, so the two are timed there side by side
VARIANTS = {"matmul-logits": ("evoplug.runtime.rows", "_MATMUL_LOGITS", True),
            "product-logits": ("evoplug.runtime.rows", "_MATMUL_LOGITS", False),
            "cpu-form": ("evoplug.runtime.gather", "_ROW_SELECT", True)}
#: variants that are options of the converted model (evoplug.set_options on a copy): issue 12's
#: reselect_every table on a GPU (the default selects every 4 blocks)
OPTION_VARIANTS = {"reselect-1": dict(reselect_every=1)}


def gpu_plan() -> List[Unit]:
    """The matrix, most wanted first: every model eager fp16 (keep 0.5 and 1.0), again with the
    product-logits variant (keep 0.5; compiled units use it by default, matmul-logits for
    DeiT-S), DeiT-S/B selecting every block (reselect-1), Swin-T and DeiT-S with the CPU's
    gathers (cpu-form), the DeiT-S profile (both forms) and training steps at batch
    64 and 256 (eager, then compiled), fp32 eager for DeiT-S/B and ViT-L/384, DeiT-T/S training steps at
    batch 32, then torch.compile
    (fp16, keep 0.5) in both modes for DeiT-S, DeiT-B, ViT-L/384 and Swin-T."""
    units = [Unit("eager_fp16", "infer", m, "float16", BATCH_OVERRIDE.get(m, BATCH), est_s=EAGER_S[m])
             for m in MODELS]
    mm, prod = "matmul-logits", "product-logits"
    units += [Unit("eager_fp16_product", "infer", m, "float16", BATCH_OVERRIDE.get(m, BATCH),
                   keeps=(0.5,), est_s=EAGER_S[m], variant=prod) for m in MODELS]
    units += [Unit("eager_fp16_r1", "infer", m, "float16", BATCH, keeps=(0.5,), est_s=EAGER_S[m],
                   variant="reselect-1") for m in (DEIT_S, DEIT_B)]
    # the pair terms' one index (Swin-T's relative position bias in every evolving block) and
    # the token rows' gather against the CPU's form: not yet timed on a GPU
    units += [Unit("eager_fp16_cpuform", "infer", m, "float16", BATCH, keeps=(0.5,),
                   est_s=EAGER_S[m], variant="cpu-form") for m in (SWIN_T, DEIT_S)]
    units += [Unit("profile_fp16", "profile", DEIT_S, "float16", BATCH, keeps=(0.5,), est_s=5),
              Unit("profile_fp16_product", "profile", DEIT_S, "float16", BATCH, keeps=(0.5,),
                   est_s=5, variant=prod)]
    units += [Unit("train_amp_fp16", "train", DEIT_S, "float16", b, keeps=(0.5,), est_s=8)
              for b in (TRAIN_BATCH, BATCH)]
    # training steps whose forward and backward are compiled (AOTAutograd + Inductor): the eager
    # steps were host-bound on the H200 (0.76x-0.93x); compiled, the host launches far fewer ops
    units += [Unit("train_compiled_fp16", "train", DEIT_S, "float16", b, keeps=(0.5,),
                   compile="default", est_s=2 * COMPILE_S[DEIT_S]) for b in (TRAIN_BATCH, BATCH)]
    units += [Unit("eager_fp32", "infer", m, "float32", BATCH_OVERRIDE.get(m, BATCH), repeats=8,
                   warmup=2, est_s=FP32_S[m]) for m in (DEIT_S, DEIT_B, VIT_L384)]
    # issue 13's small training batches (its CPU figures are DeiT-T/S at batch 16/32)
    units += [Unit("train_amp_fp16", "train", m, "float16", 32, keeps=(0.5,), est_s=6)
              for m in (DEIT_T, DEIT_S)]
    order = [(DEIT_S, "reduce-overhead", None), (DEIT_S, "reduce-overhead", mm),
             (DEIT_S, "default", None), (DEIT_B, "reduce-overhead", None),
             (VIT_L384, "reduce-overhead", None), (DEIT_B, "default", None),
             (SWIN_T, "reduce-overhead", None), (VIT_L384, "default", None), (SWIN_T, "default", None)]
    seen = set()
    for m, mode, variant in order:
        est = COMPILE_S[m] * (SECOND_MODE if m in seen else 1.0)
        seen.add(m)
        units.append(Unit(f"compile_{mode}_fp16" + ("_mm" if variant else ""), "infer", m, "float16",
                          BATCH_OVERRIDE.get(m, BATCH), keeps=(0.5,), compile=mode, est_s=est,
                          variant=variant))
    return units


def dry_plan() -> List[Unit]:
    """The first unit of every part of :func:`gpu_plan`, made tiny for the CPU."""
    units, parts = [], set()
    for u in gpu_plan():
        if u.part in parts:
            continue
        parts.add(u.part)
        skip = ("dry run on the CPU: CUDA graphs need a GPU" if u.compile == "reduce-overhead"
                else None)
        units.append(dataclasses.replace(u, model=DEIT_T, batch=4, repeats=2, warmup=1,
                                         est_s=60 if u.compile else 10, skip=skip))
    return units


# --------------------------------------------------------------------------------------------
# Models (built and converted once), time budget
# --------------------------------------------------------------------------------------------

class Models:
    """Each model built (seed 0) and converted at keep 0.5 once, on the CPU in float32, kept
    until its last unit has run; units get deep copies."""

    def __init__(self, units: List[Unit]):
        self._last = {u.model: i for i, u in enumerate(units)}
        self._cache: Dict[str, tuple] = {}

    def cached(self, name: str) -> bool:
        return name in self._cache

    def get(self, name: str):
        if name not in self._cache:
            import evoplug
            from evoplug.tools import bench
            torch.manual_seed(0)
            model = bench.create_model(name)
            h, w = bench.input_size(model)
            example = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
            self._cache[name] = (model, evoplug.convert(model, keep_ratio=0.5, example_input=example))
        orig, evo = self._cache[name]
        return copy.deepcopy(orig), evo

    def done_with(self, index: int):
        for name in [n for n in self._cache if self._last.get(n, -1) <= index]:
            del self._cache[name]


class Clock:
    """The budget: seconds since the script started against ``budget_s``; estimates are scaled
    by actual / estimated time of the finished units of the same sort (compile or not)."""

    def __init__(self, start: float, budget_s: float):
        self.start, self.budget_s = start, budget_s
        self._spent: Dict[bool, List[float]] = {True: [0.0, 0.0], False: [0.0, 0.0]}

    def elapsed(self) -> float:
        return time.time() - self.start

    def estimate(self, u: Unit, converted: bool) -> float:
        est = u.est_s + (0 if converted else CONVERT_S.get(u.model, 10))
        actual, planned = self._spent[bool(u.compile)]
        factor = min(3.0, max(0.5, actual / planned)) if planned else 1.0
        return est * factor

    def record(self, u: Unit, converted: bool, seconds: float):
        est = u.est_s + (0 if converted else CONVERT_S.get(u.model, 10))
        self._spent[bool(u.compile)][0] += seconds
        self._spent[bool(u.compile)][1] += est


# --------------------------------------------------------------------------------------------
# Running a unit
# --------------------------------------------------------------------------------------------

def run_unit(u: Unit, models: Models, device: str) -> dict:
    """The unit's rows (infer, train) or profiles (profile), with its runtime variant set."""
    if u.variant is None or u.variant in OPTION_VARIANTS:
        return _run_unit(u, models, device)
    import importlib
    module, name, value = VARIANTS[u.variant]
    mod = importlib.import_module(module)
    before = getattr(mod, name)
    setattr(mod, name, value)
    try:
        return _run_unit(u, models, device)
    finally:
        setattr(mod, name, before)


def _run_unit(u: Unit, models: Models, device: str) -> dict:
    from evoplug.tools import bench
    model, evo = models.get(u.model)
    if u.variant in OPTION_VARIANTS:
        import evoplug
        evo = copy.deepcopy(evo)
        evoplug.set_options(evo, **OPTION_VARIANTS[u.variant])
    dtype = bench.DTYPES[u.dtype]
    common = dict(device=device, dtype=dtype, repeats=u.repeats, warmup=u.warmup, base=evo)
    if u.kind == "infer":
        return dict(rows=bench.bench_model(u.model, model, u.keeps, [u.batch],
                                           compile=u.compile or False, **common))
    if u.kind == "train":
        return dict(rows=bench.bench_train(u.model, model, u.keeps, [u.batch], optimizer="adamw",
                                           compile=u.compile or False, **common))
    h, w = bench.input_size(model)
    fast = bench.converted_copies(model, u.keeps, base=evo)
    variants = {"original": model.to(device, dtype)}
    variants.update({f"converted keep {k:g}": m.to(device, dtype) for k, m in fast.items()})
    x = torch.randn(u.batch, 3, h, w, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    return dict(profiles=bench.kernel_profile(variants, x, rows=15))


def free_memory(compiled: bool):
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Environment: device, driver, versions, settings
# --------------------------------------------------------------------------------------------

def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except ImportError as e:
        return f"not importable ({e})"


def _tree_sha() -> str:
    """sha256 over evoplug/**/*.py (names and contents): which code was measured."""
    h = hashlib.sha256()
    for p in sorted((ROOT / "evoplug").rglob("*.py")):
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _git() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--short", "--", "evoplug"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    if head.returncode:
        return "unknown (no git repository here)"
    changed = len(dirty.stdout.splitlines())
    return head.stdout.strip() + (f" + {changed} changed file(s) under evoplug/" if changed else "")


def _gpu() -> dict:
    if not torch.cuda.is_available():
        return dict(available=False)
    p = torch.cuda.get_device_properties(0)
    return dict(available=True, name=p.name, capability=f"{p.major}.{p.minor}",
                memory_gib=round(p.total_memory / 2 ** 30, 1), multiprocessors=p.multi_processor_count,
                count=torch.cuda.device_count())


def environment(args, device: str, plan: List[Unit]) -> dict:
    from evoplug.tools import bench
    import evoplug
    import torch._inductor.config as inductor_config
    out = pathlib.Path(args.out)
    read = lambda name: (out / name).read_text() if (out / name).exists() else None  # noqa: E731
    return dict(
        started_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(args.start)),
        argv=sys.argv, dry=args.dry, budget_s=args.budget_s, device=device,
        machine=bench.machine(device), host=platform.node(), python=sys.version.split()[0],
        torch=torch.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        timm=_version("timm"), triton=_version("triton"), evoplug=evoplug.__version__,
        evoplug_tree_sha256=_tree_sha(), git=_git(), gpu=_gpu(),
        torch_settings=dict(
            threads=torch.get_num_threads(),
            float32_matmul_precision=torch.get_float32_matmul_precision(),
            cuda_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            inductor_fx_graph_cache=getattr(inductor_config, "fx_graph_cache", None)),
        env={k: v for k, v in os.environ.items()
             if k.startswith(("CUDA", "PYTORCH", "TORCH", "NVIDIA", "OMP", "DRY", "BUDGET", "HARD"))},
        bench_settings="eval, inference_mode, random weights (timm, seed 0); one conversion per "
                       "model at keep 0.5, other keeps by evoplug.set_options on deep copies; "
                       "original and converted timed interleaved, median of repeats; "
                       "torch.compile(dynamic=False, mode=...) of each, first call untimed",
        train_settings="train mode, forward + cross-entropy + backward + AdamW step under float16 "
                       "autocast, random weights (timm, seed 0); original and converted (keep "
                       "0.5) timed interleaved, median of repeats; the train_compiled part "
                       "compiles forward and backward, first steps untimed",
        setup_log=read("setup.txt"), nvidia_smi=read("nvidia-smi.txt"),
        plan=[dataclasses.asdict(u) for u in plan])


def environment_md(env: dict) -> str:
    lines = ["# Environment of the GPU benchmark run", ""]
    for k, v in env.items():
        if k in ("plan", "setup_log", "nvidia_smi", "torch_settings", "env", "gpu"):
            continue
        lines.append(f"* {k}: {v}")
    for k in ("gpu", "torch_settings", "env"):
        lines.append(f"* {k}: " + ", ".join(f"{a}={b}" for a, b in env[k].items()))
    for k in ("nvidia_smi", "setup_log"):
        lines += ["", f"## {k}", "", "```", (env[k] or "(none)").rstrip(), "```"]
    lines += ["", "## Plan", "",
              "| unit | kind | dtype | batch | keep | mode | repeats | est. s | skip |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {u['part']}/{u['model']} | {u['kind']} | {u['dtype']} | {u['batch']} | "
              f"{' '.join(map(str, u['keeps']))} | {u['compile'] or 'eager'} | {u['repeats']} | "
              f"{u['est_s']:.0f} | {u['skip'] or ''} |" for u in env["plan"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="results folder (default bench_out/gpu, dry: bench_out/gpu_dry)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="no unit starts that would end later than this many seconds after --start")
    p.add_argument("--start", type=float, default=None, help="epoch seconds the run started (gpu.sh)")
    p.add_argument("--dry", action="store_true", help="tiny settings on the CPU")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (dry: 1)")
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help="after each unit also write DIR/gpu_results.tar.gz and DIR/summary.md")
    p.add_argument("--only", nargs="+", default=None, metavar="PART",
                   help="run only these parts, in the order named (each part's units in plan order)")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="run only the units of these timm models")
    p.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
                   help="leave torch.backends.cudnn.benchmark off (default: on, as timm's "
                        "benchmark.py and DeiT's training set it: the patch-embedding convolution "
                        "then gets cuDNN's fastest algorithm, for both models alike)")
    p.add_argument("--list", action="store_true", help="print the plan and its estimate, run nothing")
    a = p.parse_args(argv)
    a.out = a.out or ("bench_out/gpu_dry" if a.dry else "bench_out/gpu")
    a.start = a.start or time.time()
    return a


def print_plan(plan: List[Unit], budget_s: float):
    total, seen = STARTUP_S, set()
    print(f"{'unit':58} {'mode':24} {'est. s':>7} {'ends at':>8}")
    for u in plan:
        est = 0.0 if u.skip else u.est_s + (0 if u.model in seen else CONVERT_S.get(u.model, 10))
        seen.add(u.model)
        total += est
        flag = "  (over budget)" if total > budget_s else ""
        skip = f"  skip: {u.skip}" if u.skip else ""
        print(f"{u.name:58} {u.mode:24} {est:7.0f} {total:8.0f}{flag}{skip}")
    print(f"estimated total {total:.0f} s ({total / 60:.1f} min) for a budget of {budget_s:.0f} s")


def main(argv=None) -> int:
    a = parse_args(argv)
    plan = dry_plan() if a.dry else gpu_plan()
    if a.only:
        # sorted() is stable: a part's units keep their order
        plan = sorted((u for u in plan if u.part in a.only), key=lambda u: a.only.index(u.part))
    if a.models:
        plan = [u for u in plan if u.model in a.models]
    if a.list:
        print_plan(plan, a.budget_s)
        return 0
    from gpu_report import Report    # benchmarks/gpu_report.py: part files, summary, bundle
    device = "cpu" if a.dry else "cuda"
    if a.threads or a.dry:
        torch.set_num_threads(a.threads or 1)
    torch.backends.cudnn.benchmark = bool(a.cudnn_benchmark)
    report = Report(pathlib.Path(a.out), a.bundle)
    env = environment(a, device, plan)
    report.write_environment(env, environment_md(env))
    if device == "cuda" and not torch.cuda.is_available():
        report.fail(f"CUDA is not available to torch {torch.__version__} (CUDA build "
                    f"{torch.version.cuda}): nothing measured; see setup.txt")
        return 3
    return run_plan(plan, device, Clock(a.start, a.budget_s), report, env)


def run_plan(plan: List[Unit], device: str, clock: Clock, report, env: dict) -> int:
    models = Models(plan)
    current = None
    try:
        for i, u in enumerate(plan):
            current = u
            converted = models.cached(u.model)
            est = clock.estimate(u, converted)
            left = clock.budget_s - clock.elapsed()
            if u.skip or est > left:
                why = u.skip or f"time guard: needs ~{est:.0f} s, {max(0.0, left):.0f} s left"
                print(f"[{clock.elapsed():5.0f} s] skip {u.name} ({u.mode}): {why}", flush=True)
                report.add(u, dict(status="skipped", reason=why, est_s=round(est, 1)))
            else:
                print(f"[{clock.elapsed():5.0f} s] start {u.name} ({u.mode}, {u.dtype}, batch "
                      f"{u.batch}, est. {est:.0f} s)", flush=True)
                report.add(u, attempt(u, models, device, clock, converted, est))
            models.done_with(i)
            free_memory(bool(u.compile))
            report.write(env, clock.elapsed())
    except KeyboardInterrupt:       # gpu.sh's hard limit sends SIGINT
        report.stopped(current, clock.elapsed())
        return 124
    print(f"[{clock.elapsed():5.0f} s] done: {report.out}", flush=True)
    return 0


def attempt(u: Unit, models: Models, device: str, clock: Clock, converted: bool, est: float) -> dict:
    t = time.time()
    try:
        result = run_unit(u, models, device)
        status = dict(status="done")
    # a unit that fails (out of memory, a compile error, a model evoplug refuses) is recorded
    # with its message and traceback, and the suite goes on with the next one
    except Exception as e:  # noqa: BLE001
        result = {}
        status = dict(status="failed", reason=f"{type(e).__name__}: {str(e)[:600]}",
                      traceback=traceback.format_exc()[-4000:])
    seconds = time.time() - t
    clock.record(u, converted, seconds)
    print(f"[{clock.elapsed():5.0f} s]   {status['status']} in {seconds:.1f} s"
          + (f": {status['reason']}" if "reason" in status else ""), flush=True)
    return dict(status, seconds=round(seconds, 1), est_s=round(est, 1), **result)


if __name__ == "__main__":
    sys.exit(main())
