"""Inference throughput of MMDetection's RetinaNet + Swin-T (p4, w7), dense vs Evo keep 0.5,
built from the shipped COCO configs (MMDetection's own ``retinanet_swin-t-p4-w7_fpn_1x_coco.py``
and ``examples/mmdet/evo-retinanet_swin-t-p4-w7_fpn_1x_coco.py``) with random weights (no
checkpoint download here; speed does not depend on the weights).

    python benchmarks/mmdet_swin_t.py [--sizes 512x512 800x1344] [--threads 1]

Times the whole detector (``mode='tensor'``: backbone, FPN, RetinaHead) and the backbone alone,
dense and Evo interleaved in one process (median), at each size; the Evo model is converted at
800x1344 (the config's ``input_size``), so other sizes also report the first call's extra time
(the twin converted for that size). Writes docs/bench/mmdet_swin_t_cpu.json.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"dense": "mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py",
           "evo": os.path.join(ROOT, "examples", "mmdet", "evo-retinanet_swin-t-p4-w7_fpn_1x_coco.py")}


def build(name):
    """The detector of config ``name`` in eval mode, random weights (``init_cfg`` dropped)."""
    from mmengine.config import Config
    from mmengine.hub import get_config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = get_config(CONFIGS[name]) if "::" in CONFIGS[name] else Config.fromfile(CONFIGS[name])
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    t = time.perf_counter()
    model = MODELS.build(cfg.model).eval()
    return model, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["512x512", "800x1344"], help="HxW, multiples of 32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--note", default="", help="a remark stored with the figures (e.g. machine load)")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "mmdet_swin_t_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import evoplug
    import evoplug.integrations.mmcv_ops  # noqa: F401  (before mmdet.models)
    import evoplug.mmdet  # noqa: F401
    from evoplug.tools.bench import flops, interleaved
    from mmpretrain_finetune import machine
    (d, _), (e, build_s) = build("dense"), build("evo")
    rows = []
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        x = torch.randn(args.batch, 3, h, w)
        with torch.no_grad():
            t = time.perf_counter()
            e.backbone(x)                       # a new size: the twin is converted here
            first = time.perf_counter() - t
            t = time.perf_counter()
            e.backbone(x)
            second = time.perf_counter() - t
            # keep 1.0 through the selection machinery reproduces the dense maps at this size
            evoplug.set_options(e.backbone, keep_ratio=1.0, identity_fast_path=False)
            err = max(float((a - b).abs().max()) for a, b in zip(d.backbone(x), e.backbone(x)))
            evoplug.set_options(e.backbone, keep_ratio=0.5, identity_fast_path=True)
            flop_ratio = flops(d.backbone, x[:1]) / flops(e.backbone, x[:1])
            tm = interleaved({"dense": lambda v: d(v, mode="tensor"), "evo": lambda v: e(v, mode="tensor"),
                              "dense backbone": d.backbone, "evo backbone": e.backbone},
                             x, repeats=args.repeats, warmup=1)
        ips = {k: round(args.batch / v.median, 3) for k, v in tm.items()}
        row = dict(size=[h, w], tokens=(h // 4) * (w // 4), images_per_s=ips,
                   speedup_model=round(ips["evo"] / ips["dense"], 3),
                   speedup_backbone=round(ips["evo backbone"] / ips["dense backbone"], 3),
                   flop_ratio_backbone=round(flop_ratio, 3),
                   first_call_s=round(first, 2), later_call_s=round(second, 2),
                   keep1_max_abs_err=err)
        rows.append(row)
        print(f"{h}x{w}: detector {ips['dense']} -> {ips['evo']} img/s ({row['speedup_model']:.2f}x), "
              f"backbone {ips['dense backbone']} -> {ips['evo backbone']} ({row['speedup_backbone']:.2f}x); "
              f"first call {first:.1f} s, later {second:.1f} s; keep 1.0 (selection path) max |err| {err:.2e}", flush=True)
    out = dict(machine=machine(), **provenance(),
               settings=f"MMDetection RetinaNet + Swin-T p4 w7 (mmdet's COCO config), random weights, eval, "
                        f"batch {args.batch}, fp32, {args.threads} thread(s), {args.repeats} interleaved "
                        f"rounds, median; Evo converted at 800x1344 (build {build_s:.1f} s)",
               evo=evoplug.explain(e.backbone).splitlines()[0], note=args.note, rows=rows)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nmachine: {out['machine']}\nsettings: {out['settings']}\n{out['evo']}")


if __name__ == "__main__":
    main()
