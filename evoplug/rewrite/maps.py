"""Rewrite pass for 2-D map operations: a reshape of the tokens into the patch grid and back
(PVT's spatial reduction, a depthwise conv, Swin's windows) is fed the full map (the subset's
tokens written into the full input, a canvas) and read back at the subset's positions; a block
that takes a channels-last map starts from the exact full map and returns tokens. What runs
token by token after the map (norms, MLPs) runs on the subset only."""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
import torch.fx as fx

from ..analyse.attention import sdpa_arg
from ..analyse.block import BlockAnalysis
from ..analyse.graph import (ancestors, rolls, is_add, is_matmul, is_reshape, is_size_query,
                             shape_of, value_ancestors, value_inputs)
from ..analyse.grid import find_grid_ops
from ..analyse.pointwise import node_treats_tokens_alike, token_wise_input
from ..errors import AnalysisError
from ..runtime.gather import (first_not_none, from_canvas, from_canvas_map, from_stream_map,
                              full_canvas, gather_pair_term, map_fast_base, stream_fast_base,
                              to_canvas, tokens_to_map, without_stat_update,
                              without_state_update)
from .context import Rewrite, describe, is_size_value, keeps_state, op_name


def map_operations(rw: Rewrite):
    """2-D map operations see the full map (a canvas) and are read back at the kept tokens."""
    a, graph = rw.a, rw.graph
    grid_ops = find_grid_ops(rw.gm, a, rw.site) if a.grid_ops_expected else []
    if bool(grid_ops) != a.grid_ops_expected:
        raise AnalysisError(a.name, "the train-mode and eval-mode traces differ in their 2-D map operations")
    stream = set()
    if a.token_map:
        grid_ops = _map_block_output(a, graph, grid_ops)
        stream = _residual_stream(graph, rw.root, head=a.stream_head)
    elif a.windowed:
        stream = _flat_map_stream(graph, rw.stream_in, grid_ops)
    for kind, node, dim in grid_ops:
        if kind == "to":
            _to_map(rw, node, dim)
        else:
            _from_map(rw, node, dim, node.args[0] in stream)
    for back, tok_dim in rw.read_backs:     # once every map op has its canvas
        _subset_sizes(rw, back, tok_dim)
    if rw.stream_is_input:       # (the entry map, where nothing reads it but its sizes)
        for u in [u for u in rw.root.users if is_size_query(u) and not u.users]:
            graph.erase_node(u)
        if not rw.root.users:
            graph.erase_node(rw.root)
    if grid_ops and not a.windowed:
        _gather_map_terms(rw)


_CANVASES = (to_canvas, full_canvas)


def _gather_map_terms(rw: Rewrite):
    """A term on the logits computed from the tokens on the full map (SAM's and ViTDet's
    decomposed relative positions: ``q`` on the map, ``q_i . R[p_i - p_j]``) is gathered to the
    subset's pairs, as a position bias is; the attention itself runs on the subset."""
    site, graph = rw.site, rw.graph
    if site.kind == "sdpa":
        terms = [sdpa_arg(site.node, 3, "attn_mask")]
    elif site.kind == "softmax":
        qk = {n for n in ancestors(site.logits) | {site.logits} if is_matmul(n) and site.q in n.args}
        terms, todo = [], [site.logits]
        while todo:
            cur = todo.pop()
            if is_add(cur):
                todo.extend(x for x in cur.args[:2] if isinstance(x, fx.Node))
            elif cur not in qk and not (value_ancestors(cur) & qk):
                terms.append(cur)
    else:
        return
    for term in terms:
        if not isinstance(term, fx.Node) or not any(
                n.op == "call_function" and n.target in _CANVASES for n in ancestors(term)):
            continue
        describe(rw.a, None, f"term `{term.name}` on the logits, computed from the queries on "
                 "the map -> the subset's queries on the map, gathered to its pairs")
        term = _sized_on_the_map(graph, term)
        consumers = list(term.users)
        with graph.inserting_after(term):
            gathered = graph.call_function(gather_pair_term, (term, rw.pos))
        for u in consumers:
            u.replace_input_with(term, gathered)


