"""The skip path of a block: what its output takes from its input with every branch left out.

A token that is not run gets the representative token's residual over the skip path:
``S(x_j) + r_after - S(r_before)``, which is exact where every branch gives each token the
same output. For a pre-norm block ``S`` is the identity, and this is the paper's
``x_j + r_after - r_before``; with the stream scaled on its way (MetaFormer's ResScale
``s * x + f(norm(x))``, a sum scaled after an add, a constant) ``S`` scales it. ``S`` is read
from the graph: the paths from the block's input to its output through residual adds (the
branches left out), subtractions, scalings by a number or a tensor that scales each position
alike, leaf modules computing ``x * parameter`` and ops that keep the values; before the first
add, also a norm or a function that takes the whole stream (audit A4 of the fortieth session).
Where no such path reaches the output (a post-norm block: a norm on the stream after an add)
the paper's rule stands.

Audit N of the thirty-fourth session: the first version took the scales of the adds' skips
only, so a constant before or after them, a scaled residual sum and an add whose skip is the
block's input past another add were left out (0.08-0.38 off the rule)."""
from __future__ import annotations

import operator
from typing import Collection, List, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from ..analyse.graph import is_add
from ..analyse.residual import is_call, scales
from ..runtime.gather import without_stat_update, without_state_update
from .context import keeps_state

_SUBS = {operator.sub, operator.isub, torch.sub}
_SAME_VALUES = {"contiguous", "clone", "float", "to", "type_as"}


def _passes(gm: fx.GraphModule, u: fx.Node, v: fx.Node, token: fx.Node) -> bool:
    """``u`` passes ``v`` on along the skip path (linearly, each position alike)."""
    if is_add(u) or is_call(u, _SUBS, "sub"):    # (``torch.add(a, b, alpha=k)``: a + k * b)
        return v in u.args[:2] and len(u.args) == 2 and set(u.kwargs) <= {"alpha"} and \
            isinstance(u.kwargs.get("alpha", 1), (int, float))
    if len(u.args) < 1 or u.kwargs and not (u.op == "call_method" and u.target in _SAME_VALUES):
        return False
    if scales(gm, u, v, token):
        return True
    if u.op == "call_module" and u.args[0] is v and u.all_input_nodes == [v]:
        return isinstance(gm.get_submodule(u.target), nn.Identity)
    return u.op == "call_method" and u.target in _SAME_VALUES and u.args[0] is v


def skip_path(gm: fx.GraphModule, token: fx.Node, result: fx.Node,
              head: Collection[str]) -> Optional[List[fx.Node]]:
    """The nodes on the skip paths from ``token`` to ``result``, in graph order; None where
    none reaches it. Before the first add (``first``: the input and what passes it on whole),
    the stream may also go through a norm or a function of it alone, ``head``: the names the
    analysis found (BlockAnalysis.stream_head). ``x = n0(x); x = x + attn(n1(x))`` has ``S =
    n0``, exact where the branches give every token the same output, as a scale is. (Until
    the forty-first session (check F2) they were found again here, as the tokens' only
    reader: the rewrite's own re-run of a map on the full input reads them too, so PVT's and
    Twins' reduced-key blocks took the paper's rule, 4-8 off.)"""
    reach, first, whole = {token}, {token}, set()
    for n in gm.graph.nodes:        # (graph order is a topological order)
        if n is token:
            continue
        if any(v in reach and _passes(gm, n, v, token) for v in n.all_input_nodes):
            reach.add(n)
            if any(v in first for v in n.all_input_nodes) and not (is_add(n) or is_call(n, _SUBS, "sub")):
                first.add(n)
        elif n.name in head and n.all_input_nodes[0] in first:
            reach.add(n)
            first.add(n)
            whole.add(n)
    if result not in reach:
        return None
    on = {result}
    for n in reversed(list(gm.graph.nodes)):
        if n in reach and any(u in on and (u in whole or _passes(gm, u, n, token)) for u in n.users):
            on.add(n)
    return [n for n in gm.graph.nodes if n in on]


def _running_stats(gm: fx.GraphModule, target: str) -> bool:
    return any(isinstance(m, _NormBase) and m.track_running_stats for m in gm.get_submodule(target).modules())


def is_identity(gm: fx.GraphModule, path: List[fx.Node]) -> bool:
    """The skip path passes the input on unchanged: one path, through adds and ops that keep
    the values (a Dropout or Identity module on it passes the values in eval mode)."""
    on = set(path)
    for n in path[1:]:
        if is_add(n):
            if sum(isinstance(a, fx.Node) and a in on for a in n.args[:2]) != 1 or \
                    (n.args[1] in on and n.kwargs.get("alpha", 1) != 1):
                return False
        elif not (n.op == "call_method" and n.target in _SAME_VALUES or
                  n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Identity)):
            return False
    return True


def clone_path(graph: fx.Graph, path: List[fx.Node], z: fx.Node) -> fx.Node:
    """``S(z)``: the skip path's ops on ``z`` in place of the block's input, every branch left
    out (an add of a branch passes its other side on; a subtraction of the stream negates it).
    Inserted where the graph's insertion point is."""
    on, done = set(path), {path[0]: z}
    for n in path[1:]:
        if is_add(n) or is_call(n, _SUBS, "sub"):
            a, b = (done.get(v) if isinstance(v, fx.Node) and v in on else None for v in n.args[:2])
            sub, alpha = not is_add(n), n.kwargs.get("alpha", 1)
            if b is not None and alpha != 1:
                b = graph.call_function(operator.mul, (b, alpha))
            if a is not None and b is not None:
                done[n] = graph.call_function(operator.sub if sub else operator.add, (a, b))
            elif a is not None:
                done[n] = a
            else:
                done[n] = graph.call_function(operator.neg, (b,)) if sub else b
        elif n.op == "call_module" and (keeps_state(graph.owning_module, n.target) or
                                        _running_stats(graph.owning_module, n.target)):
            # (a BatchNorm's running statistics, or a counter, move once, in the block's own
            # run of it: audit J1 of the forty-fifth session)
            module = graph.get_attr(n.target)
            run = without_state_update if keeps_state(graph.owning_module, n.target) else \
                without_stat_update
            done[n] = graph.call_function(run, (module, done[n.args[0]]))
        elif n.op == "call_module":
            done[n] = graph.call_module(n.target, (done[n.args[0]],))
        else:
            args = fx.map_arg(n.args, lambda v: done.get(v, v) if v in on else v)
            fn = graph.call_method if n.op == "call_method" else graph.call_function
            target = n.target.rstrip("_") if n.op == "call_method" and n.target.endswith("_") else n.target
            target = {operator.imul: operator.mul, operator.itruediv: operator.truediv}.get(target, target)
            done[n] = fn(target, args, dict(n.kwargs))
    return done[path[-1]]
