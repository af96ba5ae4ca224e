"""Semantic segmentation, dense vs Evo, trained from scratch with the same schedule and seed, with
MMSegmentation + MMEngine's Runner on real images (MNIST digits pasted onto 64x64 canvases,
examples/mmseg/digit_canvas.py), on a machine with mmcv-lite only (evoplug.integrations.mmcv_ops).

    python benchmarks/mmseg_digits.py                 # 1,500 iterations each, about 20 min on 1 core
    python benchmarks/mmseg_digits.py --iters 40      # a quick look

Reports mIoU / mAcc / aAcc on the 200 validation canvases, the training wall time, and
inference images/s of the whole segmenter and of the backbone alone, dense and Evo timed
interleaved in one process (median); writes docs/bench/mmseg_digits_cpu.json.
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
EXAMPLES = os.path.join(ROOT, "examples", "mmseg")
sys.path.insert(0, EXAMPLES)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def make_cfg(path, data_root, work_dir, iters, seed):
    from mmengine.config import Config
    from mm_schedule import short_run
    cfg = Config.fromfile(path)
    for dl in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[dl].dataset.data_root = data_root
    return short_run(cfg, work_dir, iters, seed, warm=max(1, iters // 12), logs=6)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=os.path.join(ROOT, "bench_out", "digit_canvas"))
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "bench_out", "mmseg_digits"))
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "mmseg_digits_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import evoplug.integrations.mmcv_ops  # noqa: F401  (before mmseg.models)
    import evoplug
    import evoplug.mmseg  # noqa: F401
    from digit_canvas import write_canvases
    from evoplug.mm.train import build_runner
    from evoplug.tools.bench import interleaved
    from mmpretrain_finetune import machine
    info = write_canvases(args.data_root)

    rows, runners = [], {}
    for name, cfg_file in (("dense", "vit-uper_digit-canvas.py"), ("Evo keep 0.5", "evo-vit-uper_digit-canvas.py")):
        cfg = make_cfg(os.path.join(EXAMPLES, cfg_file), args.data_root,
                       os.path.join(args.work_dir, name.split()[0].lower()), args.iters, args.seed)
        runner = build_runner(cfg)
        t = time.perf_counter()
        runner.train()
        wall = time.perf_counter() - t
        metrics = runner.val()
        rows.append(dict(model=name, mIoU=float(metrics["mIoU"]), mAcc=float(metrics["mAcc"]), aAcc=float(metrics["aAcc"]),
                         train_s=round(wall, 1)))
        runners[name] = runner
        print(f"{name}: mIoU {metrics['mIoU']:.2f}, {wall:.0f} s", flush=True)

    dense, evo = runners["dense"].model, runners["Evo keep 0.5"].model
    dense.eval()
    evo.eval()
    x = torch.randn(25, 3, 64, 64)
    t = interleaved({"dense": lambda v: dense(v, mode="tensor"), "evo": lambda v: evo(v, mode="tensor"),
                     "dense backbone": dense.backbone, "evo backbone": evo.backbone}, x,
                    repeats=args.repeats, warmup=1)
    ips = {k: round(25 / v.median, 1) for k, v in t.items()}
    report = dict(machine=machine(), **provenance(), data=info, iters=args.iters,
                  seed=args.seed, threads=args.threads,
                  settings="mmseg EncoderDecoder: VisionTransformer (6 blocks, 96 dims, 3 heads, 64 px, patch 4: "
                           "16x16 tokens + cls) + MultiLevelNeck + UPerHead (64 ch), from random init, AdamW lr 1e-3, "
                           f"batch 8, {args.iters} iterations (linear warm-up then cosine), 11 classes",
                  evo=evoplug.explain(evo.backbone).splitlines()[0], rows=rows,
                  inference_images_per_s=ips,
                  inference_settings=f"batch 25, 64x64, eval, {args.repeats} interleaved rounds, median, "
                                     f"{torch.get_num_threads()} thread(s)",
                  speedup_model=round(ips["evo"] / ips["dense"], 3),
                  speedup_backbone=round(ips["evo backbone"] / ips["dense backbone"], 3))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nmachine: {report['machine']}\nsettings: {report['settings']}\n{report['evo']}\n")
    print("| model | mIoU | mAcc | aAcc | train wall (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['mIoU']:.2f} | {r['mAcc']:.2f} | {r['aAcc']:.2f} | {r['train_s']} |")
    print(f"\ninference ({report['inference_settings']}): segmenter dense {ips['dense']} img/s, Evo {ips['evo']} "
          f"img/s ({report['speedup_model']:.2f}x); backbone dense {ips['dense backbone']}, Evo "
          f"{ips['evo backbone']} ({report['speedup_backbone']:.2f}x)")


if __name__ == "__main__":
    main()