def _sized_on_the_map(graph: fx.Graph, term: fx.Node) -> fx.Node:
    """``term.reshape_as(logits)`` (transformers' SAM) would size the map's term by the subset's
    logits: it takes the shape it had at calibration (the full map's pairs) instead, with the
    logits' own leading (batch) dim."""
    if not (term.op == "call_method" and term.target in ("reshape_as", "view_as")):
        return term
    like, shape = term.args[1], shape_of(term)
    with graph.inserting_before(term):
        lead = graph.call_method("size", (like, 0))
        sized = graph.call_method("reshape", (term.args[0], lead, *shape[1:]))
    term.replace_all_uses_with(sized)
    graph.erase_node(term)
    return sized


def _to_map(rw: Rewrite, node: fx.Node, dim):
    """A (tokens -> grid) view gets the full map: the same token-wise ops re-run on the full
    input when the tokens come from it by such ops, else the kept tokens + the representative
    token elsewhere, where the attention does not read it (a depthwise conv in the MLP).
    ``dim``: the token dim, or ``(1, 'seq')`` for windows cut from the token sequence itself."""
    graph, src = rw.graph, node.args[0]
    dim, layout = dim if isinstance(dim, tuple) else (dim, None)
    src_full, blocker = _clone_token_wise_chain(graph, src, rw.root, rw.root_full)
    if src_full is None and rw.stream_is_input:
        # (a map block whose stream is its input tokens: a channels-first block's 2-D op on
        # its input or on norm1 of it, through the row layout; it got the representative
        # token's canvas, the same weights as tokens the exact map: audit O, thirty-fourth session)
        src_full, _ = _clone_token_wise_chain(graph, src, rw.token, rw.full)
    if src_full is None and (rw.a.windowed or rw.a.kv_grid is not None) and \
            isinstance(rw.site.k, fx.Node) and node in ancestors(rw.site.k):
        # (windows ran on that patchwork silently until audit G1 of the forty-third session)
        what = ("windows are cut", "windows") if rw.a.windowed else ("keys/values are reduced", "keys")
        raise AnalysisError(rw.a.name, f"its {what[0]} from a 2-D map (at `{node.name}`) made from "
                                       f"its tokens through `{blocker.name}` ({op_name(blocker)}), "
                                       "which evoplug cannot re-run on its full input (only "
                                       "modules, layout methods, views of every token and ops "
                                       f"that act on each token alone): the {what[1]} would come "
                                       "from the kept tokens and the representative token in "
                                       "place of the others, not from the full map")
    with graph.inserting_before(node):
        if src_full is not None:
            canvas = graph.call_function(full_canvas, (src, src_full, rw.pos))
        else:
            M = rw.a.grid[0] * rw.a.grid[1]
            canvas = graph.call_function(to_canvas, (src, rw.pos, M, dim))
    node.replace_input_with(src, canvas)
    if layout == "seq" and node.op == "call_method":
        # the cut's sizes are the full sequence's (Hiera computes its window count from the
        # token count, which the subset would give): the canvas is always the full sequence
        with graph.inserting_before(node):
            batch = graph.call_method("size", (canvas, 0))
        node.args, node.kwargs = (canvas, batch, *shape_of(node)[1:]), {}


