"""Every model of the core's list converts; keep 1.0 reproduces it; keep 0.5 runs the
evolving blocks on fewer tokens; checkpoints load strictly; backward works in train mode."""
import copy

import pytest
import timm
import torch
from torch import nn

import evoplug
from evoplug.runtime import evolve as ev
from evoplug.tools import bench
from models import ALL, build


def _convert(name, keep=0.5, **opts):
    model, size, prefix = build(name)
    model.eval()
    x = torch.randn(2, 3, size, size)
    fast = evoplug.convert(model, keep_ratio=keep, example_input=x[:1], **opts)
    return model, fast, x, prefix


def _linear_token_counts(model):
    """Tokens seen by the nn.Linear layers of each converted block in the next forward."""
    seen, handles = {}, []
    for spec in evoplug.get_report(model).blocks:
        name = spec.analysis.name
        for m in spec.analysis.module.modules():
            if isinstance(m, nn.Linear):
                def hook(mod, inp, out, name=name):
                    t = inp[0]
                    if t.dim() == 3:
                        seen.setdefault(name, set()).add(t.shape[1])
                handles.append(m.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("name", ALL)
def test_keep_one_reproduces_and_half_uses_fewer_tokens(name):
    model, fast, x, prefix = _convert(name)
    report = evoplug.get_report(fast)
    assert len(report.blocks) >= 6
    assert all(s.analysis.num_prefix == prefix for s in report.blocks), evoplug.explain(fast)
    with torch.no_grad():
        ref = model(x)
        # keep 0.5: same shape, finite, evolving blocks run on P + k + 1 tokens
        seen, handles = _linear_token_counts(fast)
        out = fast(x)
        for h in handles:
            h.remove()
        assert out.shape == ref.shape and torch.isfinite(out).all()
        for spec in report.blocks:
            a = spec.analysis
            M = a.num_tokens - a.num_prefix
            if spec.role == "evolve":
                want = a.num_prefix + ev.num_keep(M, 0.5) + 1
                assert spec.tokens_run == want
                if seen.get(a.name):
                    assert max(seen[a.name]) == want, (a.name, seen[a.name])
            elif seen.get(a.name):
                assert seen[a.name] == {a.num_tokens}
        assert sum(s.role == "evolve" for s in report.blocks) >= len(report.blocks) // 2
        # keep 1.0: original outputs (original forward of every block)
        evoplug.set_keep_ratio(fast, 1.0)
        assert (fast(x) - ref).abs().max().item() <= 1e-5
        # keep 1.0 through the selection machinery (gather, position terms, scatter back)
        evoplug.set_options(fast, identity_fast_path=False)
        assert (fast(x) - ref).abs().max().item() <= 1e-5
        assert all(s.tokens_run == s.analysis.num_tokens for s in report.blocks if s.role == "evolve")


@pytest.mark.parametrize("name", ALL)
def test_checkpoint_loads_strictly_and_params_unchanged(name):
    model, fast, x, _ = _convert(name)
    assert list(fast.state_dict()) == list(model.state_dict())
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in model.parameters())
    # a dense checkpoint (of another instance) loads strictly into the converted model
    other, _, _ = build(name)
    for p in other.parameters():
        nn.init.normal_(p, std=0.02)
    fast.load_state_dict(other.state_dict(), strict=True)
    evoplug.set_keep_ratio(fast, 1.0)
    other.eval()
    with torch.no_grad():
        assert (fast(x) - other(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "beit_base_patch16_224",
                                  "eva02_tiny_patch14_224", "cait_xxs24_224", "plain_vit"])
def test_backward_in_train_mode(name):
    extra = {} if name == "plain_vit" else dict(drop_path_rate=0.1)
    model, size, _ = build(name, **extra)
    x = torch.randn(2, 3, size, size)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    fast.train()
    out = fast(x)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in fast.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    evolving = [s for s in evoplug.get_report(fast).blocks if s.role == "evolve"]
    assert evolving and all(s.tokens_run < s.analysis.num_tokens for s in evolving)
    # the evolving blocks' own weights get gradients
    w = next(p for p in evolving[-1].analysis.module.parameters() if p.dim() == 2)
    assert w.grad.abs().sum() > 0


