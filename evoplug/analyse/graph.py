"""Queries on a traced block graph (fx): which node adds, multiplies matrices, takes a softmax,
reshapes; ancestors; shapes recorded by shape propagation; partial evaluation."""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}


_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm, torch.einsum}


_SOFTMAX_FUNCS = {F.softmax, torch.softmax, torch.Tensor.softmax}


#: the node meta key of the gradient mode a traced op ran in where the forward set one:
#: ``"no_grad"`` (``with torch.no_grad():``, ``torch.set_grad_enabled(False)``), ``"grad"``
#: (``with torch.enable_grad():``, whatever the caller's mode) or ``"inference"``
#: (``torch.inference_mode()``); absent: the mode the program is called in (analyse/modes.py)
GRAD_MODE = "evo_grad_mode"


@contextlib.contextmanager
def inserting_as(graph: fx.Graph, node: fx.Node, after: bool = False):
    """``graph.inserting_before(node)`` (``after``: ``inserting_after``), the nodes made there
    marked with ``node``'s gradient mode (:data:`GRAD_MODE`): what a pass puts in the place of
    the forward's ops runs in the mode the forward ran them in. Made with fx's own, a pass's
    nodes had no mark and ran in the caller's mode (an attention's ``baddbmm`` split into
    ``bmm`` and an add inside the forward's ``torch.no_grad()`` took gradients; until the
    forty-eighth session)."""
    lo, hi = (node, node.next) if after else (node.prev, node)
    with (graph.inserting_after if after else graph.inserting_before)(node):
        yield
    mode, n = node.meta.get(GRAD_MODE), lo.next
    while mode is not None and n is not hi and n.op != "root":
        n.meta.setdefault(GRAD_MODE, mode)
        n = n.next


def is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _ADD_FUNCS) or \
        (n.op == "call_method" and n.target in ("add", "add_"))


def is_matmul(n: fx.Node) -> bool:
    return (n.op == "call_function" and (n.target in _MATMUL_FUNCS or _is_einops_einsum(n.target))) \
        or (n.op == "call_method" and n.target in ("matmul", "bmm"))


def _is_einops_einsum(fn) -> bool:
    """``einops.einsum(a, b, pattern)``, kept whole by the tracer (integrations/einops.py)."""
    return getattr(fn, "__name__", None) == "einsum" and \
        (getattr(fn, "__module__", None) or "").startswith("einops")


def module_of(gm: fx.GraphModule, n: fx.Node) -> Optional[nn.Module]:
    if n.op != "call_module":
        return None
    try:
        return gm.get_submodule(n.target)
    except AttributeError:
        return None


def computed_in(n: fx.Node, unit: str = "") -> str:
    """`` in `stages.1.blocks.2.xca` (XCA)``: the innermost submodule whose code computed node
    ``n`` (fx's ``nn_module_stack``), named from the model when the traced unit is ``unit``;
    empty when the unit's own code computed it. An error about an attention map deep inside
    a stage names the attention module, not only the stage (EdgeNeXt's channel attention)."""
    stack = n.meta.get("nn_module_stack") if isinstance(n, fx.Node) else None
    if not stack:
        return ""
    path, cls = list(stack.values())[-1]
    if not path:
        return ""
    return f" in `{unit + '.' if unit else ''}{path}` ({getattr(cls, '__name__', cls)})"


