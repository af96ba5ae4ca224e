"""Tracing one block on its own: the tracer (leaf rule, Python branches and ``int()`` on traced
sizes specialised on the calibration input, checks dropped, buffers as attributes, hooks never
baked in) and the call plan of the block."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import operator
import os
import random
import sys
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..errors import AnalysisError
from ..integrations import registry
from ..runtime.call import CallPlan, inverse, packed_name, same_constant, tensor_tuple
from .calibrate import ModuleCall
from .canon import tokenise_map_block
from .graph import (GRAD_MODE, ancestors, depends_on_data, inserting_as, is_softmax, module_of,
                    random_source, run_nodes)
from .modes import (grad_mode_now, keep_grad_modes_set, mode_changes_watched, own_checkpointing_back,
                    own_checkpointing_off, requires_grad_branch)
from .reads import leaf_reads
from .writes import (StateBeforeTrace, in_place_on_attributes, mark_set_by_forward, python_writes,
                     recorded_assignments)

if TYPE_CHECKING:
    from .block import BlockAnalysis


#: ops whose output's shape may follow the values of their input (with ``where``: one argument;
#: ``repeat_interleave``: repeats in a tensor)
_VALUE_SHAPED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
                 "bincount", "where", "repeat_interleave"}


def _shape_follows_values(node: fx.Node) -> bool:
    """Whether the shape of ``node`` (and so a ``len()`` of it: a tensor's first dim, the parts
    of a split) may follow the values of the block's tensors, not only their shapes: an op
    whose output's size is data-dependent (``nonzero``, boolean indexing) on the way, or a
    split whose sizes are a tensor. ``q, k, v = map(f, qkv.chunk(3, -1))`` asks for a length
    that follows the shape (refused as data-dependent control flow until audit H3 of the
    twenty-seventh session; the token-count and batch checks still run on it)."""
    for n in ancestors(node) | {node}:
        if n.op not in ("call_method", "call_function"):
            continue
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        tensors: List[fx.Node] = []       # the nodes among its other arguments
        fx.node.map_arg((n.args[1:], n.kwargs), lambda a: tensors.append(a) or a)
        if name in _VALUE_SHAPED and not (name == "where" and len(n.args) + len(n.kwargs) > 1) \
                and not (name == "repeat_interleave" and not any(depends_on_data(a) for a in tensors)):
            return True
        if (n.target is operator.getitem or name in _SPLITS) and any(depends_on_data(a) for a in tensors):
            return True     # x[mask], x[idx], x.split(sizes_tensor)
    return False


_SPLITS = {"chunk", "split", "unbind", "tensor_split", "split_with_sizes"}


class BlockTracer(fx.Tracer):
    """Traces into the modules that ran attention; every other submodule is a leaf, and so are
    the registered leaf modules (evoplug.register_leaf_module) and, unless they hold the
    block's attention, the families' ones (timm's notrace registry). Registered leaf functions
    become single nodes.

    Leaves keep their own Python (so drop path / dropout follow ``train()`` at run time) and
    the probes (probes.py) check they are token-wise.
    """

    def __init__(self, attention_modules: Set[int], into_notrace: bool = False,
                 example: Optional[Dict[str, Any]] = None, trace_into: frozenset = frozenset(),
                 kept: Tuple = (), caller_grad: bool = True):
        leaf_functions = registry.leaf_functions()
        super().__init__(autowrap_functions=leaf_functions)
        # a leaf function called by its package's name (``einops.rearrange(...)``) as well as by
        # an imported name: fx patches it where it finds it, in the modules it searches
        search = getattr(self, "_autowrap_search", None)
        for fn in leaf_functions:
            package = sys.modules.get((getattr(fn, "__module__", None) or "").split(".")[0])
            if isinstance(search, list) and package is not None and package not in search:
                search.append(package)
        self._attention_modules = attention_modules
        self._leaf_modules = registry.leaf_modules()
        self._notrace_modules = registry.family_leaf_modules()
        self._into_notrace = into_notrace
        self._example = example          # the block's calibration arguments, by name
        # functions registered with torch.fx.wrap (for the whole process) to trace into, and
        # those the last trace kept whole: see _into_wrapped
        self._trace_into = trace_into
        self.global_wrapped: frozenset = frozenset()
        self.specialised: List[str] = []
        self.batch_specialised = False   # a specialised value depends on the batch size
        # buffers (masks, index tables) become get_attr nodes, not tensor constants: the
        # program then reads the block's live buffers, which follow .to(device, dtype)
        self.proxy_buffer_attributes = True
        # fx patches nn.Module.__call__ and __getattr__ for the whole process while it traces:
        # other threads' modules (the same model's, running forwards) must run as usual
        self._thread = threading.get_ident()
        # plain tensor attributes the forward changes (``self.total += 1``): traced as
        # attributes, read and set by the program (see StateBeforeTrace.changed_eagerly)
        self._kept = kept
        # traced as a caller with gradients on (off: analyse/modes.py) runs it; whether the
        # forward sets a mode or reads it, and whether the tracer's own evaluation runs now
        self._caller_grad, self.sets_grad_mode, self.evaluating = caller_grad, False, False
        self.reads_grad_mode = False

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        out = super().create_args_for_root(root_fn, is_module, concrete_args)
        for m, name, target in self._kept:
            vars(m)[name] = self.create_proxy("get_attr", target, (), {})
        return out

    def getattr(self, attr: str, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_node(self, *args, **kwargs) -> fx.Node:
        """fx's node, marked with the gradient mode its op ran in where the forward set one
        (graph.GRAD_MODE: ``with torch.no_grad():``, which a graph does not keep): the program
        runs it so (rewrite/grad_mode.py). Without it, an EMA kept under ``no_grad`` in a
        buffer took the tokens' autograd history in training, a chain growing at each step
        (audit L2 of the forty-seventh session)."""
        node = super().create_node(*args, **kwargs)
        mode = grad_mode_now(self._caller_grad)
        if mode is not None:
            node.meta[GRAD_MODE] = mode
        return node

    def create_arg(self, a):
        """A plain tensor registered as a parameter (``torch.func.functional_call`` swaps the
        parameters for the tensors it is given) is read from the block like the parameter, not
        baked into the program as a constant: a twin built for a new input size inside
        ``functional_call`` kept the tensors of that call for every later one (EVA's
        ``gamma_1``, off by 7.9, and no gradient for it; audit P of the twenty-sixth session)."""
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and \
                threading.get_ident() == self._thread:
            for name, p in self.root.named_parameters():
                if a is p:
                    return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """Python control flow on traced values (MMPretrain's ``if H != H_pad`` on padded map
        sizes): specialise on the calibration input, by evaluating the traced value there. The
        same value is evaluated with about half of the tokens: a branch that depends on the
        token count is refused (the program runs on fewer tokens than it was traced with).

        A check (``assert``, or a branch whose other path only raises) is not a branch: it
        passes on the calibration input (which ran), and one on the token count (MMPretrain's
        ``assert L == H * W`` before the tokens become a map) is dropped: evoplug feeds such
        views the full map, and the probe checks the converted block."""
        if self._example is None:
            return super().to_bool(obj)
        value = bool(self._evaluate(obj.node, self._example))
        if _is_guard(inspect.currentframe()):
            self.specialised.append(f"check {obj.node.name} (passes on the calibration input)")
            return value
        grad = next((n for n in ancestors(obj.node) | {obj.node} if n.op == "call_function"
                     and n.target is getattr and n.args[1:] == ("requires_grad",)), None)
        if grad is not None:
            raise fx.proxy.TraceError(requires_grad_branch(grad.args[0], inspect.currentframe()))
        self._check_dependence(obj.node, value, "a Python branch")
        self.specialised.append(f"{obj.node.name} -> {value}")
        return value

    def to_int(self, obj: fx.Proxy) -> int:
        """``int()`` of a traced size (MMPretrain's ``window_reverse``: the batch size from the
        number of windows): specialised on the calibration input like a branch."""
        value = int(self._evaluate(obj.node, self._example))
        self._check_dependence(obj.node, value, "an int() of a traced value")
        self.specialised.append(f"int({obj.node.name}) -> {value}")
        return value

    def to_len(self, obj: fx.Proxy) -> int:
        """``len()`` of a traced value (Hugging Face's ``(*hidden_states.shape[:-1], -1, d)``):
        the length of a shape, specialised on the calibration input like ``int()``; the
        items themselves stay traced (:meth:`iter`)."""
        value = len(self._evaluate(obj.node, self._example))
        self._check_dependence(obj.node, value, "the length of a traced value", convert=len,
                               shape_only=not _shape_follows_values(obj.node))
        self.specialised.append(f"len({obj.node.name}) -> {value}")
        return value

    def iter(self, obj: fx.Proxy):
        """Iterating a traced value (unpacking a shape): one traced item per element, their
        number specialised on the calibration input."""
        if self._example is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(self.to_len(obj))])

    def _check_dependence(self, node: fx.Node, value, what: str, convert=None,
                          shape_only: bool = False):
        """Refuse a value that depends on the tensors' values or on the token count; note one
        that depends on the batch size (MMPretrain's ``window_reverse`` computes B with
        ``int()``): such a block gets one program per batch size."""
        drawn = random_source(node)
        if drawn is not None:
            raise fx.proxy.TraceError(
                f"{what} (`{node.name}`) depends on a random number (`{drawn.name}`): a trace "
                "would keep the one drawn while tracing (a block skipped at random, LayerDrop, "
                "would always run or never). Register the module that draws with "
                "evoplug.register_leaf_module, or skip blocks outside them")
        if not shape_only and depends_on_data(node):
            raise fx.proxy.TraceError(
                f"{what} (`{node.name}`) depends on the values of the tensors (data-dependent "
                "control flow), which a trace cannot follow: register the function or module "
                "that holds it with evoplug.register_leaf_function / register_leaf_module")
        convert = convert or type(value)
        sub = self._subset_example()
        if sub is not None and self._value_on(node, sub, convert, value) != value:
            raise fx.proxy.TraceError(
                f"{what} (`{node.name}`) depends on the number of tokens, so a program "
                "specialised on all tokens would be wrong on the kept ones")
        if self._value_on(node, self._doubled(), convert, None) != value:
            self.batch_specialised = True

    def _doubled(self) -> Dict[str, Any]:
        """The calibration arguments with the batch twice over."""
        B = next(v for v in self._example.values() if isinstance(v, torch.Tensor)).shape[0]
        return {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() >= 2 and
                v.shape[0] == B else v for k, v in self._example.items()}

    def recorded(self, node: fx.Node):
        """The value of ``node``, a Python value the forward sets on a module (a size it
        records: analyse/writes.py ``python_writes``), on the calibration input."""
        return self._evaluate(node, self._example)

    def follows_batch(self, node: fx.Node) -> bool:
        """Whether the value of ``node`` (see :meth:`recorded`) is another with the batch
        twice over."""
        return self._value_on(node, self._doubled(), lambda v: v, None) != self.recorded(node)

    def _value_on(self, node: fx.Node, example, kind: type, unknown):
        """The traced value on another example; ``unknown`` when the path cannot run on it
        (a view of the tokens as the full grid, on a token subset: the programs feed such
        views the full map, and the probes run the converted block on a subset)."""
        try:
            return kind(self._evaluate(node, example))
        except RuntimeError as e:
            # (the first line: torch's text goes on with "While executing ..." and a traceback)
            first = str(e).strip().split("\n")[0]
            note = f"{node.name}: not evaluated on another example ({first})"
            if note not in self.specialised:
                self.specialised.append(note)
            return unknown

    def trace(self, root, concrete_args=None):
        """fx's trace, with ``int(proxy)`` specialised (:meth:`to_int`) when there is a
        calibration input, and item assignment into traced tensors recorded as
        ``operator.setitem`` (MMPretrain's shift-window mask is filled slice by slice).

        The calls of wrapped functions (timm's ``window_reverse``) lose their ``is_wrapped``
        mark: with it, the code of every GraphModule built on the graph, at each recompile,
        registers its own namespace with ``torch.fx.wrap`` for the rest of the process (the
        registry only grows: every later trace patches each entry, 8 ms a trace after a few
        hundred), so that fx may trace the module again. evoplug's modules are never traced
        again: converted blocks refuse torch.fx (runtime/block.py)."""
        with _ONE_TRACE:
            # (one trace at a time in the process: fx patches torch functions and
            # nn.Module.__call__ globally, and two threads' patches interleaved left them patched
            # and broke both conversions; audit V8 of the thirty-seventh session)
            # (gradients on, or off: the modes the forward sets are the ones that differ)
            with _traced_into(self._trace_into), recorded_assignments() as self.assigned, \
                    torch.inference_mode(False), torch.set_grad_enabled(self._caller_grad), \
                    mode_changes_watched(self):     # (inference_mode(False) sets grad on)
                graph = self._trace(root, concrete_args)
            wrapped = {n.target for n in graph.nodes
                       if n.op == "call_function" and n.meta.get("is_wrapped")}
            self.global_wrapped = frozenset(wrapped & _globally_wrapped())
        for node in graph.nodes:
            node.meta.pop("is_wrapped", None)
        return graph

    def _trace(self, root, concrete_args):
        if self._example is None or hasattr(fx.Proxy, "__int__"):
            with _no_python_random(), in_place_on_attributes():
                return super().trace(root, concrete_args)

        def to_int(p):
            if isinstance(p.tracer, BlockTracer):
                return p.tracer.to_int(p)
            raise TypeError("'Proxy' object cannot be interpreted as an integer")

        def setitem(p, key, value):
            p.tracer.create_proxy("call_function", operator.setitem, (p, key, value), {})

        def length(p):
            if isinstance(p.tracer, BlockTracer):
                return p.tracer.to_len(p)
            raise RuntimeError("'len' is not supported in symbolic tracing")

        saved_len = fx.Proxy.__dict__.get("__len__")
        fx.Proxy.__int__ = to_int
        fx.Proxy.__setitem__ = setitem
        fx.Proxy.__len__ = length
        try:
            with _no_python_random(), in_place_on_attributes():
                return super().trace(root, concrete_args)
        finally:
            del fx.Proxy.__int__
            del fx.Proxy.__setitem__
            if saved_len is not None:
                fx.Proxy.__len__ = saved_len
            else:
                del fx.Proxy.__len__

    def _subset_example(self) -> Optional[Dict[str, Any]]:
        """The calibration arguments with the (B, N, C) tokens cut to about half, and the other
        tensor arguments' dims of N tokens (rotary tables, masks) cut the same way."""
        name, x = next(((k, v) for k, v in self._example.items() if isinstance(v, torch.Tensor)),
                       (None, None))
        if x is None or x.dim() != 3 or x.shape[1] < 3:
            return None
        N, n = x.shape[1], x.shape[1] // 2 + 1
        out = dict(self._example, **{name: x[:, :n]})
        for k, v in self._example.items():
            if k != name and isinstance(v, torch.Tensor):
                for d in range(v.dim()):
                    if v.shape[d] == N:
                        v = v.narrow(d, 0, n)
                out[k] = v
        return out

    def _evaluate(self, node: fx.Node, example: Dict[str, Any]):
        root = self.root
        env: Dict[fx.Node, Any] = {}
        for n in self.graph.nodes:
            # placeholders fx adds for the leaves of constant arguments (``hw_shape_1``) feed
            # only its own value checks: they need no value unless the evaluated node uses them
            if n.op == "placeholder" and n.target in example:
                env[n] = example[n.target]
        was = root.training
        root.eval()    # no statistics updates while evaluating (BatchNorm in train mode)
        self.evaluating = True
        try:
            # run the real modules and functions: fx's patches (Module.__call__, wrapped
            # functions) are lifted while evaluating, as fx itself does for such calls
            from torch.fx._symbolic_trace import _maybe_revert_all_patches
            with torch.no_grad(), _maybe_revert_all_patches():
                return run_nodes(self.graph, node, root, env)
        finally:
            root.train(was)
            self.evaluating = False

    def call_module(self, m: nn.Module, forward, args, kwargs):
        """A module traced into contributes its own computation, not its hooks: a hook is the
        user's, and may be removed after the conversion (the converted block runs its original
        forward while a traced-into module has hooks, so they fire as before)."""
        if threading.get_ident() != self._thread:    # another thread's module: as usual
            return forward(*args, **kwargs)
        if not self.is_leaf_module(m, self.path_of_module(m)):
            forward = m.forward
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.MultiheadAttention):
            return True
        if self._leaf_modules and isinstance(m, self._leaf_modules):
            return True
        if self._notrace_modules and isinstance(m, self._notrace_modules) and not (
                self._into_notrace and id(m) in self._attention_modules):
            return True
        if id(m) not in self._attention_modules:
            return True
        if parametrize.is_parametrized(m):
            # parametrize's subclass of the module's class lives in torch.nn.utils, which fx
            # takes for a torch.nn leaf: judge the class it was made from
            base = type(m).__bases__[0]
            return base.__module__.startswith(("torch.nn.", "torch.ao.nn.")) and \
                not issubclass(base, nn.Sequential)
        return super().is_leaf_module(m, qualname)


_COND_JUMPS = {"POP_JUMP_IF_TRUE", "POP_JUMP_FORWARD_IF_TRUE", "POP_JUMP_IF_FALSE",
               "POP_JUMP_FORWARD_IF_FALSE"}


_PYTHON_RANDOM = ("random", "uniform", "randint", "randrange", "choice", "choices", "gauss",
                  "normalvariate", "betavariate", "sample", "shuffle")
_TORCH_RANDOM = ("rand", "randn", "randint", "randperm", "bernoulli", "normal", "multinomial",
                 "poisson")


#: threads tracing a block now (ident -> depth), and the functions patched while any is
_TRACING: Dict[int, int] = {}
_TRACING_LOCK = threading.Lock()
_ONE_TRACE = threading.RLock()
_PATCHED: List[Tuple[Any, str, Any]] = []


@contextlib.contextmanager
def _no_python_random():
    """No random number is drawn while a block is traced, outside the traced tensors: Python's
    ``random``, or a torch draw from no traced value (``torch.rand(()).item() < p``). The trace
    would keep the one number drawn then (a block that skips itself at random in training
    would always run or never), and the draw would move the caller's random state. (Draws on
    traced values, timm's drop path ``x.new_empty(...).bernoulli_()``, are traced ops.)

    Also: PyTorch's ``nn.TransformerEncoderLayer`` reads a mask's dtype with
    ``F._none_or_dtype``, which raises on anything but None or a tensor; on a traced mask
    (``src_mask``) it reads the proxy's dtype, a metadata node (branches on it are specialised).

    The functions are patched for the process while any thread traces (installed by the first,
    restored by the last: threads converting at once leave nothing behind); other threads get
    the originals."""
    me = threading.get_ident()
    with _TRACING_LOCK:
        if not _TRACING:
            _install_tracing_patches()
        _TRACING[me] = _TRACING.get(me, 0) + 1
    try:
        yield
    finally:
        with _TRACING_LOCK:
            _TRACING[me] -= 1
            if not _TRACING[me]:
                del _TRACING[me]
            if not _TRACING:
                for mod, n, f in _PATCHED:
                    setattr(mod, n, f)
                _PATCHED.clear()


def _after_fork():
    """A child forked while another thread traced: that thread does not exist there; the lock it
    may hold is new, and the functions patched for it are restored."""
    global _TRACING_LOCK, _ONE_TRACE
    _TRACING_LOCK = threading.Lock()
    _ONE_TRACE = threading.RLock()
    me = threading.get_ident()
    for ident in [i for i in _TRACING if i != me]:
        del _TRACING[ident]
    if not _TRACING:
        for mod, n, f in _PATCHED:
            setattr(mod, n, f)
        _PATCHED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _install_tracing_patches():
    def refuse(module, name, original, traced_ok):
        def draw(*args, **kwargs):
            if threading.get_ident() not in _TRACING or (traced_ok and any(
                    isinstance(v, fx.Proxy) for v in list(args) + list(kwargs.values()))):
                return original(*args, **kwargs)      # another thread, or a traced draw
            raise fx.proxy.TraceError(
                f"the block draws a random number outside its traced tensors "
                f"({module}.{name}): a trace would keep the one drawn while tracing (a block "
                "skipped at random would always run or never). Draw with torch on the block's "
                "tensors, register the module that draws with evoplug.register_leaf_module, or "
                "skip blocks outside them")
        return draw

    def dtype_of(original):
        def read(t):
            if isinstance(t, fx.Proxy) and threading.get_ident() in _TRACING:
                return t.dtype
            return original(t)
        return read
    _PATCHED.extend([(random, n, getattr(random, n)) for n in _PYTHON_RANDOM] +
                    [(torch, n, getattr(torch, n)) for n in _TORCH_RANDOM])
    for mod, n, f in _PATCHED:
        setattr(mod, n, refuse(mod.__name__, n, f, mod is torch))
    _PATCHED.append((F, "_none_or_dtype", F._none_or_dtype))
    F._none_or_dtype = dtype_of(_PATCHED[-1][2])


def _python_numbers(graph: fx.Graph):
    """NumPy scalars in the graph's arguments as Python numbers: fx prints them as
    ``np.float64(...)`` in the code it generates, where ``np`` is no name (MMPretrain's
    SwinTransformerV2 clamps by ``np.log(1 / 0.01)``: a NameError out of the generated code,
    past every refusal; audit V of the twenty-fifth session)."""
    import numpy as np

    def plain(a):
        return a.item() if isinstance(a, np.generic) else a
    for n in graph.nodes:
        if n.op in ("call_function", "call_method"):
            n.args = torch.utils._pytree.tree_map(plain, n.args)
            n.kwargs = torch.utils._pytree.tree_map(plain, n.kwargs)


def _is_guard(frame) -> bool:
    """Whether the ``bool()`` being traced is the condition of a check: a conditional jump
    whose other path only raises (``assert``, also as pytest rewrites it, or ``if bad: raise``).
    Read from the bytecode of the user frame above ``Proxy.__bool__``."""
    import dis
    while frame is not None and frame.f_code.co_name in ("_is_guard", "to_bool", "__bool__"):
        frame = frame.f_back
    if frame is None:
        return False
    insts = list(dis.get_instructions(frame.f_code))
    at = next((i for i, ins in enumerate(insts) if ins.offset == frame.f_lasti), None)
    if at is not None and insts[at].opname == "TO_BOOL":   # Python >= 3.13
        at += 1
    if at is None or insts[at].opname not in _COND_JUMPS or not isinstance(insts[at].argval, int):
        return False
    target = insts[at].argval
    body = [ins for ins in insts[at + 1:] if ins.offset < target]
    # the other path ends in a raise and never leaves (its jumps stay inside: message building)
    return bool(body) and body[-1].opname == "RAISE_VARARGS" and not any(
        ins.opname.startswith("RETURN") or
        ("JUMP" in ins.opname and isinstance(ins.argval, int) and not
         body[0].offset <= ins.argval < target) for ins in body[:-1])


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
        _drop_unread_attributes(graph)
        _drop_constant_asserts(graph)
        _python_numbers(graph)
        _split_baddbmm(graph)
        _out_as_copy(graph)
        if plan.token_perm:
            _cancel_permutes(graph)
        _constants_to_buffers(module)
        _tensor_only_signature(graph, plan, name)
        # assembled before the mode is restored: some modules' train() drops cached tensors the
        # graph refers to (MMPretrain LeViT's attention bias cache `ab`)
        gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
        gm.meta["evo_batch_specialised"] = tracer.batch_specialised
        gm.meta["evo_specialised"] = list(tracer.specialised)
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


def _globally_wrapped() -> set:
    """The functions registered with ``torch.fx.wrap`` in this process (torchvision's
    ``shifted_window_attention``, timm's ``maybe_add_mask``, ...)."""
    from torch.fx._symbolic_trace import _wrapped_fns_to_patch
    return {f for (_, name), space in list(_wrapped_fns_to_patch.items())
            if callable(f := space.get(name))}


@contextlib.contextmanager
def _traced_into(functions: frozenset):
    """fx traces into ``functions`` though they are registered with ``torch.fx.wrap``: their
    entries are lifted from fx's table while it traces (callers hold _ONE_TRACE)."""
    if not functions:
        yield
        return
    from torch.fx._symbolic_trace import _wrapped_fns_to_patch as table
    held = {key: space for key, space in list(table.items()) if space.get(key[1]) in functions}
    for key in held:
        del table[key]
    try:
        yield
    finally:
        table.update(held)


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
        _drop_constant_asserts(graph)
        _python_numbers(graph)
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


def _constants_to_buffers(module: nn.Module):
    """Tensors that tracing baked into the graph are stored by fx as plain attributes of the
    root (the block): make them non-persistent buffers, so ``.to()``/``.half()`` move them with
    the block while the state_dict stays the same."""
    for k in [k for k, v in vars(module).items()
              if k.startswith("_tensor_constant") and isinstance(v, torch.Tensor)]:
        t = module.__dict__.pop(k)
        module.register_buffer(k, t, persistent=False)


def _tensor_only_signature(graph: fx.Graph, plan: CallPlan, name: str):
    """Programs take (tokens, *tensor arguments): constant arguments (None, flags, the
    feature size list of PVT) are baked into the trace, so their placeholders go, and with
    them fx's pytree input handling for list constants."""
    keep = {plan.token_arg, *plan.tensor_args}
    for n in [n for n in graph.nodes if n.op == "placeholder"]:
        if n.target not in keep:
            if n.users:
                raise AnalysisError(name, f"constant argument `{n.target}` is used as a value in the trace")
            graph.erase_node(n)
    info = getattr(graph._codegen, "pytree_info", None)
    graph._codegen = fx.graph.CodeGen()
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0]
    if info is not None and info.out_spec is not None and isinstance(result, (list, tuple)):
        # the output as the block returns it, not pytree's flat leaves: transformers' Swinv2
        # stage returns (tokens, tokens, (h, w, h, w)), which came back as 6 items and broke
        # the encoder (audit Q2 of the twenty-sixth session)
        tree = torch.utils._pytree.tree_unflatten(list(result), info.out_spec)
        if isinstance(tree, (list, tuple)):      # (a single tensor stays as its one leaf)
            result = tree
    if isinstance(result, (list, tuple)) and result and isinstance(result[0], fx.Node):
        # a tuple-returning block (Hugging Face: (hidden_states, attn_weights)): the graph
        # returns its tokens; the other items are kept aside (their nodes stay in the graph)
        # and the program returns them next to the tokens (rewrite/program.py: _outputs)
        out.args = (result[0],)
        out.meta["evo_rest"] = tuple(result[1:])
    graph.lint()


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


def _out_as_copy(graph: fx.Graph):
    """``torch.add(a, b, out=t)`` as ``t.copy_(torch.add(a, b))``: a write into ``t`` in place,
    which the analysis follows as it follows ``t.mul_(...)`` or ``t[...] = ...`` (the writes
    from the tokens into a buffer named, keep 1.0 run by the block's own forward). Written with
    ``out=``, a running mean kept in a buffer was not seen as written: it held the kept tokens'
    mean where the block evolved, without a word (audit K6 of the forty-sixth session)."""
    for node in list(graph.nodes):
        out = node.kwargs.get("out") if node.op in ("call_function", "call_method") else None
        if not isinstance(out, fx.Node):
            continue
        with inserting_as(graph, node):
            value = graph.create_node(node.op, node.target, node.args, {
                k: v for k, v in node.kwargs.items() if k != "out"})
            written = graph.call_method("copy_", (out, value))
        node.replace_all_uses_with(written)
        graph.erase_node(node)


def _split_baddbmm(graph: fx.Graph):
    """``baddbmm(bias, q, k^T, beta=, alpha=)``, attention logits with an added term in one
    call, as ``beta * bias + alpha * bmm(q, k^T)``: the product the analysis finds attention by,
    and an additive term on the logits like any other (gathered for the kept tokens)."""
    for node in list(graph.nodes):
        fn = node.op == "call_function" and node.target is torch.baddbmm
        if not (fn or (node.op == "call_method" and node.target == "baddbmm")):
            continue
        names = ("input", "batch1", "batch2")
        args = dict(zip(names, node.args)) | {k: v for k, v in node.kwargs.items() if k in names}
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if len(args) != 3 or set(node.kwargs) - set(names) - {"beta", "alpha"} or \
                not all(isinstance(v, (int, float, fx.Node)) for v in (beta, alpha)):
            continue
        with inserting_as(graph, node):
            out = graph.call_function(torch.bmm, (args["batch1"], args["batch2"]))
            if isinstance(alpha, fx.Node) or alpha != 1:      # (a scale read from a shape)
                out = graph.call_function(operator.mul, (out, alpha))
            if isinstance(beta, fx.Node) or beta != 0:
                bias = args["input"] if not isinstance(beta, fx.Node) and beta == 1 else \
                    graph.call_function(operator.mul, (args["input"], beta))
                out = graph.call_function(operator.add, (out, bias))
        node.replace_all_uses_with(out)
        graph.erase_node(node)


def _cancel_permutes(graph: fx.Graph):
    """``x.permute(p).permute(q)`` that gives ``x`` back is ``x``: a block that takes a
    channels-first map and permutes it to channels-last itself (VitDet) is traced through the
    permute to its own layout (CallPlan.token_perm) and back; the pair goes, so the residual
    stream starts at the block's input as for a block that takes the map."""
    def perm_of(n):
        if n.op == "call_method" and n.target == "permute" and isinstance(n.args[0], fx.Node):
            dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
            if all(isinstance(d, int) for d in dims):
                return tuple(dims)
        return None
    for n in list(graph.nodes):
        q = perm_of(n)
        first = n.args[0] if q is not None else None
        p = perm_of(first) if first is not None else None
        if p is None or len(p) != len(q) or tuple(p[i] for i in q) != tuple(range(len(q))):
            continue
        n.replace_all_uses_with(first.args[0])
        graph.erase_node(n)
        if not first.users:
            graph.erase_node(first)


def _drop_unread_attributes(graph: fx.Graph):
    """Attributes the trace read and nothing uses go: ``self.register_buffer('last', ...)`` in a
    forward asks ``hasattr(self, 'last')``, which read the buffer the calibration's forward had
    registered and the conversion took away, and every program raised ``AttributeError`` (audit
    J1 of the forty-fifth session)."""
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(node)


def _drop_constant_asserts(graph: fx.Graph):
    """fx guards concrete (constant) arguments with torch._assert; CallPlan.bind checks them."""
    for node in list(graph.nodes):
        if node.op == "call_function" and (node.target is torch._assert or
                                           getattr(node.target, "__name__", "") == "_assert_is_none"):
            cond = node.args[0]
            graph.erase_node(node)
            if isinstance(cond, fx.Node) and not cond.users:
                graph.erase_node(cond)
    graph.lint()
