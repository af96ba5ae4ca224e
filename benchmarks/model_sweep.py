"""Convert many timm models and check each the way the test suite checks its own models.

    python benchmarks/model_sweep.py --json docs/bench/timm_sweep.json     # the list below
    python benchmarks/model_sweep.py convit_tiny pit_ti_224                # any timm names

Each model runs in its own process (a crash, a hang or a leak stays there; ``--timeout``
seconds each), with random weights (seed 0) and its default input, batch 2, float32, on the
CPU. What is checked for a model that converts (``strict=True``, or ``strict=False`` when the
strict conversion is refused, which the row says):

* **keep 1.0** reproduces the original output through the identity fast path and through the
  selection machinery (``identity_fast_path=False``): max |diff| (bound 1e-5, as the suite's);
* **keep 0.5** gives the original output's shape, finite values, and evolves: every block
  planned to evolve runs fewer tokens than it has (``tokens_per_block``; one that runs them all
  was reached by no global scores);
* **batch independence** at keep 0.5: the first image alone gives what it gave in the batch of
  two (a selection or gather that mixes the images of a batch would not; bound 1e-4 relative);
* the original ``state_dict`` loads strictly into the converted model and back;
* **gradients** (train mode, keep 0.5, loss ``out.pow(2).mean()``): finite, and every parameter
  that gets a gradient in the original gets one in the converted model (a parameter that lost
  its gradient is a path the conversion cut).

A model evoplug refuses must be refused with ``ConversionError``/``EvoplugError`` naming the
module; any other exception out of ``convert`` is listed as ``error`` (a bug). Rows carry the
message. No timings but the conversion's own (speed is measured by ``evoplug bench``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

# One small variant per family of timm 1.0.31 that has attention somewhere (and some without
# a cls token, windows, pooling stages, hybrids, rotary embeddings, registers).
MODELS = [
    # flat ViTs
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
    "deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3",
    "vit_small_patch16_rope_224", "vit_small_patch16_rope_mixed_ape_224",
    "vit_relpos_small_patch16_224", "vit_relpos_small_patch16_rpn_224",
    "vit_little_patch16_reg1_gap_256", "vit_small_patch16_18x2_224", "flexivit_small",
    "vit_pe_core_tiny_patch16_384", "vit_tiny_r_s16_p8_224", "vit_small_resnet26d_224",
    "beit_base_patch16_224", "eva02_tiny_patch14_224", "cait_xxs24_224", "xcit_nano_12_p16_224",
    "convit_tiny", "crossvit_tiny_240", "tnt_s_patch16_224", "samvit_base_patch16_224",
    "test_vit", "test_vit2", "test_vit3", "test_vit4", "test_vit_relpos",
    # pyramids, windows, pooling stages
    "levit_128s", "levit_conv_128s", "pvt_v2_b0", "twins_pcpvt_small", "twins_svt_small",
    "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_ns_224",
    "swin_s3_tiny_224", "pit_ti_224", "pit_ti_distilled_224", "mvitv2_tiny", "hiera_tiny_224",
    "nest_tiny", "coat_lite_tiny", "volo_d1_224", "davit_tiny", "gcvit_xxtiny",
    "maxvit_tiny_tf_224", "test_maxvit", "coatnet_nano_rw_224", "test_coatnet",
    "efficientformer_l1", "efficientformerv2_s0", "efficientvit_m0", "efficientvit_b0",
    "fastvit_sa12", "caformer_s18", "nextvit_small", "tiny_vit_5m_224", "vitamin_small_224",
    "mobilevit_xxs", "mobilevitv2_050", "edgenext_xx_small", "iformer_t", "lowformer_b0",
]

KEEP1_BOUND = 1e-5
BATCH_BOUND = 1e-4


def _out(o):
    """The tensor a model returns (first item of a tuple/list/dict)."""
    if isinstance(o, (tuple, list)):
        return _out(o[0])
    if isinstance(o, dict):
        return _out(next(iter(o.values())))
    return o


def _diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def _grads(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    _out(model(x)).float().pow(2).mean().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    return got


def check(name: str) -> dict:
    """One model, in this process."""
    import torch
    import timm
    import evoplug

    torch.manual_seed(0)
    row = {"model": name}
    model = timm.create_model(name, pretrained=False).eval()
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    x = evoplug.example_input(model, batch=2)
    row["input"] = list(x.shape[1:])
    with torch.no_grad():
        ref = _out(model(x))
    t0 = time.perf_counter()
    try:
        fast = evoplug.convert(model, keep_ratio=0.5, example_input=x)
        row["strict"] = True
    except evoplug.EvoplugError as e:
        row["refused"] = f"{type(e).__name__}: {e}"
        try:
            fast = evoplug.convert(model, keep_ratio=0.5, example_input=x, strict=False)
            row["strict"] = False
        except evoplug.EvoplugError as e2:
            row["status"] = "refused"
            row["refused_non_strict"] = f"{type(e2).__name__}: {e2}"
            return row
    row["convert_s"] = round(time.perf_counter() - t0, 2)
    report = evoplug.get_report(fast)
    row["blocks"] = len(report.blocks)
    row["evolving"] = sum(s.role == "evolve" for s in report.blocks)
    row["not_converted"] = [f"{n}: {why}" for n, why in report.failed]
    problems = []
    with torch.no_grad():
        out = _out(fast(x))
        tokens = [(t, s.analysis.num_tokens) for (_, t), s in
                  zip(evoplug.tokens_per_block(fast), report.blocks) if s.role == "evolve"]
        row["tokens_evolving"] = tokens[:3]
        if out.shape != ref.shape or not bool(torch.isfinite(out).all()):
            problems.append(f"keep 0.5 output {tuple(out.shape)} vs {tuple(ref.shape)}, finite="
                            f"{bool(torch.isfinite(out).all())}")
        if not any(0 < t < n for t, n in tokens):
            problems.append("keep 0.5 evolves no block")
        idle = [s.analysis.name for s in report.blocks
                if s.role == "evolve" and s.tokens_run == s.analysis.num_tokens]
        if idle:
            problems.append(f"{len(idle)} evolving block(s) ran every token: {idle[:3]}")
        row["keep05_rel_change"] = round(float((out - ref).abs().mean() / ref.abs().mean()), 4)
        one = _out(fast(x[:1]))
        row["batch_diff"] = _diff(one, out[:1]) / max(float(out[:1].abs().max()), 1e-6)
        if row["batch_diff"] > BATCH_BOUND:
            problems.append(f"image 0 alone differs from image 0 in the batch by "
                            f"{row['batch_diff']:.2e} (relative)")
        evoplug.set_options(fast, keep_ratio=1.0)
        row["keep1_fast_diff"] = _diff(_out(fast(x)), ref)
        evoplug.set_options(fast, identity_fast_path=False)
        row["keep1_machinery_diff"] = _diff(_out(fast(x)), ref)
        for k in ("keep1_fast_diff", "keep1_machinery_diff"):
            if not row[k] <= KEEP1_BOUND:
                problems.append(f"{k} {row[k]:.2e} > {KEEP1_BOUND}")
        evoplug.set_options(fast, keep_ratio=0.5, identity_fast_path=True)
    try:
        fast.load_state_dict(model.state_dict(), strict=True)
        model.load_state_dict(fast.state_dict(), strict=True)
    except Exception as e:                         # noqa: BLE001 (reported)
        problems.append(f"state_dict: {e}"[:300])
    g_ref = _grads(model, x)
    g = _grads(fast, x)
    lost = sorted(set(g_ref) - set(g))
    if lost:
        problems.append(f"{len(lost)} parameters lost their gradient: {lost[:4]}")
    if not all(bool(torch.isfinite(t).all()) for t in g.values()):
        problems.append("non-finite gradients")
    row["problems"] = problems
    row["status"] = ("converts" if row["strict"] else "partly") if not problems else "WRONG"
    return row


def _worker(name: str) -> int:
    try:
        row = check(name)
    except Exception as e:                         # noqa: BLE001 (the row says it)
        tb = traceback.format_exc().strip().splitlines()
        row = {"model": name, "status": "error", "error": f"{type(e).__name__}: {e}"[:500],
               "where": tb[-3:-1]}
    print("ROW " + json.dumps(row), flush=True)
    return 0


def run(name: str, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    try:
        done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "timeout", "error": f"over {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    return {"model": name, "status": "crash", "error": (done.stderr or done.stdout)[-500:]}


def _line(r: dict) -> str:
    s = r["status"]
    if s in ("converts", "partly", "WRONG"):
        t = r.get("tokens_evolving") or [("-", "-")]
        what = (f"{r['evolving']}/{r['blocks']} evolving, tokens {t[0][0]}/{t[0][1]}, keep 1.0 "
                f"{r['keep1_fast_diff']:.1e}/{r['keep1_machinery_diff']:.1e}, batch "
                f"{r['batch_diff']:.1e}, {r['convert_s']} s")
        if r["problems"]:
            what += " | " + "; ".join(r["problems"])
        return what
    return (r.get("refused_non_strict") or r.get("error") or "")[:160]


def markdown(rows) -> str:
    """The rows as the table of docs/models.md."""
    out = ["| model | result | evolving / converted blocks | tokens run / tokens (first evolving "
           "block) | keep 1.0 max diff (fast path / machinery) | batch independence | why "
           "(refusal, or what was not converted) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] in ("converts", "partly", "WRONG"):
            t = (r.get("tokens_evolving") or [["-", "-"]])[0]
            why = "; ".join(r["problems"]) or "; ".join(x.split(":")[0] + ": " + x.split(": ", 1)[1][:90]
                                                          for x in r["not_converted"][:1]) or "-"
            if not r["strict"]:
                why = (f"strict: {r['refused'][:150]}" if not r["not_converted"] else why)
            out.append(f"| `{r['model']}` | {r['status']} | {r['evolving']} / {r['blocks']} | "
                       f"{t[0]} / {t[1]} | {r['keep1_fast_diff']:.0e} / {r['keep1_machinery_diff']:.0e} | "
                       f"{r['batch_diff']:.0e} | {why.replace('|', '/')} |")
        else:
            why = (r.get("refused_non_strict") or r.get("error") or "").split(": ", 1)[-1]
            if " in " in why.split(":")[0]:     # "... no convertible block in X: `a`: why; `b`: ..."
                why = why.split(": ", 1)[1].split("; `")[0]
            out.append(f"| `{r['model']}` | {r['status']} | - | - | - | - | {why[:200].replace('|', '/')} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=MODELS)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", help="write the rows here (with the machine and the code's commit)")
    p.add_argument("--markdown", help="print the table of docs/models.md from this JSON and exit")
    a = p.parse_args(argv)
    if a.one:
        return _worker(a.one)
    if a.markdown:
        with open(a.markdown) as f:
            print(markdown(json.load(f)["rows"]), end="")
        return 0
    from evoplug.tools import bench
    rows = []
    for name in a.models:
        r = run(name, a.timeout)
        rows.append(r)
        print(f"{name:<38} {r['status']:<9} {_line(r)}", flush=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    print("summary:", ", ".join(f"{v} {k}" for k, v in counts.items()))
    if a.json:
        import timm
        import torch
        with open(a.json, "w") as f:
            json.dump(dict(machine=bench.machine("cpu"), provenance=bench.provenance(),
                           versions=dict(torch=torch.__version__, timm=timm.__version__),
                           settings=dict(batch=2, dtype="float32", weights="random, seed 0",
                                         keep=0.5, keep1_bound=KEEP1_BOUND,
                                         batch_bound=BATCH_BOUND),
                           summary=counts, rows=rows), f, indent=1)
    return 1 if any(r["status"] in ("WRONG", "error", "crash") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
