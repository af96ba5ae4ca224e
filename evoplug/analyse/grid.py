"""2-D map operations inside a block (a reshape of the tokens into the patch grid and back),
spatially reduced keys, and windows: which token each window slot holds."""
from __future__ import annotations

import functools
import math
import operator
from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import AnalysisError
from .attention import attention_output, sdpa_arg
from .graph import ancestors, is_add, is_reshape, rolls, run_nodes, shape_of
from .pointwise import token_wise_input

if TYPE_CHECKING:
    from .attention import AttentionSite
    from .block import BlockAnalysis


def find_grid_ops(gm: fx.GraphModule, a: "BlockAnalysis", site: Optional["AttentionSite"] = None):
    """Where the block turns its tokens into a 2-D map and back (PVT's depthwise-conv MLP and
    spatial-reduction keys): ``('to', node, token_dim)`` reshapes N tokens into the patch grid,
    ``('from', node, token_dim)`` flattens the grid back to tokens. Needs the shapes of a
    ShapeProp run. Slow-path programs feed the 'to' points the full map (canvas).

    With the attention ``site``: a map whose one window covers it all (Swin's last stage, 7x7
    tokens in 7x7 windows) is partitioned and merged by views that look like map <-> token
    views; those inside the windowed attention (a 'from' of the map into the attention, a 'to'
    from the attention's output before any residual add) are window views, not grid ops.
    Windows cut from the tokens or merged back into them by one reshape are map views too
    (``_window_view``)."""
    N, P, grid = a.num_tokens, a.num_prefix, a.grid
    if grid is None:
        return []
    grid = tuple(grid)
    M = grid[0] * grid[1]

    def layout(shape, tokens=None):   # 'cf' (B, C, H, W), 'cl' (B, H, W, C) or None
        if shape is None or len(shape) != 4:
            return None
        cf, cl = tuple(shape[-2:]) == grid, tuple(shape[1:3]) == grid
        if cf and cl and tokens is not None:   # C == H == W: the token side tells, (B, M, C) is
            return "cl" if tokens[1] in (N, M) else "cf"   # channels last, (B, C, M) first
        return "cf" if cf else "cl" if cl else None

    ops = []
    for n in gm.graph.nodes:
        if not is_reshape(n):
            continue
        src = n.args[0] if n.args else None
        si, so = shape_of(src), shape_of(n)
        if si is None or so is None:
            continue
        # the token dim follows from the map's layout: (B, N, C) <-> (B, H, W, C) splits or
        # merges dim 1, (B, C, N) <-> (B, C, H, W) the last dim (this matters when C == N)
        if layout(so) and len(si) == 3 and N in si[1:]:
            dim = 1 if layout(so, si) == "cl" else 2
            if si[dim] != N:
                dim = len(si) - 1 - list(reversed(si)).index(N)
            held = _token_dim(src)
            if held is not None and held not in _split_dim(si, so):
                continue    # the heads split off the channels, (B, N, C) -> (B, N, heads, d),
                #            where (heads, d) happens to be the patch grid
            if _splits_heads(n, si, so, site, N):
                continue    # one head on an (N, 1) grid: (B, N, C) -> (B, N, 1, C) as both
            ops.append(("to", n, dim))
        elif layout(si) and len(so) == 3 and M in so[1:]:
            if site is not None and _heads_merged(src, site):
                continue    # the attention's heads merged back, (B, N, heads, d) -> (B, N, C)
            dim = 1 if layout(si, so) == "cl" else 2
            if so[dim] != M:
                dim = len(so) - 1 - list(reversed(so)).index(M)
            ops.append(("from", n, (dim, layout(si, so))))
        elif (op := _window_view(n, si, so, grid, site)) is not None:
            ops.append(op)
    if site is not None and not ops and windows_in_own_dim(site, N):
        ops = _sequence_window_views(gm, N)
    if site is not None and ops:
        ops = _drop_single_window_views(ops, site)
    if ops and P:
        raise AnalysisError(a.name, f"2-D map operations inside a block with prefix tokens are not "
                                    f"supported ({P} token(s) beside the patches; its map op at "
                                    f"`{ops[0][1].name}`): evoplug feeds the full map only to "
                                    "blocks whose tokens are all patches")
    return ops


