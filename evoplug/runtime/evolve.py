"""Token-evolution math of Evo-ViT: scoring, top-k, representative token, slow/fast update,
restoring the original order. Batched tensor ops only (gather/scatter/topk/einsum), no Python
loops over tokens; every shape depends only on the input's shape.

Conventions: ``x`` is (B, N, C) with ``P`` leading prefix tokens (cls, distillation, registers)
and ``M = N - P`` patch tokens. Global scores ``g`` are (B, M), float32, detached: they rank
tokens, they are not trained through (a learnable trade-off is a training extra).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


# --------------------------------------------------------------------------------------------
# Row gathers and writes along the token dim. A contiguous (B, N, ...) tensor is seen as B * N
# rows: index_select / index_copy_ move whole rows (memcpy-like), much faster than gather /
# scatter with an index expanded over the channels; other layouts fall back to gather/scatter.
# --------------------------------------------------------------------------------------------

def _flat_rows(pos: Tensor, num_rows: int) -> Tensor:
    """(B, n) token indices -> (B * n,) row indices into a (B * num_rows, ...) view."""
    offset = torch.arange(pos.shape[0], device=pos.device).unsqueeze(1) * num_rows
    return (pos + offset).reshape(-1)


def take_rows(t: Tensor, pos: Tensor) -> Tensor:
    """t (B, N, *rest), pos (B, n) -> (B, n, *rest): t[b, pos[b, i]]."""
    B, N = t.shape[:2]
    rest = t.shape[2:]
    if t.is_contiguous():
        width = math.prod(rest)     # explicit: a batch of 0 images has no -1 to infer
        return t.reshape(B * N, width).index_select(0, _flat_rows(pos, N)).reshape(B, pos.shape[1], *rest)
    idx = pos.reshape(B, pos.shape[1], *([1] * len(rest))).expand(B, pos.shape[1], *rest)
    return t.gather(1, idx)


def put_rows_(dst: Tensor, pos: Tensor, src: Tensor, rows: Optional[Tensor] = None) -> Tensor:
    """In place: dst[b, pos[b, i]] = src[b, i]; dst (B, N, *rest) must be contiguous (a tensor
    the caller just created). ``rows``: ``_flat_rows(pos, N)`` when already known."""
    B, N = dst.shape[:2]
    if rows is None:
        rows = _flat_rows(pos, N)
    width = math.prod(dst.shape[2:])
    dst.view(B * N, width).index_copy_(0, rows, src.reshape(B * pos.shape[1], width).to(dst.dtype))
    return dst


# --------------------------------------------------------------------------------------------
# Attention rows: the global query's attention over the patch keys, mean over heads.
# They run inside the rewritten block graphs (see rewrite.py), hence plain functions.
# --------------------------------------------------------------------------------------------

def _heads_mean(p: Tensor, batch: int, num_prefix: int) -> Tensor:
    """(B, ..., n_keys) probabilities -> (B, n_keys - P) float32, mean over the middle dims."""
    p = p.reshape(batch, math.prod(p.shape[1:-1]), p.shape[-1]).mean(1)   # no -1: batch 0 runs
    return p[:, num_prefix:].float()


def probs_query_row(probs: Tensor, num_prefix: int) -> Tensor:
    """Row of the cls query (query 0) in an explicit attention map (B, H, Nq, Nk): free."""
    return _heads_mean(probs[..., 0, :].detach(), probs.shape[0], num_prefix)


def _mean_query_probs(logits: Tensor, num_prefix: int) -> Tensor:
    """softmax of the mean of the logits rows of the patch queries (B, ..., Nq, Nk) -> (B, ..., Nk):
    the attention of the mean query. The mean is accumulated in float32 without a float32 copy
    of the whole map."""
    return logits.detach()[..., num_prefix:, :].mean(-2, dtype=torch.float32).softmax(-1)


def logits_query_row(logits: Tensor, num_prefix: int) -> Tensor:
    """Attention row of the *mean query* of the patch tokens from pre-softmax logits
    (B, H, Nq, Nk).

    The logits are linear in q, so softmax(mean_i logits_i) is exactly the attention of the
    mean query (bias terms included). Used when there is no cls token.
    """
    return _heads_mean(_mean_query_probs(logits, num_prefix), logits.shape[0], num_prefix)


def _sdpa_query_probs(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], scale: Optional[float],
                      num_prefix: int, cls_query: bool) -> Tensor:
    """Attention of one query per head (the cls token if ``cls_query``, else the mean query of
    the patch tokens) for fused ``scaled_dot_product_attention`` (q, k (..., N, d)): (..., 1, Nk),
    float32. O(N d) per head."""
    q = q.detach()
    k = k.detach()
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    # one query row, in the keys' dtype (no float32 copy of q or k: on a GPU in half precision
    # those copies cost more memory traffic than the rest of the row); logits in float32
    qq = q[..., :1, :] if cls_query else q[..., num_prefix:, :].mean(-2, keepdim=True, dtype=torch.float32)
    logits = torch.matmul(qq.to(k.dtype), k.transpose(-2, -1)).float() * scale
    if attn_mask is not None:
        m = attn_mask.detach()
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=logits.dtype, device=m.device).masked_fill(~m, float("-inf"))
        m = m.float()
        if m.shape[-2] != 1:
            m = m[..., :1, :] if cls_query else m[..., num_prefix:, :].mean(-2, keepdim=True)
        logits = logits + m
    return logits.softmax(-1)


def sdpa_query_row(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], scale: Optional[float],
                   num_prefix: int, cls_query: bool) -> Tensor:
    """Global-query attention row for a fused ``scaled_dot_product_attention`` call: (B, N - P)."""
    probs = _sdpa_query_probs(q, k, attn_mask, scale, num_prefix, cls_query)
    return _heads_mean(probs, q.shape[0], num_prefix)


def mha_query_row(mha: torch.nn.MultiheadAttention, query: Tensor, key: Tensor,
                  attn_mask: Optional[Tensor], num_prefix: int, cls_query: bool) -> Tensor:
    """Global-query attention row for ``nn.MultiheadAttention`` (need_weights may be False).

    Computes q only for the global query and uses q.k_j = (W_k^T q) . x_j + const, so the keys
    are never projected again: O(H N C) instead of O(N C^2).
    """
    if not mha.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    query = query.detach().float()
    key = key.detach().float()
    E, H = mha.embed_dim, mha.num_heads
    d = E // H
    if mha._qkv_same_embed_dim:
        w_q, w_k = mha.in_proj_weight[:E], mha.in_proj_weight[E:2 * E]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    w_q, w_k = w_q.detach().float(), w_k.detach().float()
    b_q = mha.in_proj_bias[:E].detach().float() if mha.in_proj_bias is not None else None
    g = query[:, :1] if cls_query else query[:, num_prefix:].mean(1, keepdim=True)  # (B, 1, E)
    qg = torch.nn.functional.linear(g, w_q, b_q).reshape(g.shape[0], H, d)             # (B, H, d)
    u = torch.einsum("bhd,hdc->bhc", qg, w_k.reshape(H, d, -1))                # (B, H, Ck)
    logits = torch.einsum("bhc,bnc->bhn", u, key) / math.sqrt(d)               # (B, H, N)
    if attn_mask is not None:  # (N, N) mask, as nn.MultiheadAttention takes it (True = masked)
        m = attn_mask.detach()
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, device=m.device).masked_fill(m, float("-inf"))
        m = m.float()
        logits = logits + (m[:1] if cls_query else m[num_prefix:].mean(0, keepdim=True))
    return _heads_mean(logits.softmax(-1), logits.shape[0], num_prefix)


# --------------------------------------------------------------------------------------------
# Position-dependent terms: follow the selected tokens.
# ``pos`` (B, n) holds the original token index (0..N-1) of every token of the subset.
# --------------------------------------------------------------------------------------------

def gather_pair_bias(bias: Tensor, pos: Optional[Tensor]) -> Tensor:
    """Gather an additive attention term (..., Nq, Nk) to the subset's tokens.

    Used for relative position biases and masks that do not depend on the input tokens. A dim
    of size 1 broadcasts and is left alone; others are indexed by ``pos``. Result (B, L, n, n)
    (or with 1 where the input had 1). ``pos is None`` (dense run) returns the term unchanged.
    """
    if pos is None or bias.dim() < 2:
        return bias
    B, n = pos.shape
    R, K = bias.shape[-2], bias.shape[-1]
    if bias.dim() == 4 and bias.shape[0] == B and B > 1:
        b4 = bias
    else:
        b4 = bias.reshape(1, -1, R, K).expand(B, -1, -1, -1)
    L = b4.shape[1]
    if R != 1:
        b4 = torch.gather(b4, 2, pos[:, None, :, None].expand(B, L, n, K))
        R = n
    if K != 1:
        b4 = torch.gather(b4, 3, pos[:, None, None, :].expand(B, L, R, n))
    return b4


def gather_token_arg(t: Tensor, pos: Tensor, dim: int) -> Tensor:
    """Gather a per-token tensor argument (e.g. rotary embeddings (M, D)) along ``dim``.

    Returns (B, *t.shape[:dim], n, *t.shape[dim+1:]), padded with singleton dims after the
    batch to rank 4 so that it broadcasts against (B, heads, n, d) like the original did.
    """
    out = t.movedim(dim, 0)[pos]            # (B, n, *rest)
    out = out.movedim(1, dim + 1)
    while out.dim() < 4:
        out = out.unsqueeze(1)
    return out


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
    B, n = t.shape[:2]
    # the subset row each map position reads: its own token, else the representative token.
    # One row gather writes the map once (a fill + a scatter of the rows would write it 1.5x).
    src = torch.full((B, num_patches), n - 1, dtype=pos.dtype, device=pos.device)
    src.scatter_(1, pos, torch.arange(n, dtype=pos.dtype, device=pos.device).expand(B, n))
    return take_rows(t, src).movedim(1, dim)


def first_not_none(a, b):
    return b if a is None else a


def full_canvas(t: Tensor, t_full: Optional[Tensor], pos: Optional[Tensor]) -> Tensor:
    """The exact full map: the block's token-wise ops re-run on its full input (dense run:
    the tokens themselves)."""
    return t if pos is None or t_full is None else t_full


def from_canvas_map(t: Tensor, pos: Optional[Tensor], dim: int, layout: str) -> Tensor:
    """A 2-D map (B, C, H, W) ('cf') or (B, H, W, C) ('cl') back to tokens along ``dim``, read at
    the subset's positions (all positions for a dense run)."""
    t = t.flatten(2) if layout == "cf" else t.flatten(1, 2)       # (B, C, M) / (B, M, C)
    if (layout == "cf") != (dim == 2):
        t = t.transpose(1, 2)
    return from_canvas(t, pos, dim)


