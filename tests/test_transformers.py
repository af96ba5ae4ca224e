"""Hugging Face transformers vision models, built from their config classes as users build them
(small sizes, random weights, no hub), with the eager and the SDPA attention implementations:
every layer converts; keep 1.0 reproduces the model on both paths (original forward, and the
whole selection machinery with ``identity_fast_path=False``); keep 0.5 runs the kept tokens
plus the representative one; the original state_dict loads strictly; backward works.

What makes them convert: their layers' ``forward(hidden_states, **kwargs)`` is bound by the
keywords the call passed (runtime/call.py), and ``len()``/unpacking of a traced shape
(``(*hidden_states.shape[:-1], -1, head_dim)``) is specialised on the calibration input like
``int()`` (analyse/tracer.py)."""
import copy
import warnings

import pytest
import torch

import evoplug

T = pytest.importorskip("transformers")

S = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128)
FLAT = dict(image_size=32, patch_size=4, **S)
SWIN = dict(image_size=32, patch_size=2, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=8)

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
    "beit-layer-bias": (lambda i: T.BeitModel(T.BeitConfig(use_relative_position_bias=True,
                                                           attn_implementation=i, **FLAT)), 1),
    # rotary embeddings passed to every layer as a (cos, sin) tuple over the patches
    "dinov3": (lambda i: T.DINOv3ViTModel(T.DINOv3ViTConfig(num_register_tokens=4, attn_implementation=i,
                                                           **FLAT)), 5),
    "ijepa": (lambda i: T.IJepaModel(T.IJepaConfig(attn_implementation=i, **FLAT)), 0),
    "vit-msn": (lambda i: T.ViTMSNModel(T.ViTMSNConfig(attn_implementation=i, **FLAT)), 1),
    "segformer": (lambda i: T.SegformerModel(T.SegformerConfig(
        image_size=32, num_encoder_blocks=2, depths=[2, 2], sr_ratios=[2, 1], hidden_sizes=[32, 64],
        num_attention_heads=[1, 2], attn_implementation=i)), 0),
    # layers that return (hidden_states, attn_weights) / (hidden_states,)
    "data2vec-vision": (lambda i: T.Data2VecVisionModel(T.Data2VecVisionConfig(attn_implementation=i, **FLAT)), 1),
    # per-layer relative positions sized from the *normed* tokens' count (the published setting)
    "data2vec-layer-bias": (lambda i: T.Data2VecVisionModel(T.Data2VecVisionConfig(
        use_relative_position_bias=True, attn_implementation=i, **FLAT)), 1),
    "pvt-v2": (lambda i: T.PvtV2Model(T.PvtV2Config(
        image_size=32, num_encoder_blocks=2, depths=[2, 2], sr_ratios=[2, 1], hidden_sizes=[32, 64],
        num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], attn_implementation=i)), 0),
    # 16x16 then 8x8 maps in 8x8 windows: shifted windows, then one window over the whole map
    # (its views look like map <-> token views; shape arithmetic `size()[:-2] + (C,)` between them)
    "swin": (lambda i: T.SwinModel(T.SwinConfig(attn_implementation=i, **SWIN)), 0),
    "swinv2": (lambda i: T.Swinv2Model(T.Swinv2Config(attn_implementation=i, **SWIN)), 0),
    "donut-swin": (lambda i: T.DonutSwinModel(T.DonutSwinConfig(attn_implementation=i, **SWIN)), 0),
    # rotary (cos, sin) tables (N, d) without a batch dim, lined up with (B, N, heads, d) inside
    "mlcd": (lambda i: T.MLCDVisionModel(T.MLCDVisionConfig(attn_implementation=i, **FLAT)), 1),
    # SAM's image encoder: a (B, H, W, C) map through qkv and MLP, 3x3 windows on the 8x8 map
    # (padded) and global blocks with decomposed relative positions (test_sam.py: as timm's SAM)
    "sam-vision": (lambda i: T.SamVisionModel(T.SamVisionConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=4,
        window_size=3, global_attn_indexes=[1, 3], mlp_dim=128, output_channels=32,
        attn_implementation=i)), 0),
    # [cls, patches, detection tokens] (kept like the cls token), mid-layer position embeddings
    "yolos": (lambda i: T.YolosForObjectDetection(T.YolosConfig(
        num_detection_tokens=10, attn_implementation=i, **dict(FLAT, image_size=[32, 32]))), 1),
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
    try:
        model = _randomise(build(impl)).eval()
    except ValueError as e:     # e.g. PvtV2: transformers has no SDPA path for it
        if "does not support an attention implementation" not in str(e):
            raise
        pytest.skip(f"transformers: {family} has no {impl} attention")
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


def test_mae_decoder_does_not_rank_its_patches_by_the_visible_patches_scores():
    """ViTMAEForPreTraining: the encoder runs 16 randomly chosen visible patches (a 4x4 'grid'
    only by their count), the decoder all 64 in the image's order. Scores are not carried
    from the one onto the other (they were, pooled as if the visible patches were a downsampled
    image): the decoder's first block runs every token and starts them again."""
    torch.manual_seed(0)
    cfg = T.ViTMAEConfig(decoder_hidden_size=32, decoder_num_hidden_layers=3,
                         decoder_num_attention_heads=2, decoder_intermediate_size=64, **FLAT)
    model = _randomise(T.ViTMAEForPreTraining(cfg)).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input={"pixel_values": x[:1], "noise": noise[:1]})
    with torch.no_grad():
        fast(pixel_values=x, noise=noise)
    runs = [(s.name.startswith("decoder"), s.analysis.num_tokens, t)
            for s, (_, t) in zip(evoplug.get_report(fast).blocks, evoplug.tokens_per_block(fast))]
    first_decoder = next(r for r in runs if r[0])
    assert first_decoder[1:] == (65, 65)                       # restarts: every token
    assert all(t < n for dec, n, t in runs[runs.index(first_decoder) + 1:])   # then evolves
    # planned as it runs: a scoring block (explain() said 'evolving 34/65' for it before)
    roles = {s.name: s.role for s in evoplug.get_report(fast).blocks}
    assert roles["decoder.decoder_layers.0"] == "score" and not evoplug.get_report(fast).unscored


class _EvoViTLayers(torch.nn.Module):
    """HF ViT layers run as Evo-ViT from the paper's rules, written out (the reference): the
    layers before ``scoring`` dense, that one scores the patches by the class token's attention
    row (g = a), the ones after evolve: top-k of g every ``reselect_every`` layers, the
    representative token r = sum w_j x_j over the others (w = g / sum g), the block on
    [cls, top-k, r], the others get r's residual, g = (1 - alpha) g + alpha a at the kept ones."""

    def __init__(self, layers, keep, scoring, alpha=0.5, reselect_every=4):
        super().__init__()
        self.layers, self.keep, self.scoring = layers, keep, scoring
        self.alpha, self.reselect_every = alpha, reselect_every

    @staticmethod
    def _row(layer, x):
        att = layer.attention
        h = layer.layernorm_before(x)
        B, n, _ = h.shape
        q = att.q_proj(h).view(B, n, -1, att.head_dim).transpose(1, 2)
        k = att.k_proj(h).view(B, n, -1, att.head_dim).transpose(1, 2)
        return (q[:, :, :1] @ k.transpose(-2, -1) * att.scaling).softmax(-1).mean(1)[:, 0, 1:]

    def forward(self, x, *args, **kwargs):
        M = x.shape[1] - 1
        k = max(1, int(M * self.keep + 1e-6))
        g = sel = None
        since = 0
        for i, layer in enumerate(self.layers):
            if i <= self.scoring:
                if i == self.scoring:
                    g = self._row(layer, x)
                x = layer(x)
                continue
            if sel is None or since % self.reselect_every == 0:
                sel, since = g.topk(k, dim=1).indices, 0
            xp = x[:, 1:]
            picked = torch.stack([xp[b, sel[b]] for b in range(x.shape[0])])
            w = g.clone()
            for b in range(x.shape[0]):
                w[b, sel[b]] = 0.0
            rep = ((w / w.sum(1, keepdim=True))[..., None] * xp).sum(1)
            sub = torch.cat([x[:, :1], picked, rep[:, None]], 1)
            out, a = layer(sub), self._row(layer, sub)[:, :k]
            new = x.clone()
            new[:, 1:] += (out[:, -1] - rep)[:, None]
            new[:, :1] = out[:, :1]
            g = g.clone()
            for b in range(x.shape[0]):
                new[b, 1 + sel[b]] = out[b, 1:1 + k]
                g[b, sel[b]] = (1 - self.alpha) * g[b, sel[b]] + self.alpha * a[b]
            x, since = new, since + 1
        return x


