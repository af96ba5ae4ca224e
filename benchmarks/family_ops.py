"""Extra ATen ops per evolving block across the families that convert, with the op names that
add them (converted minus original, per op name): where a family's runtime dispatches more than
DeiT-S's and what those ops are.

    python benchmarks/family_ops.py                    # every family, default options
    python benchmarks/family_ops.py beit eva02 --reselect-every 1 --top 20

Random weights, eval, ``torch.no_grad``, batch 2, keep 0.5; the models narrowed (width, depth
where the per-block structure does not change; 12 blocks for the flat ones so that the blocks
between selections count as in DeiT-S) so that the counting forwards are fast. The count is
deterministic (a ``TorchDispatchMode``): it does not depend on the machine.
"""
from __future__ import annotations

import argparse
import collections

import torch

from evoplug.tools.bench import OpCounter


def _timm(name, size, **kw):
    def make():
        import timm
        return timm.create_model(name, pretrained=False, **kw), size
    return make


def _hf(cls, cfg, size, **kw):
    def make():
        import transformers as T
        return getattr(T, cls)(getattr(T, cfg)(**kw)), size
    return make


_HF_FLAT = dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=2, intermediate_size=128,
                image_size=56, patch_size=4)

#: short name -> builder of (model, image size)
FAMILIES = {
    "deit": _timm("deit_small_patch16_224", 224, embed_dim=96),
    "dinov2-reg": _timm("vit_small_patch14_reg4_dinov2", 224, img_size=224, embed_dim=96),
    "beit": _timm("beit_base_patch16_224", 224, depth=12, embed_dim=96),
    "eva02": _timm("eva02_tiny_patch14_224", 224, embed_dim=96, num_heads=3),
    "cait": _timm("cait_xxs24_224", 224, depth=12, embed_dim=96),
    "deit-distilled": _timm("deit_small_distilled_patch16_224", 224, embed_dim=96),
    "vit-rope": _timm("vit_small_patch16_rope_224", 224, embed_dim=96),
    "vit-rope-mixed": _timm("vit_small_patch16_rope_mixed_224", 224, embed_dim=96),
    "twins-svt": _timm("twins_svt_small", 224, embed_dims=(16, 32, 64, 128)),
    "pvt-v2": _timm("pvt_v2_b0", 64),
    "swin": _timm("swin_tiny_patch4_window7_224", 224, embed_dim=48),
    "levit": _timm("levit_128s", 224),
    "levit-conv": _timm("levit_conv_128s", 224),
    "hf-vit": _hf("ViTModel", "ViTConfig", 56, **_HF_FLAT),
    "hf-dinov2": _hf("Dinov2Model", "Dinov2Config", 56, **_HF_FLAT),
    "hf-beit": _hf("BeitModel", "BeitConfig", 56, use_relative_position_bias=True, **_HF_FLAT),
    "hf-beit-shared": _hf("BeitModel", "BeitConfig", 56, use_shared_relative_position_bias=True, **_HF_FLAT),
    "hf-swin": _hf("SwinModel", "SwinConfig", 224, embed_dim=32, depths=[2, 2, 6, 2], num_heads=[1, 2, 4, 8],
                   window_size=7, patch_size=4),
}


def count(model, x) -> collections.Counter:
    with torch.no_grad(), OpCounter() as c:
        model(x)
    return c.ops


def measure(name: str, opts: dict, top: int):
    import evoplug
    torch.manual_seed(0)
    dense, size = FAMILIES[name]()
    dense.eval()
    x = torch.randn(2, 3, size, size)
    fast = evoplug.convert(dense, keep_ratio=0.5, example_input=x[:1], **opts)
    evolving = sum(s.role == "evolve" for s in evoplug.get_report(fast).blocks)
    with torch.no_grad():
        fast(x)                                  # constants made once per device
    base, ops = count(dense, x), count(fast, x)
    diff = {k: ops.get(k, 0) - base.get(k, 0) for k in set(ops) | set(base)}
    diff = {k: v for k, v in diff.items() if v}
    extra = (sum(ops.values()) - sum(base.values())) / max(evolving, 1)
    names = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]
    per = ", ".join(f"{k} {v / max(evolving, 1):+.2f}" for k, v in names)
    print(f"{name:16s} {extra:6.2f} extra ops/evolving block ({evolving} evolving; "
          f"{sum(base.values())} -> {sum(ops.values())})\n    {per}", flush=True)
    return extra


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("families", nargs="*", default=list(FAMILIES))
    p.add_argument("--reselect-every", type=int, default=None)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--form", choices=("gpu", "cpu"), default="gpu",
                   help="the runtime's forms counted: a GPU's (gathers, pair terms by one index; "
                        "the forms tests/test_op_budget.py's budgets count) or a CPU's (rows "
                        "copied by index_select, pair terms by two gathers; gather._ROW_SELECT)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from evoplug.runtime import gather
    gather._ROW_SELECT = a.form == "cpu"
    opts = {} if a.reselect_every is None else dict(reselect_every=a.reselect_every)
    for name in a.families:
        try:
            measure(name, opts, a.top)
        except Exception as e:                   # a family that does not convert: say so, go on
            print(f"{name:16s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