def _from_map(rw: Rewrite, node: fx.Node, dim, on_stream: bool):
    """A (grid -> tokens) view is read back at the subset's positions: the map block's residual
    stream (and its exact fast-update base); a windowed attention's output (exact for every
    token, see _exact_window_update); anything else."""
    a, graph = rw.a, rw.graph
    tok_dim, layout = dim
    path, replaced = None, []
    if on_stream and _reads_the_input(rw, node, dim):
        # the block's input map flattened back into the tokens it was made from: the subset's
        # tokens themselves, and the fast update the flat blocks' (a channels-first block put in
        # token form, analyse/channels_first.py, runs every op on them from its first one)
        node.replace_all_uses_with(rw.token)
        graph.erase_node(node)
        rw.stream_is_input = True
        rw.read_backs.append((rw.token, tok_dim))
        return
    with graph.inserting_after(node):
        if on_stream:
            back = graph.call_function(from_stream_map, (node.args[0], rw.pos, tok_dim, layout,
                                                         rw.stream_in, rw.stream_full))
            with graph.inserting_after(back):
                rw.fast_base = graph.call_function(map_fast_base, (node.args[0], back, rw.pos,
                                                                   tok_dim, layout))
        else:
            if a.windowed and not a.token_map and tok_dim == 1 and rw.site.node in ancestors(node):
                path = _branch_to_residual(graph, node, rw.stream_in)
            back, replaced = _subset_tokens(rw, node) if path is None else (None, [])
            if back is None:
                where = None if path is not None else rw.pos
                back = graph.call_function(from_canvas_map, (node.args[0], where, tok_dim, layout))
    source = node.args[0]
    node.replace_all_uses_with(back)
    graph.erase_node(node)
    _erase_unused(graph, source, rw.root)
    _drop_size_only(graph, replaced, rw)
    _leave_stats_to_the_subset(graph, replaced)
    if path is None:       # (the stream's too: a channels-first block's attention may size its
        rw.read_backs.append((back, tok_dim))   # views by H * W, FastViT's)
    if path is not None:
        rw.fast_base = _exact_window_update(graph, path, rw.stream_in, rw.stream_full, rw.pos)


def _reads_the_input(rw: Rewrite, node: fx.Node, dim) -> bool:
    """``node`` is a (B, H, W, C) -> (B, H * W, C) view of the block's entry map itself."""
    src, shape, entry = node.args[0], shape_of(node), shape_of(rw.root)
    return src is rw.root and rw.root.op == "call_function" and rw.root.target is tokens_to_map \
        and dim == (1, "cl") and shape is not None and entry is not None and len(entry) == 4 \
        and tuple(shape) == (entry[0], entry[1] * entry[2], entry[3])


def _subset_tokens(rw: Rewrite, node: fx.Node):
    """The tokens of a global attention inside a channels-last map block (SAM's and ViTDet's
    global blocks: ``norm1`` on the map, then ``x.reshape(B, H * W, C)``; Swin's last stage, one
    window covering the map) made from the subset's own tokens by the same token-wise ops, so the
    representative token's slot holds the representative token (a read-back of the full map
    would hold the token at its position). Returns (tokens, the map-side modules they replace),
    or (None, []) where the map is not made from the block's input map here (a window cut from
    it). An op on the way that does not act on each token alone is refused by name."""
    a = rw.a
    if not a.token_map or a.windowed or node.args[0] is rw.root or rw.root.op == "placeholder":
        return None, []
    if shape_of(node) is None or len(shape_of(node)) != 3 or rw.root not in value_ancestors(node.args[0]):
        return None, []
    chain, blocker = _token_wise_path(rw, node.args[0])
    if blocker is not None:
        raise AnalysisError(a.name, _NOT_TOKEN_WISE.format(blocker.name, op_name(blocker)))
    if not all(_can_run_again(rw.gm, op) for op, _ in chain):
        return None, []
    rolled = next((op for op, _ in chain if rolls(op)), None)
    if rolled is not None:
        # (its attention's slots hold the rolled map: the position bias and mask are the
        # rolled slots', not the tokens')
        raise AnalysisError(a.name, f"its attention runs on the map rolled at `{rolled.name}` as one "
                                    "window (a shifted window as large as the map: timm's Swin with "
                                    "always_partition=True); evoplug takes a single window's tokens "
                                    "in the map's own order, so it cannot place the kept ones")
    describe(a, f"2-D map op at `{node.name}` -> read back at the kept tokens",
             f"2-D map op at `{node.name}` -> the subset's own tokens (the token-wise ops "
             "before it re-run on them)")
    graph, prev = rw.graph, rw.token
    for op, main in reversed(chain):
        if not _is_move(op):        # (the subset's tokens are in token form already)
            with graph.inserting_before(node):
                prev = graph.node_copy(op, lambda n, p=prev, old=main: p if n is old else n)
    return prev, [op for op, _ in chain if op.op == "call_module"]


