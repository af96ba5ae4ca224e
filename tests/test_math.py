"""The token math of evoplug checked against explicit references (timm ``test_layers.py``
style: every fused path against the plain computation it replaces).

1. Every global-query row function of :mod:`evoplug.runtime.evolve` against an explicit
   ``softmax(q @ k^T * scale + bias/mask)`` computed in float64, in float32 (tight) and
   bfloat16 (loose) inputs.
2. The whole slow-fast update of a converted tiny timm ViT against an Evo-ViT forward written
   here from the paper's rules (EVO-VIT.md "Per block, in notation"), calling timm's own
   ``Block.forward`` on the token subsets.
3. The ``global_query`` / ``num_prefix_tokens`` overrides.
"""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import evoplug
from evoplug.runtime import evolve as ev
from evoplug.runtime import gather as ev_gather
from evoplug.runtime import rows as ev_rows
from models import peaky_weights

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]
B, H, N, D = 2, 3, 17, 8
# (prefix tokens, cls query?): the cls query needs a prefix token (P = 0 means no cls token)
P_QUERY = [(0, False), (1, True), (1, False), (5, True), (5, False)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _qkv(dtype, seed=0, shape=(B, H, N, D), gain=1.5):
    g = _gen(seed)
    q, k, v = (torch.randn(shape, generator=g) * gain for _ in range(3))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _additive(mask):
    """A mask as the additive term it stands for, float64 (bool: True = keep, as in
    scaled_dot_product_attention -> 0 / -inf)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    return mask.double()


def _check_row(out, ref_full, P, tol):
    """``out`` (B, 1, n) (global rows) or (B, n) (per-window rows) against the reference row
    over all n keys (B, n): a float32 probability row over every key (prefix keys included)."""
    if out.dim() == 3:
        assert out.shape[1] == 1
        out = out[:, 0]
    assert out.shape == ref_full.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out >= 0).all()
    torch.testing.assert_close(out.double(), ref_full, atol=tol, rtol=0)
    torch.testing.assert_close(out.double().sum(-1), torch.ones_like(ref_full[:, 0]),
                               atol=max(tol, 1e-5) * 4, rtol=0)
    # the patch keys' part is what ranks the tokens
    assert (out.double()[:, P:].sum(-1) <= 1 + 1e-3).all()


def _ref_full_map(q, k, add, scale):
    """Explicit attention map softmax(q k^T * scale + add), float64: (B, H, N, N)."""
    logits = q.double() @ k.double().transpose(-2, -1) * scale
    if add is not None:
        logits = logits + add
    return logits.softmax(-1)


def _ref_mean_query_row(q, k, add, scale, P):
    """Attention of the mean query of the patch tokens, explicitly:
    softmax((mean_{i>=P} q_i) k^T * scale + mean_{i>=P} add_i), mean over heads: (B, N).

    Why this is what evoplug's "mean-query row" means: a logit row is affine in its query and
    its bias row, logits_ij = scale * q_i . k_j + add_ij, so the mean of the patch queries'
    logit rows is exactly the logit row of the mean query with the mean bias row. For a
    boolean mask (0 / -inf additive term) the mean is -inf wherever any patch query masks
    key j: the mean query may only see keys every patch query may see. A query whose key every
    row masks (a padded position) is no query of the mean."""
    qd = q.double()[..., P:, :]
    if add is None:
        qm = qd.mean(-2, keepdim=True)
    else:
        valid = (add > float("-inf")).any(-2)[..., P:].double().unsqueeze(-1)   # (.., M, 1)
        qm = (qd * valid).sum(-2, keepdim=True) / valid.sum(-2, keepdim=True).clamp_min(1)
    logits = qm @ k.double().transpose(-2, -1) * scale
    if add is not None:
        a = add if add.shape[-2] == 1 else add[..., P:, :].mean(-2, keepdim=True)
        logits = logits + a
    p = logits.softmax(-1)                      # (B, H, 1, N)
    return p.reshape(p.shape[0], -1, p.shape[-1]).mean(1)


def _rel_bias(dtype, shape, seed=1):
    return (torch.randn(shape, generator=_gen(seed)) * 2.0).to(dtype)


# ------------------------------------------------------------------------------------------
# 1. row functions
# ------------------------------------------------------------------------------------------

def _biased_logits(dtype, bias):
    """q, k, the bias (None, (H, N, N) or (B, H, N, N)), the scale and the logits a block
    computes from them, in ``dtype``."""
    q, k, _ = _qkv(dtype)
    scale = D ** -0.5
    b = None if bias is None else _rel_bias(dtype, (H, N, N) if bias == "hnn" else (B, H, N, N))
    return q, k, b, scale, q @ k.transpose(-2, -1) * scale + (0 if b is None else b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P", [1, 5])
@pytest.mark.parametrize("bias", [None, "hnn", "bhnn"])
def test_probs_query_row(dtype, P, bias):
    q, k, b, scale, logits = _biased_logits(dtype, bias)
    probs = logits.softmax(-1)                   # the map as the block computes it, in dtype
    ref = _ref_full_map(q, k, _additive(b), scale)[:, :, 0].mean(1)   # cls query, mean heads
    _check_row(ev_rows.probs_query_row(probs, P), ref, P, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P", [0, 1, 5])
@pytest.mark.parametrize("bias", [None, "hnn", "bhnn"])
def test_logits_query_row(dtype, P, bias):
    q, k, b, scale, logits = _biased_logits(dtype, bias)
    ref = _ref_mean_query_row(q, k, _additive(b), scale, P)
    _check_row(ev_rows.logits_query_row(logits, P), ref, P, TOL[dtype])


def _sdpa_mask(kind, dtype, P):
    g = _gen(2)
    if kind is None:
        return None
    if kind == "float_hnn":                      # relative-position-like bias
        return _rel_bias(dtype, (H, N, N))
    if kind == "float_bhnn":
        return _rel_bias(dtype, (B, H, N, N))
    if kind == "bool_pad":                       # key padding mask (B, 1, 1, N), True = keep
        m = torch.ones(B, 1, 1, N, dtype=torch.bool)
        m[0, ..., -3:] = False
        m[1, ..., P + 1:P + 3] = False
        return m
    # bool_bhnn: general keep-mask; key 0 and the last key visible to every query
    m = torch.rand(B, H, N, N, generator=g) < 0.7
    m[..., 0] = True
    m[..., -1] = True
    return m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,cls_query", P_QUERY)
@pytest.mark.parametrize("mask", [None, "float_hnn", "float_bhnn", "bool_pad", "bool_bhnn"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_sdpa_query_row(dtype, P, cls_query, mask, scale):
    q, k, v = _qkv(dtype)
    m = _sdpa_mask(mask, dtype, P)
    s = D ** -0.5 if scale is None else scale
    add = _additive(m)
    full = _ref_full_map(q, k, add, s)
    # the reference's mask convention is torch's own: its map times v is sdpa's output
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          attn_mask=None if m is None else (m if m.dtype == torch.bool else m.double()),
                                          scale=scale)
    torch.testing.assert_close(full @ v.double(), sdpa, atol=1e-10, rtol=0)
    ref = full[:, :, 0].mean(1) if cls_query else _ref_mean_query_row(q, k, add, s, P)
    out = ev_rows.sdpa_query_row(q, k, m, scale, P, cls_query)
    _check_row(out, ref, P, TOL[dtype])


def _k_layout(q, k, v, layout):
    """q, k in the memory layouts the matrix form of the logits meets: timm's slices of one
    ``qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)`` tensor, contiguous per head, or a
    layout neither product can use in place (keys transposed in memory)."""
    if layout == "qkv":
        qkv = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).contiguous()     # (B, N, 3, H, d)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    elif layout == "transposed":
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    return q, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,cls_query", [(1, True), (1, False), (0, False)])
@pytest.mark.parametrize("layout", ["qkv", "contiguous", "transposed"])
@pytest.mark.parametrize("mask", [None, "float_bhnn"])
def test_sdpa_query_row_matrix_form(dtype, P, cls_query, layout, mask, monkeypatch):
    """The matrix form of the logits (eager mode on a GPU) against the explicit reference, in
    every layout of q and k, with the same result as the product form."""
    q, k, v = _qkv(dtype)
    m = _sdpa_mask(mask, dtype, P)
    ref_q, ref_k = q, k
    q, k = _k_layout(q, k, v, layout)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    add = _additive(m)
    full = _ref_full_map(ref_q, ref_k, add, D ** -0.5)
    ref = full[:, :, 0].mean(1) if cls_query else _ref_mean_query_row(ref_q, ref_k, add, D ** -0.5, P)
    monkeypatch.setattr(ev_rows, "_MATMUL_LOGITS", True)
    out = ev_rows.sdpa_query_row(q, k, m, None, P, cls_query)
    _check_row(out, ref, P, TOL[dtype])
    monkeypatch.setattr(ev_rows, "_MATMUL_LOGITS", False)
    torch.testing.assert_close(out, ev_rows.sdpa_query_row(q, k, m, None, P, cls_query),
                               atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("form", ["product", "matrix"])
@pytest.mark.parametrize("layout", ["qkv", "contiguous"])
@pytest.mark.parametrize("sharp", [1, 3])
def test_float16_logits_beyond_its_range_give_finite_rows_and_outputs(form, layout, sharp, monkeypatch):
    """Sharp attention in float16: class-token logits of about 1e5, beyond float16's 65504,
    which the model's own attention (accumulating in float32) takes. The logits were float16,
    inf, the scores NaN and every output of a converted model NaN, silently (audit A3 of the
    fortieth session). The row equals the float64 one, and a converted float16 ViT with such
    logits is finite and near its float32 conversion. ``sharp=3``: logits of about 8e5, whose
    single terms q_i * k_i pass 65504 too: the product form's were float16 and inf, every
    output NaN (audit H1 of the forty-fourth session)."""
    monkeypatch.setattr(ev_rows, "_MATMUL_LOGITS", form == "matrix")
    q, k, v = (t.half() * 130 * sharp ** 0.5 for t in _qkv(torch.float32))
    q, k = _k_layout(q, k, v, layout)
    logits = (q[:, :, :1].double() @ k.double().transpose(-1, -2)).squeeze(-2) * D ** -0.5
    assert logits.abs().max() > 8e4 * sharp
    ref = logits.softmax(-1).mean(1)
    out = ev_rows.sdpa_query_row(q, k, None, None, 1, True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref[:, None], atol=2e-3, rtol=0)

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                              embed_dim=64, num_heads=4, num_classes=10).eval()
    with torch.no_grad():
        for blk in model.blocks:            # q and k x 1000: class-token logits about 9e4
            blk.attn.qkv.weight[:128] *= 1000 * sharp
            blk.attn.qkv.bias[:128] *= 1000 * sharp
    x = torch.randn(3, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    with torch.no_grad():
        want = fast(x)
        fast.half()
        out = fast(x.half())
    assert torch.isfinite(out).all()
    assert (out.float() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_row_copies_match_gather_and_gradients(layout, monkeypatch):
    """gather._take by row copies (index_select, the CPU's form) and by gather (elsewhere): the
    same rows, the same gradients, for a contiguous tensor and a strided one (which gathers)."""
    torch.manual_seed(0)
    base = torch.randn(3, 5, 7, requires_grad=True)
    pos = torch.tensor([[4, 0, 4], [1, 2, 3], [0, 0, 0]])
    outs, grads = [], []
    for rows in (True, False):
        monkeypatch.setattr(ev_gather, "_ROW_SELECT", rows)
        t = base * 2 if layout == "contiguous" else (base * 2).transpose(1, 2).contiguous().transpose(1, 2)
        out = ev_gather._take(t, pos)
        (g,) = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out)).sum(), base)
        outs.append(out)
        grads.append(g)
    ref = torch.stack([(base * 2)[b, pos[b]] for b in range(3)])
    assert torch.equal(outs[0], ref) and torch.equal(outs[1], ref)
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


# (term shape, heads merged into the batch dim (0: not)) for 2 images of 5 tokens
PAIR_TERMS = [((5, 5), 0), ((3, 5, 5), 0), ((1, 3, 5, 5), 0), ((2, 3, 5, 5), 0), ((1, 1, 5, 5), 0),
              ((2, 1, 1, 5), 0), ((1, 1, 5, 1), 0), ((2, 2, 3, 5, 5), 0), ((3, 5, 5), 3), ((5, 5), 3),
              ((1, 5, 5), 3), ((6, 5, 5), 3), ((5, 5), 1)]


@pytest.mark.parametrize("rows", [False, True], ids=["index", "gathers"])
@pytest.mark.parametrize("shape,heads", PAIR_TERMS, ids=[f"{s}-h{h}" for s, h in PAIR_TERMS])
def test_pair_terms_gathered_by_one_index_match_the_explicit_pairs(shape, heads, rows, monkeypatch):
    """gather.gather_pair_bias (one ``index`` of the pairs, or gathers where a token dim is 1;
    ``rows``: the CPU form, two gathers): each image's term at its subset's pairs, the gradient
    of the term's own, and what it made for a selection taken again by the next block on it,
    but a term written in between."""
    monkeypatch.setattr(ev_gather, "_ROW_SELECT", rows)
    torch.manual_seed(0)
    base = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[4, 0, 2], [1, 2, 3]])
    out = ev_gather.gather_pair_bias(base * 1, pos, heads)
    full = (base * 1).reshape(-1, *shape[-2:]) if heads else base * 1
    full = full.reshape(2, -1, *shape[-2:]) if heads and full.shape[0] == 2 * heads else \
        (full.reshape(1, -1, *shape[-2:]) if heads or full.dim() != 4 else full)
    full = full.expand(2, heads or full.shape[1], *shape[-2:])
    rows = [pos[b] if shape[-2] > 1 else [0] for b in range(2)]
    cols = [pos[b] if shape[-1] > 1 else [0] for b in range(2)]
    ref = torch.stack([full[b][:, rows[b]][:, :, cols[b]] for b in range(2)])
    ref = ref.reshape(-1, *ref.shape[-2:]) if heads else ref
    assert out.shape == ref.shape and torch.equal(out, ref)
    w = torch.arange(out.numel(), dtype=out.dtype).view_as(out)
    (g,) = torch.autograd.grad((out * w).sum(), base)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), base)
    assert torch.equal(g, g_ref)
    term = base.detach().clone()
    first = ev_gather.gather_pair_bias(term, pos, heads)
    assert ev_gather.gather_pair_bias(term, pos, heads) is first    # made once per selection
    term.add_(1.0)
    assert torch.equal(ev_gather.gather_pair_bias(term, pos, heads), first + 1.0)
    with torch.inference_mode():          # (no version counters: the term gathered every time)
        pos_i, term_i = pos.clone(), term.clone()
        first = ev_gather.gather_pair_bias(term_i, pos_i, heads)
        term_i.add_(1.0)
        assert torch.equal(ev_gather.gather_pair_bias(term_i, pos_i, heads), first + 1.0)


def _mha(batch_first, dtype, seed=3, E=16, heads=2):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, heads, batch_first=batch_first)
    with torch.no_grad():
        mha.in_proj_weight.mul_(3.0)             # far from uniform attention
        mha.in_proj_bias.normal_(0, 0.5, generator=_gen(seed))
    return mha.to(dtype).eval()


def _mha_mean_query_ref(mha, x, add, P):
    """Explicit mean-query row of an nn.MultiheadAttention on x (B, N, E), float64."""
    E, Hh = mha.embed_dim, mha.num_heads
    d = E // Hh
    W, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
    x = x.double()
    q = F.linear(x, W[:E], b[:E]).unflatten(-1, (Hh, d)).transpose(1, 2)          # (B, H, N, d)
    k = F.linear(x, W[E:2 * E], b[E:2 * E]).unflatten(-1, (Hh, d)).transpose(1, 2)
    return _ref_mean_query_row(q, k, add, d ** -0.5, P), q, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,cls_query", P_QUERY)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_mha_query_row(dtype, P, cls_query, batch_first, mask):
    mha = _mha(batch_first, dtype)
    E = mha.embed_dim
    x = torch.randn(B, N, E, generator=_gen(4)).to(dtype)
    if mask == "float":
        m = _rel_bias(dtype, (N, N))
    elif mask == "bool":                          # nn.MultiheadAttention: True = masked
        m = torch.rand(N, N, generator=_gen(5)) < 0.3
        m[:, 0] = False
        m[:, -1] = False
    else:
        m = None
    # MHA's additive term: float added, bool True -> -inf
    add = None if m is None else (
        torch.zeros(N, N, dtype=torch.float64).masked_fill(m, float("-inf")) if m.dtype == torch.bool
        else m.double())
    ref64 = copy.deepcopy(mha).double()
    xin = x if batch_first else x.transpose(0, 1)
    x64 = xin.double()
    with torch.no_grad():
        weights = ref64(x64, x64, x64, attn_mask=None if m is None else (m if m.dtype == torch.bool else m.double()),
                        need_weights=True, average_attn_weights=True)[1]            # (B, N, N)
    mean_ref, q64, k64 = _mha_mean_query_ref(mha, x, add, P)
    # the explicit route (own projections) reproduces MHA's attention map
    torch.testing.assert_close(_ref_full_map(q64, k64, add, (E // mha.num_heads) ** -0.5).mean(1),
                               weights, atol=1e-10, rtol=0)
    ref = weights[:, 0] if cls_query else mean_ref
    out = ev_rows.mha_query_row(mha, xin, xin, m, P, cls_query)
    _check_row(out, ref, P, TOL[dtype])


@pytest.mark.parametrize("bias_kv,zero_attn", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("mask", [None, "bool"])
def test_mha_query_row_takes_the_keys_the_module_appends(bias_kv, zero_attn, mask):
    """``nn.MultiheadAttention(add_bias_kv=True)`` (a learned key after the tokens': an
    attention sink) and ``add_zero_attn=True`` (a zero key): the row left those keys out of its
    softmax, so it was not the attention map's, silently (audit H2 of the forty-fourth session:
    a converted model 0.099 off an Evo-ViT reference). It is now the class token's row of the
    module's own attention weights over the tokens' keys (summing to less than 1)."""
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=bias_kv, add_zero_attn=zero_attn)
    with torch.no_grad():
        mha.in_proj_weight.mul_(3.0)
        mha.in_proj_bias.normal_(0, 0.5, generator=_gen(3))
        if bias_kv:
            mha.bias_k.normal_(0, 2.0, generator=_gen(4))
    x = torch.randn(B, N, 16, generator=_gen(4))
    m = None
    if mask == "bool":
        m = torch.rand(N, N, generator=_gen(5)) < 0.3
        m[:, 0] = False
    with torch.no_grad():
        weights = copy.deepcopy(mha).double()(x.double(), x.double(), x.double(), attn_mask=m,
                                              need_weights=True, average_attn_weights=True)[1]
    ref = weights[:, 0, :N]                  # (B, N): the class token's row over the tokens' keys
    assert (ref.sum(-1) < 1 - 1e-3).all()
    out = ev_rows.mha_query_row(mha, x, x, m, 1, True)[:, 0]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


# -- windows (Swin-like): per-window mean-query rows, scattered back to tokens ----------------

NW, MW = 4, 6      # windows per image, tokens per window


def _window_inputs(dtype, layout):
    """q, k (B*NW, H, MW, D), relative bias (H, MW, MW), shift mask (NW, MW, MW) of 0/-100
    and the logits as Swin builds them, in ``layout`` '4d' (B*NW, H, MW, MW) or '5d'
    (B, NW, H, MW, MW)."""
    q, k, _ = _qkv(dtype, seed=6, shape=(B * NW, H, MW, D))
    bias = _rel_bias(dtype, (H, MW, MW), seed=7)
    shift = torch.where(torch.rand(NW, MW, MW, generator=_gen(8)) < 0.3, -100.0, 0.0)
    shift.diagonal(dim1=-2, dim2=-1).zero_()
    shift = shift.to(dtype)
    scale = D ** -0.5
    logits = (q @ k.transpose(-2, -1)) * scale + bias
    logits = (logits.view(B, NW, H, MW, MW) + shift[None, :, None]).to(dtype)
    if layout == "4d":
        logits = logits.view(B * NW, H, MW, MW)
    return q, k, bias, shift, scale, logits


def _window_ref(q, k, add_of_window, scale):
    """Explicit loop over windows and heads: softmax(mean_i q_i . k * scale + mean_i add_i),
    mean over heads -> (B*NW, MW), float64."""
    rows = []
    for w in range(q.shape[0]):
        per_head = []
        for h in range(q.shape[1]):
            qm = q[w, h].double().mean(0)
            a = add_of_window(w, h)
            logits = k[w, h].double() @ qm * scale + (0 if a is None else a.double().mean(0))
            per_head.append(logits.softmax(-1))
        rows.append(torch.stack(per_head).mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["4d", "5d"])
def test_window_logits_row(dtype, layout):
    q, k, bias, shift, scale, logits = _window_inputs(dtype, layout)
    ref = _window_ref(q, k, lambda w, h: bias[h].double() + shift[w % NW].double(), scale)
    out = ev_rows.window_logits_row(logits, (1,) if layout == "4d" else (2,))
    out = out.reshape(B * NW, MW)
    _check_row(out, ref, 0, TOL[dtype])           # every window's row sums to 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", [None, "bwhnn", "1hnn"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_window_sdpa_row(dtype, mask, scale):
    q, k, bias, shift, _, _ = _window_inputs(dtype, "4d")
    if mask == "bwhnn":        # relative bias + shift mask, per window, as Swin passes it
        m = (bias[None, None] + shift[None, :, None]).expand(B, NW, H, MW, MW).reshape(B * NW, H, MW, MW).to(dtype)
        add = lambda w, h: m[w, h]   # noqa: E731
    elif mask == "1hnn":
        m = bias[None].to(dtype)
        add = lambda w, h: m[0, h]   # noqa: E731
    else:
        m, add = None, (lambda w, h: None)
    s = D ** -0.5 if scale is None else scale
    ref = _window_ref(q, k, add, s)
    out = ev_rows.window_sdpa_row(q, k, m, scale, (1,))
    _check_row(out, ref, 0, TOL[dtype])


def _window_index(num_tokens, slots, seed=9):
    """Each token (1-based) in exactly one window slot, the rest padding (0), shuffled."""
    idx = torch.cat([torch.arange(1, num_tokens + 1), torch.zeros(slots - num_tokens, dtype=torch.long)])
    return idx[torch.randperm(slots, generator=_gen(seed))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_layout", ["4d", "5d"])
@pytest.mark.parametrize("padding,by_slots", [(5, False), (5, True), (0, False), (0, True)])
def test_window_row(dtype, row_layout, padding, by_slots):
    """Per-window rows onto the tokens; by_slots: the slot of each token read with one
    index_select (every token in one slot), without padding normalised by the window count."""
    num_tokens = NW * MW - padding
    index = _window_index(num_tokens, NW * MW)
    slots = ev_rows.window_slots(index, num_tokens) if by_slots else None
    assert not by_slots or slots is not None
    _, _, _, _, _, logits = _window_inputs(dtype, row_layout)
    per_window = ev_rows.window_logits_row(logits, (1,) if row_layout == "4d" else (2,)).to(dtype)
    rows = per_window.reshape(B * NW, MW).double()
    ref = torch.zeros(B, num_tokens, dtype=torch.float64)
    for b in range(B):                     # explicit scatter back to the tokens
        for w in range(NW):
            for s in range(MW):
                t = int(index[w * MW + s])
                if t > 0:
                    ref[b, t - 1] += rows[b * NW + w, s]
    ref /= ref.sum(1, keepdim=True)        # padding slots dropped: renormalise to sum 1
    out = ev_rows.window_row(per_window, index, num_tokens, slots)
    _check_row(out, ref, 0, 1e-6)          # float32 arithmetic on the given rows
    with pytest.raises(ValueError, match="window"):
        ev_rows.window_row(per_window[..., :-1], index, num_tokens, slots)


def test_window_slots_only_where_every_token_has_one_slot():
    index = torch.tensor([2, 4, 0, 1, 3, 0])
    assert ev_rows.window_slots(index, 4).tolist() == [3, 0, 4, 1]
    assert ev_rows.window_slots(torch.tensor([2, 4, 0, 1, 2, 0]), 4) is None    # token 3 in none, 2 twice
    assert ev_rows.window_slots(torch.tensor([2, 1, 2, 0]), 2) is None            # token 2 twice


# ------------------------------------------------------------------------------------------
# 2. the slow-fast update of a converted ViT against a hand-written Evo-ViT forward
# ------------------------------------------------------------------------------------------

def tiny_vit(seed=0, fused=True, **kw):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                              depth=4, embed_dim=64, num_heads=2, **kw)
    return peaky_weights(model, seed, fused)


def _images(n=2, seed=15):
    return torch.randn(n, 3, 32, 32, generator=_gen(seed))


def _attn_row(blk, x, P, mean_query, after=0):
    """This block's global-query attention over the tokens ``x`` (B, n, C), computed from its
    qkv weights: softmax(q_g k^T * scale), mean over heads, over all n keys.
    q_g = the cls query (query 0) or the mean of the patch queries (queries P..n-1-after)."""
    attn = blk.attn
    h = blk.norm1(x)
    Bx, n, C = h.shape
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).reshape(Bx, n, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    qg = q[:, :, P:n - after].mean(2, keepdim=True) if mean_query else q[:, :, :1]
    a = (qg @ k.transpose(-2, -1) * attn.scale).softmax(-1)       # (B, H, 1, n)
    return a.mean(1)[:, 0]


@torch.no_grad()
def reference_forward(model, img, keep, start_block=1, alpha=0.5, reselect_every=None,
                      representative=True, P=1, mean_query=False, S=0, skip=None):
    """Evo-ViT written from the paper's rules. Returns (logits, tokens run per block as
    evoplug reports them, smallest score gap at a top-k cut, the scoring row). ``S`` special
    tokens after the patches (``model`` a :class:`DetTokenViT`) are kept like the prefix.
    ``skip(blk, tokens)``: the block's skip path where its residual adds take the stream scaled
    (``s * x + f(norm(x))``): every token that is not run gets its own skip path plus the
    representative token's residual over its own."""
    if reselect_every is None:
        reselect_every = evoplug.EvoOptions().reselect_every
    if S:
        x, blocks, head = model.tokens(img), model.vit.blocks, model.head
    else:
        x = model.patch_embed(img)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        x = model.norm_pre(x)
        blocks, head = model.blocks, lambda t: model.forward_head(model.norm(t))
    Bx, N_, C = x.shape
    M = N_ - P - S
    k = ev.num_keep(M, keep)
    g = sel = first_row = None
    since = 0
    runs, gaps = [], []
    for i, blk in enumerate(blocks):
        if i < start_block - 1:                    # dense
            x = blk(x)
            runs.append(-1)
            continue
        if i == start_block - 1:                   # dense + first global attention: g = a
            # (detached: the scores steer the selection and weigh the representative token,
            # and evoplug computes them without autograd; the reference runs with it for gradients)
            g = first_row = _attn_row(blk, x, P, mean_query, after=S)[:, P:N_ - S].detach()
            x = blk(x)
            runs.append(N_)
            continue
        # evolving block
        if sel is None or since % reselect_every == 0:
            top = torch.topk(g, min(k + 1, M), dim=1)
            sel = top.indices[:, :k]
            if k < M:
                gaps.append(float((top.values[:, k - 1] - top.values[:, k]).min()))
            since = 0
        xp = x[:, P:N_ - S]
        picked = torch.stack([xp[b, sel[b]] for b in range(Bx)])
        parts = [x[:, :P], x[:, N_ - S:], picked]
        rep = None
        if representative and k < M:
            w = g.clone()
            for b in range(Bx):
                w[b, sel[b]] = 0.0                   # non-selected tokens only
            w = w / w.sum(1, keepdim=True)
            rep = (w[..., None] * xp).sum(1)       # r = sum_j w_j x_j
            parts.append(rep[:, None])
        sub = torch.cat(parts, 1)                  # [prefix, trailing, selected, representative]
        out = blk(sub)                             # slow update: timm's own Block.forward
        # this block's global row over the subset's keys, at the selected tokens' columns
        a = _attn_row(blk, sub, P + S, mean_query)[:, P + S:P + S + k].detach()   # [prefix, trailing] first
        new = x.clone() if skip is None else skip(blk, x)
        if rep is not None:                        # fast update: x_j += r_after - r_before
            before = rep if skip is None else skip(blk, rep[:, None])[:, 0]
            new[:, P:N_ - S] += (out[:, -1] - before)[:, None]
        new[:, :P] = out[:, :P]
        new[:, N_ - S:] = out[:, P:P + S]
        g = g.clone()
        for b in range(Bx):
            new[b, P + sel[b]] = out[b, P + S:P + S + k]   # selected tokens: their slow outputs
            g[b, sel[b]] = (1 - alpha) * g[b, sel[b]] + alpha * a[b]   # refresh selected only
        x = new
        since += 1
        runs.append(sub.shape[1])
    return head(x), runs, (min(gaps) if gaps else math.inf), first_row