def test_flops_drop_as_the_schedule_says():
    model, size, _ = build("deit_small_patch16_224")
    model.eval()
    x = torch.randn(1, 3, size, size)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x)

    def flops(m):
        return bench.flops(m, x)

    dense, evo = flops(model), flops(fast)
    assert evo < 0.8 * dense
    evoplug.set_keep_ratio(fast, 1.0)
    assert flops(fast) == dense


def test_mixed_precision_autocast_runs():
    model, size, _ = build("deit_tiny_patch16_224")
    x = torch.randn(2, 3, size, size)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    fast.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
        ref = model.eval()(x)
    assert out.dtype == ref.dtype and torch.isfinite(out.float()).all()


def test_plain_vit_sequence_first_mha():
    model, size, _ = build("plain_vit", batch_first=False)
    model.eval()
    x = torch.randn(2, 3, size, size)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    with torch.no_grad():
        ref = model(x)
        assert fast(x).shape == ref.shape
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        assert (fast(x) - ref).abs().max().item() <= 1e-5


class _TorchEncoderViT(nn.Module):
    """A ViT built from PyTorch's own ``nn.TransformerEncoderLayer`` (batch first, or
    sequence-first as PyTorch's default: (N, B, C) between the layers), as layers in a
    ``Sequential`` or inside ``nn.TransformerEncoder``; an optional key padding mask."""

    def __init__(self, norm_first, encoder, d=64, depth=6, batch_first=True, nested=False):
        super().__init__()
        self.embed = nn.Conv2d(3, d, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 65, d) * 0.1)
        layer = lambda: nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=batch_first,  # noqa: E731
                                                   norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer(), depth, enable_nested_tensor=nested) if encoder \
            else nn.Sequential(*[layer() for _ in range(depth)])
        self.head = nn.Linear(d, 10)
        self.batch_first = batch_first

    def forward(self, x, mask=None):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        pad = {} if mask is None else {"src_key_padding_mask": mask}
        if self.batch_first:
            return self.head(self.enc(t, **pad)[:, 0])
        return self.head(self.enc(t.transpose(0, 1), **pad)[0])


def test_nested_tokens_of_torch_encoder_fast_path_run_dense_and_say_so():
    """``nn.TransformerEncoder`` built with its default ``enable_nested_tensor=True`` makes a
    padded batch a nested tensor in inference and hands it to its layers (without the mask):
    the converted layers raised torch's "NestedTensorImpl doesn't support sizes" (audit A4 of
    the fortieth session). They run their own forward on it, exactly, with one warning naming
    the way to evolve; without the encoder's nested form they evolve."""
    torch.manual_seed(0)
    model = _TorchEncoderViT(norm_first=False, encoder=True, nested=True).eval()
    x = torch.randn(3, 3, 32, 32)
    pad = torch.zeros(3, 65, dtype=torch.bool)
    pad[1, 40:] = True
    pad[2, 20:] = True
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    with torch.no_grad():
        ref = model(x, pad)
        with pytest.warns(UserWarning, match=r"`enc\.layers\.\d` is given its tokens as a nested "
                                             r"tensor.*enable_nested_tensor=False") as told:
            out = fast(x, pad)
        assert sum("nested tensor (nn." in str(w.message) for w in told) == 1
        assert (out - ref).abs().max() == 0
        fast.enc.use_nested_tensor = False          # (what enable_nested_tensor=False sets)
        assert [t for _, t in evoplug.tokens_per_block(fast)] == [-1] * 6
        fast(x, pad)
        assert [t for _, t in evoplug.tokens_per_block(fast)][1:] == [65] + [1 + 32 + 1] * 4


class _PosLayer(nn.Module):
    """A DETR-style layer: positions added to the queries and keys at every layer, laid out
    like the tokens ((N, B, C) when sequence-first)."""

    def __init__(self, d, batch_first):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=batch_first)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, pos, gate):
        h = self.n1(x)
        q = k = h + pos
        x = x + self.attn(q, k, h, need_weights=False)[0] * gate[..., None]
        return x + self.ff(self.n2(x))