_NOT_TOKEN_WISE = ("its attention takes its tokens from the map through `{}` ({}), which does not "
                   "act on each token alone, or not in a way evoplug can re-run on the subset's own "
                   "tokens (it mixes positions, or reads a tensor other than its input): read back "
                   "from the full map, the representative token's slot would hold the token at its "
                   "place, not the representative token")


_MOVES = {"view", "reshape", "permute", "contiguous", "roll", "flatten", "transpose"}


_VALUE_METHODS = {"float", "to", "type_as"}


def _is_move(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target in _MOVES) or (
        n.op == "call_function" and n.target in (torch.nn.functional.pad, torch.roll))


def _token_wise_path(rw: Rewrite, src: fx.Node) -> Tuple[Optional[list], Optional[fx.Node]]:
    """The ops from the block's entry map to ``src`` (``src`` first), each with the input it
    takes from the map, when they act on each token alone: data movement that keeps every
    token's channels together (padding, window views), dtype methods, the stream's head (``x =
    n0(x)`` before the adds, token-wise as the skip path takes it), and a module, function or
    method that analyse/pointwise.py finds treats every token alike when run on its own (a
    norm, a scaling by a constant or a per-channel parameter, ``F.layer_norm`` over the
    channels, a registered leaf function). ``(chain, None)``, or ``(None, op)``: the first op
    on the way that is none of these (until the forty-second session a function there made
    the attention read the full map back, the representative token's slot holding the token
    at its place)."""
    chain, cur = [], src
    while cur is not rw.root:
        values = value_inputs(cur)      # (``t.type_as(x)`` reads ``x``'s dtype, not its values)
        main = [i for i in values if i is rw.root or rw.root in value_ancestors(i)]
        if len(main) != 1:
            return None, cur
        si, so = shape_of(main[0]), shape_of(cur)
        if (si is None and main[0] is not rw.root) or so is None:
            return None, cur
        si = si if si is not None else (0, *rw.a.grid, rw.a.dim)
        sizes = all(is_size_value(n) or n not in values for n in cur.all_input_nodes if n is not main[0])
        if _is_move(cur) and cur.args[0] is main[0]:
            ok = sizes and si[-1] == so[-1]
        elif (cur.op == "call_method" and cur.target in _VALUE_METHODS) or cur.name in rw.a.stream_head:
            ok = sizes and tuple(si) == tuple(so)
        else:
            ok = tuple(si[1:-1]) == tuple(so[1:-1]) and node_treats_tokens_alike(rw.gm, cur, main[0], si)
        if not ok:
            return None, cur
        chain.append((cur, main[0]))
        cur = main[0]
    return chain, None


