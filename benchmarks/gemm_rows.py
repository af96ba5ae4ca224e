"""Why batch 1 gains less than the FLOPs: the linear layers' cost per token row at the row
counts of a dense and of an evolving DeiT-S block, and where one forward's time goes.

    python benchmarks/gemm_rows.py --json docs/bench/cpu_gemm_rows_xeon.json

An evolving block of DeiT-S at keep 0.5 runs its linear layers on 100 rows per image (98 kept
patch tokens, the class token, the representative token) where the dense block runs 197. If a
matrix product cost the same per row at both counts, those layers would run 1.97x faster in an
evolving block; a CPU's GEMM has costs that do not shrink with the rows (packing the weight
matrix, the edges of its tiles), which weigh more the fewer rows there are. Part 1 times
``F.linear`` on DeiT-S's four weight shapes at 197 and 100 rows a call (batch 1) and at 32 times
that (batch 32), interleaved rounds, one thread (``--threads``), median, and reports the
speed-up the fewer rows give against the row ratio. Part 2 profiles one forward of the original
and of the converted DeiT-S at batch 1 (``torch.profiler``, ``--forwards`` forwards) and splits
the time into the matrix products (``aten::addmm``), the attention kernel and the rest.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

#: DeiT-S's linear layers (in, out): qkv, proj, fc1, fc2
SHAPES = [(384, 1152), (384, 384), (384, 1536), (1536, 384)]
DENSE, EVOLVING = 197, 100


def _time(a, w, b, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        F.linear(a, w, b)
    return (time.perf_counter() - t) / calls


def gemm_rows(batches, rounds: int, calls: int) -> list:
    rows = []
    with torch.inference_mode():
        for batch in batches:
            for k, n in SHAPES:
                w, b = torch.randn(n, k), torch.randn(n)
                ins = {m: torch.randn(m * batch, k) for m in (DENSE, EVOLVING)}
                for m in ins:                                  # warm-up
                    _time(ins[m], w, b, 3)
                got = {m: [] for m in ins}
                for _ in range(rounds):                        # interleaved
                    for m in ins:
                        got[m].append(_time(ins[m], w, b, max(1, calls // batch)))
                med = {m: statistics.median(v) for m, v in got.items()}
                rows.append(dict(batch=batch, shape=f"{k}x{n}", dense_rows=DENSE * batch,
                                 evolving_rows=EVOLVING * batch, dense_us=round(med[DENSE] * 1e6, 1),
                                 evolving_us=round(med[EVOLVING] * 1e6, 1),
                                 speedup=round(med[DENSE] / med[EVOLVING], 3),
                                 row_ratio=round(DENSE / EVOLVING, 3),
                                 of_row_ratio=round(med[DENSE] / med[EVOLVING] / (DENSE / EVOLVING), 3)))
    return rows


def _split(model, x, forwards: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(forwards):
                model(x)
        wall = (time.perf_counter() - t) / forwards
    self_us = {e.key: e.self_cpu_time_total / forwards for e in p.key_averages()}
    total = sum(self_us.values())
    addmm = self_us.get("aten::addmm", 0.0)
    attn = sum(v for k, v in self_us.items() if "scaled_dot_product" in k)
    return dict(wall_ms=round(wall * 1e3, 2), ops_ms=round(total / 1e3, 2),
                addmm_ms=round(addmm / 1e3, 2), attention_ms=round(attn / 1e3, 2),
                rest_ms=round((total - addmm - attn) / 1e3, 2))


def forward_split(forwards: int) -> dict:
    import timm

    import evoplug
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224").eval()
    fast = evoplug.convert(copy.deepcopy(model), keep_ratio=0.5).eval()
    x = torch.randn(1, 3, 224, 224)
    out = {"original": _split(model, x, forwards), "converted": _split(fast, x, forwards)}
    out["ratio"] = {k: round(out["original"][k] / out["converted"][k], 3)
                    for k in out["original"] if out["converted"][k]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=40, help="calls per round at batch 1")
    p.add_argument("--forwards", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from evoplug.tools.bench import machine, provenance
    rows = gemm_rows(a.batches, a.rounds, a.calls)
    split = forward_split(a.forwards)
    settings = dict(threads=a.threads, rounds=a.rounds, calls_at_batch_1=a.calls,
                    forwards=a.forwards, dtype="float32", model="deit_small_patch16_224",
                    keep_ratio=0.5, timing="median of interleaved rounds; profiler self CPU time")
    result = dict(machine=machine(), **provenance(), settings=settings, gemm=rows, forward=split)
    print(f"{'batch':>5} {'shape':>9} {'rows':>11} {'us':>17} {'speed-up':>8} {'of 1.97x':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['shape']:>9} {r['dense_rows']:>5}->{r['evolving_rows']:<5} "
              f"{r['dense_us']:>8}->{r['evolving_us']:<8} {r['speedup']:>8} {r['of_row_ratio']:>8}")
    for k in ("original", "converted"):
        print(k, split[k])
    print("ratio", split["ratio"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
