"""Throughput of MMPretrain backbones, dense vs their registered Evo form, side by side (CPU).

    python benchmarks/mm_backbones.py                      # Swin-T and LeViT-256, batch 32, keep 0.5
    python benchmarks/mm_backbones.py --batch 8 --repeats 3

The backbones are built through MMPretrain's registry (``SwinTransformer`` and
``mmpretrain.EvoSwinTransformer``, ...) with random weights, the dense weights loaded strictly
into the Evo form, both in eval mode; the same harness as ``evoplug bench``
(:func:`evoplug.tools.bench.interleaved`: interleaved runs, median of the repeats, FLOPs with
``torch.utils.flop_counter``, glibc keeping freed memory unless ``--malloc system``). Prints the
machine, the settings, and per backbone: images/s of both, the speed-up, the FLOP ratio, and the
largest difference of the last feature map to the dense one at keep 1.0 (0: reproduced).
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")

BACKBONES = {
    "swin-t": ("SwinTransformer", dict(arch="tiny", img_size=224, out_indices=(0, 1, 2, 3))),
    "levit-256": ("LeViT", dict(arch="256", img_size=224, out_indices=(0, 1, 2))),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backbones", nargs="*", default=list(BACKBONES), help=", ".join(BACKBONES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--malloc", choices=["retain", "system"], default="retain")
    a = p.parse_args(argv)
    for name in a.backbones:
        if name not in BACKBONES:
            p.error(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")

    from mmengine.registry import MODELS as ROOT_MODELS
    from mmpretrain.registry import MODELS

    import evoplug
    import evoplug.mm  # noqa: F401  (registers the Evo backbones)
    from evoplug.tools import bench

    if a.malloc == "retain":
        bench.retain_freed_memory()
    print(f"machine: {bench.machine('cpu')}")
    print(f"settings: float32, eval, inference_mode, random weights, batch {a.batch}, keep {a.keep}; "
          f"interleaved, median of {a.repeats} after {a.warmup} warm-up round(s); "
          f"allocator: {bench.allocator()}")
    print(f"{'backbone':<10} {'dense img/s':>11} {'evo img/s':>10} {'speed-up':>9} "
          f"{'GFLOP dense':>11} {'GFLOP evo':>10} {'FLOP ratio':>10} {'keep-1.0 max|diff|':>18}")
    for name in a.backbones:
        type_, kw = BACKBONES[name]
        torch.manual_seed(0)
        dense = MODELS.build(dict(type=type_, **kw))
        dense.eval()                      # BaseBackbone.train returns None: no chaining
        evo = ROOT_MODELS.build(dict(type=f"mmpretrain.Evo{type_}", evo=dict(keep_ratio=a.keep), **kw))
        evo.load_state_dict(dense.state_dict(), strict=True)
        evo.eval()
        x1 = torch.randn(1, 3, kw["img_size"], kw["img_size"])
        f_dense, f_evo = bench.flops(dense, x1), bench.flops(evo, x1)
        x = torch.randn(a.batch, 3, kw["img_size"], kw["img_size"])
        t = bench.interleaved({"dense": dense, "evo": evo}, x, repeats=a.repeats, warmup=a.warmup)
        with torch.inference_mode():
            evoplug.set_options(evo, keep_ratio=1.0, identity_fast_path=False)
            diff = (evo(x[:2])[-1] - dense(x[:2])[-1]).abs().max().item()
            evoplug.set_options(evo, keep_ratio=a.keep, identity_fast_path=True)
        ips_d, ips_e = a.batch / t["dense"].median, a.batch / t["evo"].median
        print(f"{name:<10} {ips_d:11.1f} {ips_e:10.1f} {ips_e / ips_d:8.2f}x {f_dense / 1e9:11.2f} "
              f"{f_evo / 1e9:10.2f} {f_dense / f_evo:9.2f}x {diff:18.2g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