def _running_stats(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the module ``node`` calls holds a norm with running statistics (BatchNorm), or
    other state its forwards change (:func:`keeps_state`)."""
    from torch.nn.modules.batchnorm import _NormBase
    return node.op == "call_module" and (keeps_state(gm, node.target) or any(
        isinstance(m, _NormBase) and m.track_running_stats for m in gm.get_submodule(node.target).modules()))


def _can_run_again(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` can run a second time in a forward, on other tokens, without moving
    running statistics twice: without_stat_update takes a module and its one input."""
    return not _running_stats(gm, node) or (len(node.args) == 1 and not node.kwargs)


def _run_again(graph: fx.Graph, node: fx.Node, anchor: fx.Node, arg: fx.Node,
               old: Optional[fx.Node] = None) -> fx.Node:
    """A copy of ``node`` run on ``arg`` in place of its input ``old`` (its first), after
    ``anchor``: a BatchNorm's copy leaves the running statistics to the original's run (train
    mode), a module keeping other state leaves it so too."""
    old = node.all_input_nodes[0] if old is None else old
    if _running_stats(graph.owning_module, node):
        with graph.inserting_after(anchor):
            module = graph.get_attr(node.target)
        with graph.inserting_after(module):
            run = without_state_update if keeps_state(graph.owning_module, node.target) else \
                without_stat_update
            return graph.call_function(run, (module, arg))
    with graph.inserting_after(anchor):
        return graph.node_copy(node, lambda n: arg if n is old else n)


def _leave_stats_to_the_subset(graph: fx.Graph, modules: list):
    """Map-side modules the subset's tokens replaced and that still run on the full map (for
    the stream): a BatchNorm among them leaves its running statistics to the subset's run."""
    alive = set(graph.nodes)
    for m in modules:
        if m in alive and _running_stats(graph.owning_module, m):
            again = _run_again(graph, m, m, m.args[0])
            m.replace_all_uses_with(again)
            graph.erase_node(m)


def _drop_size_only(graph: fx.Graph, modules: list, rw: Rewrite):
    """Map-side modules the subset's tokens replaced, left to feed only size queries (through
    data movement: Swin's padding reads the map's size): the sizes read their input instead,
    so the module does not run on the full map for nothing."""
    alive = set(graph.nodes)
    for m in modules:
        si = shape_of(m.args[0]) if m.args[0] is not rw.root else (shape_of(m)[0], *rw.a.grid, rw.a.dim)
        if m in alive and si is not None and tuple(si) == tuple(shape_of(m) or ()) \
                and _feeds_only_sizes(m):
            m.replace_all_uses_with(m.args[0])
            graph.erase_node(m)


def _feeds_only_sizes(n: fx.Node) -> bool:
    return all(is_size_query(u) or (_is_move(u) and u.args[0] is n and _feeds_only_sizes(u))
               for u in n.users)


def _erase_unused(graph: fx.Graph, node: fx.Node, root: fx.Node):
    """Drop ``node`` and the ops feeding only it, up to ``root``, once nothing reads it (the
    map-side twin of ops re-run on the subset)."""
    while isinstance(node, fx.Node) and node is not root and not node.users and node.op in (
            "call_module", "call_method", "call_function"):
        inputs = node.all_input_nodes
        graph.erase_node(node)
        node = inputs[0] if len(inputs) == 1 else None


def _subset_sizes(rw: Rewrite, back: fx.Node, tok_dim: int):
    """Views of the read-back tokens sized by the map's ``H * W`` (SAM's attention:
    ``B, H, W, _ = x.shape; qkv.view(B, H * W, ...)``) take the subset's token count instead, up
    to where the tokens go back onto a canvas."""
    grid, graph = tuple(rw.a.grid), rw.graph
    count, seen, todo = None, set(), list(back.users)
    while todo:
        n = todo.pop()
        if n in seen or is_size_query(n) or (n.op == "call_function" and n.target in _CANVASES):
            continue
        seen.add(n)
        todo.extend(n.users)
        if not is_reshape(n):
            continue
        for x in list(n.all_input_nodes[1:]):
            if _is_grid_count(x, grid, rw.root):
                if count is None:
                    where = back if back.op != "placeholder" else \
                        [p for p in graph.nodes if p.op == "placeholder"][-1]
                    with graph.inserting_after(where):
                        count = graph.call_method("size", (back, tok_dim))
                n.replace_input_with(x, count)


def _is_grid_count(x: fx.Node, grid, root: fx.Node) -> bool:
    """``H * W`` read from the sizes of one 2-D map of the patch grid (``root``: the block's
    entry map, made by the rewrite)."""
    if x.op != "call_function" or x.target is not operator.mul or len(x.args) != 2:
        return False
    sizes = []
    for f in x.args:
        if not (isinstance(f, fx.Node) and f.op == "call_function" and f.target is operator.getitem
                and isinstance(f.args[0], fx.Node) and is_size_query(f.args[0])
                and isinstance(f.args[1], int)):
            return False
        src = f.args[0].args[0]
        shape = (0, *grid, 0) if src is root else shape_of(src)
        if shape is None or len(shape) != 4:
            return False
        sizes.append((f.args[0], shape[f.args[1]]))
    return sizes[0][0] is sizes[1][0] and tuple(sorted(s for _, s in sizes)) == tuple(sorted(grid))


def _branch_to_residual(graph: fx.Graph, start: fx.Node, token: fx.Node):
    """From the read-back of a windowed attention's output, the token-wise ops up to the
    residual add with the block's tokens (Twins: proj, proj_drop, drop_path): ([ops], add), or
    None when the path does anything else."""
    chain, cur = [], start
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        if is_add(u) and token in u.args[:2] and cur in u.args[:2]:
            # (an empty chain: the windows' merge is added as it is, MMPretrain-style blocks
            # with the projection inside the window attention: read back at the kept tokens
            # only until the thirty-ninth session, audit Y5)
            return chain, u
        if not u.args or u.args[0] is not cur:
            return None
        others = [v for v in list(u.args[1:]) + list(u.kwargs.values()) if isinstance(v, fx.Node)]
        ok = (u.op == "call_module" and not others) or \
            (u.op == "call_method" and u.target in _TOKEN_WISE_OK and not others) or \
            (u.op == "call_function" and u.target in (operator.mul, torch.mul) and
             all(v.op == "get_attr" for v in others))          # layer scale
        if not ok:
            return None
        chain.append(u)
        cur = u


def _exact_window_update(graph: fx.Graph, path, token: fx.Node, full: fx.Node, pos: fx.Node):
    """Windowed attention runs on the full map, so its branch (projection, drop path) is run
    on every token; the kept tokens read theirs back before the residual add, and the others
    keep their own exact attention update for the fast update (as in map blocks)."""
    chain, add = path
    last = chain[-1] if chain else next(v for v in add.args[:2] if v is not token)
    with graph.inserting_after(last):
        sub = graph.call_function(from_canvas, (last, pos, 1))
    add.replace_input_with(last, sub)
    with graph.inserting_after(add):
        return graph.call_function(stream_fast_base, (full, last, add, pos))


def _map_block_output(a: BlockAnalysis, graph: fx.Graph, grid_ops):
    """A map block's program returns tokens: its final tokens -> (B, H, W, C) view is dropped
    (the converted block puts the restored tokens back into the map)."""
    out_node = next(n for n in graph.nodes if n.op == "output")
    res = out_node.args[0]
    last = next((g for g in grid_ops if g[0] == "to" and g[1] is res), None)
    if last is None:
        raise AnalysisError(a.name, "its output map is not a view of tokens computed on the "
                                    "subset (the MLP runs on the 4-D map): nothing would run on "
                                    "fewer tokens")
    out_node.args = (res.args[0],)
    graph.erase_node(res)
    return [g for g in grid_ops if g is not last]


def _residual_stream(graph: fx.Graph, root: fx.Node, seeds=(), head=()):
    """The map block's residual stream: its input (or ``seeds``), a norm or a function that
    takes it whole before its first add (``first``; run on the full map, as the block's map part
    is: its fast-update base keeps it), and the adds that carry it."""
    stream = set(seeds) or {root}
    first = set(stream)
    for n in graph.nodes:
        if is_add(n) and any(isinstance(v, fx.Node) and v in stream for v in n.args[:2]):
            stream.add(n)
        elif n.name in head and n.all_input_nodes[0] in first:
            stream.add(n)
            first.add(n)
    return stream


def _flat_map_stream(graph: fx.Graph, token: fx.Node, grid_ops):
    """A windowed (B, N, C) block that views its input tokens themselves as the map (``m =
    x.view(B, H, W, C)``) and adds its attention residual on that view (MMPretrain-style blocks
    written like timm's): the residual stream on the map, read back as a map block's stream is
    (every token's exact attention update, the representative token's slot its own; audit Y5 of
    the thirty-ninth session). Empty where no map view of the input itself is added to."""
    seeds = [node for kind, node, _ in grid_ops if kind == "to" and node.args[0] is token]
    return _residual_stream(graph, token, seeds) if seeds else set()


_TOKEN_WISE_OK = {"permute", "transpose", "contiguous", "clone", "float", "to", "type_as", "squeeze",
                  "unsqueeze"}


def _clone_token_wise_chain(graph: fx.Graph, src: fx.Node, token: fx.Node, full: fx.Node):
    """Re-emit the ops that made ``src`` from the block's tokens, applied to the full input
    (``full``), when they are token-wise: leaf modules (norms, linears), layout methods,
    arithmetic with constants and any other op analyse/pointwise.py finds acts on each token
    alone (``token_wise_input``). Returns (the full-map node, None), or (None, the first op on
    the way that is none of these: then the map cannot be rebuilt from the full input)."""
    chain, cur = [], src
    while cur is not token:
        if not isinstance(cur, fx.Node) or not cur.all_input_nodes:
            return None, cur
        main = cur.all_input_nodes[0]
        if cur.op == "call_method" and cur.target in ("reshape", "view") and cur.args[0] is main and \
                all(_batch_size(i) for i in cur.all_input_nodes[1:]) and -1 in cur.args[1:]:
            pass    # (a view sized by the batch, the tokens' count left to -1: the heads of a
            #         channels-first block's twin, analyse/channels_first.py)
        elif len(cur.all_input_nodes) != 1 or not (
                cur.op == "call_module" or (cur.op == "call_method" and cur.target in _TOKEN_WISE_OK)):
            main = _scaled_by_constants(cur, token) or token_wise_input(graph.owning_module, cur, token)
            if main is None:
                return None, cur
        if not _can_run_again(graph.owning_module, cur):
            return None, cur     # (its running statistics would move twice in a forward)
        chain.append((cur, main))
        cur = main
    after = src
    if src.op == "placeholder":      # the map is the tokens themselves (Swinv2: post-norm)
        after = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(after):
        whole = prev = graph.call_function(first_not_none, (full, token))   # dense runs: the tokens
    for node, main in reversed(chain):
        arg, prev = prev, _run_again(graph, node, prev, prev, main)
        _read_on_whole(graph, prev, arg, token, whole)
    return prev, None


def _read_on_whole(graph: fx.Graph, copy: fx.Node, arg: fx.Node, token: fx.Node, whole: fx.Node):
    """The sizes, dtype or device ``copy`` (an op re-run on ``arg``, made from the full input)
    reads of the tokens (``t.to(x.dtype)``, ``t.type_as(x)``, ``t * x.shape[1]``) read on the
    full input ``whole``: the subset's count is not the map's."""
    copies = {token: whole}

    def reread(n):
        if n not in copies and isinstance(n, fx.Node) and token in ancestors(n):
            copies[n] = graph.node_copy(n, reread)
        return copies.get(n, n)
    for i in copy.all_input_nodes:
        if i is not arg and (i is token or token in ancestors(i)):
            with graph.inserting_before(copy):
                copy.replace_input_with(i, reread(i))


_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
               torch.mul, torch.div, "add", "sub", "mul", "div"}


def _scaled_by_constants(node: fx.Node, token: fx.Node) -> Optional[fx.Node]:
    """The one input of the arithmetic op ``node`` (``x * self.gamma + self.beta``, not in place)
    that comes from the block's tokens when its other operands are constants (parameters,
    buffers, numbers: the same for the full input as for the subset), else None."""
    if node.op not in ("call_function", "call_method") or node.target not in _ARITHMETIC:
        return None
    on_path = [i for i in node.all_input_nodes if i is token or token in ancestors(i)]
    if len(on_path) != 1 or any(a.op == "placeholder" for i in node.all_input_nodes
                                if i is not on_path[0] for a in ancestors(i) | {i}):
        return None
    return on_path[0]


def _batch_size(n: fx.Node) -> bool:
    """``t.size(0)`` or ``t.shape[0]``: the same for the kept tokens as for all of them."""
    if n.op == "call_method" and n.target == "size" and len(n.args) == 2:
        return n.args[1] == 0
    return n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0 and \
        isinstance(n.args[0], fx.Node) and is_size_query(n.args[0]) and len(n.args[0].args) == 1
