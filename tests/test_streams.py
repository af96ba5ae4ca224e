"""Where the tokens come from: models without a 4-D patch map (a reshape + ``nn.Linear`` patch
embedding, a ``Conv3d`` over video) and models with several token streams (two image towers,
a text tower run before the image tower). Each case was converted silently wrong before the
seventeenth session: the class token ranked as a patch, one tower's scores selecting the other
tower's tokens, a causal text tower evolved."""
import pytest
import torch
from torch import nn

import evoplug
from evoplug.errors import ConversionError


class Block(nn.Module):
    def __init__(self, d=64, heads=4, causal=False):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.heads, self.causal = heads, causal

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5
        if self.causal:
            a = a.masked_fill(torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        x = x + self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.n2(x))


class LinearEmbedViT(nn.Module):
    """vit-pytorch style: patches by reshape, embedded by ``nn.Linear`` (no 4-D map); the
    class token first or last; ``frames`` > 1: a video ViT with a ``Conv3d`` tubelet embedding;
    ``keyword``: the blocks called as ``b(x=t)``."""

    def __init__(self, img=32, p=4, d=64, depth=6, cls_last=False, frames=1, keyword=False):
        super().__init__()
        self.p, self.cls_last, self.frames, self.keyword = p, cls_last, frames, keyword
        n = (img // p) ** 2
        if frames > 1:
            self.embed = nn.Conv3d(3, d, (2, p, p), (2, p, p))
            n *= frames // 2
        else:
            self.embed = nn.Linear(3 * p * p, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.1)
        self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, 10)

    def tokens(self, x):
        if self.frames > 1:
            return self.embed(x).flatten(2).transpose(1, 2)
        B, C, H, W = x.shape
        p = self.p
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
        return self.embed(x)

    def forward(self, x):
        t = self.tokens(x)
        c = self.cls.expand(t.shape[0], -1, -1)
        t = (torch.cat([t, c], 1) if self.cls_last else torch.cat([c, t], 1)) + self.pos
        for b in self.blocks:
            t = b(x=t) if self.keyword else b(t)
        return self.head(t[:, -1] if self.cls_last else t[:, 0])


@pytest.mark.parametrize("form", ["linear", "linear-cls-last", "video"])
def test_class_token_is_found_without_a_patch_map(form):
    """With no 4-D map to add noise to, noise on the model's input finds the class token: it is
    a prefix (or trailing) token, always on the slow path, never ranked as a patch."""
    torch.manual_seed(0)
    model = LinearEmbedViT(cls_last=form == "linear-cls-last", frames=4 if form == "video" else 1).eval()
    x = torch.randn(4, 3, 4, 32, 32) if form == "video" else torch.randn(4, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    blocks = evoplug.get_report(fast).blocks
    want = (0, 1) if form == "linear-cls-last" else (1, 0)
    assert all((s.analysis.num_prefix, s.analysis.num_suffix) == want for s in blocks)
    assert "no patch grid found" not in evoplug.explain(fast)
    # the head reads the class token, so with every patch token's attention output zeroed the
    # class token's path is the dense model's (exact at keep 1.0 and checked at 0.5 by value)
    with torch.no_grad():
        out = fast(x)
        evoplug.set_keep_ratio(fast, 1.0)
        torch.testing.assert_close(fast(x), model(x), atol=0, rtol=0)
    assert out.shape == (4, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("cls_last", [False, True], ids=["cls-first", "cls-last"])
def test_blocks_called_by_keyword_find_the_class_token_as_when_called_by_position(cls_last):
    """``t = b(x=t)``: the provenance forward read a block's tokens as its first positional
    argument and had none, so the class token after a linear patch embedding was ranked as a
    patch (0 prefix tokens, mean query; 2.24 off), and one after the patches of a convolutional
    embedding was taken for a leading one (1.01 off), until the thirty-eighth session (audit W4,
    fuzzing). Called by keyword, the model converts as called by position."""
    torch.manual_seed(0)
    by_position = LinearEmbedViT(cls_last=cls_last).eval()
    by_keyword = LinearEmbedViT(cls_last=cls_last, keyword=True).eval()
    by_keyword.load_state_dict(by_position.state_dict())
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for model in (by_position, by_keyword):
        fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], reselect_every=1)
        a = evoplug.get_report(fast).blocks[0].analysis
        assert (a.num_prefix, a.num_suffix, a.global_query) == ((0, 1, "mean") if cls_last else (1, 0, "cls"))
        with torch.no_grad():
            outs.append(fast(x))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=0)
    assert (outs[0] - by_position(x)).abs().max() > 1e-3


