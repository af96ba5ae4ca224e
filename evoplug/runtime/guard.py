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
(:class:`~evoplug.runtime.state.EntryHook`) replaces them in what the forward returns and, where
something outside kept one without autograd, restores it in place.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, List

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map


class SegmentGuard(TorchFunctionMode):
    """See the module docstring. ``watch(t, restore)`` registers a handed-on tensor;
    ``restore(t)`` gives its tokens in the original order."""

    def __init__(self):
        super().__init__()
        self.watched: Dict[int, List] = {}     # id -> [weakref, restore, restored or None]
        self.on_stack = False
        self.suspended = False                # on the stack under another mode: pass through

    # -- what is watched -------------------------------------------------------------------
    def watch(self, t: torch.Tensor, restore: Callable[[torch.Tensor], torch.Tensor]):
        key = id(t)
        # forgotten when it is freed: a guard with nothing watched passes every call on as is
        self.watched[key] = [weakref.ref(t, lambda _, k=key, w=self.watched: w.pop(k, None)),
                             restore, None]

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
        return e[2]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.suspended and self.watched:    # (the mode is off while this runs)
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

    def finish(self, output):
        """The model's forward returns ``output``: watched tensors in it are replaced by their
        restored tokens; one kept elsewhere without autograd (a list the forward filled) is
        restored in place; the guard leaves the stack. Returns the output to hand back."""
        if self.on_stack:
            self.off()
        self.suspended = False
        if not self.live():
            self.watched.clear()
            return output
        output = tree_map(self.restored, output)
        for e in self.watched.values():
            t = e[0]()
            # kept by something outside (a list of block outputs) or by the runtime's last
            # state: restored in place where autograd allows it (with autograd, the forward's
            # own uses were restored by the mode, and what it returns above)
            if t is None or t.requires_grad or (torch.is_inference(t) and
                                                not torch.is_inference_mode_enabled()):
                continue
            fixed = self.restored(t)
            with torch.no_grad():
                t.set_(fixed.detach().clone())
        self.watched.clear()
        return output
