"""The attention site of a block, recognised by what it computes: ``softmax`` over ``q @ k^T``,
``scaled_dot_product_attention`` or an ``nn.MultiheadAttention`` call, never by class name; and
the additive terms on its logits (position biases, masks, block arguments)."""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import AnalysisError
from .graph import (ancestors, input_dependent, is_add, is_matmul, is_reshape, is_size_query,
                    is_softmax, module_of, shape_of, value_dependent)


@dataclasses.dataclass
class AttentionSite:
    kind: str                          # 'softmax' | 'sdpa' | 'mha'
    node: fx.Node                      # softmax / sdpa / mha call
    logits: Optional[fx.Node] = None   # softmax input
    q: Optional[fx.Node] = None
    k: Optional[fx.Node] = None
    mask: Optional[fx.Node] = None     # sdpa attn_mask / mha attn_mask
    scale: Any = None
    biases: List[fx.Node] = dataclasses.field(default_factory=list)   # token-independent terms
    arg_terms: List[str] = dataclasses.field(default_factory=list)    # placeholders feeding logits
    lined_terms: List[Tuple[fx.Node, str]] = dataclasses.field(default_factory=list)
    #                                    block arguments the block lines up with the logits
    #                                    itself (``bias.unsqueeze(0)``): (lined-up node, name)


def sdpa_arg(n: fx.Node, idx: int, name: str, default=None):
    if name in n.kwargs:
        return n.kwargs[name]
    return n.args[idx] if len(n.args) > idx else default


def _logit_terms(start, dep: Set[fx.Node]) -> Tuple[List[fx.Node], List[str], list]:
    """Walk an add-chain feeding the logits: token-independent operands are position terms;
    placeholders other than the tokens are block arguments feeding the logits, as they are or
    lined up with them by the block (:func:`_lined_up_argument`)."""
    biases, args, lined, todo, seen = [], [], [], [start], set()
    while todo:
        cur = todo.pop()
        if not isinstance(cur, fx.Node) or cur in seen:
            continue
        seen.add(cur)
        if cur.op == "placeholder":
            args.append(cur.target)
        elif (name := _lined_up_argument(cur)) is not None:
            lined.append((cur, name))
        elif cur not in dep and cur.op != "placeholder":
            biases.append(cur)
        elif is_add(cur):
            todo.extend(a for a in cur.args[:2] if isinstance(a, fx.Node))
        elif _cast_of(cur) is not None:
            # a dtype cast between the terms and the softmax (``a.float().softmax(-1)``, the
            # upcast many codebases write: its position term was refused as not equivariant
            # until audit A1 of the fortieth session)
            todo.append(_cast_of(cur))
        elif _masked_fill(cur) and isinstance(cur.args[1], fx.Node):
            # logits.masked_fill(mask, -inf) with a mask of the positions (a local window as a
            # bool buffer): the mask is a term of the pairs like an additive one (it was refused
            # as not equivariant, while the same mask as a 0/-inf buffer converted)
            todo.extend((cur.args[0], cur.args[1]))
    return biases, args, lined


def _lined_up_argument(n: fx.Node) -> Optional[str]:
    """The block argument (not the tokens) that ``n`` is made of by unit dims added to it alone
    (``rel_pos_bias.unsqueeze(0)``, ``bias[None]``), views and broadcasts of it by sizes
    (``bias.view(1, heads, N, N)``, ``.reshape``, ``.expand(B, -1, -1, -1)``) and casts, each
    read once (but for its sizes). Such a term is gathered where the block has lined it up
    (rewrite/positions.py): gathered before, a shared (heads, N, N) came out (B, heads, n, n) and
    the block's own ``unsqueeze(0)`` made it rank 5, an internal error or a silently mixed order
    (audit A1 of the fortieth session); lined up by ``view``, ``reshape`` or ``expand`` it was
    refused with a raw shape error as the reason until the forty-first session."""
    steps = 0
    while n.op != "placeholder":
        base = n.args[0] if n.args else None
        if not isinstance(base, fx.Node) or sum(not is_size_query(u) for u in base.users) != 1 \
                or not (_cast_of(n) is not None or _adds_unit_dims(n) or _shaped_by_sizes(n)):
            return None
        steps += _adds_unit_dims(n) or _shaped_by_sizes(n)
        n = base
    first = next(p for p in n.graph.nodes if p.op == "placeholder")
    return n.target if steps and n is not first else None