class _PosViT(nn.Module):
    def __init__(self, batch_first, d=64):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, d, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 65, d))
        self.gate = nn.Linear(d, 1)
        self.layers = nn.ModuleList([_PosLayer(d, batch_first) for _ in range(6)])
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        pos = self.pos.expand(t.shape[0], -1, -1)
        gate = self.gate(t)[..., 0].sigmoid()           # per image and token (B, N)
        if not self.batch_first:
            t, pos, gate = t.transpose(0, 1), pos.transpose(0, 1), gate.transpose(0, 1)
        for layer in self.layers:
            t = layer(t, pos, gate)
        return self.head(t[:, 0] if self.batch_first else t[0])


def test_sequence_first_layers_with_positions_laid_out_like_their_tokens():
    """A sequence-first layer's other arguments laid out like its tokens (DETR's positions,
    (N, B, C); a per-token gate (N, B)) follow the kept tokens like the batch-first layer's
    (B, N, C) and (B, N): the same outputs as the batch-first conversion of the same weights.
    A calibration batch equal to the token count cannot tell the layouts apart: refused (the
    (N, N, C) tokens were taken as batch-first, off by 0.8 at keep 1.0)."""
    torch.manual_seed(0)
    seq, ref = _PosViT(False).eval(), _PosViT(True).eval()
    ref.load_state_dict(seq.state_dict())
    x = torch.randn(3, 3, 32, 32)
    fast = evoplug.convert(seq, keep_ratio=0.5, example_input=x[:1])
    twin = evoplug.convert(ref, keep_ratio=0.5, example_input=x[:1])
    assert evoplug.get_report(fast).blocks[2].analysis.plan.perm_args == ("pos", "gate")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), twin(x), atol=1e-5, rtol=1e-5)
        assert [t for _, t in evoplug.tokens_per_block(fast)][2:] == [34] * 4
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(x), seq(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(evoplug.errors.ConversionError, match="as many as the images"):
        evoplug.convert(seq, example_input=torch.randn(65, 3, 32, 32))


class _SeqInputs(nn.Module):
    """A model called with sequence-first tokens and positions ((N, B, C), DETR's encoder)."""

    def __init__(self, d=64):
        super().__init__()
        self.layers = nn.ModuleList([_PosLayer(d, False) for _ in range(6)])
        self.gate, self.head = nn.Linear(d, 1), nn.Linear(d, 10)

    def forward(self, t, pos):
        gate = self.gate(t)[..., 0].sigmoid()
        for layer in self.layers:
            t = layer(t, pos, gate)
        return self.head(t[0])


def test_a_model_called_with_sequence_first_inputs_converts_again_at_another_batch_size():
    """A model whose own inputs are (N, B, C) (tokens and positions) called at another batch
    size than its conversion's is converted again on the call's first image along dim 1, and
    its key drops dim 1 (the twin build sliced dim 0: one token, refused as square), whether
    called by position or by keyword; each image's output is the one it gets alone."""
    torch.manual_seed(0)
    model = _SeqInputs().eval()
    t, pos = torch.randn(65, 3, 64), torch.randn(65, 3, 64)
    for example in ((t[:, :2], pos[:, :2]), {"t": t[:, :2], "pos": pos[:, :2]}):
        fast = evoplug.convert(model, keep_ratio=0.5, example_input=example)
        with torch.no_grad():
            alone = torch.cat([fast(t[:, i:i + 1], pos[:, i:i + 1]) for i in range(3)])
            torch.testing.assert_close(fast(t, pos), alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fast(t=t[:, :2], pos=pos[:, :2]), alone[:2], atol=1e-5, rtol=1e-5)
            assert [n for _, n in evoplug.tokens_per_block(fast)][2:] == [33] * 4
            evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
            torch.testing.assert_close(fast(t, pos), model(t, pos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("encoder", [False, True])
def test_sequence_first_transformer_layers_evolve_as_batch_first_ones(norm_first, encoder):
    """PyTorch's ``nn.TransformerEncoderLayer`` takes (N, B, C) by default (``batch_first=False``):
    such layers convert through a transpose at their boundary (``CallPlan.token_perm``; refused
    as regrouped tokens until the nineteenth session). The same weights as batch-first layers
    give the batch-first conversion's outputs and gradients (reselecting every block, and every
    4 blocks: sequence-first blocks restore the order after each block), with a key padding
    mask too."""
    torch.manual_seed(0)
    seq = _TorchEncoderViT(norm_first, encoder, batch_first=False).eval()
    ref = _TorchEncoderViT(norm_first, encoder).eval()
    ref.load_state_dict(seq.state_dict())
    x = torch.randn(3, 3, 32, 32)
    for every in (1, 4):
        fast = evoplug.convert(seq, keep_ratio=0.5, reselect_every=every, example_input=x[:1])
        twin = evoplug.convert(ref, keep_ratio=0.5, reselect_every=every, example_input=x[:1])
        assert [s.analysis.plan.token_perm for s in evoplug.get_report(fast).blocks] == [(1, 0, 2)] * 6
        with torch.no_grad():
            out = fast(x)
            torch.testing.assert_close(out, twin(x), atol=1e-5, rtol=1e-5)
            assert [t for _, t in evoplug.tokens_per_block(fast)][2:] == [34] * 4
            assert (out - seq(x)).abs().max() > 1e-3          # it evolved
        fast.train(), twin.train()
        grads = torch.autograd.grad(fast(x).square().sum(), list(fast.parameters()))
        want = torch.autograd.grad(twin(x).square().sum(), list(twin.parameters()))
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        evoplug.set_options(fast.eval(), keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(x), seq(x), atol=1e-5, rtol=1e-5)
    if not encoder:
        return
    mask = torch.zeros(3, 65, dtype=torch.bool)
    mask[:, -5:] = True       # (a per-image mask: calibrated at two images, as documented)
    fast = evoplug.convert(seq, keep_ratio=0.5, example_input=(x[:2], mask[:2]))
    twin = evoplug.convert(ref, keep_ratio=0.5, example_input=(x[:2], mask[:2]))
    with torch.no_grad():
        torch.testing.assert_close(fast(x, mask), twin(x, mask), atol=1e-5, rtol=1e-5)


class _Transposing(nn.Module):
    """A batch-first wrapper around a sequence-first ``nn.TransformerEncoderLayer``."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.transpose(0, 1)).transpose(0, 1)


def test_a_batch_first_wrapper_around_a_sequence_first_layer_converts_the_layer():
    """A wrapper that transposes batch-first tokens around PyTorch's sequence-first layer is no
    block itself (its residual stream is the layer's): the layer inside converts, as in the
    model that transposes once around all the layers. It was refused as "a leaf" that torch.fx
    does not trace into (audit W4 of the thirty-eighth session)."""
    torch.manual_seed(0)
    seq = _TorchEncoderViT(False, False, batch_first=False).eval()
    wrapped = copy.deepcopy(seq)
    wrapped.enc = nn.Sequential(*[_Transposing(layer) for layer in seq.enc])
    wrapped.batch_first = True
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), seq(x), atol=1e-6, rtol=1e-6)
        fast = evoplug.convert(wrapped, keep_ratio=0.5, example_input=x[:2])
        twin = evoplug.convert(seq, keep_ratio=0.5, example_input=x[:2])
        assert [s.name for s in evoplug.get_report(fast).blocks] == [
            f"enc.{i}.layer" for i in range(6)]
        assert [s.analysis.plan.token_perm for s in evoplug.get_report(fast).blocks] == [(1, 0, 2)] * 6
        torch.testing.assert_close(fast(x), twin(x), atol=1e-5, rtol=1e-5)
        assert (fast(x) - wrapped(x)).abs().max() > 1e-3          # it evolved
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(x), wrapped(x), atol=1e-5, rtol=1e-5)


def _spread_encoder(batch_first):
    """A pre-norm ``nn.TransformerEncoder`` ViT whose weights spread the attention (PyTorch's
    init leaves it near uniform, where any selection gives about the same output)."""
    torch.manual_seed(0)
    model = _TorchEncoderViT(True, True, batch_first=batch_first).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_key_padding_mask_the_conversion_did_not_see_converts_a_twin(batch_first):
    """A model converted without ``src_key_padding_mask`` and called with one: the first layer
    that runs a program converts a twin of the model on the call (2 of its images) and the
    forward runs it (runtime/twins.py ``_form_twin``). A first padded batch whose images are all
    padded alike was converted on its first image alone, which a per-image mask cannot be
    analysed on; the failure was kept, so every later padded batch ran dense, off by 5.6 from
    the same call made in another order (audit K of the twenty-fourth session)."""
    model = _spread_encoder(batch_first)
    x = torch.randn(3, 3, 32, 32)
    alike = torch.zeros(3, 65, dtype=torch.bool)
    alike[:, 40:] = True
    pad = torch.zeros(3, 65, dtype=torch.bool)
    pad[1, 40:] = pad[2, 20:] = True
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    with torch.no_grad():
        for mask in (alike, pad):
            out = fast(x, mask)
            assert [t for _, t in evoplug.tokens_per_block(fast)][2:] == [34] * 4
        direct = evoplug.convert(model, keep_ratio=0.5, example_input=(x, pad))
        torch.testing.assert_close(out, direct(x, pad), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:1], fast(x[:1]), atol=1e-5, rtol=1e-5)
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(x, pad), model(x, pad), atol=1e-5, rtol=1e-5)


def test_a_form_twin_takes_a_padded_image_and_leaves_what_the_batch_shares_whole():
    """The images a form twin is converted on: the first and the most padded (by the entries of
    its per-image integer arguments of 2 dims or more), not the first whose label differs; a
    mask the batch shares ((N, N), no batch dim) is not one: it chose "images" past the batch
    and was cut to 2 rows (audit K of the twenty-fourth session)."""
    from evoplug.variants import _first_image, _form_images
    x, labels = torch.randn(4, 3, 8, 8), torch.arange(4)
    pad = torch.ones(4, 65, dtype=torch.long)
    pad[2, 50:] = 0
    pad[3, 30:] = 0
    shared = torch.zeros(65, 65, dtype=torch.bool)
    shared[:, 50:] = True
    assert _form_images((x, pad, labels, shared), {}, {}) == [0, 3]
    assert _form_images((x, torch.ones(4, 65), labels, shared), {}, {}) == [0, 1]
    assert _form_images((x[:1],), {}, {}) == [0]
    two = _first_image((x, pad, labels, shared), {}, {}, None, [0, 3])
    assert torch.equal(two[1], pad[[0, 3]]) and torch.equal(two[2], labels[[0, 3]])
    assert two[0].shape[0] == 2 and two[3] is shared


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("encoder", [False, True])
def test_torch_transformer_encoder_layers_convert(norm_first, encoder):
    """``nn.TransformerEncoderLayer``'s forward checks tensor metadata (``src.is_nested``) before
    its fused path: a trace specialises such reads like sizes (it refused them as values, a
    data-dependent branch, before the seventeenth session) and follows the layer's own path."""
    torch.manual_seed(0)
    model = _TorchEncoderViT(norm_first, encoder).eval()
    x = torch.randn(3, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    report = evoplug.get_report(fast)
    assert [s.role for s in report.blocks] == ["dense", "score"] + ["evolve"] * 4
    # post-norm too: the stream goes on through the norm after each residual add (explain()
    # called post-norm blocks attention-only until the eighteenth session)
    a = report.blocks[2].analysis
    assert [b.role for b in a.branches] == ["attention", "mlp"], a.branches
    assert not any("attention-only" in n for n in a.notes)
    with torch.no_grad():
        out = fast(x)
        assert [t for _, t in evoplug.tokens_per_block(fast)][2:] == [34] * 4
        torch.testing.assert_close(out[1:2], fast(x[1:2]), atol=1e-5, rtol=1e-5)
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
    fast.train()
    evoplug.set_options(fast, keep_ratio=0.5, identity_fast_path=True)
    fast(x).sum().backward()
    assert all(p.grad is not None for p in fast.enc.parameters())


class _SdpaLayer(nn.Module):
    """``nn.TransformerEncoderLayer(norm_first=True)`` written by hand on the same parameters,
    with ``scaled_dot_product_attention`` and its position mask as a buffer (in SDPA's form:
    True attends)."""

    def __init__(self, layer, mask):
        super().__init__()
        self.layer = layer
        self.register_buffer("mask", mask)

    def forward(self, x):
        layer, B, N, C = self.layer, *x.shape
        attn, H = layer.self_attn, layer.self_attn.num_heads
        qkv = nn.functional.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        x = x + attn.out_proj(o.transpose(1, 2).reshape(B, N, C))
        return x + layer.linear2(torch.relu(layer.linear1(layer.norm2(x))))


class _MaskedEncoder(nn.Module):
    """PyTorch's encoder layers called with ``src_mask``, a fixed (N, N) mask of the positions
    each token sees (additive float or bool, True masked), or the same layers by hand."""

    def __init__(self, by_hand, cls_token, bool_mask, d=64, depth=3):
        super().__init__()
        torch.manual_seed(0)
        n = 16 + cls_token
        self.embed = nn.Conv2d(3, d, 8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d)) if cls_token else None
        self.pos = nn.Parameter(torch.randn(1, n, d) * 0.1)
        layers = [nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True,
                                             norm_first=True) for _ in range(depth)]
        for p in nn.ModuleList(layers).parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=p.shape[-1] ** -0.5)
        sees = torch.rand(n, n, generator=torch.Generator().manual_seed(1)) > 0.4
        sees.fill_diagonal_(True)
        self.src_mask = ~sees if bool_mask else torch.zeros(n, n).masked_fill(~sees, float("-inf"))
        self.blocks = nn.ModuleList([_SdpaLayer(la, sees) for la in layers] if by_hand else layers)
        self.by_hand = by_hand
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos
        for block in self.blocks:
            x = block(x) if self.by_hand else block(x, src_mask=self.src_mask)
        return self.head(x.mean(1))


@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("bool_mask", [False, True])
def test_torch_encoder_layers_given_a_src_mask_evolve_as_the_same_layers_by_hand(cls_token, bool_mask):
    """``src_mask`` (N, N) to ``nn.TransformerEncoderLayer``: gathered for the kept tokens and
    handed to ``nn.MultiheadAttention`` in its (B * heads, n, n) form, the global row taking the
    mask (the mean query's per key over the rows that see it). The layers evolve as the same
    layers written by hand with ``scaled_dot_product_attention`` and the mask as a buffer. Before
    the twenty-fifth session the layers were refused: torch.fx could not trace
    ``F._none_or_dtype(src_mask)``; and the global row of ``nn.MultiheadAttention`` averaged a
    mask that differs between the query rows into -inf for every key (NaN outputs)."""
    x = torch.randn(3, 3, 32, 32)
    torch_layers = _MaskedEncoder(False, cls_token, bool_mask).eval()
    by_hand = _MaskedEncoder(True, cls_token, bool_mask).eval()
    fast = evoplug.convert(torch_layers, keep_ratio=0.5, example_input=x[:1], inplace=False)
    reference = evoplug.convert(by_hand, keep_ratio=0.5, example_input=x[:1])
    assert "argument `src_mask`" in evoplug.explain(fast)
    with torch.no_grad():
        out = fast(x)
        assert [t for _, t in evoplug.tokens_per_block(fast)][1:] == [9 + cls_token] * 2
        torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1:2], fast(x[1:2]), atol=1e-5, rtol=1e-5)
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(x), torch_layers(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("global_query", ["cls", "mean"])
def test_what_the_padding_holds_does_not_move_the_real_tokens_of_torch_layers(batch_first, global_query):
    """``nn.MultiheadAttention``'s ``key_padding_mask`` in the global row: padded keys get no
    attention and padded queries stay out of the mean query. The row left the mask out before
    the twenty-fifth session, so the padding's content chose the kept tokens and moved the real
    ones' outputs (by 0.56 with the class token as the query, 1.39 with the mean query)."""
    model = _spread_encoder(batch_first)
    x = torch.randn(2, 3, 32, 32)
    pad = torch.zeros(2, 65, dtype=torch.bool)
    pad[:, 41:] = True                   # the patches of image rows 20 to 31
    other = x.clone()
    other[:, :, 20:] = torch.randn(2, 3, 12, 32) * 5
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=(x, pad), global_query=global_query)
    with torch.no_grad():
        torch.testing.assert_close(model(x, pad), model(other, pad))
        torch.testing.assert_close(fast(x, pad), fast(other, pad), atol=1e-5, rtol=1e-5)


