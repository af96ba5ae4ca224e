"""Blocks whose residual adds are their parent's, regrouped (see ``runtime/pairs.py``).

A ``ModuleList`` of two modules that ran once each in the calibration, the first one attention
computation and the second none, is such a pair when its parent's traced forward adds each
one's output to its input, one after the other (``x = attn(x) + x; x = ff(x) + x``). The pair
is recognised by what the parent computes with it, not by the classes involved. The parent's
program calls the pair where it called the two parts; it is kept only where it gives exactly
what the parent's own forward gives on the calibration call, in eval and train mode.
"""
from __future__ import annotations

import dis
import inspect
import operator
import random
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..analyse.calibrate import ModuleCall
from ..analyse.trace import trace_parent
from ..errors import AnalysisError
from ..runtime.pairs import (Regrouped, ResidualPairs, is_plain, plain_attributes, regrouped_class,
                             undo_regroup)
from .program import _as_program


class _NotRegrouped(Exception):
    """Why a parent's pairs were not regrouped (said with the parts' refusal)."""


def regroup_residual_pairs(model: nn.Module, calls: Dict[int, ModuleCall]):
    """Regroup every such pair of ``model`` in place: (the regrouped parents' names, {parent:
    why its pairs were not regrouped}); ``undo_regroup`` on a parent puts it back."""
    done, why = [], {}
    for parent_name, pairs in _pairs_by_parent(model, calls).items():
        parent = model.get_submodule(parent_name)
        try:
            _regroup(parent, calls[id(parent)], pairs)
            done.append(parent_name)
        except Exception as e:   # noqa: BLE001 - the parent stays as it is; its parts are refused
            undo_regroup(parent)
            why[parent_name] = str(e) if isinstance(e, _NotRegrouped) else \
                e.reason if isinstance(e, AnalysisError) else \
                f"its forward does not trace ({type(e).__name__}: {e})"
    return done, why


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


#: names whose use in the parent's forward a traced program would not keep
_NOT_TRACED = ("no_grad", "enable_grad", "set_grad_enabled", "inference_mode", "autocast",
               "checkpoint", "checkpoint_sequential")


