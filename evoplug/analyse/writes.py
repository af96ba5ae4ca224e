"""What a block's forward writes on itself and the modules it traces into, as a trace sees it:
augmented assignments on attributes traced in place (``self.n += 1``), values set as
attributes or buffers found and put back after the trace (``self.attn_map = attn``), plain
tensor attributes a trace changed by running the forward's own code, and the
:func:`set_by_forward` marks the programs turn into writes (rewrite/program.py
``_set_by_forward``; runtime/programs.py ``set_written`` sets them), and the Python state it
changes at each call, which no program does (:meth:`StateBeforeTrace.moved_in_python`: the
block is refused). :class:`StateBeforeTrace` records what a trace may change and puts it back."""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .graph import writes_in_place


#: Python's augmented assignments and the in-place tensor methods they run
_IN_PLACE = {"__iadd__": "add_", "__isub__": "sub_", "__imul__": "mul_", "__itruediv__": "div_",
             "__ifloordiv__": "floor_divide_", "__imod__": "remainder_", "__ipow__": "pow_",
             "__iand__": "bitwise_and_", "__ior__": "bitwise_or_", "__ixor__": "bitwise_xor_",
             "__ilshift__": "bitwise_left_shift_", "__irshift__": "bitwise_right_shift_"}


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


class StateBeforeTrace:
    """What the modules of a block hold before a trace runs its forward's Python with proxies,
    recorded once for every use: each module's own attributes and buffers (by identity; a
    forward that sets one leaves a proxy there), the contents of its lists and dicts (caches,
    LeViT's attention-bias cache, must not keep proxies; a list that grows is a forward that
    moves Python state), and its plain tensor attributes with their versions and values (a
    forward may change one eagerly). :meth:`put_back` puts all of it back; the other methods
    tell what the trace changed."""

    def __init__(self, module: nn.Module):
        self.modules = []
        for path, m in module.named_modules():
            attrs = dict(vars(m))
            containers = {k: type(v)(v) for k, v in attrs.items()
                          if not k.startswith("_") and isinstance(v, (dict, list))}
            tensors = {k: (_version(v), v.detach().clone()) for k, v in attrs.items()
                       if isinstance(v, torch.Tensor) and not k.startswith("_tensor_constant")}
            self.modules.append((path, m, attrs, dict(m._buffers), containers, tensors))

    def restore_containers(self):
        """The lists and dicts put back as they were, the same objects (one a cache holds)."""
        for _, m, attrs, _, containers, _ in self.modules:
            for k, copy_ in containers.items():
                obj = attrs[k]
                if isinstance(obj, dict):
                    obj.clear()
                    obj.update(copy_)
                else:
                    obj[:] = copy_
                setattr(m, k, obj)

    def proxies_put_back(self) -> List[Tuple[str, str, fx.Node, str]]:
        """What the trace set to a traced value (a proxy) on a module, as (module path, name,
        node, kind: ``"attribute"``, ``"buffer"`` or ``"non-persistent buffer"``), each put back
        as it was before the trace (or removed)."""
        found = []
        for path, m, attrs, buffers, _, _ in self.modules:
            for now, before in ((m._buffers, buffers), (vars(m), attrs)):
                for k, v in list(now.items()):
                    if isinstance(v, fx.Proxy):
                        kind = "attribute" if now is not m._buffers else \
                            "non-persistent buffer" if k in m._non_persistent_buffers_set else "buffer"
                        found.append((path, k, v.node, kind))
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
        for path, m, attrs, _, _, tensors in self.modules:
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

    def moved_in_python(self) -> Tuple[str, ...]:
        """What of the Python numbers (flags, strings, tuples of them), lists and dicts the
        modules hold the trace's run of the forward changed (after the proxies it set were put
        back), each named with how: Python the forward runs on the block's state at each call
        (``self.hist.append(t)``, ``self.cache['last'] = t``, ``self.n += 1`` on an int), which
        a trace runs once and its programs never. A value set again as the calibration left it
        (transformers' Swin's shift set to 0, a cached size) moves no more, and a key a dict
        gains is a cache filled (LeViT's attention-bias cache, keyed by the traced device)."""
        moved = []
        for path, m, attrs, _, containers, _ in self.modules:
            for k, v in attrs.items():
                where = f"{path}.{k}" if path else k
                if k not in _MODULE_KEYS and _is_number(v):
                    moved += _number_moved(m, k, where, v)
                elif not k.startswith("_") and type(v) in (list, dict):
                    moved += _container_moved(m, k, where, v, containers[k])
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
    for path, name, node, kind in found:
        target = f"{path}.{name}" if path else name
        first = node.args[0] if node.op == "call_method" and writes_in_place(node) else node
        if node.graph is not graph or (isinstance(first, fx.Node) and first.op == "get_attr"
                                       and first.target == target):     # (or only read)
            continue
        with graph.inserting_before(out):
            graph.call_function(set_by_forward, (path, name, node, kind))


#: nn.Module's own bookkeeping (hooks, parameter dicts, ``training``): not the forward's state
_MODULE_KEYS = frozenset(nn.Module().__dict__)
_NUMBERS = (bool, int, float, complex, str, type(None))
_GONE = object()


def _is_number(v) -> bool:
    return type(v) in _NUMBERS or type(v) is tuple and all(type(i) in _NUMBERS for i in v)


def _number_moved(m: nn.Module, k: str, where: str, v) -> List[str]:
    now = vars(m).get(k, _GONE)
    if now is v or now is not _GONE and type(now) is type(v) and now == v:
        return []
    return [f"`{where}` ({type(v).__name__}: {v!r}, then "
            f"{'deleted' if now is _GONE else repr(now)} after one more call)"]


def _container_moved(m: nn.Module, k: str, where: str, v, before) -> List[str]:
    now = vars(m).get(k, _GONE)
    if type(v) is list and (now is not v or len(v) != len(before) or
                            any(a is not b for a, b in zip(v, before))):
        more = len(now) - len(before) if type(now) is list else 0
        return [f"`{where}` (a list: " + (
            f"{abs(more)} item(s) {'more' if more > 0 else 'fewer'} at each call)" if more
            else "set anew at each call)")]
    if type(v) is dict and (now is not v or any(v.get(i, _GONE) is not before[i] for i in before)):
        return [f"`{where}` (a dict: an item set anew or removed at each call)"]
    return []
