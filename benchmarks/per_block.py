"""Per-block time of the original and the converted model (CPU), with each block's FLOP ratio.

    python benchmarks/per_block.py pvt_v2_b1 swin_tiny_patch4_window7_224 --batch 32

Shows where a model's speed-up comes from and where it is lost: evolving blocks against their
own FLOP ratio, and the share of the time spent in blocks that stay dense (the first blocks
and, in pyramids, the high-resolution first stage, which is memory-bound on a CPU). Timings
are forward hooks around each converted block, summed over the timed rounds, the original and
the converted model alternating.
"""
from __future__ import annotations

import argparse
import json
import time

import timm
import torch

import evoplug
from evoplug.tools.bench import allocator, flop_counter, machine, provenance, retain_freed_memory


def _block_flops(model, names, x1):
    flops = {}
    for n in names:
        mod = model.get_submodule(n)
        state = {}

        def pre(m, i, state=state):
            state["fc"] = flop_counter()
            state["fc"].__enter__()

        def post(m, i, o, state=state, n=n):
            state["fc"].__exit__(None, None, None)
            flops[n] = state["fc"].get_total_flops()

        h1, h2 = mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)
        with torch.no_grad():
            model(x1)
        h1.remove()
        h2.remove()
    return flops


def _timers(model, names, acc):
    hs = []
    for n in names:
        mod = model.get_submodule(n)
        hs.append(mod.register_forward_pre_hook(lambda m, i, n=n: acc.__setitem__((n, "t"), time.perf_counter())))
        hs.append(mod.register_forward_hook(
            lambda m, i, o, n=n: acc.__setitem__(n, acc.get(n, 0.0) + time.perf_counter() - acc[(n, "t")])))
    return hs


def measure(name: str, a) -> dict:
    """One model: whole-model and per-block times (ms per forward) and FLOPs, both models."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    fast = evoplug.convert(model, keep_ratio=a.keep)
    specs = evoplug.get_report(fast).blocks
    names = [s.analysis.name for s in specs]
    h, w = evoplug.input_size(model)[1:]
    x1 = torch.randn(1, 3, h, w)
    f_o, f_e = _block_flops(model, names, x1), _block_flops(fast, names, x1)
    x = torch.randn(a.batch, 3, h, w)
    t_o, t_e = {}, {}
    hooks = _timers(model, names, t_o) + _timers(fast, names, t_e)
    with torch.inference_mode():
        model(x), fast(x)
        t_o.clear(), t_e.clear()
        s_o = s_e = 0.0
        for _ in range(a.rounds):
            t = time.perf_counter(); model(x); s_o += time.perf_counter() - t
            t = time.perf_counter(); fast(x); s_e += time.perf_counter() - t
    for hk in hooks:
        hk.remove()
    ms = 1e3 / a.rounds
    return dict(model=name, ms_orig=round(s_o * ms, 2), ms_evo=round(s_e * ms, 2),
                blocks=[dict(block=n, role=sp.role, ms_orig=round(t_o[n] * ms, 2),
                             ms_evo=round(t_e[n] * ms, 2), gflops_orig=round(f_o[n] / 1e9, 4),
                             gflops_evo=round(f_e[n] / 1e9, 4)) for sp, n in zip(specs, names)])


def report(r: dict) -> None:
    bl = r["blocks"]
    fo, fe = sum(b["gflops_orig"] for b in bl), sum(b["gflops_evo"] for b in bl)
    print(f"\n{r['model']}: whole model {r['ms_orig']:.0f} -> {r['ms_evo']:.0f} ms "
          f"({r['ms_orig'] / r['ms_evo']:.2f}x); FLOP ratio {fo / max(1e-12, fe):.2f}x over the blocks")
    print(f"{'block':<22} {'role':<7} {'ms orig':>8} {'ms evo':>8} {'speed-up':>9} {'FLOP ratio':>10} {'% of orig time':>15}")
    total = sum(b["ms_orig"] for b in bl)
    for b in bl:
        print(f"{b['block']:<22} {b['role']:<7} {b['ms_orig']:8.1f} {b['ms_evo']:8.1f} "
              f"{b['ms_orig'] / b['ms_evo']:8.2f}x {b['gflops_orig'] / max(1e-12, b['gflops_evo']):9.2f}x "
              f"{100 * b['ms_orig'] / total:14.0f}%")
    dense = [b for b in bl if b["role"] != "evolve"]
    print(f"blocks that stay dense: {100 * sum(b['ms_orig'] for b in dense) / total:.0f}% of the original "
          f"blocks' time, {100 * sum(b['gflops_orig'] for b in dense) / fo:.0f}% of their FLOPs")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--malloc", choices=["retain", "system"], default="retain",
                   help="as `evoplug bench --malloc` (default: retain freed memory)")
    p.add_argument("--json", help="write the machine, settings and every block's figures here")
    a = p.parse_args(argv)
    if a.malloc == "retain":
        retain_freed_memory()
    print(f"machine: {machine('cpu')}; float32, batch {a.batch}, keep {a.keep}, {a.rounds} rounds; "
          f"allocator: {allocator()}")
    rows = []
    for name in a.models:
        rows.append(measure(name, a))
        report(rows[-1])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(machine=machine("cpu"), **provenance(), allocator=allocator(),
                           settings=dict(batch=a.batch, keep=a.keep, rounds=a.rounds, dtype="float32",
                                         weights="random, seed 0"), models=rows), f, indent=1)


if __name__ == "__main__":
    main()
