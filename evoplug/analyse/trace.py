"""Tracing one block on its own: the call plan of the block (its token argument, other tensor
arguments and constants; a fixed-signature twin for ``*args``/``**kwargs``), the trace with its
retries (the families' notrace modules kept whole; into functions registered with
``torch.fx.wrap``; with plain tensor attributes the forward changes read as traced values), the
GraphModule with what the analysis reads from the trace, and the hints a failed trace gets. The
tracer itself is tracer.py, the passes that tidy its graph tidy.py."""
from __future__ import annotations

import dataclasses
import inspect
import random
from typing import TYPE_CHECKING, Any, Dict, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import AnalysisError
from ..runtime.call import CallPlan, inverse, packed_name, same_constant, tensor_tuple
from .calibrate import ModuleCall
from .canon import tokenise_map_block
from .graph import is_softmax, module_of
from .modes import keep_grad_modes_set, own_checkpointing_back, own_checkpointing_off
from .reads import leaf_reads
from .tidy import (cancel_permutes, constants_to_buffers, drop_constant_asserts,
                   drop_unread_attributes, out_as_copy, python_numbers, split_baddbmm,
                   tensor_only_signature)
from .tracer import BlockTracer
from .writes import StateBeforeTrace, mark_set_by_forward, python_writes

if TYPE_CHECKING:
    from .block import BlockAnalysis


def make_call_plan(module: nn.Module, name: str, call: ModuleCall,
                   ignored: Tuple[str, ...] = (), export_masks: Tuple[str, ...] = ()) -> CallPlan:
    """How the block is called: its token argument (the first tensor), other tensor arguments,
    constants (checked at every call). ``**kwargs`` are bound by the keywords the calibration
    call passed (Hugging Face layers take ``**kwargs``); ``*args`` must stay empty."""
    sig = inspect.signature(module.forward)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD), None)
    var_pos = next((p.name for p in sig.parameters.values() if p.kind == p.VAR_POSITIONAL), None)
    plan = CallPlan("", [], {}, sig, var_keyword=var_kw, var_positional=var_pos,
                    ignored=tuple(ignored) if var_kw is not None else (),
                    export_masks=tuple(export_masks), token_perm=tuple(call.token_perm),
                    keeps_channels_first=call.keeps_channels_first)
    values = plan.arguments(name, call.args, call.kwargs)
    packed = {n: (type(v), len(v)) for n, v in values.items() if tensor_tuple(v)}
    plan.packed = packed
    values = plan.arguments(name, call.args, call.kwargs)
    token_arg, tensor_args, constants = None, [], {}
    if call.token_key is not None:     # (tokens not first: forward(self, pos, x))
        tokens = call.raw_tokens()
        token_arg = next((n for n, v in values.items() if v is tokens), None)
    for n, v in values.items():
        if isinstance(v, torch.Tensor):
            if token_arg is None:
                token_arg = n
            elif n != token_arg:
                tensor_args.append(n)
        else:
            constants[n] = v
    if token_arg is None:
        raise AnalysisError(name, "forward received no tensor")
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    single = (not tensor_args and bool(params) and params[0].name == token_arg
              and len(values) == len(params) and all(
                  p.default is not p.empty and same_constant(p.default, constants.get(p.name))
                  for p in params[1:]))
    single = single and not packed
    x = values[token_arg]
    perm_args = tuple(n for n in tensor_args if plan.token_perm == (1, 0, 2) and values[n].dim() >= 2 and
                      values[n].shape[0] == x.shape[0] and values[n].shape[1] in (1, x.shape[1]))
    return dataclasses.replace(plan, token_arg=token_arg, tensor_args=tensor_args, constants=constants,
                               single=single, names=tuple(values), perm_args=perm_args)


