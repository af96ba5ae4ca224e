"""Host time per forward: what the converted model costs the CPU thread that launches its ops.

    python benchmarks/host_time.py --json docs/bench/cpu_host_time.json
    python benchmarks/host_time.py --against <commit>      # another evoplug, side by side

On a GPU in eager mode the host launches every op; where it launches them more slowly than the
GPU runs them, the forward is host-bound (docs/gpu.md "Where the time goes": one converted DeiT-S
forward took 12.6 ms of host time against 6.8 ms for the original on an H200's host). This
measures that cost on the CPU, where it can be measured without a GPU: the models are narrowed
(width 48, 64 px, batch 1, one thread), so that every op's arithmetic is negligible and a
forward's time is the Python and the ATen dispatch of its ops. Reported per model: the original's
and the converted model's time per forward (median of interleaved rounds), the time the converted
model adds per evolving block, and the ATen ops it adds per evolving block (a
``TorchDispatchMode`` count: tests/test_op_budget.py bounds them), so that the time of the ops it
adds and the time of evoplug's own Python can be told apart, and the Python bytecodes it adds per
evolving block (all, and those of evoplug's own code; ``sys.settrace`` opcode events, one forward:
a count that does not move with the machine's noise). ``--profile`` adds evoplug's
Python functions by their own time (``cProfile``; the profiler's overhead inflates them).

``--against COMMIT`` loads the evoplug of another commit (``git archive`` into a temporary
folder) in a second process per round and reports both; its figures come from the same machine
minutes apart, so compare them only with the spread of repeated runs in mind.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: model -> (timm kwargs, image size): narrowed so that a forward's time is its host time
MODELS = {
    "deit_small_patch16_224": (dict(embed_dim=48, img_size=64), 64),
    "swin_tiny_patch4_window7_224": (dict(embed_dim=24, img_size=112), 112),
    "pvt_v2_b0": (dict(embed_dims=(8, 16, 40, 64)), 64),
}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops(model, x) -> int:
    with torch.inference_mode(), _Count() as c:
        model(x)
    return c.n


def _models(name: str, reselect_every):
    import timm

    import evoplug
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    dense = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    out = {"original": dense}
    for r in reselect_every:
        fast = evoplug.convert(dense, keep_ratio=0.5, reselect_every=r, example_input=x,
                               inplace=False)
        out[f"evoplug R={r}"] = fast
    return out, x


def _bytecodes(model, x) -> dict:
    """Python bytecodes one forward executes (after a warm-up one), by whose code: evoplug's
    (its modules and its generated programs) and all of them. A count, not a time: the same on
    any machine and in any run, so the Python a change adds or removes shows without the noise
    of a timing (on a GPU in eager mode, that Python is host time between launches)."""
    counts = collections.Counter()

    def trace(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            f = frame.f_code.co_filename
            counts["evoplug" if "/evoplug/" in f or f == "<evoplug program>" else "other"] += 1
        return trace

    with torch.inference_mode():
        model(x)
        sys.settrace(trace)
        try:
            model(x)
        finally:
            sys.settrace(None)
    return dict(evoplug=counts["evoplug"], all=counts["evoplug"] + counts["other"])


def _evolving(fast) -> int:
    from evoplug import get_report      # (public: an older evoplug, --against, has it too)
    return sum(1 for b in get_report(fast).blocks if b.role == "evolve")


def _timed(models: dict, x, rounds: int, per_round: int) -> dict:
    """Median seconds per forward of each model, interleaved rounds of ``per_round`` calls."""
    times = collections.defaultdict(list)
    names = list(models)
    with torch.inference_mode():
        for m in models.values():
            for _ in range(20):
                m(x)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                m = models[n]
                t = time.perf_counter()
                for _ in range(per_round):
                    m(x)
                times[n].append((time.perf_counter() - t) / per_round)
    return {n: statistics.median(v) for n, v in times.items()}


def _profile(model, x, calls: int = 200, rows: int = 25) -> list:
    with torch.inference_mode():
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(calls):
            model(x)
        pr.disable()
    st = pstats.Stats(pr).stats
    own = [(tt / calls * 1e6, nc / calls, f"{f.split('/evoplug/')[-1]}:{line}:{fn}")
           for (f, line, fn), (_cc, nc, tt, _ct, _callers) in st.items() if "/evoplug/" in f]
    own.sort(reverse=True)
    return [dict(us_per_forward=round(t, 1), calls_per_forward=c, function=n) for t, c, n in own[:rows]]


def measure(names, reselect_every, rounds: int, per_round: int, profile: bool) -> list:
    rows = []
    for name in names:
        models, x = _models(name, reselect_every)
        secs = _timed(models, x, rounds, per_round)
        ops = {n: _ops(m, x) for n, m in models.items()}
        codes = {n: _bytecodes(m, x) for n, m in models.items()}
        for n, m in models.items():
            if n == "original":
                continue
            k = _evolving(m)
            row = dict(model=name, variant=n, evolving_blocks=k,
                       original_us=round(secs["original"] * 1e6, 1), converted_us=round(secs[n] * 1e6, 1),
                       ratio=round(secs[n] / secs["original"], 3),
                       added_us_per_evolving_block=round((secs[n] - secs["original"]) * 1e6 / k, 1),
                       original_ops=ops["original"], converted_ops=ops[n],
                       added_ops_per_evolving_block=round((ops[n] - ops["original"]) / k, 2),
                       original_bytecodes=codes["original"]["all"], converted_bytecodes=codes[n]["all"],
                       added_bytecodes_per_evolving_block=round(
                           (codes[n]["all"] - codes["original"]["all"]) / k),
                       evoplug_bytecodes_per_evolving_block=round(codes[n]["evoplug"] / k))
            if profile:
                row["evoplug_python"] = _profile(m, x)
            rows.append(row)
            print(f"{name:30s} {n:13s} original {row['original_us']:8.1f} us  converted "
                  f"{row['converted_us']:8.1f} us  {row['ratio']:.3f}x  +{row['added_us_per_evolving_block']:6.1f} "
                  f"us, +{row['added_ops_per_evolving_block']:5.2f} ops and +"
                  f"{row['added_bytecodes_per_evolving_block']} Python bytecodes "
                  f"({row['evoplug_bytecodes_per_evolving_block']} evoplug's) per evolving block ({k})",
                  flush=True)
    return rows


def _against(commit: str, argv) -> list:
    """The same measurement with the evoplug of ``commit``, in its own process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", root, "archive", commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        out = os.path.join(tmp, "rows.json")
        env = dict(os.environ, PYTHONPATH=tmp)
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--json", out,
                        "--evoplug-from", tmp], env=env, check=True)
        with open(out) as f:
            return json.load(f)["rows"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=list(MODELS), help=f"of {', '.join(MODELS)}")
    p.add_argument("--reselect-every", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--per-round", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--against", help="another commit, measured in its own process after this one")
    p.add_argument("--json")
    p.add_argument("--evoplug-from", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    unknown = [m for m in a.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}")
    torch.set_num_threads(1)
    import evoplug
    from evoplug.tools import bench
    machine = bench.machine
    # (an older evoplug, --against, may have no provenance(): its run reports none)
    provenance = getattr(bench, "provenance", dict)
    if a.evoplug_from and not os.path.abspath(evoplug.__file__).startswith(os.path.abspath(a.evoplug_from)):
        raise SystemExit(f"expected evoplug from {a.evoplug_from}, got {evoplug.__file__}")
    settings = dict(threads=1, batch=1, keep_ratio=0.5, rounds=a.rounds, per_round=a.per_round,
                    timing="median of interleaved rounds, seconds per forward, torch.inference_mode",
                    models={n: dict(kwargs=MODELS[n][0], image=MODELS[n][1]) for n in a.models})
    rows = measure(a.models, a.reselect_every, a.rounds, a.per_round, a.profile)
    result = dict(machine=machine(), **provenance(), settings=settings, rows=rows)
    if a.against:
        sub = [*a.models, "--reselect-every", *map(str, a.reselect_every), "--rounds", str(a.rounds),
               "--per-round", str(a.per_round)]
        print(f"--- evoplug at {a.against}", flush=True)
        result["against"] = dict(commit=a.against, rows=_against(a.against, sub))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
