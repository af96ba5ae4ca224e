"""Hugging Face transformers vision models, built from their config classes as users build them
(small sizes, random weights, no hub), with the eager and the SDPA attention implementations:
every layer converts; keep 1.0 reproduces the model on both paths (original forward, and the
whole selection machinery with ``identity_fast_path=False``); keep 0.5 runs the kept tokens
plus the representative one; the original state_dict loads strictly; backward works.

What makes them convert: their layers' ``forward(hidden_states, **kwargs)`` is bound by the
keywords the call passed (runtime/call.py), and ``len()``/unpacking of a traced shape
(``(*hidden_states.shape[:-1], -1, head_dim)``) is specialised on the calibration input like
``int()`` (analyse/trace.py)."""
import pytest
import torch

import evoplug

T = pytest.importorskip("transformers")

S = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128)
FLAT = dict(image_size=32, patch_size=4, **S)

# name -> (builder(attn_implementation), prefix tokens, extra forward kwargs)
FAMILIES = {
    "vit": (lambda i: T.ViTForImageClassification(T.ViTConfig(num_labels=10, attn_implementation=i, **FLAT)), 1),
    "deit-with-teacher": (lambda i: T.DeiTForImageClassificationWithTeacher(
        T.DeiTConfig(num_labels=10, attn_implementation=i, **FLAT)), 2),           # cls + distillation
    "dinov2": (lambda i: T.Dinov2Model(T.Dinov2Config(attn_implementation=i, **FLAT)), 1),
    "dinov2-registers": (lambda i: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
        num_register_tokens=4, attn_implementation=i, **FLAT)), 5),
    "clip-vision": (lambda i: T.CLIPVisionModel(T.CLIPVisionConfig(attn_implementation=i, **FLAT)), 1),
    "siglip-vision": (lambda i: T.SiglipVisionModel(T.SiglipVisionConfig(attn_implementation=i, **FLAT)), 0),
    "beit-shared-bias": (lambda i: T.BeitModel(T.BeitConfig(use_shared_relative_position_bias=True,
                                                            attn_implementation=i, **FLAT)), 1),
    "ijepa": (lambda i: T.IJepaModel(T.IJepaConfig(attn_implementation=i, **FLAT)), 0),
    "vit-msn": (lambda i: T.ViTMSNModel(T.ViTMSNConfig(attn_implementation=i, **FLAT)), 1),
    "segformer": (lambda i: T.SegformerModel(T.SegformerConfig(
        image_size=32, num_encoder_blocks=2, depths=[2, 2], sr_ratios=[2, 1], hidden_sizes=[32, 64],
        num_attention_heads=[1, 2], attn_implementation=i)), 0),
}


def _tensor(out):
    """The tensor a test compares: logits, else the last hidden state."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _randomise(model):
    """Weights far from the identity-like init, so keep 0.5 visibly changes the output."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_vision_model_converts(family, impl):
    build, prefix = FAMILIES[family]
    torch.manual_seed(0)
    model = _randomise(build(impl)).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    report = evoplug.get_report(fast)
    assert not report.failed and len(report.blocks) == 4
    assert all(s.num_prefix == prefix for s in report.blocks if s.analysis.num_tokens > 20)
    with torch.no_grad():
        dense = _tensor(model(x))
        half = _tensor(fast(x))
        runs = evoplug.tokens_per_block(fast)
        evoplug.set_options(fast, keep_ratio=1.0)
        exact = _tensor(fast(x))
        evoplug.set_options(fast, identity_fast_path=False)
        machinery = _tensor(fast(x))
    scale = max(1.0, float(dense.abs().max()))
    assert torch.equal(exact, dense)
    assert float((machinery - dense).abs().max()) <= 1e-5 * scale
    assert torch.isfinite(half).all() and float((half - dense).abs().max()) > 1e-4 * scale
    evolving = [(s, t) for s, (_, t) in zip(report.blocks, runs) if s.role == "evolve"]
    assert evolving and all(t < s.analysis.num_tokens for s, t in evolving)
    evoplug.set_options(fast, keep_ratio=0.5, identity_fast_path=True)
    fast.load_state_dict(model.state_dict(), strict=True)
    fast.train()
    _tensor(fast(x)).float().pow(2).mean().backward()
    assert all(p.grad is not None for s in report.blocks for p in s.analysis.module.parameters()
               if p.requires_grad)


def test_vitmae_without_masking_converts_with_its_noise_argument():
    """ViTMAE shuffles its tokens with random noise even at mask_ratio 0: the same noise makes
    the converted model reproduce the original at keep 1.0."""
    torch.manual_seed(0)
    model = _randomise(T.ViTMAEModel(T.ViTMAEConfig(mask_ratio=0.0, **FLAT))).eval()
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input={"pixel_values": x[:1], "noise": noise[:1]})
    with torch.no_grad():
        dense = model(x, noise=noise).last_hidden_state
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        assert float((fast(x, noise=noise).last_hidden_state - dense).abs().max()) <= 1e-5 * max(
            1.0, float(dense.abs().max()))


def test_vitmae_with_masking_keeps_its_cls_token_out_of_the_ranking():
    """With masking, 17 tokens run against an 8x8 patch map (no grid matches): the cls token is
    found as the token that does not come from the image (a perturbation of the patch map
    leaves it unchanged), so it is kept, not ranked as a patch."""
    torch.manual_seed(0)
    model = T.ViTMAEModel(T.ViTMAEConfig(mask_ratio=0.75, **FLAT)).eval()
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=torch.randn(1, 3, 32, 32))
    blocks = evoplug.get_report(fast).blocks
    assert all(s.num_prefix == 1 and s.analysis.num_tokens == 17 for s in blocks)
    assert "do not come from the patch map" in blocks[0].analysis.prefix_source


def test_detection_tokens_after_the_patches_are_refused_by_name():
    """YOLOS lays out [cls, patches, detection tokens]: trailing special tokens cannot be kept
    as a prefix, and ranking them as patches would be wrong, so every layer is refused."""
    model = T.YolosModel(T.YolosConfig(image_size=[32, 32], patch_size=4, num_detection_tokens=10, **S)).eval()
    with pytest.raises(evoplug.ConversionError, match=r"encoder\.layer\.0`: tokens \[0, 65, .*74\] of 75 "
                                                      "do not come from the patch map and are not all leading"):
        evoplug.convert(model, keep_ratio=0.5, example_input=torch.randn(1, 3, 32, 32))


def test_kwargs_not_seen_at_conversion_are_refused_by_name():
    """A layer whose ``**kwargs`` receive a keyword the calibration call did not pass: the
    program has no parameter for it, so the call is refused, naming the block."""
    model = T.ViTModel(T.ViTConfig(**FLAT)).eval()
    x = torch.randn(1, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x)
    layer = fast.layers[2] if hasattr(fast, "layers") else fast.encoder.layer[2]
    hidden = torch.randn(1, 65, 64)
    with torch.no_grad():
        fast(x)
        with pytest.raises(evoplug.errors.AnalysisError, match="other keyword arguments"):
            layer(hidden, some_flag=True)
