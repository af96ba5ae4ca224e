"""Tokens a converted block hands on in the selection's order are for the next converted block
only. What the conversion's forward showed (the output goes straight to the next block) need
not hold in every later forward: a block skipped at random (LayerDrop), blocks removed after
conversion (timm's ``prune_intermediate_layers``), block outputs a forward collects only in
training or under a flag, a dropout between blocks in training.

:class:`SegmentGuard` makes those forwards right instead of wrong. Per thread and converted
model, it sits on the torch-function mode stack *between* converted blocks while such tokens
exist (it is off while a converted block runs, so the blocks pay nothing): any torch function
or tensor method (``t.shape`` included) that reads them gets the tokens restored to the
original order, the values every block restoring would give. The model's forward hook
(:class:`~evoplug.runtime.entry.EntryHook`) replaces them in what the forward returns and, where
something outside kept one without autograd, restores it in place.
"""
from __future__ import annotations

import gc
import sys
import types
import weakref
from typing import Callable, Dict, List, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree
from torch.utils._pytree import tree_map

from ..errors import EvoplugError


class SegmentGuard(TorchFunctionMode):
    """See the module docstring. ``watch(t, restore, name)`` registers a handed-on tensor of
    block ``name``; ``restore(t)`` gives its tokens in the original order."""

    def __init__(self):
        super().__init__()
        self.watched: Dict[int, List] = {}     # id -> [weakref, restore, restored or None, name]
        self.on_stack = False
        self.suspended = False                # on the stack under another mode: pass through

    # -- what is watched -------------------------------------------------------------------
    def watch(self, t: torch.Tensor, restore: Callable[[torch.Tensor], torch.Tensor], name: str = "?"):
        key = id(t)
        # forgotten when it is freed: a guard with nothing watched passes every call on as is
        self.watched[key] = [weakref.ref(t, lambda _, k=key, w=self.watched: w.pop(k, None)),
                             restore, None, name, False]

    def live(self) -> bool:
        """Whether a watched tensor still exists (the dead ones are forgotten)."""
        dead = [k for k, e in self.watched.items() if e[0]() is None]
        for k in dead:
            del self.watched[k]
        return bool(self.watched)

    def restored(self, v):
        """``v`` in the original order when it is a watched tensor, else ``v``."""
        if not isinstance(v, torch.Tensor) or not self.watched:
            return v
        e = self.watched.get(id(v))
        if e is None or e[0]() is not v:
            return v
        if e[2] is None:
            e[2] = e[1](v)
            e.append(_version(e[2]))
        return e[2]

    def seen(self, t: torch.Tensor):
        """(``t``'s tokens restored, or None where nothing read them; whether something wrote
        into them in place) for a watched tensor ``t``; (None, False) for another. A write
        between the blocks (``x[:, 0] = 0``, ``x.mul_``, ``out=x``, through a view or
        ``x.detach()``) lands in the restored tokens and moves their version counter; the next
        block takes them (runtime/block.py)."""
        e = self.watched.get(id(t))
        if e is None or e[0]() is not t:
            return None, False
        # (an inference tensor keeps no version counter: a write through a view of it shows
        # nowhere, so tokens read there are taken as written; lost until audit Q2 of the
        # twenty-sixth session)
        return e[2], e[4] or (e[2] is not None and (e[5] is None or _version(e[2]) != e[5]))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.suspended and self.watched:    # (the mode is off while this runs)
            if getattr(func, "__self__", None) is _DATA and args:
                # ``x.data``: a write through it shows in no version counter (every other
                # in-place write into the restored tokens does: :meth:`seen`)
                e = self.watched.get(id(args[0]))
                if e is not None and e[0]() is args[0]:
                    e[4] = True
            args, kwargs = tree_map(self.restored, (args, kwargs))
        return func(*args, **kwargs)

    # -- on and off the mode stack ---------------------------------------------------------
    def off(self):
        """A converted block starts: its own ops (on the tokens it was handed) pass untouched."""
        if not self.on_stack:
            return
        n = torch._C._len_torch_function_stack()
        if n and torch._C._get_function_stack_at(n - 1) is self:
            torch._C._pop_torch_function_stack()
            self.on_stack = False
        else:                                  # another mode above it: stay, pass through
            self.suspended = True

    def on(self):
        """A converted block ends: watch again while handed-on tokens exist."""
        self.suspended = False
        if self.on_stack or not self.live():
            return
        torch._C._push_on_torch_function_stack(self)
        self.on_stack = True

    def finish(self, output, raised: bool = False):
        """The model's forward returns ``output``: watched tensors in it are replaced by their
        restored tokens; one kept elsewhere without autograd (a list the forward filled) is
        restored in place; the guard leaves the stack. Returns the output to hand back.
        ``raised``: the forward raised; the frames of its traceback still hold its block
        outputs, which are no holders outside the blocks (the error said so, untrue, in a
        warning PyTorch made of it; audit M of the twenty-fourth session)."""
        if self.on_stack:
            self.off()
        self.suspended = False
        if not self.live():
            self.watched.clear()
            return output
        returned = output
        output = tree_map(self.restored, output)
        graphed, grad = [], torch.is_grad_enabled()
        for e in self.watched.values():
            t = e[0]()
            # kept by something outside (a list of block outputs) or by the runtime's last
            # state: restored in place where autograd allows it (with autograd, the forward's
            # own uses were restored by the mode, and what it returns above)
            if t is None or (torch.is_inference(t) and not torch.is_inference_mode_enabled()):
                continue
            if t.requires_grad or grad:
                # with autograd, even a tensor that needs no gradient (a frozen block's output)
                # may be saved for backward by the next block: never changed in place
                graphed.append((e[3], t))
                continue
            fixed = self.restored(t)
            with torch.no_grad():
                t.set_(fixed.detach().clone())
        t = e = None
        self.watched.clear()
        name = None if raised else _kept_outside(graphed, returned)
        del graphed
        if name is not None:
            raise EvoplugError(
                f"`{name}` handed its output on to the next converted block with the kept tokens "
                "in the selection's order (between selections, reselect_every > 1), and something "
                "outside the blocks kept it past this training forward (a list or an attribute "
                "the forward filled, a method-output recorder). With autograd evoplug cannot "
                "restore it in place: read later, its tokens would be in the wrong order. Keep "
                "block outputs with a forward hook on the block or return them from the forward "
                "(both see every token in order), or convert with reselect_every=1")
        return output