@pytest.mark.parametrize("decoder_width", [32, 64])
def test_a_decoder_on_as_many_tokens_as_its_encoder_scores_them_afresh(decoder_width):
    """ViTMAEForPreTraining without masking: the encoder runs its 65 tokens in the noise's
    shuffled order, the decoder its 65 (projected to its width) in the image's order. Until
    audit A2 of the fortieth session the decoder's layers evolved on the encoder's selection,
    because the token count was the same: a raw gather error at another width, and at the same
    width the patches at the encoder's kept *positions* ran, other patches than it ranked.
    Now a block whose tokens are not the block before's output row by row (another width,
    reordered, or in an order the model draws at each call) scores them afresh: keep 0.5 equals
    Evo-ViT written out with the decoder's first layer scoring."""
    torch.manual_seed(0)
    cfg = T.ViTMAEConfig(mask_ratio=0.0, decoder_hidden_size=decoder_width, decoder_num_hidden_layers=2,
                         decoder_num_attention_heads=2, decoder_intermediate_size=64, **FLAT)
    model = _randomise(T.ViTMAEForPreTraining(cfg)).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input={"pixel_values": x[:1], "noise": noise[:1]})
    blocks = evoplug.get_report(fast).blocks
    assert [s.role for s in blocks] == ["dense", "score", "evolve", "evolve", "score", "evolve"]
    ref = copy.deepcopy(model)     # the encoder scores at its layer 1, the decoder at its first
    ref.vit.layers = torch.nn.ModuleList([_EvoViTLayers(ref.vit.layers, 0.5, 1)])
    ref.decoder.decoder_layers = torch.nn.ModuleList([_EvoViTLayers(ref.decoder.decoder_layers, 0.5, 0)])
    with torch.no_grad():
        out, want = fast(x, noise=noise).logits, ref(x, noise=noise).logits
        assert [t for _, t in evoplug.tokens_per_block(fast)] == [-1, 65, 34, 34, 65, 34]
        assert float((out - model(x, noise=noise).logits).abs().max()) > 1e-3
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # no noise passed: the model draws its own, and the order differs from call to call
    drawn = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    assert [s.role for s in evoplug.get_report(drawn).blocks][4] == "score"


def test_decoders_of_another_width_on_their_encoders_token_count_run():
    """CLIPSeg's decoder (65 tokens of width reduce_dim after 65 vision tokens of width 64) and
    Hiera's pre-training decoder (16 tokens of width 32 after 16 of width 128) evolved on their
    encoder's selection until audit A2 of the fortieth session: every forward of CLIPSeg at keep
    0.5, and Hiera's at keep 1.0 through the selection machinery, failed in a gather. Their
    first decoder layer now scores afresh; keep 1.0 on the machinery is the dense model."""
    torch.manual_seed(0)
    clipseg = _randomise(T.CLIPSegForImageSegmentation(T.CLIPSegConfig(
        text_config=dict(S, num_hidden_layers=2, vocab_size=100, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=FLAT, projection_dim=32, extract_layers=[1, 2, 3], reduce_dim=32,
        decoder_num_attention_heads=2, decoder_intermediate_size=64))).eval()
    hiera = _randomise(T.HieraForPreTraining(T.HieraConfig(
        image_size=[64, 64], patch_size=[7, 7], patch_stride=[4, 4], patch_padding=[3, 3], embed_dim=32,
        depths=[1, 2, 2, 1], num_heads=[1, 2, 2, 4], query_stride=[2, 2], masked_unit_size=[8, 8],
        num_query_pool=2, mask_ratio=0.0, decoder_hidden_size=32, decoder_depth=2, decoder_num_heads=2))).eval()
    cases = [(clipseg, dict(input_ids=torch.randint(2, 100, (2, 8)), pixel_values=torch.randn(2, 3, 32, 32)),
              "decoder.layers.0"),
             (hiera, dict(pixel_values=torch.randn(2, 3, 64, 64), noise=torch.rand(2, 4)),
              "decoder.decoder_block.layers.0")]
    for model, inputs, first in cases:
        fast = evoplug.convert(model, keep_ratio=0.5, strict=False,
                               example_input={k: v[:1] for k, v in inputs.items()})
        roles = {s.name: s.role for s in evoplug.get_report(fast).blocks}
        assert roles[first] == "score", roles
        with torch.no_grad():
            dense = model(**inputs).logits
            assert torch.isfinite(fast(**inputs).logits).all()
            evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
            assert float((fast(**inputs).logits - dense).abs().max()) <= 1e-5 * max(1.0, float(dense.abs().max()))


def test_a_text_encoder_beside_the_image_encoder_is_refused_by_name():
    """A whole SiglipModel: its (bidirectional) text layers took the vision tower's scores,
    pooled onto a 'grid' of the text tokens. Their tokens do not depend on the image (the
    provenance forward's noise changes the vision layers' inputs, none of theirs): refused by
    name; strict=False converts the vision tower and leaves the text tower exact."""
    torch.manual_seed(0)
    model = T.SiglipModel(T.SiglipConfig(text_config=dict(S, vocab_size=100, max_position_embeddings=32),
                                         vision_config=FLAT)).eval()
    ids, px = torch.randint(0, 100, (2, 16)), torch.randn(2, 3, 32, 32)
    example = dict(input_ids=ids[:1], pixel_values=px[:1])
    with pytest.raises(evoplug.ConversionError, match=r"text_model.encoder.layers.0`: its tokens "
                                                      r"do not come from the image"):
        evoplug.convert(model, keep_ratio=0.5, example_input=example)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=example, strict=False)
    assert all(s.name.startswith("vision_model") for s in evoplug.get_report(fast).blocks)
    with torch.no_grad():
        a, b = model(input_ids=ids, pixel_values=px), fast(input_ids=ids, pixel_values=px)
    assert torch.equal(a.text_embeds, b.text_embeds)
    assert (a.image_embeds - b.image_embeds).abs().max() > 1e-4


def test_yolos_detection_tokens_stay_on_the_slow_path():
    """YOLOS lays out [cls, 64 patches, 10 detection tokens]: the detection tokens are found as
    tokens that do not come from the image, kept with the cls token, and only the patches are
    ranked: an evolving layer runs 1 + 10 + 32 kept + 1 representative tokens, and its kept
    tokens are patches. Boxes and class logits come from the detection tokens' slow path."""
    torch.manual_seed(0)
    model = _randomise(T.YolosForObjectDetection(T.YolosConfig(
        num_detection_tokens=10, **dict(FLAT, image_size=[32, 32])))).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    blocks = evoplug.get_report(fast).blocks
    assert [(s.num_prefix, s.num_suffix) for s in blocks] == [(1, 10)] * 4
    with torch.no_grad():
        dense, out = model(x), fast(x)
    assert [t for _, t in evoplug.tokens_per_block(fast)] == [75, 44, 44, 44]
    kept = blocks[-1].context.sel
    assert kept.shape == (2, 32) and int(kept.min()) >= 0 and int(kept.max()) < 64
    assert out.pred_boxes.shape == dense.pred_boxes.shape == (2, 10, 4)
    assert 1e-4 < float((out.logits - dense.logits).abs().max()) and torch.isfinite(out.pred_boxes).all()


def _videomae_pretraining():
    """A 2 + 2-layer VideoMAEForPreTraining on 4 frames of 32 px: 32 tubelets."""
    config = T.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2,
                              hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, decoder_hidden_size=32,
                              decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
                              decoder_intermediate_size=64, attn_implementation="eager")
    torch.manual_seed(0)
    return _randomise(T.VideoMAEForPreTraining(config).eval())