class IntegerInput(LinearEmbedViT):
    """The same model taking an integer (uint8) image or video, normalised inside."""

    def forward(self, x):
        return super().forward(x.float() / 127.5 - 1)


@pytest.mark.parametrize("form", ["linear", "video"])
def test_an_integer_image_or_video_finds_the_class_token_as_a_float_one(form):
    """A model taking a uint8 image (patches by reshape + ``nn.Linear``) or video (a ``Conv3d``
    tubelet embedding: a 5-D map) and normalising it itself had 0 prefix tokens, its class token
    ranked as a patch (the head reads it: 0.15 off), until audit B1 of the forty-first session:
    the noise forward perturbed floating-point inputs only, and the patch grid was read from
    4-D maps only. Now integer images get the noise too and a video map counts its T*H*W
    positions: converted on the uint8 input, the model evolves as the same weights converted on
    the normalised float input; keep 1.0 is exact."""
    torch.manual_seed(0)
    frames = 4 if form == "video" else 1
    model = IntegerInput(frames=frames, depth=4).eval()
    on_floats = LinearEmbedViT(frames=frames, depth=4).eval()
    on_floats.load_state_dict(model.state_dict())
    x = torch.randint(0, 256, (4, 3, 4, 32, 32) if frames > 1 else (4, 3, 32, 32), dtype=torch.uint8)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    want = evoplug.convert(on_floats, keep_ratio=0.5, example_input=x[:1].float() / 127.5 - 1)
    assert all(s.analysis.num_prefix == 1 for s in evoplug.get_report(fast).blocks)
    assert ("patch grid 2x8x8 from `embed`" if frames > 1 else "no patch grid matched") in evoplug.explain(fast)
    with torch.no_grad():
        out = fast(x)
        torch.testing.assert_close(out, want(x.float() / 127.5 - 1), atol=1e-5, rtol=1e-5)
        assert (out - model(x)).abs().max() > 1e-3
        evoplug.set_keep_ratio(fast, 1.0)
        torch.testing.assert_close(fast(x), model(x), atol=0, rtol=0)


class DividedVideoViT(nn.Module):
    """TimeSformer's divided space-time attention: a block over each position's T' frames
    (B*N, T', C), then one over each frame's N positions (B*T', N, C)."""

    def __init__(self, d=64, depth=2, frames=4):
        super().__init__()
        self.embed = nn.Conv3d(3, d, (2, 8, 8), (2, 8, 8))
        self.time = nn.ModuleList([Block(d) for _ in range(depth)])
        self.space = nn.ModuleList([Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        t = self.embed(x).flatten(3).permute(0, 2, 3, 1)       # (B, T', N, C)
        B, T, N, C = t.shape
        for tb, sb in zip(self.time, self.space):
            t = tb(t.transpose(1, 2).reshape(B * N, T, C)).reshape(B, N, T, C).transpose(1, 2)
            t = sb(t.reshape(B * T, N, C)).reshape(B, T, N, C)
        return self.head(t.mean((1, 2)))


@pytest.mark.parametrize("images", [1, 2, 3])
def test_divided_space_time_attention_is_refused_as_regrouped_whatever_the_batch(images):
    """Time attention over (B*N, T', C) is refused: its tokens arrive regrouped. Where the
    example's batch B equalled T' the tokens were taken for sequence-first ones (N, B, C) and
    the refusal gave another reason (special tokens between the patches, or one image's tokens
    moved by another's) until audit B1 of the forty-first session: one image more grows dim 0
    of regrouped tokens, dim 1 of sequence-first ones. T' = B here, but for 3 images (T' = 2)."""
    torch.manual_seed(0)
    frames = 4 if images == 3 else 2 * images
    model = DividedVideoViT(frames=frames).eval()
    with pytest.raises(evoplug.EvoplugError, match=rf"`time\.0`: its tokens arrive regrouped "
                                                   rf"\(batch {16 * images} for {images} image"):
        evoplug.convert(model, keep_ratio=0.5, example_input=torch.randn(images, 3, frames, 32, 32))


class ImageTower(nn.Module):
    def __init__(self, depth=6, d=64, p=4):
        super().__init__()
        self.embed = nn.Conv2d(3, d, p, p)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 65, d) * 0.1)
        self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        for b in self.blocks:
            t = b(t)
        return t


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = ImageTower(), ImageTower()

    def forward(self, x1, x2):
        return self.a(x1), self.b(x2)


