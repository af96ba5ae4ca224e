"""Blocks whose residual adds are their parent's (``x = attn(x) + x; x = ff(x) + x`` in a loop
over ``ModuleList([attn, ff])`` pairs: lucidrains' vit-pytorch and much code written after it).

The pair's ``ModuleList`` becomes a :class:`ResidualPairs`, a block that runs the same two
adds, and the parent's forward a program (its own graph, traced by ``rewrite/pairs.py``) that
calls the pair where it called its two parts; evoplug then converts the pair as any block.
Parameters, buffers and ``state_dict`` keys stay as they were (the classes change, no module
is added). A call of the parent the program was not traced for (another value of a non-tensor
argument) runs the parent's own forward: the parts run as written, dense.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import inspect
import sys
import types
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .programs import compile_program, program_source


class ResidualPairs(nn.ModuleList):
    """Two residual branches, each added to the stream it was given: the block a parent's loop
    ran in parts (``x = self[0](x) + x; x = self[1](x) + x``, the same adds in the same order)."""

    def forward(self, x):
        x = self[0](x) + x
        return self[1](x) + x


class Regrouped:
    """What a regrouped parent runs: ``program`` (its traced forward calling the pairs), the
    class it had, the pairs (paths under the parent), the parameters the program takes (the
    tensors, in order) and the values of the others it was traced with."""

    def __init__(self, programs: Dict[bool, Any], orig_class: type, pairs: Tuple[str, ...],
                 tensors: Tuple[str, ...], fixed: Dict[str, Any], module: nn.Module,
                 watched: Tuple[Tuple[nn.Module, str], ...] = ()):
        self.programs, self.orig_class, self.pairs = programs, orig_class, pairs
        self.tensors, self.fixed = tensors, fixed
        # what the trace read as constants: the parent's plain values and containers of them,
        # and the attributes of its submodules its forward reads by name (``watched``)
        self.watched = watched
        # the modules that hold the pairs, down from the parent (a pair added, deleted, moved)
        self.containers = tuple({id(c): c for p in pairs for c in _ancestors(module, p)}.values())
        self.attributes = self._attributes(module)
        self.warned = False

    def _attributes(self, module: nn.Module, snapshot: bool = True):
        """What the program holds as it was traced: plain values, the values it reads by name,
        and which modules are where down to the pairs (a pair deleted, replaced or added).
        Copied for the snapshot; read as they are to compare with it (every call)."""
        keep = copy.deepcopy if snapshot else (lambda v: v)
        return (plain_attributes(module, snapshot),
                [_global(m, k) if isinstance(m, str) else keep(getattr(m, k, _GONE))
                 for m, k in self.watched],
                [tuple(c._modules) for c in self.containers])

    def _pairs_in_place(self, module: nn.Module) -> bool:
        try:
            return all(isinstance(module.get_submodule(p), ResidualPairs) for p in self.pairs)
        except AttributeError:     # (a pair deleted)
            return False

    def inputs(self, module: nn.Module, args, kwargs) -> Optional[list]:
        """The program's inputs for this call; None where it binds a non-tensor argument to
        another value than the program was traced with."""
        signature = self.__dict__.get("_signature")
        if signature is None:     # (made once: the call's cost is per forward)
            signature = self._signature = inspect.signature(self.orig_class.forward)
        try:
            bound = signature.bind(module, *args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        got = bound.arguments
        if any(not isinstance(got.get(n), torch.Tensor) for n in self.tensors):
            return None      # (a tensor argument left out, or None: traced for a tensor)
        if not _same(self._attributes(module, False), self.attributes) or not self._pairs_in_place(module):
            return None
        if any(not (got.get(k) is v or _same(got.get(k), v)) for k, v in self.fixed.items()):
            return None
        return [got[n] for n in self.tensors]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_signature", None)
        state["programs"] = {k: program_source(p, self.orig_class.__name__)
                             for k, p in self.programs.items()}
        return state

    def __setstate__(self, state):
        state["programs"] = {k: compile_program(p) for k, p in state["programs"].items()}
        self.__dict__.update(state)


class RegroupedMixin:
    """Mixed in front of the parent's class: its forward runs the regrouped program."""

    _evoplug_regrouped: Regrouped

    def forward(self, *args, **kwargs):
        r = self.__dict__["_evoplug_regrouped"]
        inputs = r.inputs(self, args, kwargs)
        if inputs is not None:
            return r.programs[self.training](self, *inputs)
        if not r.warned:
            r.warned = True
            warnings.warn(f"{r.orig_class.__name__}: called with other arguments than at the "
                          "conversion, or an attribute its forward reads changed since, so it "
                          "runs its own forward: the blocks it holds "
                          f"({', '.join(r.pairs)}) run dense in this call", stacklevel=2)
        return r.orig_class.forward(self, *args, **kwargs)

    def __reduce_ex__(self, protocol):
        # the class is made at run time: pickle names the original one
        return (_rebuild_regrouped, (self._evoplug_regrouped.orig_class,), self.__getstate__())


_PLAIN = (bool, int, float, str, type(None))
_GONE = "<evoplug: no such attribute>"   # (a string: it compares equal after a copy)