def test_reference_harness_reproduces_the_model():
    """keep 1.0 (all tokens selected, no representative) is the plain model: the reference's
    embedding / head calls and block loop are timm's."""
    model = tiny_vit()
    x = _images()
    with torch.no_grad():
        dense = model(x)
    ref, runs, _, row = reference_forward(model, x, 1.0, representative=False)
    torch.testing.assert_close(ref, dense, atol=1e-5, rtol=0)
    # the re-initialised attention is far from uniform (1/M = 0.016 per token)
    assert row.max() > 10.0 / row.shape[1]


CASES = [  # keep, options
    (0.5, {}),
    (0.5, dict(start_block=2)),
    (0.25, {}),
    (0.5, dict(reselect_every=1)),
    (0.25, dict(reselect_every=1, start_block=2)),
    (0.5, dict(reselect_every=2)),
    (0.25, dict(reselect_every=2, start_block=2)),
    (0.5, dict(representative=False)),
    (0.5, dict(trade_off=0.3, fused=False)),
    (0.25, dict(representative=False, reselect_every=2, fused=False)),
]


@pytest.mark.parametrize("keep,opts", CASES, ids=[f"keep{k}-" + "-".join(f"{a}={b}" for a, b in o.items())
                                                   for k, o in CASES])
def test_fast_update_matches_reference(keep, opts):
    opts = dict(opts)
    fused = opts.pop("fused", True)
    model = tiny_vit(fused=fused)
    x = _images()
    fast = evoplug.convert(model, keep_ratio=keep, example_input=x[:1], **opts)
    with torch.no_grad():
        out = fast(x)
    ref, runs, gap, _ = reference_forward(
        model, x, keep, start_block=opts.get("start_block", 1), alpha=opts.get("trade_off", 0.5),
        reselect_every=opts.get("reselect_every"),
        representative=opts.get("representative", True))
    # the rows here and in evoplug differ by float32 rounding (~1e-8): a gap 100x that at the
    # top-k cut means the selection cannot flip between them
    assert gap > 1e-6, "selection ill-conditioned (near tie at the top-k cut): pick another seed"
    assert [s.tokens_run for s in evoplug.get_report(fast).blocks] == runs
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with torch.no_grad():   # and it is not the dense model (the test can tell them apart)
        assert (model(x) - out).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------
