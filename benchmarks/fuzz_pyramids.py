"""Fuzz evoplug on random hand-written pyramids and windowed models against an independent
Evo-ViT reference (benchmarks/fuzz_pyramid_models.py: Swin-like windows, shifted or padded, with
relative position bias, in channels-last, (B, N, C) + (H, W) and grid-attribute layouts;
PVT-like spatial reduction, Mix-FFN, position convs, patch merging or strided convs, a class
token or none, layer scale, pre/post norm; with ``--cpe``, a convolutional position encoding in
some blocks). For each seed: convert at ``--keep`` (0.5; refusals are recorded with their
reason), keep 1.0 against the model itself (fast path and machinery, absolute), ``--keep``
against the reference, relative to the output's scale (``keep_vs_reference``; with the smallest
relative gap at a selection's cut, ``min_margin``: 0 is a tie the two may break apart).

    python benchmarks/fuzz_pyramids.py 0 250 --json docs/bench/fuzz_pyramids_r1.json
    python benchmarks/fuzz_pyramids.py 250 350 --reselect 4 --json docs/bench/fuzz_pyramids_r4.json
    python benchmarks/fuzz_pyramids.py 500 700 --keep 0.3 --json docs/bench/fuzz_pyramids_k03.json
    python benchmarks/fuzz_pyramids.py 1000 1250 --cpe --json docs/bench/fuzz_pyramids_cpe.json
    python benchmarks/fuzz_pyramids.py 500 750 --grads --json docs/bench/fuzz_pyramids_grads.json

``--grads`` also compares a training step's gradients with the reference's (fuzz_grads.py).

The reference runs every windowed block as windows on the full map, as docs/models.md says
evoplug does for blocks that cut their windows themselves (its own flag would run a
channels-last single window as attention over the kept tokens)."""
import json
import os
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_grads  # noqa: E402
import fuzz_pyramid_models as pyr  # noqa: E402
from fuzz_summary import fuzz_parser, summarise  # noqa: E402

import evoplug  # noqa: E402

pyr.WinBlock.single_window = property(lambda self: False)


def one(seed: int, reselect: int, keep: float = 0.5, cpe: bool = False,
        grads: bool = False) -> dict:
    rec = {"seed": seed}
    model, x, cfg = pyr.build(seed, allow_cpe=cpe)
    with torch.no_grad():
        dense = model(x)
        try:
            fast = evoplug.convert(model, keep_ratio=keep, example_input=x[:1],
                                   reselect_every=reselect)
        except evoplug.ConversionError as e:
            return dict(rec, status="refused", reason=(e.failures[0][1] if e.failures else str(e))[:200])
        out = fast(x)
        ref, _ = pyr.reference(model, x, keep, reselect)
        scale = dense.abs().max().item()
        rec.update(status="converted", roles=[s.role for s in evoplug.get_report(fast).blocks],
                   keep_vs_reference=(out - ref).abs().max().item() / scale,
                   keep_vs_dense=(out - dense).abs().max().item() / scale,
                   min_margin=min(pyr.MARGINS, default=None))
        evoplug.set_keep_ratio(fast, 1.0)
        rec["keep1_fast_path"] = (fast(x) - dense).abs().max().item()
        evoplug.set_options(fast, identity_fast_path=False)
        rec["keep1_machinery"] = (fast(x) - dense).abs().max().item()
    if grads:
        rec.update(fuzz_grads.record(
            model, x, lambda m, x: evoplug.convert(m, keep_ratio=keep, example_input=x[:1],
                                                   reselect_every=reselect),
            lambda m, x: pyr.reference(m, x, keep, reselect)[0]))
    return rec


def main():
    p = fuzz_parser(__doc__)
    p.add_argument("--reselect", type=int, default=1)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--cpe", action="store_true",
                   help="blocks may add a convolutional position encoding (CPE) of their map")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows, t0 = [], time.time()
    for seed in range(a.start, a.end):
        try:
            rows.append(one(seed, a.reselect, a.keep, a.cpe, a.grads))
        except Exception as e:      # noqa: BLE001 - a crash is a finding, recorded
            rows.append({"seed": seed, "status": "crash", "error": f"{type(e).__name__}: {e}"[:300]})
    summary = summarise(rows, "keep_vs_reference", "keep_vs_reference_over_1e-4",
                        lambda r: r["reason"].split(" (")[0])
    print(json.dumps(summary, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": {"seeds": [a.start, a.end], "keep_ratio": a.keep, "cpe": a.cpe,
                                    "grads": a.grads,
                                    "reselect_every": a.reselect, "torch": torch.__version__,
                                    "evoplug": evoplug.__version__ if hasattr(evoplug, "__version__") else None,
                                    "machine": platform.processor() or platform.machine(),
                                    "threads": 1, "seconds": round(time.time() - t0, 1)},
                       "summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