def is_softmax(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in _SOFTMAX_FUNCS:
        return True
    if n.op == "call_method" and n.target == "softmax":
        return True
    return isinstance(module_of(gm, n), nn.Softmax)


def softmax_dim(gm: fx.GraphModule, n: fx.Node):
    if n.op == "call_module":
        return module_of(gm, n).dim
    if "dim" in n.kwargs:
        return n.kwargs["dim"]
    return n.args[1] if len(n.args) > 1 else None


def input_dependent(graph: fx.Graph) -> Set[fx.Node]:
    """Nodes that depend on any placeholder (the tokens or another block argument)."""
    dep: Set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def value_dependent(graph: fx.Graph, any_size: bool = False) -> Set[fx.Node]:
    """Nodes that depend on the *values* of a block argument: as :func:`input_dependent`, but
    a size query of the token argument passes no dependence on (a bias table sized from the
    token count, HF BEiT's ``dim_size=hidden_states.shape[1]``, is a position term; the
    program sizes it from the full input, rewrite/positions.py). ``any_size``: no size query
    passes it on (transformers' SAM sizes its relative positions from the normed map)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    token = placeholders[0] if placeholders else None
    dep: Set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            dep.add(n)
        elif is_size_query(n) and n.args and (any_size or token_wise_of(n.args[0], token)):
            continue
        elif any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def token_wise_of(n, token: fx.Node) -> bool:
    """``n`` is the token argument, or made from it alone by ops that keep its token count, so
    its token count is the tokens': modules (a norm: transformers' Data2Vec-Vision sizes its
    relative positions from the normed tokens' ``shape[1]``), dtype/layout methods (the ``x``
    of ``t.type_as(x)`` is only a dtype read), a functional norm (``F.layer_norm(x, (C,), w,
    b)``), a scaling or shift by a constant of no larger shape (``norm1(x) * gamma``), and any
    op that acts on each token alone, whatever its width (timm's ``RmsNorm``, a hand-written
    norm, ``qkv(x)``: told by running it, :func:`~.pointwise.node_treats_tokens_alike`). Their
    other arguments may be parameters, buffers and sizes (``.to(x.dtype)``): until audit G1 of
    the forty-third session only modules and methods of one input were followed, and until
    audit H2 of the forty-fourth session only the modules of a list (LayerNorm, RMSNorm,
    Dropout, Identity), without ``type_as``: a position bias sized from such a read was taken
    for a term of the tokens' values (not gathered) and the block refused."""
    while isinstance(n, fx.Node) and n is not token:
        inputs = [i for i in value_inputs(n) if not _constant_or_size(i)]
        if len(inputs) != 1 or not (_keeps_shape(n, inputs[0]) or _acts_token_by_token(n, inputs[0])):
            return False
        n = inputs[0]
    return n is token


def _acts_token_by_token(n: fx.Node, src: fx.Node) -> bool:
    """``n``, a module, gives each token of ``src`` (batch, tokens, ..., channels) its output
    from that token alone, as many tokens as ``src`` at any count (its width may differ). Run
    once per node (kept in its meta with ``src``), outside torch.func's transforms (a program
    built for a new batch size inside ``vmap``, whose random numbers it refuses). Not a function:
    ``F.pad`` by nothing at the calibration's size passes the probe, and pads at others."""
    shape, out = shape_of(src), shape_of(n)
    if n.op != "call_module" or shape is None or out is None or len(shape) < 3 or out[:-1] != shape[:-1]:
        return False
    known = n.meta.get("_evo_token_wise")
    if known is None or known[0] is not src:
        from .pointwise import node_treats_tokens_alike     # (pointwise.py imports this module)
        with torch._C._DisableFuncTorch():
            known = n.meta["_evo_token_wise"] = (src, node_treats_tokens_alike(
                n.graph.owning_module, n, src, shape))
    return known[1]


#: modules whose output has their input's shape (what token_wise_of follows)
_SAME_SHAPE = (nn.LayerNorm, nn.RMSNorm, nn.Dropout, nn.Identity)
#: functions whose output has their first argument's shape
_SAME_SHAPE_FUNCTIONS = {F.layer_norm, F.rms_norm, F.dropout}
_ELEMENTWISE = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul,
                torch.sub, torch.div}


def _keeps_shape(n: fx.Node, src: fx.Node) -> bool:
    """``n`` gives its one tensor input ``src``'s shape by what it is (an elementwise op with
    constants: where the shapes propagated at calibration say so)."""
    if n.op == "call_module":
        return isinstance(module_of(n.graph.owning_module, n), _SAME_SHAPE)
    if n.op == "call_method" and n.target in _LAYOUT_METHODS:
        return n.args[0] is src
    if n.op == "call_function" and n.target in _SAME_SHAPE_FUNCTIONS:
        return (n.args[0] if n.args else n.kwargs.get("input")) is src
    elementwise = (n.op == "call_function" and n.target in _ELEMENTWISE) or \
        (n.op == "call_method" and n.target in ("add", "mul", "sub", "div"))
    return elementwise and shape_of(n) is not None and shape_of(n) == shape_of(src)


