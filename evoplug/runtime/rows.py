"""Attention rows: the global query's attention over the keys a block ran on, mean over heads,
(B, 1, n_keys), float32; from an explicit attention map (free), from the logits (the mean query
of the patch tokens, which the logits are linear in), from q and k for fused
``scaled_dot_product_attention``, from the module's weights for ``nn.MultiheadAttention``; and
for windowed or spatially reduced attention, mapped back onto the tokens (:func:`window_row`,
:func:`upsample_row`). They run inside the rewritten block graphs (rewrite/row.py puts them
there), hence plain functions; computed without autograd (no detach op needed). Batched tensor
ops, no host synchronisation, as few ATen ops as the math allows (tests/test_op_budget.py).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .gather import device_constant


#: smallest normaliser of rows mapped or carried onto tokens (all their entries underflowed)
TINY = 1e-12


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``: ``t`` itself where it is already (``t.to(dtype)`` then returns ``t``
    too, but through the dispatcher: about 1.3 us of host time each, and an ATen op under
    ``inference_mode``, 2 per evolving block of DeiT-S; docs/benchmarks.md)."""
    return t if t.dtype == dtype else t.to(dtype)


def as_float(t: Tensor) -> Tensor:
    """``t`` in float32 (:func:`as_dtype`: no op where it is already)."""
    return as_dtype(t, torch.float32)


def _heads_mean(p: Tensor, batch: int) -> Tensor:
    """(B, ..., n_keys) probabilities -> (B, 1, n_keys) float32, mean over the middle dims (and
    over heads merged into the batch dim, image-major: (B * heads, n_keys))."""
    if p.dim() != 3 or p.shape[0] != batch:
        rows = math.prod(p.shape[:-1]) // batch if batch else math.prod(p.shape[1:-1])
        p = p.reshape(batch, rows, p.shape[-1])   # no -1: batch 0 runs
    return p.mean(1, keepdim=True, dtype=torch.float32)


def probs_query_row(probs: Tensor, num_prefix: int, images: Optional[int] = None) -> Tensor:
    """Row of the cls query (query 0) in an explicit attention map (B, H, Nq, Nk): free.
    ``images``: the batch size where the heads are merged into the batch dim (B * H, Nq, Nk)."""
    with torch.no_grad():
        return _heads_mean(probs.select(-2, 0), probs.shape[0] if images is None else images)


def patch_span(num_prefix: int, num_suffix: int, pos: Optional[Tensor]):
    """Where the patch queries are when special tokens also follow the patches: (tokens before,
    tokens after) them, in the original order (a dense run, ``pos is None``: [prefix, patches,
    trailing]) or in a subset's ([prefix, trailing, kept, representative])."""
    return (num_prefix, num_suffix) if pos is None else (num_prefix + num_suffix, 0)


def _patches(t: Tensor, dim: int, num_prefix) -> Tensor:
    """The patch queries' rows of ``t`` along ``dim``: after ``num_prefix`` rows, or between
    the (before, after) counts of :func:`patch_span`."""
    before, after = num_prefix if isinstance(num_prefix, tuple) else (num_prefix, 0)
    return t.narrow(dim, before, t.shape[dim] - before - after)


def _mean_query_probs(logits: Tensor, num_prefix, masked: bool = False,
                      padded: bool = True) -> Tensor:
    """softmax of the mean of the logits rows of the patch queries (B, ..., Nq, Nk) -> (B, ..., Nk):
    the attention of the mean query. The mean is accumulated in float32 without a float32 copy
    of the whole map. ``masked``: the rows mask keys per query (:func:`_masked_row_mean`);
    otherwise a key every row masks (padding) is no query of the mean either."""
    rows = _patches(logits, -2, num_prefix)
    if masked:
        return _masked_row_mean(rows).softmax(-1)
    if padded and logits.dtype != torch.bool and rows.shape[-2] == logits.shape[-1] - _span_total(num_prefix):
        # self-attention over a padded sequence: padded queries (their keys masked in every row)
        # do not enter the mean (their content would move the ranking of the real tokens)
        valid = _patches(logits.amax(-2) > torch.finfo(logits.dtype).min / 2, -1, num_prefix)
        return _mean_of_valid(rows, valid).softmax(-1)
    return rows.mean(-2, dtype=torch.float32).softmax(-1)