def _shaped_by_sizes(n: fx.Node) -> bool:
    """``t.view(...)``, ``t.reshape(...)``, ``torch.reshape(t, ...)``, ``t.expand(...)`` with
    sizes alone (ints, or read from sizes: ``B, n, C = x.shape``), and ``t.contiguous()``."""
    if not ((n.op == "call_method" and n.target in ("view", "reshape", "expand", "contiguous"))
            or n.target is torch.reshape):
        return False
    return _is_size(list(n.args[1:]) + list(n.kwargs.values()))


def _is_size(a) -> bool:
    if isinstance(a, (list, tuple)):
        return all(_is_size(x) for x in a)
    if not isinstance(a, fx.Node):
        return isinstance(a, int)
    return is_size_query(a) or (a.op == "call_function" and a.target in _SIZE_ARITHMETIC
                                and _is_size(list(a.args) + list(a.kwargs.values())))


_SIZE_ARITHMETIC = frozenset({operator.getitem, operator.add, operator.sub, operator.mul,
                              operator.floordiv})


def _adds_unit_dims(n: fx.Node) -> bool:
    """``t.unsqueeze(d)``, ``torch.unsqueeze(t, d)``, ``t[None]`` (an index of only ``None``,
    ``:`` and ``...`` with a ``None``)."""
    if (n.op == "call_method" and n.target == "unsqueeze") or n.target is torch.unsqueeze:
        return not any(isinstance(v, fx.Node) for v in list(n.args[1:]) + list(n.kwargs.values()))
    if n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2:
        index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        return None in index and all(i is None or i is Ellipsis or i == slice(None) for i in index)
    return False


_CASTS = frozenset({"float", "double", "half", "bfloat16", "to", "type", "type_as"})


def _cast_of(n: fx.Node) -> Optional[fx.Node]:
    """The tensor a dtype cast method (``.float()``, ``.to(...)``, ``.type_as(v)``) casts."""
    if n.op == "call_method" and n.target in _CASTS and n.args and isinstance(n.args[0], fx.Node):
        return n.args[0]
    return None


def _masked_fill(n: fx.Node) -> bool:
    return len(n.args) >= 2 and ((n.op == "call_method" and n.target == "masked_fill") or
                                 (n.op == "call_function" and n.target is torch.masked_fill))


def _no_argument_on_merged_pairs(logits: fx.Node, values: Set[fx.Node], name: str):
    """Refuse a block argument added to the logits while the block has their query and key
    dims merged (``(logits.flatten(2) + bias.view(1, heads, n * n)).view(B, heads, n, n)``): a
    term is gathered for the kept tokens on the logits' own (query, key) dims (it was refused
    with a raw shape error as the reason until the forty-first session)."""
    inner = logits.args[0] if is_reshape(logits) and logits.args else None
    shape, before = shape_of(logits), shape_of(inner)
    if shape is None or before is None or tuple(before[-2:]) == tuple(shape[-2:]):
        return
    _, args, lined = _logit_terms(inner, values)
    names = args + [arg for _, arg in lined]
    if names:
        raise AnalysisError(name, f"its argument `{names[0]}` is added to the attention logits with "
                                  f"their query and key dims merged ({tuple(before)} at "
                                  f"`{inner.name}`, made {tuple(shape)} for the softmax): evoplug "
                                  "gathers a term for the kept tokens on the (query, key) dims "
                                  "of the logits and cannot follow one added to them merged")


def _no_functional_mha(graph: fx.Graph, name: str) -> None:
    """``F.multi_head_attention_forward`` called by the block itself (not through an
    ``nn.MultiheadAttention``): fx keeps the call whole, one node with no q.k^T inside, so no
    global row can be read from it. Refused naming the call (it was refused as "no attention
    computation", which the block does run, until audit a4)."""
    for n in graph.nodes:
        if n.op == "call_function" and n.target is F.multi_head_attention_forward:
            raise AnalysisError(name, f"its attention is a call of F.multi_head_attention_forward "
                                      f"(`{n.name}`) with weights of its own: torch.fx keeps the "
                                      "call whole, so evoplug cannot read the attention's queries "
                                      "and keys; hold the weights in an nn.MultiheadAttention and "
                                      "call the module (evoplug reads its row from the module's "
                                      "weights), or compute softmax(q.k^T) or "
                                      "scaled_dot_product_attention in the block")


