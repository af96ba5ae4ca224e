"""Object detection, dense vs Evo, trained from scratch with the same schedule and seed, with
MMDetection + MMEngine's Runner on real images (MNIST digits on 128x128 canvases in COCO format,
examples/mmdet/digit_boxes.py), on a machine with mmcv-lite only (evoplug.integrations.mmcv_ops).

    python benchmarks/mmdet_digits.py                       # both, one after the other
    python benchmarks/mmdet_digits.py --only dense &        # or in two processes, then
    python benchmarks/mmdet_digits.py --only evo; wait
    python benchmarks/mmdet_digits.py --report              # throughput + table from both runs

Reports COCO bbox mAP / mAP@0.5 on the 150 validation canvases, the training wall time, and
inference images/s of the whole detector and of the backbone alone, dense and Evo timed
interleaved in one process (median); writes docs/bench/mmdet_digits_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from evoplug.tools.bench import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "mmdet")
sys.path.insert(0, EXAMPLES)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"dense": "retinanet_swin_digit-boxes.py", "evo": "evo-retinanet_swin_digit-boxes.py"}


def make_cfg(name, data_root, work_dir, iters, seed):
    from mmengine.config import Config
    from mm_schedule import short_run
    cfg = Config.fromfile(os.path.join(EXAMPLES, CONFIGS[name]))
    for dl in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[dl].dataset.data_root = data_root
    cfg.val_evaluator.ann_file = os.path.join(data_root, "annotations", "val.json")
    cfg.test_evaluator = cfg.val_evaluator
    return short_run(cfg, os.path.join(work_dir, name), iters, seed, warm=max(1, iters // 30), logs=10)


def train(name, args):
    from evoplug.mm.train import build_runner
    runner = build_runner(make_cfg(name, args.data_root, args.work_dir, args.iters, args.seed))
    t = time.perf_counter()
    runner.train()
    wall = time.perf_counter() - t
    m = runner.val()
    row = dict(model=name, mAP=float(m.get("coco/bbox_mAP", float("nan"))),
               mAP_50=float(m.get("coco/bbox_mAP_50", float("nan"))), train_s=round(wall, 1))
    with open(os.path.join(args.work_dir, f"{name}.json"), "w") as f:
        json.dump(row, f)
    print(f"{name}: bbox mAP {row['mAP']:.3f}, mAP@0.5 {row['mAP_50']:.3f}, {wall:.0f} s", flush=True)
    return runner


def report(args):
    import evoplug
    from evoplug.mm.train import build_runner
    from mmpretrain_finetune import machine
    from mmengine.runner import load_checkpoint
    from evoplug.tools.bench import interleaved
    rows, models = [], {}
    for name in CONFIGS:
        with open(os.path.join(args.work_dir, f"{name}.json")) as f:
            rows.append(json.load(f))
        runner = build_runner(make_cfg(name, args.data_root, args.work_dir, args.iters, args.seed))
        load_checkpoint(runner.model, os.path.join(args.work_dir, name, f"iter_{args.iters}.pth"), map_location="cpu")
        models[name] = runner.model.eval()
    x = torch.randn(10, 3, 128, 128)
    d, e = models["dense"], models["evo"]
    t = interleaved({"dense": lambda v: d(v, mode="tensor"), "evo": lambda v: e(v, mode="tensor"),
                     "dense backbone": d.backbone, "evo backbone": e.backbone}, x, repeats=args.repeats, warmup=1)
    ips = {k: round(10 / v.median, 1) for k, v in t.items()}
    with open(os.path.join(args.data_root, "info.json")) as f:
        info = json.load(f)
    out = dict(machine=machine(), **provenance(), data=info, iters=args.iters, seed=args.seed,
               settings="mmdet RetinaNet (mmdet's _base_ model config): mmdet SwinTransformer (32 dims, depths "
                        "2-2-2-2, window 4, 128 px) + FPN (64 ch) + RetinaHead, from random init, AdamW lr 1e-3, "
                        f"batch 8, {args.iters} iterations (warm-up then cosine), 10 classes",
               evo=evoplug.explain(e.backbone).splitlines()[0], rows=rows, inference_images_per_s=ips,
               inference_settings=f"batch 10, 128x128, eval, {args.repeats} interleaved rounds, median, "
                                  f"{torch.get_num_threads()} thread(s)",
               speedup_model=round(ips["evo"] / ips["dense"], 3),
               speedup_backbone=round(ips["evo backbone"] / ips["dense backbone"], 3))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nmachine: {out['machine']}\nsettings: {out['settings']}\n{out['evo']}\n")
    print("| model | bbox mAP | mAP@0.5 | train wall (s) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['mAP']:.3f} | {r['mAP_50']:.3f} | {r['train_s']} |")
    print(f"\ninference ({out['inference_settings']}): detector dense {ips['dense']} img/s, Evo {ips['evo']} "
          f"({out['speedup_model']:.2f}x); backbone dense {ips['dense backbone']}, Evo {ips['evo backbone']} "
          f"({out['speedup_backbone']:.2f}x)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=os.path.join(ROOT, "bench_out", "digit_boxes"))
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "bench_out", "mmdet_digits"))
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--only", choices=sorted(CONFIGS), help="train this one only (then --report)")
    ap.add_argument("--report", action="store_true", help="throughput and table from both trained runs")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "mmdet_digits_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import evoplug.integrations.mmcv_ops  # noqa: F401  (before mmdet.models)
    import evoplug.mmdet  # noqa: F401
    from digit_boxes import write_boxes
    write_boxes(args.data_root)
    os.makedirs(args.work_dir, exist_ok=True)
    if not args.report:
        for name in ([args.only] if args.only else list(CONFIGS)):
            train(name, args)
    if args.report or not args.only:
        report(args)


if __name__ == "__main__":
    main()