def _regroup(parent: nn.Module, call: ModuleCall, pairs: List[str]):
    forward = type(parent).forward
    names, stores = _code_names(forward.__code__)
    signature = inspect.signature(forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        raise _NotRegrouped("its forward takes *args or **kwargs")
    if stores:
        raise _NotRegrouped(f"its forward sets attributes or globals ({', '.join(sorted(stores))}), "
                            "which a traced program would not")
    unkept = sorted(set(names) & set(_NOT_TRACED))
    if unkept:
        raise _NotRegrouped(f"its forward uses {', '.join(unkept)}, which a traced program "
                            "would not keep")
    glob = forward.__globals__
    mutable = sorted(n for n in names if isinstance(glob.get(n), (list, dict, set)))
    if mutable:
        raise _NotRegrouped(f"its forward reads the global container(s) {', '.join(mutable)}, "
                            "which a traced program would hold as they are now")
    bound = signature.bind(parent, *call.args, **call.kwargs)
    bound.apply_defaults()
    args = dict(list(bound.arguments.items())[1:])
    tensors = tuple(n for n, v in args.items() if isinstance(v, torch.Tensor))
    fixed = {n: v for n, v in args.items() if n not in tensors}
    if not all(is_plain(v) for v in fixed.values()):
        raise _NotRegrouped("its forward takes arguments other than tensors and plain values")
    programs, found = {}, None
    for training in (False, True):
        gm = trace_parent(parent, fixed, training)
        regrouped = _regroup_graph(parent, gm, pairs)
        if not regrouped or (found is not None and regrouped != found):
            raise _NotRegrouped("its forward does not add each pair's outputs to their inputs "
                                "(`x = attn(x) + x; x = ff(x) + x`)")
        found = regrouped
        programs[training] = _as_program(None, gm)
    watched = tuple((m, k) for m in parent.modules() if m is not parent for k in names
                    if k in m.__dict__ and is_plain(m.__dict__[k]))
    _install(parent, call, found, Regrouped(programs, type(parent), found, tensors, fixed, parent,
                                            watched))


def _install(parent: nn.Module, call: ModuleCall, found, regroup: Regrouped):
    """Regroup, and check that the parent gives what it gave, in eval and in train mode (the
    same random numbers for both), and changes no attribute of its own in a forward."""
    own = [_run(parent, training, call) for training in (False, True)]
    parent.__dict__["_evoplug_regrouped"] = regroup
    parent.__class__ = regrouped_class(type(parent))
    for pair in found:
        parent.get_submodule(pair).__class__ = ResidualPairs
    if not all(map(_equal, own, [_run(parent, training, call) for training in (False, True)])):
        raise _NotRegrouped("its program with the pairs regrouped does not give what its "
                            "forward gives")


def _code_names(code) -> Tuple[List[str], List[str]]:
    """The names a function's code reads (attributes, globals), its nested functions' too,
    and those it stores as attributes or globals."""
    names, stores = list(code.co_names), []
    for ins in dis.get_instructions(code):
        if ins.opname in ("STORE_ATTR", "DELETE_ATTR", "STORE_GLOBAL", "DELETE_GLOBAL"):
            stores.append(ins.argval)
    for const in code.co_consts:
        if inspect.iscode(const):
            more, more_stores = _code_names(const)
            names += more
            stores += more_stores
    return names, stores


def _regroup_graph(parent: nn.Module, gm: fx.GraphModule, pairs: List[str]) -> Tuple[str, ...]:
    """Replace each pair's two residual adds in the parent's graph by one call of the pair;
    the pairs regrouped (a pair the parent does not use so is left as it is)."""
    graph, done = gm.graph, []
    for pair in pairs:
        first = _only_call(graph, f"{pair}.0")
        second = _only_call(graph, f"{pair}.1")
        if first is None or second is None:
            continue
        x = first.args[0] if _defaults_only(parent.get_submodule(f"{pair}.0"), first) else None
        mid = _residual_add(first, x)
        if mid is None or second.args[:1] != (mid,) or not _defaults_only(
                parent.get_submodule(f"{pair}.1"), second):
            continue
        out = _residual_add(second, mid)
        if out is None or set(mid.users) != {second, out}:
            continue
        with graph.inserting_before(first):
            whole = graph.call_module(pair, (x,))
        out.replace_all_uses_with(whole)
        for n in (out, second, mid, first):
            graph.erase_node(n)
        done.append(pair)
    graph.lint()
    gm.recompile()
    return tuple(done)


def _defaults_only(module: nn.Module, node: fx.Node) -> bool:
    """``node`` calls ``module`` with the stream first and nothing else but what its forward
    takes by default (``attn(x, mask=None)``)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    rest_args, rest = node.args[1:], dict(node.kwargs)
    if not rest_args and not rest:
        return True
    try:
        params = list(inspect.signature(module.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    for p, v in zip(params, rest_args):
        rest[p.name] = v
    defaults = {p.name: p.default for p in params}
    return len(rest_args) <= len(params) and all(
        k in defaults and not isinstance(v, fx.Node) and defaults[k] is not inspect.Parameter.empty
        and (defaults[k] is v or _equal(defaults[k], v)) for k, v in rest.items())


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


def _run(parent: nn.Module, training: bool, call: ModuleCall):
    """The parent's output on its calibration call in that mode, with the random numbers of a
    fixed seed (the mode and the random states restored after); a forward that changes the
    parent's own attributes is refused (the program would not)."""
    import numpy as np
    was, before = parent.training, plain_attributes(parent)
    parent.train(training)
    state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)
            out = parent(*call.args, **call.kwargs)
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
        parent.train(was)
    if plain_attributes(parent) != before:
        raise _NotRegrouped("its forward changes its own attributes, which a traced program "
                            "would not")
    return out


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a is b or a == b