def _window_view(n: fx.Node, si, so, grid, site: Optional["AttentionSite"]):
    """Windows cut from the (B, H * W, C) tokens or merged back into them by one reshape, with
    no (B, H, W, C) map between: ``x.view(B, H // ws, ws, W // ws, ws, C)`` on the way to the
    queries, ``o.permute(0, 1, 3, 2, 4, 5).reshape(B, N, C)`` after the attention. They read as
    the views through the map (``.view(B, H, W, C).view(...)``, ``.reshape(B, H, W, C).reshape(B,
    N, C)``): a 'to' of token dim 1, a channels-last 'from'. Until audit J2 of the forty-fifth
    session the one reshape was no map view, and its block was refused as mixing tokens."""
    if site is None:
        return None
    if _splits_the_map(so, si, grid) and isinstance(site.q, fx.Node) and n in ancestors(site.q):
        return ("to", n, 1)
    if _splits_the_map(si, so, grid) and site.node in ancestors(n):
        return ("from", n, (1, "cl"))
    return None


def _splits_the_map(windows, tokens, grid) -> bool:
    """``windows`` (B, ..., C) is ``tokens`` (B, H * W, C) with the map's dims split, its dims
    between the batch and the channels multiplying to H, then to W ((B, H / ws, ws, W / ws, ws,
    C) as the windows' merge permutes it back)."""
    if len(windows) < 5 or len(tokens) != 3 or (windows[0], windows[-1]) != (tokens[0], tokens[-1]) \
            or tokens[1] != grid[0] * grid[1]:
        return False
    return _split_map(windows[1:-1], grid)


def _split_map(dims, grid) -> bool:
    """``dims`` multiply to H, then to W: (H, W) itself or (H / ws, ws, W / ws, ws)."""
    dims = [int(d) for d in dims]
    return any(math.prod(dims[:k]) == grid[0] and math.prod(dims[k:]) == grid[1]
               for k in range(1, len(dims)))


