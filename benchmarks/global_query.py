"""Which query should rank the tokens when a model has no cls token? Measured on a trained model.

The small DeiT trained here on scikit-learn's digits (examples/digits.py) has a cls token, so
both rankings can be compared on the same weights, off the shelf (no fine-tuning):
  cls  - the paper's class attention (query 0);
  mean - evoplug's choice for models without a cls token: the attention row of the mean query
         of the patch tokens (exact mean of the logits rows; one query row, works with SDPA).
Prints top-1 on the 359 test images for several keep ratios.

    python benchmarks/global_query.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import digits  # noqa: E402

import evoplug  # noqa: E402


def main():
    torch.manual_seed(0)
    model = digits.trained_small_deit()
    _, _, xt, yt = digits.load_digits_tensors()
    print(f"small DeiT trained on digits, dense top-1 {digits.accuracy(model, xt, yt):.2f}% "
          f"({len(yt)} test images)")
    print(f"{'keep_ratio':>10}  {'cls query':>10}  {'mean query':>10}")
    rows = []
    for keep in (0.25, 0.35, 0.5, 0.7):
        acc = {}
        for q in ("cls", "mean"):
            fast = evoplug.convert(model, keep_ratio=keep, example_input=xt[:1], global_query=q)
            acc[q] = digits.accuracy(fast, xt, yt)
        rows.append((keep, acc["cls"], acc["mean"]))
        print(f"{keep:>10}  {acc['cls']:>9.2f}%  {acc['mean']:>9.2f}%")
    return rows


if __name__ == "__main__":
    main()
