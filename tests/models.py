"""The models the core must convert, at small inputs where the model allows."""
import io
import math

import timm
import torch
from torch import nn

from plain_vit import PlainViT

# name -> (factory kwargs, input size, expected prefix tokens); 6 blocks (of 12, CaiT's 24): the
# families' blocks as they are, at half the suite's time
TIMM_MODELS = {
    "vit_tiny_patch16_224": (dict(depth=6), 224, 1),
    "vit_small_patch16_224": (dict(img_size=112, depth=6), 112, 1),
    "vit_base_patch16_224": (dict(img_size=64, depth=6), 64, 1),
    "deit_tiny_patch16_224": (dict(depth=6), 224, 1),
    "deit_small_patch16_224": (dict(img_size=112, depth=6), 112, 1),
    "deit_tiny_distilled_patch16_224": (dict(img_size=112, depth=6), 112, 2),
    "deit3_small_patch16_224": (dict(img_size=112, depth=6), 112, 1),
    "beit_base_patch16_224": (dict(img_size=64, depth=6), 64, 1),
    "eva02_tiny_patch14_224": (dict(depth=6), 224, 1),
    "cait_xxs24_224": (dict(img_size=112, depth=6), 112, 0),
    "vit_small_patch14_reg4_dinov2": (dict(img_size=56, depth=6), 56, 5),
}


def build(name, **extra):
    if name == "plain_vit":
        return PlainViT(**extra), 32, 1
    kwargs, size, prefix = TIMM_MODELS[name]
    return timm.create_model(name, pretrained=False, **dict(kwargs, **extra)), size, prefix


ALL = list(TIMM_MODELS) + ["plain_vit"]


class QKVAttention(nn.Module):
    """Multi-head self-attention from one fused ``qkv`` linear and an explicit softmax, timm's
    layout (the tests' hand-written blocks)."""

    def __init__(self, dim: int = 32, heads: int = 2):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def sharp_tiny_vit(seed: int = 0, dynamic_img_size: bool = False, depth: int = 4) -> nn.Module:
    """A ``depth``-block (4) timm ViT at 32 px (16 patches, dim 32) in eval mode, its qkv weights
    scaled up so that keep 0.5 differs clearly from the dense model (``dynamic_img_size``:
    callable at other sizes)."""
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                          embed_dim=32, depth=depth, num_heads=2, num_classes=5,
                          dynamic_img_size=dynamic_img_size).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    return m


def peaky_weights(model: nn.Module, seed: int = 0, fused: bool = True, qkv_rows: int = 3 * 64,
                  others: float = 0.5) -> nn.Module:
    """Random weights that make the attention peaky (qkv weights of ``qkv_rows`` outputs at gain
    2), LayerNorm weights near 1, small biases; every other parameter (cls token, positions,
    relative-position tables) ``others`` * N(0, 1); ``fused`` sets timm's ``fused_attn``. The
    math references (test_math.py, test_sam.py) need attention far from uniform, so a wrong
    selection shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = fused
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, (nn.Linear, nn.Conv2d)) and name == "weight":
                    gain = 2.0 if p.shape[0] == qkv_rows else 1.0
                    p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p[0].numel()))
                elif isinstance(m, nn.LayerNorm) and name == "weight":
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                elif name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(others * torch.randn(p.shape, generator=g))
    return model.eval()


def run_in_a_fresh_process(tmp_path, saved: dict, body: str, setup: str = "") -> str:
    """``saved`` written with ``torch.save`` and loaded as ``d`` in a new Python process (with the
    same torch thread count as this one: the same sums), after ``setup``; ``body`` runs there.
    Returns what it printed; a failure there fails here with its traceback."""
    import os
    import subprocess
    import sys
    torch.save(saved, tmp_path / "saved.pt")
    code = (f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n{setup}"
            f"d = torch.load({str(tmp_path / 'saved.pt')!r}, weights_only=False)\n{body}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def saved_and_loaded(model: nn.Module) -> nn.Module:
    """``model`` through ``torch.save`` and ``torch.load`` (the whole module, in memory)."""
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)
