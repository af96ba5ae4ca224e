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
the time into the matrix products (``aten::addmm``), the attention kernel and the rest (the
profiler perturbs what it times: read part 3 for wall times).

Part 3, without a profiler: DeiT-S's blocks at batch 1 on 197 and on 100 tokens, one block
twelve times (its weights stay in the core's caches) and the twelve blocks in turn, as a forward
runs them (each block's 7 MB of weights comes back from beyond the core's L2 every time: a cost
per block that does not shrink with its tokens); and the original and converted forwards,
interleaved. From these, the converted forward's *ceiling*: the original forward less, for each
block that ran fewer tokens (``evoplug.tokens_per_block``), what its fewer tokens save in turn,
and nothing for evoplug's runtime (its selection, gathers, global-attention row and Python). The
measured converted forward against that ceiling is what the runtime costs; the ceiling against
the original is the most any runtime could give this plan on this machine (``--turn-batch 32
--threads 2 --parts 3``: at issue 12's batch-32 setting).
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


def _wall(f, x, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        f(x)
    return (time.perf_counter() - t) / calls


def blocks_in_turn(rounds: int, calls: int, batch: int = 1) -> dict:
    """Part 3 (see the module docstring) at ``batch`` images: ms per block and per forward,
    medians of interleaved rounds, and the converted forward's ceiling."""
    import timm

    import evoplug
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224").eval()
    fast = evoplug.convert(copy.deepcopy(model), keep_ratio=0.5).eval()
    blocks = list(model.blocks)
    x = torch.randn(batch, 3, 224, 224)
    toks = {n: torch.randn(batch, n, model.embed_dim) for n in (DENSE, EVOLVING)}
    runs = {"original": lambda t: model(t), "converted": lambda t: fast(t)}
    for n, t in toks.items():
        runs[f"one block x12, {n} tokens"] = lambda t, t_=t: [blocks[6](t_) for _ in blocks]
        runs[f"12 blocks in turn, {n} tokens"] = lambda t, t_=t: [b(t_) for b in blocks]
    got = {k: [] for k in runs}
    with torch.inference_mode():
        for f in runs.values():                                 # warm-up
            _wall(f, x, 2)
        for _ in range(rounds):                                 # interleaved
            for k, f in runs.items():
                got[k].append(_wall(f, x, calls))
        ran = [DENSE if n < 0 else n for _, n in evoplug.tokens_per_block(fast)]  # (-1: own forward)
    ms = {k: statistics.median(v) * 1e3 for k, v in got.items()}
    per_block = {k: round(v / len(blocks), 3) for k, v in ms.items() if "x12" in k or "turn" in k}
    in_turn = {n: ms[f"12 blocks in turn, {n} tokens"] / len(blocks) for n in toks}
    # the original forward less, for each block that ran fewer tokens, what they save in turn
    # (the blocks' and the stem's and head's time as in the original forward itself)
    ceiling = ms["original"] - sum(in_turn[DENSE] - in_turn[n] for n in ran)
    return dict(batch=batch, forward_ms={k: round(ms[k], 2) for k in ("original", "converted")},
                block_ms=per_block, tokens_per_block=ran, converted_ceiling_ms=round(ceiling, 2),
                speedup=round(ms["original"] / ms["converted"], 3),
                ceiling_speedup=round(ms["original"] / ceiling, 3),
                runtime_ms=round(ms["converted"] - ceiling, 2),
                block_speedup_in_turn=round(in_turn[DENSE] / in_turn[EVOLVING], 3),
                block_speedup_one_block=round(ms[f"one block x12, {DENSE} tokens"] /
                                              ms[f"one block x12, {EVOLVING} tokens"], 3))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=40, help="calls per round at batch 1")
    p.add_argument("--forwards", type=int, default=10)
    p.add_argument("--block-calls", type=int, default=3, help="calls per round in part 3")
    p.add_argument("--turn-batch", type=int, default=1, help="images per call in part 3")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--malloc", choices=["retain", "system"], default="retain",
                   help="glibc's malloc keeping freed memory (as `evoplug bench`), or as it is")
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from evoplug.tools.bench import allocator, machine, provenance, retain_freed_memory
    if a.malloc == "retain":
        retain_freed_memory()
    rows = gemm_rows(a.batches, a.rounds, a.calls) if 1 in a.parts else []
    split = forward_split(a.forwards) if 2 in a.parts else {}
    turn = blocks_in_turn(a.rounds, a.block_calls, a.turn_batch) if 3 in a.parts else {}
    settings = dict(threads=a.threads, rounds=a.rounds, calls_at_batch_1=a.calls,
                    forwards=a.forwards, block_calls=a.block_calls, parts=a.parts,
                    allocator=allocator(), dtype="float32",
                    model="deit_small_patch16_224", keep_ratio=0.5,
                    timing="median of interleaved rounds; part 2: profiler self CPU time")
    result = dict(machine=machine(), **provenance(), settings=settings, gemm=rows, forward=split,
                  blocks_in_turn=turn)
    print(f"{'batch':>5} {'shape':>9} {'rows':>11} {'us':>17} {'speed-up':>8} {'of 1.97x':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['shape']:>9} {r['dense_rows']:>5}->{r['evolving_rows']:<5} "
              f"{r['dense_us']:>8}->{r['evolving_us']:<8} {r['speedup']:>8} {r['of_row_ratio']:>8}")
    for k in split:
        print(k, split[k])
    if turn:
        print("part 3:", json.dumps(turn, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
