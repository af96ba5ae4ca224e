"""Rewrite one traced block into its slow-path program.

The program takes the block's own arguments (the token tensor replaced by the subset's tokens)
plus ``_evo_pos`` (B, n): the original index of each token of the subset it runs on (``None``
for a dense run) and ``_evo_full``: the block's full token input. It returns
``(tokens_out, global_row)``, plus a third item ``fast_base`` for blocks whose windowed
attention runs on the full map (Swin's map blocks, Twins' locally-grouped blocks): every
token's exact stream after attention and the representative token's, from which the converted
block starts the fast update; a block that returns a tuple (Hugging Face layers) has its other
items as a fourth, and one whose forward sets tensors on itself (an attention map kept for
visualisation) those, as (module path, name, value), as a fifth:

* position terms found by the analysis (token-independent additive terms on the attention
  logits, e.g. BEiT's relative position bias) are gathered with ``_evo_pos``, so the kept tokens
  and the representative token keep their own biases; a term sized from the token count reads
  the size of the full input;
* the attention row of the global query (cls token, or the mean query when there is no prefix
  token) over the patch keys is computed next to the attention: taken from the softmax output,
  or computed from q and k for fused ``scaled_dot_product_attention`` / from the module's
  weights for ``nn.MultiheadAttention``; for windowed attention, each window's mean-query row
  mapped back to its tokens with the window index found by the analysis;
* 2-D map operations (a reshape of the tokens into the patch grid and back) are fed the full
  map and read back at the subset's positions; a block that takes a channels-last map (Swin)
  starts from the exact full map and returns tokens.

The program is the generated ``forward`` of an fx GraphModule, called with the *block itself*
as ``self``: it reads the block's live parameters and buffers (so ``.to()``, ``.half()`` and
``load_state_dict`` need nothing special) and adds no module, parameter or state_dict key.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Callable, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _format_import_block
from torch.package import sys_importer
from torch.package.importer import ObjMismatchError, ObjNotFoundError

from ..analyse.attention import AttentionSite, find_attention, sdpa_arg
from ..analyse.block import BlockAnalysis
from ..analyse.calibrate import ModuleCall
from ..analyse.graph import (ancestors, ancestors_with_writes, rolls, getattr_path, is_add, is_matmul,
                              is_reshape, is_size_query, is_whole_view,
                              module_of, no_side_effects, shape_of, token_size_queries, token_wise_of,
                              value_ancestors, value_inputs, writes_in_place)
from ..analyse.grid import find_grid_ops
from ..analyse.one_window import collapse_one_window
from ..analyse.pointwise import node_treats_tokens_alike, token_wise_input
from ..analyse.trace import mark_batch_specialised, set_by_forward, trace_block
from ..errors import AnalysisError
from ..runtime import evolve as ev
from ..runtime.programs import compile_program
from .skip_path import clone_path, is_identity, skip_path


def build_program(a: BlockAnalysis, training: bool, gm: fx.GraphModule = None,
                  call=None, root: nn.Module = None) -> Callable:
    """Slow-path program of block ``a`` for train or eval mode (traces bake ``self.training``),
    specialised on ``call`` (default: the calibration call; the per-batch factory passes a
    call of another batch size, and ``root``: a stand-in of the block with its original class,
    so the converted block is traced without being changed)."""
    if gm is None:
        call = a.call if call is None else call
        gm = trace_block(a.module if root is None else root, a.name, a.plan, a.attention_ids(),
                         training, call)
        mark_batch_specialised(a, gm, a.plan.bind(a.name, call.args, call.kwargs)[0].shape[0])
        if a.grid_ops_expected:
            _shape_prop_without_side_effects(a, gm, call)
        else:
            # (the shapes tell heads merged into the batch dim: without them the train-mode and
            # per-batch programs read the global row unmerged, (B * heads, 1, N), and their
            # blocks ran every token, silently; audits of the twenty-ninth session)
            try:
                _shape_prop_without_side_effects(a, gm, call)
            except Exception:   # noqa: BLE001 - the program runs without them as before
                pass
        if a.one_window:
            _one_window_again(a, gm, call)
    rw = _start(a, gm)
    for rewrite_pass in (_position_terms, _whole_token_args, _stream_head, _map_operations,
                         _global_row, _skip_fast_base, _outputs):
        rewrite_pass(rw)
    # what the runtime must hand the program (a block that reads neither can take its kept
    # tokens straight from the block before it, see runtime/block.py)
    a.uses_pos = a.uses_pos or bool(rw.pos.users)
    a.uses_full = a.uses_full or bool(rw.full.users)
    gm.graph.lint()
    gm.recompile()
    _check_attrs_resolve(a, gm, training)
    # the submodules the program calls by path on the live block (what they compute, and
    # what replaces them, is read at run time: not part of what runtime/block.py checks)
    a.leaf_paths = tuple(sorted(set(a.leaf_paths) | {n.target for n in gm.graph.nodes
                                                       if n.op == "call_module"}))
    return _as_program(a, gm)


def _one_window_again(a: BlockAnalysis, gm: fx.GraphModule, call):
    """The analysis read the block's one window as attention over its tokens (analyse/
    one_window.py): a program traced again (train mode, another batch size) reads it so too."""
    site = find_attention(gm, a.name)
    feed = a.plan.feed(*a.plan.bind(a.name, call.args, call.kwargs))
    if not collapse_one_window(gm, a, site, find_grid_ops(gm, a, site), feed, feed[0].shape[0]):
        raise AnalysisError(a.name, "its one window covering the map, read as attention over its "
                                    "tokens at the conversion, is not one in the program traced "
                                    "for this call (another mode or batch size)")
    _shape_prop_without_side_effects(a, gm, call)


@dataclasses.dataclass
class _Rewrite:
    """What the passes share while they rewrite one block graph."""
    a: BlockAnalysis
    gm: fx.GraphModule
    site: AttentionSite
    token: fx.Node            # the subset's tokens (the block's token argument)
    pos: fx.Node              # placeholder ``_evo_pos``: original index of each subset token
    full: fx.Node             # placeholder ``_evo_full``: the block's full token input
    root: fx.Node             # where the block's computation starts from the subset
    root_full: fx.Node        # ... and from the full input
    fast_base: Optional[fx.Node] = None   # exact stream after attention (map/windowed blocks)
    row: Optional[fx.Node] = None         # the global query's attention row
    read_backs: list = dataclasses.field(default_factory=list)   # (map -> subset tokens, dim)
    stream_is_input: bool = False   # a map block's stream is its input tokens (no read-back)
    lined: list = dataclasses.field(default_factory=list)   # arguments gathered as lined up
    stream_in: Optional[fx.Node] = None     # the stream past its head (``x = n0(x)`` before the
    stream_full: Optional[fx.Node] = None   # adds) on the subset and on the full input

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph


def _start(a: BlockAnalysis, gm: fx.GraphModule) -> _Rewrite:
    """Add the ``_evo_pos`` and ``_evo_full`` arguments; a block that takes a (B, H, W, C) map
    runs its map part on the exact full map (its whole input), the token part on the subset."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    token = placeholders[0]
    _drop_whole_views(graph, token)
    with graph.inserting_after(placeholders[-1]):
        pos = graph.placeholder("_evo_pos", default_value=None)
    with graph.inserting_after(pos):
        full = graph.placeholder("_evo_full", default_value=None)
    root = token
    if a.token_map:
        with graph.inserting_after(full):
            root = graph.call_function(ev.tokens_to_map, (token, full, a.grid[0], a.grid[1]))
        if "tensor_meta" in token.meta:     # (the map's shape: a view of it may be the first op)
            root.meta["tensor_meta"] = token.meta["tensor_meta"]
        token.replace_all_uses_with(root, delete_user_cb=lambda u: u is not root)
    rw = _Rewrite(a, gm, find_attention(gm, a.name), token, pos, full, root,
                  root if a.token_map else full)
    rw.stream_in, rw.stream_full = token, full
    return rw