def _fixed_signature_root(root: nn.Module, plan: CallPlan) -> nn.Module:
    """For a forward with ``*args``/``**kwargs``: a twin of ``root`` (same attribute dict, so the
    trace reads the block's own parameters and submodules) whose class's ``forward`` takes every
    argument by name, as :meth:`CallPlan.arguments` flattens them, and calls the original."""
    # the program's first parameter is the tokens (CallPlan.feed), also where the block takes
    # another tensor before them (forward(self, pos, x))
    order = [plan.token_arg] + [n for n in plan.names if n != plan.token_arg]
    later = plan.tensor_args and plan.names.index(plan.tensor_args[0]) < plan.names.index(plan.token_arg)
    if plan.var_keyword is None and plan.var_positional is None and not plan.packed and \
            not plan.token_perm and not later:
        return root
    defaults = {n: p.default for n, p in plan.signature.parameters.items()
                if p.default is not p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    params = ", ".join(f"{n}=_defaults[{n!r}]" if n in defaults else f"{n}=None" for n in order)
    named = [n for n, p in plan.signature.parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    items = {n for n, (_, k) in plan.packed.items() for n in [packed_name(n, i) for i in range(k)]}

    def value(n):      # a tuple argument is passed as the tuple of its items
        if plan.token_perm and n == plan.token_arg:
            return f"{n}.permute({inverse(plan.token_perm)})"
        if n in plan.perm_args:
            return f"{n}.transpose(0, 1)"
        if n not in plan.packed:
            return n
        kind, k = plan.packed[n]
        inner = "".join(f"{packed_name(n, i)}, " for i in range(k))
        return f"({inner})" if kind is tuple else f"[{inner}]"
    passed = ", ".join([f"{n}={value(n)}" for n in named] +
                       [f"{n}={value(n)}" for n in list(plan.names) + list(plan.packed)
                        if n not in named and n not in items])
    src = f"def forward(self, {params}):\n    return _orig(self, {passed})\n"
    if plan.token_perm:      # the tokens come as (B, N, C) and go back so (see CallPlan.token_perm)
        src = (f"def forward(self, {params}):\n    out = _orig(self, {passed})\n"
               f"    if isinstance(out, (tuple, list)):\n"
               f"        return (out[0].permute({plan.token_perm}), *out[1:])\n"
               f"    return out.permute({plan.token_perm})\n")
    scope = {"_defaults": defaults, "_orig": type(root).forward}
    exec(compile(src, f"<evoplug fixed signature of {type(root).__name__}>", "exec"), scope)
    cls = type(type(root).__name__, (type(root),), {"forward": scope["forward"],
                                                    "__module__": type(root).__module__})
    twin = object.__new__(cls)
    twin.__dict__ = root.__dict__
    return twin


def trace_block(module: nn.Module, name: str, plan: CallPlan, attention_modules: Set[int],
                training: bool, call: Optional[ModuleCall] = None) -> fx.GraphModule:
    """Trace ``module`` in the given train/eval mode (traces bake ``self.training``). With the
    calibration ``call``, Python branches on traced values are specialised on it."""
    example = _example(name, plan, call) if call is not None else None
    module = _fixed_signature_root(module, plan)
    was = module.training
    module.train(training)
    checkpointed = own_checkpointing_off(module)   # (its call checkpoints the program)
    before = StateBeforeTrace(module)
    tracer = None
    try:
        with leaf_reads(module, attention_modules) as reads:
            graph, tracer = _traced(module, name, plan, attention_modules, example, before)
            found = before.proxies_put_back()
            moved = before.moved_in_python()
            grown = tuple(w for w in before.moved_in_python(gains=True) if w not in moved)
            kept = before.changed_eagerly()
            if kept:         # traced again, those attributes read as the graph's values
                before.restore_containers()
                try:
                    graph, tracer = _traced(module, name, plan, attention_modules, example,
                                            before, kept)
                    found = before.proxies_put_back()
                except Exception as e:  # noqa: BLE001 - the first trace would freeze them: refused
                    raise AnalysisError(name, _kept_refused(kept, e)) from None
        keep_grad_modes_set(name, graph, module, dict(plan.constants), tracer, before)
        mark_set_by_forward(graph, found)
        recorded, by_batch = _recorded(name, graph, tracer) if example is not None else ((), ())
        recorded += before.tensors_set()
        drop_unread_attributes(graph)
        drop_constant_asserts(graph)
        python_numbers(graph)
        split_baddbmm(graph)
        out_as_copy(graph)
        if plan.token_perm:
            cancel_permutes(graph)
        constants_to_buffers(module)
        tensor_only_signature(graph, plan, name)
        # assembled before the mode is restored: some modules' train() drops cached tensors the
        # graph refers to (MMPretrain LeViT's attention bias cache `ab`)
        gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
        gm.meta["evo_batch_specialised"] = tracer.batch_specialised
        gm.meta["evo_specialised"] = list(tracer.specialised)
        gm.meta["evo_weight_branches"] = list(tracer.weight_branches)
        gm.meta["evo_moved_in_python"] = moved
        gm.meta["evo_grown_in_python"] = grown      # (a cache or a log: analyse/block.py tells)
        gm.meta["evo_assigned"] = frozenset(tracer.assigned)   # (writes.set_up_on_first_call)
        gm.meta["evo_leaf_reads"] = frozenset(reads)           # (reads.py: constants too)
        gm.meta.update(evo_python_writes=recorded, evo_batch_writes=by_batch)
        if call is not None:
            feed = plan.feed(*plan.bind(name, call.args, call.kwargs))
            gm.meta["evo_tokenised"] = tokenise_map_block(gm, feed, tuple(feed[0].shape[1:3]),
                                                          plan.keeps_channels_first)
            if gm.meta.get("evo_channels_first_stop"):
                raise AnalysisError(name, "a block that keeps its map channels first, which "
                                          "evoplug cannot put in token form: "
                                          + gm.meta["evo_channels_first_stop"])
    except AnalysisError:
        raise
    except Exception as e:
        raise AnalysisError(name, f"torch.fx could not trace the block: {type(e).__name__}: "
                                  f"{e}{_trace_hint(e)}") from None
    finally:
        before.put_back()
        own_checkpointing_back(checkpointed)
        module.train(was)
        if tracer is not None:
            tracer._example = None   # the tracer sits in reference cycles: drop the arguments now
    return gm


def _example(name: str, plan: CallPlan, call: ModuleCall) -> Dict[str, Any]:
    """The calibration call's arguments by name, laid out as the program takes them."""
    example = plan.arguments(name, call.args, call.kwargs)
    if plan.token_perm:
        example[plan.token_arg] = example[plan.token_arg].permute(plan.token_perm)
    for n in plan.perm_args:
        example[n] = example[n].transpose(0, 1)
    return example


def _recorded(name: str, graph: fx.Graph, tracer: BlockTracer) -> Tuple[Tuple, Tuple[str, ...]]:
    """The Python values the forward sets from its traced values (a size it records), on the
    calibration input, and those of them that follow the batch size (analyse/writes.py
    ``python_writes``)."""
    try:
        return python_writes(graph, tracer.recorded, tracer.follows_batch)
    except ValueError as e:
        raise AnalysisError(name, str(e)) from None


def _kept_refused(kept: Tuple, e: Exception) -> str:
    """Why a block whose plain tensor attributes changed while it was traced is refused when
    it does not trace with them read as traced values (``float(self.steps)`` of a counter): the
    first trace ran the change once, and its program would keep them still (and the values read
    from them) without a word (audit J1 of the forty-fifth session)."""
    names = ", ".join(f"`{path}`" for _, _, path in kept)
    reason = e.reason if isinstance(e, AnalysisError) else f"{type(e).__name__}: {e}{_trace_hint(e)}"
    what = "plain tensor attributes" if len(kept) > 1 else "a plain tensor attribute"
    return (f"its forward changes {names}, {what} (not a buffer), which its program must read "
            f"and set as a traced value (a program with it as a constant would keep it as the "
            f"conversion found it), and torch.fx could not trace the block so: {reason}")


def _traced(module: nn.Module, name: str, plan: CallPlan, attention_modules: Set[int], example,
            before: StateBeforeTrace, kept: Tuple = ()) -> Tuple[fx.Graph, BlockTracer]:
    """The block's graph and its tracer (see :func:`trace_block`), ``kept``: the plain tensor
    attributes read as traced values (:meth:`StateBeforeTrace.changed_eagerly`)."""
    # timm's notrace modules that hold the attention (Twins' locally-grouped attention)
    # often trace once the block's constant arguments are known; else they stay leaves
    tracer = None
    try:
        tracer = BlockTracer(attention_modules, into_notrace=True, example=example, kept=kept)
        graph = tracer.trace(module, concrete_args=dict(plan.constants))
    except Exception as first:  # noqa: BLE001 - retried below, the first message is kept
        if not _holds_family_leaves(module, tracer):
            raise
        before.restore_containers()
        tracer = BlockTracer(attention_modules, example=example, kept=kept)
        try:
            graph = tracer.trace(module, concrete_args=dict(plan.constants))
        except Exception as second:  # noqa: BLE001
            raise AnalysisError(name, f"torch.fx could not trace the block: "
                                      f"{type(first).__name__}: {first} (and with the notrace "
                                      f"modules kept whole: {type(second).__name__}: "
                                      f"{second}){_trace_hint(second)}") from None
    return _into_wrapped(module, graph, tracer, before, plan, example)


def _has_attention(graph: fx.Graph, root: nn.Module) -> bool:
    """A softmax (graph.is_softmax), fused attention or ``nn.MultiheadAttention`` call among the
    graph's nodes."""
    return any(is_softmax(root, n) or isinstance(module_of(root, n), nn.MultiheadAttention) or
               n.op == "call_function" and n.target in (F.scaled_dot_product_attention,
                                                         F.multi_head_attention_forward)
               for n in graph.nodes)


def _into_wrapped(module: nn.Module, graph: fx.Graph, tracer: BlockTracer,
                  before: StateBeforeTrace, plan, example) -> Tuple[fx.Graph, BlockTracer]:
    """The block traced again into the functions its library registered with ``torch.fx.wrap``
    (kept whole by fx in every trace of the process) where the first trace shows no attention
    and called such functions: the attention may run inside one (torchvision's Swin:
    ``shifted_window_attention``, refused as "no attention computation" until the
    thirty-eighth session). The graph kept is the first one unless the second traces and shows
    the attention."""
    if not tracer.global_wrapped or _has_attention(graph, tracer.root):
        return graph, tracer
    before.restore_containers()
    again = BlockTracer(tracer._attention_modules, into_notrace=tracer._into_notrace,
                        example=example, trace_into=tracer.global_wrapped, kept=tracer._kept)
    try:
        retraced = again.trace(module, concrete_args=dict(plan.constants))
    except Exception:  # noqa: BLE001 - the first graph stands (and is refused as it was)
        before.restore_containers()
        return graph, tracer
    if not _has_attention(retraced, again.root):
        return graph, tracer
    return retraced, again


def trace_parent(module: nn.Module, concrete: Dict[str, Any], training: bool) -> fx.GraphModule:
    """The forward of a module that calls blocks (or their parts), every submodule a leaf, in
    the given train/eval mode; ``concrete``: its non-tensor arguments, specialised. Raises
    what the trace raises (a random draw outside the traced tensors included)."""
    import numpy as np
    was = module.training
    module.train(training)
    before = StateBeforeTrace(module)
    tracer = BlockTracer(set())
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    try:
        graph = tracer.trace(module, concrete_args=dict(concrete))
        if random.getstate() != states[0] or not np.array_equal(np.random.get_state()[1], states[1][1]) \
                or not torch.equal(torch.random.get_rng_state(), states[2]):
            # (``from random import random`` escapes the patched functions; NumPy's are not)
            raise AnalysisError(type(module).__name__, "its forward draws a random number outside "
                                "its traced tensors: a program would keep the one drawn while tracing")
        drop_constant_asserts(graph)
        python_numbers(graph)
        return fx.GraphModule(tracer.root, graph, type(module).__name__)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        before.restore_containers()
        module.train(was)


def _holds_family_leaves(module: nn.Module, tracer: "BlockTracer") -> bool:
    """Whether a retry that keeps the families' leaf modules whole (timm's notrace registry)
    can trace differently: the block holds one that the first trace went into."""
    leaves = tracer._notrace_modules
    return bool(leaves) and any(isinstance(m, leaves) for m in module.modules() if m is not module)


def mark_batch_specialised(a: "BlockAnalysis", gm: fx.GraphModule, batch: int):
    """A trace that specialised a value on the batch size makes the block trace one program
    per batch size (block.py); ``batch`` is the size this trace was made for."""
    if gm.meta.get("evo_batch_specialised") and a.batch_size is None:
        a.batch_size = int(batch)
        a.notes.append(f"the trace specialised a value on the batch size ({batch}): one program "
                       "per batch size, built at the first call with it")


_FACTORIES = ("empty", "zeros", "ones", "full")     # (torch.<f>(size...) has x.new_<f>(size...))


def _trace_hint(e: Exception) -> str:
    """What a torch.fx failure means for the block, where it is known."""
    if "not installed as a submodule" in str(e):
        return ("; the block makes a module inside its forward (e.g. `nn.Softmax(dim=-1)(x)`): "
                "torch.fx traces modules that are attributes of the block only (make it one, or "
                "call the function: `x.softmax(-1)`)")
    if "control flow" in str(e) or "must be a bool, but got" in str(e):
        return ("; its forward branches on tensor values (an `if` or an assert on a tensor), "
                "which a trace cannot keep: evoplug converts blocks whose computation is fixed "
                "for an input shape")
    if "unknown to einops" in str(e):    # (its functions are kept whole where fx can patch them)
        return ("; an einops function called from a function of another module than the block's "
                "(a helper) meets torch.fx's proxies there: register that helper with "
                "evoplug.register_leaf_function")
    if "'Proxy' object cannot be interpreted as an integer" in str(e):
        return ("; a Python loop or `range` over a traced size (`for i in range(x.shape[1])`: the "
                "tokens one by one), which a trace cannot keep (the kept tokens are fewer than the "
                "calibration's): write it over all the tokens at once, or move the loop into a "
                "submodule without attention (an MLP of its own), which evoplug runs whole as a leaf")
    f = str(e).split("(")[0]
    if isinstance(e, TypeError) and "positional argument" in str(e) and f in _FACTORIES:
        return (f"; `torch.{f}` given sizes read from a traced tensor, which torch.fx cannot "
                f"trace: make the tensor from one that is traced (`x.new_{f}(...)`), or register "
                "the function that makes it with evoplug.register_leaf_function")
    return ""
