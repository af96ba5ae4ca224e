"""Throughput of original vs evoplug-converted timm models, measured side by side.

    python benchmarks/throughput.py                       # DeiT-S, 224 px, batch 32, keep 0.5 and 1.0
    python benchmarks/throughput.py --models deit_tiny_patch16_224 --batch 16 --repeats 5

Prints the machine, the settings, and per model: images/s of both, the speed-up (ratio of
the medians of interleaved runs), the FLOP ratio, and the fidelity of keep 1.0 (max abs diff).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import evoplug  # noqa: E402


def run(model_name: str, keep_ratios, batch: int, size: int, repeats: int, warmup: int, **opts):
    import timm
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=size).eval()
    x = torch.randn(batch, 3, size, size)
    rows = []
    for keep in keep_ratios:
        fast = evoplug.convert(model, keep_ratio=keep, example_input=x[:1], **opts).eval()
        with torch.no_grad():
            diff = float((fast(x[:4]) - model(x[:4])).abs().max())
        f0, f1 = harness.flops(model, x[:1]), harness.flops(fast, x[:1])
        t = harness.interleaved({"original": model, "evoplug": fast}, x, repeats, warmup)
        ips0, ips1 = batch / t["original"].median, batch / t["evoplug"].median
        rows.append(dict(model=model_name, keep_ratio=keep, batch=batch, img_size=size,
                         orig_img_s=round(ips0, 2), evo_img_s=round(ips1, 2),
                         speedup=round(ips1 / ips0, 3), flop_ratio=round(f0 / f1, 3),
                         gflops_orig=round(f0 / 1e9, 3), gflops_evo=round(f1 / 1e9, 3),
                         max_abs_diff=diff, repeats=repeats))
        print(f"{model_name:28s} keep={keep:<4} batch={batch} {size}px  orig {ips0:8.1f} img/s  "
              f"evo {ips1:8.1f} img/s  speed-up {ips1 / ips0:5.3f}x  FLOP ratio {f0 / f1:5.3f}x  "
              f"({f0 / 1e9:.2f} -> {f1 / 1e9:.2f} GFLOP)  max|diff| {diff:.2g}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224"])
    p.add_argument("--keep", nargs="+", type=float, default=[0.5, 1.0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"machine: {harness.machine()}")
    print(f"settings: fp32, eval, inference_mode, interleaved original/evoplug, median of "
          f"{a.repeats} repeats after {a.warmup} warm-up rounds")
    rows = []
    for m in a.models:
        rows += run(m, a.keep, a.batch, a.size, a.repeats, a.warmup)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(machine=harness.machine(), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
