"""What a block's forward writes on itself and the modules it traces into, as a trace sees it:
augmented assignments on attributes traced in place (``self.n += 1``), values set as
attributes or buffers found and put back after the trace (``self.attn_map = attn``), plain
tensor attributes a trace changed by running the forward's own code, and the
:func:`set_by_forward` marks the programs turn into writes (rewrite/program.py
``_set_by_forward``; runtime/programs.py ``set_written`` sets them), and the Python state it
changes at each call, which no program does (:meth:`StateBeforeTrace.moved_in_python`: the
block is refused), but the sizes it records (:func:`python_writes`), and the state its first
call sets up, which the conversion's forwards ran and no program does
(:func:`set_up_on_first_call`: the block is refused). :class:`StateBeforeTrace` records what a
trace may change and puts it back."""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import enum
import sys
import threading
import types
from typing import List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..runtime.pairs import is_plain, plain_dataclass
from ..runtime.spec import under, weights_only
from .graph import depends_on_data, is_view, writes_in_place


#: Python's augmented assignments and the in-place tensor methods they run
_IN_PLACE = {"__iadd__": "add_", "__isub__": "sub_", "__imul__": "mul_", "__itruediv__": "div_",
             "__ifloordiv__": "floor_divide_", "__imod__": "remainder_", "__ipow__": "pow_",
             "__iand__": "bitwise_and_", "__ior__": "bitwise_or_", "__ixor__": "bitwise_xor_",
             "__ilshift__": "bitwise_left_shift_", "__irshift__": "bitwise_right_shift_"}
#: the names of Python's augmented assignments on a tensor (analyse/same_start.py)
IN_PLACE_OPERATORS = frozenset(_IN_PLACE)


@contextlib.contextmanager
def in_place_on_attributes():
    """``self.n += 1`` on a buffer (or another tensor the trace reads as an attribute) traced as
    the tensor runs it: in place (``n.add_(1)``). fx's proxies have no ``__iadd__``, so Python
    made it ``self.n = self.n + 1``, a new tensor set as the buffer, which the programs never
    set: the counter stayed where the conversion left it (audit H4 of the forty-fourth session).
    Other values (a local ``x += y``) are traced as before."""
    def in_place(method):
        def op(p, other):
            if p.node.op != "get_attr":
                return NotImplemented        # (Python then runs ``p + other``)
            return p.tracer.create_proxy("call_method", method, (p, other), {})
        return op
    saved = {name: fx.Proxy.__dict__.get(name) for name in _IN_PLACE}
    for name, method in _IN_PLACE.items():
        setattr(fx.Proxy, name, in_place(method))
    try:
        yield
    finally:
        for name, before in saved.items():
            if before is None:
                delattr(fx.Proxy, name)
            else:
                setattr(fx.Proxy, name, before)


@contextlib.contextmanager
def recorded_assignments():
    """Yields {(id of the module's ``__dict__``, name): ids of the modules whose code set it}
    of the attributes this thread sets on modules (``self.shift = 0``) while it runs; the setter
    is the module whose method made the assignment (``self`` there: a parent setting
    ``blk.H = H`` before each call is not the block), None where no module's method did. Of a
    trace: what its run of the forward sets again at each call; of the calibration: what a
    module's own code set (by ``__dict__``: a trace's root may be a twin sharing the block's).
    ``nn.Module.__setattr__`` is patched while any thread records (other threads' conversions
    may record at once: each records its own)."""
    found = {}
    with _RECORDING_LOCK:
        if not _RECORDING:
            nn.Module.__setattr__ = _recording
        _RECORDING.append(found)
    _RECORDERS.__dict__.setdefault("stack", []).append(found)
    try:
        yield found
    finally:
        _RECORDERS.stack.pop()
        with _RECORDING_LOCK:
            _RECORDING.remove(found)
            if not _RECORDING:
                nn.Module.__setattr__ = _SETATTR


_SETATTR = nn.Module.__setattr__
_RECORDERS = threading.local()       # this thread's recorders (innermost last)
_RECORDING: list = []                # every thread's: the patch stays while one records
_RECORDING_LOCK = threading.Lock()


