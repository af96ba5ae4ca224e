"""Fuzz evoplug on random hand-written flat ViTs (benchmarks/fuzz_flat_models.py: fused or
separate q/k/v, SDPA or explicit softmax with or without an upcast, einsum, every usual head
split, pre-/post-norm and parallel blocks, layer scale, qk-norm, attention biases, prefix tokens
of every kind, nn.MultiheadAttention, extra block arguments and tuple outputs) against its
independent Evo-ViT reference. For each seed: convert with the seed's options (refusals
recorded with their reason), keep 0.5 (or the seed's keep) against the reference relative to
the output's scale, keep 1.0 against the model on the fast path and through the machinery.

    python benchmarks/fuzz_flat.py 0 300 --json docs/bench/fuzz_flat_r1.json
    python benchmarks/fuzz_flat.py 1000 1250 --json docs/bench/fuzz_flat_v2.json
    python benchmarks/fuzz_flat.py 2000 2400 --grads --json docs/bench/fuzz_flat_grads.json

``--grads`` also compares a training step's gradients with the reference's (fuzz_grads.py).
"""
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_flat_models as ff  # noqa: E402
import fuzz_grads  # noqa: E402
from fuzz_summary import fuzz_parser, summarise  # noqa: E402

import evoplug  # noqa: E402


def one(seed, keep=None, reselect=None, start="cfg", grads=False):
    model, x, cfg = ff.build(seed)
    keep = cfg["keep"] if keep is None else keep
    reselect = cfg["reselect"] if reselect is None else reselect
    start = cfg["start"] if start == "cfg" else start
    rec = {"seed": seed, "keep": keep, "reselect": reselect, "start": start,
           "cfg": {k: v for k, v in cfg.items() if k != "seed"}}
    with torch.no_grad():
        dense = model(x)
        scale = dense.abs().max().item()
        rec["ref_block_check"] = ff.check_ref(model, x)
        rec["ref_keep1_vs_dense"] = (ff.reference(model, x, 1.0) - dense).abs().max().item() / scale
        opts = dict(reselect_every=reselect)
        alpha, rep = cfg.get("trade_off", 0.5), cfg.get("representative", True)
        if seed >= 1000:
            opts.update(trade_off=alpha, representative=rep)
        if start is not None:
            opts["start_block"] = start
        try:
            fast = evoplug.convert(model, keep_ratio=keep, example_input=x[:1], **opts)
        except evoplug.ConversionError as e:
            fl = [(m, r[:200]) for m, r in e.failures] if e.failures else None
            return dict(rec, status="refused", failures=fl, message=str(e)[:400])
        out = fast(x)
        info = {}
        ref = ff.reference(model, x, keep, reselect, start, alpha=alpha, representative=rep, info=info)
        rec.update(status="converted",
                   roles=[b.role for b in evoplug.get_report(fast).blocks],
                   keep_vs_reference=(out - ref).abs().max().item() / scale,
                   keep_vs_dense=(out - dense).abs().max().item() / scale,
                   min_margin=min(info["margins"], default=None))
        evoplug.set_keep_ratio(fast, 1.0)
        rec["keep1_fast_path"] = (fast(x) - dense).abs().max().item() / scale
        evoplug.set_options(fast, identity_fast_path=False)
        rec["keep1_machinery"] = (fast(x) - dense).abs().max().item() / scale
    if grads:
        rec.update(fuzz_grads.record(
            model, x, lambda m, x: evoplug.convert(m, keep_ratio=keep, example_input=x[:1], **opts),
            lambda m, x: ff.reference(m, x, keep, reselect, start, alpha=alpha,
                                      representative=rep, grad=True)))
    return rec


def main():
    p = fuzz_parser(__doc__)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows, t0 = [], time.time()
    for seed in range(a.start, a.end):
        ts = time.time()
        try:
            r = one(seed, grads=a.grads)
        except Exception as e:  # noqa: BLE001
            r = {"seed": seed, "status": "crash", "error": f"{type(e).__name__}: {e}"[:400],
                 "tb": traceback.format_exc()[-1500:]}
        r["secs"] = round(time.time() - ts, 2)
        rows.append(r)
        print(seed, r["status"], {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()
                                  if k in ("keep_vs_reference", "keep1_fast_path", "keep1_machinery",
                                           "ref_keep1_vs_dense", "grad_vs_reference", "grad_ok",
                                           "error", "secs")},
              (r.get("failures") or [""])[0] if r["status"] == "refused" else "", flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"rows": rows}, f, indent=1, default=str)
    summary = summarise(rows, "keep_vs_reference", "mismatch_over_1e-4",
                        lambda r: str((r.get("failures") or [("", r.get("message", ""))])[0][1]), digits=5)
    summary["ref_keep1_max"] = max((r["ref_keep1_vs_dense"] for r in rows if "ref_keep1_vs_dense" in r),
                                   default=None)
    summary["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(summary, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": {"seeds": [a.start, a.end], "torch": torch.__version__,
                                    "commit": _commit(), "threads": 1, "grads": a.grads,
                                    "machine": platform.processor() or platform.machine(),
                                    "seconds": summary["seconds"]},
                       "summary": summary, "rows": rows}, f, indent=1, default=str)


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


if __name__ == "__main__":
    main()
