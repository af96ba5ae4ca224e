"""Old runtime against new, side by side in one process: did the CPU speed drop?

Extracts evoplug from an earlier commit (``git archive``) into a temporary folder under another
package name, converts the same DeiT-S (or ``--model``) with both, and times the original, the old and the new
runtime interleaved (median): inference at batch 32 (2 threads) and batch 1 (1 thread), and a
training step (forward + cross-entropy backward, ``evoplug.tools.bench.make_train_step`` without
an optimizer) at batch 16. Writes the figures, machine and settings as
JSON.

    python benchmarks/runtime_ab.py --against 7234a9d --json docs/bench/cpu_runtime_ab.json
    python benchmarks/runtime_ab.py --against 60cdcd5 --train-only --threads 1 --optimizer adamw \
        --json docs/bench/cpu_train_segments_ab.json   # the training step with AdamW, 1 thread
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

import timm
import torch

import evoplug
from evoplug.tools import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "deit_small_patch16_224"


def old_evoplug(commit: str, where: str):
    """evoplug as of ``commit``, importable as ``evoplug_old``."""
    data = subprocess.run(["git", "archive", commit, "evoplug"], cwd=ROOT, check=True,
                          capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(data)).extractall(where)
    pkg = os.path.join(where, "evoplug_old")
    os.rename(os.path.join(where, "evoplug"), pkg)
    for folder, _, files in os.walk(pkg):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                src = open(path).read()
                src = re.sub(r"\bfrom evoplug\b", "from evoplug_old", src)
                src = re.sub(r"\bimport evoplug\b", "import evoplug_old", src)
                src = src.replace('"evoplug.', '"evoplug_old.')
                open(path, "w").write(src)
    sys.path.insert(0, where)
    return importlib.import_module("evoplug_old")


def variants(old, opts, model: str = MODEL):
    torch.manual_seed(0)
    dense = timm.create_model(model).eval()
    ex = torch.randn(1, 3, *evoplug.input_size(dense)[1:])
    out = {"original": dense}
    for r in (1, 4):
        out[f"old R={r}"] = old.convert(dense, 0.5, example_input=ex, reselect_every=r, **opts)
        out[f"new R={r}"] = evoplug.convert(dense, 0.5, example_input=ex, reselect_every=r, **opts)
    return out


def measure(models, threads: int, batch: int, repeats: int, train: bool, optimizer: str = "none") -> dict:
    torch.set_num_threads(threads)
    x = torch.randn(batch, 3, *evoplug.input_size(models["original"])[1:])
    calls = {k: bench.make_train_step(m, optimizer=optimizer) for k, m in models.items()} if train else models
    res = bench.interleaved(calls, x, repeats=repeats, warmup=2, inference=not train)
    ips = {k: batch / t.median for k, t in res.items()}
    return {"threads": threads, "batch": batch, "train": train, "repeats": repeats,
            **({"optimizer": optimizer} if train else {}),
            "img_per_s": {k: round(v, 3) for k, v in ips.items()},
            "vs_original": {k: round(v / ips["original"], 3) for k, v in ips.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--against", default="7234a9d", help="commit of the old runtime")
    p.add_argument("--model", default=MODEL, help="a timm model name (random weights)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", default=None)
    p.add_argument("--train-only", action="store_true", help="only the training step")
    p.add_argument("--threads", type=int, default=2, help="threads of the training step")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--optimizer", default="none", choices=bench.OPTIMIZERS,
                   help="optimizer step in the training step (default none: forward + backward)")
    a = p.parse_args(argv)
    bench.retain_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        old = old_evoplug(a.against, tmp)
        models = variants(old, {}, a.model)
        runs = [] if a.train_only else [measure(models, 2, 32, a.repeats, False),
                                         measure(models, 1, 1, 3 * a.repeats, False)]
        runs.append(measure(models, a.threads, a.train_batch, a.repeats, True, a.optimizer))
    for r in runs:
        mode = f"training step (fwd+bwd, optimizer {r['optimizer']})" if r["train"] else "inference"
        print(f"{mode}, batch {r['batch']}, {r['threads']} thread(s): " +
              ", ".join(f"{k} {v:.3f}x" for k, v in r["vs_original"].items()))
    if a.json:
        doc = dict(machine=bench.machine("cpu"), **bench.provenance(),
                   model=a.model, keep_ratio=0.5, old_commit=a.against, allocator=bench.allocator(),
                   settings="random weights, fp32, interleaved rounds, median; inference under "
                            "torch.inference_mode", runs=runs)
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