# 3. global query and prefix overrides
# ------------------------------------------------------------------------------------------

def test_global_query_mean_override():
    model = tiny_vit()
    x = _images()
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], global_query="mean")
    blocks = evoplug.get_report(fast).blocks
    assert all(s.analysis.global_query == "mean" and s.analysis.num_prefix == 1 for s in blocks)
    with torch.no_grad():
        out = fast(x)
    ref_mean, runs, gap, row_mean = reference_forward(model, x, 0.5, mean_query=True)
    ref_cls, _, _, row_cls = reference_forward(model, x, 0.5, mean_query=False)
    assert gap > 1e-6
    # the first scoring row is the explicit mean-query row: the same rows through evolve
    # (what the converted scoring block calls) ...
    with torch.no_grad():
        blk = model.blocks[0]
        h = blk.norm1(model.norm_pre(model._pos_embed(model.patch_embed(x))))
        q, k, _ = blk.attn.qkv(h).reshape(2, -1, 3, 2, 32).permute(2, 0, 3, 1, 4).unbind(0)
    torch.testing.assert_close(ev_rows.sdpa_query_row(q, k, None, None, 1, False)[:, 0, 1:], row_mean, atol=1e-6, rtol=0)
    # ... and the selections it leads to: evoplug's output matches the mean-query reference,
    # which is far from the cls-query one
    assert (row_mean - row_cls).abs().max() > 1e-2
    assert [s.tokens_run for s in blocks] == runs
    torch.testing.assert_close(out, ref_mean, atol=1e-5, rtol=0)
    assert (out - ref_cls).abs().max() > 1e-2
    # explicit 'cls' is the default on a cls model
    fast_cls = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], global_query="cls")
    assert all(s.analysis.global_query == "cls" for s in evoplug.get_report(fast_cls).blocks)
    with torch.no_grad():
        torch.testing.assert_close(fast_cls(x), ref_cls, atol=1e-5, rtol=0)