def _drop_whole_views(graph: fx.Graph, token: fx.Node):
    """Views of every token, in order (``x[:, 0:]``: an optional class token's cut with none,
    ``x[:, :N]``, ``x.narrow(1, 0, N)``), are the tokens themselves: on the subset too (a
    ``narrow`` of the full length would fail there), and followed like them (the map re-run on
    the full input sees through them: keys reduced from a patchwork map of the kept tokens and
    the representative token until audit Y5 of the thirty-ninth session)."""
    for n in list(graph.nodes):
        if is_whole_view(n) and token in ancestors(n) | {n.args[0]}:
            n.replace_all_uses_with(n.args[0])
            graph.erase_node(n)


def _position_terms(rw: _Rewrite):
    """Token-independent additive terms on the logits follow the selected tokens (windows run
    on the full map: their terms stay as they are)."""
    if rw.a.windowed:
        return
    heads = _heads_merged(rw)
    for bias in rw.site.biases:
        _sized_from_full(rw, bias)
        _gather_term(rw, bias, heads)
    for node, name in rw.site.lined_terms:
        # a block argument the block lines up with the logits itself (a shared relative
        # position bias (heads, N, N) handed to every block, ``attn_mask=bias.unsqueeze(0)``,
        # ``bias.view(1, heads, n, n)``): handed to the program whole, lined up there as by the
        # block (sizes read from the full input) and gathered as lined up, (1 or B, heads, n, n)
        _check_lined_up(rw, node, name, heads)
        _sized_from_full(rw, node)
        _gather_term(rw, node, heads)
        rw.lined.append(name)
        shape = rw.a.extra_shapes.get(name)
        _describe(rw.a, f"argument `{name}` {shape} -> gathered by token index",
                  f"argument `{name}` {shape} on the attention logits -> gathered where the block "
                  f"lines it up with them (`{node.name}`)")


def _sized_from_full(rw: _Rewrite, term: fx.Node):
    """A term sized from the token count (HF BEiT's bias, ``bias.view(1, heads, n, n)``) is
    sized from the full input instead."""
    sizes = token_size_queries(term, rw.token)
    if sizes:
        last = [n for n in rw.graph.nodes if n.op == "placeholder"][-1]
        with rw.graph.inserting_after(last):
            whole = rw.graph.call_function(ev.first_not_none, (rw.full, rw.token))
        _size_bias_from(rw.graph, term, sizes, whole, rw.token)


def _check_lined_up(rw: _Rewrite, node: fx.Node, name: str, heads: tuple):
    """An argument lined up with the logits is gathered on its last two dims as (1 or B, heads,
    n, n) (or (B * heads, n, n)): they must be the token pairs of logits of that rank."""
    shape, N = shape_of(node), rw.a.num_tokens
    read = [q.args[0] for q in ancestors(node) if is_size_query(q) and isinstance(q.args[0], fx.Node)
            and q.args[0].op != "placeholder" and not token_wise_of(q.args[0], rw.token)]
    if read:     # (the program reads the sizes from the full input, as the tokens')
        raise AnalysisError(rw.a.name, f"its argument `{name}` is lined up with the attention "
                                       f"logits (`{node.name}`) by sizes read from `{read[0].name}`"
                                       ", not from the block's tokens: evoplug sizes it for the "
                                       "full input from the tokens' own sizes alone")
    logits = shape_of(rw.site.logits if rw.site.kind == "softmax" else rw.site.q)
    if shape is None or logits is None:
        return
    ranks = (3,) if heads else (2, 3, 4)     # (merged: as the logits (B * heads, N, N))
    if rw.site.kind == "mha" or len(logits) != ranks[-1] or len(shape) not in ranks \
            or shape[-2] not in (N, 1) or shape[-1] not in (N, 1):
        raise AnalysisError(rw.a.name, f"its argument `{name}` {rw.a.extra_shapes.get(name)} is "
                                       f"lined up with the attention logits as {tuple(shape)} "
                                       f"(`{node.name}`; {rw.site.kind} of {tuple(logits)}): "
                                       "evoplug gathers such a term for each image's kept tokens "
                                       "on its last two dims, the (query, key) pairs of the "
                                       f"{N} tokens, against logits (B, heads, N, N) or (B * "
                                       "heads, N, N)")


def _gather_term(rw: _Rewrite, term: fx.Node, heads: tuple):
    """``term`` (a term on the logits) gathered to the subset's pairs for all its users, after
    the in-place writes into it (``bias[:, 0, :] = 0``: gathered before them, the writes went
    into the gathered pairs until audit H2 of the forty-fourth session)."""
    writes = [u for u in term.users if writes_in_place(u) and u.args[0] is term]
    consumers = [u for u in term.users if u not in writes]
    with rw.graph.inserting_after(max([term] + writes, key=list(rw.graph.nodes).index)):
        gathered = rw.graph.call_function(ev.gather_pair_bias, (term, rw.pos) + heads)
    for u in consumers:
        u.replace_input_with(term, gathered)


