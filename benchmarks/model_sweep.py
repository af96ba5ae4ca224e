"""Convert many timm and transformers models and check each the way the test suite checks its
own models.

    python benchmarks/model_sweep.py --json docs/bench/timm_sweep.json     # the timm list below
    python benchmarks/model_sweep.py convit_tiny pit_ti_224                # any timm names
    python benchmarks/model_sweep.py --transformers --json docs/bench/hf_sweep.json
    python benchmarks/model_sweep.py hf:vit hf:sam_vision_model            # transformers model types

``hf:TYPE`` is a transformers model type built as users build one without the hub: its default
configuration (``AutoConfig.for_model``), the image-classification class when transformers maps
one, else ``AutoModel`` (a vision tower's own class where ``AutoModel`` has none), with at most
12 layers; the input is the size the configuration declares (224 where it declares none).

Each model runs in its own process (a crash, a hang or a leak stays there; ``--timeout``
seconds each), with random weights (seed 0), through :func:`evoplug.tools.check.check_conversion`
(the checks the test suite makes on its own models: keep 1.0 exact on both paths, every
evolving block runs fewer tokens at keep 0.5, batch independence, ``state_dict`` both ways,
gradients reach every parameter; its docstring has the bounds), batch 2, float32, on the CPU.
``strict=False`` is tried when the strict conversion is refused ('partly' in the rows).

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

# transformers 5.23 model types whose model takes an image batch (``pixel_values``) alone:
# classifiers, vision towers of multimodal models, backbones of dense-task models.
HF_MODELS = [
    "hf:vit", "hf:deit", "hf:beit", "hf:data2vec-vision", "hf:dinov2", "hf:dinov2_with_registers",
    "hf:dinov3_vit", "hf:ijepa", "hf:vit_msn", "hf:clip", "hf:siglip", "hf:metaclip_2",
    "hf:aimv2_vision_model", "hf:mlcd_vision_model", "hf:blip_vision_model", "hf:git_vision_model",
    "hf:groupvit_vision_model", "hf:owlvit_vision_model", "hf:owlv2_vision_model",
    "hf:chinese_clip_vision_model", "hf:altclip_vision_model", "hf:clipseg_vision_model",
    "hf:idefics3_vision", "hf:internvl_vision", "hf:janus_vision_model", "hf:tipsv2_vision_model",
    "hf:swin", "hf:swinv2", "hf:donut-swin", "hf:pvt", "hf:pvt_v2", "hf:segformer", "hf:levit",
    "hf:cvt", "hf:mobilevit", "hf:mobilevitv2", "hf:swiftformer", "hf:hiera", "hf:focalnet",
    "hf:poolformer", "hf:vitdet", "hf:sam_vision_model", "hf:sam2_vision_model", "hf:dpt",
    "hf:yolos", "hf:eomt",
]


#: transformers configurations deeper than this are built with this many layers (the row says so)
MAX_LAYERS = 12


def build(name: str):
    """A timm name, or ``hf:TYPE`` (see the module's docstring), with random weights."""
    if not name.startswith("hf:"):
        import timm
        return timm.create_model(name, pretrained=False)
    import transformers as T
    from transformers.models.auto import modeling_auto
    kind = name[3:]
    config = T.AutoConfig.for_model(kind)
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > MAX_LAYERS:      # MLCD's 48 would not fit in memory
        config.num_hidden_layers = MAX_LAYERS
    names = modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(kind)
    if names is not None:
        return getattr(T, names if isinstance(names, str) else names[0])(config)   # LeViT: two
    if kind in modeling_auto.MODEL_MAPPING_NAMES:
        return T.AutoModel.from_config(config)
    if kind in modeling_auto.MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES:           # EoMT
        return T.AutoModelForUniversalSegmentation.from_config(config)
    return getattr(T, type(config).__name__[:-len("Config")] + "Model")(config)    # BlipVisionModel


def check(name: str, compile_backend=None) -> dict:
    """One model, in this process: :func:`evoplug.tools.check.check_conversion` as a row."""
    import dataclasses
    import torch
    import evoplug
    from evoplug.tools.check import check_conversion

    torch.manual_seed(0)
    model = build(name).eval()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Linear) and not bool(head.weight.any()):
        torch.nn.init.normal_(head.weight, std=0.02)   # zero-initialised (Hiera): outputs all 0
    row = {"model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    if name.startswith("hf:"):
        row["class"] = type(model).__name__
    x = None
    if evoplug.input_size(model) is None:      # CvT's configuration names no image size
        x = evoplug.example_input(model, batch=2, size=224)
        row["input"] = "224 x 224 (the model declares no size)"
    result = check_conversion(model, example_input=x, compile=compile_backend)
    row.update(dataclasses.asdict(result))
    row["tokens_evolving"] = row["tokens_evolving"][:3]
    return row


def _worker(name: str, compile_backend=None) -> int:
    try:
        row = check(name, compile_backend)
    except Exception as e:                         # noqa: BLE001 (the row says it)
        tb = traceback.format_exc().strip().splitlines()
        row = {"model": name, "status": "error", "error": f"{type(e).__name__}: {e}"[:500],
               "where": tb[-3:-1]}
    print("ROW " + json.dumps(row), flush=True)
    return 0


def run(name: str, timeout: float, compile_backend=None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    try:
        more = ["--compile", compile_backend] if compile_backend else []
        done = subprocess.run([sys.executable, __file__, "--one", name, *more], capture_output=True,
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
                f"{r['keep1_fast_diff']:.1e}/{r['keep1_machinery_diff']:.1e}, grads "
                f"{r.get('keep1_grad_diff', float('nan')):.1e}, batch "
                f"{r['batch_diff']:.1e}, {r['convert_s']:.1f} s")
        if r.get("graphs"):
            what += f", compile: {r['graphs']} graph(s), {r['compile_diff']:.1e}"
        if r["problems"] or r.get("warnings"):
            what += " | " + "; ".join(r["problems"] + r.get("warnings", []))
        return what
    return (r.get("refused") or r.get("error") or "")[:160]


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
            if r["status"] == "partly" and not r["not_converted"]:
                why = f"strict: {r['refused'][:150]}"
            out.append(f"| `{r['model']}` | {r['status']} | {r['evolving']} / {r['blocks']} | "
                       f"{t[0]} / {t[1]} | {r['keep1_fast_diff']:.0e} / {r['keep1_machinery_diff']:.0e} | "
                       f"{r['batch_diff']:.0e} | {why.replace('|', '/').replace(chr(10), ' ')} |")
        else:
            why = (r.get("refused") or r.get("error") or "").split(": ", 1)[-1]
            if " in " in why.split(":")[0]:     # "... no convertible block in X: `a`: why; `b`: ..."
                why = why.split(": ", 1)[1].split("; `")[0]
            out.append(f"| `{r['model']}` | {r['status']} | - | - | - | - | {why[:200].replace('|', '/').replace(chr(10), ' ')} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*")
    p.add_argument("--transformers", action="store_true", help="the transformers list (hf:TYPE names)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", help="write the rows here (with the machine and the code's commit)")
    p.add_argument("--markdown", help="print the table of docs/models.md from this JSON and exit")
    p.add_argument("--compile", metavar="BACKEND", help="also torch.compile each converted model "
                   "with this backend (inductor, aot_eager): graphs, breaks, compiled vs eager")
    a = p.parse_args(argv)
    if a.one:
        return _worker(a.one, a.compile)
    if a.markdown:
        with open(a.markdown) as f:
            print(markdown(json.load(f)["rows"]), end="")
        return 0
    from evoplug.tools import bench
    rows = []
    for name in a.models or (HF_MODELS if a.transformers else MODELS):
        r = run(name, a.timeout, a.compile)
        rows.append(r)
        print(f"{name:<38} {r['status']:<9} {_line(r)}", flush=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    print("summary:", ", ".join(f"{v} {k}" for k, v in counts.items()))
    if a.json:
        import timm
        import torch
        import transformers
        with open(a.json, "w") as f:
            json.dump(dict(machine=bench.machine("cpu"), provenance=bench.provenance(),
                           versions=dict(torch=torch.__version__, timm=timm.__version__,
                                         transformers=transformers.__version__),
                           settings=dict(batch=2, dtype="float32", weights="random, seed 0",
                                         keep=0.5, keep1_bound=1e-5, batch_bound=1e-4,
                                         compile=a.compile),
                           summary=counts, rows=rows), f, indent=1)
    return 1 if any(r["status"] in ("WRONG", "error", "crash") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
