"""Throughput of original vs evoplug-converted timm models, measured side by side.

    python benchmarks/throughput.py                       # DeiT-S, 224 px, batch 32, keep 0.5 and 1.0
    python benchmarks/throughput.py --models deit_tiny_patch16_224 --batch 16 --repeats 5

The same as ``evoplug bench`` (evoplug/tools/cli.py, evoplug/tools/bench.py), with this script's older
option names: prints the machine, the settings, and per model and keep ratio the images/s of
both, the speed-up (ratio of the medians of interleaved runs), the FLOP ratio and the max abs
output difference (0 at keep 1.0). ``evoplug bench --help`` lists more options (several batch
sizes, --compile, --device cuda, --csv, --plot).
"""
from __future__ import annotations

import argparse
import sys

from evoplug.tools import cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224"])
    p.add_argument("--keep", nargs="+", default=["0.5", "1.0"])
    p.add_argument("--batch", nargs="+", default=["32"])
    p.add_argument("--size", default=None, help="input size (default: the model's own)")
    p.add_argument("--repeats", default="7")
    p.add_argument("--warmup", default="2")
    p.add_argument("--threads", default=None)
    p.add_argument("--json", default=None, help="write machine, settings and rows to this file")
    a, rest = p.parse_known_args(argv)
    args = ["bench", *a.models, "--keep", *a.keep, "--batch", *a.batch,
            "--repeats", a.repeats, "--warmup", a.warmup]
    for flag, value in (("--img-size", a.size), ("--threads", a.threads), ("--json", a.json)):
        if value is not None:
            args += [flag, value]
    return cli.main(args + rest)


if __name__ == "__main__":
    sys.exit(main())