def is_plain(v) -> bool:
    """A value a trace reads as a constant: None, a bool, number or string, an enum member, a
    numpy scalar, or a list/tuple/set/dict/SimpleNamespace of them (``torch.Size`` and named
    tuples are tuples), or a dataclass instance compared by its fields (``==``: ``eq=True``, the
    default), frozen or not, whose fields are. (Enum members and numpy scalars were not, nor a
    SimpleNamespace: a block's forward that set one at another input size than the
    conversion's set it on the twin's block only, until the forty-ninth session; nor a
    dataclass, until the fiftieth: a forward's ``self.cfg = Cfg(H, W)`` was set by no program,
    and the converted model kept the value from before the conversion at every size.)"""
    if isinstance(v, _PLAIN) or isinstance(v, enum.Enum) or _numpy_scalar(v):
        return True
    if isinstance(v, (list, tuple, set, frozenset)):
        return all(is_plain(i) for i in v)
    if isinstance(v, dict):
        return all(is_plain(k) and is_plain(i) for k, i in v.items())
    if type(v) is types.SimpleNamespace:
        return all(is_plain(i) for i in vars(v).values())
    if plain_dataclass(v):
        return all(is_plain(getattr(v, f.name)) for f in dataclasses.fields(v))
    return False


def plain_dataclass(v) -> bool:
    """A dataclass instance (not the class) whose ``==`` compares its fields."""
    params = getattr(type(v), "__dataclass_params__", None)
    return params is not None and params.eq and not isinstance(v, type)


def fresh(v):
    """A plain value (:func:`is_plain`) made anew, as a forward that sets it at each call makes
    it: its lists, dicts, sets and mutable dataclasses new at every depth, so that what a caller
    changes in place (``blk.cfg["inner"]["g"] = 1.0``) leaves the value recorded at the
    conversion as it was (a shallow copy shared the inner dict with it until the fiftieth
    session); what cannot change (numbers, strings, tuples of them, frozen dataclasses of them)
    as it is. Comprehensions, not ``copy.copy``, which dynamo cannot trace (a graph break,
    refused under ``fullgraph=True``), for the standard lists, dicts and tuples."""
    t = type(v)
    if t in _PLAIN:
        return v
    if t is list:
        return [fresh(i) for i in v]
    if t is dict:
        return {k: fresh(i) for k, i in v.items()}
    if t is tuple:
        return v if all(type(i) in _PLAIN for i in v) else tuple(fresh(i) for i in v)
    if isinstance(v, tuple) and hasattr(v, "_fields"):      # (a named tuple)
        return t(*(fresh(i) for i in v))
    if plain_dataclass(v):
        if t.__dataclass_params__.frozen and all(type(getattr(v, f.name)) in _PLAIN
                                                 for f in dataclasses.fields(v)):
            return v
        return dataclasses.replace(v, **{f.name: fresh(getattr(v, f.name))
                                         for f in dataclasses.fields(v) if f.init})
    if isinstance(v, (list, dict, set, types.SimpleNamespace)):
        return copy.deepcopy(v)
    return v


def _numpy_scalar(v) -> bool:
    np = sys.modules.get("numpy")       # (none can exist where numpy was never imported)
    return np is not None and isinstance(v, np.generic)


def same_value(a, b) -> bool:
    """Whether two attribute values are the same: one object, equal plain values (``==``,
    which numpy scalars and containers of them answer too), or tensors of one shape, dtype and
    device with equal elements."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and \
            bool(torch.equal(a, b))
    return _same(a, b)


def plain_attributes(module: nn.Module, copied: bool = True) -> Dict[str, Any]:
    """The module's own plain Python values and containers of them (flags, sizes, a list of
    layers to skip) but ``training``, copied (or as they are, to compare): what a traced
    forward read as constants."""
    return {k: copy.deepcopy(v) if copied else v for k, v in module.__dict__.items()
            if k not in _MODULE_KEYS and is_plain(v)}


#: nn.Module's own bookkeeping (hooks, parameter dicts, ``training``): not the forward's values
_MODULE_KEYS = frozenset(nn.Module().__dict__)


def _global(module: str, name: str):
    """What the global ``name`` of the module ``module`` is bound to now, by name (a module,
    function or class rebound; the same after a copy or a pickle)."""
    value = vars(sys.modules[module]).get(name, _GONE) if module in sys.modules else _GONE
    if inspect.ismodule(value):
        return ("module", value.__name__)
    return (getattr(value, "__module__", None), getattr(value, "__qualname__", None), type(value).__name__)


def _ancestors(module: nn.Module, path: str):
    """``module`` and the modules on ``path`` below it, the last one's parent included."""
    out, parts = [module], path.split(".")
    for part in parts[:-1]:
        out.append(out[-1]._modules[part])
    return out


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:   # noqa: BLE001 - not comparable: not the same
        return False


_CLASSES: Dict[type, type] = {}


def regrouped_class(cls: type) -> type:
    """The regrouped class of a parent class (one per original class)."""
    if issubclass(cls, RegroupedMixin):
        return cls
    new = _CLASSES.get(cls)
    if new is None:
        new = _CLASSES[cls] = type(f"Regrouped{cls.__name__}", (RegroupedMixin, cls),
                                   {"__module__": cls.__module__})
    return new


def _rebuild_regrouped(orig_class: type) -> nn.Module:
    return object.__new__(regrouped_class(orig_class))


def undo_regroup(parent: nn.Module):
    """The parent and its pairs back to their own classes."""
    r = parent.__dict__.pop("_evoplug_regrouped", None)
    if r is None:
        return
    parent.__class__ = r.orig_class
    for path in r.pairs:
        pair = parent.get_submodule(path)
        if type(pair) is ResidualPairs:
            pair.__class__ = nn.ModuleList
