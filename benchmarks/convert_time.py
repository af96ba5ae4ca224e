"""How long ``evoplug.convert`` takes, conversion after conversion in one process.

    python benchmarks/convert_time.py --repeats 4 --json out.json [--label NAME]
    python benchmarks/convert_time.py --side-by-side OLD_TREE NEW_TREE --json F

A training script converts once; a test suite, a notebook or a sweep converts many models in one
process, and twins (other input sizes) are converted inside a training forward. So this measures
every conversion of the round-robin ``--models`` x ``--repeats`` in one process (float32, CPU,
``torch.set_num_threads(--threads)``): a cost that grows with the conversions before it shows as
a rising time for the same model. ``--side-by-side`` runs the script from two source trees (two
checkouts of evoplug) as alternating child processes, ``--rounds`` times each, and reports each
tree's median per model and the ratio, measured in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

MODELS = ("deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "levit_128s", "pvt_v2_b0")


def measure(models, repeats: int, threads: int) -> dict:
    import timm
    import torch

    import evoplug
    torch.set_num_threads(threads)
    built = {}
    for name in models:
        torch.manual_seed(0)
        built[name] = timm.create_model(name, pretrained=False).eval()
    rows = []
    for r in range(repeats):
        for name in models:
            t = time.perf_counter()
            evoplug.convert(built[name], keep_ratio=0.5)
            rows.append(dict(model=name, round=r, seconds=time.perf_counter() - t))
    return dict(rows=rows, torch=torch.__version__, timm=timm.__version__, threads=threads)


def _child(tree: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--models", *args.models, "--json", "-"]
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def side_by_side(old: str, new: str, args) -> dict:
    runs = {"old": [], "new": []}
    for _ in range(args.rounds):
        for label, tree in (("old", old), ("new", new)):
            runs[label].append(_child(tree, args))
    table = []
    for name in args.models:
        row = dict(model=name)
        for label in runs:
            secs = [r["seconds"] for run in runs[label] for r in run["rows"] if r["model"] == name]
            row[label + "_median_s"] = statistics.median(secs)
            row[label + "_first_s"] = statistics.median(
                [r["seconds"] for run in runs[label] for r in run["rows"] if r["model"] == name and r["round"] == 0])
            row[label + "_last_s"] = statistics.median(
                [r["seconds"] for run in runs[label] for r in run["rows"]
                 if r["model"] == name and r["round"] == args.repeats - 1])
        row["speedup_median"] = row["old_median_s"] / row["new_median_s"]
        table.append(row)
    return dict(table=table, runs=runs, old=old, new=new, rounds=args.rounds, repeats=args.repeats,
                threads=args.threads, machine=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), python=platform.python_version())


def markdown(result: dict) -> str:
    lines = ["| model | old median s | new median s | speed-up | old first/last round s | new first/last round s |",
             "|---|---|---|---|---|---|"]
    for r in result["table"]:
        lines.append(f"| {r['model']} | {r['old_median_s']:.2f} | {r['new_median_s']:.2f} | "
                     f"{r['speedup_median']:.2f}x | {r['old_first_s']:.2f} / {r['old_last_s']:.2f} | "
                     f"{r['new_first_s']:.2f} / {r['new_last_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--side-by-side", nargs=2, metavar=("OLD_TREE", "NEW_TREE"))
    p.add_argument("--json", default=None, help="where to write the result ('-': stdout)")
    args = p.parse_args(argv)
    if args.side_by_side:
        result = side_by_side(*args.side_by_side, args)
        print(markdown(result))
    else:
        result = measure(args.models, args.repeats, args.threads)
    if args.json == "-":
        sys.stdout.write(json.dumps(result))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