def test_a_second_tower_starts_its_own_scores():
    """Two unshared towers with the same token count: tower b's selection comes from tower b's
    own attention (its features do not change when only tower a's image does), and each tower
    gets the roles a conversion of it alone would give."""
    torch.manual_seed(0)
    model = Siamese().eval()
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=(x1[:1], x2[:1]))
    report = evoplug.get_report(fast)
    assert [s.name for s in report.blocks if s.starts_stream] == ["b.blocks.0"]
    roles = [s.role for s in report.blocks]
    alone = [s.role for s in evoplug.get_report(evoplug.convert(model.b, keep_ratio=0.5,
                                                                example_input=x2[:1])).blocks]
    assert roles[:6] == roles[6:] == alone
    assert "dense (new stream)" in evoplug.explain(fast)
    with torch.no_grad():
        _, fb = fast(x1, x2)
        _, fb_other = fast(torch.randn(2, 3, 32, 32), x2)
        torch.testing.assert_close(fb, fb_other, atol=0, rtol=0)
        single = evoplug.convert(model.b, keep_ratio=0.5, example_input=x2[:1])
        torch.testing.assert_close(fb, single(x2), atol=1e-5, rtol=1e-5)


class TextFirst(nn.Module):
    """A CLIP-like pair whose causal text tower (token ids through ``nn.Embedding``) runs
    before the image tower, with as many text tokens as image tokens."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(100, 64)
        self.text = nn.ModuleList([Block(causal=True) for _ in range(6)])
        self.image = ImageTower()

    def forward(self, image, ids):
        t = self.tok(ids)
        for b in self.text:
            t = b(t)
        return self.image(image)[:, 0] @ t[:, -1].T


def test_a_text_tower_run_before_the_image_tower_is_refused_by_name():
    torch.manual_seed(0)
    model = TextFirst().eval()
    example = (torch.randn(1, 3, 32, 32), torch.randint(0, 100, (1, 65)))
    with pytest.raises(ConversionError) as e:
        evoplug.convert(model, keep_ratio=0.5, example_input=example)
    assert all(f"`text.{i}`" in str(e.value) for i in range(6))
    assert "not a vision block" in str(e.value)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=example, strict=False)
    assert [s.name for s in evoplug.get_report(fast).blocks] == [f"image.blocks.{i}" for i in range(6)]
    assert not any(s.starts_stream for s in evoplug.get_report(fast).blocks)


class TorchTextClip(nn.Module):
    """An image tower beside a text tower of PyTorch's ``nn.TransformerEncoder``, zero-shot
    style: each image against each prompt."""

    def __init__(self):
        super().__init__()
        self.image = ImageTower()
        self.tok = nn.Embedding(100, 64)
        self.text = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 2, 128, dropout=0.0, batch_first=True),
                                          3, enable_nested_tensor=False)

    def forward(self, image, ids):
        return self.image(image)[:, 0] @ self.text(self.tok(ids)).mean(1).T


def test_every_layer_of_a_torch_text_encoder_is_found_image_free():
    """``nn.TransformerEncoderLayer`` takes its fused path where no torch-function mode runs:
    the provenance forward's text layers after the first got inputs 1e-7 off calibration's and
    were taken for layers the image reaches; ``strict=False`` converted them, and a zero-shot
    call (6 prompts for 4 images) then raised mid-forward (audit M of the twenty-fourth
    session)."""
    torch.manual_seed(0)
    model = TorchTextClip().eval()
    images, ids = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4, 7))
    with pytest.raises(ConversionError) as e:
        evoplug.convert(model, keep_ratio=0.5, example_input=(images[:1], ids[:1]))
    assert all(f"`text.layers.{i}`: its tokens do not come from the image" in str(e.value) for i in range(3))
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=(images[:1], ids[:1]), strict=False)
    assert [s.name for s in evoplug.get_report(fast).blocks] == [f"image.blocks.{i}" for i in range(6)]
    prompts = torch.randint(0, 100, (6, 7))
    image_only = evoplug.convert(model.image, keep_ratio=0.5, example_input=images[:1])
    with torch.no_grad():
        out = fast(images, prompts)
        torch.testing.assert_close(out, image_only(images)[:, 0] @ model.text(model.tok(prompts)).mean(1).T,
                                   atol=1e-5, rtol=1e-5)


def _vit_tokens(model, x):
    return model._pos_embed(model.patch_embed(x))


class _PosBlock(Block):
    """A block with a second tensor argument (called ``blk(pos=pos, x=h)``)."""

    def forward(self, x, pos):
        return super().forward(x + pos)


@pytest.mark.parametrize("every,train", [(1, False), (4, False), (4, True)])
def test_streams_run_block_by_block_through_the_same_blocks_evolve_as_each_alone(every, train):
    """``a = blk(a); b = blk(b)`` for each block (two views of a siamese or student-teacher
    loop, written after the conversion): the second stream's first call started a new forward and
    the first stream went on from the second's scores, off by 0.67, silently, until the
    thirty-first session. Each stream is told by the tensor its last block gave and runs as it
    runs alone: two or three streams (of other batch sizes), a whole forward of the model
    between two blocks of two streams, a compiled forward in between, the gradients."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=6)
    fast = evoplug.convert(model.eval(), keep_ratio=0.5, reselect_every=every,
                           example_input=torch.randn(1, 3, 64, 64)).train(train)
    xs = [torch.randn(2, 3, 64, 64), torch.randn(3, 3, 64, 64), torch.randn(2, 3, 64, 64)]

    def alone(x):
        h = _vit_tokens(fast, x)
        for blk in fast.blocks:
            h = blk(h)
        return h

    def interleaved(streams, between=None):
        hs = [_vit_tokens(fast, x) for x in xs[:streams]]
        for i, blk in enumerate(fast.blocks):
            hs = [blk(h) for h in hs]
            if i == 1 and between is not None:
                between(torch.randn(2, 3, 64, 64))
        return hs

    with torch.set_grad_enabled(train):
        want = [alone(x) for x in xs]
        got = interleaved(2)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        if train:                                   # and the gradients are each stream's own
            sum(g.square().mean() for g in got).backward()
            grads = [p.grad.clone() for p in fast.blocks.parameters()]
            fast.zero_grad()
            sum(w.square().mean() for w in want[:2]).backward()
            for g, w in zip(grads, (p.grad for p in fast.blocks.parameters())):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
            return
        for streams, between in ((3, None), (2, fast), (2, torch.compile(fast, backend="eager"))):
            for g, w in zip(interleaved(streams, between), want):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    evolving = [t for _, t in evoplug.tokens_per_block(fast)][2:]
    assert all(0 < t < 17 for t in evolving), evolving


