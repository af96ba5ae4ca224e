"""Windowed attention, measured on two small models trained here: do the window rows rank
tokens, and what does the exact attention update of the other tokens bring?

A small Swin (timm's SwinTransformer: patch 2 -> 16x16 tokens, window 4, 3 stages of 2 blocks)
and a small Twins-SVT (patch 2, windows of 4, locally-grouped and global blocks alternating)
are trained on scikit-learn's digits (1,438 images, 32 px), then converted off the shelf (no
fine-tuning) and evaluated on the 359 test digits:
  evoplug - the default: global score from each window's mean-query attention; tokens that
            were not kept keep their own (exact) windowed attention update;
  random  - the window rows replaced by random scores (mean of 3 seeds): selection no better
            than chance where the windows give the score;
  flat    - the fast update of flat ViTs instead: tokens that were not kept get the
            representative token's whole residual (attention and MLP).
Both ablations patch evoplug functions while the programs are built (the programs keep the
functions they were built with).

    python benchmarks/windowed_rows.py
"""
import contextlib
import os
import sys

import timm
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import digits  # noqa: E402

import evoplug  # noqa: E402
from evoplug.runtime import gather, rows  # noqa: E402

MODELS = {
    "swin": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2, window_size=4,
        embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12), num_classes=10),
    "twins": lambda: timm.create_model(
        "twins_svt_small", pretrained=False, img_size=32, patch_size=2, embed_dims=(48, 96, 192),
        depths=(2, 2, 2), num_heads=(2, 4, 8), mlp_ratios=(4, 4, 4), sr_ratios=(4, 2, 1),
        wss=(4, 4, 4), num_classes=10),
}


def trained(name, log=print):
    path = os.path.join(digits.CACHE, f"{name}_digits.pth")
    model = MODELS[name]()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    x, y, _, _ = digits.load_digits_tensors()
    torch.manual_seed(0)
    digits.train(model, x, y, epochs=30, log=log)
    os.makedirs(digits.CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


@contextlib.contextmanager
def patched(**funcs):
    """The runtime functions ``funcs`` (rows.py's or gather.py's, by name) replaced meanwhile."""
    where = {k: rows if hasattr(rows, k) else gather for k in funcs}
    saved = {k: getattr(where[k], k) for k in funcs}
    for k, f in funcs.items():
        setattr(where[k], k, f)
    try:
        yield
    finally:
        for k, f in saved.items():
            setattr(where[k], k, f)


def random_rows(seed):
    g = torch.Generator().manual_seed(seed)

    def window_row(row, index, num_tokens):
        r = torch.rand(row.numel() // index.numel(), num_tokens, generator=g)
        return r / r.sum(1, keepdim=True)
    return window_row


def main():
    _, _, xt, yt = digits.load_digits_tensors()
    results = {}
    for name in MODELS:
        torch.manual_seed(0)
        model = trained(name, log=None)
        dense = digits.accuracy(model, xt, yt)
        print(f"\nsmall {name} trained on digits: dense top-1 {dense:.2f}% ({len(yt)} test images)")
        print(f"{'keep_ratio':>10}  {'evoplug':>8}  {'random':>8}  {'flat':>8}")
        rows = []
        for keep in (0.25, 0.35, 0.5, 0.7):
            conv = lambda: evoplug.convert(model, keep_ratio=keep, example_input=xt[:1])  # noqa: E731
            acc = digits.accuracy(conv(), xt, yt)
            rnd = 0.0
            for s in range(3):
                with patched(window_row=random_rows(s)):
                    rnd += digits.accuracy(conv(), xt, yt) / 3
            with patched(map_fast_base=lambda *a: None, stream_fast_base=lambda *a: None):
                flat = digits.accuracy(conv(), xt, yt)
            rows.append((keep, acc, rnd, flat))
            print(f"{keep:>10}  {acc:>7.2f}%  {rnd:>7.2f}%  {flat:>7.2f}%")
        results[name] = (dense, rows)
    return results


if __name__ == "__main__":
    main()