def _recording(m: nn.Module, name: str, value):
    stack = getattr(_RECORDERS, "stack", None)
    if stack:
        caller = sys._getframe(1)             # (the method's first argument: its ``self``)
        code = caller.f_code
        setter = caller.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
        who = id(setter) if isinstance(setter, nn.Module) else None
        for found in stack:
            found.setdefault((id(vars(m)), name), set()).add(who)
    _SETATTR(m, name, value)


def set_up_on_first_call(gm: fx.GraphModule, module: nn.Module, tensors: dict, values: dict,
                         set_by: dict) -> List[str]:
    """What of ``module``'s state (of the block and the modules the trace ran the Python of,
    not those it called whole) the block's code set up at the conversion's forwards and its
    program takes as set up: a buffer or tensor attribute they changed or made (``tensors``:
    {id(module): names}) that the graph reads and never writes (``self.gamma``, built when None;
    an ActNorm scale filled from the first batch), a plain value they changed (``values``) that
    the trace's run of the forward did not set again (a size or a scale read from the first
    batch). A flag (a bool) counts through the tensors its first call's branch sets up (the
    ActNorm scale behind ``initialized``): a warn-once flag (``self.warned = True``) sets up
    nothing the program reads. A forward that keeps its state at each call (a counter, a running mean, an
    attention map, Swin's shift set again) sets or writes it in the graph; what a module outside
    the block set on it (``set_by``: :func:`recorded_assignments` of the calibration; a parent's
    ``blk.H = H``) is not the block's."""
    nodes = list(gm.graph.nodes)
    whole = [n.target for n in nodes if n.op == "call_module"]
    read = {n.target for n in nodes if n.op == "get_attr"}
    written = {f"{n.args[0]}.{n.args[1]}" if n.args[0] else n.args[1] for n in nodes
               if n.op == "call_function" and n.target is set_by_forward}
    written |= {t.target for t in map(_attribute_written, nodes) if t is not None}
    assigned = gm.meta.get("evo_assigned", frozenset())
    inside = {id(m) for m in module.modules()} | {None}       # (None: no module's method set it)
    found = []
    for path, m in module.named_modules():
        if under(path, whole):
            continue
        name = (lambda k: f"{path}.{k}") if path else (lambda k: k)   # noqa: E731
        own = [k for k in tensors.get(id(m), ()) + values.get(id(m), ())
               if set_by.get((id(vars(m)), k), {None}) & inside and k not in _set_by_weight_hooks(m)]
        found += [f"`{name(k)}` ({'a buffer' if k in m._buffers else 'a tensor attribute'})"
                  for k in own if k in tensors.get(id(m), ()) and name(k) in read and
                  name(k) not in written]
        found += [f"`{name(k)}` ({type(getattr(m, k, None)).__name__}: {getattr(m, k, None)!r} "
                  f"after the first call)" for k in own if k in values.get(id(m), ()) and
                  (id(vars(m)), k) not in assigned and type(getattr(m, k, None)) is not bool]
    return found


def objects_set_by_forward(gm: fx.GraphModule, module: nn.Module, objects: dict, set_by: dict) -> List[str]:
    """What of ``module``'s attributes (of the block and the modules the trace ran the Python
    of, not those it called whole, which run their own) the block's code set, at the
    calibration, to a Python object no program sets (``objects``: calibrate.py
    ``objects_set``; ``set_by``: :func:`recorded_assignments`), named with its class: a
    ``self.cfg = Cfg(H, W)`` of a class of the model's own, or of a dataclass compared by
    identity. Dataclasses were not followed at all until the fiftieth session: the converted
    model kept the value from before the conversion at every size, without a word."""
    whole = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    inside = {id(m) for m in module.modules()} | {None}
    found = []
    for path, m in module.named_modules():
        if under(path, whole):
            continue
        found += [f"`{path + '.' if path else ''}{k}` (a {type(getattr(m, k, None)).__name__})"
                  for k in objects.get(id(m), ()) if set_by.get((id(vars(m)), k), {None}) & inside]
    return found