def _heads_merged(rw: _Rewrite) -> tuple:
    """``(heads,)`` where the attention merges its heads into the batch dim ((B * heads, N, d),
    a count fixed by the block), ``(1,)`` where it has one head and no head dim ((B, N, d): a
    term on its logits (B, N, N) is gathered as of one merged head; such blocks with a position
    bias were refused, "does not run on a token subset", until the forty-first session), else
    ``()``."""
    q, token = shape_of(rw.site.q), shape_of(rw.token)
    if q is None or token is None or q[0] % token[0]:
        return ()
    if q[0] == token[0]:
        return (1,) if len(q) == 3 and len(token) == 3 and rw.site.kind in ("softmax", "sdpa") else ()
    return (q[0] // token[0],)


def _size_bias_from(graph: fx.Graph, bias: fx.Node, sizes: List[fx.Node], whole: fx.Node,
                    token: fx.Node):
    """The size queries ``sizes`` of the tokens that the position term ``bias`` is computed from
    read ``whole`` (the full input) on the term's own path: copies of them and of the ops
    between them and ``bias``, so the queries' other users (``B, n, C = x.shape`` also sizes
    the q/k/v reshapes of the subset) keep the subset's sizes (audit H3). A query that others
    are read from (``x.dtype`` in ``norm1(x).to(x.dtype).shape``) stays: the outer one reads
    ``whole``. A query of a tensor of another width or dtype than the tokens (``qkv(x).shape``)
    reads a stand-in of it with the full input's token count (``ev.sized_as_full``). The
    in-place writes into a copied tensor (``dist = table[:n, :n].clone(); dist[0, :] = 0``) are
    copied with it, and a tensor written at a place read from the sizes (``t[n - 1] = 0``) is
    copied with the write: until audit H2 of the forty-fourth session the writes went into the
    subset's tensor alone (the block refused, "traced program differs"), or at the subset's
    place (a fixed-size table: silently off)."""
    path = ancestors_with_writes(bias)
    queries = {q for q in sizes if not any(q in ancestors(r) for r in sizes)}
    copied = _copied(path, queries)
    on = [n for n in graph.nodes if n in copied]
    copies = {}
    for n in on:
        with graph.inserting_after(n):
            copies[n] = graph.node_copy(n, lambda a: copies.get(a, a))
        if n in queries:
            read = n.args[0]
            if shape_of(read) != shape_of(token) or _dtype(read) != _dtype(token):
                with graph.inserting_before(copies[n]):
                    copies[n].replace_input_with(read, graph.call_function(ev.sized_as_full, (read, whole)))
            else:
                copies[n].replace_input_with(read, whole)
    for u in list(path) + [bias]:
        if u not in copies:
            for a in list(u.all_input_nodes):
                if a in copies:
                    u.replace_input_with(a, copies[a])
    for n in reversed(on):     # (left to the subset's sizes, a view by them would still run)
        if not n.users and not (writes_in_place(n) and not all(map(writes_in_place, n.args[0].users))):
            graph.erase_node(n)


def _copied(path, queries) -> set:
    """The nodes of ``path`` that :func:`_size_bias_from` copies: those computed from
    ``queries``, the in-place writes into them, and the tensors such writes go into."""
    on = {n for n in path if n in queries or ancestors(n) & queries}
    while True:
        more = {u for n in on for u in n.users if u in path and writes_in_place(u) and u.args[0] is n} | \
            {n.args[0] for n in on if writes_in_place(n) and n.args[0].op not in ("placeholder", "get_attr")}
        if more <= on:
            return on
        on |= more


def _dtype(n: fx.Node):
    return getattr(n.meta.get("tensor_meta"), "dtype", None)


#: methods by which a block lines a per-token argument up with its tokens
_LINE_UP = {"unsqueeze", "float", "double", "half", "bfloat16", "to", "type_as", "contiguous"}


def _is_unsqueeze_index(u: fx.Node, node: fx.Node) -> bool:
    """``t[:, None]`` and the like: an index of only ``None``, ``:`` and ``...``."""
    if not (u.op == "call_function" and u.target is operator.getitem and u.args[0] is node):
        return False
    index = u.args[1] if isinstance(u.args[1], tuple) else (u.args[1],)
    return all(i is None or i is Ellipsis or i == slice(None) for i in index)


def _lined_up(node: fx.Node, val: torch.Tensor, size: int) -> Tuple[fx.Node, torch.Tensor, list]:
    """The last node (and its meta value) of the ops by which the block lines an argument up
    with its tokens (unsqueeze, ``[:, None]``, a cast, a view for one image: :func:`_view_for_one`),
    from the argument's placeholder (sizes read from it aside); its dim of ``size`` is the
    tokens'. Also the views followed, as ``(view, where its token size is among the view's sizes,
    the token dim of what it views)``."""
    views = []
    while len(_value_users(node)) == 1:
        u = _value_users(node)[0]
        if _is_unsqueeze_index(u, node):
            val = val[u.args[1]]
        elif u.op == "call_method" and u.target in _LINE_UP and u.args[0] is node and not any(
                isinstance(v, fx.Node) for v in list(u.args[1:]) + list(u.kwargs.values())):
            try:
                val = getattr(val, u.target)(*u.args[1:], **u.kwargs)
            except (RuntimeError, TypeError):    # e.g. .to() a device: not followed further
                break
        elif (shaped := _view_for_one(u, node, val, size)) is not None:
            views.append((u, shaped[0], list(val.shape).index(size)))
            val = val.reshape(shaped[1])
        else:
            break
        node = u
    return node, val, views


def _value_users(node: fx.Node) -> List[fx.Node]:
    """What reads ``node``'s values, where its sizes are read only for that (a view by
    ``t.shape[-1]``: the full table's sizes, as the block read them) or by a check the trace
    specialised (Llama's ``assert freqs_cis.shape == (x.shape[1], x.shape[-1])``: no users);
    else all its users."""
    users = [u for u in node.users if not is_size_query(u)]

    def for_it(n):
        return all(u in users or (not u.users and u.op == "call_function") or (
            _is_size_value(u) and for_it(u)) for u in n.users)
    return users if len(users) == 1 and for_it(node) else list(node.users)


def _view_sizes(u: fx.Node, node: fx.Node) -> Optional[list]:
    """The sizes ``u`` views or reshapes ``node`` to (``t.view(1, n, -1)``, ``t.view(*shape)``,
    ``t.reshape([1, n, -1])``, ``torch.reshape(t, shape)``), or None if it does not."""
    if not ((u.op == "call_method" and u.target in ("view", "reshape")) or (
            u.op == "call_function" and u.target is torch.reshape)) or u.args[0] is not node or u.kwargs:
        return None
    sizes = u.args[1:]
    return list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else list(sizes)


def _view_for_one(u: fx.Node, node: fx.Node, val: torch.Tensor, size: int) -> Optional[tuple]:
    """``u`` shapes the table ``node`` (``val``, its token dim the one of ``size``) for one image:
    dims of 1 before the token dim, in the table and as 1s written in the view, the token dim
    kept whole, the dims after it regrouped (``cos.view(1, 1, q.shape[2], -1)``, rope-vit's and
    Llama's ``freqs_cis.view(*shape)`` with ``shape`` made from ``q.shape``): where its token
    size is among the view's sizes and the shape it gives, else None."""
    sizes = _view_sizes(u, node)
    dst = shape_of(u)
    if sizes is not None and dst is None and all(isinstance(s, int) for s in sizes):
        try:
            dst = tuple(val.reshape(sizes).shape)
        except RuntimeError:
            return None
    if sizes is None or dst is None or len(dst) != len(sizes) or list(dst).count(size) != 1:
        return None
    t, j = list(val.shape).index(size), list(dst).index(size)
    if any(d != 1 for d in val.shape[:t]) or any(not isinstance(s, int) or s != 1 for s in sizes[:j]) \
            or math.prod(val.shape[t + 1:]) != math.prod(dst[j + 1:]):
        return None
    return j, dst


def _views_from_the_table(graph: fx.Graph, views: list):
    """The views :func:`_lined_up` followed read the token size from the table they view (the
    full one: the block read it from its tokens, a subset's in a program), so they shape it as
    the block does the full input's; the size queries they read no more are dropped."""
    for u, j, t in views:
        sizes = _view_sizes(u, u.args[0])
        with graph.inserting_before(u):
            sizes[j] = graph.call_method("size", (u.args[0], t))
        old = set(u.all_input_nodes)
        listed = len(u.args) == 2 and isinstance(u.args[1], (list, tuple))
        u.args = (u.args[0], sizes) if listed else (u.args[0], *sizes)
        todo = [n for n in old if not n.users and _is_size_value(n)]
        while todo:
            n = todo.pop()
            inputs = n.all_input_nodes
            graph.erase_node(n)
            todo += [i for i in inputs if not i.users and _is_size_value(i)]


def _refuse_unfollowed_view(a: BlockAnalysis, name: str, node: fx.Node):
    """A table the block shapes for one image (``view(1, ...)``) by a view :func:`_lined_up`
    cannot follow would be gathered for each image before it, and viewed for one: refused,
    naming the view and why (a raw shape error until audit H2 of the forty-fourth session)."""
    u = _value_users(node)[0] if len(_value_users(node)) == 1 else None
    sizes = _view_sizes(u, node) if u is not None else None
    if sizes and isinstance(sizes[0], int) and sizes[0] == 1:
        raise AnalysisError(a.name, f"its argument `{name}` {a.extra_shapes.get(name)} is shaped "
                                    f"for one image by `{u.name}` ({_op_name(u)} to "
                                    f"{shape_of(u) or 'sizes it cannot read'}), which does not keep "
                                    "its token dim whole after dims of 1: evoplug gathers such a "
                                    "table for each image's kept tokens where the block shapes it, "
                                    "through views that add dims of 1 before the token dim and "
                                    "regroup the dims after it")


_BROADCASTING = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                 torch.mul, torch.div, torch.where, torch.cat}