class _RegistersFirstViT(timm.models.vision_transformer.VisionTransformer):
    """Registers before the class token: ``[reg, reg, cls, patches]`` (timm puts the class
    token first)."""

    def _pos_embed(self, x):
        x = x + self.pos_embed                      # (no_embed_class: the patches' only)
        B = x.shape[0]
        return torch.cat([self.reg_token.expand(B, -1, -1), self.cls_token.expand(B, -1, -1), x], 1)


def test_registers_before_the_class_token_rank_by_the_mean_query_not_a_register():
    """evoplug reads the class query as the first prefix token's: with registers before the
    class token, a register's query ranked the tokens while explain() said "global query: cls"
    (0.3 to 1.8 off the paper's forward; audit W4 of the thirty-eighth session, fuzzing). Noise
    on the declared ``cls_token`` now shows where it is: the mean query ranks (said in the
    notes), and ``global_query='cls'`` is refused, naming the class token's place."""
    model = peaky_weights(timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=4,
        embed_dim=64, num_heads=2, reg_tokens=2, no_embed_class=True, global_pool="avg"))
    model.__class__ = _RegistersFirstViT
    x = _images()
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], reselect_every=1)
    # the noise goes to the forward, not into the parameter: a twin build (for a new size)
    # converts the model's shared parameters while other threads may read them (a first
    # version wrote it in and put it back: another thread saw the class token 3.3 off; W5)
    other = copy.deepcopy(model)
    version = other.cls_token._version
    evoplug.convert(other, keep_ratio=0.5, example_input=x[:1], inplace=True)
    assert other.cls_token._version == version
    blocks = evoplug.get_report(fast).blocks
    assert all(s.analysis.global_query == "mean" and s.analysis.num_prefix == 3 for s in blocks)
    assert "the class token is prefix token 2 of 3" in evoplug.explain(fast)
    ref, runs, gap, _ = reference_forward(model, x, 0.5, P=3, mean_query=True, reselect_every=1)
    assert gap > 1e-6
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref, atol=1e-5, rtol=0)
    with pytest.raises(evoplug.ConversionError, match="class token is prefix token 2 of 3"):
        evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], global_query="cls")
    # timm's own order, the class token first: its query ranks
    model.__class__ = timm.models.vision_transformer.VisionTransformer
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1])
    assert all(s.analysis.global_query == "cls" for s in evoplug.get_report(fast).blocks)


