"""What the trade-off alpha changes: the global attention update g = (1 - alpha) g + alpha a.

Evo-ViT refreshes only the scores of the tokens a block ran (the prefix and the kept tokens;
docs/architecture.md, the paper's rule and the authors' code); the others keep theirs. The
scores of a block run on half the tokens are larger than those over all of them (a softmax over
fewer keys), so a kept token tends to stay kept whatever alpha is, and alpha = 0 freezes the
kept set at the first selection. This study measures how much: on the small DeiT trained on
scikit-learn's digits (examples/digits.py; 359 test images; cached in bench_out/), for alpha in
0, 0.25, 0.5 (the default), 0.75, 1, keep_ratio 0.5 and 0.25 and reselect_every 1 and 2, it
reports

- churn: the fraction of the kept patch tokens of a selection that the previous selection did
  not keep (mean over the images, then over the selections after the first);
- top-1 and agreement with the dense model's prediction.

A learnable trade-off gets its gradient only through the tokens that leave the kept set (their
refreshed scores then weight the representative token), so churn is also the part of a
selection through which alpha can learn.

    python benchmarks/trade_off.py                       # writes docs/bench/trade_off.json

One deterministic run per setting (CPU, fp32): no seeds to average.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import reselect  # noqa: E402  (digits_data, predictions, provenance, write_json, markdown)

import evoplug  # noqa: E402
from evoplug.runtime import evolve  # noqa: E402

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
KEEPS = (0.5, 0.25)
RESELECT = (1, 2)


class KeptSets:
    """Records the kept patch tokens of every selection (wraps ``evolve.select``)."""

    def __init__(self):
        self.sets, self._select = [], evolve.select

    def __enter__(self):
        def spy(g, k, num_prefix, *args):
            sel = self._select(g, k, num_prefix, *args)
            self.sets.append(sel.top[:, 0, num_prefix:].clone())
            return sel
        evolve.select = spy
        return self

    def __exit__(self, *exc):
        evolve.select = self._select


def churn(sets) -> float:
    """Mean fraction of a selection's kept tokens that the previous one did not keep."""
    fracs = []
    for a, b in zip(sets, sets[1:]):
        k = a.shape[1]
        same = [len(set(a[i].tolist()) & set(b[i].tolist())) for i in range(a.shape[0])]
        fracs.append(1.0 - sum(same) / (k * a.shape[0]))
    return round(100.0 * sum(fracs) / len(fracs), 2) if fracs else 0.0


def run(x, y, model) -> list:
    dense = reselect.predictions(model, x)
    rows = []
    for keep in KEEPS:
        for every in RESELECT:
            for alpha in ALPHAS:
                fast = evoplug.convert(model, keep_ratio=keep, example_input=x[:1],
                                       reselect_every=every, trade_off=alpha)
                with KeptSets() as rec, torch.no_grad():
                    pred = fast.eval()(x).argmax(-1)        # one batch: one run of selections
                rows.append(dict(keep_ratio=keep, reselect_every=every, trade_off=alpha,
                                 selections=len(rec.sets), churn=churn(rec.sets),
                                 top1=reselect.pct(pred == y), agreement=reselect.pct(pred == dense)))
                print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "trade_off.json"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model, x, y, desc = reselect.digits_data()
    rows = run(x, y, model)
    header = ["keep_ratio", "reselect_every", "trade_off", "selections", "churn %", "top-1 %",
              "agreement %"]
    table = reselect.markdown(header, [[r["keep_ratio"], r["reselect_every"], r["trade_off"],
                                        r["selections"], r["churn"], r["top1"], r["agreement"]]
                                       for r in rows])
    dense_top1 = reselect.pct(reselect.predictions(model, x) == y)
    print(f"\n{desc}; dense top-1 {dense_top1}%\n\n{table}")
    reselect.write_json(a.json, dict(provenance=reselect.provenance(desc), dense_top1=dense_top1,
                                     rows=rows))


if __name__ == "__main__":
    main()