def test_videomae_mask_tokens_follow_the_calls_mask_count():
    """VideoMAE's pre-training decoder takes [visible tubelets, mask tokens], as many mask tokens
    as ``bool_masked_pos`` has True per video: trailing special tokens whose count follows the
    call at the same shapes. Converted at 8 masked and called at 24 (or the reverse), the
    decoder kept the conversion's count: 16 mask tokens ranked as patches, or 16 visible ones
    kept as special, 0.01 off, without a word (audit B1 of the forty-first session). A call
    with another count now converts a twin for it: the model converted at that count, which at
    keep 1.0 gives the dense model."""
    model = _videomae_pretraining()
    video = torch.randn(2, 4, 3, 32, 32)
    masks = {n: torch.stack([torch.randperm(32) < n for _ in range(2)]) for n in (8, 24)}
    conv = {n: evoplug.convert(model, keep_ratio=0.5, start_block=2, example_input=dict(
        pixel_values=video[:1], bool_masked_pos=masks[n][:1])) for n in (8, 24)}
    assert [s.num_suffix for s in evoplug.get_report(conv[8]).blocks][2:] == [8] * 2
    assert "as many as `bool_masked_pos` has True entries per image" in evoplug.explain(conv[8])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for at, other in ((8, 24), (24, 8)):
            out = conv[at](video, bool_masked_pos=masks[other]).logits
            torch.testing.assert_close(out, conv[other](video, bool_masked_pos=masks[other]).logits,
                                       atol=1e-5, rtol=1e-5)
            assert evoplug.tokens_per_block(conv[at])[-1][1] == other + (32 - other) // 2 + 1
        evoplug.set_options(conv[24], keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(conv[24](video, bool_masked_pos=masks[24]).logits,
                                   model(video, bool_masked_pos=masks[24]).logits, atol=1e-5, rtol=1e-5)


def _videomae_converted_at_8_masked():
    """:func:`_videomae_pretraining`, converted at keep 0.5 on a call with 8 masked tubelets;
    2 videos masked so, and 2 decoder inputs of 32 tokens."""
    model = _videomae_pretraining()
    video = torch.randn(2, 4, 3, 32, 32)
    mask = torch.stack([torch.randperm(32) < 8 for _ in range(2)])
    conv = evoplug.convert(copy.deepcopy(model), keep_ratio=0.5, start_block=2,
                           example_input=dict(pixel_values=video[:1], bool_masked_pos=mask[:1]))
    return model, conv, video, mask, torch.randn(2, 32, 32)


def test_videomae_decoder_called_directly_is_refused_not_run_at_the_conversions_count():
    """The decoder's blocks learn their count of trailing mask tokens from the model's
    ``bool_masked_pos``; ``model.decoder(x, n)`` called directly passes no such argument, and
    its blocks kept the conversion's count: converted at 8 masked and called with 24 mask
    tokens, 16 of them were ranked as patches, 2.6 off the model converted at 24, without a word
    (a known gap of the forty-first session). Now such a call is refused naming the block and
    the argument its count follows; the model's own calls and keep 1.0 run as before."""
    model, conv, video, mask, x = _videomae_converted_at_8_masked()
    with torch.no_grad():
        for n in (24, 8):
            with pytest.raises(evoplug.EvoplugError, match=r"`decoder\.decoder_layers\.0`.*"
                               r"`bool_masked_pos` has True entries per image \(8 at the conversion"):
                conv.decoder(x, n)
        assert conv(video, bool_masked_pos=mask).logits.shape == (2, 8, 384)
        evoplug.set_options(conv, keep_ratio=1.0)
        torch.testing.assert_close(conv.decoder(x, 24).logits, model.decoder(x, 24).logits)


def test_a_compiled_videomae_decoder_called_directly_is_refused_as_the_eager_one_is():
    """``torch.compile(model.decoder)`` called on its own ran at the conversion's mask count:
    the direct-call check was skipped while compiling, as a compiled block cannot see the
    model's per-thread forward stack, so 24 mask tokens ran as 8 special tokens and 16 patches
    without a word (a known gap of the forty-second session). The entry and exit hooks now count
    the model forwards dynamo traces: a compiled direct call is refused as the eager one is, and
    the compiled model's own calls run as eagerly, leaving the count at 0 after them."""
    torch._dynamo.reset()
    model, conv, video, mask, x = _videomae_converted_at_8_masked()
    runtime = evoplug.get_report(conv).blocks[0].runtime
    decoder = torch.compile(conv.decoder, backend="eager")
    with torch.no_grad():
        for n in (24, 8):
            with pytest.raises(evoplug.EvoplugError, match=r"`decoder\.decoder_layers\.0`.*"
                               r"called outside the model's forward"):
                decoder(x, n)
        eager = conv(video, bool_masked_pos=mask).logits
        compiled = torch.compile(conv, backend="eager")(video, bool_masked_pos=mask).logits
        torch.testing.assert_close(compiled, eager)
        assert runtime.compiled_entries == 0
        with pytest.raises(evoplug.EvoplugError, match="called outside the model's forward"):
            decoder(x, 24)
    torch._dynamo.reset()


def test_mlcd_rotary_tables_follow_each_images_tokens():
    """MLCD hands its layers rotary tables (N, d) without a batch dim and lines them up with the
    queries itself (``cos.unsqueeze(0)`` ... ``.unsqueeze(-2)``): the program takes them whole
    and gathers them where they are lined up, per image. A layer's program on a token subset
    gives what the original layer gives on each image's subset with its rows of the tables."""
    torch.manual_seed(0)
    model = _randomise(T.MLCDVisionModel(T.MLCDVisionConfig(**FLAT))).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    spec = evoplug.get_report(fast).blocks[2]
    assert spec.whole_args == ("position_embeddings__0", "position_embeddings__1")
    seen = {}
    layer = spec.analysis.module
    hook = layer.register_forward_pre_hook(lambda m, a, kw: seen.update(args=a, kwargs=kw),
                                           with_kwargs=True)
    with torch.no_grad():
        fast(x)
    hook.remove()
    hidden, extras = spec.call.bind(spec.name, seen["args"], seen["kwargs"])
    cos, sin = extras["position_embeddings__0"], extras["position_embeddings__1"]
    g = torch.Generator().manual_seed(3)
    pos = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(64, generator=g)[:20] + 1])
                       for _ in range(2)])                                  # cls + 20 patches each
    sub = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
    with torch.no_grad():
        out = spec.programs[False](layer, *spec.call.feed(sub, extras), pos, hidden)[0]
        ref = torch.cat([spec.orig_class.forward(layer, sub[b:b + 1], (cos[pos[b]], sin[pos[b]]))
                         for b in range(2)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with torch.no_grad():    # the tables matter: the rows of the first image for both is wrong
        wrong = spec.orig_class.forward(layer, sub[1:], (cos[pos[0]], sin[pos[0]]))
    assert float((wrong - ref[1:]).abs().max()) > 1e-3
    # a program built after the conversion (the per-batch factory's path: the calibration call
    # is gone by then) gathers the tables the same way
    from evoplug.rewrite.program import batch_program_factory
    late = batch_program_factory(spec.analysis, spec.orig_class)(False, seen["args"], seen["kwargs"])
    with torch.no_grad():
        torch.testing.assert_close(late(layer, *spec.call.feed(sub, extras), pos, hidden)[0], ref,
                                   atol=1e-5, rtol=0)


def test_kwargs_not_seen_at_conversion_run_the_original_forward_with_a_warning():
    """A layer whose ``**kwargs`` receive a keyword the calibration call did not pass: the
    program has no parameter for it, so that call runs the layer's own forward on every token
    (exact), with a warning naming the block (it raised before: DINO's
    ``get_last_selfattention`` calls its last block with ``return_attention=True``)."""
    model = T.ViTModel(T.ViTConfig(**FLAT)).eval()
    x = torch.randn(1, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x)
    layer = fast.layers[2] if hasattr(fast, "layers") else fast.encoder.layer[2]
    hidden = torch.randn(1, 65, 64)
    with torch.no_grad():
        fast(x)
        with pytest.warns(UserWarning, match=r"other keyword arguments.*`(encoder.)?layers?.2` runs its "
                                             r"original forward"):
            out = layer(hidden, some_flag=True)
        evoplug.revert(fast)
        torch.testing.assert_close(out, layer(hidden, some_flag=True), atol=0, rtol=0)


def test_what_trainer_passes_down_still_evolves_and_checkpoints():
    """transformers' ``Trainer`` calls the model with ``num_items_in_batch`` and sets
    ``config.use_cache``; transformers hands both down to every layer, where no vision layer
    reads them. They made every layer run its own forward (a Trainer run trained the dense
    model), and under gradient checkpointing the recomputation raised where its forward had
    fallen back (until the eighteenth session). A keyword the conversion did not see still runs
    the layer's own forward, in its recomputation too."""
    torch.manual_seed(0)
    model = T.ViTForImageClassification(T.ViTConfig(num_labels=10, **FLAT)).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1]).train()
    fast.config.use_cache = False
    fast(pixel_values=x, labels=y, num_items_in_batch=torch.tensor(4)).loss.backward()
    ran = [t for _, t in evoplug.tokens_per_block(fast)]
    assert ran[0] == 65 and all(0 < t < 65 for t in ran[1:]), ran
    fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fast.zero_grad()
    fast(pixel_values=x, labels=y, num_items_in_batch=torch.tensor(4)).loss.backward()
    assert all(p.grad is not None for p in evoplug.get_report(fast).blocks[2].analysis.module.parameters())
    # a keyword no conversion saw: every layer's own forward, in forward and recomputation
    dense = evoplug.revert(__import__("copy").deepcopy(fast))
    fast.zero_grad()
    with pytest.warns(UserWarning, match="other keyword arguments"):
        fast(pixel_values=x, labels=y, some_flag=True).loss.backward()
    assert all(t == -1 for _, t in evoplug.tokens_per_block(fast))
    dense(pixel_values=x, labels=y, some_flag=True).loss.backward()
    for (n, p), q in zip(fast.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("when", ["before the conversion", "before a new size's twin"])
def test_reentrant_checkpointing_of_layers_that_checkpoint_themselves(when):
    """transformers' layers checkpoint their own forward (GradientCheckpointingLayer). Traced
    with reentrant checkpointing on, the checkpoint's ``no_grad`` went into the layer's training
    program: backward raised torch's "none of output has requires_grad=True" for a model
    converted with it on, or for a twin first converted at a new size after it was enabled
    (audit E1 of the fiftieth session). A layer is traced with its own checkpointing off, and
    its call checkpoints the program: the gradients of the plain backward."""
    torch.manual_seed(0)
    model = T.Dinov2Model(T.Dinov2Config(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, intermediate_size=64)).train()
    size = 16 if when == "before the conversion" else 24
    x = torch.randn(2, 3, size, size)
    if size == 16:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=torch.randn(1, 3, 16, 16)).train()
    grads = []
    for reentrant in (True, None):      # (the checkpointed call converts the twin at 24 px)
        if reentrant:
            fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        else:
            fast.gradient_checkpointing_disable()
        fast.zero_grad()
        xr = x.clone().requires_grad_()
        fast(xr).last_hidden_state.pow(2).mean().backward()
        assert all(0 < t < size ** 2 // 16 + 1 for _, t in evoplug.tokens_per_block(fast)[1:])
        grads.append([xr.grad] + [p.grad.clone() for p in fast.parameters() if p.grad is not None])
    assert (size == 16) != bool(evoplug.get_report(fast).blocks[0].runtime.variants)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_twin_built_after_checkpointing_was_enabled_checkpoints_each_layer_once(reentrant):
    """A twin converted at a new input size after ``gradient_checkpointing_enable()`` copied
    the layer's own checkpointing flag, on: its layer checkpointed again inside the model's
    layer's checkpoint (calls of the checkpointing function nested 2 deep, 12 a step for the 4
    layers where 4 run at the conversion's size, and in a reentrant backward each layer's MLP
    recomputed twice), until the fifty-third session. At both sizes each layer now checkpoints
    once and is recomputed once, with the gradients of the model without checkpointing."""
    torch.manual_seed(0)
    model = T.ViTModel(T.ViTConfig(**FLAT), add_pooling_layer=False).eval()
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=torch.randn(1, 3, 32, 32)).train()
    plain = copy.deepcopy(fast)
    fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls, depth, fc1 = [0, 0, 0], [0], [0]

    def counted(func):
        def run(*args, **kwargs):
            depth[0] += 1
            calls[0], calls[1] = calls[0] + 1, max(calls[1], depth[0])
            try:
                return func(*args, **kwargs)
            finally:
                depth[0] -= 1
        return run
    for layer in fast.layers:
        layer._gradient_checkpointing_func = counted(layer._gradient_checkpointing_func)
    fast.layers[2].mlp.fc1.register_forward_hook(lambda *_: fc1.__setitem__(0, fc1[0] + 1))
    for size in (32, 48, 48):
        x = torch.randn(2, 3, size, size)
        grads = []
        for m in (fast, plain):
            m.zero_grad()
            calls[:2] = [0, 0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")         # (the hook on fc1 sees the kept tokens)
                out = m(x, interpolate_pos_encoding=True).last_hidden_state
                fc1[0] = 0
                out.pow(2).mean().backward()
            grads.append([p.grad for p in m.parameters() if p.grad is not None])
            if m is fast:
                assert calls[:2] == [4, 1], (size, calls)
                assert fc1[0] == 1, (size, fc1)        # (recomputed once in backward)
        assert len(grads[0]) == len(grads[1]) > 40
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert evoplug.get_report(fast).blocks[0].runtime.variants
    assert all(0 < t < 145 for _, t in evoplug.tokens_per_block(fast)[1:])


def test_dinov2_evolves_with_interpolate_pos_encoding():
    """DINOv2 hands ``interpolate_pos_encoding`` to every layer, where nothing reads it (its
    embeddings interpolate always): every layer ran its own forward for such calls until the
    eighteenth session (BEiT's layers do read it: it is no blanket ignore)."""
    torch.manual_seed(0)
    model = T.Dinov2Model(T.Dinov2Config(**FLAT)).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    with torch.no_grad():
        fast(pixel_values=x, interpolate_pos_encoding=True)
        assert all(0 < t < 65 for _, t in evoplug.tokens_per_block(fast)[1:])
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state,
                                   model(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["beit", "data2vec-vision"])
def test_bias_sized_from_the_token_count_follows_the_kept_tokens(impl, kind):
    """HF BEiT's per-layer relative position bias is sized from ``hidden_states.shape[1]``
    (interpolated to it at another resolution): a position term, computed for the full token
    set (its size query reads the block's whole input) and gathered for the kept tokens.
    Data2Vec-Vision reads the size from the normed tokens (refused until the sixteenth session)."""
    torch.manual_seed(0)
    model_cls, config_cls = {"beit": (T.BeitModel, T.BeitConfig),
                             "data2vec-vision": (T.Data2VecVisionModel, T.Data2VecVisionConfig)}[kind]
    model = _randomise(model_cls(config_cls(use_relative_position_bias=True, attn_implementation=impl,
                                            **FLAT))).eval()
    x = torch.randn(2, 3, 40, 40)          # 10x10 patches: the 8x8 table is interpolated
    call = {"pixel_values": x, "interpolate_pos_encoding": True}
    fast = evoplug.convert(model, keep_ratio=0.5, example_input={k: v[:1] if k == "pixel_values" else v
                                                                 for k, v in call.items()})
    blocks = evoplug.get_report(fast).blocks
    assert all("gathered for the kept tokens" in " ".join(s.analysis.position_terms) for s in blocks)
    with torch.no_grad():
        dense = model(**call).last_hidden_state
        half = fast(**call).last_hidden_state
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        machinery = fast(**call).last_hidden_state
    assert [t for _, t in evoplug.tokens_per_block(fast)] == [101] * 4
    assert float((machinery - dense).abs().max()) <= 1e-5 * max(1.0, float(dense.abs().max()))
    assert torch.isfinite(half).all() and not torch.allclose(half, dense)



def _hidden(out):
    """Every dense output a pyramid gives: hidden states per stage, Swin's reshaped maps,
    a backbone's feature maps."""
    got = []
    for key in ("hidden_states", "reshaped_hidden_states", "feature_maps"):
        got += list(getattr(out, key, None) or ())
    return got


PYRAMIDS = {
    "swin": lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=2, embed_dim=32, depths=[2, 2],
                                             num_heads=[2, 4], window_size=4)),
    "swin-backbone": lambda: T.SwinBackbone(T.SwinConfig(image_size=32, patch_size=2, embed_dim=32,
                                                         depths=[2, 2], num_heads=[2, 4], window_size=4,
                                                         out_features=["stage1", "stage2"])),
    "pvt-v2-backbone": lambda: T.PvtV2Backbone(T.PvtV2Config(
        image_size=32, num_encoder_blocks=2, depths=[2, 2], sr_ratios=[2, 1], hidden_sizes=[32, 64],
        num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], out_features=["stage1", "stage2"])),
    "segformer": lambda: T.SegformerModel(T.SegformerConfig(
        image_size=32, num_encoder_blocks=2, depths=[2, 2], sr_ratios=[2, 1], hidden_sizes=[32, 64],
        num_attention_heads=[1, 2])),
}


