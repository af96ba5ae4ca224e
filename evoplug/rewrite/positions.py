"""Rewrite passes for what must follow the selected tokens into the subset's run: additive
position terms on the attention logits (BEiT's relative position bias, gathered with
``_evo_pos``; a term sized from the token count reads the full input's size), and per-token
arguments the block lines up with its tokens itself (rotary tables, shared position biases),
gathered where the block shapes them, or refused by name where they cannot be followed."""
from __future__ import annotations

import math
import operator
from typing import List, Optional, Tuple

import torch
import torch.fx as fx

from ..analyse.block import BlockAnalysis
from ..analyse.graph import (ancestors, ancestors_with_writes, is_size_query, is_view, shape_of,
                             token_size_queries, token_wise_of, writes_in_place, writes_into)
from ..errors import AnalysisError
from ..runtime.gather import (first_not_none, gather_aligned, gather_pair_bias, patch_positions,
                              sized_as_full)
from .context import Rewrite, describe, is_size_value, op_name, viewed_attribute


def position_terms(rw: Rewrite):
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
        describe(rw.a, f"argument `{name}` {shape} -> gathered by token index",
                 f"argument `{name}` {shape} on the attention logits -> gathered where the block "
                 f"lines it up with them (`{node.name}`)")


def _sized_from_full(rw: Rewrite, term: fx.Node):
    """A term sized from the token count (HF BEiT's bias, ``bias.view(1, heads, n, n)``) is
    sized from the full input instead."""
    sizes = token_size_queries(term, rw.token)
    kept = [w for w in ancestors_with_writes(term) if writes_in_place(w) and set(sizes) & ancestors(w)
            and viewed_attribute(w.args[0]) is not None]
    if kept:     # (a raw "does not run on a token subset" until the forty-fifth session)
        raise AnalysisError(rw.a.name, f"a term on its attention logits writes in place into "
                                       f"`{viewed_attribute(kept[0].args[0]).target}` (`{kept[0].name}`"
                                       ") through a view sized from the token count: the model's "
                                       "table itself changes, at places a token subset cannot "
                                       "follow; write into a copy (`.clone()`) or use masked_fill")
    if sizes:
        last = [n for n in rw.graph.nodes if n.op == "placeholder"][-1]
        with rw.graph.inserting_after(last):
            whole = rw.graph.call_function(first_not_none, (rw.full, rw.token))
        _size_bias_from(rw.graph, term, sizes, whole, rw.token)


def _check_lined_up(rw: Rewrite, node: fx.Node, name: str, heads: tuple):
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


def _gather_term(rw: Rewrite, term: fx.Node, heads: tuple):
    """``term`` (a term on the logits) gathered to the subset's pairs for all its users, after
    the in-place writes into it (``bias[:, 0, :] = 0``: gathered before them, the writes went
    into the gathered pairs until audit H2 of the forty-fourth session), or into a view of it
    (``bias[:, 0].zero_()``, until the forty-fifth session)."""
    writes = writes_into(term)
    consumers = [u for u in term.users if u not in writes and not (is_view(u) and writes_into(u))]
    with rw.graph.inserting_after(max([term] + writes, key=list(rw.graph.nodes).index)):
        gathered = rw.graph.call_function(gather_pair_bias, (term, rw.pos) + heads)
    for u in consumers:
        u.replace_input_with(term, gathered)


def _heads_merged(rw: Rewrite) -> tuple:
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
    reads a stand-in of it with the full input's token count (``sized_as_full``). The
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
                    copies[n].replace_input_with(read, graph.call_function(sized_as_full, (read, whole)))
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
    ``queries``, the in-place writes into them (or views of them), and the tensors such writes
    go into."""
    on = {n for n in path if n in queries or ancestors(n) & queries}
    while True:
        more = {u for n in on for u in writes_into(n) if u in path} | \
            {n.args[0] for n in on if (writes_in_place(n) or is_view(n) and writes_into(n))
             and n.args[0].op not in ("placeholder", "get_attr")}
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
            is_size_value(u) and for_it(u)) for u in n.users)
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
        todo = [n for n in old if not n.users and is_size_value(n)]
        while todo:
            n = todo.pop()
            inputs = n.all_input_nodes
            graph.erase_node(n)
            todo += [i for i in inputs if not i.users and is_size_value(i)]


def _refuse_unfollowed_view(a: BlockAnalysis, name: str, node: fx.Node):
    """A table the block shapes for one image (``view(1, ...)``) by a view :func:`_lined_up`
    cannot follow would be gathered for each image before it, and viewed for one: refused,
    naming the view and why (a raw shape error until audit H2 of the forty-fourth session)."""
    u = _value_users(node)[0] if len(_value_users(node)) == 1 else None
    sizes = _view_sizes(u, node) if u is not None else None
    if sizes and isinstance(sizes[0], int) and sizes[0] == 1:
        raise AnalysisError(a.name, f"its argument `{name}` {a.extra_shapes.get(name)} is shaped "
                                    f"for one image by `{u.name}` ({op_name(u)} to "
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


def whole_token_args(rw: Rewrite):
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
        describe(a, f"argument `{name}` {shape} -> gathered by token index",
                 f"argument `{name}` {shape} -> gathered where the block "
                 f"lines it up with the tokens (`{node.name}`)")
    a.whole_args += tuple(whole)


def _gather_lined_up(rw: Rewrite, node: fx.Node, pad: int, dim: int, patches: bool):
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
            after = pos = graph.call_function(patch_positions, (rw.pos, rw.a.num_prefix, rw.a.num_suffix))
    with graph.inserting_after(after):
        gathered = graph.call_function(gather_aligned, (lined, pos, dim))
    for u in users:
        u.replace_input_with(node, gathered)
