"""The tracer that traces one block on its own (BlockTracer, a torch.fx Tracer): its leaf rule
(every submodule without attention, the registered leaf modules and the families' notrace ones),
Python branches, ``int()`` and ``len()`` on traced sizes specialised on the calibration input
(refused where they follow the tensors' values or the token count; a check that only raises is
dropped, but one on the block's own weights is kept as ``torch._assert_async``), buffers read as
attributes, hooks never baked in, and the process-wide patches a trace needs (no random draw
outside the traced tensors, one trace at a time, put back after a fork).
trace.py drives it; split from trace.py in the fifty-fourth session."""
from __future__ import annotations

import contextlib
import inspect
import operator
import os
import random
import sys
import threading
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..integrations import registry
from .graph import (GRAD_MODE, ancestors, depends_on_data, random_source, run_nodes,
                    values_of_attributes)
from .modes import grad_mode_now, mode_changes_watched, requires_grad_branch
from .writes import in_place_on_attributes, recorded_assignments


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
        # those the last trace kept whole: see trace.py, _into_wrapped
        self._trace_into = trace_into
        self.global_wrapped: frozenset = frozenset()
        self.specialised: List[str] = []
        # (the root's parameters and buffers a specialised value was computed from, its note):
        # analyse/block.py ``branches_on_weights`` refuses the block
        self.weight_branches: List[Tuple[Tuple[str, ...], str]] = []
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
        views the full map, and the probe checks the converted block. One on the block's own
        weights stays (:meth:`_keep_weight_check`)."""
        if self._example is None:
            return super().to_bool(obj)
        value = bool(self._evaluate(obj.node, self._example))
        if _is_guard(inspect.currentframe()):
            self.specialised.append(f"check {obj.node.name} (passes on the calibration input)")
            self._keep_weight_check(obj.node)
            return value
        grad = next((n for n in ancestors(obj.node) | {obj.node} if n.op == "call_function"
                     and n.target is getattr and n.args[1:] == ("requires_grad",)), None)
        if grad is not None:
            raise fx.proxy.TraceError(requires_grad_branch(grad.args[0], inspect.currentframe()))
        self._check_dependence(obj.node, value, "a Python branch")
        self._specialised(obj.node, f"{obj.node.name} -> {value}")
        return value

    def _keep_weight_check(self, node: fx.Node):
        """A check on the values of the root's own parameters or buffers alone (``assert
        (self.gate > 0).all()``) stays in the trace as ``torch._assert_async``: it raises where
        the weights make it fail (after ``load_state_dict``, an optimiser step), as the dense
        forward does, without a host sync on a GPU. It was dropped as passing at the conversion
        until the fifty-fifth session. Checks on the tokens or their sizes are dropped, as
        above."""
        read = values_of_attributes(node)
        if not read or not set(read) <= self._own_state() or depends_on_data(node):
            return
        self.create_node("call_function", torch._assert_async, (node, (
            f"evoplug: a check (assert) on {', '.join(f'`{r}`' for r in read)} in the block's "
            "forward failed, as it would in the original forward")), {})

    def to_int(self, obj: fx.Proxy) -> int:
        """``int()`` of a traced size (MMPretrain's ``window_reverse``: the batch size from the
        number of windows): specialised on the calibration input like a branch."""
        value = int(self._evaluate(obj.node, self._example))
        self._check_dependence(obj.node, value, "an int() of a traced value")
        self._specialised(obj.node, f"int({obj.node.name}) -> {value}")
        return value

    def _specialised(self, node: fx.Node, note: str):
        """Notes a value specialised on the calibration input, and where it was computed from
        the values (not the sizes) of the root's parameters or buffers, those (audit A1 of the
        fifty-fourth session: ``if self.gate > 0`` kept the conversion's branch after
        ``load_state_dict``)."""
        self.specialised.append(note)
        own = self._own_state()
        read = tuple(t for t in values_of_attributes(node) if t in own)
        if read:
            self.weight_branches.append((read, note))

    def _own_state(self) -> Set[str]:
        """The names of the root's parameters and buffers (what ``get_attr`` nodes target)."""
        return {n for n, _ in self.root.named_parameters()} | {n for n, _ in self.root.named_buffers()}

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
    if bool(body) and body[-1].opname == "RAISE_VARARGS" and not any(
            ins.opname.startswith("RETURN") or
            ("JUMP" in ins.opname and isinstance(ins.argval, int) and not
             body[0].offset <= ins.argval < target) for ins in body[:-1]):
        return True
    # or the jump goes straight to a raise: the first part of ``assert a and b`` (refused as
    # a branch on the token count, ``assert L == H * W and ...``, until the fifty-fifth session)
    start = next((i for i, ins in enumerate(insts) if ins.offset == target), None)
    rest = insts[start:] if start is not None else []
    end = next((i for i, ins in enumerate(rest) if ins.opname == "RAISE_VARARGS"), None)
    return end is not None and not any(ins.opname.startswith("RETURN") or "JUMP" in ins.opname
                                       for ins in rest[:end])


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