def test_a_mask_per_image_and_head_for_torch_layers_is_refused_by_name():
    """A 3-D ``src_mask`` (batch * heads, N, N): converted at one image it was taken for a
    shared per-head term and failed at 3 images with a bare expand error mid-forward; at 2 images
    the refusal blamed a tensor built from the token count. Refused by name, saying what is
    gathered (twenty-fifth session)."""
    class PerHead(_MaskedEncoder):
        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
            mask = self.src_mask.expand(x.shape[0] * 4, -1, -1)
            for block in self.blocks:
                x = block(x, src_mask=mask)
            return self.head(x[:, 0])

    model = PerHead(False, True, False).eval()
    with pytest.raises(evoplug.errors.ConversionError, match=r"`blocks.0`: nn.MultiheadAttention "
                       r"`self_attn` is given a 3-D attn_mask \(4, 17, 17\)"):
        evoplug.convert(model, example_input=torch.randn(1, 3, 32, 32))


def test_tnt_is_refused_naming_the_block_that_runs_its_two_attentions():
    """TNT's block runs an attention on the pixel tokens and one on the patch tokens and
    returns both streams: its patch attention was refused for having no residual, as if the
    attention module were the block (audit P4 of the twenty-eighth session); the block that
    holds the residual is named, with what it runs."""
    model = timm.create_model("tnt_s_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    with pytest.raises(evoplug.ConversionError, match=r"`blocks\.0\.attn_out`: .*no residual attention "
                       r"branch\); the module around it, `blocks\.0`, runs 2 attention computations"):
        evoplug.convert(model, 0.5, example_input=torch.randn(1, 3, 64, 64))


