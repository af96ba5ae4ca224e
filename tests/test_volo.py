"""VOLO's global blocks: a channels-last (B, H, W, C) map whose attention puts the heads'
outputs back on the map in one reshape, ``(attn @ v).transpose(1, 2).reshape(B, H, W, C)``,
then projects on the map. They must evolve exactly as the same block written in the form
the analysis knows from SAM (tests/test_sam.py checks that form against a reference written
from the paper's rules): heads merged on the tokens, projected, then viewed as the map."""
import copy

import pytest
import torch
from timm.models.volo import VOLO, Attention

import evoplug
from models import peaky_weights

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoReshapeAttention(Attention):
    """timm's VOLO attention with the heads merged on the tokens before the projection and the
    map view after it (SAM's order): the same values, in the same order of operations."""

    def forward(self, x):
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        x = self.proj(x.transpose(1, 2).reshape(B, H * W, C))
        return self.proj_drop(x).reshape(B, H, W, C)


class InferredAttention(Attention):
    """timm's VOLO attention with the map view's channels (or batch) left to reshape: -1."""

    batch_inferred = False

    def forward(self, x):
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        x = x.transpose(1, 2)
        x = x.reshape(-1, H, W, C) if self.batch_inferred else x.reshape(B, H, W, -1)
        return self.proj_drop(self.proj(x))


class BatchInferredAttention(InferredAttention):
    batch_inferred = True


def tiny_volo(fused):
    """An outlooker stage, then three global blocks on an 8x8 map of 64 channels."""
    model = VOLO(layers=[1, 3], img_size=128, embed_dims=[32, 64], num_heads=[2, 2],
                 downsamples=(True, False), outlook_attention=(True, False),
                 post_layers=("ca",), num_classes=10)
    return peaky_weights(model, seed=3, fused=fused, qkv_rows=3 * 64)


@pytest.mark.parametrize("fused,form", [(True, Attention), (False, Attention),
                                        (False, InferredAttention), (False, BatchInferredAttention)])
def test_global_blocks_evolve_as_the_two_reshape_form(fused, form):
    """(A map view written with -1 for the channels or the batch was refused, audit Q3.)"""
    torch.manual_seed(0)
    model = tiny_volo(fused)
    for m in model.modules():
        if type(m) is Attention:
            m.__class__ = form
    twin = copy.deepcopy(model)
    globals_ = [m for m in twin.modules() if type(m) is form]
    assert len(globals_) == 3
    for m in globals_:
        m.__class__ = TwoReshapeAttention
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(twin(x), ref, rtol=0, atol=0)
    # the outlooker block (no token-to-token attention) and the class-attention block stay dense
    same = evoplug.convert(model, keep_ratio=1.0, strict=False, example_input=x[:1])
    assert [b.name for b in evoplug.get_report(same).blocks] == \
        ["network.2.0", "network.2.1", "network.2.2"]
    with torch.no_grad():
        torch.testing.assert_close(same(x), ref, rtol=0, atol=0)
    for keep in (0.5, 0.25):
        fast = evoplug.convert(model, keep_ratio=keep, strict=False, example_input=x[:1])
        want = evoplug.convert(twin, keep_ratio=keep, strict=False, example_input=x[:1])
        assert [b.name for b in evoplug.get_report(fast).blocks] == \
            [b.name for b in evoplug.get_report(want).blocks]
        with torch.no_grad():
            out = fast(x)
            torch.testing.assert_close(out, want(x), rtol=1e-5, atol=1e-5)
        assert (out - ref).abs().max() > 1e-3        # the evolving blocks did run