def _constant_or_size(n: fx.Node) -> bool:
    """``n`` reads no block argument's values: it is made of parameters, buffers, numbers and
    sizes (``x.shape[-1]``, ``x.dtype``)."""
    todo, seen = [n], set()
    while todo:
        v = todo.pop()
        if v in seen or v.op == "get_attr" or is_size_query(v):
            continue
        if v.op == "placeholder":
            return False
        seen.add(v)
        todo.extend(v.all_input_nodes)
    return True


def token_size_queries(node: fx.Node, token: fx.Node) -> List[fx.Node]:
    """The size queries of the block's token argument (or of what token-wise modules made of
    it) that ``node`` is computed from (also where an in-place write into it reads them:
    ``t[n - 1] = 0``)."""
    return [a for a in ancestors_with_writes(node) if is_size_query(a) and a.args and
            token_wise_of(a.args[0], token)]


def ancestors(node: fx.Node) -> Set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        cur = todo.pop()
        for a in cur.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def writes_in_place(n: fx.Node) -> bool:
    """``n`` writes into its first argument in place (``t[0, :] = 0``, ``t.mul_(s)``)."""
    return bool(n.args) and isinstance(n.args[0], fx.Node) and (
        (n.op == "call_function" and n.target is operator.setitem) or
        (n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("_")))


def ancestors_with_writes(node: fx.Node) -> Set[fx.Node]:
    """:func:`ancestors`, with the in-place writes into them (or into views of them) and what
    those are computed from (``dist = table[:n, :n].clone(); dist[0, :] = 0`` or
    ``dist[0].zero_()`` before ``node = -slope * dist``)."""
    seen = ancestors(node)
    todo = list(seen)
    while todo:
        for u in writes_into(todo.pop()):
            if u not in seen:
                new = ({u} | ancestors(u)) - seen
                seen |= new
                todo.extend(new)
    return seen


#: methods whose output is a view of their first argument (a write into it writes there)
_VIEWS = {"view", "reshape", "narrow", "select", "transpose", "permute", "flatten", "unflatten",
          "unsqueeze", "squeeze", "expand", "t", "view_as", "diagonal"}


def is_view(n: fx.Node) -> bool:
    """``n`` is a view of its first argument: ``t[0]``, ``t[:, :n]`` (no tensor index: ``t[idx]``
    is a copy), ``t.view(...)``, ``t.transpose(...)``, ..."""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if n.op == "call_method":
        return n.target in _VIEWS
    if n.op != "call_function" or n.target is not operator.getitem:
        return False
    tensors = []
    fx.node.map_arg(n.args[1], lambda a: tensors.append(a) or a)
    return not any("tensor_meta" in a.meta or issubclass(a.meta.get("type") or int, torch.Tensor)
                   for a in tensors)


def writes_into(n: fx.Node) -> List[fx.Node]:
    """The in-place writes into ``n`` or into a view of it (``t[0].zero_()``)."""
    out, todo = [], [n]
    while todo:
        cur = todo.pop()
        for u in cur.users:
            if writes_in_place(u) and u.args[0] is cur:
                out.append(u)
            elif is_view(u) and u.args[0] is cur:
                todo.append(u)
    return out


#: methods that read only the shape, dtype or device of their other arguments (``x.to(y)``)
_SHAPE_ONLY_SECOND = ("reshape_as", "view_as", "expand_as", "type_as", "to")


def value_inputs(node: fx.Node) -> List[fx.Node]:
    """The inputs whose values ``node`` reads: none for a size query, only ``x`` for
    ``x.reshape_as(y)``, ``x.type_as(y)``, ``x.to(y)`` and the like (``y``'s shape, dtype or
    device are read, not its values)."""
    if is_size_query(node):
        return []
    if node.op == "call_method" and node.target in _SHAPE_ONLY_SECOND:
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    return node.all_input_nodes


