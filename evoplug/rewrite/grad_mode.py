"""The gradient modes a block's forward sets (``with torch.no_grad():``, ``torch.enable_grad()``,
``torch.inference_mode()``), kept by its program.

A torch.fx graph does not keep them: the tracer marks each op with the mode it ran in
(analyse/graph.py ``GRAD_MODE``), and this pass sets that mode around each run of ops marked
alike, as torch's own pre-dispatch graphs do (``torch._C._set_grad_enabled``), putting back the
mode the program was called in after it. Without it, an EMA a block keeps in a buffer under
``no_grad`` (``self.m.mul_(0.9).add_(x.mean(...), alpha=0.1)``) ran with gradients on in
training: the buffer took the tokens' autograd history, a chain growing at each step, which
``copy.deepcopy`` of the model refused and ``torch.compile`` backpropagated through twice (audit
L2 of the forty-seventh session); a value computed under ``no_grad`` and used after it passed
gradients the dense model does not.

Ops the forward runs under ``torch.enable_grad()`` (marked ``"grad"``: analyse/modes.py traces
the block a second time with gradients off to tell them) run with gradients on whatever the
caller's mode, as the dense block's do (until the forty-eighth session they ran in the caller's:
called under ``no_grad``, an auxiliary loss the block kept held no autograd history). What an
analysis pass puts in the place of the forward's ops takes their mark (analyse/graph.py
``inserting_as``); the nodes the rewrite adds (gathers, the attention row) have none and run in
the mode the program is called in. A program that sets a mode is called through runtime/programs.py
``modes_restored``: an error inside such a run leaves the caller's mode as it was.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.fx as fx

from ..analyse.graph import GRAD_MODE

#: (bound here: analyse/modes.py watches ``torch._C._set_grad_enabled`` while it traces)
_set_grad_enabled = torch._C._set_grad_enabled
_enter_inference = torch.autograd.grad_mode._enter_inference_mode
_exit_inference = torch.autograd.grad_mode._exit_inference_mode
fx.node.has_side_effect(_exit_inference)     # (a call with no users: no dead-code pass drops it)


def keep_grad_modes(graph: fx.Graph):
    """Set the marked modes around their runs of ops in ``graph``."""
    for mode, first, last in _runs(graph):
        with graph.inserting_before(first):
            if mode == "inference":
                handle = graph.call_function(_enter_inference, (True,))
            else:
                handle = graph.call_function(torch.is_grad_enabled)
                graph.call_function(_set_grad_enabled, (mode == "grad",))
        with graph.inserting_after(last):
            if mode == "inference":
                graph.call_function(_exit_inference, (handle,))
            else:
                graph.call_function(_set_grad_enabled, (handle,))


def _runs(graph: fx.Graph) -> List[tuple]:
    """(mode, first node, last node) of each run of consecutive ops marked with one mode (a
    read of an attribute between them is none: it runs alike in any mode)."""
    runs, mode, first, last = [], None, None, None
    for n in graph.nodes:
        if n.op == "get_attr":
            continue
        now: Optional[str] = n.meta.get(GRAD_MODE) if n.op in ("call_function", "call_method",
                                                                "call_module") else None
        if now != mode and mode is not None:
            runs.append((mode, first, last))
        if now is not None and now != mode:
            first = n
        mode, last = now, n
    if mode is not None:
        runs.append((mode, first, last))
    return runs