def opaque_map_views(gm: fx.GraphModule, grid) -> Tuple[str, ...]:
    """einops calls (``rearrange(o, 'b h w p q c -> b (h p w q) c')``, a ``Rearrange`` layer)
    that turn the (B, H * W, C) tokens into the 2-D map or its windows, or back: one opaque node
    each, no map view the rewrite can feed the full map or read back at the kept tokens. Named
    in the block's refusal (until audit J2 of the forty-fifth session it said only that the
    block mixes tokens outside attention)."""
    if grid is None:
        return ()
    M, found = grid[0] * grid[1], []
    for n in gm.graph.nodes:
        fn = type(gm.get_submodule(n.target)) if n.op == "call_module" else n.target
        if n.op not in ("call_function", "call_module") or \
                not (getattr(fn, "__module__", None) or "").startswith("einops"):
            continue
        si = shape_of(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        so = shape_of(n)
        if si is not None and so is not None and any(      # (channels last or first)
                len(t) == 3 and M in t[1:] and len(m) >= 4 and (
                    _map_dims(m[1:-1], M) or _map_dims(m[2:], M))
                for t, m in ((si, so), (so, si))):
            found.append(f"`{n.name}`")
    return tuple(found)


def _map_dims(dims, M: int) -> bool:
    """``dims``, each between 1 and M, multiply to M: the map's (H, W), or its windows' dims in
    any order ((H / ws, W / ws, ws, ws) before the merge permutes them), not the tokens whole."""
    return all(1 < d < M for d in dims) and math.prod(int(d) for d in dims) == M


def _heads_merged(src: fx.Node, site: "AttentionSite") -> bool:
    """Whether ``src`` is the attention's output with its dims moved (``o.transpose(1, 2)``),
    whose last two dims are the heads and their channels."""
    out = attention_output(site)
    while isinstance(src, fx.Node) and src is not out and src.args and (
            (src.op == "call_method" and src.target in ("contiguous", "transpose", "permute"))
            or (is_reshape(src) and shape_of(src) is not None and (
                shape_of(src) == shape_of(src.args[0])         # (a reshape to its own shape)
                or _heads_out_of_the_batch(shape_of(src.args[0]), shape_of(src))))):
        src = src.args[0]
    return out is not None and src is out


def _splits_heads(n: fx.Node, si, so, site: Optional["AttentionSite"], N: int) -> bool:
    """Whether the reshape ``n`` of the tokens (B, N, C) into (B, N, heads, d) is the heads
    split of the attention's queries, keys or values (the last reshape before them, through
    moves of dims only), not a view of the map: one head on an (N, 1) grid, (B, N, 1, C), reads
    as both, and taken as a map view the queries were computed on the full map in the original
    order while the keys came from the kept tokens in the selection's order (a fuzzed pyramid
    whose 2-token stage evolved, keep 1.0 off the dense model by 0.1: the fifty-seventh
    session)."""
    return site is not None and len(so) == 4 and so[1] == N and so[2] * so[3] == si[2] and \
        n in _heads_splits(site)


_MOVES = {"transpose", "permute", "contiguous", "unbind", "float", "to", "type_as", "mul", "div"}


def _heads_splits(site: "AttentionSite") -> set:
    """The last reshape before each of the attention's queries, keys and values, through moves
    of dims (transposes, an ``unbind`` and its items, casts, scaling, a norm per head)."""
    out = attention_output(site)
    if site.kind == "sdpa":
        v = sdpa_arg(site.node, 2, "value")
    elif site.kind == "softmax" and out is not None:
        v = next((a for a in out.args if isinstance(a, fx.Node) and site.node not in ancestors(a)
                  and a is not site.node), None)
    else:
        v = None
    found = set()
    for cur in (site.q, site.k, v):
        for _ in range(16):
            if not isinstance(cur, fx.Node) or not cur.args:
                break
            if is_reshape(cur):
                found.add(cur)
                break
            moves = (cur.op == "call_method" and cur.target in _MOVES) or (
                cur.op == "call_function" and cur.target in (operator.getitem, torch.transpose,
                                                             torch.permute)) or (
                cur.op == "call_module" and shape_of(cur) is not None
                and shape_of(cur) == shape_of(cur.args[0]))
            if not moves:
                break
            cur = cur.args[0]
    return found


def _heads_out_of_the_batch(si, so) -> bool:
    """(B * heads, ...) -> (B, heads, ...): timm's SAM attention, ``o.view(B, heads, N, -1)``
    of its (B * heads, N, d) output (with 8 heads of 8 on an 8x8 grid its merge back, (B, N,
    heads, d) -> (B, N, C), looked like a channels-first map flattened: audit L)."""
    return si is not None and so is not None and len(so) == len(si) + 1 and \
        si[0] == so[0] * so[1] and tuple(si[1:]) == tuple(so[2:])


def _split_dim(si, so) -> Tuple[int, ...]:
    """The dims of ``si`` a reshape to ``so`` may split in two (``si[k] == so[k] * so[k + 1]``,
    the others unchanged): more than one where a side is 1 ((B, 2, C) -> (B, 2, 1, C), the 2x1
    last stage of transformers' Swin at a 64x32 input, splits dim 1, or dim 2 into (1, C))."""
    if len(so) != len(si) + 1:
        return (next((k for k, (a, b) in enumerate(zip(si, so)) if a != b), len(si) - 1),)
    return tuple(k for k in range(len(si)) if tuple(si[:k]) == tuple(so[:k])
                 and si[k] == so[k] * so[k + 1] and tuple(si[k + 1:]) == tuple(so[k + 2:]))


_KEEPS_DIMS = {"contiguous", "float", "to", "type_as", "clone", "mul", "add", "div", "sub"}
_SPLITS = {"chunk", "split", "tensor_split", "split_with_sizes"}


def _token_dim(n) -> Optional[int]:
    """Which dim of the 3-D tensor ``n`` holds the block's tokens, followed back to the
    block's (B, N, C) input through modules and ops that keep the leading dims (norms,
    linears, scaling, a part of a split: ``qkv(x).chunk(3, -1)[0]``) and transposes; None
    where the path does anything else."""
    swaps = []
    while isinstance(n, fx.Node):
        s = shape_of(n)
        if n.op == "placeholder":
            if s is None or len(s) != 3:
                return None
            d = 1
            for a, b in reversed(swaps):
                d = b if d == a else a if d == b else d
            return d
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        whole = _split_from(n)
        if whole is not None:     # (the split's tuple has no shape: the part's leading dims
            src = whole           #  are checked against those of the tensor it was cut from)
        si = shape_of(src) if src is not None else None
        if src is None or s is None or si is None or len(si) != 3 or len(s) != 3:
            return None
        if n.op == "call_method" and n.target == "transpose" and len(n.args) == 3:
            a, b = (int(v) % 3 for v in n.args[1:3])
            swaps.append((a, b))
        elif not ((n.op == "call_module" or (n.op == "call_method" and n.target in _KEEPS_DIMS)
                   or n.op == "call_function") and tuple(si[:2]) == tuple(s[:2])):
            return None
        n = src
    return None


def _split_from(n: fx.Node) -> Optional[fx.Node]:
    """The tensor a part taken by ``[i]`` from its split (``qkv(x).chunk(3, dim=-1)[0]``) was
    cut from; None for any other node."""
    split = n.args[0] if n.op == "call_function" and n.target is operator.getitem and n.args else None
    if not isinstance(split, fx.Node) or not split.args or not isinstance(split.args[0], fx.Node):
        return None
    name = split.target if split.op == "call_method" else getattr(split.target, "__name__", "")
    return split.args[0] if name in _SPLITS else None


def windows_in_own_dim(site: Optional["AttentionSite"], num_tokens: int) -> bool:
    """Softmax attention whose queries have a windows dim of their own, not over all the tokens:
    Hiera's mask-unit attention, ``(B, heads, windows, window tokens, d)``."""
    if site is None or site.kind not in ("softmax", "sdpa"):
        return False
    q = shape_of(site.q) if isinstance(site.q, fx.Node) else None
    return q is not None and len(q) > 4 and q[-2] != num_tokens


def _split_dims(shape, N: int) -> int:
    """k >= 2 when dims 1..k of ``shape`` (each between 1 and N) multiply to N, else 0."""
    prod = 1
    for k in range(1, len(shape)):
        if not 1 < shape[k] < N:
            return 0
        prod *= shape[k]
        if prod == N:
            return k if k >= 2 else 0
        if prod > N:
            return 0
    return 0


def _sequence_window_views(gm: fx.GraphModule, N: int):
    """Windows cut from the token sequence itself (Hiera: ``qkv(x).reshape(B, n, W, 3, h, d)``,
    back with ``.reshape(B, N, C)``): the reshape that splits the token dim is fed the full
    sequence (``('to', node, (1, 'seq'))``), the one that merges it back is read at the kept
    tokens (layout ``seq<k>``: dims 1..k are the tokens)."""
    ops = []
    for n in gm.graph.nodes:
        if not is_reshape(n):
            continue
        si, so = shape_of(n.args[0]) if n.args else None, shape_of(n)
        if si is None or so is None:
            continue
        if len(si) == 3 and si[1] == N and _split_dims(so, N):
            ops.append(("to", n, (1, "seq")))
        elif len(so) == 3 and so[1] == N and (k := _split_dims(si, N)):
            ops.append(("from", n, (1, f"seq{k}")))
    return ops


def _drop_single_window_views(ops, site: "AttentionSite"):
    before = ancestors(site.node)
    # (a shifted window as large as a map the block takes as such, timm's Swin with
    # always_partition=True: the window is cut from the rolled map itself, no 'to' before it)
    shifted = any(rolls(n) for n in before)
    inner_from = [n for kind, n, _ in ops if kind == "from" and n in before and
                  (shifted or any(k == "to" and m in ancestors(n) for k, m, _ in ops))]
    if not inner_from:
        return ops
    inner_to = []
    for kind, n, _ in ops:
        if kind == "to" and site.node in ancestors(n):
            between = {m for m in ancestors(n) if site.node in ancestors(m)}
            # a residual add is a tensor's; shape arithmetic (``size()[:-2] + (C,)``) is not
            if not any(is_add(m) and shape_of(m) is not None for m in between | {n}):
                inner_to.append(n)
    drop = set(inner_from) | set(inner_to)
    return [op for op in ops if op[1] not in drop]


def reduced_kv_grid(k: fx.Node, num_keys: int, grid_ops):
    """(h', w') of keys built from the full map by spatial reduction, else None."""
    if not grid_ops or not isinstance(k, fx.Node):
        return None
    anc = ancestors(k)
    if not any(kind == "to" and node in anc for kind, node, _ in grid_ops):
        return None
    for n in anc:
        s = shape_of(n)
        if s is not None and len(s) == 4 and s[-2] * s[-1] == num_keys:
            return (int(s[-2]), int(s[-1]))
    return None


def window_token_index(gm: fx.GraphModule, site: AttentionSite, a: "BlockAnalysis", feed,
                       batch: int) -> Optional[torch.Tensor]:
    """Which token each window slot of a windowed attention holds, found by running the graph
    from the block's input to the keys on token *indices* instead of features.

    The input carries ``b * (N + 1) + n + 1`` in every channel of token n of image b; data
    movement (roll, pad, window partition, views) moves these values with the tokens, and the
    token-wise leaf modules on the way (norm, the qkv linear) are replaced by copying the index
    into their output channels. At the keys every channel of a slot must hold one integer: the
    token there (0 = padding). Checked: windows are batch-major and every token sits in exactly
    one window slot. Returns the (windows * window tokens,) index of image 0, or None when the
    path does arithmetic on the values or the windows overlap (the block then gives no row).
    """
    k = site.k
    if not isinstance(k, fx.Node) or site.kind not in ("softmax", "sdpa"):
        return None
    s_node, s_k = shape_of(site.node), shape_of(k)
    if s_node is None or s_k is None:
        return None
    nk = s_node[-1] if site.kind == "softmax" else s_k[-2]
    N = a.num_tokens
    stride = N + 1
    x = feed[0]
    shape = (2,) + tuple(x.shape[1:])
    ids = torch.arange(N, dtype=torch.float64, device=x.device) + 1
    ids = torch.stack([ids, ids + stride]).reshape(shape[:-1] + (1,)).expand(shape)
    needed = ancestors(k) | {k}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(p in needed for p in placeholders[1:]):
        return None    # the keys depend on another argument too
    try:
        with torch.no_grad():
            kv = run_nodes(gm.graph, k, gm, {placeholders[0]: ids}, _index_through_leaf,
                           functools.partial(_index_through, gm, placeholders[0]))
        found = _slots_of_image_0(kv, site.kind, nk, N)
        if found is None:
            return None
        a.window_head_dims, a.window_heads_folded, idx = found
        return idx
    except (fx.proxy.TraceError, RuntimeError) as e:   # not token-wise, or not runnable on indices
        first = (str(e).strip().splitlines() or [""])[0]     # fx appends the node and a hint
        a.notes.append(f"windows not mapped to tokens: {type(e).__name__}: {first}")
        return None


def _index_through_leaf(n: fx.Node, args, kwargs):
    """A token-wise leaf module (norm, linear) on index values: the index copied into its
    output channels."""
    si, so = shape_of(n.args[0]) if n.args else None, shape_of(n)
    if si is None or so is None or si[:-1] != so[:-1]:
        raise fx.proxy.TraceError("not token-wise over the last dim")
    return _index_into(args[0], so[-1])


def _index_into(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The index values of ``x`` (the same in every channel) in ``channels`` output channels:
    what a token-wise map over the last dim (norm, linear) does to a token's index."""
    return x[..., :1].expand(*x.shape[:-1], channels)


_LINEAR = (F.linear, torch._C._nn.linear)


def _index_through_function(n: fx.Node, args, kwargs):
    """A function that works on each token's own channels without moving it keeps the index
    values: ``F.normalize`` over the last dim (Swinv2's cosine attention), and ``F.linear``
    (timm's Swinv2 calls it with a bias concatenated from ``q_bias``, zeros and ``v_bias``;
    MMPretrain's by keyword, ``input=x``), whose index is copied into its output channels like a linear module's; None for others."""
    x = args[0] if args else kwargs.get("input")     # MMPretrain: F.linear(input=x, ...)
    if not isinstance(x, torch.Tensor):
        return None
    if n.target is F.normalize:
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 1)
        if dim in (-1, x.dim() - 1):
            return x
    elif n.target in _LINEAR:
        w = kwargs.get("weight", args[1] if len(args) > 1 else None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and x.shape[-1] == w.shape[1]:
            return _index_into(x, w.shape[0])
    return None


def _index_through(gm: fx.GraphModule, index: fx.Node, n: fx.Node, args, kwargs):
    found = _index_through_function(n, args, kwargs)
    return found if found is not None else _index_through_token_wise(gm, index, n, args, kwargs)


def _index_through_token_wise(gm: fx.GraphModule, index: fx.Node, n: fx.Node, args, kwargs):
    """Any other function that analyse/pointwise.py finds acts on each token alone (a scaling,
    ``F.gelu``, ``F.layer_norm``, a registered leaf function) keeps the index of its one input
    from the block's input, copied into its output channels; None for others, which run on the
    index values (until the forty-second session such a function on the way to the keys left
    the block with no attention row)."""
    so = shape_of(n)
    main = None if so is None else token_wise_input(gm, n, index)
    if main is None or tuple(shape_of(main)[:-1]) != tuple(so[:-1]):
        return None
    x = next((v for v, a in zip([*args, *kwargs.values()], [*n.args, *n.kwargs.values()])
              if a is main), None)      # (None where it sits inside a list: torch.cat)
    return None if x is None else _index_into(x, so[-1])


def _heads_folded(rows: torch.Tensor) -> int:
    """How many consecutive rows (slots of one window) repeat: heads merged into the leading
    dim after the windows, ``(B * windows * heads, slots)``; 1 when they do not repeat."""
    L = rows.shape[0]
    r = 1
    while r < L and bool((rows[r] == rows[0]).all()):
        r += 1
    if r == 1 or L % r or not bool((rows.reshape(L // r, r, -1) == rows[::r, None]).all()):
        return 1
    return r


def _slots_of_image_0(kv: torch.Tensor, kind: str, nk: int, N: int):
    """(head dims, heads folded into the leading dim, (windows * window tokens,) token index of
    image 0) from the keys computed on index values, or None when they are not a clean
    one-token-per-slot layout."""
    # keys as (leading dims..., channel, key) with the key dim last
    if kind == "softmax" and kv.shape[-1] == nk:
        lead = kv.select(-2, 0)                      # k^T: (..., d, Mk)
    elif kv.shape[-2] == nk:
        lead = kv.select(-1, 0)                      # k: (..., Mk, d)
    else:
        return None
    # leading dims along which the index does not change are heads (averaged by the row);
    # the others, with the batch, enumerate the windows
    head_dims = tuple(i for i in range(1, lead.dim() - 1)
                      if bool((lead == lead.narrow(i, 0, 1)).all()))
    for i in reversed(head_dims):
        lead = lead.select(i, 0)
    folded = _heads_folded(lead.reshape(-1, lead.shape[-1]))
    if folded > 1:        # heads merged into the batch dim after the windows (timm's SAM)
        lead = lead.reshape(-1, folded, lead.shape[-1]).select(1, 0)
    if not bool((lead == lead.round()).all()):
        return None
    first, second = lead.reshape(2, -1)             # batch-major: image 0, image 1
    pad = first == 0
    if not bool(((first >= 0) & (first <= N)).all()) or \
            not bool(((second == first + N + 1) | (pad & (second == 0))).all()):
        return None
    idx = first.long()
    if not bool((torch.bincount(idx, minlength=N + 1)[1:] == 1).all()):
        return None
    return head_dims, folded, idx