def _mean_of_valid(rows: Tensor, valid: Tensor, keepdim: bool = False) -> Tensor:
    """Mean over the rows (dim -2, in float32) that ``valid`` (..., rows) marks. The others are
    left out by a ``where``, not multiplied by 0: a padded query's logits row holds -inf at the
    padded keys (a bool or 0/-inf mask in explicit attention), and -inf * 0 made every padded
    image's output NaN (audit V1, thirty-seventh session)."""
    v = valid.unsqueeze(-1)
    return torch.where(v, rows, 0.0).sum(-2, keepdim=keepdim, dtype=torch.float32) / \
        v.sum(-2, keepdim=keepdim).clamp_min(1)


def _span_total(num_prefix) -> int:
    """The special tokens around the patch queries (see :func:`patch_span`)."""
    before, after = num_prefix if isinstance(num_prefix, tuple) else (num_prefix, 0)
    return before + after


def _masked_row_mean(rows: Tensor) -> Tensor:
    """Mean over the query rows (dim -2, in float32) of each key's entries that no mask removed
    (above half the dtype's lowest value; a bool mask's True), -inf for a key every row masks:
    the mean query of a causal or block-diagonal mask sees each key as the queries that see it
    do. (A plain mean masks every key one query cannot see, or overflows to NaN.)"""
    if rows.dtype == torch.bool:
        return torch.zeros(rows.shape[:-2] + rows.shape[-1:], device=rows.device).masked_fill(
            ~rows.any(-2), float("-inf"))
    seen = rows > torch.finfo(rows.dtype).min / 2
    count = seen.sum(-2)
    total = torch.where(seen, rows, torch.zeros((), dtype=rows.dtype, device=rows.device)).sum(
        -2, dtype=torch.float32)
    return (total / count.clamp_min(1)).masked_fill(count == 0, float("-inf"))


def logits_query_row(logits: Tensor, num_prefix: int, images: Optional[int] = None,
                     masked: bool = False, padded: bool = True) -> Tensor:
    """Attention row of the *mean query* of the patch tokens from pre-softmax logits
    (B, H, Nq, Nk).

    The logits are linear in q, so softmax(mean_i logits_i) is exactly the attention of the
    mean query (bias terms included). Used when there is no cls token. ``masked``: a mask
    that differs between the query rows (causal) is averaged per key over the rows that see it.
    ``padded``: the logits may mask whole keys (a key padding mask among the block's
    arguments): the padded positions' queries are left out of the mean (False: the conversion
    saw no mask argument; saves the check's ops).
    """
    with torch.no_grad():
        return _heads_mean(_mean_query_probs(logits, num_prefix, masked, padded),
                           logits.shape[0] if images is None else images)