def from_canvas(t: Tensor, pos: Optional[Tensor], dim: int) -> Tensor:
    """Read a full map (tokens along ``dim``) back at the subset's positions."""
    if pos is None:
        return t
    return take_rows(t.movedim(dim, 1), pos).movedim(1, dim)


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
    slot += (sub[:, -1:] - take_rows(full, pos[:, -1:])).movedim(1, dim)
    return out


def map_fast_base(stream: Tensor, stream_sub: Tensor, pos: Optional[Tensor], dim: int, layout: str):
    """A map block's windows run on the full map, so every token's attention update is exact:
    the fast update starts from the full stream after attention (not from the block input) and
    adds only the representative token's MLP residual. Returns (full stream as tokens, the
    representative's stream value) in evolving runs, None in dense runs."""
    if pos is None:
        return None
    return from_canvas_map(stream, None, dim, layout), stream_sub[:, -1]


def stream_fast_base(full: Optional[Tensor], branch_full: Tensor, stream_sub: Tensor,
                     pos: Optional[Tensor]):
    """(B, N, C) blocks with windowed attention (Twins): the attention branch ran on every
    token, so the fast update starts from ``full + branch_full`` (each token's exact attention
    update) and adds the representative token's MLP residual. None in dense runs."""
    if pos is None or full is None:
        return None
    return full + branch_full, stream_sub[:, -1]


