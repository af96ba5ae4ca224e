"""Token-evolution math of Evo-ViT, the paper's steps: scoring, top-k, representative token,
slow/fast update, restoring the original order. (The attention rows that feed the scores are
rows.py's; what a block's program does with the places of its tokens, gather.py's.) Batched
tensor ops only (topk/gather/scatter/bmm), no Python loops over tokens, no host
synchronisation; every shape depends only on the input's shape.

Conventions: ``x`` is (B, N, C) with ``P`` leading prefix tokens (cls, distillation, registers)
and ``M = N - P`` patch tokens; ``k`` patch tokens are kept (slow update). Where special tokens
also follow the patches (YOLOS' detection tokens), ``num_prefix`` here counts all of them and
``M`` excludes them. Scores ``g`` are (B, 1, N), float32, one per *token*: the special tokens
hold fixed rank constants above any attention score (so one top-k takes them first, in order,
then the best patches), the patch tokens their global attention (detached: they rank tokens,
they are not trained through; a learnable trade-off is a training extra). Attention rows are
(B, 1, n) over the keys a block ran on, float32, mean over heads.

The op count matters as much as the FLOPs (each op is launch and host time on a GPU), so every
step below is written in as few ATen ops as the math allows; the budget per evolving block is
tested (tests/test_op_budget.py, docs/architecture.md#op-budget).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..options import read_trade_off
from . import gather, rows
from .rows import TINY, as_dtype, as_float

#: score of the last prefix token; prefix token i of P gets (P - i) times this: above any
#: attention score (a probability), exact under the score update (its trade-off weight is 0)
PREFIX_RANK = 1e30


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
    return g / g.sum(-1, keepdim=True).clamp_min(TINY)


class Selection(NamedTuple):
    """What one top-k selection fixes until the next: the prefix and kept tokens, their scores
    and the representative token's weights."""
    top: Tensor                 # (B, 1, P+k) token positions of the P special tokens (prefix,
    #                             then trailing ones), then of the kept tokens
    index: Tensor               # (B, P+k, C): ``top`` over the channels, to gather / scatter rows
    vals: Tensor                # (B, 1, P+k) their scores, refreshed by every block that runs them
    weights: Optional[Tensor]   # (B, 1, N) representative weights (0 on prefix and kept, sum 1)
    pos: Optional[Tensor]       # (B, n) original index of each subset token (the representative


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
    return torch.bmm(as_dtype(sel.weights, x.dtype), x)


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
    vals = torch.lerp(sel.vals, as_dtype(untangled(row), sel.vals.dtype), weight)
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
    row = as_float(row.detach())
    if scores is None or scores.shape != row.shape:
        return row
    if callable(alpha):
        alpha = read_trade_off(alpha)
    return (1.0 - alpha) * scores + alpha * row


def __getattr__(name: str):
    """Programs pickled before the forty-fifth session import the row and place functions from
    here (``from evoplug.runtime.evolve import to_canvas``), which now live in rows.py and
    gather.py: found there. Public functions only: a private setting (``_MATMUL_LOGITS``) set
    on this module would change nothing, so reading one here fails as before."""
    for module in (rows, gather):
        value = module.__dict__.get(name)
        if callable(value) and not name.startswith("_"):
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