def _set_by_weight_hooks(m: nn.Module) -> set:
    """The names ``m``'s pre-hooks that set a weight from its own parameters (runtime/spec.py
    ``weights_only``: pruning's, ``spectral_norm``'s and ``weight_norm``'s hook forms) set at
    each call, as the programs run them (``run_weight_hooks``): not set up at a first call.
    spectral_norm's ``weight`` (the raw weight until the first call) on a module the block
    traces into was refused as set up at the first call until the forty-eighth session."""
    return {getattr(h, "name", getattr(h, "_tensor_name", None)) for h in m._forward_pre_hooks.values()
            if weights_only({0: h})}


def _attribute_written(n: fx.Node) -> Optional[fx.Node]:
    """The attribute (a get_attr node) an in-place write ``n`` writes into, or a view of it."""
    if not writes_in_place(n):
        return None
    t = n.args[0]
    while isinstance(t, fx.Node) and t.op != "get_attr" and (is_view(t) or writes_in_place(t)):
        t = t.args[0]
    return t if isinstance(t, fx.Node) and t.op == "get_attr" else None


class StateBeforeTrace:
    """What the modules of a block hold before a trace runs its forward's Python with proxies,
    recorded once for every use: each module's own attributes and buffers (by identity; a
    forward that sets one leaves a proxy there), the contents of its standard containers
    (lists, dicts, sets, deques: caches, LeViT's attention-bias cache, must not keep proxies; a
    list that grows is a forward that moves Python state) and the attributes of the plain
    objects it holds (a dataclass, a SimpleNamespace), and its plain tensor attributes with
    their versions and values (a forward may change one eagerly). :meth:`put_back` puts all of
    it back; the other methods tell what the trace changed."""

    def __init__(self, module: nn.Module):
        self.modules, self.held, seen = [], [], set()
        for path, m in module.named_modules():
            attrs = dict(vars(m))
            tensors = {k: (_version(v), v.detach().clone()) for k, v in attrs.items()
                       if isinstance(v, torch.Tensor) and not k.startswith("_tensor_constant")}
            self.modules.append((path, m, attrs, dict(m._buffers), tensors))
            self.held.append((path, m, attrs, _containers(attrs)))
            for k, v in attrs.items():        # (one level down: the objects' own attributes)
                if _is_plain_object(v) and _own(k) and id(v) not in seen:
                    seen.add(id(v))
                    inner = dict(vars(v))
                    self.held.append((f"{path}.{k}" if path else k, v, inner, _containers(inner)))
        self.nested = [n for path, _, attrs, _ in self.held for n in nested_containers(
            {(f"{path}.{k}" if path else k): v for k, v in attrs.items() if _own(k)})]

    def restore_containers(self):
        """The containers put back as they were, the same objects (one a cache holds), and the
        plain objects' attributes, and the containers nested in them."""
        for _, c, copy_ in self.nested:
            c.clear()
            c.extend(copy_) if isinstance(c, (list, collections.deque)) else c.update(copy_)
        for _, obj, attrs, containers in self.held:
            for k, copy_ in containers.items():
                c = attrs[k]
                c.clear()
                c.extend(copy_) if isinstance(c, (list, collections.deque)) else c.update(copy_)
                if isinstance(obj, nn.Module):
                    setattr(obj, k, c)
            if not isinstance(obj, nn.Module):
                vars(obj).clear()
                vars(obj).update(attrs)

    def proxies_put_back(self) -> List[Tuple[str, str, fx.Node, str]]:
        """What the trace set to a traced value (a proxy) on a module, as (module path, name,
        node, kind: ``"attribute"``, ``"buffer"`` or ``"non-persistent buffer"``), each put back
        as it was before the trace (or removed); sizes kept as a tuple, list or dict of traced
        values (``self.hw = (H, W)``) too, their node a tuple, list or dict of nodes, and a list
        or dict of plain values set anew (``self.hw = [H, W]`` of ints its parent passed in:
        constants to the trace), as it is."""
        found = []
        for path, m, attrs, buffers, _ in self.modules:
            for now, before in ((m._buffers, buffers), (vars(m), attrs)):
                for k, v in list(now.items()):
                    if isinstance(v, fx.Proxy) or _set_anew(k, v, before.get(k, _GONE), now is m._buffers):
                        kind = "attribute" if now is not m._buffers else \
                            "non-persistent buffer" if k in m._non_persistent_buffers_set else "buffer"
                        found.append((path, k, _as_nodes(v), kind))
                        if k in before:
                            now[k] = before[k]
                        else:
                            del now[k]
        return found

    def changed_eagerly(self) -> Tuple[Tuple[nn.Module, str, str], ...]:
        """The plain tensor attributes (not parameters or buffers) the trace changed by running
        the forward's own code on them, as (module, name, path), each put back as it was: fx
        reads such an attribute as the tensor, so ``self.total += 1`` or ``self.total =
        self.total + 1`` (no traced value in it) ran once while tracing and not in the program,
        and the counter stood still after the conversion (a known gap of the forty-fourth
        session)."""
        changed = []
        for path, m, attrs, _, tensors in self.modules:
            for k, (version, copy_) in tensors.items():
                v = attrs[k]
                if vars(m).get(k) is v and _version(v) == version:
                    continue
                changed.append((m, k, f"{path}.{k}" if path else k))
                if _version(v) != version:
                    with torch.no_grad():
                        v.copy_(copy_)
                vars(m)[k] = v
        return tuple(changed)

    def tensors_set(self) -> Tuple[Tuple[str, str, torch.Tensor], ...]:
        """The plain tensor attributes (not parameters or buffers) the trace's run of the
        forward set to a tensor of its own, no traced value (``self.g = torch.tensor(0.5)``), as
        (module path, name, tensor), each put back as it was (or removed): the forward sets that
        tensor at each call, and its programs set it too (python_writes' values). Its programs
        set none until the forty-ninth session: a twin's, at another input size, left the
        value a call at a third size had set."""
        found = []
        for path, m, attrs, _, _ in self.modules:
            now, hooked = vars(m), _set_by_weight_hooks(m)    # (pruning's ``weight``: not the forward's)
            for k, v in list(now.items()):
                if isinstance(v, torch.Tensor) and not isinstance(v, (fx.Proxy, nn.Parameter)) and \
                        v is not attrs.get(k) and _own(k) and not k.startswith("_") and k not in hooked:
                    found.append((path, k, v))
                    if k in attrs:
                        now[k] = attrs[k]
                    else:
                        del now[k]
        return tuple(found)

    def moved_in_python(self, gains: bool = False, skip=()) -> Tuple[str, ...]:
        """What of the Python numbers (flags, strings, tuples of them), the containers and the
        plain objects' attributes the modules hold the trace's run of the forward changed (after
        the proxies it set were put back), each named with how: Python the forward runs on the
        block's state at each call (``self.hist.append(t)``, ``self.cache['last'] = t``,
        ``self.n += 1`` on an int, ``self.stats.count += 1``), which a trace runs once and its
        programs never. A value set again as the calibration left it (transformers' Swin's
        shift set to 0, a cached size) moves no more. A key or item a dict, set or object gains
        counts with ``gains`` alone: a cache filled (LeViT's attention-bias cache, keyed by the
        traced device) gains nothing at a second call on the same input, which a log
        (``self.log[len(self.log)] = t``, ``self.ids.add(id(x))``) does (analyse/block.py
        ``_moved_at_a_second_call``). Not those named in ``skip`` (``path.name``)."""
        moved = []
        for path, obj, attrs, containers in self.held:
            now = vars(obj)
            for k, v in attrs.items():
                where = f"{path}.{k}" if path else k
                if where in skip:
                    continue
                if k in containers:
                    moved += _container_moved(now.get(k, _GONE), where, v, containers[k], gains)
                elif k not in _MODULE_KEYS and is_number(v):
                    moved += _number_moved(now.get(k, _GONE), where, v)
            more = [k for k in now if k not in attrs]
            if gains and more and not isinstance(obj, nn.Module):
                moved.append(f"`{path}` (a {type(obj).__name__}: {len(more)} attribute(s) more "
                             f"after one more call: {', '.join(more)})")
        for where, c, before in self.nested:
            if where.partition("[")[0] not in skip:
                moved += _container_moved(c, where, c, before, gains)
        return tuple(moved)

    def put_back(self):
        """Everything as it was before the trace."""
        self.restore_containers()
        self.proxies_put_back()
        self.changed_eagerly()


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:      # (an inference tensor counts no versions)
        return None


