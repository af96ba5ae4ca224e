"""A small ViT trained here on real photographs (no download), for token-selection pictures.

Task: "which photograph is this random crop from?" over the sample photographs that ship in
scikit-image's wheel (astronaut, coffee, chelsea the cat, rocket, a motorcycle, coins, the
moon, a retina, ...). Square crops of 35-100% of the shorter side at random places, flipped
and jittered, resized to 64 px; a ViT with 8 px patches (8 x 8 = 64 patch tokens + cls,
6 blocks, width 96). To answer, the class token has to find the regions that tell the
photographs apart, so its attention - the global attention Evo-ViT ranks tokens by - means
something, unlike a random-weight model's.

    python examples/photos.py                  # trains once (a few minutes on 2 cores), caches
                                               # bench_out/photo_vit.pth, evaluates, draws
                                               # bench_out/token_selection.png
    python -m evoplug visualize bench_out/photo_vit.pth skimage:astronaut skimage:coffee

Evaluation: top-1 on 1,000 fresh random crops (new seed; same photographs, since the task is
to recognise them) for the dense model and the converted one at several keep ratios, with no
fine-tuning.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "bench_out")
CKPT = os.path.join(CACHE, "photo_vit.pth")

# scikit-image sample images that ship in its wheel (no download); photographs and micrographs
PHOTOS = ["astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
          "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina",
          "rocket", "stereo_motorcycle", "text"]
SIZE = 64
MODEL = "vit_tiny_patch16_224"
MODEL_KWARGS = dict(img_size=SIZE, patch_size=8, embed_dim=96, depth=6, num_heads=3,
                    num_classes=len(PHOTOS))
MEAN = STD = (0.5, 0.5, 0.5)


def load_photos(short_side: int = 192):
    """The photographs as float tensors (3, H, W) in [0, 1], shorter side ``short_side``."""
    from evoplug.tools.visualize import load_image
    out = []
    for name in PHOTOS:
        img = torch.from_numpy(load_image("skimage:" + name)).permute(2, 0, 1)[None].float() / 255
        h, w = img.shape[-2:]
        s = short_side / min(h, w)
        img = F.interpolate(img, size=(round(h * s), round(w * s)), mode="bilinear",
                            antialias=True, align_corners=False)
        out.append(img[0].clamp(0, 1))
    return out


def random_crops(photos, n: int, gen: torch.Generator, size: int = SIZE, lo: float = 0.35):
    """``n`` (crop, label) pairs: square crops of ``lo``..1 of the shorter side, flips,
    brightness/contrast jitter, resized to ``size``, normalised."""
    labels = torch.randint(0, len(photos), (n,), generator=gen)
    xs = []
    for c in labels.tolist():
        p = photos[c]
        h, w = p.shape[-2:]
        side = int(min(h, w) * (lo + (1 - lo) * float(torch.rand((), generator=gen))))
        top = int(torch.randint(0, h - side + 1, (), generator=gen))
        left = int(torch.randint(0, w - side + 1, (), generator=gen))
        crop = p[:, top:top + side, left:left + side][None]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)[0]
        if float(torch.rand((), generator=gen)) < 0.5:
            crop = crop.flip(-1)
        b, k = (0.15 * (2 * torch.rand(2, generator=gen) - 1)).tolist()
        crop = ((crop - 0.5) * (1 + k) + 0.5 + b).clamp(0, 1)
        xs.append(crop)
    x = torch.stack(xs)
    return (x - MEAN[0]) / STD[0], labels


def build():
    from evoplug.tools.models import create_model
    return create_model(MODEL, **MODEL_KWARGS)


def train(steps: int = 300, batch: int = 64, lr: float = 1e-3, seed: int = 0, log=print):
    torch.manual_seed(seed)
    photos = load_photos()
    model = build().train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0, run = time.time(), 0.0
    for step in range(steps):
        x, y = random_crops(photos, batch, gen)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        l = float(loss.detach())
        run = 0.9 * run + 0.1 * l if step else l
        if log and (step + 1) % 25 == 0:
            log(f"  step {step + 1}/{steps}  loss {run:.3f}  ({time.time() - t0:.0f} s)")
    return model.eval()


def trained_model(steps: int = 300, log=print, retrain: bool = False):
    """The trained ViT (cached in bench_out/photo_vit.pth after the first run)."""
    from evoplug.tools.models import load_checkpoint, save_checkpoint
    if os.path.exists(CKPT) and not retrain:
        return load_checkpoint(CKPT)[0]
    if log:
        log(f"training a small ViT on crops of {len(PHOTOS)} scikit-image photographs "
            f"({steps} steps of 64; cached in {os.path.relpath(CKPT, ROOT)})")
    model = train(steps, log=log)
    os.makedirs(CACHE, exist_ok=True)
    save_checkpoint(CKPT, model, MODEL, MODEL_KWARGS, mean=list(MEAN), std=list(STD),
                    classes=list(PHOTOS), task="which scikit-image photograph a random crop is from",
                    steps=steps)
    return model


@torch.no_grad()
def evaluate(model, keeps=(1.0, 0.7, 0.5, 0.3), n: int = 1000, seed: int = 1234, log=print):
    import evoplug
    photos = load_photos()
    x, y = random_crops(photos, n, torch.Generator().manual_seed(seed))
    ref = torch.cat([model(x[i:i + 250]) for i in range(0, n, 250)])
    res = {"dense": 100.0 * float((ref.argmax(-1) == y).float().mean())}
    log(f"dense: top-1 {res['dense']:.1f}% on {n} fresh random crops")
    for keep in keeps:
        fast = evoplug.convert(model, keep_ratio=keep, example_input=x[:1])
        out = torch.cat([fast(x[i:i + 250]) for i in range(0, n, 250)])
        acc = 100.0 * float((out.argmax(-1) == y).float().mean())
        agree = 100.0 * float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        res[keep] = acc
        log(f"evoplug keep_ratio={keep}: top-1 {acc:.1f}% (same prediction as dense on "
            f"{agree:.1f}%), no fine-tuning")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--keep", type=float, default=0.5, help="keep ratio of the picture")
    p.add_argument("--out", default=os.path.join(CACHE, "token_selection.png"))
    p.add_argument("--images", nargs="+", default=["skimage:astronaut", "skimage:coffee",
                                                   "skimage:chelsea", "skimage:rocket",
                                                   "skimage:stereo_motorcycle", "skimage:coins"])
    a = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import evoplug
    from evoplug.tools import visualize as viz
    model = trained_model(a.steps, retrain=a.retrain)
    evaluate(model)
    fast = evoplug.convert(model, keep_ratio=a.keep)
    print(evoplug.explain(fast))
    wh = viz.visualize(fast, a.images, a.out, mean=MEAN, std=STD)
    print(f"wrote {a.out} ({wh[0]}x{wh[1]} px)")


if __name__ == "__main__":
    main()
