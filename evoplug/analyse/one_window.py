"""A windowed attention whose one window is the whole map, formed inside a block that takes
tokens (transformers' and MMPretrain's Swin at their last stage: a 7x7 map in 7x7 windows, or
any map no larger than the window, unshifted and unpadded), read as what it computes: attention
over the block's tokens.

The block views its ``(B, N, C)`` tokens as the ``(B, H, W, C)`` map, pads it by nothing,
partitions it into one window of ``N`` slots and merges that window back into the map and the
tokens. When every slot holds the token of its place (checked on token indices run through the
graph, :func:`~evoplug.analyse.grid.window_token_index`) and both round trips only move data
(views, permutes, zero padding), the attention's input is the tokens and its output the
tokens' update: the partition and the merge are removed from the graph, and the block evolves
as a global one, its attention on the kept tokens + the representative (the paper's rule).
timm's Swin, whose blocks take the map, reads its last stage so (analyse/canon.py); before the
thirty-fifth session the tokens-in writings ran that one window on the full map (every token its
exact attention update, no attention saved), and the same weights evolved differently (audit S).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph import ancestors, is_size_query, run_nodes, shape_of

_MOVES = {"view", "reshape", "permute", "transpose", "contiguous", "flatten", "unflatten"}


def _moves_data(n: fx.Node) -> bool:
    """An op that only moves its first argument's values: a view or permute, zero padding, a
    roll by nothing."""
    if n.op == "call_method":
        return n.target in _MOVES
    if n.op == "call_function" and n.target is F.pad:
        pads = n.args[1] if len(n.args) > 1 else n.kwargs.get("pad")
        return isinstance(pads, (tuple, list)) and all(p == 0 for p in pads)
    if n.op == "call_function" and n.target is torch.roll:
        shifts = n.args[1] if len(n.args) > 1 else n.kwargs.get("shifts")
        return shifts == 0 or (isinstance(shifts, (tuple, list)) and all(s == 0 for s in shifts))
    return False


def _flows(n: fx.Node):
    return [u for u in n.users if not is_size_query(u)]


def _partitioned(to: fx.Node, tokens_shape) -> Optional[fx.Node]:
    """From the tokens -> map view ``to``, the last of the data moves that ends as the tokens'
    shape again (the one window, (B * 1, N, C)); None where the path branches or computes."""
    cur = to
    while True:
        flows = _flows(cur)
        if len(flows) != 1 or not _moves_data(flows[0]) or flows[0].args[0] is not cur:
            return None
        cur = flows[0]
        if tuple(shape_of(cur) or ()) == tuple(tokens_shape):
            return cur


def _merged(frm: fx.Node, site: fx.Node) -> Optional[fx.Node]:
    """From the map -> tokens view ``frm`` back through data moves to the attention's output of
    the tokens' shape."""
    cur, want = frm, tuple(shape_of(frm) or ())
    while _moves_data(cur) and isinstance(cur.args[0], fx.Node):
        prev = cur.args[0]
        if len(_flows(prev)) != 1:
            return None
        cur = prev
        if tuple(shape_of(cur) or ()) == want and (cur is site or site in ancestors(cur)):
            return cur
    return None


def collapse_one_window(gm: fx.GraphModule, a, site, grid_ops, feed, batch: int) -> bool:
    """Remove the partition into one window and its merge (see the module's docstring); True
    when done (the graph is recompiled; its shapes must be propagated again). A block that
    returns its attention map besides its tokens (transformers' eager Swin layer) is read so
    too: its map is then over the tokens it runs, and a call that collects such maps
    (``output_attentions=True``) runs the block's own forward (runtime ``_runs_own_forward``).
    Until audit A2 of the fortieth session such a block kept the window on the full map, and the
    eager and SDPA writings of one Swin evolved 0.3 apart at keep 0.5."""
    from .grid import window_token_index
    tos = [n for k, n, _ in grid_ops if k == "to"]
    frs = [n for k, n, _ in grid_ops if k == "from"]
    if a.token_map or len(tos) != 1 or len(frs) != 1 or not isinstance(site.q, fx.Node) or \
            tos[0] not in ancestors(site.q) or site.node not in ancestors(frs[0]):
        return False
    to, frm = tos[0], frs[0]
    src = to.args[0]
    win = _partitioned(to, shape_of(src) or ())
    out = _merged(frm, site.node)
    if win is None or out is None or win not in ancestors(site.q) or \
            tuple(shape_of(frm) or ()) != tuple(shape_of(src) or ()):
        return False
    saved = (a.window_head_dims, a.window_heads_folded, list(a.notes))
    idx = window_token_index(gm, site, a, feed, batch)
    a.window_head_dims, a.window_heads_folded, a.notes = saved
    N = a.num_tokens
    if idx is None or idx.numel() != N or not torch.equal(
            idx.to(torch.long).cpu(), torch.arange(1, N + 1)):
        return False
    if not _keeps_places(gm, out, frm, feed):
        return False
    win.replace_all_uses_with(src)
    frm.replace_all_uses_with(out)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return True


def _keeps_places(gm: fx.GraphModule, out: fx.Node, frm: fx.Node, feed) -> bool:
    """The merge puts token n's update back at token n: token indices in place of the
    attention's output come out in order."""
    shape = shape_of(out)
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ids = torch.arange(1, shape[1] + 1, dtype=torch.float64).view(1, -1, 1).expand(shape)
    env = dict(zip(holders, feed))
    env[out] = ids.to(feed[0].device)
    try:
        with torch.no_grad():
            got = run_nodes(gm.graph, frm, gm, env)
    except Exception:  # noqa: BLE001 - a merge that does not run on indices is none we remove
        return False
    return isinstance(got, torch.Tensor) and got.shape == ids.shape and torch.equal(got.cpu(), ids)