def _broadcast_partners(node: fx.Node) -> List[fx.Node]:
    """The tensors ``node`` meets in the element-wise ops (and concatenations) that take it: it
    broadcasts against them from the right (not a module's argument, a key padding mask)."""
    out = []
    for u in node.users:
        if (u.op == "call_function" and u.target in _BROADCASTING) or (
                u.op == "call_method" and u.target in ("add", "sub", "mul", "div", "masked_fill", "where")):
            out += [v for v in u.all_input_nodes if v is not node]
    return out


def _whole_token_args(rw: _Rewrite):
    """A per-token argument without a batch dim that the block lines up with its tokens itself
    (MLCD's rotary ``cos`` (N, d): ``cos.unsqueeze(0) ... .unsqueeze(-2)`` against queries
    (B, N, heads, d); a rotary table viewed for one image, ``cos.view(1, 1, n, -1)``) is handed
    to the program whole and gathered where it is lined up, to (B, ..., n, ...): a gathered
    (B, n, d) handed in would not line up (the block adds its own leading dim). So is a table of
    the patch tokens only (M = N - P - S rows, rope-vit's ``freqs_cis`` lined up with
    ``q[:, :, 1:]``) that the block lines up, gathered at the subset's patch tokens. The runtime
    leaves these arguments to the program (``a.whole_args``). Decided on the calibration shapes
    (``a.extra_shapes``: a program built later, per batch size, has no calibration call), the
    line-up replayed on meta tensors."""
    a, graph = rw.a, rw.graph
    a.whole_args = tuple(rw.lined)
    if a.windowed or not a.plan.tensor_args:
        return
    N, M = a.num_tokens, a.num_tokens - a.num_prefix - a.num_suffix
    holders = [n for n in graph.nodes if n.op == "placeholder"][1:1 + len(a.plan.tensor_args)]
    whole = []
    for name, node in zip(a.plan.tensor_args, holders):
        shape = a.extra_shapes[name]
        val = torch.empty(shape, device="meta")
        size = N if list(shape).count(N) == 1 else M if M < N and list(shape).count(M) == 1 else None
        if size is None or val.shape[0] not in (size, 1) \
                or name in rw.site.arg_terms or name in rw.lined:
            continue
        node, val, views = _lined_up(node, val, size)
        _refuse_unfollowed_view(a, name, node)
        if size == M and val.dim() == len(shape) and not views:
            continue     # (a patch table the block does not line up: gathered before, as EVA's)
        # (a shared table (1, N, d) only where the block adds dims to it: ``cos[:, None]`` against
        # (B, heads, N, d) was gathered to (B, 1, n, d) and came out rank 5, refused at any
        # calibration; audit Q5 of the twenty-eighth session. A table lined up with its token dim
        # first, (N, 1, d) against (B, N, heads, d), and a key mask (N,) made (1, 1, 1, N): the
        # same, audit of the twenty-ninth session)
        # its leading dims up to the rank of what it meets, so its first dim is the batch's:
        # Pixtral's (1, N, d) against (B, heads, N, d) was gathered to (B, n, d), a shape error
        # at two images
        pad = max([len(shape_of(v) or ()) for v in _broadcast_partners(node)] + [val.dim()]) - val.dim()
        val = val[(None,) * pad]
        if val.dim() < 2 or val.shape[0] != 1 or list(val.shape).count(size) != 1:
            continue
        _views_from_the_table(graph, views)
        _gather_lined_up(rw, node, pad, list(val.shape).index(size), size < N)
        whole.append(name)
        _describe(a, f"argument `{name}` {shape} -> gathered by token index",
                  f"argument `{name}` {shape} -> gathered where the block "
                  f"lines it up with the tokens (`{node.name}`)")
    a.whole_args += tuple(whole)