@fx.node.has_side_effect
def set_by_forward(path: str, name: str, value, kind: str = "attribute"):
    """Marks, in a block's graph, a value its forward sets on itself or on a module it traced
    into (``self.attn_map = attn.detach()``), as ``kind``
    (:meth:`StateBeforeTrace.proxies_put_back`: a buffer where it sets one,
    ``self.register_buffer('last', ...)``); the program sets it on the block there
    (rewrite/program.py ``_set_by_forward``). Does nothing where the analysis runs the
    graph."""
    return None


def mark_set_by_forward(graph: fx.Graph, found):
    """A :func:`set_by_forward` node for each value of this graph the forward set (an update in
    place of the same attribute, ``self.n += 1`` on a buffer, is one already)."""
    out = next(n for n in graph.nodes if n.op == "output")
    order = {n: i for i, n in enumerate(graph.nodes)}
    for path, name, node, kind in found:
        target = f"{path}.{name}" if path else name
        nodes = _nodes_in(node)
        if any(n.graph is not graph for n in nodes):
            continue
        for n in nodes:      # (``x.shape``: a node fx makes at its first use, after the output)
            if order.get(n, -1) > order[out]:
                out.prepend(n)
        first = node.args[0] if isinstance(node, fx.Node) and node.op == "call_method" \
            and writes_in_place(node) else node
        if isinstance(first, fx.Node) and first.op == "get_attr" and first.target == target:
            continue                                                      # (or only read)
        with graph.inserting_before(out):
            graph.call_function(set_by_forward, (path, name, node, kind))


