"""Side-by-side throughput of an original model and its converted copy.

Both run in the same process, interleaved (A, B, A, B, ...), each timed over a whole batch;
the reported figure is the median of the repeats. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` on one image.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def flops(model, x1) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x1)
    return fc.get_total_flops()


@dataclasses.dataclass
class Timing:
    name: str
    seconds: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def interleaved(models: Dict[str, Callable], x, repeats: int = 7, warmup: int = 2,
                progress: Callable = None) -> Dict[str, Timing]:
    """Time each callable on ``x``, interleaved, ``repeats`` times after ``warmup`` rounds."""
    res = {n: Timing(n, []) for n in models}
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for n, m in models.items():
                if x.is_cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                m(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t
                if r >= warmup:
                    res[n].seconds.append(dt)
            if progress:
                progress(r + 1, warmup + repeats)
    return res