def _gather_lined_up(rw: _Rewrite, node: fx.Node, pad: int, dim: int, patches: bool):
    """``node`` (a table as the block lines it up, ``pad`` leading dims short of what it meets)
    gathered image by image on its token dim ``dim``, for all its users: at the subset's tokens,
    or at its patch tokens (``patches``: a table of the patch tokens only)."""
    graph = rw.graph
    users, lined = list(node.users), node
    after = node if node.op != "placeholder" else [n for n in graph.nodes if n.op == "placeholder"][-1]
    for _ in range(pad):
        with graph.inserting_after(after):
            after = lined = graph.call_method("unsqueeze", (lined, 0))
    pos = rw.pos
    if patches:
        with graph.inserting_after(after):
            after = pos = graph.call_function(ev.patch_positions, (rw.pos, rw.a.num_prefix, rw.a.num_suffix))
    with graph.inserting_after(after):
        gathered = graph.call_function(ev.gather_aligned, (lined, pos, dim))
    for u in users:
        u.replace_input_with(node, gathered)


def _stream_head(rw: _Rewrite):
    """A windowed or map block whose stream passes a token-wise op before its adds (``x =
    n0(x)``): the windows' exact update and the representative token's stream value start from
    ``n0`` of the tokens, not the tokens (the forty-first session (check F2): 0.02-6.8 off)."""
    a, graph = rw.a, rw.graph
    head = [n for n in graph.nodes if n.name in a.stream_head]
    if not head or not (a.windowed or a.token_map):
        return
    path = [head[0].all_input_nodes[0]] + head
    with graph.inserting_before(head[-1].next):
        whole = graph.call_function(ev.first_not_none, (rw.full, rw.token))
        rw.stream_full = graph.call_function(ev.in_evolving_run, (rw.full, clone_path(graph, path, whole)))
        if a.token_map:     # (the head runs on the entry map: the subset's own tokens get theirs)
            rw.stream_in = clone_path(graph, path, rw.token)
    if not a.token_map:
        rw.stream_in = head[-1]


def _map_operations(rw: _Rewrite):
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


_CANVASES = (ev.to_canvas, ev.full_canvas)


def _gather_map_terms(rw: _Rewrite):
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
        _describe(rw.a, None, f"term `{term.name}` on the logits, computed from the queries on "
                              "the map -> the subset's queries on the map, gathered to its pairs")
        term = _sized_on_the_map(graph, term)
        consumers = list(term.users)
        with graph.inserting_after(term):
            gathered = graph.call_function(ev.gather_pair_term, (term, rw.pos))
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


def _to_map(rw: _Rewrite, node: fx.Node, dim):
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
                                       f"its tokens through `{blocker.name}` ({_op_name(blocker)}), "
                                       "which evoplug cannot re-run on its full input (only "
                                       "modules, layout methods, views of every token and ops "
                                       f"that act on each token alone): the {what[1]} would come "
                                       "from the kept tokens and the representative token in "
                                       "place of the others, not from the full map")
    with graph.inserting_before(node):
        if src_full is not None:
            canvas = graph.call_function(ev.full_canvas, (src, src_full, rw.pos))
        else:
            M = rw.a.grid[0] * rw.a.grid[1]
            canvas = graph.call_function(ev.to_canvas, (src, rw.pos, M, dim))
    node.replace_input_with(src, canvas)
    if layout == "seq" and node.op == "call_method":
        # the cut's sizes are the full sequence's (Hiera computes its window count from the
        # token count, which the subset would give): the canvas is always the full sequence
        with graph.inserting_before(node):
            batch = graph.call_method("size", (canvas, 0))
        node.args, node.kwargs = (canvas, batch, *shape_of(node)[1:]), {}


def _from_map(rw: _Rewrite, node: fx.Node, dim, on_stream: bool):
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
            back = graph.call_function(ev.from_stream_map, (node.args[0], rw.pos, tok_dim, layout,
                                                            rw.stream_in, rw.stream_full))
            with graph.inserting_after(back):
                rw.fast_base = graph.call_function(ev.map_fast_base, (node.args[0], back, rw.pos,
                                                                      tok_dim, layout))
        else:
            if a.windowed and not a.token_map and tok_dim == 1 and rw.site.node in ancestors(node):
                path = _branch_to_residual(graph, node, rw.stream_in)
            back, replaced = _subset_tokens(rw, node) if path is None else (None, [])
            if back is None:
                where = None if path is not None else rw.pos
                back = graph.call_function(ev.from_canvas_map, (node.args[0], where, tok_dim, layout))
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


def _reads_the_input(rw: _Rewrite, node: fx.Node, dim) -> bool:
    """``node`` is a (B, H, W, C) -> (B, H * W, C) view of the block's entry map itself."""
    src, shape, entry = node.args[0], shape_of(node), shape_of(rw.root)
    return src is rw.root and rw.root.op == "call_function" and rw.root.target is ev.tokens_to_map \
        and dim == (1, "cl") and shape is not None and entry is not None and len(entry) == 4 \
        and tuple(shape) == (entry[0], entry[1] * entry[2], entry[3])


