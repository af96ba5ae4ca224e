"""Seeded property tests over random timm ``VisionTransformer`` configurations.

Each configuration (drawn once from a fixed seed, readable in the test ids) is converted with a
batch-1 example input and checked at batch 1 and batch 3:

* the analysis sees every block, the model's prefix tokens and its token count, and the roles
  follow the default schedule;
* keep 1.0 reproduces the model (identity fast path and the selection machinery), and options
  set after keep-1.0 forwards take effect;
* keep < 1: finite outputs of the right shape, and every evolving block runs
  ``P + num_keep(M, keep) + 1`` tokens (``N`` when ``num_keep == M``; at keep 0.999 these small
  grids give ``num_keep == M - 1``: the selection path on ``P + (M - 1) + 1 == N`` tokens), both
  as ``tokens_per_block`` reports it and as the blocks' ``F.linear`` calls see it;
* backward in train mode at keep 0.5 gives finite gradients;
* a refused conversion raises an evoplug error (anything else is a failure).
"""
import functools
import math
import os
import random
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from timm.layers import LayerScale
from timm.models import vision_transformer as tvit

import evoplug
from evoplug.runtime import evolve as ev

# EVOPLUG_PROPERTY_SEED / EVOPLUG_PROPERTY_CONFIGS draw other configurations (exploration)
SEED = int(os.environ.get("EVOPLUG_PROPERTY_SEED", "20240611"))
NUM_CONFIGS = int(os.environ.get("EVOPLUG_PROPERTY_CONFIGS", "32"))
KEEPS = (0.01, 0.3, 0.5, 0.999)
BATCHES = (1, 3)
ATOL = 1e-5

# block kinds: short name -> block_fn (constructor arguments checked against timm 1.0.31)
BLOCKS = {
    "Block": tvit.Block,
    "ResPost": tvit.ResPostBlock,
    "ParScale": tvit.ParallelScalingBlock,
    "ParScaleFusedOut": functools.partial(tvit.ParallelScalingBlock, fuse_out_proj=True),
    "ParThings2": tvit.ParallelThingsBlock,                       # two attentions per block
    "ParThings1": functools.partial(tvit.ParallelThingsBlock, num_parallel=1),
}
# ParallelScalingBlock asserts `not scale_attn_norm and not scale_mlp_norm`
NO_SCALE_NORM = {"ParScale", "ParScaleFusedOut"}
POOLS = ("token", "avg", "avgmax", "max", "map")
# (img_size, patch_size): grids 4x4, 3x3, 3x5, 5x7, 8x8, 2x6, 6x6, 9x5, 7x7, 4x6, 6x4, 5x5
GRIDS = [
    (16, 4), (24, 8), ((24, 40), 8), ((20, 28), 4), (32, 4), ((16, 48), 8), (48, 8),
    ((36, 20), 4), (28, 4), ((32, 24), (8, 4)), ((24, 32), (4, 8)), (40, 8),
]


@dataclass(frozen=True)
class Cfg:
    idx: int
    block: str
    class_token: bool
    reg_tokens: int
    global_pool: str
    img_size: object
    patch_size: object
    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float
    no_embed_class: bool
    init_values: object
    qk_norm: bool
    qkv_bias: bool
    pre_norm: bool
    fc_norm: object
    scale_norm: bool
    fused_attn: bool
    num_classes: int
    drop_path: float

    @property
    def grid(self):
        img = self.img_size if isinstance(self.img_size, tuple) else (self.img_size,) * 2
        p = self.patch_size if isinstance(self.patch_size, tuple) else (self.patch_size,) * 2
        return img[0] // p[0], img[1] // p[1]

    @property
    def hw(self):
        img = self.img_size
        return img if isinstance(img, tuple) else (img, img)

    @property
    def prefix(self):
        return int(self.class_token) + self.reg_tokens

    @property
    def id(self):
        h, w = self.grid
        p = self.patch_size if isinstance(self.patch_size, tuple) else (self.patch_size,)
        parts = [f"c{self.idx:02d}", self.block, "cls" if self.class_token else "nocls",
                 f"reg{self.reg_tokens}", self.global_pool, f"g{h}x{w}p{'x'.join(map(str, p))}",
                 f"d{self.depth}", f"e{self.embed_dim}h{self.num_heads}"]
        flags = [("nec", self.no_embed_class), ("ls", self.init_values is not None),
                 ("qkn", self.qk_norm), ("nobias", not self.qkv_bias), ("pre", self.pre_norm),
                 ("fcn" if self.fc_norm else "nofcn", self.fc_norm is not None),
                 ("sn", self.scale_norm), ("eager", not self.fused_attn),
                 ("dp", self.drop_path > 0), ("nohead", self.num_classes == 0)]
        return "-".join(parts + [n for n, on in flags if on])