def python_writes(graph: fx.Graph, evaluate, follows_batch) -> Tuple[Tuple, Tuple[str, ...]]:
    """The Python values (not tensors) the :func:`set_by_forward` marks of ``graph`` set, as
    (module path, name, value), their marks removed: a size the forward records from its input
    (``self.H, self.W = H, W``, ``self.hw = (H, W)``, ``[H, W]``, ``{"H": H, "W": W}``,
    ``self.in_shape = x.shape``), ``evaluate(node)``: its value on the calibration input, the
    full input the dense forward gets (a program runs on the kept tokens, whose count would be
    the subset's). The block sets them again at each call of its programs (BlockSpec.writes);
    second, those of them that ``follows_batch(node)`` (a cached batch size: the calibration's
    at every batch size). Values computed from the tokens' values, not their sizes, are not
    evaluated: alone, a tensor the program sets (``self.attn_map = attn``); in a tuple, list or
    dict, or any that holds a tensor, ``ValueError`` names them: no program sets them."""
    out, by_batch = [], []
    for n in [n for n in graph.nodes if n.op == "call_function" and n.target is set_by_forward]:
        path, name, value, _ = n.args
        if isinstance(value, fx.Node) and (value.op == "get_attr" or depends_on_data(value)):
            continue          # (a tensor: set by the program)
        target = f"{path}.{name}" if path else name
        got = None if any(map(depends_on_data, _nodes_in(value))) else _mapped(value, evaluate)
        if isinstance(got, torch.Tensor):
            continue
        if got is None or any(isinstance(v, torch.Tensor) for v in _leaves(got)):
            raise ValueError(f"its forward sets `{target}` to a {type(_mapped(value, str)).__name__} that holds a "
                             "tensor, which its programs cannot set as the forward does: set each "
                             "tensor as an attribute of its own")
        out.append((path, name, got))
        if any(follows_batch(v) for v in _nodes_in(value)):
            by_batch.append(target)
        graph.erase_node(n)
    return tuple(out), tuple(by_batch)


