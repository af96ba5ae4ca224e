"""How close the k-th and (k+1)-th global scores are, and what that does to compiled outputs.

    python benchmarks/selection_margin.py --json docs/bench/selection_margin.json

With random weights a model's attention is nearly uniform, so the global scores of the tokens
at the top-k boundary can differ in the 6th or 7th digit; float rounding alone (Inductor's other
summation order) then swaps boundary tokens and the output at keep 0.5 changes a lot. This
script converts timm's PVTv2-b0 (random weights, seed 0) as it is and with its attention
queries' weights scaled (peaked attention, larger margins) and reports, for each: the smallest
relative margin ``(s_k - s_{k+1}) / s_k`` at every selection of one eager forward, the compiled
(Inductor) output against the eager one, and the eager output's change under input noise of
1e-3 of the input's scale (what :func:`evoplug.tools.check.check_conversion` measures as
``noise_change``). All relative to the output's largest value; batch 2, float32, CPU.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import timm

import evoplug
from evoplug.runtime import evolve as ev
from evoplug.tools import bench


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / float(b.abs().max())


def measure(name: str, q_scale: float) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("attn.q.weight"):
                p.mul_(q_scale)
    x = evoplug.example_input(model, batch=2)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    margins, select = [], ev.select

    def spy(g, k, num_prefix, *args, **kwargs):     # records, then selects as always
        s = g[..., num_prefix:].float()
        top = s.topk(k + 1, dim=-1).values
        margins.append(float(((top[..., k - 1] - top[..., k]) / top[..., k - 1]).min()))
        return select(g, k, num_prefix, *args, **kwargs)
    ev.select = spy
    try:
        with torch.no_grad():
            eager = fast(x)
    finally:
        ev.select = select
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        noisy = fast(x + noise * 1e-3 * x.std())
        torch._dynamo.reset()
        compiled = torch.compile(fast)(x)
    torch._dynamo.reset()
    return {"model": name, "q_weight_scale": q_scale, "min_rel_margin_per_selection": margins,
            "compiled_vs_eager": _rel(compiled, eager), "noise_1e-3_change": _rel(noisy, eager)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pvt_v2_b0")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 30.0])
    p.add_argument("--json")
    a = p.parse_args(argv)
    rows = []
    for s in a.scales:
        r = measure(a.model, s)
        rows.append(r)
        print(f"{r['model']} q x{s:g}: min margins {['%.1e' % m for m in r['min_rel_margin_per_selection']]}, "
              f"compiled vs eager {r['compiled_vs_eager']:.1e}, noise 1e-3 -> {r['noise_1e-3_change']:.1e}",
              flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(machine=bench.machine("cpu"), provenance=bench.provenance(),
                           settings=dict(batch=2, dtype="float32", keep=0.5, weights="random, seed 0",
                                         compile="torch.compile default (Inductor)"),
                           rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