@pytest.mark.parametrize("family", list(PYRAMIDS))
def test_pyramids_keep_their_dense_outputs(family):
    """Every converted pyramid block restores its full token map, so the per-stage hidden states
    (``output_hidden_states``), Swin's reshaped maps and a backbone's feature maps keep their
    shapes at keep 0.5 and are the original ones at keep 1.0 through the selection machinery."""
    torch.manual_seed(0)
    model = _randomise(PYRAMIDS[family]()).eval()
    x = torch.randn(2, 3, 32, 32)
    kw = {} if "backbone" in family else {"output_hidden_states": True}
    fast = evoplug.convert(model, keep_ratio=0.5, example_input={"pixel_values": x[:1], **kw})
    assert len(evoplug.get_report(fast).blocks) == 4
    with torch.no_grad():
        dense = _hidden(model(x, **kw))
        half = _hidden(fast(x, **kw))
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        machinery = _hidden(fast(x, **kw))
    assert len(dense) >= 2 and [t.shape for t in half] == [t.shape for t in dense]
    for d, m in zip(dense, machinery):
        assert float((m - d).abs().max()) <= 1e-5 * max(1.0, float(d.abs().max()))
    assert all(torch.isfinite(t).all() for t in half)
    assert not torch.allclose(half[-1], dense[-1])


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_output_flags_and_the_hooks_transformers_leaves_behind(family):
    """transformers passes ``output_hidden_states``/``output_attentions`` down to every layer
    and, at the first call that asks, installs hooks that stay: calls with and without the
    flags run on one conversion; a call collecting attention maps runs the original blocks
    (every map, as the dense model gives it), and the next plain call evolves again."""
    build = FAMILIES[family][0]
    torch.manual_seed(0)
    model = _randomise(build("eager")).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    evolving = lambda: [t for s, (_, t) in zip(evoplug.get_report(fast).blocks,  # noqa: E731
                                               evoplug.tokens_per_block(fast)) if s.role == "evolve"]
    with torch.no_grad():
        dense = model(x, output_attentions=True, output_hidden_states=True)
        with warnings.catch_warnings(record=True) as told:
            warnings.simplefilter("always")
            full = fast(x, output_attentions=True, output_hidden_states=True)
        maps = [w for w in told if "in calls that collect its attention maps" in str(w.message)]
        assert len(full.attentions) == len(dense.attentions) == (4 if family == "vit" else 2)
        if family == "vit":     # maps collected from the attention modules: the original blocks ran
            assert all(t == -1 for t in evolving()) and len(maps) == 1
            with warnings.catch_warnings(record=True) as told:      # (once per model)
                warnings.simplefilter("always")
                fast(x, output_attentions=True)
            assert not [w for w in told if "collect its attention maps" in str(w.message)]
            for a, b in zip(full.attentions + full.hidden_states, dense.attentions + dense.hidden_states):
                assert torch.equal(a, b)
        else:                   # one map per stage, as its last layer returns it: a windowed
            #                     layer's evolves (its windows run on the full map); the one-window
            #                     layers of the last stage, whose maps are over the tokens they run,
            #                     run their own forward (audit A2 of the fortieth session)
            one = [s.analysis.one_window for s in evoplug.get_report(fast).blocks if s.role == "evolve"]
            assert any(one) and not all(one)
            assert [t > 0 if not o else t == -1 for t, o in zip(evolving(), one)] == [True] * len(one)
            assert len(maps) == 1       # (said, as for ViT)
            assert [a.shape for a in full.attentions] == [a.shape for a in dense.attentions]
        half = fast(x, output_hidden_states=True)
        assert all(0 < t < s for t, s in zip(evolving(), [65] * 4 if family == "vit" else [256, 64, 64]))
        assert [t.shape for t in half.hidden_states] == [t.shape for t in dense.hidden_states]
        assert not torch.equal(half.hidden_states[-1], dense.hidden_states[-1])
        # a plain call may hand tokens on between blocks (no hook collects them): same result
        assert torch.allclose(_tensor(fast(x)), _tensor(half), atol=1e-5, rtol=1e-5)