def _set_anew(name: str, v, before, buffer: bool) -> bool:
    """A tuple, list or dict of traced values set as an attribute (``self.hw = (H, W)``), or a
    list or dict of plain values (``self.hw = [H, W]`` of ints passed in, ``self.cache = {}``),
    not one the forward put them in (``self.hist.append(t)``: Python state, see
    moved_in_python). A list of plain values set anew was refused as Python state changed at
    each call (audit L2 of the forty-seventh session): it is a value the forward sets, which
    python_writes records (a log set anew, ``self.sizes = self.sizes + [n]``, is refused by
    name still: analyse/block.py ``_moved_at_a_second_call``)."""
    if buffer or v is before or not _own(name):
        return False
    leaves = _leaves(v)
    return any(isinstance(i, fx.Proxy) for i in leaves) or (
        type(v) in (list, dict) and all(is_number(i) for i in leaves))


def _leaves(v) -> list:
    """The items of ``v``, a (nested) tuple, list or dict (its values), or dataclass (its
    fields), or ``[v]``."""
    if isinstance(v, (tuple, list)):
        return [i for item in v for i in _leaves(item)]
    if isinstance(v, dict):
        return [i for item in v.values() for i in _leaves(item)]
    if plain_dataclass(v):
        return [i for f in dataclasses.fields(v) for i in _leaves(getattr(v, f.name))]
    return [v]


def _mapped(v, fn):
    """``v`` with ``fn`` applied to its nodes (or proxies, or those of its items: a tuple, list
    or dict of them), as plain tuples, lists and dicts (a graph holds its own kinds of them); a
    named tuple or a dataclass as one of its class (a named tuple became a plain tuple, and its
    forward was refused as one that changes Python state, until the fiftieth session)."""
    if isinstance(v, (fx.Node, fx.Proxy)):
        return fn(v)
    if isinstance(v, tuple) and hasattr(v, "_fields"):        # (a named tuple: its own class)
        return type(v)(*(_mapped(i, fn) for i in v))
    if isinstance(v, (tuple, list)):
        return (tuple if isinstance(v, tuple) else list)(_mapped(i, fn) for i in v)
    if isinstance(v, dict):
        return {k: _mapped(i, fn) for k, i in v.items()}
    if plain_dataclass(v):        # (its class, with its fields mapped: Cfg(H, W) of traced sizes)
        return dataclasses.replace(v, **{f.name: _mapped(getattr(v, f.name), fn)
                                         for f in dataclasses.fields(v) if f.init})
    return v


def _as_nodes(v):
    return _mapped(v, lambda p: p.node)


def _nodes_in(v) -> list:
    return [i for i in _leaves(v) if isinstance(i, fx.Node)]


#: nn.Module's own bookkeeping (hooks, parameter dicts, ``training``): not the forward's state
_MODULE_KEYS = frozenset(nn.Module().__dict__)
_NUMBERS = (bool, int, float, complex, str, type(None))
_GONE = object()


#: the standard containers whose contents are followed and put back (their subclasses too:
#: OrderedDict, defaultdict, Counter)
_CONTAINERS = (list, dict, set, collections.deque)
#: the packages whose objects are not looked into (their own state, not a forward's)
_NOT_PLAIN = frozenset(sys.stdlib_module_names) | {"builtins", "torch", "numpy", "evoplug"}


def _own(k: str) -> bool:
    """An attribute that may be the forward's state: not nn.Module's bookkeeping nor evoplug's."""
    return k not in _MODULE_KEYS and not k.startswith("_evo")


def _containers(attrs: dict) -> dict:
    return {k: copy.copy(v) for k, v in attrs.items() if _own(k) and isinstance(v, _CONTAINERS)}


