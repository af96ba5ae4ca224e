"""torchvision's transformers (0.29.1; random weights, small sizes): its ViT (``nn.MultiheadAttention``
in ``EncoderBlock``) and its Swin v1 / v2, whose window attention runs inside
``shifted_window_attention``, a function torchvision registers with ``torch.fx.wrap`` (fx keeps
it one call in every trace of the process: the blocks were refused as "no attention
computation" until the thirty-eighth session; audit W1)."""
import pytest
import torch
import torch.fx._symbolic_trace as fx_trace

import evoplug

pytestmark = pytest.mark.usefixtures("one_thread")

S = pytest.importorskip("torchvision.models.swin_transformer")
V = pytest.importorskip("torchvision.models.vision_transformer")


def _swin(v2):
    torch.manual_seed(0)
    kw = dict(block=S.SwinTransformerBlockV2, downsample_layer=S.PatchMergingV2) if v2 else {}
    return S.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8],
                             window_size=[4, 4], num_classes=10, **kw).eval()


def _images(n=2, size=96, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("v2", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["swin", "swin_v2"])
def test_torchvision_swin_converts_through_its_fx_wrapped_window_attention(v2):
    model, x = _swin(v2), _images()
    table = dict(fx_trace._wrapped_fns_to_patch)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    # fx's table of wrapped functions is the process's: put back as it was (the conversion may
    # import modules that add to it: timm's)
    assert table.items() <= fx_trace._wrapped_fns_to_patch.items()
    with torch.no_grad():
        ref, out = model(x), fast(x)
        runs = [n for _, n in evoplug.tokens_per_block(fast)]
        evoplug.set_options(fast, keep_ratio=1.0)
        assert torch.equal(fast(x), ref)
        evoplug.set_options(fast, identity_fast_path=False)
        assert (fast(x) - ref).abs().max() <= 1e-5
    assert runs == [-1, 576, 73, 73, 19, 19]            # 24x24 map: 288 + 1 of 576 run the MLP
    assert (out - ref).abs().max() > 1e-3
    # the windows run on the exact full map: with the MLPs zeroed, keep 0.5 is the model
    for name, m in model.named_modules():
        if name.endswith(".mlp"):
            torch.nn.init.zeros_(m[3].weight)
            torch.nn.init.zeros_(m[3].bias)
    zeroed = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    model_of = _swin
    with torch.no_grad():
        assert (zeroed(x) - model(x)).abs().max() <= 1e-5
    # a new size's twin with padded windows (104 px: maps of 26, 13 and 7 in 4x4 windows),
    # keep 1.0 exact there too, and gradients
    y = _images(size=104)
    with torch.no_grad():
        assert (fast(y) - model_of(v2)(y)).abs().max() <= 1e-5
    fast.train()
    evoplug.set_options(fast, keep_ratio=0.5)
    fast(y).sum().backward()
    assert all(p.grad is not None for p in fast.parameters() if p.requires_grad)


def test_torchvision_swin_whose_last_stage_is_one_window_converts():
    """At 64 px the last stage's 4x4 map is one 4x4 window (``swin_t`` at 224 px: one 7x7
    window), cut by a view, permute and reshape that the grid analysis does not read as a token
    view: refused as "attention on the 4-D map that is neither windowed nor on a token view"
    until the thirty-eighth session. It runs on the full map like windows (the window index
    maps each query row to its token): exact attention for every token, the MLP on the kept."""
    model, x = _swin(False), _images(size=64)
    ref_of = model
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    last = evoplug.get_report(fast).blocks[-1].analysis
    assert last.name == "features.5.1" and last.windowed and last.row_full
    with torch.no_grad():
        ref = model(x)
        fast(x)
        runs = [n for _, n in evoplug.tokens_per_block(fast)]
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        assert (fast(x) - ref).abs().max() <= 1e-5
    assert runs[-2:] == [9, 9]                          # 8 of the 16 tokens + representative
    # a rectangular size whose 2x8 map fills two 4x4 windows with padding: 32 slots for 16
    # tokens, as many rows per window as the map has tokens (refused there, audit W5)
    y = torch.randn(2, 3, 16, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (fast(y) - ref_of(y)).abs().max() <= 1e-5
    for name, m in model.named_modules():
        if name.endswith(".mlp"):
            torch.nn.init.zeros_(m[3].weight)
            torch.nn.init.zeros_(m[3].bias)
    zeroed = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    with torch.no_grad():
        assert (zeroed(x) - model(x)).abs().max() <= 1e-5


def test_torchvision_vit_converts_at_the_size_it_declares():
    """``VisionTransformer`` declares its size as ``image_size`` (and asserts it in its
    forward): read as the input size (audit W1: "cannot tell its input size" until the
    thirty-eighth session), so ``convert(model)`` needs no example input."""
    torch.manual_seed(0)
    model = V.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=2,
                                hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)     # (zero-initialised)
    assert evoplug.input_size(model) == (3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5)
    x = _images(size=32)
    with torch.no_grad():
        ref, out = model(x), fast(x)
        runs = [n for _, n in evoplug.tokens_per_block(fast)]
        evoplug.set_options(fast, keep_ratio=1.0)
        assert torch.equal(fast(x), ref)
    assert runs[-1] == 1 + 32 + 1                       # cls + 32 of 64 patches + representative
    assert (out - ref).abs().max() > 1e-4