def test_a_config_that_collects_attention_maps_is_told():
    """A config with ``output_attentions=True`` (or ``from_pretrained(...,
    output_attentions=True)``) makes every call collect attention maps, for which the blocks
    run their original forward: the conversion was a no-op without a word (audit A2 of the
    fortieth session). The first such call says so, with the way out, and the model evolves
    once the config's flag is off."""
    torch.manual_seed(0)
    model = _randomise(FAMILIES["vit"][0]("eager")).eval()
    model.config.output_attentions = True
    x = torch.randn(2, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"in calls that collect its attention maps .* "
                                             r"`model\.config\.output_attentions`"):
            out = fast(x)
        assert [t for _, t in evoplug.tokens_per_block(fast)] == [-1] * 4
        assert torch.equal(_tensor(out), _tensor(model(x)))
        fast.config.output_attentions = False
        fast(x)
    assert [t for _, t in evoplug.tokens_per_block(fast)][1:] == [1 + 32 + 1] * 3


def test_hiera_mask_unit_attention_evolves():
    """Hiera's early stages attend within mask units of the unrolled tokens (an attention map
    per unit, ``(B, heads, units, n, n)``): the units run on the full sequence, the MLP on the
    kept tokens; keep 1.0 reproduces the model on both paths, and at keep 0.5 the mask-unit
    blocks run fewer tokens."""
    cfg = T.HieraConfig(image_size=[64, 64], patch_size=[7, 7], patch_stride=[4, 4], patch_padding=[3, 3],
                        embed_dim=32, depths=[1, 2, 2, 1], num_heads=[1, 2, 2, 4], query_stride=[2, 2],
                        masked_unit_size=[8, 8], num_query_pool=2)
    torch.manual_seed(0)
    model = _randomise(T.HieraModel(cfg)).eval()
    x = torch.randn(2, 3, 64, 64)
    fast = evoplug.convert(model, keep_ratio=0.5, start_block=1, example_input=x[:1])
    units = [s for s in evoplug.get_report(fast).blocks if s.analysis.windowed]
    assert units and "in windows" in units[0].analysis.attention
    with torch.no_grad():
        dense = model(x).last_hidden_state
        half = fast(x).last_hidden_state
        assert any(s.role == "evolve" and 0 < s.tokens_run < s.analysis.num_tokens for s in units)
        evoplug.set_options(fast, keep_ratio=1.0)
        assert torch.equal(fast(x).last_hidden_state, dense)
        evoplug.set_options(fast, identity_fast_path=False)
        assert float((fast(x).last_hidden_state - dense).abs().max()) <= 1e-5 * max(1.0, float(dense.abs().max()))
    assert float((half - dense).abs().max()) > 1e-4


def test_the_input_size_comes_from_the_configuration():
    """``config.image_size`` / ``num_channels`` (or the vision configuration's) is the size
    ``convert`` calibrates with when no example input is given."""
    cfg = dict(S, image_size=48, patch_size=8, num_channels=1)
    vit = T.ViTModel(T.ViTConfig(**cfg)).eval()
    assert evoplug.input_size(vit) == (1, 48, 48)
    fast = evoplug.convert(vit, keep_ratio=0.5)
    assert evoplug.get_report(fast).blocks[0].analysis.num_tokens == 1 + 6 * 6
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        fast(x)
    assert any(t < 37 for _, t in evoplug.tokens_per_block(fast))
    clip = T.CLIPModel(T.CLIPConfig(vision_config=dict(S, image_size=40, patch_size=8),
                                    text_config=dict(S, vocab_size=100)))
    assert evoplug.input_size(clip) == (3, 40, 40)
    assert evoplug.input_size(T.SwinModel(T.SwinConfig(image_size=(32, 64), patch_size=2, embed_dim=16,
                                                       depths=[1], num_heads=[1], window_size=4))) == (3, 32, 64)


