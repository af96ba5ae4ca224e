"""Blocks written with einops (lucidrains' vit-pytorch and much research code): its functions
and layers do their shape arithmetic in Python, which torch.fx's proxies cannot give them, and
every such block was refused ("torch.fx could not trace the block: Tensor type unknown to
einops": audit Q5 of the twenty-eighth session). The tracer keeps them whole
(``integrations/einops.py``); they run on the kept tokens as einops runs them on any tensor."""
import einops
import pytest
import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

import evoplug


class Attention(nn.Module):
    """vit-pytorch's attention: heads split by ``rearrange`` (imported by name, and by the
    package's name), or by a ``Rearrange`` layer, logits by ``einops.einsum``; ``plain``: the same
    with torch's reshapes and matmuls."""

    def __init__(self, dim=32, heads=4, form="functions"):
        super().__init__()
        self.heads, self.form, self.scale = heads, form, (dim // heads) ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.split = Rearrange("b n (h d) -> b h n d", h=heads)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        if self.form == "plain":
            B, n, C = x.shape
            q, k, v = (t.reshape(B, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            out = ((q @ k.transpose(-1, -2)) * self.scale).softmax(-1) @ v
            return self.to_out(out.transpose(1, 2).reshape(B, n, C))
        if self.form == "layer":
            q, k, v = self.split(q), self.split(k), self.split(v)
        else:
            q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        attn = (einops.einsum(q, k, "b h i d, b h j d -> b h i j") * self.scale).softmax(-1)
        out = einops.einsum(attn, v, "b h i j, b h j d -> b h i d")
        return self.to_out(einops.rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    def __init__(self, dim=32, form="functions"):
        super().__init__()
        self.attn = Attention(dim, form=form)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = self.attn(x) + x
        return self.ff(x) + x


class EinopsViT(nn.Module):
    """vit-pytorch's patch embedding (a ``Rearrange`` layer) and class token (``einops.repeat``)."""

    def __init__(self, form, dim=32, depth=4, patch=8):
        super().__init__()
        self.embed = nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch),
                                   nn.Linear(3 * patch * patch, dim))
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = nn.ModuleList([Block(dim, form) for _ in range(depth)])
        self.head = nn.Linear(dim, 10)

    def forward(self, img):
        x = self.embed(img)
        x = torch.cat([einops.repeat(self.cls, "1 1 d -> b 1 d", b=x.shape[0]), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(x[:, 0])


@pytest.mark.parametrize("form", ["functions", "layer"])
def test_blocks_written_with_einops_evolve_as_the_same_blocks_written_with_torch(form):
    torch.manual_seed(0)
    model, plain = EinopsViT(form).eval(), EinopsViT("plain").eval()
    plain.load_state_dict(model.state_dict())
    img = torch.randn(3, 3, 32, 32)
    for keep in (1.0, 0.5):
        fast = evoplug.convert(model, keep, example_input=img[:1])
        want = evoplug.convert(plain, keep, example_input=img[:1])
        assert len(evoplug.get_report(fast).blocks) == 4
        with torch.no_grad():
            out, dense = fast(img), model(img)
            torch.testing.assert_close(out, want(img), rtol=1e-5, atol=1e-5)
            assert torch.equal(out, dense) if keep == 1.0 else (out - dense).abs().max() > 1e-3
            for i in range(3):
                torch.testing.assert_close(fast(img[i:i + 1]), out[i:i + 1], rtol=1e-5, atol=1e-5)
    # and in training: the same gradients as the blocks written with torch
    fast, want = evoplug.convert(model, 0.5, example_input=img[:1]), evoplug.convert(plain, 0.5, example_input=img[:1])
    for m in (fast, want):
        m.train()
        m(img).square().mean().backward()
    torch.testing.assert_close(fast.blocks[2].attn.to_qkv.weight.grad, want.blocks[2].attn.to_qkv.weight.grad,
                               rtol=1e-4, atol=1e-6)


def test_einops_in_a_helper_of_another_module_is_named_with_the_way_out(monkeypatch):
    """einops called from a helper function of another module than the block's is not where
    torch.fx patches it: the refusal says so and how to keep the helper whole, which converts
    the blocks as written with torch."""
    import sys
    import types
    helpers = types.ModuleType("attention_helpers")
    monkeypatch.setitem(sys.modules, "attention_helpers", helpers)
    exec("from einops import rearrange\n"
         "def split_heads(t, h):\n"
         "    return rearrange(t, 'b n (h d) -> b h n d', h=h)\n", helpers.__dict__)

    class HelperAttention(Attention):
        def forward(self, x):
            q, k, v = (helpers.split_heads(t, self.heads) for t in self.to_qkv(self.norm(x)).chunk(3, dim=-1))
            out = ((q @ k.transpose(-1, -2)) * self.scale).softmax(-1) @ v
            return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    torch.manual_seed(0)
    model, plain = EinopsViT("functions").eval(), EinopsViT("plain").eval()
    plain.load_state_dict(model.state_dict())
    for blk in model.blocks:
        blk.attn.__class__ = HelperAttention
    img = torch.randn(2, 3, 32, 32)
    with pytest.raises(evoplug.ConversionError, match=r"`blocks\.0`: torch\.fx could not trace the "
                       r"block: .*unknown to einops.*register that helper with "
                       r"evoplug\.register_leaf_function"):
        evoplug.convert(model, 0.5, example_input=img[:1])
    evoplug.register_leaf_function(helpers.split_heads)
    fast = evoplug.convert(model, 0.5, example_input=img[:1])
    with torch.no_grad():
        torch.testing.assert_close(fast(img), evoplug.convert(plain, 0.5, example_input=img[:1])(img),
                                   rtol=1e-5, atol=1e-5)
