"""The runs a probe compares, each from the state the block was in before the first.

A block that keeps state from its forward and reads it back in the same call (a running
average kept under ``no_grad`` and subtracted after: ``self.m.mul_(0.9).add_(x[:, :5].mean((0,
1)), alpha=0.1)``, then ``x - self.m``) moved it between the probe's runs: each run read
another value, and its program was refused as "differs from the block" (audit L2 of the
forty-seventh session). :class:`SameStart` puts the block's state back before each run, and in
the runs on other tokens (another order, a subset, other images) it has each write into the
block's tensors leave the values the block's own forward left there (:class:`_Replay`): what
such a block writes is the tokens' it ran (named by the conversion, docs/guarantees.md), and the
probes compare what its program computes from the value it reads, as the block does.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .snapshot import changed_tensors, restore, snapshot
from .writes import IN_PLACE_OPERATORS


def _state_tensors(module: nn.Module) -> Dict[int, torch.Tensor]:
    """id -> tensor of the buffers and tensor attributes of ``module`` and its submodules."""
    found = {}
    for m in module.modules():
        found.update((id(b), b) for b in m._buffers.values() if isinstance(b, torch.Tensor))
        found.update((id(v), v) for v in vars(m).values() if isinstance(v, torch.Tensor)
                     and not isinstance(v, nn.Parameter))
    return found


class _Replay(TorchFunctionMode):
    """Records the values each of ``tensors`` holds after each write into it (an in-place
    method, an in-place operator, item assignment, ``out=``), or, replaying, makes the writes
    leave the recorded values in turn instead (what the write computed is dropped); a write
    beyond the recorded ones runs as written."""

    def __init__(self, tensors: Dict[int, torch.Tensor]):
        super().__init__()
        self.tensors = tensors
        self.values: Dict[int, List[torch.Tensor]] = {}
        self.replaying = False
        self.at: Dict[int, int] = {}

    def _written(self, func, args, kwargs) -> Optional[torch.Tensor]:
        name = getattr(func, "__name__", "")
        out = kwargs.get("out")
        t = out if isinstance(out, torch.Tensor) else args[0] if args and (
            name in IN_PLACE_OPERATORS or name == "__setitem__"
            or (name.endswith("_") and not name.endswith("__"))) else None
        if not isinstance(t, torch.Tensor):
            return None
        base = t if t._base is None else t._base
        return base if self.tensors.get(id(base)) is base else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = self._written(func, args, kwargs)
        if target is None:
            return func(*args, **kwargs)
        key = id(target)
        if not self.replaying:
            result = func(*args, **kwargs)
            self.values.setdefault(key, []).append(target.detach().clone())
            return result
        i = self.at.get(key, 0)
        if i >= len(self.values.get(key, ())):
            return func(*args, **kwargs)
        self.at[key] = i + 1
        with torch.no_grad():
            target.copy_(self.values[key][i])
        if getattr(func, "__name__", "") == "__setitem__":
            return None
        return kwargs["out"] if isinstance(kwargs.get("out"), torch.Tensor) else args[0]


class SameStart:
    """The probe's runs of ``module`` (its own forward, its program), each from the state it
    was in when this was made, and that state put back by :meth:`end`."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved = snapshot(module)
        self.replay: Optional[_Replay] = None

    def reference(self, run: Callable):
        """``run()``, the block's own forward; where it changed the block's tensors, run again
        from the start with its writes recorded (an eval-mode forward gives the same)."""
        out = run()
        if not changed_tensors(self.saved):
            return out
        restore(self.saved)
        self.replay = _Replay(_state_tensors(self.module))
        with self.replay:
            return run()

    def run(self, program: Callable, *args):
        """``program(*args)`` from the start state, its writes as the reference's."""
        restore(self.saved)
        if self.replay is None:
            return program(*args)
        self.replay.replaying, self.replay.at = True, {}
        try:
            with self.replay:
                return program(*args)
        finally:
            self.replay.replaying = False

    def replayed(self, program: Callable) -> Callable:
        """``program`` run by :meth:`run`."""
        return lambda *args: self.run(program, *args)

    def from_start(self, program: Callable, *args):
        """``program(*args)`` from the start state, writing what it computes (the dense run on
        the tokens in order: its writes are checked by what reads them)."""
        restore(self.saved)
        return program(*args)

    def end(self):
        restore(self.saved)