def test_num_prefix_tokens_zero_on_cls_model():
    model = tiny_vit()
    x = _images()
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], num_prefix_tokens=0)
    for s in evoplug.get_report(fast).blocks:
        assert s.analysis.num_prefix == 0
        assert s.analysis.num_tokens == 65
        assert s.analysis.global_query == "mean"      # auto: no prefix token -> mean query
    with torch.no_grad():
        out = fast(x)
    # the cls token is now one of the 65 ranked tokens
    ref, runs, gap, _ = reference_forward(model, x, 0.5, P=0, mean_query=True)
    assert gap > 1e-6
    assert [s.tokens_run for s in evoplug.get_report(fast).blocks] == runs
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_cls_query_without_prefix_token_raises():
    model = tiny_vit()
    x = _images(1)
    with pytest.raises(evoplug.EvoplugError, match="global_query='cls' but the block has no prefix token"):
        evoplug.convert(model, example_input=x, num_prefix_tokens=0, global_query="cls")
    no_cls = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(evoplug.EvoplugError, match="global_query='cls' but the block has no prefix token"):
        evoplug.convert(no_cls, example_input=x, global_query="cls")
    fast = evoplug.convert(no_cls, example_input=x)   # auto -> mean query
    assert all(s.analysis.num_prefix == 0 and s.analysis.global_query == "mean"
               for s in evoplug.get_report(fast).blocks)