def _video_reference(x, layers, keep, P, mean, start, every, alpha=0.5):
    """Evo-ViT's rules written out for a stack of transformers layers (ViViT's, VideoMAE's) on
    tubelet tokens ``x`` (B, N, C) with ``P`` prefix tokens, read independently of evoplug's
    code (audit B1 of the forty-first session): layer ``start - 1`` scores (class query, or the
    mean query over the patches: ``mean``), the later ones run [prefix, top-k, representative]
    (top-k by the scores, reselected every ``every`` layers), the others get the representative
    token's update, the kept tokens' scores are refreshed with ``alpha``."""
    def row(layer, h):
        h = layer.layernorm_before(h)
        a = layer.attention.attention if hasattr(layer.attention, "attention") else layer.attention
        B, n, C = h.shape
        q, k = ((a.query(h), a.key(h)) if hasattr(a, "query") else (a.q_proj(h), a.k_proj(h)))
        heads = a.num_attention_heads
        q, k = (t.view(B, n, heads, C // heads).transpose(1, 2) for t in (q, k))
        qg = q[:, :, P:].mean(2, keepdim=True) if mean else q[:, :, :1]
        return (qg @ k.transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1).mean(1)[:, 0]

    def run(layer, h):
        o = layer(h)
        return o[0] if isinstance(o, tuple) else o
    B, N, C = x.shape
    M = N - P
    k, g, sel, since = max(1, int(M * keep + 1e-6)), None, None, 0
    for i, layer in enumerate(layers):
        if i < start:
            g = row(layer, x)[:, P:] if i == start - 1 else g
            x = run(layer, x)
            continue
        if sel is None or since % every == 0:
            sel, since = g.sort(dim=1, descending=True, stable=True).indices[:, :k], 0
        xp = x[:, P:]
        picked = torch.stack([xp[b, sel[b]] for b in range(B)])
        w = g.clone()
        for b in range(B):
            w[b, sel[b]] = 0
        rep = ((w / w.sum(1, keepdim=True))[..., None] * xp).sum(1)
        sub = torch.cat([x[:, :P], picked, rep[:, None]], 1)
        out, a = run(layer, sub), row(layer, sub)[:, P:P + k]
        new = x.clone()
        new[:, P:] += (out[:, -1] - rep)[:, None]
        new[:, :P] = out[:, :P]
        g = g.clone()
        for b in range(B):
            new[b, P + sel[b]] = out[b, P:P + k]
            g[b, sel[b]] = (1 - alpha) * g[b, sel[b]] + alpha * a[b]
        x, since = new, since + 1
    return x


@pytest.mark.parametrize("opts", [dict(), dict(reselect_every=1), dict(start_block=3, reselect_every=2)])
@pytest.mark.parametrize("family", ["vivit", "videomae"])
def test_video_models_evolve_by_the_papers_rules_on_their_tubelets(family, opts):
    """ViViT (a class token, joint space-time attention) and VideoMAE (no class token: the mean
    query) over tubelet tokens evolve as the paper's rules written out (_video_reference), each
    video as alone; no test covered video models until audit B1 of the forty-first session,
    which found them right (2e-7 - 8e-7)."""
    torch.manual_seed(0)
    video = torch.randn(3, 4, 3, 32, 32)
    small = dict(image_size=32, num_frames=4, hidden_size=32, num_hidden_layers=6,
                 num_attention_heads=2, intermediate_size=64)
    if family == "vivit":
        model = T.VivitModel(T.VivitConfig(tubelet_size=[2, 8, 8], **small), add_pooling_layer=False).eval()
        embed, layers, final, P = model.embeddings, model.layers, model.layernorm, 1
    else:
        model = T.VideoMAEModel(T.VideoMAEConfig(patch_size=8, tubelet_size=2, **small)).eval()
        embed, layers, P = (lambda v: model.embeddings(v, None)), model.encoder.layer, 0
        final = model.layernorm if model.layernorm is not None else (lambda t: t)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=video[:1], **opts)
    with torch.no_grad():
        x = embed(video)
        ref = final(_video_reference(x, layers, 0.5, P, P == 0, opts.get("start_block", 2),
                                     opts.get("reselect_every", 4)))
        out, dense = fast(video).last_hidden_state, model(video).last_hidden_state
        assert (out - dense).abs().max() > 1e-2
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        alone = torch.cat([fast(video[i:i + 1]).last_hidden_state for i in range(3)])
        torch.testing.assert_close(alone, out, atol=1e-5, rtol=1e-5)


def test_a_video_models_input_is_a_video_of_its_configured_frames():
    """VideoMAE and ViViT take ``pixel_values`` (B, frames, C, H, W): evoplug made an image
    batch (1, C, H, W) from ``config.image_size`` and ``convert(model)`` failed ("pass
    example_input="), where docs/models.md says none is needed, until audit B1 of the
    forty-first session. The input it makes is now a video of ``config.num_frames``, and the
    model converts as on an example video given; TimeSformer is refused by name (its divided
    attention's tokens arrive regrouped), not for its input."""
    torch.manual_seed(0)
    video = dict(S, image_size=32, patch_size=8, num_frames=4)
    for model in (T.VideoMAEModel(T.VideoMAEConfig(tubelet_size=2, **video)),
                  T.VivitModel(T.VivitConfig(tubelet_size=[2, 8, 8], **video))):
        model.eval()
        assert tuple(evoplug.example_input(model).shape) == (1, 4, 3, 32, 32)
        fast = evoplug.convert(model, keep_ratio=0.5)
        want = evoplug.convert(model, keep_ratio=0.5, example_input=torch.randn(1, 4, 3, 32, 32))
        x = torch.randn(2, 4, 3, 32, 32)
        with torch.no_grad():
            out = fast(x).last_hidden_state
            torch.testing.assert_close(out, want(x).last_hidden_state, atol=1e-5, rtol=1e-5)
            assert (out - model(x).last_hidden_state).abs().max() > 1e-3
            evoplug.set_keep_ratio(fast, 1.0)
            torch.testing.assert_close(fast(x).last_hidden_state, model(x).last_hidden_state, atol=0, rtol=0)
    timesformer = T.TimesformerModel(T.TimesformerConfig(**video)).eval()
    with pytest.raises(evoplug.ConversionError, match="temporal_attention`: its tokens arrive regrouped"):
        evoplug.convert(timesformer, keep_ratio=0.5)


def test_another_input_size_is_found_whatever_the_call_form():
    """The twin for another input size is built from the tensors bound to the names the
    conversion's input had: by position or keyword, with output flags, and with the call's
    flags (Hiera needs ``interpolate_pos_encoding=True`` there). They raised before."""
    torch.manual_seed(0)
    swin = T.SwinModel(T.SwinConfig(**dict(SWIN, image_size=32, window_size=4))).eval()
    x = torch.randn(2, 3, 48, 48)
    fast = evoplug.convert(swin, keep_ratio=1.0, identity_fast_path=False)
    with torch.no_grad():
        ref = swin(x).last_hidden_state
        for call in (lambda f: f(pixel_values=x), lambda f: f(x, output_hidden_states=True),
                     lambda f: f(x)):
            out = call(fast).last_hidden_state
            assert float((out - ref).abs().max()) <= 1e-5
    assert len(next(m for m in fast.modules() if hasattr(m, "_evoplug_spec"))
               ._evoplug_spec.runtime.variants) == 1          # one twin for the size
    hiera = T.HieraModel(T.HieraConfig(embed_dim=16, image_size=[64, 64], patch_size=[7, 7],
                                       patch_stride=[4, 4], patch_padding=[3, 3], depths=[1, 1, 2, 1],
                                       num_heads=[1, 2, 4, 8])).eval()
    x = torch.randn(2, 3, 128, 128)
    fast = evoplug.convert(hiera, keep_ratio=1.0, identity_fast_path=False)
    with torch.no_grad():
        ref = hiera(x, interpolate_pos_encoding=True).last_hidden_state
        out = fast(x, interpolate_pos_encoding=True).last_hidden_state
    assert float((out - ref).abs().max()) <= 1e-5


def test_a_flag_given_by_position_goes_with_a_new_size():
    """``ViTModel(x, None, True)``: ``interpolate_pos_encoding`` by position at a size the model
    was not converted at. The twin was converted on the call's tensors and its keyword flags
    only, without the flag, and failed where the dense model runs (audit V3, thirty-seventh
    session)."""
    torch.manual_seed(0)
    vit = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, image_size=32, patch_size=4)).eval()
    x = torch.randn(2, 3, 48, 48)
    fast = evoplug.convert(vit, keep_ratio=1.0, identity_fast_path=False,
                           example_input=torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(fast(x, None, True).last_hidden_state,
                                   vit(x, None, True).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_flex_attention_is_refused_by_name_with_what_works():
    """``attn_implementation="flex_attention"``: the model runs (its calibration forward does),
    and its attention ran through a kernel whose score and mask functions are code, no tensors. The refusal said no attention
    ran at all, naming no module (audit V3, thirty-seventh session); it names the modules and
    the implementations that convert."""
    torch.manual_seed(0)
    cfg = T.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=64, image_size=32, patch_size=4)
    vit = T.ViTModel._from_config(cfg, attn_implementation="flex_attention").eval()
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(evoplug.ConversionError,
                           match=r"`[\w.]*layers?\.0\.attention[\w.]*`: its attention runs "
                                 r"through torch's flex_attention.*attn_implementation='sdpa'"):
            evoplug.convert(vit, keep_ratio=0.5, example_input=x)


def test_a_model_that_packs_its_images_into_one_sequence_refuses_a_batch():
    """transformers' Pixtral packs every image of a call into one token sequence (a
    block-diagonal mask keeps them apart). Converted on one image, a call with two would rank
    the tokens of both images together (and the mean query of the packed mask overflowed to
    NaN before the seventeenth session): it raises, naming the block; one image still runs."""
    cfg = T.PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, image_size=32, patch_size=4, head_dim=16)
    torch.manual_seed(0)
    model = T.PixtralVisionModel(cfg).eval()
    pix = torch.randn(2, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=pix[:1])
    with torch.no_grad():
        one = fast(pix[:1]).last_hidden_state
        assert one.shape == (1, 64, 64) and torch.isfinite(one).all()
        with pytest.raises(evoplug.EvoplugError, match=r"`transformer\.layers\.\d+` runs on a batch "
                                                       r"of 1 token sequence\(s\) for 2 image\(s\)"):
            fast(pix)