def _sdpa_query_probs(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], scale: Optional[float],
                      num_prefix: int, cls_query: bool, masked: bool = False,
                      padded: bool = True) -> Tensor:
    """Attention of one query per head (the cls token if ``cls_query``, else the mean query of
    the patch tokens) for fused ``scaled_dot_product_attention`` (q, k (..., N, d)): (..., Nk),
    float32. O(N d) per head (:func:`query_logits`; no float32 copy of q or k)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    valid = None
    if cls_query:
        qq = q.narrow(-2, 0, 1)
    elif padded and attn_mask is not None and attn_mask.shape[-1] == q.shape[-2]:
        # a key padding mask: the padded queries do not enter the mean query (their content
        # moved the real tokens' ranking, and with it their outputs, until the eighteenth session)
        m = attn_mask if attn_mask.dtype == torch.bool else \
            attn_mask > torch.finfo(attn_mask.dtype).min / 2
        valid = _patches(m.any(-2), -1, num_prefix)
        qq = as_dtype(_mean_of_valid(_patches(q, -2, num_prefix), valid, keepdim=True),
                      k.dtype)
    else:
        qq = as_dtype(_patches(q, -2, num_prefix).mean(-2, keepdim=True, dtype=torch.float32),
                      k.dtype)
    if q.dim() >= 3 and k.dim() == q.dim() and q.shape[-3] != k.shape[-3] and \
            q.shape[-3] % k.shape[-3] == 0:
        # grouped-query attention (``enable_gqa=True``): query head i reads key head i // groups
        g = q.shape[-3] // k.shape[-3]
        logits = query_logits(qq.unflatten(-3, (k.shape[-3], g)), k.unsqueeze(-3), scale).flatten(-3, -2)
    else:
        logits = query_logits(qq, k, scale)                       # (..., Nk)
    if attn_mask is None:
        return logits.softmax(-1, dtype=torch.float32)
    return (as_float(logits) + _query_mask(attn_mask, num_prefix, cls_query, masked, valid,
                                           q.shape[-2])).softmax(-1)


def _query_mask(m: Tensor, num_prefix, cls_query: bool, masked: bool, valid: Optional[Tensor],
                queries: int) -> Tensor:
    """The global query's row of an attention mask in ``scaled_dot_product_attention``'s form
    (bool: True attends; float: added; (..., Nq or 1, Nk)) as a float32 term (..., Nk): the cls
    query's row, or the mean query's (the rows of the ``valid`` queries where some are padded;
    each key's unmasked entries where the rows mask keys per query, ``masked``)."""
    if masked and not cls_query and m.shape[-2] != 1:   # a mask per query row (causal)
        return _masked_row_mean(_patches(m, -2, num_prefix))
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(~m, float("-inf"))
    m = as_float(m)
    if m.shape[-2] != 1 and valid is not None and m.shape[-2] == queries:
        # the mask of the mean of the valid queries: the padded queries' rows (masked whole by
        # NaFlex's mask) left out, as from the mean (all in, every key was -inf: NaN; a padded
        # call after a calibration without padding, whose rows were all alike)
        rows, w = _patches(m, -2, num_prefix), valid.unsqueeze(-1)
        m = torch.where(w, rows, torch.zeros((), device=m.device)).sum(-2, keepdim=True) / \
            w.sum(-2, keepdim=True).clamp_min(1)
    elif m.shape[-2] != 1:
        if cls_query:
            return m.select(-2, 0)      # (one op; a slice and a squeeze were two)
        m = _patches(m, -2, num_prefix).mean(-2, keepdim=True)
    return m.squeeze(-2)


#: how :func:`query_logits` computes: None = by where it runs (the matrix form in eager mode on
#: a GPU, the product and sum on CPUs and under torch.compile), True / False = always the matrix
#: form / the product and sum. Measured on an H200 (docs/gpu.md, "The global-query logits"): in
#: eager mode the matrix form cut DeiT-S's kernel time per forward by 7% (8.23 -> 7.65 ms) and
#: ran DeiT-B and ViT-L/384 5% faster; compiled, Inductor's fused product-and-sum was faster
#: (1.17x vs 1.12x). Private: benchmarks/gpu_suite.py times the forms side by side.
_MATMUL_LOGITS: Optional[bool] = None


#: (1, H, H*d) head masks times the scale, per (H, d, scale, dtype, device)
_HEAD_MASKS: dict = {}


def _head_mask(heads: int, dim: int, scale: float, dtype, device) -> Tensor:
    """(1, H, H*d): ``scale`` on head h's d channels in row h, 0 elsewhere."""
    def make():
        eye = torch.eye(heads, dtype=dtype, device=device) * scale
        return eye[:, :, None].expand(heads, heads, dim).reshape(1, heads, heads * dim)
    return device_constant(_HEAD_MASKS, (heads, dim, float(scale), dtype, device), make)


def query_logits(qq: Tensor, k: Tensor, scale: float) -> Tensor:
    """``scale * (qq . k)``: qq (..., 1, d), k (..., Nk, d) -> (..., Nk), float32 (the matrix
    form in bfloat16: bfloat16, whose range is float32's).

    A product and a sum over d (the fewest ATen ops: 2 fewer per row), or on a GPU in eager mode
    (:data:`_MATMUL_LOGITS`) the matrix form: it reads k once where it lies, with no k-sized
    temporary that the product writes and the sum reads again, for the two layouts that allow
    it without a copy (told by the strides, no exception on the hot path): timm's
    ``qkv.reshape(B, N, 3, H, d).permute(...)`` slice (B, H, Nk, d), where k transposed is a
    (B, H*d, Nk) matrix and one product with the block-diagonal (B, H, H*d) matrix of the queries
    gives every head's logits; and a k whose batch and head dims merge (contiguous per head).
    Anything else takes the product and sum.

    The sum accumulates into float32 and both forms' float16 products hold their terms divided
    by 2^8, scaled back in float32: float16 logits beyond its range (65504, sharp attention)
    were inf, the scores NaN and every output NaN where the model's own attention, which
    accumulates in float32, was finite (audit A3 of the fortieth session); and in the product
    form so were single terms q_i * k_i beyond it (logits of about 3e5; audit H1 of the
    forty-fourth session)."""
    matmul = _MATMUL_LOGITS
    if matmul is None:
        matmul = k.is_cuda and not torch.compiler.is_compiling()
    if matmul and k.dim() == 4 and qq.dtype == k.dtype:
        B, H, n, d = k.shape
        ks, qs = k.stride(), qq.stride()
        half = k.dtype == torch.float16
        s = scale / _HALF_SHIFT if half else scale
        logits = None
        if qq.shape == (B, H, 1, d) and ks[1] == d * ks[3] and qs[1] == d * qs[3]:
            # heads merge with d: k^T is a (B, H*d, n) view, the query a (B, 1, H*d) view
            keys = k.transpose(2, 3).view(B, H * d, n)
            logits = torch.bmm(qq.view(B, 1, H * d) * _head_mask(H, d, s, qq.dtype, qq.device), keys)
        elif qq.shape == (B, H, 1, d) and ks[0] == H * ks[1]:
            # batch merges with heads: (B*H, n, d), one matrix-vector product per head
            logits = torch.bmm(k.view(B * H, n, d), (qq * s).view(B * H, d, 1)).view(B, H, n)
        if logits is not None:
            return logits.float().mul_(_HALF_SHIFT) if half else logits
    if qq.dtype == k.dtype == torch.float16:    # (its float16 terms divided by 2^8 too)
        return ((qq * (scale / _HALF_SHIFT)) * k).sum(-1, dtype=torch.float32).mul_(_HALF_SHIFT)
    return ((qq * scale) * k).sum(-1, dtype=torch.float32)


#: the matrix form's float16 logits are computed divided by this (a power of two: exact), so
#: logits up to 65504 * 256 stay finite; scaled back in float32
_HALF_SHIFT = 256.0


def sdpa_query_row(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], scale: Optional[float],
                   num_prefix: int, cls_query: bool, images: Optional[int] = None,
                   masked: bool = False, padded: bool = True) -> Tensor:
    """Global-query attention row for a fused ``scaled_dot_product_attention`` call: (B, 1, N).
    ``masked``, ``padded``: see :func:`logits_query_row`."""
    with torch.no_grad():
        return _heads_mean(_sdpa_query_probs(q, k, attn_mask, scale, num_prefix, cls_query, masked,
                                             padded),
                           q.shape[0] if images is None else images)


