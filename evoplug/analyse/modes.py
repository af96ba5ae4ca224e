"""The gradient modes a block's forward sets, as its traced graph keeps them (graph.GRAD_MODE).

A trace does not keep them. The block is traced with gradients on, so an op the forward runs
under ``torch.no_grad()`` shows its mode; one it runs under ``torch.enable_grad()`` does not
(gradients are on either way). Where the forward sets a mode at all (each of torch's
``no_grad``, ``enable_grad`` and ``set_grad_enabled`` calls ``torch._C._set_grad_enabled``,
watched while tracing), the block is traced again with gradients off, as a caller under
``torch.no_grad()`` runs it: an op that runs with gradients on there runs so whatever the
caller's mode (``"grad"``). Two traces see what the forward computes its mode from, as the
dense model does (``torch.set_grad_enabled(prev)`` after ``prev = torch.is_grad_enabled()``
puts back the caller's mode; ``enable_grad`` sets it on). Until the forty-eighth session an
``enable_grad`` inside a forward was not kept: called under ``no_grad``, what its ops computed
from parameters held no autograd history where the dense model's did.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import List, Optional

import torch
import torch.fx as fx
from torch import nn

from ..errors import AnalysisError
from .graph import GRAD_MODE

#: what takes gradients inside a forward (test-time adaptation, energy heads)
_TAKES_GRADIENTS = {torch.autograd.grad, torch.autograd.backward}


def grad_mode_now(caller_grad: bool = True) -> Optional[str]:
    """The gradient mode a node made now gets (:data:`graph.GRAD_MODE`), the trace running as a
    caller with gradients ``caller_grad`` and outside inference mode runs it: None where the
    mode is the caller's."""
    if torch.is_inference_mode_enabled():
        return "inference"
    on = torch.is_grad_enabled()
    return None if on == caller_grad else ("grad" if on else "no_grad")


@contextlib.contextmanager
def mode_changes_watched(tracer):
    """While ``tracer`` traces: ``tracer.sets_grad_mode`` becomes True where the traced forward
    sets a gradient mode, ``tracer.reads_grad_mode`` where its own code (not torch's: a
    ``no_grad`` reads the mode it puts back) reads it, ``torch.is_grad_enabled()``; not where
    the tracer's own evaluation does (``tracer.evaluating``). (Callers hold the one-trace lock;
    other threads' calls pass through.)"""
    original, is_on, thread = torch._C._set_grad_enabled, torch.is_grad_enabled, threading.get_ident()

    def watched(mode):
        if threading.get_ident() == thread and not tracer.evaluating:
            tracer.sets_grad_mode = True
        return original(mode)

    def read():
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if threading.get_ident() == thread and not tracer.evaluating and \
                not caller.startswith(_NOT_THE_FORWARDS):
            tracer.reads_grad_mode = True
        return is_on()
    torch._C._set_grad_enabled, torch.is_grad_enabled = watched, read
    try:
        yield
    finally:
        torch._C._set_grad_enabled, torch.is_grad_enabled = original, is_on


#: the packages whose reads of the gradient mode are not a forward's branch on it
_NOT_THE_FORWARDS = ("torch", "evoplug")


def keep_grad_modes_set(name: str, graph: fx.Graph, module, constants, tracer, before):
    """``graph``, traced by ``tracer``, marked with the gradient modes its forward sets: where
    it sets one, the block traced again as ``tracer`` traced it, as a caller with gradients off
    runs it (``before``: the block's state before the trace, analyse/writes.py)."""
    refuse_gradients_taken(graph, name)
    if not (tracer.sets_grad_mode or tracer.reads_grad_mode):
        return
    before.restore_containers()
    again = type(tracer)(tracer._attention_modules, into_notrace=tracer._into_notrace,
                         example=tracer._example, trace_into=tracer._trace_into,
                         kept=tracer._kept, caller_grad=False)
    try:
        _keep_modes_of(graph, again.trace(module, concrete_args=constants), name, tracer)
    finally:
        before.proxies_put_back()
        again._example = None       # (the tracer sits in reference cycles)


def _keep_modes_of(graph: fx.Graph, off: fx.Graph, name: str, tracer):
    """Mark ``graph`` (traced with gradients on: ``no_grad`` marked) with the ``"grad"`` runs of
    ``off``, the same block traced with gradients off. Where the forward reads the mode
    (``tracer.reads_grad_mode``), their arguments must be the same too (``1.1 if
    torch.is_grad_enabled() else 1.0``). A forward that read it without setting one was refused
    as "traced program differs from the block" without a reason until audit M1 of the
    forty-ninth session."""
    ours, theirs = list(graph.nodes), list(off.nodes)
    at = ({n: i for i, n in enumerate(ours)}, {n: i for i, n in enumerate(theirs)})
    if len(ours) != len(theirs) or any(not _same_node(a, b, at, tracer) for a, b in zip(ours, theirs)):
        sets = ", and sets a gradient mode" if tracer.sets_grad_mode else ""
        raise AnalysisError(name, "its forward branches on the gradient mode "
                                  f"(`torch.is_grad_enabled()`{sets}): it runs other ops when it "
                                  "is called with gradients off, which one program cannot "
                                  "follow; branch on `self.training` instead")
    for a, b in zip(ours, theirs):
        on_mode, off_mode = a.meta.get(GRAD_MODE), b.meta.get(GRAD_MODE)
        if on_mode is not None and off_mode is not None and on_mode != off_mode:
            raise AnalysisError(name, f"its forward runs `{a.name}` with gradients off when "
                                      "called with them on and on when called with them off, "
                                      "which evoplug cannot keep")
        if off_mode is not None:
            a.meta[GRAD_MODE] = off_mode


