"""evoplug demo: convert models, print speed and fidelity (`make demo`).

1. Fidelity on real images: a small DeiT trained here on scikit-learn's digits (no download),
   converted off-the-shelf (no fine-tuning): test accuracy dense vs Evo at several keep ratios.
2. Accuracy back without labels: the planner's options for a target speed-up, and the
   converted model distilled from the dense one on the training images without their labels.
3. Speed: timm DeiT-S at 224 px, batch 32, original vs converted, interleaved, median of
   repeats; FLOP ratio beside it; keep_ratio=1.0 reproduces the original exactly.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import digits  # noqa: E402
import evoplug  # noqa: E402
from evoplug.tools import bench as harness  # noqa: E402  (timing/FLOP helpers: evoplug/tools/bench.py)


def fidelity():
    print("== 1. fidelity on real images (scikit-learn digits, 359 test images) ==")
    model = digits.trained_small_deit()
    _, _, xt, yt = digits.load_digits_tensors()
    with torch.no_grad():
        ref = model(xt)
    print(f"dense small DeiT (6 blocks, 64 patch tokens): top-1 {digits.accuracy(model, xt, yt):.2f}%")
    for keep, query in ((1.0, "auto"), (0.7, "auto"), (0.5, "auto"), (0.7, "mean"), (0.5, "mean")):
        fast = evoplug.convert(model, keep_ratio=keep, example_input=xt[:1], global_query=query)
        with torch.no_grad():
            out = fast(xt)
        agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean()) * 100
        label = "cls query" if query == "auto" else "mean query"
        print(f"evoplug keep_ratio={keep} ({label}): top-1 {digits.accuracy(fast, xt, yt):.2f}%  "
              f"(same prediction as dense on {agree:.1f}%, max |logit diff| {float((out - ref).abs().max()):.3g})")
    print("(off-the-shelf, no fine-tuning: a 64-token model trained here from scratch; section 2 gets the"
          " accuracy back without labels)")
    print()
    print(evoplug.explain(evoplug.convert(model, keep_ratio=0.5, example_input=xt[:1])))


def accuracy_back(steps):
    print("\n== 2. accuracy back without labels (docs/distill.md) ==")
    model = digits.trained_small_deit()
    x, _, xt, yt = digits.load_digits_tensors()
    ref = evoplug.quality.outputs(model, xt)
    p = evoplug.plan(model, x[:256], target_speedup=1.4, keep_ratios=(0.4, 0.5, 0.6), progress=False)
    b = p.best
    print(f"planner, target 1.4x FLOPs, on 256 training images: keep {b.keep_ratio}, start_block "
          f"{b.start_block}, {b.global_query} query ({b.flop_speedup:.2f}x FLOPs, agreement "
          f"{b.agreement:.1%} there)")
    fast = evoplug.convert(model, keep_ratio=0.5, images=x[:256])
    before = evoplug.quality.agreement(evoplug.quality.outputs(fast, xt), ref)
    r = evoplug.distill(fast, x, steps=steps, progress=False)
    after = evoplug.quality.agreement(evoplug.quality.outputs(fast, xt), ref)
    print(f"keep_ratio=0.5 distilled from the dense model on the 1,438 training images, no labels, "
          f"{steps} steps ({r.seconds:.0f} s): test top-1 {digits.accuracy(fast, xt, yt):.2f}% "
          f"(dense {digits.accuracy(model, xt, yt):.2f}%), same prediction as dense on "
          f"{100 * before:.1f}% -> {100 * after:.1f}%")


def speed(repeats):
    import timm
    print(f"\n== 3. speed: DeiT-S 224 px, batch 32 on {harness.machine()} ==")
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(32, 3, 224, 224)
    for keep in (0.5, 1.0):
        fast = evoplug.convert(model, keep_ratio=keep, example_input=x[:1])
        f0, f1 = harness.flops(model, x[:1]), harness.flops(fast, x[:1])
        t = harness.interleaved({"original": model, "evoplug": fast}, x, repeats=repeats, warmup=1)
        s0, s1 = 32 / t["original"].median, 32 / t["evoplug"].median
        with torch.no_grad():
            diff = float((fast(x[:2]) - model(x[:2])).abs().max())
        print(f"keep_ratio={keep}: original {s0:.1f} img/s, evoplug {s1:.1f} img/s -> "
              f"{s1 / s0:.2f}x (FLOP ratio {f0 / f1:.2f}x, max |diff| {diff:.2g})")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--distill-steps", type=int, default=300)
    a = p.parse_args()
    fidelity()
    accuracy_back(a.distill_steps)
    speed(a.repeats)