def mha_query_row(mha: torch.nn.MultiheadAttention, query: Tensor, key: Tensor,
                  attn_mask: Optional[Tensor], num_prefix: int, cls_query: bool,
                  key_padding_mask: Optional[Tensor] = None, masked: bool = False) -> Tensor:
    """Global-query attention row for ``nn.MultiheadAttention`` (need_weights may be False).

    Computes q only for the global query and uses q.k_j = (W_k^T q) . x_j + const, so the keys
    are never projected again: O(H N C) instead of O(N C^2). The masks as the module takes them
    (bool: True is masked): ``attn_mask`` (N, N), (B * heads, N, N), or gathered for a subset
    (B, 1 or heads, n, n); ``key_padding_mask`` (B, N): padded keys get no attention and padded
    queries do not enter the mean query (their content would move the real tokens' ranking).
    """
    with torch.no_grad():
        if not mha.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        query, key = as_float(query), as_float(key)
        E, H = mha.embed_dim, mha.num_heads
        B, d = query.shape[0], E // H
        if mha._qkv_same_embed_dim:
            w_q, w_k = mha.in_proj_weight[:E], mha.in_proj_weight[E:2 * E]
        else:
            w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
        w_q, w_k = as_float(w_q), as_float(w_k)
        b_q = as_float(mha.in_proj_bias[:E]) if mha.in_proj_bias is not None else None
        pad = None if key_padding_mask is None else (
            key_padding_mask if key_padding_mask.dtype == torch.bool else
            key_padding_mask <= torch.finfo(key_padding_mask.dtype).min / 2)
        valid = None if pad is None or cls_query else _patches(~pad, 1, num_prefix)
        if cls_query:
            g = query[:, :1]
        elif valid is not None:
            g = _mean_of_valid(_patches(query, 1, num_prefix), valid, keepdim=True)
        else:
            g = _patches(query, 1, num_prefix).mean(1, keepdim=True)               # (B, 1, E)
        qg = torch.nn.functional.linear(g, w_q, b_q).reshape(B, H, d)              # (B, H, d)
        u = torch.einsum("bhd,hdc->bhc", qg, w_k.reshape(H, d, -1))                # (B, H, Ck)
        logits = torch.einsum("bhc,bnc->bhn", u, key) / math.sqrt(d)               # (B, H, N)
        sinks = _mha_sinks(mha, qg, logits)
        if sinks is not None and sinks[1] is not None:
            logits = logits + sinks[1]
        if attn_mask is not None:
            m = attn_mask.reshape(B, H, *attn_mask.shape[-2:]) if attn_mask.dim() == 3 else attn_mask
            m = ~m if m.dtype == torch.bool else m          # scaled_dot_product_attention's form
            logits = logits + _query_mask(m, num_prefix, cls_query, masked, valid, m.shape[-2])
        if key_padding_mask is not None:
            logits = logits + (as_float(key_padding_mask) if key_padding_mask.dtype != torch.bool
                               else torch.zeros(pad.shape, device=pad.device).masked_fill(
                                   pad, float("-inf")))[:, None]
        if sinks is not None:        # (the row over the tokens' keys and the module's own)
            n = logits.shape[-1]
            return _heads_mean(torch.cat([logits, sinks[0]], -1).softmax(-1)[..., :n], logits.shape[0])
        return _heads_mean(logits.softmax(-1), logits.shape[0])


