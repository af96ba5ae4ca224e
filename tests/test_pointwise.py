"""Whether an op on a 4-D map treats every position alike decides whether the rewrites into token
form run it on the kept tokens (analyse/pointwise.py). Audit L of the thirty-fourth session found
three ops on a channels-last map that canon.py moved onto the tokens after one run in eval mode
on the calibration values: they converted, and were silently wrong once trained or in training.
The same check of the channels-first rewrite missed a context over every position."""
import copy

import pytest
import torch
from torch import nn

import evoplug
from test_channels_first import _Net

pytestmark = pytest.mark.usefixtures("one_thread")


class _Attn(nn.Module):
    def __init__(self, C, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x):            # (B, H, W, C), as transformers' SamVisionAttention
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        o = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, H, W, C))


class _MapBlock(nn.Module):
    """A block on a channels-last (B, H, W, C) map whose MLP ends in ``extra``."""

    def __init__(self, C, extra):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(C), _Attn(C, 2), nn.LayerNorm(C)
        self.fc1, self.act = nn.Linear(C, 2 * C), nn.GELU()
        self.fc2, self.extra = nn.Linear(2 * C, C), extra

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.extra(self.fc2(self.act(self.fc1(self.norm2(x)))))


class _MapNet(nn.Module):
    def __init__(self, extra, C=32, depth=5):
        super().__init__()
        self.embed = nn.Conv2d(3, C, 4, 4)
        self.blocks = nn.Sequential(*[_MapBlock(C, extra(C)) for _ in range(depth)])
        self.head = nn.Linear(C, 10)

    def forward(self, img):
        return self.head(self.blocks(self.embed(img).permute(0, 2, 3, 1)).mean((1, 2)))


@evoplug.register_leaf_module
class _GlobalContext(nn.Module):
    """``x + gamma * fc(mean of x over every position)``, ``gamma`` zero at the start (GCNet);
    the same mean whether the positions are laid out (H, W) or as one dim."""

    def __init__(self, C):
        super().__init__()
        self.fc, self.gamma = nn.Linear(C, C), nn.Parameter(torch.zeros(C))

    def forward(self, x):
        ctx = self.fc(x.flatten(1, -2).mean(1))
        return x + self.gamma * ctx.reshape((x.shape[0],) + (1,) * (x.dim() - 2) + (-1,))


def _where_it_runs(model, kind, x, train=False):
    seen = []
    for m in model.modules():
        if isinstance(m, kind):
            m.register_forward_pre_hook(lambda mod, a: seen.append(tuple(a[0].shape)))
    model.train(train)
    with torch.no_grad():
        model(x)
    return seen


@pytest.mark.parametrize("extra,kind", [(_GlobalContext, _GlobalContext),
                                        (lambda C: nn.Dropout2d(0.5), nn.Dropout2d)],
                         ids=["global_context_zero_at_conversion", "dropout2d_in_training"])
def test_channels_last_ops_that_mix_positions_stay_on_the_map(extra, kind):
    """A context over every position, zero at the conversion (with ``gamma`` at 0.7 after it the
    converted model was off by 0.19-0.37), and ``Dropout2d`` on a channels-last map, which drops
    whole rows of it in training (on tokens it dropped single tokens): evoplug refuses such blocks
    (their MLP then runs on the map: nothing would run on fewer tokens), or runs the op on the
    full map. Never on the kept tokens."""
    torch.manual_seed(0)
    model = _MapNet(extra).eval()
    x = torch.randn(2, 3, 32, 32)
    try:
        fast = evoplug.convert(copy.deepcopy(model), keep_ratio=0.5, example_input=x)
    except evoplug.ConversionError as e:
        assert "the MLP runs on the 4-D map" in str(e)
        return
    assert all(s[1:3] == (8, 8) for s in _where_it_runs(fast, kind, x, train=True))


def test_a_channels_last_op_on_each_token_still_moves_onto_the_tokens():
    """The control: a LayerNorm leaf at the MLP's end (each position alone) runs on the tokens."""
    torch.manual_seed(0)
    model = _MapNet(nn.LayerNorm).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x)
    assert [s.role for s in evoplug.get_report(fast).blocks].count("evolve") == 4
    assert 33 in {s[1] for s in _where_it_runs(fast, nn.LayerNorm, x)}     # 32 kept + 1


class _GlobalContext2d(nn.Module):
    def __init__(self, C, buffer=False):
        super().__init__()
        self.fc = nn.Linear(C, C)
        if buffer:
            self.register_buffer("gamma", torch.zeros(C))
        else:
            self.gamma = nn.Parameter(torch.zeros(C))

    def forward(self, x):            # (B, C, H, W), timm's SEModule reads its context so
        return x + (self.gamma * self.fc(x.mean((2, 3))))[:, :, None, None]


@pytest.mark.parametrize("buffer", [False, True], ids=["parameter", "buffer"])
def test_a_channels_first_context_over_every_position_runs_on_the_map(buffer):
    """In a channels-first block the same context (``x.mean((2, 3))``, zero at the conversion)
    gave the same mean on the row of tokens ``(B, C, 1, n)``, so it ran there, over the kept
    tokens only; it runs on the full map. Its ``gamma`` held as a buffer was not perturbed, so
    it still ran on the row (audit O)."""
    torch.manual_seed(0)
    model = _Net(True, depth=4)
    for b in model.blocks:
        b.norm2 = nn.Sequential(b.norm2, _GlobalContext2d(32, buffer))
    x = torch.randn(2, 3, 32, 32)
    fast = evoplug.convert(model.eval(), keep_ratio=0.5, example_input=x)
    assert [s.role for s in evoplug.get_report(fast).blocks].count("evolve") == 3
    assert _where_it_runs(fast, _GlobalContext2d, x) == [(2, 32, 8, 8)] * 4