# ------------------------------------------------------------------------------------------
# 4. special tokens after the patches (YOLOS' detection tokens)
# ------------------------------------------------------------------------------------------

class DetTokenViT(nn.Module):
    """A timm ViT with ``S`` learned detection tokens after the patches, as YOLOS lays them
    out: [cls, patches, detection tokens]; the output is the normed cls and detection tokens.
    ``where='middle'`` puts them between the patches instead (refused)."""

    def __init__(self, vit, S=6, where="end"):
        super().__init__()
        self.vit, self.S, self.where = vit, S, where
        self.det = nn.Parameter(torch.randn(1, S, vit.embed_dim, generator=_gen(4)))

    def tokens(self, img):
        v = self.vit
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(img))))
        det = self.det.expand(x.shape[0], -1, -1)
        if self.where == "middle":
            return torch.cat([x[:, :9], det, x[:, 9:]], 1)
        return torch.cat([x, det], 1)

    def head(self, x):
        x = self.vit.norm(x)
        return torch.cat([x[:, :1], x[:, -self.S:]], 1)

    def forward(self, img):
        return self.head(self.vit.blocks(self.tokens(img)))


@pytest.mark.parametrize("keep,opts", [(0.5, {}), (0.25, dict(reselect_every=1)),
                                       (0.5, dict(representative=False, start_block=2))],
                         ids=["keep0.5", "keep0.25-reselect1", "keep0.5-placeholder-start2"])