def test_streams_through_blocks_called_with_their_tokens_by_keyword_not_first():
    """``blk(pos=pos, x=h)``: the call's first tensor (pos) was taken for the stream's tokens
    (audit I of the thirty-first session)."""
    torch.manual_seed(0)
    blocks = nn.Sequential(*[_PosBlock() for _ in range(4)])
    pos = torch.randn(1, 17, 64) * 0.02

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = blocks

        def forward(self, x):
            for blk in self.blocks:
                x = blk(pos=pos, x=x)
            return x

    fast = evoplug.convert(Model().eval(), keep_ratio=0.5, example_input=torch.randn(1, 17, 64))
    xa, xb = torch.randn(2, 17, 64), torch.randn(2, 17, 64)
    with torch.no_grad():
        want = fast(xa), fast(xb)
        a, b = xa, xb
        for blk in fast.blocks:
            a, b = blk(pos=pos, x=a), blk(pos=pos, x=b)
    torch.testing.assert_close(a, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, want[1], atol=1e-5, rtol=1e-5)
    assert 0 < evoplug.tokens_per_block(fast)[-1][1] < 17


def test_streams_whose_tokens_change_between_blocks_are_warned_and_a_run_left_early_is_not():
    """Two streams through a Swin, stage by stage (the patch merging between two stages makes
    tokens no block gave): which stream a block call continues cannot be told, and is warned.
    A run of the blocks left early (a probe of the first block; ``forward_intermediates`` with
    ``stop_early``) and then a whole run is one stream after the other: no warning, the same
    output."""
    import timm
    import warnings
    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, patch_size=2,
                          window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 2)).eval()
    fast = evoplug.convert(m, keep_ratio=0.5, example_input=torch.randn(1, 3, 64, 64))
    xa, xb = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = fast.layers(fast.patch_embed(xa))
        fast.layers[0].blocks[0](fast.patch_embed(xb))          # a probe, left there
        torch.testing.assert_close(fast.layers(fast.patch_embed(xa)), want, atol=1e-5, rtol=1e-5)
        fast.forward_intermediates(xb, indices=[0], stop_early=True)
        fast(xa)
        assert not [w for w in caught if "evoplug" in str(w.message)]
        a, b = fast.patch_embed(xa), fast.patch_embed(xb)
        for stage in fast.layers:
            a, b = stage.downsample(a), stage.downsample(b)
            for blk in stage.blocks:
                a, b = blk(a), blk(b)
    told = [str(w.message) for w in caught if "evoplug" in str(w.message)]
    assert len(told) == 1 and "wait on this thread at block 1, and block 2 got tokens that neither" \
        in told[0], told
    assert caught[-1].filename == __file__
