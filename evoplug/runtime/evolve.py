"""Token-evolution math of Evo-ViT: scoring, top-k, representative token, slow/fast update,
restoring the original order. Batched tensor ops only (topk/gather/scatter/bmm), no Python
loops over tokens, no host synchronisation; every shape depends only on the input's shape.

Conventions: ``x`` is (B, N, C) with ``P`` leading prefix tokens (cls, distillation, registers)
and ``M = N - P`` patch tokens; ``k`` patch tokens are kept (slow update). Where special tokens
also follow the patches (YOLOS' detection tokens), ``num_prefix`` here counts all of them and
``M`` excludes them. Scores ``g`` are (B, 1, N), float32, one per *token*: the special tokens
hold fixed rank constants above any attention score (so one top-k takes them first, in order,
then the best patches), the
patch tokens their global attention (detached: they rank tokens, they are not trained through;
a learnable trade-off is a training extra). Attention rows are (B, 1, n) over the keys a block
ran on, float32, mean over heads.

The op count matters as much as the FLOPs (each op is launch and host time on a GPU), so every
step below is written in as few ATen ops as the math allows; the budget per evolving block is
tested (tests/test_op_budget.py, docs/architecture.md#op-budget).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from ..options import read_trade_off

#: score of the last prefix token; prefix token i of P gets (P - i) times this: above any
#: attention score (a probability), exact under the score update (its trade-off weight is 0)
PREFIX_RANK = 1e30
#: smallest normaliser of rows mapped or carried onto tokens (all their entries underflowed)
_TINY = 1e-12


# --------------------------------------------------------------------------------------------
# Attention rows: the global query's attention over the keys, mean over heads, (B, 1, n_keys),
# float32. They run inside the rewritten block graphs (see rewrite/program.py), hence plain
# functions; computed without autograd (no detach op needed).
# --------------------------------------------------------------------------------------------

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
        qq = _mean_of_valid(_patches(q, -2, num_prefix), valid, keepdim=True).to(k.dtype)
    else:
        qq = _patches(q, -2, num_prefix).mean(-2, keepdim=True, dtype=torch.float32).to(k.dtype)
    if q.dim() >= 3 and k.dim() == q.dim() and q.shape[-3] != k.shape[-3] and \
            q.shape[-3] % k.shape[-3] == 0:
        # grouped-query attention (``enable_gqa=True``): query head i reads key head i // groups
        g = q.shape[-3] // k.shape[-3]
        logits = query_logits(qq.unflatten(-3, (k.shape[-3], g)), k.unsqueeze(-3), scale).flatten(-3, -2)
    else:
        logits = query_logits(qq, k, scale)                       # (..., Nk)
    if attn_mask is None:
        return logits.softmax(-1, dtype=torch.float32)
    return (logits.float() + _query_mask(attn_mask, num_prefix, cls_query, masked, valid,
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
    m = m.float()
    if m.shape[-2] != 1 and valid is not None and m.shape[-2] == queries:
        # the mask of the mean of the valid queries: the padded queries' rows (masked whole by
        # NaFlex's mask) left out, as from the mean (all in, every key was -inf: NaN; a padded
        # call after a calibration without padding, whose rows were all alike)
        rows, w = _patches(m, -2, num_prefix), valid.unsqueeze(-1)
        m = torch.where(w, rows, torch.zeros((), device=m.device)).sum(-2, keepdim=True) / \
            w.sum(-2, keepdim=True).clamp_min(1)
    elif m.shape[-2] != 1:
        m = m[..., :1, :] if cls_query else _patches(m, -2, num_prefix).mean(-2, keepdim=True)
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
    if torch.compiler.is_compiling():     # made inside the graph (constant-folded)
        return make()
    key = (heads, dim, float(scale), dtype, device)
    mask = _HEAD_MASKS.get(key)
    if mask is None:
        with torch.inference_mode(False):      # not an inference tensor (cached across modes)
            mask = _HEAD_MASKS[key] = make()
    return mask


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
        query, key = query.float(), key.float()
        E, H = mha.embed_dim, mha.num_heads
        B, d = query.shape[0], E // H
        if mha._qkv_same_embed_dim:
            w_q, w_k = mha.in_proj_weight[:E], mha.in_proj_weight[E:2 * E]
        else:
            w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
        w_q, w_k = w_q.float(), w_k.float()
        b_q = mha.in_proj_bias[:E].float() if mha.in_proj_bias is not None else None
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
            logits = logits + (key_padding_mask.float() if key_padding_mask.dtype != torch.bool
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
        ((qg * bias[E:2 * E].float().reshape(H, d)).sum(-1, keepdim=True) / scale).to(logits.dtype)
    sinks = [] if mha.bias_k is None else \
        [(qg * mha.bias_k.float().reshape(H, d)).sum(-1, keepdim=True) / scale]
    if mha.add_zero_attn:
        sinks.append(qg.new_zeros(B, H, 1))
    return torch.cat(sinks, -1).to(logits.dtype), shift


def mha_attn_mask(mask: Optional[Tensor], heads: int) -> Optional[Tensor]:
    """An ``attn_mask`` gathered for a subset, (B, 1 or heads, n, n), in the (B * heads, n, n)
    form ``nn.MultiheadAttention`` takes; others as they are."""
    if mask is None or mask.dim() != 4:
        return mask
    B, n, k = mask.shape[0], mask.shape[-2], mask.shape[-1]
    return mask.expand(B, heads, n, k).reshape(B * heads, n, k)


# --------------------------------------------------------------------------------------------
# Position-dependent terms: follow the selected tokens.
# ``pos`` (B, n) holds the original token index (0..N-1) of every token of the subset.
# --------------------------------------------------------------------------------------------

def gather_pair_bias(bias: Tensor, pos: Optional[Tensor], heads: int = 0) -> Tensor:
    """Gather an additive attention term (..., Nq, Nk) to the subset's tokens.

    Used for relative position biases and masks that do not depend on the input tokens. A dim
    of size 1 broadcasts and is left alone; others are indexed by ``pos``. Result (B, L, n, n)
    (or with 1 where the input had 1). ``heads`` > 0: the attention merges its ``heads`` into
    the batch dim (logits (B * heads, N, N); one head with no head dim: ``heads`` 1), and a
    term (N, N), (1, N, N), (heads, N, N) or (B * heads, N, N) is gathered to (B * heads, n, n)
    (a 2-D one came out (B, 1, n, n), broadcast against the logits to rank 4, until the
    forty-first session). ``pos is None`` (dense run) returns the term unchanged.
    """
    if pos is None or bias.dim() < 2:
        return bias
    B, n = pos.shape
    R, K = bias.shape[-2], bias.shape[-1]
    merged = heads > 0 and bias.dim() <= 3
    if merged:
        b4 = (bias.reshape(-1, heads, R, K) if bias.dim() == 3 and bias.shape[0] > 1
              else bias.reshape(1, 1, R, K)).expand(B, heads, R, K)
    elif bias.dim() == 4 and bias.shape[0] == B and B > 1:
        b4 = bias
    else:
        b4 = bias.reshape(1, -1, R, K).expand(B, -1, -1, -1)
    L = b4.shape[1]
    if R != 1:
        b4 = torch.gather(b4, 2, pos[:, None, :, None].expand(B, L, n, K))
        R = n
    if K != 1:
        b4 = torch.gather(b4, 3, pos[:, None, None, :].expand(B, L, R, n))
    return b4.reshape(B * heads, R, b4.shape[-1]) if merged else b4


def gather_aligned(t: Tensor, pos: Optional[Tensor], dim: int) -> Tensor:
    """A per-token term lined up with the tokens by the block, ``t`` (1 or B, ..., N, ...) with
    the token dim ``dim`` (MLCD's rotary cos (1, N, 1, d) against queries (B, N, heads, d); a
    per-image mask (B, N)), gathered image by image to the subset: (B, ..., n, ...). ``pos is
    None`` (dense run): ``t``."""
    if pos is None:
        return t
    B, n = pos.shape
    size = list(t.shape)
    size[0], size[dim] = B, n
    index = pos.view(B, *([1] * (dim - 1)), n, *([1] * (t.dim() - dim - 1))).expand(size)
    return t.expand(B, *t.shape[1:]).gather(dim, index)


def patch_positions(pos: Optional[Tensor], num_prefix: int, num_suffix: int) -> Optional[Tensor]:
    """The places among the patch tokens of a subset's patch tokens (it runs its ``num_prefix``
    + ``num_suffix`` special tokens first): where a table of the patch tokens only is gathered.
    ``pos is None`` (dense run): None."""
    return None if pos is None else pos[:, num_prefix + num_suffix:] - num_prefix


def gather_token_arg(t: Tensor, pos: Tensor, dim: int, batched: bool = False) -> Tensor:
    """Gather a per-token tensor argument (e.g. rotary embeddings (M, D)) along ``dim``.

    Returns (B, *t.shape[:dim], n, *t.shape[dim+1:]), padded with singleton dims after the
    batch to rank 4 so that it broadcasts against (B, heads, n, d) like the original did.
    ``batched``: the argument's first dim is the batch (a per-image mask or conditioning
    stream (B, ..., N, ...), as at calibration; or 1, broadcast over the batch): each image's
    row gathered with its own positions, in the argument's own shape.
    """
    if batched and dim >= 1 and t.shape[0] in (1, pos.shape[0]):
        return gather_aligned(t, pos, dim)
    out = t.movedim(dim, 0)[pos]            # (B, n, *rest)
    out = out.movedim(1, dim + 1)
    while out.dim() < 4:
        out = out.unsqueeze(1)
    return out


#: how :func:`_take` copies rows: None = by where it runs (``index_select`` of whole rows on a
#: CPU, ``gather`` elsewhere), True / False = always the one / the other. On a CPU, ``gather``
#: with its index expanded over the channels reads an index per element: measured on the AMD
#: EPYC (2 threads, batch 32, docs/benchmarks.md) PVTv2-b1 ran 1.14x with it and 1.26x with
#: row copies (inference; training step at batch 16: 1.13x and 1.23x), Twins-S 1.17x and 1.23x.
#: Row copies cost 4 ATen ops more per call (the row offsets): on a GPU in eager mode each op is
#: host time (issue 12's op budgets count the ``gather`` form), so it keeps ``gather`` there.
#: Private: tests/test_op_budget.py counts both forms.
_ROW_SELECT: Optional[bool] = None


def _take(t: Tensor, pos: Tensor) -> Tensor:
    """t (B, N, *rest), pos (B, n) -> (B, n, *rest): t[b, pos[b, i]] (:data:`_ROW_SELECT`)."""
    B, n = pos.shape
    N, rest = t.shape[1], t.shape[2:]
    rows = _ROW_SELECT
    if rows is None:
        rows = t.device.type == "cpu"
    if rows and t.is_contiguous():
        flat = pos + torch.arange(0, B * N, N, dtype=pos.dtype, device=pos.device).unsqueeze(1)
        return t.flatten(0, 1).index_select(0, flat.view(-1)).view(B, n, *rest)
    return t.gather(1, pos.reshape(B, n, *([1] * len(rest))).expand(B, n, *rest))


def _rows_of(pos: Tensor, rows: int) -> Tensor:
    """``pos`` (B, n) for a tensor whose leading dim is ``rows``: B, or B * r with the images
    outermost (heads merged into the batch dim, timm's SAM): each image's row repeated r times."""
    B, n = pos.shape
    if rows == B:
        return pos
    if rows % B:
        raise ValueError(f"a tensor with {rows} rows for {B} images: not a whole number per image")
    return pos[:, None].expand(B, rows // B, n).reshape(rows, n)


def gather_pair_term(term: Tensor, pos: Optional[Tensor]) -> Tensor:
    """An additive term on the attention logits computed from the tokens on the full map
    (the decomposed relative positions of SAM / ViTDet: ``q_i . R[p_i - p_j]``), leading dims
    image-major (B * heads, M, M) or (B, heads, M, M), to the subset's pairs (..., n, n)."""
    if pos is None:
        return term
    B, n = pos.shape
    t = term.reshape(B, -1, term.shape[-2], term.shape[-1])
    L, K = t.shape[1], t.shape[-1]
    t = t.gather(2, pos[:, None, :, None].expand(B, L, n, K))
    t = t.gather(3, pos[:, None, None, :].expand(B, L, n, n))
    return t.reshape(*term.shape[:-2], n, n)


def to_canvas(t: Tensor, pos: Optional[Tensor], num_patches: int, dim: int) -> Tensor:
    """Full patch map for a 2-D operation inside a block (depthwise conv, spatial reduction).

    ``t`` holds the subset's n tokens along ``dim``; each goes to its original position, every
    other position holds the last token of the subset (the representative token), so a
    convolution over the map sees real neighbours where they were run and the tokens' summary
    elsewhere. ``pos is None`` (dense run) returns ``t``. No prefix tokens (checked by analysis).
    """
    if pos is None:
        return t
    t = t.movedim(dim, 1)
    pos = _rows_of(pos, t.shape[0])
    B, n = t.shape[:2]
    # the subset row each map position reads: its own token, else the representative token.
    # One row gather writes the map once (a fill + a scatter of the rows would write it 1.5x).
    # (out of place: under torch.func.vmap the positions are batched and the full map is not)
    src = torch.full((B, num_patches), n - 1, dtype=pos.dtype, device=pos.device).scatter(
        1, pos, torch.arange(n, dtype=pos.dtype, device=pos.device).expand(B, n))
    return _take(t, src).movedim(1, dim)


def first_not_none(a, b):
    return b if a is None else a


def sized_as_full(t: Tensor, full: Tensor) -> Tensor:
    """A stand-in of ``t`` (made token by token from the subset's tokens, of another width or
    dtype: ``qkv(x)``) with the full input's token count, read for its sizes, dtype and device
    (an expanded scalar: nothing is allocated)."""
    return t.new_empty(()).expand(t.shape[0], *full.shape[1:-1], t.shape[-1])


def in_evolving_run(full: Optional[Tensor], t: Tensor) -> Optional[Tensor]:
    """``t`` in evolving runs (the block's full input given), None in dense runs."""
    return None if full is None else t


def without_stat_update(module: torch.nn.Module, t: Tensor) -> Tensor:
    """``module(t)`` for a module holding a BatchNorm that also runs on other tokens of the same
    forward (the block's full input beside the subset): in train mode it normalises ``t`` by the
    batch's own statistics, as the module does, but leaves the running statistics and the batch
    count to the run on the subset, so they move once per forward as in the original. A torch
    BatchNorm itself is run as ``F.batch_norm`` without them (nothing of it changes: threads may
    share it); a module holding one (timm's ``ConvNorm``) runs on copies of them. A
    SyncBatchNorm takes this process's statistics here."""
    norms = [n for n in module.modules()
             if isinstance(n, _NormBase) and n.training and n.track_running_stats]
    if not norms:
        return module(t)        # (eval mode, or no running statistics: nothing moves)
    if norms == [module] and isinstance(module, _BatchNorm) and \
            type(module).forward in (_BatchNorm.forward, torch.nn.SyncBatchNorm.forward):
        return torch.nn.functional.batch_norm(t, None, None, module.weight, module.bias, True, 0.0,
                                              module.eps)
    # the run moves copies of the statistics, the module's own are put back untouched (written
    # back in place, they broke the backward: BatchNorm saves them for it; audit U4)
    own = [(n, k, n._buffers[k]) for n in norms
           for k in ("running_mean", "running_var", "num_batches_tracked") if n._buffers.get(k) is not None]
    for n, k, b in own:
        n._buffers[k] = b.clone()
    try:
        return module(t)
    finally:
        for n, k, b in own:
            n._buffers[k] = b


def full_canvas(t: Tensor, t_full: Optional[Tensor], pos: Optional[Tensor]) -> Tensor:
    """The exact full map: the block's token-wise ops re-run on its full input (dense run:
    the tokens themselves)."""
    return t if pos is None or t_full is None else t_full


def from_canvas_map(t: Tensor, pos: Optional[Tensor], dim: int, layout: str) -> Tensor:
    """A 2-D map (B, C, H, W) ('cf') or (B, H, W, C) ('cl'), or windows cut from the token
    sequence ('seq<k>': dims 1..k are the tokens, the rest channels), back to tokens along
    ``dim``, read at the subset's positions (all positions for a dense run)."""
    if layout.startswith("seq"):
        return from_canvas(t.flatten(1, int(layout[3:])).flatten(2), pos, dim)
    t = t.flatten(2) if layout == "cf" else t.flatten(1, 2)       # (B, C, M) / (B, M, C)
    if (layout == "cf") != (dim == 2):
        t = t.transpose(1, 2)
    return from_canvas(t, pos, dim)


def from_canvas(t: Tensor, pos: Optional[Tensor], dim: int) -> Tensor:
    """Read a full map (tokens along ``dim``) back at the subset's positions."""
    if pos is None:
        return t
    t = t.movedim(dim, 1)
    return _take(t, _rows_of(pos, t.shape[0])).movedim(1, dim)


def tokens_to_map(t: Tensor, full: Optional[Tensor], height: int, width: int) -> Tensor:
    """Entry of a block that takes a channels-last map (B, H, W, C) (Swin): the exact full map
    (the block's whole input, ``full``) in evolving runs; the tokens themselves in dense runs."""
    src = t if full is None else full
    return src.reshape(src.shape[0], height, width, src.shape[-1])


def from_stream_map(t: Tensor, pos: Optional[Tensor], dim: int, layout: str, sub: Tensor,
                    full: Optional[Tensor]) -> Tensor:
    """The residual stream of a map block, computed on the full map, read back at the subset's
    positions. Each subset token keeps its own stream value: ``+ (sub - full[pos])`` turns the
    representative token's slot (read at ``rep_pos``) into ``representative + that position's
    attention residual``; it is zero for the selected tokens."""
    out = from_canvas_map(t, pos, dim, layout)
    if pos is None or full is None:
        return out
    # sub equals full at every selected position: only the last slot (the representative
    # token's, when there is one) can differ, so only it is corrected (out is a fresh gather)
    slot = out.narrow(dim, out.shape[dim] - 1, 1)
    slot += (sub[:, -1:] - _take(full, pos[:, -1:])).movedim(1, dim)
    return out


def map_fast_base(stream: Tensor, stream_sub: Tensor, pos: Optional[Tensor], dim: int, layout: str):
    """A map block's windows run on the full map, so every token's attention update is exact:
    the fast update starts from the full stream after attention (not from the block input) and
    adds only the representative token's MLP residual. Returns (full stream as tokens (B, N, C),
    the representative's stream value (B, 1, C)) in evolving runs, None in dense runs."""
    if pos is None:
        return None
    return from_canvas_map(stream, None, dim, layout), stream_sub[:, -1:]


def stream_fast_base(full: Optional[Tensor], branch_full: Tensor, stream_sub: Tensor,
                     pos: Optional[Tensor]):
    """(B, N, C) blocks with windowed attention (Twins): the attention branch ran on every
    token, so the fast update starts from ``full + branch_full`` (each token's exact attention
    update) and adds the representative token's MLP residual. None in dense runs."""
    if pos is None or full is None:
        return None
    return full + branch_full, stream_sub[:, -1:]


def skip_fast_base(skip_full: Tensor, skip_rep: Tensor, pos: Optional[Tensor],
                   full: Optional[Tensor]):
    """(B, N, C) blocks whose skip path scales the stream (MetaFormer's ResScale ``s * x +
    f(norm(x))``; rewrite/skip_path.py): the fast update starts from every token's own skip
    path ``S(x_j)`` and adds the representative token's residual over its own, ``r_after -
    S(r_before)``. None in dense runs."""
    if pos is None or full is None:
        return None
    return skip_full, skip_rep


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
        r = row.reshape(B, 1, n).float()
        if slots is not None:
            out = r.index_select(2, slots)
            if n == num_tokens and row.dtype in (torch.float32, torch.float64):
                # no padding: every window's row is all there, and sums to 1 within float32's
                # rounding (the runtime's rows are float32; a half-precision one does not)
                return out * (row.shape[-1] / n)
        else:
            out = r.new_zeros(B, 1, num_tokens + 1).scatter_add_(2, index.expand(B, 1, n), r)[..., 1:]
        return out / out.sum(-1, keepdim=True).clamp_min(_TINY)


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
            r = torch.lerp(r.index_select(1, h0), r.index_select(1, h1), hw.to(r.dtype))  # (h, 1)
            r = torch.lerp(r.index_select(2, w0), r.index_select(2, w1), ww.to(r.dtype))  # (w,)
        r = r.reshape(B, 1, grid[0] * grid[1]).clamp_min(0)
        return r / r.sum(-1, keepdim=True).clamp_min(_TINY)


def upsample_taps(size_in: int, size_out: int, device=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps of one side, as ``interpolate(..., align_corners=False)`` takes them:
    (first neighbour, second neighbour (the first at the edge), weight of the second)."""
    scale = size_in / size_out
    src = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(size_in - 1)
    i1 = (i0 + 1).clamp_max(size_in - 1)
    w = (src - i0).clamp(0, 1).to(torch.float32)
    return i0.to(device), i1.to(device), w.to(device)


# --------------------------------------------------------------------------------------------
# Scores, selection, representative token, slow/fast update, restoring the order.
# --------------------------------------------------------------------------------------------

def runs_every_token(num_patches: int, keep_ratio: float, representative: bool) -> bool:
    """Whether an evolving block of ``num_patches`` patch tokens runs every one of them at
    ``keep_ratio``: the kept tokens and the representative are as many (PVTv2's last stage of a
    32 px image: one token)."""
    k = num_keep(num_patches, keep_ratio)
    return k + (1 if representative and k < num_patches else 0) >= num_patches


def num_keep(num_patches: int, keep_ratio: float) -> int:
    """k = floor(M * keep_ratio), at least 1 (a tiny epsilon absorbs float error)."""
    if isinstance(num_patches, torch.SymInt) and torch.compiler.is_exporting():
        # (k would be a plain integer: the program advertised the range of sizes and failed at
        # every other one with torch's guard; audit U of the twenty-sixth session)
        from ..errors import EvoplugError
        raise EvoplugError(
            "torch.export with a dynamic image size: a converted model keeps a number of tokens "
            "fixed by the token count, so its program holds for one size. Export with a dynamic "
            "batch only (one program per image size), or at keep_ratio=1.0")
    return max(1, min(num_patches, int(math.floor(num_patches * keep_ratio + 1e-6))))


def prefix_ranks(num_prefix: int, device) -> Tensor:
    """(1, 1, P) rank constants of the prefix tokens, decreasing: a top-k takes them first and
    in their order."""
    return torch.arange(num_prefix, 0, -1, dtype=torch.float32, device=device).mul_(PREFIX_RANK).view(1, 1, -1)


def first_scores(row: Tensor, ranks: Optional[Tensor], full_row: bool, num_suffix: int = 0) -> Tensor:
    """Scores g (B, 1, N) from the first global row: the row over all N keys (the entries of
    the P prefix and S trailing special tokens replaced by the rank constants ``ranks``
    (1, 1, P + S)), or over the M patch tokens (``full_row``: windowed rows, keys of a reduced
    map; no trailing tokens there) with the constants in front."""
    if ranks is None:
        return row
    B, P = row.shape[0], ranks.shape[-1] - num_suffix
    if full_row:
        return torch.cat([ranks.expand(B, 1, P), row], -1)
    if num_suffix:
        N = row.shape[-1]
        row = row.slice_scatter(ranks[..., P:].expand(B, 1, num_suffix), -1, N - num_suffix, N)
        return row if not P else row.slice_scatter(ranks[..., :P].expand(B, 1, P), -1, 0, P)
    return row.slice_scatter(ranks.expand(B, 1, P), -1, 0, P)


def patch_scores(g: Tensor, num_prefix: int, num_suffix: int = 0) -> Tensor:
    """The patch tokens' scores (B, M) of token scores g (B, 1, N)."""
    return g[:, 0, num_prefix:g.shape[-1] - num_suffix]


class GuessedGrid(tuple):
    """A patch grid taken from the token count and the last map before the block (no map or
    size argument showed it; analyse/discover.py _guessed_grid): good for the block's own
    views, and for scores carried *down* a pyramid (LeViT's stages), not onto a grid as large
    or larger (16 tokens need not be a 4x4 image: MAE's visible patches before its decoder's
    full grid)."""


def can_carry(grid_from, grid_to) -> bool:
    """Whether scores on ``grid_from`` carry onto ``grid_to`` (:func:`carry_scores`): both
    grids known, and a guessed one only down a stride (each side the one before divided by an
    integer s >= 2, rounded either way: LeViT's 14 -> 7 -> 4): 49 tokens after 64 patches are no
    7x7 downsampling of the 8x8 map (a model that kept 48 patches and its class token)."""
    if grid_from is None or grid_to is None:
        return False
    # the same image at another scale: both sides scaled alike (within 2x, for rounding: 7x13
    # -> 4x7). NesT's blocks of tokens, (T, N) = 16x196 then 4x196, are no map of the image:
    # pooled over the blocks' rows, level 1's tokens took other places' scores (until the
    # thirty-eighth session); the scores restart there
    fh, fw = grid_from[0] / max(grid_to[0], 1), grid_from[1] / max(grid_to[1], 1)
    if max(fh, fw) > 2 * min(fh, fw):
        return False
    if not (isinstance(grid_from, GuessedGrid) or isinstance(grid_to, GuessedGrid)):
        return True
    return all(any(t in (f // s, -(-f // s)) for s in range(2, f + 1))
               for f, t in zip(grid_from, grid_to))


def carry_scores(scores: Tensor, grid_from, grid_to) -> Optional[Tensor]:
    """Carry the global attention into a stage with another patch grid (pyramids).

    The patch scores (B, h*w) or (B, 1, h*w) are average-pooled onto the new grid (h'*w' in the
    same layout) and renormalised to sum to 1 like an attention row: a downsampled token
    summarises the tokens under it, so their mean score is its prior; the next block's
    attention row refreshes it. ``None`` when a grid is unknown, or guessed and not smaller
    than the one before, or the scores do not fill it (the caller restarts the scores with a
    dense block).
    """
    if not can_carry(grid_from, grid_to) or scores.shape[-1] != grid_from[0] * grid_from[1]:
        return None     # (a grid the tokens do not fill: MAE's visible patches of a masked call)
    B = scores.shape[0]
    g = scores.reshape(B, 1, grid_from[0], grid_from[1])
    g = torch.nn.functional.adaptive_avg_pool2d(g, tuple(grid_to))
    g = g.reshape(*scores.shape[:-1], grid_to[0] * grid_to[1])
    return g / g.sum(-1, keepdim=True).clamp_min(_TINY)


class Selection(NamedTuple):
    """What one top-k selection fixes until the next: the prefix and kept tokens, their scores
    and the representative token's weights."""
    top: Tensor                 # (B, 1, P+k) token positions of the P special tokens (prefix,
    #                             then trailing ones), then of the kept tokens
    index: Tensor               # (B, P+k, C): ``top`` over the channels, to gather / scatter rows
    vals: Tensor                # (B, 1, P+k) their scores, refreshed by every block that runs them
    weights: Optional[Tensor]   # (B, 1, N) representative weights (0 on prefix and kept, sum 1)
    pos: Optional[Tensor]       # (B, n) original index of each subset token (the representative
    #                             token's: the best token not kept), for position terms


#: the relative window within which scores are ties (:func:`tie_window`): a few float32 ulps
TIES_FLOAT32 = 3e-7
#: ... and in half precision, by the dtype the block computes in
_TIE_WINDOWS = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


def tie_window(x: Tensor) -> float:
    """Scores within this (relative) of each other are ties at the cut and at the
    representative token's place (:func:`_ties_at_cut`, :func:`_rep_position`): a few float32
    ulps, :data:`TIES_FLOAT32`, where the block computes in float32 or float64. In half
    precision (the tokens', or autocast's) the batch's rounding moves the scores by far more
    (tokens of a flat image region tied 2e-6 apart in float16, up to 1.2e-4 in bfloat16, one way
    in a batch and the other alone), and an image's kept tokens followed its batch (off by 0.33,
    audit N of the twenty-fifth session): 1e-4 for float16, 1e-3 for bfloat16 there. A Python
    float: no op."""
    dtype, device = x.dtype, x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    return _TIE_WINDOWS.get(dtype, TIES_FLOAT32)


def select(g: Tensor, k: int, num_prefix: int, channels: int, with_rep: bool, with_pos: bool,
           near_ties: bool = False, window: float = TIES_FLOAT32) -> Selection:
    """Top-k of the scores g (B, 1, N): the prefix tokens (ranked first) and the ``k`` best
    patch tokens, sorted by score; with ``with_rep``, the weights of the representative token
    r = sum_j w_j x_j over the tokens not kept, w_j = g_j / sum g. ``near_ties``: scores within
    ``window`` (relative, :func:`tie_window`) of the cut are ties (:func:`_ties_at_cut`)."""
    B = g.shape[0]
    n = num_prefix + k
    take = n + 1 if (with_pos and with_rep) else n
    # a stable sort, not topk: tied scores (flat image regions, a row upsampled from a reduced
    # map) go by token index, so an image keeps the same tokens whatever else is in its batch
    # (topk broke ties by the batch's layout: an image moved by 0.85, PVTv2-b0; in a program of
    # torch.export, PVTv2-b0's output by 0.13 until the twenty-second session). An ONNX export
    # keeps topk: ONNX has no stable sort, and its TopK takes tied values in index order by its spec
    onnx = _onnx_export()
    ranked = _ties_at_cut(g, n, window) if near_ties and n < g.shape[-1] else g
    vals, top = ranked.topk(take, -1) if onnx else ranked.sort(dim=-1, descending=True, stable=True)
    if with_pos and with_rep and not onnx and top.shape[-1] > take:
        parts = [n, g.shape[-1] - n]             # one split each: 2 ops, not 4 slices
        (vals, rest_v), (top, rest_i) = vals.split(parts, -1), top.split(parts, -1)
        pos = torch.cat([top, _rep_position(rest_v, rest_i, g.shape[-1], window)], -1).view(B, take)
    else:
        pos = top[..., :take].view(B, take) if with_pos else None
        vals, top = vals[..., :n], top[..., :n]
    index = top.transpose(1, 2).expand(B, n, channels)
    weights = None
    if with_rep:
        # the smallest normal float on every score: the weights sum to 1 even where every score
        # not kept underflowed (then uniform); a floor of 1e-12 on the sum left them summing to
        # 1e-10 in sharp attention, and the representative token near zero
        w = (g + torch.finfo(g.dtype).tiny).scatter(-1, top, 0.0)
        weights = w / w.sum(-1, keepdim=True)
    return Selection(top, index, vals, weights, pos)


def _onnx_export() -> bool:
    """Whether an ONNX export traces this forward (torch.export alone runs every op)."""
    return torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export()


def _ties_at_cut(g: Tensor, n: int, window: float = TIES_FLOAT32) -> Tensor:
    """The scores g (B, 1, N) with those within ``window`` (relative: a few ulps) of the n-th
    largest set to it, so the stable sort takes them by token index. Scores spread from a
    reduced map tie by the map's symmetry (a row [a, b, b, b] upsampled, then pooled onto the
    next stage, gives tokens at transposed places equal scores) but are computed in another
    order, so the batch's rounding (its GEMMs) leaves them equal or an ulp apart, and the kept
    token at the cut followed the batch (Twins-PCPVT: an image by 6%; audit, twenty-second
    session). 6 ops."""
    if _onnx_export():                    # (ONNX has no kthvalue)
        kth = g.topk(n, -1).values[..., -1:]
    else:
        kth = g.kthvalue(g.shape[-1] - n + 1, -1, keepdim=True).values
    return torch.where((g - kth).abs() <= kth * window, kth, g)


def _rep_position(vals: Tensor, idx: Tensor, tokens: int, window: float = TIES_FLOAT32) -> Tensor:
    """Where the representative token sits (a map block's 2-D ops see it there): the best
    token not kept, the lowest index among those within ``window`` of its score (relative: a
    few float32 ulps, :func:`tie_window`). Scores spread back from a reduced map tie to within a few ulps, which an image's
    batch moves: the best one by the sort alone moved with the batch, and SegFormer's features
    by up to 3.0. A wider window (1e-5) let input noise of 1e-3 move the place across the map,
    and PVTv2's output by 0.6 (tests/test_check.py's fragile selection) (vals, idx: the
    sorted scores (never negative) and indices of the tokens not kept, (B, 1, N - n) ->
    (B, 1, 1))."""
    # (masked_fill of the far ones: no scalar tensor for torch.where; a NaN best score gives
    # the lowest index not kept, not an index out of range)
    return idx.masked_fill(vals < vals[..., :1] * (1.0 - window), tokens).amin(-1, keepdim=True)


def representative(x: Tensor, sel: Selection) -> Optional[Tensor]:
    """The representative token (B, 1, C) of x (B, N, C): the weighted mean of the tokens not
    kept (None without one)."""
    if sel.weights is None:
        return None
    return torch.bmm(sel.weights.to(x.dtype), x)


def gather_subset(x: Tensor, sel: Selection, rep: Optional[Tensor]) -> Tensor:
    """The slow path's tokens [prefix, kept, representative]: (B, P+k(+1), C)."""
    picked = x.gather(1, sel.index)
    return picked if rep is None else torch.cat([picked, rep], 1)


def restore(base: Tensor, out_sub: Tensor, sel: Selection, rep: Optional[Tensor]) -> Tensor:
    """Fast update and original order: every token of ``base`` (B, N, C) gets the
    representative token's residual (out_rep - rep), then the prefix and kept tokens take their
    slow-path outputs from ``out_sub`` (its first P+k rows). Out of place (autograd-safe): the
    writes go into the fresh tensor of the fast update. (A scatter could read the first P+k
    rows of ``out_sub`` itself, but its backward wants a source of the index's shape.)"""
    if rep is None:
        return base.scatter(1, sel.index, out_sub)
    n = sel.index.shape[1]
    kept, rep_out = out_sub.split([n, out_sub.shape[1] - n], 1)   # one op; backward: one cat
    return (base + (rep_out - rep)).scatter_(1, sel.index, kept)


def row_of_kept(row: Tensor, sel: Selection, num_prefix: int) -> Tensor:
    """Entries of a row over the subset's keys (B, 1, n) at the prefix and kept tokens."""
    return row[..., :sel.top.shape[-1]]


def row_at_kept(row: Tensor, sel: Selection, num_prefix: int) -> Tensor:
    """Entries of a row over the M patch tokens of the full map (B, 1, M) (windowed attention,
    keys from the full map) at the prefix (0) and kept tokens."""
    if num_prefix:
        row = torch.nn.functional.pad(row, (num_prefix, 0))
    return row.gather(-1, sel.top)


def refresh(sel: Selection, row: Tensor, weight) -> Selection:
    """Score update g = (1 - alpha) g + alpha a of the prefix and kept tokens; ``weight`` is
    alpha with 0 at the prefix tokens (their rank constants stay exact). Built with the
    constructor, not ``_replace``: Dynamo of torch 2.11 cannot rebuild a NamedTuple that
    ``_replace`` made inside a compiled forward (AssertionError in codegen_save_tempvars)."""
    vals = torch.lerp(sel.vals, untangled(row).to(sel.vals.dtype), weight)
    return Selection(sel.top, sel.index, vals, sel.weights, sel.pos)


def untangled(row: Tensor) -> Tensor:
    """An attention row without a forward-mode tangent: the rows are computed under no_grad
    (they rank tokens, no gradient flows back through them), which stops backward but not
    forward-mode AD (``torch.func.jvp``/``jacfwd``, ``torch.autograd.forward_ad``), whose
    tangent reached the representative token's weights (jvp off backward by 1e-3); detached
    only under such a transform (no op in a plain forward)."""
    if torch.compiler.is_compiling():     # (no forward-mode AD through a compiled forward)
        return row
    if torch.autograd.forward_ad._current_level >= 0 or \
            torch._C._functorch.is_functorch_wrapped_tensor(row):
        return row.detach()
    return row


def current_scores(g: Tensor, sel: Optional[Selection]) -> Tensor:
    """The scores with the kept tokens' refreshed values written back: (B, 1, N)."""
    return g if sel is None else g.scatter(-1, sel.top, sel.vals)


def update_scores(scores: Optional[Tensor], row: Tensor, alpha) -> Tensor:
    """Global attention update g = (1 - alpha) g + alpha a of every entry (dense runs; the first
    time g = a). ``alpha`` may be a callable (learnable trade-off), read at each update."""
    row = row.detach().float()
    if scores is None or scores.shape != row.shape:
        return row
    if callable(alpha):
        alpha = read_trade_off(alpha)
    return (1.0 - alpha) * scores + alpha * row