def test_trailing_special_tokens_match_reference(keep, opts):
    """Detection tokens after the patches are found as tokens that do not come from the image
    and kept on the slow path like the cls token, the patches between them ranked: the output
    matches the paper's rules written out with both kinds of special tokens."""
    model = DetTokenViT(tiny_vit())
    x = _images()
    fast = evoplug.convert(model, keep_ratio=keep, example_input=x[:1], **opts)
    blocks = evoplug.get_report(fast).blocks
    assert all((s.analysis.num_prefix, s.analysis.num_suffix) == (1, 6) for s in blocks)
    assert "1 leading and 6 trailing" in blocks[0].analysis.prefix_source
    assert "1+6" in evoplug.explain(fast)
    with torch.no_grad():
        out = fast(x)
    ref, runs, gap, _ = reference_forward(
        model, x, keep, start_block=opts.get("start_block", 1), reselect_every=opts.get("reselect_every"),
        representative=opts.get("representative", True), S=6)
    assert gap > 1e-6
    assert [s.tokens_run for s in blocks] == runs
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert (model(x) - out).abs().max() > 1e-2
        kept = blocks[-1].context.sel                  # patch indices of the kept tokens
        assert kept.shape == (2, ev.num_keep(64, keep)) and int(kept.max()) < 64
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=0)


def test_special_tokens_between_the_patches_are_refused():
    """Named as runs of indices, the first six (a 7x7 window's padding over a 4x4 map listed
    some 190 indices per block: audit P4 of the twenty-eighth session)."""
    from evoplug.analyse.discover import _spans
    model = DetTokenViT(tiny_vit(), where="middle")
    with pytest.raises(evoplug.ConversionError, match=r"tokens 0, 9-14 of 71 do "
                                                      "not come from the patch map and are neither"):
        evoplug.convert(model, example_input=_images(1))
    padded = tuple(i for i in range(196) if i % 14 >= 4 or i >= 56)      # 4x4 of a 14x14
    assert _spans(padded) == "4-13, 18-27, 32-41, 46-195"
    assert _spans(tuple(range(0, 40, 2))) == "0, 2, 4, 6, 8, 10, ... (20 tokens)"


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "softmax"])
def test_trailing_special_tokens_without_a_class_token_use_the_patches_mean_query(fused):
    """Without a class token the mean query averages the patch queries only: between the
    prefix and the trailing tokens in the original order, after both in a subset."""
    model = DetTokenViT(tiny_vit(class_token=False, global_pool="avg", fused=fused))
    x = _images()
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], reselect_every=1)
    blocks = evoplug.get_report(fast).blocks
    assert all((s.analysis.num_prefix, s.analysis.num_suffix, s.analysis.global_query) == (0, 6, "mean")
               for s in blocks)
    with torch.no_grad():
        out = fast(x)
    ref, runs, gap, _ = reference_forward(model, x, 0.5, reselect_every=1, P=0, S=6, mean_query=True)
    assert gap > 1e-6
    assert [s.tokens_run for s in blocks] == runs
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)     # outputs up to 3.5


class LateDetTokenViT(DetTokenViT):
    """Detection tokens appended after the second block: the blocks after it see 71 tokens,
    7 more than the 8x8 patch map, of which only the cls token leads."""

    def forward(self, img):
        v = self.vit
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(img))))
        x = v.blocks[1](v.blocks[0](x))
        x = torch.cat([x, self.det.expand(x.shape[0], -1, -1)], 1)
        return self.head(v.blocks[3](v.blocks[2](x)))