def test_vitdet_layers_on_channels_first_maps_evolve():
    """transformers' VitDet layers take and return a channels-first (B, C, H, W) map and permute
    it to channels-last themselves: they convert through that permute at their boundary
    (``CallPlan.token_perm`` (0, 2, 3, 1); refused by name until the nineteenth session), as
    timm's SAM blocks do: windowed and global layers, keep 1.0 exact through the machinery,
    fewer tokens at keep 0.5, each image as alone, the backbone's feature maps in their shape.
    Its decomposed relative positions, added into a view of the logits by the map's size
    (``add_decomposed_relative_positions``), are rewritten into one term on the logits as
    timm's SAM adds them (``canon._terms_out_of_logit_views``), which follows the kept tokens
    (the permutation probe refused those global layers before)."""
    torch.manual_seed(0)
    cfg = dict(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
               mlp_ratio=2, window_size=4, window_block_indices=[0, 2])
    model = T.VitDetBackbone(T.VitDetConfig(**cfg, out_features=["stage4"])).eval()
    x = torch.randn(3, 3, 64, 64)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    report = evoplug.get_report(fast)
    assert [s.analysis.plan.token_perm for s in report.blocks] == [(0, 2, 3, 1)] * 4
    with torch.no_grad():
        out = fast(x).feature_maps[0]
        assert out.shape == model(x).feature_maps[0].shape == (3, 64, 8, 8)
        assert [t for _, t in evoplug.tokens_per_block(fast)][2:] == [33] * 2     # windowed, global
        torch.testing.assert_close(fast(x[1:2]).feature_maps[0], out[1:2], atol=1e-5, rtol=1e-5)
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(x).feature_maps[0], model(x).feature_maps[0],
                                   atol=1e-5, rtol=1e-5)
    rel = T.VitDetModel(T.VitDetConfig(**cfg, use_relative_position_embeddings=True)).eval()
    fast = evoplug.convert(rel, keep_ratio=0.5, example_input=x[:1])
    assert any("one term on it" in n for n in evoplug.get_report(fast).blocks[1].analysis.notes)
    with torch.no_grad():
        out = fast(x).last_hidden_state
        assert [t for _, t in evoplug.tokens_per_block(fast)][2:] == [33] * 2
        torch.testing.assert_close(fast(x[1:2]).last_hidden_state, out[1:2], atol=1e-5, rtol=1e-5)
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(x).last_hidden_state, rel(x).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_an_attention_implementation_changed_after_the_conversion_is_refused_by_name():
    """transformers looks its attention function up at every call (``config._attn_implementation``
    in a global registry); the blocks' programs hold the one traced. A switch after the
    conversion (``set_attn_implementation``, a function registered anew under the name) ran the
    old computation silently (off by 0.03 at keep 1.0 until the nineteenth session); now it is
    refused naming the block, as a changed attribute is. A function of the user's own is traced
    like any Python: a warning says its side effects do not run with the converted blocks."""
    from transformers import AttentionInterface
    from transformers.models.vit.modeling_vit import eager_attention_forward
    seen = []

    def capture(module, q, k, v, mask, **kw):
        out, w = eager_attention_forward(module, q, k, v, mask, **kw)
        seen.append(w)
        return out, w

    def half(module, q, k, v, mask, **kw):
        out, w = eager_attention_forward(module, q, k, v, mask, **kw)
        return out * 0.5, w

    AttentionInterface.register("evoplug_test_capture", capture)
    AttentionInterface.register("evoplug_test_half", half)
    torch.manual_seed(0)
    cfg = T.ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4,
                      num_attention_heads=2, intermediate_size=128, num_labels=10)
    x = torch.randn(2, 3, 32, 32)
    model = T.ViTForImageClassification(cfg).eval()
    fast = evoplug.convert(model, keep_ratio=1.0, identity_fast_path=False)
    with torch.no_grad():
        fast(x)
        fast.set_attn_implementation("evoplug_test_half")
        with pytest.raises(evoplug.errors.EvoplugError, match="its config._attn_implementation "
                                                              "changed from 'sdpa' to 'evoplug_test_half'"):
            fast(x)
        fast.set_attn_implementation("eager")       # (no function in the registry: not "None")
        with pytest.raises(evoplug.errors.EvoplugError, match="changed from 'sdpa' to 'eager'"):
            fast(x)
    cfg._attn_implementation = "evoplug_test_capture"
    own = T.ViTForImageClassification(cfg).eval()
    with pytest.warns(UserWarning, match="not one of transformers' own"):
        fast = evoplug.convert(own, keep_ratio=1.0, identity_fast_path=False)
    AttentionInterface.register("evoplug_test_capture", half)
    with torch.no_grad(), pytest.raises(evoplug.errors.EvoplugError, match="attention function changed"):
        fast(x)


def test_hidden_states_and_heads_reading_them_at_another_input_size():
    """transformers records hidden states and attentions with hooks it installs at a model's
    first call. A twin (the model converted again for a new input size) made at a first call
    with ``output_hidden_states=True`` kept the hooks its analysis installed: every layer's
    state came twice (9 instead of 5, ``hidden_states[k]`` the wrong layer). A model whose hooks
    were already installed gave the twin none: heads that read the hidden states (SegFormer's
    decoder, DPT) failed to convert at another size. Now both as at the conversion's size."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, 48)
    model = T.ViTModel(T.ViTConfig(attn_implementation="eager", **FLAT)).eval()
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        for _ in range(2):
            out = fast(x, interpolate_pos_encoding=True, output_hidden_states=True, output_attentions=True)
            assert len(out.hidden_states) == 5 and len(out.attentions) == 4
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        out = fast(x, interpolate_pos_encoding=True, output_hidden_states=True)
        want = model(x, interpolate_pos_encoding=True, output_hidden_states=True)
        for h, w in zip(out.hidden_states, want.hidden_states):
            torch.testing.assert_close(h, w, atol=1e-5, rtol=1e-5)
    seg = T.SegformerForSemanticSegmentation(T.SegformerConfig(
        num_labels=5, decoder_hidden_size=32, image_size=32, num_encoder_blocks=2, depths=[2, 2],
        sr_ratios=[2, 1], hidden_sizes=[32, 64], num_attention_heads=[1, 2], patch_sizes=[7, 3],
        strides=[4, 2])).eval()
    with torch.no_grad():
        seg(torch.randn(1, 3, 32, 32))              # (its hooks installed before the conversion)
        fast = evoplug.convert(seg, keep_ratio=0.5, example_input=torch.randn(1, 3, 32, 32))
        alone = torch.cat([fast(x[i:i + 1]).logits for i in range(2)])
        torch.testing.assert_close(fast(x).logits, alone, atol=1e-5, rtol=1e-5)
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(x).logits, seg(x).logits, atol=1e-5, rtol=1e-5)


def test_head_mask_which_no_layer_reads_leaves_the_layers_evolving():
    """transformers 5 still takes ``head_mask`` and hands it to every layer's ``**kwargs``,
    where no layer reads it: the converted layers ran dense, with a warning each (audit F of
    the twenty-third session). The dense model ignores it; so do the converted layers now."""
    import warnings
    torch.manual_seed(0)
    m = T.ViTModel(T.ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4,
                               num_attention_heads=2, intermediate_size=128)).eval()
    x = torch.randn(2, 3, 32, 32)
    heads = torch.ones(4, 2)
    heads[1, 0] = 0
    fast = evoplug.convert(m, keep_ratio=0.5, example_input=x[:1])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(m(x, head_mask=heads)[0], m(x)[0])
        out = fast(x, head_mask=heads)[0]
        runs = [t for _, t in evoplug.tokens_per_block(fast)]
        torch.testing.assert_close(out, fast(x)[0], atol=1e-5, rtol=1e-5)
    assert runs[-1] > 0


def test_a_model_whose_last_stage_has_one_token_converts_on_the_input_evoplug_makes():
    """LeViT at its configured 64 px ends in a 1-token stage: the default input (one image)
    cannot tell its batch dim from its token dim, and strict conversion refused the model,
    though twins in that case are calibrated on 2, then 3 images (audit F of the twenty-third
    session). The first conversion does the same now."""
    torch.manual_seed(0)
    config = T.LevitConfig(num_labels=10, image_size=64, patch_size=16, hidden_sizes=[32, 48, 64],
                           num_attention_heads=[2, 2, 2], depths=[2, 2, 2], key_dim=[8, 8, 8],
                           down_ops=[["Subsample", 8, 2, 4, 2, 2], ["Subsample", 8, 4, 4, 2, 2]])
    model = T.LevitForImageClassification(config).eval()
    fast = evoplug.convert(model, keep_ratio=0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast(x)
        assert [s for s in evoplug.get_report(fast).blocks
                if s.role == "evolve" and 0 < s.tokens_run < s.analysis.num_tokens]
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def _padded(kind: str):
    """A model that hands its layers a padding mask only when some image of the batch is
    padded (None otherwise), a batch [unpadded image, padded image] and its keywords."""
    torch.manual_seed(0)
    if kind == "vit":       # transformers 5's ViT: ``attention_mask`` over [cls, patches]
        model = _randomise(T.ViTModel(T.ViTConfig(**FLAT))).eval()
        mask = torch.ones(2, 65, dtype=torch.long)
        mask[1, 41:] = 0
        return model, dict(pixel_values=torch.randn(2, 3, 32, 32), attention_mask=mask)
    # Siglip2 (NaFlex): patches of images of several sizes, padded to one length
    model = _randomise(T.Siglip2VisionModel(T.Siglip2VisionConfig(num_patches=64, patch_size=4, **S))).eval()
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 32:] = 0                  # image 1: 4x8 patches
    return model, dict(pixel_values=torch.randn(2, 64, 48), pixel_attention_mask=mask,
                       spatial_shapes=torch.tensor([[8, 8], [4, 8]]))


@pytest.mark.parametrize("calibrated", ["unpadded", "padded"])
@pytest.mark.parametrize("kind", ["vit", "siglip2"])
def test_a_padding_mask_in_either_form_evolves_and_no_image_depends_on_its_batch(kind, calibrated):
    """transformers drops an all-ones padding mask (the layers get None) and hands the layers a
    mask when some image is padded: a model converted on either form met the other in ordinary
    batches, and its layers ran their original forward there (a warning each), so an unpadded
    image's output depended on whether a padded one shared its batch, by up to 2.5 (audit F of
    the twenty-third session). The first layer that meets the other form now converts a twin of
    the model on that call (its first image and one padded image) and the forward runs it:
    every layer evolves in both forms, an image's output is its own, and a twin is what
    converting on such a batch gives."""
    import warnings
    model, call = _padded(kind)
    one = {k: v[:1] for k, v in call.items()}
    two = {k: v[1:] for k, v in call.items()}
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=one if calibrated == "unpadded" else two)
    direct = evoplug.convert(model, keep_ratio=0.5, example_input=call)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        both = fast(**call).last_hidden_state
        assert all(0 < t < 65 for _, t in evoplug.tokens_per_block(fast)[1:])
        alone = fast(**one).last_hidden_state
        assert all(0 < t < 65 for _, t in evoplug.tokens_per_block(fast)[1:])
        torch.testing.assert_close(alone[0], both[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both, direct(**call).last_hidden_state, atol=1e-5, rtol=1e-5)
        assert len(evoplug.get_report(fast).blocks[0].runtime.variants) == 1
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        for c in (call, one, two):
            torch.testing.assert_close(fast(**c).last_hidden_state, model(**c).last_hidden_state,
                                       atol=1e-5, rtol=1e-5)


def test_a_padding_mask_at_another_input_size_and_under_checkpointing():
    """A padded batch at another input size runs the twin converted for that size and form;
    gradient checkpointing recomputes the form twin's layers (the gradients are the plain
    ones); a twin that cannot be converted (on 2 images, nor on the whole call) leaves the
    layers on their original forward, with one warning naming the layer, and is not tried
    again."""
    model, call = _padded("vit")
    x, mask = call["pixel_values"], call["attention_mask"]
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    x48 = torch.randn(2, 3, 48, 48)
    mask48 = torch.ones(2, 145, dtype=torch.long)
    mask48[1, 100:] = 0
    with torch.no_grad():
        both = fast(x48, attention_mask=mask48, interpolate_pos_encoding=True).last_hidden_state
        assert all(0 < t < 145 for _, t in evoplug.tokens_per_block(fast)[1:])
        alone = fast(x48[:1], interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(alone[0], both[0], atol=1e-5, rtol=1e-5)
    fast.train()

    def grads(reentrant=None):
        fast.zero_grad()
        if reentrant is None:
            fast.activation_checkpointing_disable()
        else:
            fast.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        fast(x, attention_mask=mask).last_hidden_state.pow(2).mean().backward()
        assert all(0 < t < 65 for _, t in evoplug.tokens_per_block(fast)[1:])
        return [p.grad.clone() for p in fast.parameters() if p.grad is not None]
    plain = grads()
    for reentrant in (False, True):
        for a, b in zip(plain, grads(reentrant), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    fast.activation_checkpointing_disable()
    # a twin that fails to convert
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    tried = []

    def refuse(*a, **k):
        tried.append(1)
        raise evoplug.ConversionError("no such luck")
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(evoplug.variants, "_convert_twin", refuse)
        with pytest.warns(UserWarning, match=r"`layers.0` is called with attention_mask in another "
                                             r"form.*converting the model on this call failed") as said:
            out = fast(x, attention_mask=mask).last_hidden_state
        assert all(t == -1 for _, t in evoplug.tokens_per_block(fast))
        torch.testing.assert_close(out, model(x, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            fast(x, attention_mask=mask)
    assert len(tried) == 2      # on 2 images, then on the whole call; not again
    # one warning, not one per layer and call (audit V3, thirty-seventh session)
    assert [str(w.message).startswith("evoplug") for w in said].count(True) == 1
    assert not [w for w in again if str(w.message).startswith("evoplug")]


def test_a_form_twin_is_converted_on_two_images_of_a_large_batch():
    """A twin for a padding mask's form is converted on the batch's first image and its most
    padded one (labels, which differ from image to image, do not choose it): a twin's usual
    cost, not the batch's (on the whole call it took 28 s at batch 32 for a DeiT-S-sized ViT on
    this CPU, 3 s on 2 images)."""
    torch.manual_seed(0)
    model = T.ViTForImageClassification(T.ViTConfig(num_labels=10, **FLAT))
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6)
    mask = torch.ones(6, 65, dtype=torch.long)
    mask[4, 41:] = 0
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1]).train()
    seen, convert_twin = [], evoplug.variants._convert_twin

    def spy(convert, *a, **k):       # (the twin's conversion, and the input it is converted on)
        def seeing(m, *aa, example_input=None, **kk):
            seen.append(example_input)
            return convert(m, *aa, example_input=example_input, **kk)
        return convert_twin(seeing, *a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evoplug.variants, "_convert_twin", spy)
        fast(pixel_values=x, attention_mask=mask, labels=y).loss.backward()
    assert all(0 < t < 65 for _, t in evoplug.tokens_per_block(fast)[1:])
    assert len(seen) == 1 and torch.equal(seen[0]["attention_mask"], mask[[0, 4]])
    assert torch.equal(seen[0]["labels"], y[[0, 4]])


def test_explain_notes_a_value_not_evaluated_in_one_line():
    """A traced value the tracer could not evaluate on another example is noted by the first
    line of torch's error: explain() carried its whole text ("While executing ...", "Original
    traceback", a tlparse link), twice per block (audit T of the twenty-fifth session)."""
    config = T.SegformerConfig(image_size=32, num_encoder_blocks=2, depths=[2, 2], sr_ratios=[2, 1],
                               hidden_sizes=[32, 64], num_attention_heads=[1, 2])
    torch.manual_seed(0)
    fast = evoplug.convert(T.SegformerModel(config).eval(), example_input=torch.randn(1, 3, 32, 32))
    text = evoplug.explain(fast)
    assert "not evaluated on another example (" in text
    assert "While executing" not in text and "tlparse" not in text