def find_attention(gm: fx.GraphModule, name: str) -> AttentionSite:
    graph = gm.graph
    dep = input_dependent(graph)
    values = value_dependent(graph)     # the logits' terms: sized from the tokens is no value
    carried = None
    sites: List[AttentionSite] = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
            site = AttentionSite("sdpa", n, q=sdpa_arg(n, 0, "query"), k=sdpa_arg(n, 1, "key"),
                                 mask=sdpa_arg(n, 3, "attn_mask"), scale=sdpa_arg(n, 6, "scale"))
            if sdpa_arg(n, 5, "is_causal", False) is True:
                raise AnalysisError(name, "causal scaled_dot_product_attention: not a vision block")
            if isinstance(site.mask, fx.Node):
                site.biases, site.arg_terms, site.lined_terms = _logit_terms(site.mask, values)
            sites.append(site)
        elif isinstance(module_of(gm, n), nn.MultiheadAttention):
            mask = n.kwargs.get("attn_mask", n.args[5] if len(n.args) > 5 else None)
            site = AttentionSite("mha", n, q=n.args[0] if n.args else n.kwargs.get("query"),
                                 k=n.args[1] if len(n.args) > 1 else n.kwargs.get("key"), mask=mask)
            if isinstance(mask, fx.Node):
                shape = shape_of(mask)
                if shape is not None and len(shape) == 3:
                    raise AnalysisError(name, f"nn.MultiheadAttention `{n.target}` is given a 3-D "
                                              f"attn_mask {tuple(shape)} (one per image and head): "
                                              "evoplug gathers a (N, N) attn_mask and a (B, N) "
                                              "key_padding_mask for the kept tokens")
                site.biases, site.arg_terms, site.lined_terms = _logit_terms(mask, values)
            sites.append(site)
        elif is_softmax(gm, n):
            logits = n.args[0] if n.args else n.kwargs.get("input")
            if not isinstance(logits, fx.Node) or logits not in dep:
                continue
            # softmax(q k^T ...): a matmul of two token-dependent operands upstream of the logits
            # (by their values: a product of the queries with a table sized from the map,
            # transformers' SAM's relative positions after q.k^T, is no q.k^T)
            qk = [a for a in ancestors(logits) | {logits} if is_matmul(a) and
                  sum(isinstance(x, fx.Node) and x in dep for x in a.args) >= 2]
            if len(qk) > 1:
                carried = carried or value_dependent(graph, any_size=True)
                qk = [a for a in qk if sum(isinstance(x, fx.Node) and x in carried
                                           for x in a.args) >= 2] or qk
            if not qk:
                continue
            qk_node = max(qk, key=lambda a: list(graph.nodes).index(a))
            q, k = [x for x in qk_node.args if isinstance(x, fx.Node)][:2]    # (einsum: not its equation)
            site = AttentionSite("softmax", n, logits=logits, q=q, k=k)
            # the logits' additive terms (walk through the q.k^T product's consumers)
            site.biases, site.arg_terms, site.lined_terms = _logit_terms(logits, values)
            _no_argument_on_merged_pairs(logits, values, name)
            sites.append(site)
    if not sites:
        _no_functional_mha(graph, name)
        raise AnalysisError(name, "no attention computation (softmax over q.k^T, "
                                  "scaled_dot_product_attention or nn.MultiheadAttention) in its graph",
                            not_a_block="no attention")
    if len(sites) > 1:
        raise AnalysisError(name, f"{len(sites)} attention computations in one block "
                                  f"({', '.join(s.node.name for s in sites)})")
    return sites[0]


def attention_output(site: AttentionSite) -> Optional[fx.Node]:
    """Where the attention's result leaves it: the fused call, or for an explicit softmax the
    first product with the values downstream of it (after talking heads, dropout, ...)."""
    if site.kind in ("sdpa", "mha"):
        return site.node
    todo, seen = list(site.node.users), set()
    while todo:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if is_matmul(n):
            return n
        todo.extend(n.users)
    return None