def nested_containers(values: dict) -> list:
    """(``where[key]``, container, a shallow copy) of each list, dict, set or deque nested in
    the containers and tuples of ``values`` ({where: value}), at any depth, outer ones first:
    a forward that changes one in place (``self.cfg["inner"]["g"] = 0.5``,
    ``self.stats["inner"]["n"] += 1``) changes the block's state as one that changes a
    top-level container does. Only the top level was followed until the fiftieth session: such
    a counter stood still after the conversion, without a word (StateBeforeTrace), and a nested
    dict a twin's calibration had changed was left so, the next call refused as the user's
    change (snapshot.py). Then four levels down, until the fifty-third: a forward that counted
    in a dict nested five deep (``self.log["a"]["b"]["c"]["d"]["e"]["n"] += 1``) converted
    without a word, its count left at the calibration's and never moved again (1 where the
    dense model had 3 after three calls). Walked with a stack of its own: no recursion limit."""
    seen: set = set()
    found = []
    stack = list(reversed(values.items()))
    while stack:
        where, v = stack.pop()
        if not isinstance(v, _CONTAINERS + (tuple,)) or isinstance(v, set):
            continue
        inner = []
        for k, i in (v.items() if isinstance(v, dict) else enumerate(v)):
            if isinstance(i, _CONTAINERS + (tuple,)) and id(i) not in seen:
                seen.add(id(i))
                inner.append((f"{where}[{k!r}]", i))
        for w, i in inner:
            if isinstance(i, _CONTAINERS):
                found.append((w, i, copy.copy(i)))
        stack.extend(reversed(inner))
    return found


def _is_plain_object(v) -> bool:
    """An object whose own attributes a forward may change in place (``self.stats.count += 1``
    on a dataclass, a SimpleNamespace, an instance of a class of the model's code); not a
    module, tensor, class, function, enum, nor an object of the standard library or torch."""
    if type(v) is types.SimpleNamespace:
        return True
    return (hasattr(v, "__dict__") and not callable(v) and not isinstance(v, _CONTAINERS)
            and not isinstance(v, (enum.Enum, torch.Tensor)) and type(v).__module__.partition(".")[0] not in _NOT_PLAIN)


def unfollowed(v) -> bool:
    """A Python object a forward may set as an attribute that no program can set as it does:
    an object of the model's code (:func:`_is_plain_object`) that is no plain value
    (runtime/pairs.py ``is_plain``: a dataclass compared by identity, ``eq=False``, or holding
    a tensor; an instance of a class of its own)."""
    return _is_plain_object(v) and not is_plain(v)


def is_number(v) -> bool:
    """A plain Python value: a number, flag, string or None, or a tuple of them."""
    return type(v) in _NUMBERS or type(v) is tuple and all(type(i) in _NUMBERS for i in v)


def _number_moved(now, where: str, v) -> List[str]:
    if now is v or now is not _GONE and type(now) is type(v) and now == v:
        return []
    return [f"`{where}` ({type(v).__name__}: {v!r}, then "
            f"{'deleted' if now is _GONE else repr(now)} after one more call)"]


def _container_moved(now, where: str, v, before, gains: bool) -> List[str]:
    """How the container ``v`` (``before``: its items) changed, ``now`` what the attribute
    holds; a dict's or set's new keys or items with ``gains`` alone."""
    kind = type(v).__name__
    if isinstance(v, (list, collections.deque)):
        if now is v and len(v) == len(before) and all(a is b for a, b in zip(v, before)):
            return []
        more = len(now) - len(before) if type(now) is type(v) else 0
        how = (f"{abs(more)} item(s) {'more' if more > 0 else 'fewer'}" if more else
               "set anew" if now is not v else "its items changed")
        return [f"`{where}` (a {kind}: {how} at each call)"]
    if isinstance(v, dict) and (now is not v or any(v.get(i, _GONE) is not before[i] for i in before)):
        return [f"`{where}` (a {kind}: an item set anew or removed at each call)"]
    if isinstance(v, set) and (now is not v or not before <= v):
        return [f"`{where}` (a {kind}: " + ("set anew" if now is not v else "an item removed") + " at each call)"]
    if gains and len(v) > len(before):
        return [f"`{where}` (a {kind}: {len(v) - len(before)} "
                f"{'key(s)' if isinstance(v, dict) else 'item(s)'} more after one more call)"]
    return []
