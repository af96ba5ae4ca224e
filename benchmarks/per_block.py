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
import time

import timm
import torch

import evoplug
from evoplug.tools.bench import allocator, flop_counter, machine, retain_freed_memory


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--malloc", choices=["retain", "system"], default="retain",
                   help="as `evoplug bench --malloc` (default: retain freed memory)")
    a = p.parse_args(argv)
    if a.malloc == "retain":
        retain_freed_memory()
    print(f"machine: {machine('cpu')}; float32, batch {a.batch}, keep {a.keep}, {a.rounds} rounds; "
          f"allocator: {allocator()}")
    for name in a.models:
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
        print(f"\n{name}: whole model {s_o / a.rounds * 1e3:.0f} -> {s_e / a.rounds * 1e3:.0f} ms "
              f"({s_o / s_e:.2f}x); FLOP ratio {sum(f_o.values()) / max(1, sum(f_e.values())):.2f}x over the blocks")
        print(f"{'block':<22} {'role':<7} {'ms orig':>8} {'ms evo':>8} {'speed-up':>9} {'FLOP ratio':>10} {'% of orig time':>15}")
        total = sum(t_o[n] for n in names)
        for s, n in zip(specs, names):
            print(f"{n:<22} {s.role:<7} {t_o[n] / a.rounds * 1e3:8.1f} {t_e[n] / a.rounds * 1e3:8.1f} "
                  f"{t_o[n] / t_e[n]:8.2f}x {f_o[n] / max(1, f_e[n]):9.2f}x {100 * t_o[n] / total:14.0f}%")
        dense = sum(t_o[n] for s, n in zip(specs, names) if s.role != "evolve")
        print(f"blocks that stay dense: {100 * dense / total:.0f}% of the original blocks' time, "
              f"{100 * sum(f_o[n] for s, n in zip(specs, names) if s.role != 'evolve') / sum(f_o.values()):.0f}% of their FLOPs")


if __name__ == "__main__":
    main()
