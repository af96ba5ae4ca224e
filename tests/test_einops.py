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


class _WindowBlock(nn.Module):
    """(B, N, C) tokens and (H, W), 4x4 windows cut through the (B, H, W, C) map, merged back to
    the tokens by ``rearrange`` (``merge``) or by ``permute`` and one ``reshape``."""

    def __init__(self, merge, dim=32, ws=4):
        super().__init__()
        self.merge, self.ws = merge, ws
        self.norm, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        ws = self.ws
        w = self.norm(x).view(B, H, W, C).view(B, H // ws, ws, W // ws, ws, C)
        w = w.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        q, k, v = self.qkv(w).chunk(3, dim=-1)
        o = self.proj(((q @ k.transpose(-2, -1)) * C ** -0.5).softmax(-1) @ v)
        o = o.view(B, H // ws, W // ws, ws, ws, C)
        if self.merge:
            return x + rearrange(o, "b h w p q c -> b (h p w q) c")
        return x + o.permute(0, 1, 3, 2, 4, 5).reshape(B, N, C)


def test_windows_merged_by_rearrange_are_refused_naming_it_with_the_way_out():
    """A windowed block whose merge back to the tokens is one ``rearrange`` (an opaque node, no
    map view) is refused, as docs/models.md says; the refusal said only "not equivariant to the
    token order: it mixes tokens outside attention" (audit J2 of the forty-fifth session). It
    names the call now and the way out: the same merge by ``permute`` and ``reshape`` converts."""

    class Net(nn.Module):
        def __init__(self, merge):
            super().__init__()
            self.patch = nn.Conv2d(3, 32, 4, 4)
            self.blocks = nn.ModuleList(_WindowBlock(merge) for _ in range(2))

        def forward(self, img):
            m = self.patch(img).permute(0, 2, 3, 1)
            B, H, W, C = m.shape
            x = m.reshape(B, H * W, C)
            for b in self.blocks:
                x = b(x, H, W)
            return x

    torch.manual_seed(0)
    img = torch.randn(2, 3, 32, 32)
    model, plain = Net(True).eval(), Net(False).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(img), plain(img))
    with pytest.raises(evoplug.ConversionError, match=r"`blocks\.0`: .*`rearrange\w*` \(einops\) "
                       r"turns its tokens into the 2-D map or back as one opaque node, not "
                       r"recognised as a map view: written with `reshape`"):
        evoplug.convert(model, 0.5, example_input=img)
    fast = evoplug.convert(plain, 1.0, example_input=img)
    with torch.no_grad():
        assert torch.equal(fast(img), plain(img))