def value_ancestors(node: fx.Node) -> Set[fx.Node]:
    """The nodes whose values ``node`` is computed from: not through size queries, nor the
    second argument of ``x.reshape_as(y)`` and the like (only ``y``'s shape is read)."""
    seen, todo = set(), [node]
    while todo:
        for a in value_inputs(todo.pop()):
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def shape_of(n) -> Optional[Tuple[int, ...]]:
    if not isinstance(n, fx.Node):
        return None
    tm = n.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def is_whole_view(n) -> bool:
    """``n`` is a view of every element of its input, in order: ``x[:, 0:]`` (the idiom for an
    optional class token with none, ``x[:, self.num_prefix:]``), ``x[:, :N]``, ``x.narrow(1, 0,
    N)`` of the full length. Told from the shapes recorded at calibration (the same before and
    after) and slices that start at 0 with step 1; the batch dim (0) is not cut (a cut of one
    image at a calibration of one would be whole there and not at another batch size)."""
    if not isinstance(n, fx.Node) or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    shape = shape_of(n)
    if shape is None or shape != shape_of(n.args[0]):
        return False
    if n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2:
        index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        return bool(index) and all(isinstance(i, slice) and i.start in (None, 0) and
                                   i.step in (None, 1) for i in index) and index[0] == slice(None)
    if (n.op == "call_method" and n.target == "narrow") or \
            (n.op == "call_function" and n.target is torch.narrow):
        named = dict(zip(("dim", "start", "length"), n.args[1:]), **n.kwargs)
        dim = named.get("dim")
        return isinstance(dim, int) and dim % len(shape) != 0 and named.get("start") == 0
    return False


def getattr_path(obj, path: str):
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


_RESHAPES = ("reshape", "view", "flatten")


_LAYOUT_METHODS = ("contiguous", "clone", "float", "to", "type_as")


_SCALAR_FUNCS = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul}


#: tensor attributes that are metadata, the same whatever the values (not ``requires_grad``:
#: it differs between the calibration's no-grad forward and training)
_META_ATTRIBUTES = frozenset({"shape", "device", "dtype", "ndim", "is_nested", "is_cuda", "layout",
                              "is_sparse", "is_quantized", "is_meta"})


def is_size_query(n: fx.Node) -> bool:
    """x.shape / x.size() / x.dim() (and other metadata: ``x.is_nested``, ``x.device``): reads
    sizes, passes no values on."""
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1:
        return n.args[1] in _META_ATTRIBUTES
    if n.op == "call_function" and n.target in (torch.is_floating_point, torch.is_complex):
        return True          # the dtype's (F._canonical_mask of a key padding mask)
    return n.op == "call_method" and n.target in ("size", "dim", "is_floating_point",
                                                   "is_complex", "element_size")


def is_scalar_or_layout_op(n: fx.Node) -> bool:
    if n.op == "call_method" and n.target in _LAYOUT_METHODS:
        return True
    others = [a for a in n.args[1:]] + list(n.kwargs.values())
    scalar = all(not isinstance(a, fx.Node) for a in others)
    if n.op == "call_function" and n.target in _SCALAR_FUNCS:
        return scalar
    return n.op == "call_method" and n.target in ("add", "mul", "sub", "div") and scalar


def is_reshape(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target in _RESHAPES) or \
        (n.op == "call_function" and n.target in (torch.reshape, torch.flatten))


class PartialInterpreter(fx.Interpreter):
    """``torch.fx.Interpreter`` that runs only what one node needs: its ancestors, and the
    in-place writes (traced ``operator.setitem``) into them. Works on a graph still being
    traced (no output node yet). ``call_module(node, args, kwargs)`` replaces module calls
    (window_token_index runs leaf modules on token indices); ``call_function(node, args,
    kwargs)`` may replace function calls too (None: run the function)."""

    def __init__(self, root: nn.Module, graph: fx.Graph, target: fx.Node, call_module=None,
                 call_function=None):
        super().__init__(root, garbage_collect_values=False, graph=graph)
        needed = ancestors(target) | {target}
        for n in graph.nodes:
            if n is target:
                break
            if n.op == "call_function" and n.target is operator.setitem and n.args[0] in needed:
                needed |= ancestors(n) | {n}
        self.needed, self.target, self._call_module = needed, target, call_module
        self._call_function = call_function

    def run_node(self, n: fx.Node):
        if n not in self.needed:
            return None
        if n.op == "placeholder":
            raise fx.proxy.TraceError(f"no example value for `{n.target}`")
        if n.op == "call_module" and self._call_module is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return self._call_module(n, args, kwargs)
        if n.op == "call_function" and self._call_function is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            value = self._call_function(n, args, kwargs)
            if value is not None:
                return value
        return super().run_node(n)

    def value(self, env: Dict[fx.Node, Any]) -> Any:
        """``target``'s value from the values in ``env`` (placeholders at least)."""
        self.run(initial_env=dict(env), enable_io_processing=False)
        return self.env[self.target]