def _configs(seed=SEED, n=NUM_CONFIGS):
    rng = random.Random(seed)
    blocks = list(BLOCKS)
    out = []
    for i in range(n):
        block = blocks[i % len(blocks)]          # every block kind and pool mode is covered
        pool = POOLS[i % len(POOLS)]
        class_token = True if pool == "token" else rng.random() < 0.5
        img, patch = rng.choice(GRIDS)
        embed_dim = rng.choice((32, 48, 64))
        heads = rng.choice([h for h in (2, 3, 4) if embed_dim % h == 0])
        out.append(Cfg(
            idx=i, block=block, class_token=class_token, reg_tokens=rng.choice((0, 0, 1, 2, 4)),
            global_pool=pool, img_size=img, patch_size=patch, depth=rng.randint(3, 6),
            embed_dim=embed_dim, num_heads=heads, mlp_ratio=rng.choice((2.0, 4.0)),
            no_embed_class=rng.random() < 0.3,
            init_values=rng.choice((None, 1e-5, 0.1)),
            qk_norm=rng.random() < 0.3, qkv_bias=rng.random() < 0.7, pre_norm=rng.random() < 0.3,
            fc_norm=rng.choice((None, None, True, False)),
            scale_norm=block not in NO_SCALE_NORM and rng.random() < 0.25,
            fused_attn=rng.random() < 0.7, num_classes=rng.choice((10, 10, 10, 0)),
            drop_path=rng.choice((0.0, 0.1)),
        ))
    return out


CONFIGS = _configs()
IDS = [c.id for c in CONFIGS]

# Refusals on purpose: (predicate on the config, pattern the refusal must match, why). The
# analysis test asserts such a refusal and its message; the other tests of that config skip.
# Any other refusal fails the test with the library's message.
LEGIT_REFUSALS = [
    (lambda cfg: cfg.block == "ParThings2",
     r"`blocks\.0`: runs 2 attention computations per call, in parallel branches on the same "
     r"tokens \(`blocks\.0\.attns\.0`, `blocks\.0\.attns\.1`\)",
     "two attentions per block, in parallel"),
]


def build(cfg: Cfg) -> nn.Module:
    model = tvit.VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes,
        global_pool=cfg.global_pool, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        qk_norm=cfg.qk_norm, scale_attn_norm=cfg.scale_norm, scale_mlp_norm=cfg.scale_norm,
        init_values=cfg.init_values, class_token=cfg.class_token,
        no_embed_class=cfg.no_embed_class, reg_tokens=cfg.reg_tokens, pre_norm=cfg.pre_norm,
        fc_norm=cfg.fc_norm, drop_path_rate=cfg.drop_path, dynamic_img_size=False,
        block_fn=BLOCKS[cfg.block])
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = cfg.fused_attn
    _reinit(model, seed=SEED + cfg.idx)
    return model.eval()