def _mha_sinks(mha: torch.nn.MultiheadAttention, qg: Tensor, logits: Tensor):
    """The logits (B, H, 1 or 2) of the keys ``nn.MultiheadAttention`` appends to the tokens'
    (``add_bias_kv``: its learned ``bias_k``; ``add_zero_attn``: a zero key), and the term
    (B, H, 1) the tokens' logits then need, ``q . b_k`` of their key bias (a constant over the
    tokens, which the softmax over them alone drops; None without a bias); None without such keys. Left out, the
    row was not the attention map's (audit H2 of the forty-fourth session: 0.099 off)."""
    if mha.bias_k is None and not mha.add_zero_attn:
        return None
    B, H, d = qg.shape
    E = mha.embed_dim
    scale = math.sqrt(d)
    bias = mha.in_proj_bias
    shift = None if bias is None else \
        as_dtype((qg * as_float(bias[E:2 * E]).reshape(H, d)).sum(-1, keepdim=True) / scale,
                 logits.dtype)
    sinks = [] if mha.bias_k is None else \
        [(qg * as_float(mha.bias_k).reshape(H, d)).sum(-1, keepdim=True) / scale]
    if mha.add_zero_attn:
        sinks.append(qg.new_zeros(B, H, 1))
    return as_dtype(torch.cat(sinks, -1), logits.dtype), shift


def mha_attn_mask(mask: Optional[Tensor], heads: int) -> Optional[Tensor]:
    """An ``attn_mask`` gathered for a subset, (B, 1 or heads, n, n), in the (B * heads, n, n)
    form ``nn.MultiheadAttention`` takes; others as they are."""
    if mask is None or mask.dim() != 4:
        return mask
    B, n, k = mask.shape[0], mask.shape[-2], mask.shape[-1]
    return mask.expand(B, heads, n, k).reshape(B * heads, n, k)


def _window_heads_mean(p: Tensor, head_dims, folded: int) -> Tensor:
    if head_dims:
        p = p.mean(dim=head_dims)
    if folded > 1:       # (B * windows * heads, Mk): the heads are the inner part of dim 0
        p = p.reshape(-1, folded, p.shape[-1]).mean(1)
    return p


def window_logits_row(logits: Tensor, head_dims, folded: int = 1) -> Tensor:
    """Mean-query attention row of every window from explicit logits (..., Mq, Mk): softmax per
    head, mean over the head dims (and over the ``folded`` heads merged into the leading dim).
    (B', windows..., Mk)."""
    with torch.no_grad():
        return _window_heads_mean(_mean_query_probs(logits, 0, padded=False), head_dims, folded)


def window_sdpa_row(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], scale: Optional[float],
                    head_dims, folded: int = 1) -> Tensor:
    """The same for fused ``scaled_dot_product_attention``: one mean query per window and head."""
    with torch.no_grad():
        # (a window's mask, Swin's shift, masks pairs, never a whole key: no padded queries)
        return _window_heads_mean(_sdpa_query_probs(q, k, attn_mask, scale, 0, False,
                                                    padded=False), head_dims, folded)