def requires_grad_branch(tensor, frame) -> str:
    """Why a trace cannot take the forward's Python branch on ``tensor.requires_grad`` (``frame``:
    the tracer's, under the forward's code). Gradient checkpointing inside the block branches
    so (MMPretrain's ``if self.with_cp and x.requires_grad: x = cp.checkpoint(...)``), and is
    named where the forward's code names a checkpoint; any other such branch was explained as
    checkpointing too until audit M2 of the forty-ninth session."""
    while frame is not None and (frame.f_code.co_name in ("to_bool", "__bool__") or
                                 frame.f_globals.get("__name__", "").startswith(_NOT_THE_FORWARDS)):
        frame = frame.f_back
    names = frame.f_code.co_names + frame.f_code.co_freevars if frame is not None else ()
    if any("checkpoint" in n or n == "with_cp" for n in names):
        return (f"a Python branch on `{tensor}.requires_grad` (gradient checkpointing inside the "
                "block, as MMPretrain's with_cp=True does): a trace cannot keep the "
                "checkpointing. " + _checkpoint_way_out(tensor, frame, names))
    return (f"its forward branches on whether its tokens require gradients (`{tensor}."
            "requires_grad`, which follows the caller's gradient mode): a trace keeps one "
            "branch, which its program would run either way. Branch on `self.training` "
            "instead, or run the branch in a submodule registered with "
            "evoplug.register_leaf_module (run whole)")


def _checkpoint_way_out(tensor, frame, names) -> str:
    """The way out of a branch on ``tensor.requires_grad`` that checkpoints: where the block's
    flag for it (a bool attribute of ``self`` the forward's code names: ``with_cp``,
    ``use_checkpoint``) is off already, the branch tests the tokens first (``if
    x.requires_grad and self.with_cp``), and the order that tests the flag first converts;
    until audit D7 of the fiftieth session it was told to build the model with the flag off,
    which it was."""
    owner = frame.f_locals.get("self") if frame is not None else None
    flag = next((n for n in names if isinstance(vars(owner).get(n) if hasattr(owner, "__dict__")
                                                 else None, bool)
                 and any(w in n for w in ("cp", "ckpt", "checkpoint"))), None)
    if flag is not None and not getattr(owner, flag):
        return (f"Its flag `self.{flag}` is False already, and the branch tests "
                f"`{tensor}.requires_grad` first: test the flag first (`if self.{flag} and "
                f"{tensor}.requires_grad:`), which converts with the flag off, and checkpoint the "
                "converted blocks from outside (torch.utils.checkpoint) if memory needs it")
    return ("Build the model without it (with_cp=False; a branch that tests the flag first, "
            f"`if self.with_cp and {tensor}.requires_grad:`, then converts) and checkpoint the "
            "converted blocks from outside (torch.utils.checkpoint) if memory needs it")


def _same_node(a: fx.Node, b: fx.Node, at, tracer) -> bool:
    """Whether ``a`` and ``b`` (``at``: their graphs' node positions) run the same op: its kind
    and target (a tensor constant, which each trace sets on the root under a name of its own,
    by value), and its arguments where the forward reads the gradient mode (nodes by place)."""
    if a.op != b.op:
        return False
    if a.op == "get_attr" and a.target.startswith(_CONSTANT) and b.target.startswith(_CONSTANT):
        x, y = getattr(tracer.root, a.target, None), getattr(tracer.root, b.target, None)
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                and x.dtype == y.dtype and torch.equal(x, y)):
            return False
    elif str(a.target) != str(b.target):
        return False
    if not tracer.reads_grad_mode:
        return True
    mine, theirs = (fx.node.map_arg((n.args, n.kwargs), lambda m, i=i: f"%{at[i][m]}")
                    for i, n in enumerate((a, b)))
    return str(mine) == str(theirs)


#: the names fx gives the tensors a trace makes constants of (``_tensor_constant0``)
_CONSTANT = "_tensor_constant"


def refuse_gradients_taken(graph: fx.Graph, name: str):
    """A forward that takes gradients (``torch.autograd.grad`` of what it computes under
    ``torch.enable_grad()``) is refused by name: the analysis runs the block's graph without
    autograd (it raised a raw "element 0 of tensors does not require grad")."""
    for n in graph.nodes:
        if (n.op == "call_function" and n.target in _TAKES_GRADIENTS) or \
                (n.op == "call_method" and n.target == "backward"):
            what = "backward" if n.op == "call_method" else f"torch.autograd.{n.target.__name__}"
            raise AnalysisError(name, f"its forward takes gradients (`{what}`), which evoplug's "
                                      "analysis, running the block's ops without autograd, cannot "
                                      "follow: take them in a submodule registered with "
                                      "evoplug.register_leaf_module (run whole), or outside "
                                      "the block")


#: the flag with which a layer checkpoints its own forward, read outside the code its program
#: runs (transformers' GradientCheckpointingLayer wraps ``forward`` and checks it)
_OWN_CHECKPOINT = "gradient_checkpointing"


def own_checkpointing_off(block: nn.Module) -> List[dict]:
    """Sets off, for a trace, the checkpointing of the block's own forward (and of its
    submodules'), and returns the attribute dicts it was on in, for :func:`own_checkpointing_back`.
    Traced with it on, a reentrant checkpoint's ``no_grad`` went into the training program, which
    computed the whole block without autograd (torch's raw "none of output has requires_grad" in
    backward) until audit E1 of the fiftieth session. The converted block's call checkpoints its
    program as the block's did, by the flag the program leaves out."""
    held = [vars(m) for m in block.modules() if vars(m).get(_OWN_CHECKPOINT) is True]
    for d in held:
        d[_OWN_CHECKPOINT] = False
    return held


def own_checkpointing_back(held: List[dict]):
    for d in held:
        d[_OWN_CHECKPOINT] = True