class PrunedViT(nn.Module):
    """A timm ViT that keeps its cls token and the first 48 patches after its second block
    (token pruning between blocks, no patch map of the 49 tokens left)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, img):
        v = self.vit
        x = v.norm_pre(v._pos_embed(v.patch_embed(img)))
        x = v.blocks[1](v.blocks[0](x))[:, :49]
        return v.head(v.norm(v.blocks[3](v.blocks[2](x)))[:, 0])


def test_the_class_token_stays_first_after_patches_are_dropped_between_blocks():
    """49 tokens after a 65-token stage fit a 7x7 grid: the analysis took them for a pyramid
    stage without prefix tokens and carried the scores onto a 7x7 grid that does not exist, so
    the cls token was ranked as a patch and went down the fast path (never selected, here),
    until the eighteenth session. The blocks after the drop keep the prefix of the block before
    (no patch map shows which tokens remain), and the first of them scores the new token set."""
    model = PrunedViT(tiny_vit()).eval()
    x = _images(4)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], start_block=1)
    report = evoplug.get_report(fast)
    assert [s.analysis.num_prefix for s in report.blocks] == [1, 1, 1, 1]
    assert [s.role for s in report.blocks] == ["score", "evolve", "score", "evolve"]
    assert "kept from `vit.blocks.1`" in report.blocks[2].analysis.prefix_source
    with torch.no_grad():
        fast(x)
    assert [s.tokens_run for s in report.blocks] == [65, 34, 49, 26]   # 1 + 24 + 1
    assert report.blocks[3].analysis.global_query == "cls"


def test_special_tokens_of_a_later_stage_are_found_where_they_are():
    """The provenance forward reads every token count's first block, not only the first block:
    the 71-token blocks keep the cls token and the 6 trailing detection tokens and rank the 64
    patches (a patch-grid count alone would take 7 leading tokens, cls and 6 patches, for the
    prefix and rank the detection tokens as patches)."""
    model = LateDetTokenViT(tiny_vit())
    x = _images()
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], start_block=1, strict=False)
    report = evoplug.get_report(fast)
    assert [(s.analysis.num_prefix, s.analysis.num_suffix) for s in report.blocks] == \
        [(1, 0), (1, 0), (1, 6), (1, 6)]
    # a new token set with special tokens after the patches: the scores start again there
    assert [s.role for s in report.blocks][2] == "score" and not report.unscored
    with torch.no_grad():
        fast(x)
    assert [s.tokens_run for s in report.blocks] == [65, 34, 71, 40]   # 1 + 6 + 32 + 1
    kept = report.blocks[3].context.sel
    assert kept.shape == (2, 32) and int(kept.max()) < 64


class DeafStageViT(DetTokenViT):
    """After the second block the tokens are 17 learned ones that hardly depend on the image
    (as random weights can make a later stage): the noise forward leaves every row unchanged."""

    def forward(self, img):
        v = self.vit
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(img))))
        x = v.blocks[1](v.blocks[0](x))
        x = self.det[:, :1].new_zeros(1, 17, x.shape[-1]) + self.det[:, :1] + 1e-9 * x[:, :17]
        return v.blocks[3](v.blocks[2](x))[:, 0]


def test_rows_the_noise_did_not_reach_are_no_special_tokens():
    """A token set the noise forward does not reach at all says nothing about which tokens are
    special: it is ignored (the blocks are analysed as without it), not taken for 17 special
    tokens with no patch left; the 17 (fewer than before, no patch map of them) keep the
    leading cls token of the blocks before."""
    model = DeafStageViT(tiny_vit())
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=_images(1), strict=False)
    report = evoplug.get_report(fast)
    assert not report.failed, report.failed
    assert [(s.analysis.num_prefix, s.analysis.num_suffix) for s in report.blocks][2:] == [(1, 0)] * 2
    assert report.blocks[2].analysis.prefix_source.startswith("kept from `vit.blocks.1`")


def test_tied_scores_keep_the_same_tokens_whatever_the_batch():
    """Tied global scores go by token index: PVTv2's first-stage row over a 2x2 reduced map,
    upsampled and pooled onto the next stage's grid, ties exactly (64 scores, 39 values here),
    and topk broke the tie at the k-th place by the batch's layout: one image's output moved by
    0.85 between a batch of 5 and alone (until the nineteenth session; a stable sort now)."""
    g = torch.tensor([[[1e30, 0.3, 0.2, 0.2, 0.2, 0.1]]]).repeat(3, 1, 1)
    sel = ev.select(g, 2, 1, 4, True, True)
    assert sel.top[:, 0].tolist() == [[0, 1, 2]] * 3 and sel.pos.tolist() == [[0, 1, 2, 3]] * 3
    torch.manual_seed(0)
    model = peaky_weights(timm.create_model("pvt_v2_b0", pretrained=False), 0, False)
    torch.manual_seed(3)
    x = torch.randn(5, 3, 64, 64)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], reselect_every=1)
    with torch.no_grad():
        batch = fast(x)
        for i in range(5):
            torch.testing.assert_close(batch[i:i + 1], fast(x[i:i + 1]), atol=1e-4, rtol=1e-4)


def test_the_representative_weights_sum_to_one_when_the_scores_underflow():
    """Sharp class attention leaves the tokens not kept scores that sum below 1e-12: the weights
    were normalised by max(sum, 1e-12), summed to 1e-10 and made the representative token
    nearly zero (off the paper's rule by up to 2.3 until the nineteenth session)."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = peaky_weights(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4,
                                            num_heads=2), 0)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.qkv.weight.mul_(6.0)
    torch.manual_seed(3)
    x = torch.randn(3, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], reselect_every=1)
    with torch.no_grad():
        ref = reference_forward(model, x, 0.5, start_block=1, reselect_every=1)[0]
        torch.testing.assert_close(fast(x), ref, atol=1e-4, rtol=1e-4)
    g = torch.tensor([[[1e30, 0.5, 0.5, 0.0, 0.0]]])          # every score not kept is 0
    sel = ev.select(g, 2, 1, 4, True, False)
    torch.testing.assert_close(sel.weights, torch.tensor([[[0.0, 0.0, 0.0, 0.5, 0.5]]]))


@pytest.mark.parametrize("kv_grid,grid", [((2, 2), (8, 8)), ((3, 5), (7, 13)), ((7, 7), (14, 14)),
                                          ((4, 4), (4, 4)), ((1, 3), (5, 9))])
def test_upsampled_rows_by_taps_are_interpolate_and_tie_exactly(kv_grid, grid):
    """The row over a reduced map spread onto the tokens with two lerps of the neighbours is
    ``interpolate``'s bilinear result (align_corners=False), and tokens whose taps meet equal
    values (the map's edge) get exactly equal scores (batch-independent ties)."""
    row = torch.rand(3, 1, kv_grid[0] * kv_grid[1], generator=_gen(4)).softmax(-1)
    taps = tuple(ev_rows.upsample_taps(i, o) for i, o in zip(kv_grid, grid))
    taps = ((taps[0][0], taps[0][1], taps[0][2].unsqueeze(1)), taps[1])
    ref = ev_rows.upsample_row(row, kv_grid, grid)                     # interpolate
    out = ev_rows.upsample_row(row, kv_grid, grid, taps)
    torch.testing.assert_close(out, ref, atol=1e-7, rtol=1e-5)
    m = out.view(3, *grid)
    for side, (i, o) in enumerate(zip(kv_grid, grid)):
        t0, t1, _ = ev_rows.upsample_taps(i, o)
        same = (t0 == t1).nonzero().flatten()    # clamped at an edge: the source value itself
        if len(same) > 1:
            a, b = m.select(side + 1, int(same[0])), m.select(side + 1, int(same[1]))
            if t0[same[0]] == t0[same[1]]:
                assert torch.equal(a, b)