def _subset_tokens(rw: _Rewrite, node: fx.Node):
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
        raise AnalysisError(a.name, _NOT_TOKEN_WISE.format(blocker.name, _op_name(blocker)))
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
    _describe(a, f"2-D map op at `{node.name}` -> read back at the kept tokens",
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


def _op_name(n: fx.Node) -> str:
    if n.op == "call_module":
        return f"module {type(n.graph.owning_module.get_submodule(n.target)).__name__}"
    if n.op == "call_method":
        return f"method .{n.target}()"
    return f"function {getattr(n.target, '__name__', n.target)}" if n.op == "call_function" else n.op


_MOVES = {"view", "reshape", "permute", "contiguous", "roll", "flatten", "transpose"}
_VALUE_METHODS = {"float", "to", "type_as"}


def _is_move(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target in _MOVES) or (
        n.op == "call_function" and n.target in (torch.nn.functional.pad, torch.roll))


def _token_wise_path(rw: _Rewrite, src: fx.Node) -> Tuple[Optional[list], Optional[fx.Node]]:
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
        sizes = all(_is_size_value(n) or n not in values for n in cur.all_input_nodes if n is not main[0])
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
    """Whether the module ``node`` calls holds a norm with running statistics (BatchNorm)."""
    from torch.nn.modules.batchnorm import _NormBase
    return node.op == "call_module" and any(
        isinstance(m, _NormBase) and m.track_running_stats for m in gm.get_submodule(node.target).modules())


def _can_run_again(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` can run a second time in a forward, on other tokens, without moving
    running statistics twice: ev.without_stat_update takes a module and its one input."""
    return not _running_stats(gm, node) or (len(node.args) == 1 and not node.kwargs)


def _run_again(graph: fx.Graph, node: fx.Node, anchor: fx.Node, arg: fx.Node,
               old: Optional[fx.Node] = None) -> fx.Node:
    """A copy of ``node`` run on ``arg`` in place of its input ``old`` (its first), after
    ``anchor``: a BatchNorm's copy leaves the running statistics to the original's run (train
    mode)."""
    old = node.all_input_nodes[0] if old is None else old
    if _running_stats(graph.owning_module, node):
        with graph.inserting_after(anchor):
            module = graph.get_attr(node.target)
        with graph.inserting_after(module):
            return graph.call_function(ev.without_stat_update, (module, arg))
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


def _drop_size_only(graph: fx.Graph, modules: list, rw: _Rewrite):
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


_INT_OPS = (operator.getitem, operator.mul, operator.add, operator.sub, operator.floordiv,
            operator.mod, operator.neg)


def _is_size_value(n: fx.Node) -> bool:
    """An int computed from sizes only (window counts, padding amounts)."""
    if is_size_query(n):
        return True
    return n.op == "call_function" and n.target in _INT_OPS and all(
        _is_size_value(a) for a in n.all_input_nodes)


def _erase_unused(graph: fx.Graph, node: fx.Node, root: fx.Node):
    """Drop ``node`` and the ops feeding only it, up to ``root``, once nothing reads it (the
    map-side twin of ops re-run on the subset)."""
    while isinstance(node, fx.Node) and node is not root and not node.users and node.op in (
            "call_module", "call_method", "call_function"):
        inputs = node.all_input_nodes
        graph.erase_node(node)
        node = inputs[0] if len(inputs) == 1 else None


def _describe(a: BlockAnalysis, old: Optional[str], new: str):
    """What explain() lists for the block: ``old`` replaced by ``new`` (or ``new`` added once;
    the train- and eval-mode programs are built from the same analysis)."""
    terms = a.position_terms
    if old in terms:
        terms[terms.index(old)] = new
    elif new not in terms:
        terms.append(new)


def _subset_sizes(rw: _Rewrite, back: fx.Node, tok_dim: int):
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


def _argument_reaches(a: BlockAnalysis, node) -> bool:
    """Whether a tensor argument of the block other than the tokens reaches ``node`` (the
    logits, the mask): a padding mask may then arrive, whatever the calibration's held, and by
    any path (timm's ``maybe_add_mask`` is one call, no add)."""
    if not isinstance(node, fx.Node):
        return False
    holders = [n for n in node.graph.nodes if n.op == "placeholder"][1:1 + len(a.plan.tensor_args)]
    up = ancestors(node) | {node}
    return any(h in up for h in holders)


def _global_row(rw: _Rewrite):
    """The global query's attention row over the patch keys, next to the attention."""
    a, graph, site = rw.a, rw.graph, rw.site
    P, cls_query = a.num_prefix, a.global_query == "cls"
    if a.num_suffix and not cls_query:    # the mean query's patches: between the special tokens
        with graph.inserting_after(rw.full):
            P = graph.call_function(ev.patch_span, (a.num_prefix, a.num_suffix, rw.pos))
    with graph.inserting_after(site.node):
        if a.windowed:
            row = _window_row(a, rw.gm, site)
        elif site.kind == "softmax":
            extra = _images_if_heads_merged(rw)
            flags = {"masked": True} if a.row_masked else {}
            if not _argument_reaches(a, site.logits):    # no mask among the block's arguments
                flags["padded"] = False
            row = graph.call_function(ev.probs_query_row, (site.node, P) + extra) if cls_query else \
                graph.call_function(ev.logits_query_row, (site.logits, P) + extra, flags)
        elif site.kind == "sdpa":
            mask = sdpa_arg(site.node, 3, "attn_mask")
            flags = {"masked": True} if a.row_masked and not cls_query else {}
            if not _argument_reaches(a, mask):
                flags["padded"] = False
            row = graph.call_function(ev.sdpa_query_row, (site.q, site.k, mask, site.scale, P,
                                                          cls_query) + _images_if_heads_merged(rw),
                                      flags)
        else:
            row = _mha_row(rw, P, cls_query)
    if a.kv_grid is not None and row is not None:   # keys are regions of the reduced map
        row = _upsampled(a, rw.gm, row)
    rw.row = row


def _mha_arg(node: fx.Node, index: int, name: str):
    return node.kwargs.get(name, node.args[index] if len(node.args) > index else None)


def _mha_row(rw: _Rewrite, P, cls_query: bool) -> fx.Node:
    """nn.MultiheadAttention's global row, with its masks as the module takes them; an
    ``attn_mask`` gathered for the subset ((B, 1, n, n), :func:`ev.gather_pair_bias`) goes to
    the module as (B * heads, n, n)."""
    graph, site = rw.graph, rw.site
    mha_module = module_of(rw.gm, site.node)
    mask = _mha_arg(site.node, 5, "attn_mask")
    if isinstance(mask, fx.Node):
        with graph.inserting_before(site.node):
            mask = graph.call_function(ev.mha_attn_mask, (mask, mha_module.num_heads))
        if "attn_mask" in site.node.kwargs:
            site.node.update_kwarg("attn_mask", mask)
        else:
            site.node.update_arg(5, mask)
    with graph.inserting_before(site.node):
        mha = graph.get_attr(site.node.target)
    flags = {"masked": True} if rw.a.row_masked and not cls_query else {}
    return graph.call_function(ev.mha_query_row, (mha, site.q, site.k, mask, P, cls_query,
                                                  _mha_arg(site.node, 3, "key_padding_mask")), flags)


def _constant_buffer(a: BlockAnalysis, gm: fx.GraphModule, name: str, value: torch.Tensor):
    """A constant the program reads (a non-persistent buffer: no checkpoint holds it), on the
    graph module and on the block (the program runs with the block as self)."""
    if not hasattr(a.module, name):
        a.module.register_buffer(name, value, persistent=False)
    gm.register_buffer(name, value, persistent=False)


def _upsampled(a: BlockAnalysis, gm: fx.GraphModule, row: fx.Node) -> fx.Node:
    """The row over the reduced map's keys spread onto the tokens (:func:`ev.upsample_row`),
    with its bilinear taps made once here as buffers."""
    graph = gm.graph
    try:
        device = next(t.device for t in list(a.module.parameters()) + list(a.module.buffers()))
    except StopIteration:
        device = None
    names = []
    for side, (size_in, size_out) in enumerate(zip(a.kv_grid, a.grid)):
        taps = ev.upsample_taps(size_in, size_out, device)
        if side == 0:
            taps = (taps[0], taps[1], taps[2].unsqueeze(1))    # rows: weights (h, 1)
        for part, t in zip(("first", "second", "weight"), taps):
            name = f"_evo_upsample_{'hw'[side]}_{part}"
            _constant_buffer(a, gm, name, t)
            names.append(name)
    with graph.inserting_before(row):
        nodes = [graph.get_attr(n) for n in names]
    with graph.inserting_after(row):
        taps = (tuple(nodes[:3]), tuple(nodes[3:]))
        return graph.call_function(ev.upsample_row, (row, a.kv_grid, a.grid, taps))


def _images_if_heads_merged(rw: _Rewrite) -> tuple:
    """``(batch size node,)`` where the attention merges the heads into the batch dim
    ((B * heads, N, d), timm's SAM), else ``()``."""
    q, token = shape_of(rw.site.q), shape_of(rw.token)
    if q is None or token is None or q[0] == token[0]:
        return ()
    rw.a.heads_in_batch = True
    _check_batch_outer(rw, q[0], token[0])
    graph = rw.graph
    with graph.inserting_before(rw.site.node):
        return (graph.call_method("size", (rw.root, 0)),)


def _check_batch_outer(rw: _Rewrite, merged: int, images: int):
    """Heads merged into the batch dim are read with the batch outer ((B * heads, N, d), as
    torch's MultiheadAttention merges them): a merge with the heads outer (``q.transpose(0, 1)
    .reshape(heads * B, N, d)``) ranked each image by other images' rows, silently (audit Q4 of
    the twenty-eighth session), and is refused. Found at the reshape that merges the two dims
    on the queries' way (the calibration's batch tells them apart)."""
    heads, n = merged // images, rw.site.q
    for _ in range(32):
        src = next((a for a in n.all_input_nodes if (shape_of(a) or (0,))[0] == merged), None) \
            if not is_reshape(n) else n.args[0]
        if is_reshape(n):
            dims = shape_of(src) if isinstance(src, fx.Node) else None
            if dims is not None and len(dims) >= 2 and dims[0] * dims[1] == merged and \
                    dims[:2] == (heads, images) and heads != images:
                raise AnalysisError(rw.a.name, f"its attention merges the heads into the batch dim "
                                               f"with the heads outer (`{n.name}`: {tuple(dims)} -> "
                                               f"heads * batch); evoplug reads such a merge with "
                                               f"the batch outer (batch * heads, as torch's "
                                               f"MultiheadAttention merges them)")
            if dims is None or dims[0] != merged:
                return
        if src is None or not isinstance(src, fx.Node):
            return
        n = src


def _skip_fast_base(rw: _Rewrite):
    """A block whose skip path is not the identity (rewrite/skip_path.py): the fast update
    starts from every token's own skip path, ``S(x_j) + r_after - S(r_before)``."""
    a, graph = rw.a, rw.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    result = out_node.args[0]
    scaled = [b.skip for b in a.branches if b.skip]
    if a.token_map or not isinstance(result, fx.Node):
        path = None
    else:
        path = skip_path(rw.gm, rw.token, result, a.stream_head)
        path = None if path is None or is_identity(rw.gm, path) else path
    if path is not None and rw.fast_base is not None and not scaled and \
            all(is_add(n) or n.name in a.stream_head for n in path[1:]):
        return      # (windows run on every token: their update starts from the head, _stream_head)
    if (a.token_map or a.windowed or rw.fast_base is not None) and (scaled or path is not None):
        ops = scaled or [n.name for n in path[1:] if not is_add(n)]
        raise AnalysisError(a.name, "its residual stream is scaled or passes a token-wise op on "
                                    "its way (`" + "`, `".join(ops) + "`), which evoplug does "
                                    "not combine with a map block or windowed attention")
    if path is None:
        return
    with graph.inserting_before(out_node):
        z = graph.call_function(ev.first_not_none, (rw.full, rw.token))
        rep = graph.call_function(operator.getitem, (rw.token, (slice(None), slice(-1, None))))
        s_full, s_rep = clone_path(graph, path, z), clone_path(graph, path, rep)
        rw.fast_base = graph.call_function(ev.skip_fast_base, (s_full, s_rep, rw.pos, rw.full))


def _outputs(rw: _Rewrite):
    """The program returns (tokens, row), and the fast-update base where there is one; a block
    that returns a tuple adds the tuple's other items as a fourth (see BlockSpec.returns), one
    whose forward sets tensors on itself what it sets as a fifth (:func:`_set_by_forward`)."""
    a, graph = rw.a, rw.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    result = out_node.args[0]
    if not isinstance(result, fx.Node):
        raise AnalysisError(a.name, f"block returns {type(result).__name__}, not one token tensor")
    if a.token_map and rw.fast_base is None and not rw.stream_is_input:
        raise AnalysisError(a.name, "its residual stream never becomes tokens (no (B, H, W, C) -> "
                                    "(B, N, C) view of it): nothing would run on fewer tokens")
    rest = out_node.meta.get("evo_rest")
    writes = _set_by_forward(rw)
    if writes:               # what the forward sets on the block, as the program made it
        out_node.args = ((result, rw.row, rw.fast_base, tuple(rest or ()), writes),)
    elif rest is not None:   # a tuple-returning block: its other items, as the program made them
        out_node.args = ((result, rw.row, rw.fast_base, tuple(rest)),)
    elif rw.fast_base is not None or a.token_map:
        out_node.args = ((result, rw.row, rw.fast_base),)
    else:
        out_node.args = ((result, rw.row),)


def _set_by_forward(rw: _Rewrite) -> tuple:
    """The tensors the block's forward sets on itself or a module it traced into (analyse/
    trace.py ``set_by_forward``: ``self.attn_map = attn.detach()``), as (module path, name,
    value) for the block to set from what its program computed (runtime/block.py); values of
    another kind (a size) are the calibration's (BlockSpec.writes). Those computed from the
    block's arguments are named in ``a.state_from_tokens``: an evolving block holds them for
    the tokens it ran (audit H4 of the forty-fourth session: the programs set nothing, and the
    attribute kept a batch from before the conversion)."""
    writes = []
    for n in [n for n in rw.graph.nodes if n.op == "call_function" and n.target is set_by_forward]:
        path, name, value = n.args
        rw.graph.erase_node(n)
        kind = value.meta.get("type")
        if kind is not None and not issubclass(kind, torch.Tensor):
            continue
        writes.append((path, name, value))
        if any(v.op == "placeholder" for v in ancestors(value) | {value}):
            where = f"{path}.{name}" if path else name
            rw.a.state_from_tokens = tuple(dict.fromkeys(rw.a.state_from_tokens + (where,)))
    return tuple(writes)


def batch_program_factory(a: BlockAnalysis, orig_class: type) -> Callable:
    """What the runtime calls, ``factory(training, args, kwargs)``, for the program of a block
    whose trace specialised a value on the batch size, at a batch size it has not seen: the
    call's own arguments are the calibration input."""
    return functools.partial(_program_for_batch, a, orig_class)


def _program_for_batch(a: BlockAnalysis, orig_class: type, training: bool, args, kwargs) -> Callable:
    detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
    call = ModuleCall(a.name, -1, tuple(map(detach, args)), {k: detach(v) for k, v in kwargs.items()})
    return build_program(a, training, call=call, root=stand_in(a.module, orig_class))


def stand_in(module: nn.Module, cls: type) -> nn.Module:
    """An instance of ``cls`` that shares ``module``'s attribute dict: the same parameters,
    buffers and submodules, seen through the original class (to trace its forward without
    changing the converted block other threads may be running)."""
    twin = object.__new__(cls)
    twin.__dict__ = module.__dict__
    return twin


def _as_program(a: BlockAnalysis, gm: fx.GraphModule) -> Callable:
    """The program as a plain function compiled from its own source (imports included), which
    is what a pickled model keeps and compiles again; the same path runs at every conversion.
    A graph that calls something Python cannot import by name keeps fx's function (such a
    model converts and runs, but does not pickle)."""
    code = gm.graph.python_code(root_module="self")
    try:
        imports = _format_import_block(code.globals, sys_importer)
    except (ObjNotFoundError, ObjMismatchError):   # a global Python cannot import by name
        return type(gm).forward
    return compile_program(imports + "\n" + code.src)


def _window_row(a: BlockAnalysis, gm: fx.GraphModule, site: AttentionSite):
    """Windowed attention: the mean query's attention in every window (the no-cls global
    query, per window), mapped back to the tokens with the window index found by the analysis;
    None when the windows could not be mapped."""
    if a.window_index is None or site.kind not in ("softmax", "sdpa"):
        return None
    graph = gm.graph
    _constant_buffer(a, gm, "_evo_window_index", a.window_index)
    slots = ev.window_slots(a.window_index, a.num_tokens)     # windows partition the map
    if slots is not None:
        _constant_buffer(a, gm, "_evo_window_slots", slots)
    heads, folded = a.window_head_dims, a.window_heads_folded
    with graph.inserting_after(site.node):
        if site.kind == "softmax":
            per_window = graph.call_function(ev.window_logits_row, (site.logits, heads, folded))
        else:
            mask = sdpa_arg(site.node, 3, "attn_mask")
            per_window = graph.call_function(ev.window_sdpa_row, (site.q, site.k, mask, site.scale,
                                                                  heads, folded))
    with graph.inserting_after(per_window):
        index = graph.get_attr("_evo_window_index")
    last = index
    if slots is not None:
        with graph.inserting_after(index):
            last = graph.get_attr("_evo_window_slots")
    with graph.inserting_after(last):
        return graph.call_function(ev.window_row, (per_window, index, a.num_tokens,
                                                   None if slots is None else last))


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
        sub = graph.call_function(ev.from_canvas, (last, pos, 1))
    add.replace_input_with(last, sub)
    with graph.inserting_after(add):
        return graph.call_function(ev.stream_fast_base, (full, last, add, pos))


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
        whole = prev = graph.call_function(ev.first_not_none, (full, token))   # dense runs: the tokens
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


def _shape_prop_without_side_effects(a: BlockAnalysis, gm: fx.GraphModule, call):
    """Shapes for a new trace, on ``call``'s input, leaving no trace (buffers and the RNG state
    put back); already there when the trace rewrote a map block (analyse/canon.py)."""
    from torch.fx.passes.shape_prop import ShapeProp
    if gm.meta.get("evo_shapes"):
        return
    with no_side_effects(a.module), torch.no_grad():
        ShapeProp(gm).propagate(*a.plan.feed(*a.plan.bind(a.name, call.args, call.kwargs)))


def _check_attrs_resolve(a: BlockAnalysis, gm: fx.GraphModule, training: bool):
    """The program runs with the block as ``self``: every attribute it reads must be the
    block's own (in the program's mode: some modules cache tensors only in eval mode). Tensors
    baked in by tracing are already non-persistent buffers of the block (analysis.trace_block)."""
    was = a.module.training
    a.module.train(training)
    try:
        for n in gm.graph.nodes:
            if n.op not in ("get_attr", "call_module"):
                continue
            try:
                if n.op == "call_module":
                    a.module.get_submodule(n.target)
                else:
                    getattr_path(a.module, n.target)
            except AttributeError:
                raise AnalysisError(a.name, f"traced program reads `{n.target}`, which the block "
                                            "does not have") from None
    finally:
        a.module.train(was)
