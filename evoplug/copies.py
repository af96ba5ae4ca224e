"""Copies evoplug makes of a user's model (the one ``convert(inplace=False)`` converts, the
check's, the analysis' float32 and perturbed copies of a block): ``copy.deepcopy`` that copes
with what a model holds after a forward with autograd on. Ground floor, beside options and
errors: it imports torch only."""
from __future__ import annotations

import copy
import types
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import EvoplugError

#: how far below a module's own attribute tensors with autograd history are looked for
#: (containers and plain objects: ``results[i]``, ``cache["bias"]``, ``holder.seen[0]["out"]``)
_DEPTH = 4
#: what holds no tensor worth looking into (or too much to walk)
_OPAQUE = (str, bytes, int, float, complex, bool, type(None), type, types.ModuleType,
           types.FunctionType, types.BuiltinFunctionType, types.MethodType, nn.Module)


def copy_model(model: nn.Module, memo: Optional[dict] = None) -> nn.Module:
    """``copy.deepcopy(model, memo)``, where

    * tensors with autograd history that the modules keep (values of a past forward: timm
      LeViT's attention-bias cache, kornia's ``encoder.results``, ``weight_norm``'s ``weight``;
      ``copy.deepcopy`` refuses them) are copied detached: the copy's parameters are new
      tensors, so no graph of the original's could be the copy's; the copy computes its own at
      its first forward. The original keeps them as they are;
    * a module ``torch.nn.utils.parametrize`` parametrized gets a class of its own, as torch gave
      the original one (it holds the parametrized tensors as properties): a copy that shared it
      lost the original's property when ``remove_parametrizations`` ran on the copy, and the
      original raised at its next call (audit W2 of the thirty-eighth session).

    ``memo``: the copy's memo (what it copied), filled. A tensor with autograd history held
    where this does not look (a closure, ``__slots__``, deeper than :data:`_DEPTH`) raises an
    :class:`EvoplugError` naming the ways out."""
    memo = {} if memo is None else memo
    seen: set = set()
    for m in model.modules():
        for v in vars(m).values():
            _detach_into(v, memo, seen, _DEPTH)
    seeded = dict(memo)         # (a failed deepcopy leaves half-made copies in ``memo``)
    try:
        copied = copy.deepcopy(model, memo)
    except RuntimeError as e:
        if _REFUSED not in str(e):
            raise
        where = _refused_attribute(model, seeded)
        raise EvoplugError(
            f"{type(model).__name__}: evoplug copies the model (convert with inplace=False, the "
            f"check), and {where or 'it'} holds a tensor with autograd history, which "
            "copy.deepcopy refuses: a view of a parameter (copied detached it would follow no "
            "weight), or a value kept from a forward with autograd on where evoplug does not "
            f"look for one (a closure, a functools.partial, __slots__, deeper than {_DEPTH} "
            "containers below a module's attribute): run one forward under torch.no_grad() "
            f"first, or convert it with inplace=True ({e})") from None
    for m in copied.modules():
        if parametrize.is_parametrized(m):
            m.__class__ = remade_class(type(m))
    return copied


def remade_class(cls: type, bases: Optional[tuple] = None, name: Optional[str] = None) -> type:
    """``cls`` made again (its properties and methods; on ``bases``, by default its own): a
    class of its own for a copy of a parametrized module, or a parametrization's class put back
    on a block's original class by ``revert`` (variants.py ``unconverted_class``)."""
    return type(name or cls.__name__, cls.__bases__ if bases is None else bases,
                {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})


#: what torch's refusal to deep-copy a tensor with autograd history says
_REFUSED = "graph leaves"


def _refused_attribute(model: nn.Module, memo: dict) -> str:
    """```path`.name`` of the first module attribute that ``copy.deepcopy`` refuses, or ''."""
    for path, m in model.named_modules():
        for k, v in vars(m).items():
            if k == "_modules":
                continue
            try:
                copy.deepcopy(v, dict(memo))
            except RuntimeError as e:
                if _REFUSED in str(e):
                    return f"`{path}`.{k}" if path else f"its attribute `{k}`"
    return ""


def _detach_into(v, memo: dict, seen: set, depth: int) -> None:
    """Put a detached copy of every tensor with autograd history under ``v`` in ``memo``."""
    if isinstance(v, torch.Tensor):
        # (a view of a parameter, ``self.weight.t()`` kept by the module, is no value of a past
        # forward: detached, the copy's would follow no weight and pass it no gradient (audit
        # W5 of the thirty-eighth session); ``copy.deepcopy`` refuses it, said below)
        base = v._base
        if not v.is_leaf and id(v) not in memo and not (
                base is not None and base.is_leaf and base.requires_grad):
            memo[id(v)] = v.detach().clone()
        return
    if depth == 0 or isinstance(v, _OPAQUE) or id(v) in seen:
        return
    seen.add(id(v))
    if isinstance(v, dict):
        items = v.values()
    elif isinstance(v, (list, tuple, set, frozenset)):
        items = v
    else:
        own = getattr(v, "__dict__", None)
        items = own.values() if isinstance(own, dict) else ()
    for i in list(items):
        _detach_into(i, memo, seen, depth - 1)
