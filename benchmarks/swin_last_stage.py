"""What the representative token's own slow path brings in Swin's last stage, on the small Swin
of ``benchmarks/windowed_rows.py`` trained on scikit-learn's digits (converted off the shelf,
top-1 on the 359 test digits).

The last stage's blocks have one window covering the map, so their attention runs on the kept
tokens. Since commit 73f8939 the slow path's last slot holds the representative token itself (the
block's norm re-run on the subset's own tokens); before, it held the token at the
representative's position, read back from the normed full map ('before' below: the rewrite
step that makes the subset's own tokens is switched off while the programs are built).

    python benchmarks/swin_last_stage.py --json docs/bench/swin_last_stage.json
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import digits  # noqa: E402
import windowed_rows  # noqa: E402

import evoplug  # noqa: E402
from evoplug.rewrite import maps  # noqa: E402
from evoplug.tools.bench import machine, provenance  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    _, _, xt, yt = digits.load_digits_tensors()
    torch.manual_seed(0)
    model = windowed_rows.trained("swin", log=None)
    dense = digits.accuracy(model, xt, yt)
    print(f"small Swin trained on digits: dense top-1 {dense:.2f}% ({len(yt)} test images)")
    rows, own = [], maps._subset_tokens
    for keep in (0.25, 0.35, 0.5, 0.7):
        now = digits.accuracy(evoplug.convert(model, keep_ratio=keep, example_input=xt[:1]), xt, yt)
        maps._subset_tokens = lambda rw, node: (None, [])
        try:
            before = digits.accuracy(evoplug.convert(model, keep_ratio=keep, example_input=xt[:1]), xt, yt)
        finally:
            maps._subset_tokens = own
        rows.append({"keep_ratio": keep, "representative_itself": now, "token_at_its_position": before})
        print(f"keep {keep}: the representative token itself {now:.2f}%, "
              f"the token at its position (before) {before:.2f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine(), "provenance": provenance(), "dense_top1": dense,
                       "test_images": len(yt), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