_DATA = torch._C.TensorBase.data


def _version(t: torch.Tensor) -> Optional[int]:
    """``t``'s version counter (in-place writes, through views and ``detach()`` too); None for
    an inference tensor, which keeps none."""
    try:
        return t._version
    except RuntimeError:
        return None


def _kept_outside(graphed, returned) -> Optional[str]:
    """The name of the first block whose handed-on output (with autograd) something still holds
    that is neither autograd (which keeps a tensor it saved for backward in C++), a running
    frame, nor a container of what the forward returned (those were replaced); None if none.
    Reference counts first (cheap), the garbage collector's referrers only where they show a
    holder. (Without ``Tensor._use_count``, nothing is checked.)"""
    suspects, returned_refs = [], None
    for pair in graphed:
        t = pair[1]
        if not hasattr(t, "_use_count"):
            return None
        # the pair, this frame's local, getrefcount's argument, and the owning reference C++
        # holds on the Python object while autograd keeps the tensor
        extra = sys.getrefcount(t) - 3 - (t._use_count() > 1)
        if extra > 0:
            if returned_refs is None:     # (block outputs returned in a list: every step)
                returned_refs = _references(returned)
            if extra > returned_refs.get(id(t), 0):
                suspects.append(pair)
    t = None
    if not suspects:
        return None
    mine = _containers(returned) | {id(graphed), id(suspects)}
    mine |= {id(pair) for pair in graphed}
    for name, t in suspects:
        for r in gc.get_referrers(t):
            if isinstance(r, types.FrameType) or id(r) in mine or (
                    isinstance(r, types.CellType) and r.cell_contents is returned):
                continue        # (the cell: nn.Module's call holds what the forward returned)
            return name
    return None


def _references(obj, depth: int = 6) -> Dict[int, int]:
    """How many references the pytree containers in ``obj`` hold to each tensor (by id): an item
    of a list, a tuple or a dict, and an attribute (a transformers ``ModelOutput`` keeps its
    fields twice)."""
    out: Dict[int, int] = {}
    if depth == 0 or isinstance(obj, torch.Tensor) or _pytree.tree_is_leaf(obj):
        return out
    children, _ = _pytree.tree_flatten(obj, is_leaf=lambda v: v is not obj)
    held = list(children) + (list(vars(obj).values()) if hasattr(obj, "__dict__") else [])
    for v in held:
        if isinstance(v, torch.Tensor):
            out[id(v)] = out.get(id(v), 0) + 1
    for c in children:
        for k, n in _references(c, depth - 1).items():
            out[k] = out.get(k, 0) + n
    return out


def _containers(obj, depth: int = 6) -> set:
    """Ids of the pytree containers in ``obj`` (the ones ``tree_map`` rebuilt), and of their
    attribute dicts (a transformers ``ModelOutput`` keeps its fields twice)."""
    out = set()
    if depth == 0 or isinstance(obj, torch.Tensor) or _pytree.tree_is_leaf(obj):
        return out
    out.add(id(obj))
    if hasattr(obj, "__dict__"):
        out.add(id(vars(obj)))
    children, _ = _pytree.tree_flatten(obj, is_leaf=lambda v: v is not obj)
    for c in children:
        out |= _containers(c, depth - 1)
    return out