def window_logits_row(logits: Tensor, head_dims) -> Tensor:
    """Mean-query attention row of every window from explicit logits (..., Mq, Mk): softmax per
    head, mean over the head dims. (B', windows..., Mk)."""
    p = _mean_query_probs(logits, 0)
    return p.mean(dim=head_dims) if head_dims else p


def window_sdpa_row(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], scale: Optional[float],
                    head_dims) -> Tensor:
    """The same for fused ``scaled_dot_product_attention``: one mean query per window and head."""
    p = _sdpa_query_probs(q, k, attn_mask, scale, 0, False).squeeze(-2)
    return p.mean(dim=head_dims) if head_dims else p


def window_row(row: Tensor, index: Tensor, num_tokens: int) -> Tensor:
    """Per-window attention rows (B * windows, window tokens) -> one global row (B, N).

    ``index`` (windows * window tokens,) holds the token each window slot holds, plus one (0 =
    padding, dropped). Each window's row sums to 1, so the result is renormalised to sum to 1
    like a global attention row."""
    n = index.numel()
    if row.numel() % n:
        raise ValueError(f"windowed attention rows {tuple(row.shape)} do not match the {n} window "
                         "slots seen when the block was converted; convert with an example input "
                         "of this size")
    B = row.numel() // n
    r = row.reshape(B, n).float()
    out = r.new_zeros(B, num_tokens + 1).scatter_add(1, index.expand(B, n), r)[:, 1:]
    return out / out.sum(1, keepdim=True).clamp_min(1e-12)