def test_a_flag_of_another_value_at_the_conversion_size_converts_a_twin():
    """BEiT's layers read ``interpolate_pos_encoding``. A caller passing it at every size ran
    every layer's own forward at the size the model was converted at, with a warning per layer
    and call, and evolved at every other size (audits Q and T of the twenty-fifth session). A
    flag of another value now converts a twin on the call, as a mask of another form does: it
    gives what converting with the flag gives, keep 1.0 what the model gives."""
    config = T.BeitConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=128, image_size=32, patch_size=4,
                          use_relative_position_bias=True)
    torch.manual_seed(0)
    model = _randomise(T.BeitModel(config).eval())
    x = torch.randn(3, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    direct = evoplug.convert(model, keep_ratio=0.5,
                             example_input={"pixel_values": x[:1], "interpolate_pos_encoding": True})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _tensor(fast(x, interpolate_pos_encoding=True))
        assert [t for _, t in evoplug.tokens_per_block(fast)] == [65, 34, 34, 34]
        torch.testing.assert_close(out, _tensor(direct(x, interpolate_pos_encoding=True)),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_tensor(fast(x[1:2], interpolate_pos_encoding=True)), out[1:2],
                                   atol=1e-5, rtol=1e-5)
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(_tensor(fast(x, interpolate_pos_encoding=True)),
                                   _tensor(model(x, interpolate_pos_encoding=True)), atol=1e-5, rtol=1e-5)


def test_a_stage_of_one_block_converts_with_the_nested_items_it_returns():
    """transformers' Swinv2 with a last stage of depth 1: the stage itself is the block, and it
    returns (tokens, tokens before downsampling, (h, w, h, w)); the converted stage returned the
    last item flattened, (..., 2, 2, 2, 2), and the encoder failed where the dense model runs
    (audit Q2 of the twenty-sixth session). Keep 1.0 on the evolving path gives the dense
    logits and hidden states; keep 0.5 runs."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    cfg = T.Swinv2Config(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2, 2, 1],
                         num_heads=[1, 2, 2, 4], window_size=2, num_labels=10)
    model = T.Swinv2ForImageClassification(cfg).eval()
    same = evoplug.convert(model, keep_ratio=1.0, identity_fast_path=False, example_input=x)
    assert evoplug.get_report(same).blocks[-1].name == "swinv2.encoder.layers.3"
    with torch.no_grad():
        torch.testing.assert_close(same(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
        got, want = same(x, output_hidden_states=True), model(x, output_hidden_states=True)
        for a, b in zip(got.reshaped_hidden_states, want.reshaped_hidden_states):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        fast = evoplug.convert(model, keep_ratio=0.5, example_input=x)
        assert fast(x).logits.shape == (2, 10)
    assert dict(evoplug.tokens_per_block(fast))["swinv2.encoder.layers.3"] == 3


def test_a_cache_the_layers_own_forward_fills_is_no_change_after_the_conversion():
    """transformers' LeViT attention keeps its bias table in a dict keyed by the device, filled
    by its own forward in eval mode (``attention_bias_cache``). The conversion left it empty and
    took the empty dict for a setting its programs were traced with; the layers' own forward
    (keep 1.0 on the fast path, a call with other keywords) filled it, and every later call of
    the programs was refused as a change after the conversion ("`module.attention_bias_cache`
    (LevitAttention) changed from {} to {'cpu': tensor(...)}"), keep 0.5 and keep 1.0 off the
    fast path (audit A1 of the fifty-second session). Now such a cache is the layer's own state."""
    torch.manual_seed(0)
    model = _randomise(T.LevitModel(T.LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], depths=[2, 2, 2],
                                                  num_attention_heads=[2, 2, 2], key_dim=[8, 8, 8]))).eval()
    x = torch.randn(2, 3, 64, 64)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    with torch.no_grad():
        half = fast(x).last_hidden_state
        evoplug.set_options(fast, keep_ratio=1.0)
        assert torch.equal(fast(x).last_hidden_state, model(x).last_hidden_state)
        evoplug.set_options(fast, keep_ratio=0.5)
        assert torch.equal(fast(x).last_hidden_state, half)
        assert 0 < evoplug.tokens_per_block(fast)[-1][1] < 16
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(x).last_hidden_state, model(x).last_hidden_state, atol=1e-4, rtol=1e-5)
