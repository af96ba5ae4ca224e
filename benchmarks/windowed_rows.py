"""Do the windowed attention rows rank tokens usefully? Measured on a small Swin trained here.

A small Swin (timm's SwinTransformer: 32 px digits from scikit-learn, patch 2 -> 16x16 tokens,
window 4, 3 stages of 2 blocks) is trained on the 1,438 training digits, then converted off the
shelf (no fine-tuning) and evaluated on the 359 test digits:
  windows - evoplug's global score for windowed blocks: each window's mean-query attention,
            mapped back to its tokens, carried with the trade-off and pooled across stages;
  random  - the same conversion with the windowed rows replaced by random scores (an ablation:
            selection no better than chance where the windows give the score).
The last stage (4x4 tokens, one window) has global attention in both variants.

    python benchmarks/windowed_rows.py
"""
import os
import sys

import timm
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import digits  # noqa: E402

import evoplug  # noqa: E402
from evoplug import evolution as ev  # noqa: E402


def small_swin():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32,
                             patch_size=2, window_size=4, embed_dim=48, depths=(2, 2, 2),
                             num_heads=(3, 6, 12), num_classes=10)


def trained_small_swin(log=print):
    path = os.path.join(digits.CACHE, "swin_digits.pth")
    model = small_swin()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    x, y, _, _ = digits.load_digits_tensors()
    torch.manual_seed(0)
    digits.train(model, x, y, epochs=30, log=log)
    os.makedirs(digits.CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def convert_with_random_window_rows(model, keep, example, seed=0):
    """evoplug.convert with ev.window_row replaced by random scores while the programs are
    built (the programs keep the function they were built with)."""
    g = torch.Generator().manual_seed(seed)
    real = ev.window_row

    def random_row(row, index, num_tokens):
        B = row.numel() // index.numel()
        r = torch.rand(B, num_tokens, generator=g)
        return r / r.sum(1, keepdim=True)

    ev.window_row = random_row
    try:
        return evoplug.convert(model, keep_ratio=keep, example_input=example)
    finally:
        ev.window_row = real


def main():
    torch.manual_seed(0)
    model = trained_small_swin()
    _, _, xt, yt = digits.load_digits_tensors()
    print(f"small Swin trained on digits, dense top-1 {digits.accuracy(model, xt, yt):.2f}% ({len(yt)} test images)")
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=xt[:1])
    print(evoplug.explain(fast).splitlines()[0])
    print(f"{'keep_ratio':>10}  {'windows':>8}  {'random':>8}")
    rows = []
    for keep in (0.25, 0.35, 0.5, 0.7):
        acc_w = digits.accuracy(evoplug.convert(model, keep_ratio=keep, example_input=xt[:1]), xt, yt)
        acc_r = sum(digits.accuracy(convert_with_random_window_rows(model, keep, xt[:1], seed=s), xt, yt)
                    for s in range(3)) / 3
        rows.append((keep, acc_w, acc_r))
        print(f"{keep:>10}  {acc_w:>7.2f}%  {acc_r:>7.2f}%   (random: mean of 3 seeds)")
    return rows


if __name__ == "__main__":
    main()
