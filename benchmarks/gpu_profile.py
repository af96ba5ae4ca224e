"""Where the time goes on a GPU: torch.profiler over original and converted forwards.

    python benchmarks/gpu_profile.py deit_small_patch16_224 --batch 256 --dtype float16

Prints, for each model: the wall time per forward with and without waiting for the GPU (host
launch time vs device time), the top kernels by device time, the top host ops, and how many
host-device synchronisations ran.
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import evoplug


def timed(fn, x, n=10, sync=True):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn(x)
        if sync:
            torch.cuda.synchronize()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return host / n, (time.perf_counter() - t) / n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--rows", type=int, default=18)
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    print(torch.cuda.get_device_name(0), torch.__version__)
    for name in a.models:
        model = timm.create_model(name, pretrained=False).eval()
        fast = evoplug.convert(model, keep_ratio=a.keep).eval()
        model, fast = model.cuda().to(dtype), fast.cuda().to(dtype)
        x = torch.randn(a.batch, 3, 224, 224, device="cuda", dtype=dtype)
        with torch.inference_mode():
            for tag, m in (("orig", model), ("evo", fast)):
                for _ in range(3):
                    m(x)
                launch, _ = timed(m, x, sync=False)
                _, wall = timed(m, x, sync=True)
                print(f"\n== {name} {tag}: {wall * 1e3:.2f} ms per forward (batch {a.batch}, {a.dtype}); "
                      f"host returns after {launch * 1e3:.2f} ms when not waiting")
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    m(x)
                    torch.cuda.synchronize()
                ka = prof.key_averages()
                syncs = sum(e.count for e in ka if "Synchronize" in e.key or "cudaMemcpy" in e.key)
                print(f"host-device syncs/copies in one forward: {syncs}")
                key = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") else "self_cuda_time_total"
                print(ka.table(sort_by=key, row_limit=a.rows, max_name_column_width=60))
                print(ka.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))


if __name__ == "__main__":
    main()
