"""FLOP ratios (original / Evo) counted by evoplug's FLOP counter and by torch's formulas alone.

    python benchmarks/flop_ratios.py                         # the models of docs/benchmarks.md
    python benchmarks/flop_ratios.py deit_small_patch16_224 --keep 0.5 --json FILE

torch's ``FlopCounterMode`` has FLOP formulas for the CUDA attention kernels only, so on the CPU
``F.scaled_dot_product_attention`` (which timm's ViTs, Swin, PVTv2 and Twins call) counted 0
FLOPs: every FLOP ratio measured on the CPU before ``evoplug.tools.bench.flop_counter`` left
out the ``N^2`` part of the attention (QK^T and AV), the part that token reduction cuts most.
torch's formula for a convolution's backward also ignores the groups (PVTv2's depthwise 3x3
weight gradient counted ``in_channels`` times over). This script counts one image both ways,
forward in eval mode and, with ``--train``, forward + backward in train mode
(:func:`evoplug.tools.bench.train_flops`), and prints them side by side; ``--json`` stores the
rows with the machine and the code's provenance. FLOPs do not depend on the machine or the
weights (random, seed 0).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import evoplug
from evoplug.tools import bench

MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
          "vit_base_patch16_384", "vit_large_patch16_384", "levit_128s", "levit_256",
          "pvt_v2_b1", "twins_svt_small", "swin_tiny_patch4_window7_224"]


def _torch_only() -> FlopCounterMode:
    return FlopCounterMode(display=False)      # torch's formulas alone


def rows_for(name: str, keeps, train: bool):
    torch.manual_seed(0)
    model = bench.create_model(name)
    x1 = torch.randn(1, 3, *bench.input_size(model))
    modes = ["forward"] + (["forward+backward"] if train else [])
    count = {"forward": bench.flops, "forward+backward": bench.train_flops}
    base = {m: (count[m](model, x1, _torch_only), count[m](model, x1)) for m in modes}
    for k in keeps:
        fast = evoplug.convert(model, keep_ratio=k, example_input=x1)
        for m in modes:
            e_old, e_new = count[m](fast, x1, _torch_only), count[m](fast, x1)
            (o_old, o_new) = base[m]
            yield {"model": name, "keep": k, "pass": m, "gflops_orig": round(o_new / 1e9, 3),
                   "gflops_evo": round(e_new / 1e9, 3), "flop_ratio": round(o_new / e_new, 3),
                   "torch_formulas": {"gflops_orig": round(o_old / 1e9, 3),
                                      "gflops_evo": round(e_old / 1e9, 3),
                                      "flop_ratio": round(o_old / e_old, 3)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=MODELS)
    p.add_argument("--keep", type=float, nargs="+", default=[0.5])
    p.add_argument("--train", action="store_true", help="also count forward + backward")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    print(f"machine: {bench.machine('cpu')}")
    head = (f"{'model':<30} {'keep':>4} {'pass':<16} {'GFLOP orig':>10} {'GFLOP evo':>9} "
            f"{'FLOP ratio':>10} | torch's formulas alone: {'GFLOP orig':>10} {'FLOP ratio':>10}")
    print(head)
    rows = []
    for name in a.models:
        for r in rows_for(name, a.keep, a.train):
            rows.append(r)
            print(f"{r['model']:<30} {r['keep']:>4} {r['pass']:<16} {r['gflops_orig']:>10.2f} "
                  f"{r['gflops_evo']:>9.2f} {r['flop_ratio']:>9.3f}x "
                  f"{'|':>26} {r['torch_formulas']['gflops_orig']:>10.2f} "
                  f"{r['torch_formulas']['flop_ratio']:>9.3f}x",
                  flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(machine=bench.machine("cpu"), provenance=bench.provenance(),
                           settings=dict(batch=1, dtype="float32", weights="random, seed 0",
                                         counter="evoplug.tools.bench.flop_counter vs "
                                                 "torch FlopCounterMode"),
                           rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