@torch.no_grad()
def _reinit(model: nn.Module, seed: int):
    """Weights that make every block do something: unit-gain Linear/conv weights (so the
    attention is far from uniform), non-trivial norms, layer-scale gammas of ~0.5 and
    distinct prefix/position embeddings (timm's init makes the blocks nearly the identity)."""
    g = torch.Generator().manual_seed(seed)

    def normal(p, mean, std):
        p.copy_(torch.randn(p.shape, generator=g) * std + mean)

    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name == "weight":
                normal(p, 0.0, 1.0 / math.sqrt(p[0].numel()))
            elif isinstance(m, LayerScale):
                normal(p, 0.5, 0.2)
            elif isinstance(m, nn.LayerNorm) and name == "weight":
                normal(p, 1.0, 0.1)
            elif name.endswith("bias"):
                normal(p, 0.0, 0.1)
            else:   # cls_token, reg_token, pos_embed, attention-pool latent, ...
                normal(p, 0.0, 0.5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one intra-op thread is as fast, and on a busy machine two
    spin-waiting threads make this module 20x slower. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_MODELS = {}
_CONVERTED = {}


def _converted(cfg: Cfg, use: str = "main", report_refusal: bool = False):
    """(model, fast) for a configuration (batch-1 example input), converted once per ``use``:
    the keep-1.0 test gets a conversion of its own, so the state its identity fast path leaves
    cannot mask or cause failures of the other tests. A refused conversion fails
    ``test_conversion_and_analysis`` (``report_refusal``) and skips the other tests."""
    if cfg.id not in _MODELS:
        _MODELS[cfg.id] = build(cfg)
    model = _MODELS[cfg.id]
    key = (cfg.id, use)
    if key not in _CONVERTED:
        try:
            fast = evoplug.convert(model, keep_ratio=0.5, example_input=_inputs(cfg, 1))
            _CONVERTED[key] = (fast, None)
        except (evoplug.EvoplugError, ValueError) as e:
            _CONVERTED[key] = (None, e)
        # any other exception propagates: the test fails with it
    fast, err = _CONVERTED[key]
    if err is not None:
        for pred, pattern, why in LEGIT_REFUSALS:
            if pred(cfg) and re.search(pattern, str(err)):
                if report_refusal:      # the refusal is what this config must give
                    return model, None
                pytest.skip(f"refused on purpose ({why}); test_conversion_and_analysis checks the message")
        if not report_refusal:
            pytest.skip(f"conversion refused (failed in test_conversion_and_analysis): {err}")
        pytest.fail(f"conversion refused ({type(err).__name__}): {err}", pytrace=False)
    for p in fast.parameters():
        p.grad = None
    fast.eval()
    return model, fast


def _inputs(cfg: Cfg, batch: int):
    g = torch.Generator().manual_seed(1000 + cfg.idx * 10 + batch)
    return torch.randn(batch, 3, *cfg.hw, generator=g)


def _diff(a, b):
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def _want_tokens(spec, keep):
    """Tokens a block runs in a forward at ``keep`` (representative token on, default)."""
    a = spec.analysis
    if spec.role == "dense":
        return -1                       # its original forward
    if spec.role == "score":
        return a.num_tokens
    M = a.num_tokens - a.num_prefix
    k = ev.num_keep(M, keep)
    return a.num_prefix + k + 1 if k < M else a.num_tokens


class _LinearTokens(TorchFunctionMode):
    """Tokens seen by the nn.Linear layers of each converted block in a forward, recorded from
    the ``F.linear`` calls (by weight), not with module hooks: a hook on a submodule changes
    how a converted block runs."""

    def __init__(self, fast):
        super().__init__()
        self.owner = {}
        for spec in evoplug.get_report(fast).blocks:
            for m in spec.analysis.module.modules():
                if isinstance(m, nn.Linear):
                    self.owner[id(m.weight)] = spec.analysis.name
        self.seen = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.owner.get(id(w))
            if name is not None and isinstance(x, torch.Tensor) and x.dim() == 3:
                self.seen.setdefault(name, set()).add(x.shape[1])
        return func(*args, **kwargs)


def _check_tokens(fast, keep, where):
    report = evoplug.get_report(fast)
    got = [t for _, t in evoplug.tokens_per_block(fast)]
    assert got == [s.tokens_run for s in report.blocks]
    want = [_want_tokens(s, keep) for s in report.blocks]
    roles = [s.role for s in report.blocks]
    assert got == want, f"{where}: tokens run {got}, expected {want} (roles {roles})"


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_conversion_and_analysis(cfg):
    model, fast = _converted(cfg, report_refusal=True)
    if fast is None:                    # a refusal LEGIT_REFUSALS names, message matched
        assert any(pred(cfg) for pred, _, _ in LEGIT_REFUSALS)
        return
    report = evoplug.get_report(fast)
    h, w = cfg.grid
    names = [s.analysis.name for s in report.blocks]
    assert names == [f"blocks.{i}" for i in range(cfg.depth)], evoplug.explain(fast)
    for s in report.blocks:
        assert (s.analysis.num_prefix, s.analysis.num_tokens) == (cfg.prefix, h * w + cfg.prefix), \
            evoplug.explain(fast)
    start = max(1, cfg.depth // 3)
    assert [s.role for s in report.blocks] == \
        ["dense"] * (start - 1) + ["score"] + ["evolve"] * (cfg.depth - start)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_keep_one_reproduces(cfg):
    model, fast = _converted(cfg, use="keep_one")
    with torch.no_grad():
        for batch in BATCHES:
            x = _inputs(cfg, batch)
            ref, ref_feat = model(x), model.forward_features(x)
            for fast_path in (True, False):
                evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=fast_path)
                out = fast(x)
                feat = fast.forward_features(x)
                where = f"batch {batch}, identity_fast_path={fast_path}"
                assert out.shape == ref.shape, where
                assert _diff(feat, ref_feat) <= ATOL, f"{where}: features differ by {_diff(feat, ref_feat):.3g}"
                assert _diff(out, ref) <= ATOL, f"{where}: outputs differ by {_diff(out, ref):.3g}"
                if not fast_path:
                    # selection machinery at keep 1.0: evolving blocks run every token
                    for s in evoplug.get_report(fast).blocks:
                        if s.role == "evolve":
                            assert s.tokens_run == s.analysis.num_tokens, \
                                f"{where}: `{s.analysis.name}` ran {s.tokens_run} tokens (-1: its original forward), not all {s.analysis.num_tokens}"
        # options changed after keep-1.0 forwards take effect at the next forward
        evoplug.set_options(fast, keep_ratio=0.5, identity_fast_path=True)
        fast(_inputs(cfg, 3))
        _check_tokens(fast, 0.5, "keep 0.5 set after the keep-1.0 forwards")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_reduced_keep_runs_fewer_tokens(cfg):
    model, fast = _converted(cfg)
    report = evoplug.get_report(fast)
    with torch.no_grad():
        for batch in BATCHES:
            x = _inputs(cfg, batch)
            ref = model(x)
            for keep in KEEPS:
                evoplug.set_options(fast, keep_ratio=keep, identity_fast_path=True)
                where = f"batch {batch}, keep {keep}"
                with _LinearTokens(fast) as counter:
                    out = fast(x)
                seen = counter.seen
                assert out.shape == ref.shape, where
                assert torch.isfinite(out).all(), f"{where}: non-finite output"
                _check_tokens(fast, keep, where)
                # what the blocks' nn.Linear layers actually ran on (dense: every token)
                for s in report.blocks:
                    want = _want_tokens(s, keep)
                    want = s.analysis.num_tokens if want == -1 else want
                    got = seen.get(s.analysis.name)
                    assert got and max(got) == want, \
                        f"{where}: nn.Linear layers of `{s.analysis.name}` saw {got} tokens, expected {want}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_backward_in_train_mode(cfg):
    model, fast = _converted(cfg)
    evoplug.set_options(fast, keep_ratio=0.5, identity_fast_path=True)
    x = _inputs(cfg, 3)
    fast.train()
    try:
        out = fast(x)
        assert torch.isfinite(out).all()
        _check_tokens(fast, 0.5, "train mode, keep 0.5")
        out.float().pow(2).mean().backward()
    finally:
        fast.eval()
    got = {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}
    assert got, "no parameter got a gradient"
    bad = [n for n, gr in got.items() if not torch.isfinite(gr).all()]
    assert not bad, f"non-finite gradients: {bad}"
