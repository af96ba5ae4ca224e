"""The representative token on trained models: ``representative=True`` (the paper's method, the
default) against ``False`` (the authors' DeiT code: the unselected tokens carried unchanged).

Trained from scratch on MNIST, Evo-ViT was as accurate without the representative token as with
it, or better (docs/benchmarks.md, "Training from scratch"). This study asks the other use: a
dense model trained without evoplug, converted, then used as it is, distilled without labels, or
fine-tuned with labels, for both settings, on the two trained models of examples/:

* the small DeiT trained on scikit-learn's digits (examples/digits.py; pool: its 1,438 training
  images, held out: 359);
* the photo ViT of examples/photos.py (pool: 2,000 random crops, seed 7; held out: 1,000 other
  crops, seed 1234), as benchmarks/distill.py draws them.

With ``--mnist DIR`` (the work folder of benchmarks/from_scratch.py, default
bench_out/from_scratch, when it holds the 144-patch runs' final checkpoints ``epoch_25.pth``)
also the models trained from scratch there, each evaluated both ways on the 1,000 val images
with MMEngine's Runner: the dense one converted, and the Evo ones trained with and without the
representative token: does a model have to run the way it was trained?

Off the shelf at keep 0.3, 0.5 and 0.7; at keep 0.5 also distilled (``evoplug.distill``, no
labels) and fine-tuned with labels (benchmarks/distill.py's ``finetune``: the same optimizer,
schedule and batch sampling), ``--steps`` each. Both with ``reselect_every=4`` (the default) and
1: these models have 4 evolving blocks, so the default selects once, the tokens left out then
never re-enter, and their fast update cannot reach the class token (only the representative
token's own place in the attention differs); selecting in every block lets it. Everything else
default (``global_query='auto'``: the class token). Top-1 on the held-out images and agreement with the dense
model's predictions; one trained model each, one seed: differences under a point are within what
another seed could change.

    python benchmarks/representative.py                  # writes docs/bench/representative.json
    python benchmarks/representative.py --models digits --steps 100 --json /tmp/r.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import distill as dist  # noqa: E402  (benchmarks/distill.py: measure, finetune, the examples' path)

import evoplug  # noqa: E402
from evoplug import quality  # noqa: E402
from evoplug.tools import bench  # noqa: E402

KEEPS = (0.3, 0.5, 0.7)
TRAIN_KEEP = 0.5
RESELECT = (4, 1)      # the default (one selection for these 4 evolving blocks) and every block


def rows_for(name: str, steps, seed: int) -> list:
    model, pool, pool_y, xt, yt = dist.api_data(name)
    model.eval()
    ref = quality.outputs(model, xt)
    flops0 = bench.flops(model, xt[:1])
    rows = [dict(dist.measure(model, xt, yt, ref, None, "dense"), representative=None, keep=1.0,
                 reselect_every=None, training="none")]

    def convert(keep, rep, every):
        return evoplug.convert(model, keep_ratio=keep, example_input=xt[:1], representative=rep,
                               reselect_every=every)

    def add(fast, keep, rep, every, training, **extra):
        r = dist.measure(fast, xt, yt, ref, flops0, f"keep {keep:g}, reselect_every={every}, "
                         f"representative={rep}, {training}", **extra)
        rows.append(dict(r, representative=rep, keep=keep, reselect_every=every, training=training))

    for every in RESELECT:
        for keep in KEEPS:
            for rep in (True, False):
                add(convert(keep, rep, every), keep, rep, every, "none")
        for s in steps:
            for rep in (True, False):
                fast = convert(TRAIN_KEEP, rep, every)
                d = evoplug.distill(fast, pool, steps=s, progress=False, seed=seed)
                add(fast, TRAIN_KEEP, rep, every, f"distill {s}", seconds=round(d.seconds, 1))
                fast = convert(TRAIN_KEEP, rep, every)
                t = dist.finetune(fast, pool, pool_y, s, seed=seed)
                add(fast, TRAIN_KEEP, rep, every, f"fine-tune {s}", seconds=round(t, 1))
    return rows


MNIST_RUNS = {"dense": "dense_s{seed}", "Evo, representative": "Evo_keep_0_5_s{seed}",
              "Evo, placeholder": "Evo_keep_0_5__placeholder__no_representa_s{seed}"}


def mnist_predictions(work: str, ckpt: str, seed: int, evo):
    """(predictions, labels) on the val images of the from-scratch model ``ckpt`` (loaded
    strictly), built as benchmarks/from_scratch.py builds it (24 px, patch 2), dense (``evo``
    None) or Evo with the options ``evo``; through the Runner's val loader."""
    import argparse as ap

    import from_scratch as fs
    from mmengine.runner import load_checkpoint

    import evoplug.mm  # noqa: F401  (registers the Evo types)
    from evoplug.mm.train import build_runner
    args = ap.Namespace(img_size=24, patch_size=2, data_root=os.path.join(ROOT, "bench_out", "mnist5k"),
                        work_dir=work)
    cfg = fs.build("eval", fs.DENSE_CFG if evo is None else fs.EVO_CFG,
                   None if evo is None else dict(evo=evo), args, seed, 1)
    cfg.log_level = "WARNING"
    runner = build_runner(cfg)
    load_checkpoint(runner.model, ckpt, map_location="cpu", strict=True, logger="silent")
    logits, labels = dist._val_logits(runner, runner.model)
    return logits.argmax(-1), labels