def run_nodes(graph: fx.Graph, target: fx.Node, root: nn.Module, env: Dict[fx.Node, Any],
              call_module=None, call_function=None) -> Any:
    """Evaluate ``target`` from the values in ``env``, running only what it needs."""
    return PartialInterpreter(root, graph, target, call_module, call_function).value(env)


def _sources(node: fx.Node, own) -> frozenset:
    """What ``node`` is computed from, by value: walking its ancestors in graph order, ``own(n)``
    gives a node's own sources (a frozenset: the path ends there) or None (its inputs')."""
    found: Dict[fx.Node, frozenset] = {}
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    for n in sorted(ancestors(node) | {node}, key=order.__getitem__):
        mine = own(n)
        found[n] = mine if mine is not None else \
            frozenset().union(*(found.get(a, frozenset()) for a in n.all_input_nodes))
    return found[node]


_DATA, _NOTHING = frozenset(("<data>",)), frozenset()


def depends_on_data(node: fx.Node) -> bool:
    """Whether ``node`` depends on the *values* of a block argument, not only on its sizes:
    some path from a tensor placeholder reaches it without passing through a size query
    (``x.shape``, ``x.size()``, ``x.dim()``). Parameters and buffers (``get_attr``) are the
    same for every input, so they do not count."""
    return bool(_sources(node, lambda n: _DATA if n.op == "placeholder" else _NOTHING
                         if n.op == "get_attr" or is_size_query(n) else None))


def values_of_attributes(node: fx.Node) -> List[str]:
    """The attributes (``get_attr`` targets: parameters, buffers) whose *values*, not only
    sizes, ``node`` is computed from (as :func:`depends_on_data` follows the arguments')."""
    return sorted(_sources(node, lambda n: frozenset((n.target,)) if n.op == "get_attr" else _NOTHING
                           if is_size_query(n) or (n.op == "call_method" and n.target == "numel")
                           else None))


_RANDOM_FUNCTIONS = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
                     torch.randint_like, torch.bernoulli, torch.normal, torch.randperm,
                     torch.multinomial, torch.poisson}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_",
                   "geometric_", "cauchy_", "log_normal_"}


def random_source(node: fx.Node) -> Optional[fx.Node]:
    """A random draw ``node`` is computed from (``torch.rand(()) < p``: a Python branch on it
    would keep the one drawn while tracing), else None."""
    for n in ancestors(node) | {node}:
        if (n.op == "call_function" and n.target in _RANDOM_FUNCTIONS) or \
                (n.op == "call_method" and n.target in _RANDOM_METHODS):
            return n
    return None


@contextlib.contextmanager
def no_side_effects(module: nn.Module):
    """Run a module's graph for its shapes leaving no trace: its buffers (BatchNorm statistics)
    and torch's random state are put back. Only the buffers that changed are written: inside
    ``torch.func.grad`` or ``jvp`` (a program or twin built at a call's new batch or input
    size) writing a buffer, one the transform captured, is refused, and writing back every
    buffer raised functorch's "mutate a captured Tensor" at each such call until audit B2 of
    the forty-first session."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(rng)
        with torch.no_grad():
            for b, saved in buffers:
                if b.is_meta or b.layout != torch.strided or not torch.equal(b, saved):
                    b.copy_(saved)      # (no torch.equal on meta or sparse tensors)


def rolls(n: fx.Node) -> bool:
    """A roll (``torch.roll`` or ``Tensor.roll``) by a shift that is not all zeros."""
    if not ((n.op == "call_method" and n.target == "roll") or
            (n.op == "call_function" and n.target is torch.roll)):
        return False
    shifts = n.kwargs.get("shifts", n.args[1] if len(n.args) > 1 else 0)
    return not (isinstance(shifts, (int, tuple, list)) and
                all(v == 0 for v in (shifts if isinstance(shifts, (tuple, list)) else (shifts,))))