def window_row(row: Tensor, index: Tensor, num_tokens: int,
               slots: Optional[Tensor] = None) -> Tensor:
    """Per-window attention rows (B * windows, window tokens) -> one global row (B, 1, N).

    ``index`` (windows * window tokens,) holds the token each window slot holds, plus one (0 =
    padding, dropped). Each window's row sums to 1, so the result is renormalised to sum to 1
    like a global attention row. ``slots`` (N,), where every token has exactly one slot: the
    slot of each token (:func:`window_slots`), read with one ``index_select`` instead of a
    scatter into zeros; without padding the sum of float32 rows is then the number of windows,
    a constant (3 ops in all instead of 8: the op budget of windowed models)."""
    n = index.numel()
    if row.numel() % n:
        raise ValueError(f"windowed attention rows {tuple(row.shape)} do not match the {n} window "
                         "slots seen when the block was converted; convert with an example input "
                         "of this size")
    B = row.numel() // n
    with torch.no_grad():
        r = as_float(row.reshape(B, 1, n))
        if slots is not None:
            out = r.index_select(2, slots)
            if n == num_tokens and row.dtype in (torch.float32, torch.float64):
                # no padding: every window's row is all there, and sums to 1 within float32's
                # rounding (the runtime's rows are float32; a half-precision one does not)
                return out * (row.shape[-1] / n)
        else:
            out = r.new_zeros(B, 1, num_tokens + 1).scatter_add_(2, index.expand(B, 1, n), r)[..., 1:]
        return out / out.sum(-1, keepdim=True).clamp_min(TINY)


def window_slots(index: Tensor, num_tokens: int) -> Optional[Tensor]:
    """The slot of each token (N,) for :func:`window_row`, when every token 1..N has exactly
    one slot in ``index`` (windows partition the map; padding apart); else None."""
    order = index.argsort(stable=True)
    pad = int((index == 0).sum())
    if not torch.equal(index[order[pad:]], torch.arange(1, num_tokens + 1, device=index.device)):
        return None
    return order[pad:].clone()


def upsample_row(row: Tensor, kv_grid, grid, taps: Optional[tuple] = None) -> Tensor:
    """Attention row over spatially reduced keys (B, 1, h'*w') -> per patch token (B, 1, h*w):
    each token gets the (bilinearly interpolated) attention of the region it lies in.

    ``taps`` (:func:`upsample_taps` of each side, made once at conversion): the interpolation
    as two ``lerp`` of the neighbours, which gives a tap between equal values (the map's edge,
    where the source position is clamped, or two equal neighbours) exactly that value.
    ``interpolate`` computes (1 - l) a + l a there, rounded in a way the batch moves (its CPU
    kernel): tokens that are tied got scores an ulp apart in one batch and equal in another,
    and the kept tokens followed the batch (PVTv2, SegFormer: an image's output by up to 1.0)."""
    with torch.no_grad():
        B = row.shape[0]
        if taps is None:
            r = row.reshape(B, 1, kv_grid[0], kv_grid[1])
            r = torch.nn.functional.interpolate(r, size=tuple(grid), mode="bilinear", align_corners=False)
        else:
            (h0, h1, hw), (w0, w1, ww) = taps
            r = row.reshape(B, kv_grid[0], kv_grid[1])
            # (the weights are buffers: ``model.to(dtype)`` casts them; no op when it did not)
            r = torch.lerp(r.index_select(1, h0), r.index_select(1, h1),
                           as_dtype(hw, r.dtype))                     # (h, 1)
            r = torch.lerp(r.index_select(2, w0), r.index_select(2, w1),
                           as_dtype(ww, r.dtype))                     # (w,)
        r = r.reshape(B, 1, grid[0] * grid[1]).clamp_min(0)
        return r / r.sum(-1, keepdim=True).clamp_min(TINY)


def upsample_taps(size_in: int, size_out: int, device=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps of one side, as ``interpolate(..., align_corners=False)`` takes them:
    (first neighbour, second neighbour (the first at the edge), weight of the second)."""
    scale = size_in / size_out
    src = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(size_in - 1)
    i1 = (i0 + 1).clamp_max(size_in - 1)
    w = (src - i0).clamp(0, 1).to(torch.float32)
    return i0.to(device), i1.to(device), w.to(device)
