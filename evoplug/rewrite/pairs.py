"""Blocks whose residual adds are their parent's, regrouped (see ``runtime/pairs.py``).

A ``ModuleList`` of two modules that ran once each in the calibration, the first one attention
computation and the second none, is such a pair when its parent's traced forward adds each
one's output to its input, one after the other (``x = attn(x) + x; x = ff(x) + x``). The pair
is recognised by what the parent computes with it, not by the classes involved. The parent's
program calls the pair where it called the two parts; it is kept only where it gives exactly
what the parent's own forward gives on the calibration call, in eval and train mode.
"""
from __future__ import annotations

import builtins
import dis
import inspect
import operator
import random
import types
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
               "checkpoint", "checkpoint_sequential", "is_grad_enabled", "is_inference_mode_enabled",
               "is_autocast_enabled", "getattr", "setattr", "delattr", "vars", "globals", "eval", "exec",
               "super", "type", "environ", "getenv", "__dict__", "__class__")
#: the packages whose modules, functions and classes the parent's forward may name (their
#: values are not the model's state)
_LIBRARIES = ("torch", "einops", "math", "operator", "functools", "itertools", "numpy", "builtins",
              "typing", "collections")
#: the objects a traced program would not keep, whatever name they are imported as
_GRAD_MODES = (torch.no_grad, torch.enable_grad, torch.set_grad_enabled, torch.inference_mode,
               torch.autocast, torch.is_grad_enabled, torch.utils.checkpoint.checkpoint)