def test_gcvit_converts_its_windowed_stages_and_refuses_the_single_window_ones():
    """GCViT hands every block a global query map (B, 7, 7, C) with no token dim: each block
    was refused for it until the twenty-eighth session. A per-image value with no token dim
    passes to the subset as it is: the windowed stages 0-1 run their windows on the full map
    (with every MLP's last linear zeroed keep 0.5 gives the dense output), while the queries of
    stages 2-3 (one window, the whole map) are refused by the permutation probe."""
    import copy
    torch.manual_seed(0)
    model = timm.create_model("gcvit_xxtiny", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    fast = evoplug.convert(model, 0.5, example_input=x[:1], strict=False)
    report = evoplug.get_report(fast)
    assert [s.analysis.name for s in report.blocks] == [
        "stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0", "stages.1.blocks.1"]
    assert report.failed[0][0] == "stages.2.blocks.0" and "not equivariant" in report.failed[0][1]
    assert "`q_global` (1, 7, 7, 64) -> as it is (no token dim)" in evoplug.explain(fast)
    with torch.no_grad():
        out, dense = fast(x), model(x)
        assert (out - dense).abs().max() > 1e-3
        torch.testing.assert_close(fast(x[1:]), out[1:], rtol=1e-5, atol=1e-5)
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(x), dense, rtol=1e-5, atol=1e-5)
        evoplug.set_options(fast, keep_ratio=0.5, identity_fast_path=True)
        zeroed = copy.deepcopy(model)
        for net in (fast, zeroed):
            for name, m in net.named_modules():
                if name.endswith("mlp.fc2"):
                    m.weight.zero_()
                    m.bias.zero_()
        torch.testing.assert_close(fast(x), zeroed(x), rtol=0, atol=1e-6)