def mnist_rows(folder: str, seeds) -> list:
    work = os.path.join(ROOT, "bench_out", "representative_eval")
    rows = []
    for seed in seeds:
        dense = None
        for trained, slug in MNIST_RUNS.items():
            ckpt = os.path.join(folder, slug.format(seed=seed), "epoch_25.pth")
            if not os.path.exists(ckpt):
                print(f"  no {os.path.relpath(ckpt, ROOT)}: skipped", flush=True)
                continue
            row = dict(seed=seed, trained=trained, checkpoint=os.path.relpath(ckpt, ROOT))
            if trained == "dense":
                dense, y = mnist_predictions(work, ckpt, seed, None)
                row["top1_dense"] = round(100 * float((dense == y).float().mean()), 2)
            pred = {}
            for rep in (True, False):
                pred[rep], y = mnist_predictions(work, ckpt, seed,
                                                 dict(keep_ratio=TRAIN_KEEP, representative=rep))
                row[f"top1_representative_{rep}"] = round(100 * float((pred[rep] == y).float().mean()), 2)
                if trained == "dense":
                    row[f"agreement_representative_{rep}"] = round(
                        100 * float((pred[rep] == dense).float().mean()), 2)
            row["predictions_differ"] = round(100 * float((pred[True] != pred[False]).float().mean()), 2)
            print(f"  seed {seed}, {trained}: " + ", ".join(f"{k} {v}" for k, v in row.items()
                                                          if k not in ("seed", "trained", "checkpoint")),
                  flush=True)
            rows.append(row)
    return rows


def table(rows) -> str:
    """One line per (reselect_every, keep, training), the two settings side by side."""
    out = ["| reselect_every | keep | training | top-1, representative (default) | top-1, placeholder | "
           "agreement, representative | agreement, placeholder |", "|---|---|---|---|---|---|---|"]
    dense = next(r for r in rows if r["representative"] is None)
    out.append(f"| - | 1 (dense) | - | {dense['top1']:.2f} | - | 100 | - |")
    seen = []
    for r in rows:
        key = (r["reselect_every"], r["keep"], r["training"])
        if r["representative"] is None or key in seen:
            continue
        seen.append(key)
        a, b = (next(q for q in rows if (q["reselect_every"], q["keep"], q["training"]) == key
                     and q["representative"] is v) for v in (True, False))
        out.append(f"| {key[0]} | {key[1]:g} | {key[2]} | {a['top1']:.2f} | {b['top1']:.2f} | "
                   f"{a['agreement']:.2f} | {b['agreement']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["digits", "photos"], choices=["digits", "photos"])
    p.add_argument("--steps", type=int, nargs="+", default=[300],
                   help="distillation and fine-tuning steps at keep 0.5 (0: off the shelf only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mnist", default=os.path.join(ROOT, "bench_out", "from_scratch"),
                   help="benchmarks/from_scratch.py's work folder ('' to skip)")
    p.add_argument("--mnist-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "representative.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    steps = [s for s in a.steps if s > 0]
    t0 = time.perf_counter()
    out = dict(machine=bench.machine("cpu"), **bench.provenance(),
               settings=dict(keeps=list(KEEPS), train_keep=TRAIN_KEEP, steps=steps, seed=a.seed,
                             reselect_every=list(RESELECT),
                             threads=a.threads, convert="defaults, representative=True/False",
                             distill="evoplug.distill defaults (AdamW lr 5e-4, batch 32)",
                             finetune="benchmarks/distill.py finetune (same optimizer and schedule)"),
               models={})
    for name in a.models:
        print(f"\n== {name} ==", flush=True)
        rows = rows_for(name, steps, a.seed)
        out["models"][name] = rows
        print("\n" + table(rows), flush=True)
    if a.mnist and os.path.isdir(a.mnist):
        print("\n== MNIST, trained from scratch (benchmarks/from_scratch.py) ==", flush=True)
        out["models"]["mnist_from_scratch"] = mnist_rows(a.mnist, a.mnist_seeds)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {os.path.relpath(a.json)} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
