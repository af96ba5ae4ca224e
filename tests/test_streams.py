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
    class token first or last; ``frames`` > 1: a video ViT with a ``Conv3d`` tubelet embedding."""

    def __init__(self, img=32, p=4, d=64, depth=6, cls_last=False, frames=1):
        super().__init__()
        self.p, self.cls_last, self.frames = p, cls_last, frames
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
            t = b(t)
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
