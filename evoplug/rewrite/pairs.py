"""Blocks whose residual adds are their parent's, regrouped (see ``runtime/pairs.py``).

A ``ModuleList`` of two modules that ran once each in the calibration, the first one attention
computation and the second none, is such a pair when its parent's traced forward adds each
one's output to its input, one after the other (``x = attn(x) + x; x = ff(x) + x``). The pair
is recognised by what the parent computes with it, not by the classes involved. The parent's
program calls the pair where it called the two parts; it is kept only where it gives exactly
what the parent's own forward gives on the calibration call, in eval and train mode.
"""
from __future__ import annotations

import inspect
import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..analyse.calibrate import ModuleCall
from ..analyse.trace import trace_parent
from ..runtime.pairs import Regrouped, ResidualPairs, regrouped_class, undo_regroup
from .program import _as_program


def regroup_residual_pairs(model: nn.Module, calls: Dict[int, ModuleCall]) -> List[str]:
    """Regroup every such pair of ``model`` in place; returns the regrouped parents' names
    (``undo_regroup`` on each puts them back)."""
    done = []
    for parent_name, pairs in _pairs_by_parent(model, calls).items():
        parent = model.get_submodule(parent_name)
        try:
            if _regroup(parent, calls[id(parent)], pairs):
                done.append(parent_name)
        except Exception:   # noqa: BLE001 - a parent fx cannot trace stays as it is (refused)
            undo_regroup(parent)
    return done


def _pairs_by_parent(model: nn.Module, calls: Dict[int, ModuleCall]) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for name, m in model.named_modules():
        if type(m) is not nn.ModuleList or len(m) != 2 or id(m) in calls or not name:
            continue
        first, second = calls.get(id(m[0])), calls.get(id(m[1]))
        if first is None or second is None or first.n_calls != 1 or second.n_calls != 1:
            continue
        if first.attention_ops != 1 or second.attention_ops != 0 or first.order > second.order:
            continue
        path = name.split(".")
        parent = next((".".join(path[:cut]) for cut in range(len(path) - 1, -1, -1)
                       if id(model.get_submodule(".".join(path[:cut]))) in calls), None)
        if parent is not None and calls[id(model.get_submodule(parent))].n_calls == 1:
            out.setdefault(parent, []).append(name[len(parent) + 1:] if parent else name)
    return out


def _regroup(parent: nn.Module, call: ModuleCall, pairs: List[str]) -> bool:
    signature = inspect.signature(type(parent).forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        return False
    bound = signature.bind(parent, *call.args, **call.kwargs)
    bound.apply_defaults()
    args = dict(list(bound.arguments.items())[1:])
    tensors = tuple(n for n, v in args.items() if isinstance(v, torch.Tensor))
    fixed = {n: v for n, v in args.items() if n not in tensors}
    if not all(isinstance(v, (bool, int, float, str, type(None))) for v in fixed.values()):
        return False
    programs, found = {}, None
    for training in (False, True):
        gm = trace_parent(parent, fixed, training)
        regrouped = _regroup_graph(gm, pairs)
        if not regrouped or (found is not None and regrouped != found):
            return False
        found = regrouped
        programs[training] = _as_program(None, gm)
    with torch.no_grad():
        want = _run(parent, lambda: type(parent).forward(parent, *call.args, **call.kwargs))
        parent.__dict__["_evoplug_regrouped"] = Regrouped(programs, type(parent), found, tensors,
                                                          fixed, parent)
        parent.__class__ = regrouped_class(type(parent))
        for pair in found:
            parent.get_submodule(pair).__class__ = ResidualPairs
        got = _run(parent, lambda: parent(*call.args, **call.kwargs))
    if not _equal(want, got):
        undo_regroup(parent)
        return False
    return True


def _regroup_graph(gm: fx.GraphModule, pairs: List[str]) -> Tuple[str, ...]:
    """Replace each pair's two residual adds in the parent's graph by one call of the pair;
    the pairs regrouped (all of them, or none: a pair the parent does not use so is left)."""
    graph, done = gm.graph, []
    for pair in pairs:
        first = _only_call(graph, f"{pair}.0")
        second = _only_call(graph, f"{pair}.1")
        if first is None or second is None:
            return ()
        x = first.args[0] if len(first.args) == 1 and not first.kwargs else None
        mid = _residual_add(first, x)
        if mid is None or second.args != (mid,) or second.kwargs:
            return ()
        out = _residual_add(second, mid)
        if out is None or set(mid.users) != {second, out}:
            return ()
        with graph.inserting_before(first):
            whole = graph.call_module(pair, (x,))
        out.replace_all_uses_with(whole)
        for n in (out, second, mid, first):
            graph.erase_node(n)
        done.append(pair)
    graph.lint()
    gm.recompile()
    return tuple(done)


def _only_call(graph: fx.Graph, target: str) -> Optional[fx.Node]:
    found = [n for n in graph.nodes if n.op == "call_module" and n.target == target]
    return found[0] if len(found) == 1 else None


def _residual_add(branch: fx.Node, x) -> Optional[fx.Node]:
    """``branch + x`` (or ``x + branch``), the branch's only use."""
    if not isinstance(x, fx.Node) or len(branch.users) != 1:
        return None
    add = next(iter(branch.users))
    if add.op != "call_function" or add.target not in (operator.add, torch.add) or add.kwargs:
        return None
    return add if set(add.args) == {branch, x} and len(add.args) == 2 else None


def _run(parent: nn.Module, fn):
    was = parent.training
    parent.eval()
    try:
        return fn()
    finally:
        parent.train(was)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a is b or a == b