def upsample_row(row: Tensor, kv_grid, grid) -> Tensor:
    """Attention row over spatially reduced keys (B, h'*w') -> per patch token (B, h*w):
    each token gets the (bilinearly interpolated) attention of the region it lies in."""
    B = row.shape[0]
    r = row.reshape(B, 1, kv_grid[0], kv_grid[1])
    r = torch.nn.functional.interpolate(r, size=tuple(grid), mode="bilinear", align_corners=False)
    r = r.reshape(B, r.shape[-2] * r.shape[-1]).clamp_min(0)
    return r / r.sum(1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------------------------
# Selection, representative token, slow/fast update, restore order.
# --------------------------------------------------------------------------------------------

def num_keep(num_patches: int, keep_ratio: float) -> int:
    """k = floor(M * keep_ratio), at least 1 (a tiny epsilon absorbs float error)."""
    return max(1, min(num_patches, int(math.floor(num_patches * keep_ratio + 1e-6))))


def select_tokens(scores: Tensor, k: int, with_rep: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Top-k patch tokens by global score. Returns (sel (B, k), rep_pos (B,) or None).

    ``rep_pos`` is the best non-selected token: the position the representative token takes
    for position-dependent terms (relative position bias, rotary embedding).
    """
    M = scores.shape[1]
    take = k + 1 if (with_rep and k < M) else k
    idx = torch.topk(scores, take, dim=1, largest=True, sorted=True).indices
    if take > k:
        return idx[:, :k], idx[:, k]
    return idx, None


def representative_weights(scores: Tensor, sel: Tensor) -> Tensor:
    """w_j = g_j / sum g over the non-selected tokens (0 on the selected ones): (B, M)."""
    w = scores.scatter(1, sel, 0.0)
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)


def selection_rows(x: Tensor, num_prefix: int, sel: Tensor) -> Optional[Tensor]:
    """Row indices of the selected tokens in ``x`` seen as (B * N, C) rows (None when ``x`` is
    not contiguous); computed once per block and shared by :func:`gather_subset` and
    :func:`restore`."""
    return _flat_rows(sel + num_prefix, x.shape[1]) if x.is_contiguous() else None


def gather_subset(x: Tensor, num_prefix: int, sel: Tensor, rep_pos: Optional[Tensor],
                  weights: Optional[Tensor], rows: Optional[Tensor] = None
                  ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Build the slow-path input [prefix, selected, representative].

    Returns (sub (B, P+k(+1), C), pos (B, P+k(+1)) original indices, rep (B, C) or None).
    ``rows``: :func:`selection_rows` of ``x`` (computed here when not given).
    """
    B, N, C = x.shape
    P = num_prefix
    k = sel.shape[1]
    sel_pos = sel + P
    if rows is None:
        rows = selection_rows(x, P, sel)
    if rows is not None:
        picked = x.reshape(B * N, C).index_select(0, rows).view(B, k, C)
    else:
        picked = take_rows(x, sel_pos)
    parts = [x[:, :P], picked] if P else [picked]
    pos_parts = [torch.arange(P, device=x.device).expand(B, P), sel_pos] if P else [sel_pos]
    rep = None
    if rep_pos is not None:
        # attention-weighted mean of the patch tokens (weights are 0 on the selected ones)
        rep = torch.bmm(weights.to(x.dtype).unsqueeze(1), x[:, P:]).squeeze(1)
        parts.append(rep.unsqueeze(1))
        pos_parts.append((rep_pos + P).unsqueeze(1))
    return torch.cat(parts, 1), torch.cat(pos_parts, 1), rep


def restore(x: Tensor, out_sub: Tensor, num_prefix: int, sel: Tensor,
            rep: Optional[Tensor], rows: Optional[Tensor] = None) -> Tensor:
    """Fast update of the non-selected tokens and scatter back to the original order.

    Non-selected tokens get the representative token's residual (out_rep - rep); the selected
    ones take their slow-path outputs. Out of place (autograd-safe). ``rows``: as for
    :func:`gather_subset` (valid for any contiguous tensor of ``x``'s shape).
    """
    P = num_prefix
    k = sel.shape[1]
    # one pass over the tokens: a new tensor (the fast update, or a copy), then in-place writes
    # of the prefix and the selected tokens into it (autograd-safe: nothing saved it)
    out = x + (out_sub[:, -1] - rep).unsqueeze(1) if rep is not None else x.clone()
    out = out.contiguous()
    if P:
        out[:, :P] = out_sub[:, :P]
    return put_rows_(out, sel + P, out_sub[:, P:P + k], rows)


def carry_scores(scores: Tensor, grid_from, grid_to) -> Optional[Tensor]:
    """Carry the global attention into a stage with another patch grid (pyramids).

    The scores (B, h*w) are average-pooled onto the new grid (B, h'*w') and renormalised to
    sum to 1 like an attention row: a downsampled token summarises the tokens under it, so
    their mean score is its prior; the next block's attention row refreshes it. ``None`` when
    a grid is unknown (the caller restarts the scores with a dense block).
    """
    if grid_from is None or grid_to is None:
        return None
    B = scores.shape[0]
    g = scores.reshape(B, 1, grid_from[0], grid_from[1])
    g = torch.nn.functional.adaptive_avg_pool2d(g, tuple(grid_to)).reshape(B, grid_to[0] * grid_to[1])
    return g / g.sum(1, keepdim=True).clamp_min(1e-12)


def row_at_selected(row: Tensor, sel: Tensor, k: int) -> Tensor:
    """The selected tokens' entries of a global row over every patch token (B, M) -> (B, k):
    windowed attention and keys from the full map give such rows."""
    return row.gather(1, sel)


def row_of_kept(row: Tensor, sel: Tensor, k: int) -> Tensor:
    """The kept tokens' entries of a row over the subset's keys [kept, representative]:
    (B, k + 1) -> (B, k)."""
    return row[:, :k]


def update_scores(scores: Optional[Tensor], row: Tensor, alpha: float,
                  sel: Optional[Tensor] = None) -> Tensor:
    """Global attention update g = (1 - alpha) g + alpha a.

    Dense run: ``row`` is (B, M), every entry is refreshed (first time: g = a). Evolving run:
    ``row`` holds the selected tokens' entries (B, k) and only those are refreshed.
    """
    row = row.detach().float()
    if callable(alpha):   # learnable trade-off (e.g. sigmoid of a parameter): read at each update
        alpha = alpha()
    if sel is None:
        if scores is None or scores.shape != row.shape:
            return row
        return (1.0 - alpha) * scores + alpha * row
    old = scores.gather(1, sel)
    return scores.scatter(1, sel, (1.0 - alpha) * old + alpha * row)