def _regroup(parent: nn.Module, call: ModuleCall, pairs: List[str]):
    forward = type(parent).forward
    signature = inspect.signature(forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        raise _NotRegrouped("its forward takes *args or **kwargs")
    watched = _reads(forward, parent)
    bound = signature.bind(parent, *call.args, **call.kwargs)
    bound.apply_defaults()
    args = dict(list(bound.arguments.items())[1:])
    tensors = tuple(n for n, v in args.items() if isinstance(v, torch.Tensor))
    fixed = {n: v for n, v in args.items() if n not in tensors}
    if not all(isinstance(v, (bool, int, float, str, type(None))) for v in fixed.values()):
        raise _NotRegrouped("its forward takes arguments other than tensors and plain values "
                            "(a list, a tuple: fx traces them as they are)")
    programs, found = {}, None
    for training in (False, True):
        gm = trace_parent(parent, fixed, training)
        regrouped, why = _regroup_graph(parent, gm, pairs)
        if not regrouped or (found is not None and regrouped != found):
            raise _NotRegrouped(why or "its forward regroups other pairs in train mode than in eval mode")
        found = regrouped
        programs[training] = _as_program(None, gm)
    _install(parent, call, found, Regrouped(programs, type(parent), found, tensors, fixed, parent,
                                            watched))


def _reads(forward, parent: nn.Module) -> Tuple[Tuple[nn.Module, str], ...]:
    """What a program of ``forward`` would hold as constants, checked on its code (its own and
    the code it nests): every attribute it reads of the parent is a submodule, a parameter, a
    buffer or a plain value, and what it reads by name of the submodules is theirs as modules or
    a plain value (watched at each call); ``self`` goes nowhere else; every global is a module,
    function or class of a library (torch, einops, math, ...). Else (a decorator, a closure, a
    helper method, property or function of its own, which the trace runs once; an object, a
    global value; attributes set; the gradient mode) it raises :class:`_NotRegrouped`."""
    if not inspect.isfunction(forward) or hasattr(forward, "__wrapped__"):
        raise _NotRegrouped("its forward is no plain function (a decorator, a partial method)")
    code = forward.__code__
    return _function_reads(forward, [parent] + [m for m in parent.modules() if m is not parent],
                           code.co_varnames[0] if code.co_argcount else None)


def _function_reads(fn, modules: List[nn.Module], self_name: Optional[str], depth: int = 0):
    """:func:`_reads` of one function: ``modules`` the parent and its submodules, ``self_name``
    the parent's name in it (None in a function of the model's module it calls, checked the
    same way: lucidrains' ``exists(val)``)."""
    parent, subs, watched = modules[0], modules[1:], []
    forward = fn
    for ins, prev, nested in _instructions(fn.__code__):
        name = ins.argval
        if nested and (ins.opname in ("LOAD_DEREF", "LOAD_CLOSURE", "LOAD_CLASSDEREF")) or \
                ins.opname in ("LOAD_CLOSURE", "MAKE_CELL") and name != "__class__":
            raise _NotRegrouped("its forward defines a function that reads its variables (a "
                                "closure), which the check cannot follow")
        if ins.opname in ("STORE_ATTR", "DELETE_ATTR", "STORE_GLOBAL", "DELETE_GLOBAL"):
            raise _NotRegrouped(f"its forward sets `{name}`, which a traced program would not")
        if prev is not None and prev.opname == "LOAD_FAST" and prev.argval == self_name and \
                ins.opname not in ("LOAD_ATTR", "LOAD_METHOD"):
            raise _NotRegrouped("its forward hands `self` on (to a function, or another name), "
                                "which the check cannot follow")
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            value = forward.__globals__.get(name, getattr(builtins, name, _MISSING))
            if name == "super":
                raise _NotRegrouped("its forward calls super(): the base class's forward, which "
                                    "the check does not follow")
            if name in _NOT_TRACED or any(value is g for g in _GRAD_MODES):
                raise _NotRegrouped(f"its forward uses {name}, which a traced program would not keep")
            if name in forward.__globals__:      # (rebound later, the program would not follow)
                watched.append((forward.__module__, name))
            if inspect.isfunction(value) and not _library(value) and depth < 3 and \
                    value.__closure__ is None and not hasattr(value, "__wrapped__"):
                watched += _function_reads(value, modules, None, depth + 1)
            elif not _library(value):
                raise _NotRegrouped(f"its forward reads the global `{name}` ({type(value).__name__}), "
                                    "which a traced program would run or hold once, as it is now")
        elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD"):
            if name in _NOT_TRACED:
                raise _NotRegrouped(f"its forward uses {name}, which a traced program would not keep")
            on_self = prev is not None and prev.opname == "LOAD_FAST" and prev.argval == self_name
            for m in ([parent] if on_self else [parent] + subs):
                watched += _attribute_read(m, name, on_self, m is parent)
    return tuple(watched)


def _library(value) -> bool:
    """A module, function or class of a library (not of the model's own code)."""
    if value is _MISSING:
        return False
    if inspect.ismodule(value):
        return value.__name__.split(".")[0] in _LIBRARIES
    if inspect.isclass(value) or inspect.isroutine(value):
        module = getattr(value, "__module__", None) or "builtins"
        return module.split(".")[0] in _LIBRARIES
    return False


def _attribute_read(m: nn.Module, name: str, certain: bool, is_parent: bool):
    """[(m, name)] where ``m.name`` is a plain value to watch; [] where it is a module, a
    parameter, a buffer, or (read on another object than ``m``, ``certain`` False) no
    attribute of ``m``'s own; raises where it is code or an object."""
    if name in m._modules or name in m._parameters or name in m._buffers:
        return []
    value = inspect.getattr_static(m, name, _MISSING)
    if value is _MISSING or (not certain and _torch_own(m, name)):
        return []     # (a tensor's or a list's attribute, named as torch's modules': x.to, l.append)
    if is_plain(value):
        return [(m, name)]
    what = "the method or property" if isinstance(value, (property, types.FunctionType,
                                                            staticmethod, classmethod)) else "the object"
    where = "its" if is_parent else f"a submodule's ({type(m).__name__})"
    raise _NotRegrouped(f"its forward reads {where} `{name}`, {what} a traced program would run "
                        "or hold once, as it is now")


_MISSING = object()


def _torch_own(m: nn.Module, name: str) -> bool:
    """Whether ``name`` is an attribute torch's own classes give ``m`` (``to``, ``append``)."""
    owner = next((c for c in type(m).__mro__ if name in vars(c)), None)
    return owner is not None and (owner.__module__ or "").startswith("torch.")


def _instructions(code, nested: bool = False):
    """(instruction, the one before it, whether it is in nested code) of ``code`` and of the
    code it nests."""
    prev = None
    for ins in dis.get_instructions(code):
        yield ins, prev, nested
        prev = ins
    for const in code.co_consts:
        if inspect.iscode(const):
            yield from _instructions(const, True)


def _install(parent: nn.Module, call: ModuleCall, found, regroup: Regrouped):
    """Regroup, and check that the parent gives what it gave, in eval and in train mode (the
    same random numbers for both; its buffers, BatchNorm's running statistics, as they were
    before each run), and changes no attribute of its own in a forward."""
    own = [_run(parent, training, call) for training in (False, True)]
    parent.__dict__["_evoplug_regrouped"] = regroup
    parent.__class__ = regrouped_class(type(parent))
    for pair in found:
        parent.get_submodule(pair).__class__ = ResidualPairs
    if not all(map(_equal, own, [_run(parent, training, call) for training in (False, True)])):
        raise _NotRegrouped("its program with the pairs regrouped does not give what its "
                            "forward gives")


def _regroup_graph(parent: nn.Module, gm: fx.GraphModule, pairs: List[str]):
    """Replace each pair's two residual adds in the parent's graph by one call of the pair:
    (the pairs regrouped, why the first other was not; a pair the parent does not use so is
    left as it is)."""
    graph, done, why = gm.graph, [], []
    for pair in pairs:
        first = _only_call(graph, f"{pair}.0")
        second = _only_call(graph, f"{pair}.1")
        if first is None or second is None:
            why.append(f"it does not call `{pair}.0` and `{pair}.1` once each")
            continue
        odd = [n.target for n in (first, second) if not _defaults_only(parent.get_submodule(n.target), n)]
        if odd:
            why.append(f"it calls `{odd[0]}` with other arguments than the stream (and their "
                       "defaults)")
            continue
        x = first.args[0]
        mid = _residual_add(first, x)
        out = _residual_add(second, mid) if mid is not None and second.args[:1] == (mid,) else None
        if out is None or set(mid.users) != {second, out}:
            why.append(f"it does not add the outputs of `{pair}.0` and `{pair}.1` to their inputs "
                       "(`x = attn(x) + x; x = ff(x) + x`)")
            continue
        with graph.inserting_before(first):
            whole = graph.call_module(pair, (x,))
        out.replace_all_uses_with(whole)
        for n in (out, second, mid, first):
            graph.erase_node(n)
        done.append(pair)
    graph.lint()
    gm.recompile()
    return tuple(done), ("its forward: " + why[0]) if why else None


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
    buffers = [(b, b.clone()) for b in parent.buffers()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)
            out = parent(*call.args, **call.kwargs)
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
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
