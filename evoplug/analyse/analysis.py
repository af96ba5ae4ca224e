"""torch.fx analysis: find transformer blocks in a model it was not written for.

Flow: :func:`find_blocks` walks the module tree top-down using the calibration record
(calibration.py): the highest module that ran exactly one attention computation per call, took
a (B, N, C) token tensor (or a channels-last (B, H, W, C) token map, as in Swin) and returned the
same shape is a *candidate block*. Each candidate is
traced **on its own** (whole models often do not trace) with every submodule that ran no
attention kept as a leaf, so the graph shows the attention internals and the residual stream:

* the attention site, recognised by what it computes: ``softmax`` over ``q @ k^T``,
  ``scaled_dot_product_attention`` (q, k, mask and scale read from its arguments) or an
  ``nn.MultiheadAttention`` call; never by class name;
* additive position terms on the attention logits that do not depend on the tokens (relative
  position bias tables): they must follow the selected tokens (see rewrite.py);
* the residual stream: which residual adds carry the attention branch and the MLP branch
  (layer scale, drop path, or a residual inside a submodule such as MMPretrain's FFN);
* the prefix tokens (cls, distillation, registers) from the patch grid seen during calibration;
* windowed attention (tokens regrouped into windows inside the block) and, by running the graph
  on token indices, which token each window slot holds (:func:`window_token_index`).

Python branches and ``int()`` on traced sizes are specialised on the calibration input (and refused
when they depend on the token count; a value that depends on the batch size makes block.py trace
one program per batch size); checks (``assert``, a branch that only raises) pass on the
calibration input and are dropped; buffers are traced as attributes so the programs read the live
ones.

The result is a :class:`BlockAnalysis` per block (what explain() prints) which rewrite.py turns
into a slow-path program.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import operator
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import AnalysisError
from .calibrate import ModuleCall

# --------------------------------------------------------------------------------------------
# Tracing one block
# --------------------------------------------------------------------------------------------


def _timm_notrace():
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
        return tuple(get_notrace_modules()), tuple(get_notrace_functions())
    except Exception:  # timm missing or too old
        return (), ()


class BlockTracer(fx.Tracer):
    """Traces into the modules that ran attention; every other submodule is a leaf.

    Leaves keep their own Python (so drop path / dropout follow ``train()`` at run time) and
    the permutation probe (convert.py) checks they are token-wise.
    """

    def __init__(self, attention_modules: Set[int], into_notrace: bool = False,
                 example: Optional[Dict[str, Any]] = None):
        notrace_modules, notrace_functions = _timm_notrace()
        super().__init__(autowrap_functions=notrace_functions)
        self._attention_modules = attention_modules
        self._notrace_modules = notrace_modules
        self._into_notrace = into_notrace
        self._example = example          # the block's calibration arguments, by name
        self.specialised: List[str] = []
        self.batch_specialised = False   # a specialised value depends on the batch size
        # buffers (masks, index tables) become get_attr nodes, not tensor constants: the
        # program then reads the block's live buffers, which follow .to(device, dtype)
        self.proxy_buffer_attributes = True

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

    def _check_dependence(self, node: fx.Node, value, what: str):
        """Refuse a value that depends on the token count; note one that depends on the batch
        size (MMPretrain's ``window_reverse`` computes B with ``int()``): such a block gets one
        program per batch size (block.py)."""
        sub = self._subset_example()
        if sub is not None:
            try:
                other = type(value)(self._evaluate(node, sub))
            except Exception:
                other = value   # the path cannot run on a subset: programs feed it the full map
            if other != value:
                raise fx.proxy.TraceError(
                    f"{what} (`{node.name}`) depends on the number of tokens, so a program "
                    "specialised on all tokens would be wrong on the kept ones")
        B = next(v for v in self._example.values() if isinstance(v, torch.Tensor)).shape[0]
        doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() >= 2 and
                   v.shape[0] == B else v for k, v in self._example.items()}
        try:
            other = type(value)(self._evaluate(node, doubled))
        except Exception:
            other = None
        if other != value:
            self.batch_specialised = True

    def trace(self, root, concrete_args=None):
        """fx's trace, with ``int(proxy)`` specialised (:meth:`to_int`) when there is a
        calibration input, and item assignment into traced tensors recorded as
        ``operator.setitem`` (MMPretrain's shift-window mask is filled slice by slice)."""
        if self._example is None or hasattr(fx.Proxy, "__int__"):
            return super().trace(root, concrete_args)

        def to_int(p):
            if isinstance(p.tracer, BlockTracer):
                return p.tracer.to_int(p)
            raise TypeError("'Proxy' object cannot be interpreted as an integer")

        def setitem(p, key, value):
            p.tracer.create_proxy("call_function", operator.setitem, (p, key, value), {})

        fx.Proxy.__int__ = to_int
        fx.Proxy.__setitem__ = setitem
        try:
            return super().trace(root, concrete_args)
        finally:
            del fx.Proxy.__int__
            del fx.Proxy.__setitem__

    def _subset_example(self) -> Optional[Dict[str, Any]]:
        """The calibration arguments with the (B, N, C) tokens cut to about half."""
        name, x = next(((k, v) for k, v in self._example.items() if isinstance(v, torch.Tensor)),
                       (None, None))
        if x is None or x.dim() != 3 or x.shape[1] < 3:
            return None
        return dict(self._example, **{name: x[:, : x.shape[1] // 2 + 1]})

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
        try:
            # run the real modules and functions: fx's patches (Module.__call__, wrapped
            # functions) are lifted while evaluating, as fx itself does for such calls
            from torch.fx._symbolic_trace import _maybe_revert_all_patches
            with torch.no_grad(), _maybe_revert_all_patches():
                return run_nodes(self.graph, node, root, env,
                                 lambda n, args, kwargs: root.get_submodule(n.target)(*args, **kwargs))
        finally:
            root.train(was)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        """A module traced into contributes its own computation, not its hooks: a hook is the
        user's, and may be removed after the conversion (the converted block runs its original
        forward while a traced-into module has hooks, so they fire as before)."""
        if not self.is_leaf_module(m, self.path_of_module(m)):
            forward = m.forward
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.MultiheadAttention):
            return True
        if self._notrace_modules and isinstance(m, self._notrace_modules) and not (
                self._into_notrace and id(m) in self._attention_modules):
            return True
        if id(m) not in self._attention_modules:
            return True
        return super().is_leaf_module(m, qualname)


_COND_JUMPS = {"POP_JUMP_IF_TRUE", "POP_JUMP_FORWARD_IF_TRUE", "POP_JUMP_IF_FALSE",
               "POP_JUMP_FORWARD_IF_FALSE"}


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


def run_nodes(graph: fx.Graph, target: fx.Node, root: nn.Module, env: Dict[fx.Node, Any],
              call_module) -> Any:
    """Evaluate ``target`` from the values in ``env`` (placeholders at least), running only its
    ancestors; ``call_module(node, args, kwargs)`` runs the module calls."""
    needed = ancestors(target) | {target}
    # in-place writes into a needed tensor (traced ``operator.setitem``) are needed too
    for n in graph.nodes:
        if n is target:
            break
        if n.op == "call_function" and n.target is operator.setitem and n.args[0] in needed:
            needed |= ancestors(n) | {n}
    for n in graph.nodes:
        if n not in needed or n in env:
            continue
        args = fx.node.map_arg(n.args, lambda v: env[v])
        kwargs = fx.node.map_arg(n.kwargs, lambda v: env[v])
        if n.op == "get_attr":
            env[n] = _getattr_path(root, n.target)
        elif n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        elif n.op == "call_module":
            env[n] = call_module(n, args, kwargs)
        elif n.op == "placeholder":
            raise fx.proxy.TraceError(f"no example value for `{n.target}`")
        else:
            raise fx.proxy.TraceError(f"cannot evaluate `{n.name}` ({n.op})")
    return env[target]


@dataclasses.dataclass
class CallPlan:
    """How a block is called: the token argument, other tensor arguments, constant arguments."""
    token_arg: str
    tensor_args: List[str]
    constants: Dict[str, Any]
    signature: inspect.Signature
    single: bool = False     # forward(x, <params whose defaults the analysis saw>): fast bind

    def bind(self, module_name: str, args, kwargs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if self.single and len(args) == 1 and not kwargs:
            return args[0], {}       # block(x): nothing else to bind or check
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise AnalysisError(module_name, f"unexpected call arguments: {e}") from None
        bound.apply_defaults()
        values = bound.arguments
        for name, const in self.constants.items():
            v = values.get(name)
            if not _same_constant(v, const):
                raise AnalysisError(
                    module_name,
                    f"argument {name!r} was {const!r} when the block was analysed but is {v!r} "
                    "now; re-run evoplug.convert with an example input that calls it this way")
        extras = {}
        for n in self.tensor_args:
            v = values[n]
            if not isinstance(v, torch.Tensor):
                raise AnalysisError(module_name, f"argument {n!r} was a tensor at analysis, got {type(v).__name__}")
            extras[n] = v
        return values[self.token_arg], extras

    def feed(self, x: torch.Tensor, extras: Dict[str, torch.Tensor]) -> List[Any]:
        """Positional arguments of the traced program: the tokens, then the other tensor
        arguments in signature order (constants are baked into the trace)."""
        return [x] + [extras[n] for n in self.tensor_args]


def _same_constant(a, b) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return bool(a == b)
    except Exception:
        return a is b


def make_call_plan(module: nn.Module, name: str, call: ModuleCall) -> CallPlan:
    sig = inspect.signature(module.forward)
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise AnalysisError(name, f"forward takes *{p.name}: cannot trace it with a fixed signature")
    bound = sig.bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    token_arg, tensor_args, constants = None, [], {}
    for n, v in bound.arguments.items():
        if isinstance(v, torch.Tensor):
            if token_arg is None:
                token_arg = n
            else:
                tensor_args.append(n)
        else:
            constants[n] = v
    if token_arg is None:
        raise AnalysisError(name, "forward received no tensor")
    params = list(sig.parameters.values())
    single = (not tensor_args and bool(params) and params[0].name == token_arg and all(
        p.default is not p.empty and _same_constant(p.default, constants.get(p.name))
        for p in params[1:]))
    return CallPlan(token_arg, tensor_args, constants, sig, single)


def trace_block(module: nn.Module, name: str, plan: CallPlan, attention_modules: Set[int],
                training: bool, call: Optional[ModuleCall] = None) -> fx.GraphModule:
    """Trace ``module`` in the given train/eval mode (traces bake ``self.training``). With the
    calibration ``call``, Python branches on traced values are specialised on it."""
    example = None
    if call is not None:
        bound = plan.signature.bind(*call.args, **call.kwargs)
        bound.apply_defaults()
        example = dict(bound.arguments)
    was = module.training
    module.train(training)
    saved = _mutable_state(module)
    try:
        # timm's notrace modules that hold the attention (Twins' locally-grouped attention)
        # often trace once the block's constant arguments are known; else they stay leaves
        try:
            tracer = BlockTracer(attention_modules, into_notrace=True, example=example)
            graph = tracer.trace(module, concrete_args=dict(plan.constants))
        except Exception:
            _restore_mutable_state(saved)
            tracer = BlockTracer(attention_modules, example=example)
            graph = tracer.trace(module, concrete_args=dict(plan.constants))
        _drop_constant_asserts(graph)
        _constants_to_buffers(module)
        _tensor_only_signature(graph, plan, name)
        # assembled before the mode is restored: some modules' train() drops cached tensors the
        # graph refers to (MMPretrain LeViT's attention bias cache `ab`)
        gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
        gm.meta["evo_batch_specialised"] = tracer.batch_specialised
    except AnalysisError:
        raise
    except Exception as e:
        raise AnalysisError(name, f"torch.fx could not trace the block: {type(e).__name__}: {e}") from None
    finally:
        _restore_mutable_state(saved)
        module.train(was)
    return gm


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
    graph._codegen = fx.graph.CodeGen()
    out = next(n for n in graph.nodes if n.op == "output")
    if isinstance(out.args[0], (list, tuple)) and len(out.args[0]) == 1:
        out.args = (out.args[0][0],)
    graph.lint()


def _mutable_state(module: nn.Module):
    """Shallow copies of the dict/list attributes of every submodule: tracing runs the
    modules' Python with proxies, and caches (e.g. LeViT's attention-bias cache) must not keep
    them."""
    saved = []
    for m in module.modules():
        for k, v in vars(m).items():
            if k.startswith("_") or not isinstance(v, (dict, list)):
                continue
            saved.append((m, k, v, type(v)(v)))
    return saved


def _restore_mutable_state(saved):
    for m, k, obj, copy_ in saved:
        if isinstance(obj, dict):
            obj.clear()
            obj.update(copy_)
        else:
            obj[:] = copy_
        setattr(m, k, obj)


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


# --------------------------------------------------------------------------------------------
# Graph queries
# --------------------------------------------------------------------------------------------

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm, torch.einsum}
_SOFTMAX_FUNCS = {F.softmax, torch.softmax, torch.Tensor.softmax}


def is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _ADD_FUNCS) or \
        (n.op == "call_method" and n.target in ("add", "add_"))


def is_matmul(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _MATMUL_FUNCS) or \
        (n.op == "call_method" and n.target in ("matmul", "bmm"))


def _module_of(gm: fx.GraphModule, n: fx.Node) -> Optional[nn.Module]:
    if n.op != "call_module":
        return None
    try:
        return gm.get_submodule(n.target)
    except AttributeError:
        return None


def is_softmax(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in _SOFTMAX_FUNCS:
        return True
    if n.op == "call_method" and n.target == "softmax":
        return True
    return isinstance(_module_of(gm, n), nn.Softmax)


def softmax_dim(gm: fx.GraphModule, n: fx.Node):
    if n.op == "call_module":
        return _module_of(gm, n).dim
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


def ancestors(node: fx.Node) -> Set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        cur = todo.pop()
        for a in cur.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _shape(n) -> Optional[Tuple[int, ...]]:
    if not isinstance(n, fx.Node):
        return None
    tm = n.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


# --------------------------------------------------------------------------------------------
# The attention site
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AttentionSite:
    kind: str                          # 'softmax' | 'sdpa' | 'mha'
    node: fx.Node                      # softmax / sdpa / mha call
    logits: Optional[fx.Node] = None   # softmax input
    q: Optional[fx.Node] = None
    k: Optional[fx.Node] = None
    mask: Optional[fx.Node] = None     # sdpa attn_mask / mha attn_mask
    scale: Any = None
    biases: List[fx.Node] = dataclasses.field(default_factory=list)   # token-independent terms
    arg_terms: List[str] = dataclasses.field(default_factory=list)    # placeholders feeding logits


def _sdpa_arg(n: fx.Node, idx: int, name: str, default=None):
    if name in n.kwargs:
        return n.kwargs[name]
    return n.args[idx] if len(n.args) > idx else default


def _logit_terms(start, dep: Set[fx.Node]) -> Tuple[List[fx.Node], List[str]]:
    """Walk an add-chain feeding the logits: token-independent operands are position terms;
    placeholders other than the tokens are block arguments feeding the logits."""
    biases, args, todo, seen = [], [], [start], set()
    while todo:
        cur = todo.pop()
        if not isinstance(cur, fx.Node) or cur in seen:
            continue
        seen.add(cur)
        if cur.op == "placeholder":
            args.append(cur.target)
        elif cur not in dep and cur.op != "placeholder":
            biases.append(cur)
        elif is_add(cur):
            todo.extend(a for a in cur.args[:2] if isinstance(a, fx.Node))
    return biases, args


def find_attention(gm: fx.GraphModule, name: str) -> AttentionSite:
    graph = gm.graph
    dep = input_dependent(graph)
    sites: List[AttentionSite] = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
            site = AttentionSite("sdpa", n, q=_sdpa_arg(n, 0, "query"), k=_sdpa_arg(n, 1, "key"),
                                 mask=_sdpa_arg(n, 3, "attn_mask"), scale=_sdpa_arg(n, 6, "scale"))
            if _sdpa_arg(n, 5, "is_causal", False) is True:
                raise AnalysisError(name, "causal scaled_dot_product_attention: not a vision block")
            if isinstance(site.mask, fx.Node):
                site.biases, site.arg_terms = _logit_terms(site.mask, dep)
            sites.append(site)
        elif isinstance(_module_of(gm, n), nn.MultiheadAttention):
            mask = n.kwargs.get("attn_mask", n.args[5] if len(n.args) > 5 else None)
            site = AttentionSite("mha", n, q=n.args[0] if n.args else n.kwargs.get("query"),
                                 k=n.args[1] if len(n.args) > 1 else n.kwargs.get("key"), mask=mask)
            if isinstance(mask, fx.Node):
                site.biases, site.arg_terms = _logit_terms(mask, dep)
            sites.append(site)
        elif is_softmax(gm, n):
            logits = n.args[0] if n.args else n.kwargs.get("input")
            if not isinstance(logits, fx.Node) or logits not in dep:
                continue
            # softmax(q k^T ...): a matmul of two token-dependent operands upstream of the logits
            qk = [a for a in ancestors(logits) | {logits} if is_matmul(a) and
                  sum(isinstance(x, fx.Node) and x in dep for x in a.args) >= 2]
            if not qk:
                continue
            qk_node = max(qk, key=lambda a: list(graph.nodes).index(a))
            site = AttentionSite("softmax", n, logits=logits, q=qk_node.args[0], k=qk_node.args[1])
            # the logits' additive terms (walk through the q.k^T product's consumers)
            site.biases, site.arg_terms = _logit_terms(logits, dep)
            sites.append(site)
    if not sites:
        raise AnalysisError(name, "no attention computation (softmax over q.k^T, "
                                  "scaled_dot_product_attention or nn.MultiheadAttention) in its graph")
    if len(sites) > 1:
        raise AnalysisError(name, f"{len(sites)} attention computations in one block "
                                  f"({', '.join(s.node.name for s in sites)})")
    return sites[0]


# --------------------------------------------------------------------------------------------
# Residual stream and branches (what explain() shows; the attention residual is required)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Branch:
    role: str             # 'attention' | 'mlp' | 'other'
    add: str              # the residual add node
    path: List[str]       # leaf modules / notable ops on the branch, in order


def _branch_path(gm: fx.GraphModule, branch_nodes: Set[fx.Node], graph: fx.Graph) -> List[str]:
    out = []
    for n in graph.nodes:
        if n in branch_nodes:
            if n.op == "call_module":
                out.append(f"{n.target}:{type(_module_of(gm, n)).__name__}")
            elif n.op == "get_attr":
                out.append(f"{n.target}(param)")
    return out


def residual_branches(gm: fx.GraphModule, token: fx.Node, site: AttentionSite,
                      name: str) -> Tuple[List[Branch], List[str]]:
    graph = gm.graph
    stream = token
    branches: List[Branch] = []
    notes: List[str] = []
    visited = set()
    while True:
        users = list(stream.users)
        nxt = None
        for u in users:
            if is_add(u) and stream in u.args[:2]:
                other = u.args[1] if u.args[0] is stream else u.args[0]
                if isinstance(other, fx.Node):
                    anc = ancestors(other) | {other}
                    if token not in anc:
                        # a token-independent term added to the stream (e.g. a per-position
                        # embedding): the permutation probe decides whether that is token-wise
                        notes.append(f"token-independent term `{other.name}` added to the stream at `{u.name}`")
                        nxt = u
                        break
                    if token in anc:
                        nodes = anc - ancestors(stream) - {stream}
                        if site.node in nodes:
                            role = "attention"
                        elif any(n.op == "call_module" for n in nodes):
                            role = "mlp"
                        else:
                            role = "other"
                        branches.append(Branch(role, u.name, _branch_path(gm, nodes, graph)))
                        nxt = u
                        break
        flow = [u for u in users if not _is_size_query(u)]
        if nxt is None and len(flow) == 1 and flow[0].args and flow[0].args[0] is stream and (
                _is_reshape(flow[0]) or _is_scalar_or_layout_op(flow[0])):
            # the stream viewed as tokens (Swin: (B, H, W, C) -> (B, N, C)), or passed through
            # an op with a constant (x * 1.0, x.contiguous())
            nxt = flow[0]
        if nxt is None:
            # a shape-preserving leaf module on the stream (e.g. FFN adding its identity inside)
            # ... it takes the stream itself and a branch computed from it (FFN(ln2(x), identity=x))
            mods = [u for u in users if u.op == "call_module" and _shape(u) == _shape(stream)
                    and u is not site.node and any(
                        i is not stream and stream in ancestors(i) for i in u.all_input_nodes)]
            if len(users) >= 1 and mods and any(b.role == "attention" for b in branches):
                u = mods[0]
                branches.append(Branch("mlp", u.name, [f"{u.target}:{type(_module_of(gm, u)).__name__} "
                                                         "(residual inside)"]))
                nxt = u
        if nxt is None or nxt in visited:
            break
        visited.add(nxt)
        stream = nxt
    if not any(b.role == "attention" for b in branches):
        raise AnalysisError(name, "the attention output is not added back to the token stream "
                                  "(no residual attention branch)")
    if not any(b.role == "mlp" for b in branches):
        notes.append("no residual MLP branch found (attention-only block)")
    return branches, notes


# --------------------------------------------------------------------------------------------
# Block discovery
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BlockAnalysis:
    name: str
    module: nn.Module
    call: ModuleCall
    plan: CallPlan
    attention_paths: Tuple[str, ...]   # the block's submodules that ran attention, by path
    num_tokens: int
    dim: int
    num_prefix: int = 0
    prefix_source: str = ""
    global_query: str = "cls"        # 'cls' (query 0) or 'mean' (mean query of the patch tokens)
    grid: Optional[Tuple[int, int]] = None   # patch grid (h, w) of the M patch tokens, if known
    kv_grid: Optional[Tuple[int, int]] = None  # keys from the full map reduced to this grid (PVT)
    grid_ops_expected: bool = False            # the block turns tokens into a 2-D map (PVT)
    windowed: bool = False                     # attention inside the 2-D map part (windows)
    token_map: bool = False                    # block takes/returns a (B, H, W, C) map (Swin)
    window_index: Optional[torch.Tensor] = None  # (windows * window tokens,) token index + 1, 0 = pad
    window_head_dims: Tuple[int, ...] = ()     # dims of the attention logits that are heads
    row_full: bool = False                     # the global row covers every patch token
    batch_size: Optional[int] = None           # set when the trace specialised on the batch size

    attention: str = ""              # human-readable attention description
    q: str = ""
    k: str = ""
    position_terms: List[str] = dataclasses.field(default_factory=list)
    branches: List[Branch] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)

    def attention_ids(self) -> Set[int]:
        """ids of the submodules that ran attention (traced into), found by path in the block
        itself: a deep copy of a converted model (EMA) finds its own."""
        return {id(self.module.get_submodule(p)) for p in self.attention_paths}


def _token_block_reason(call: ModuleCall, batch: Optional[int] = None,
                        channels_last: bool = False) -> Optional[str]:
    """None if the call looks like a token block: (B, N, C) in, same shape out; or a
    channels-last token map (B, H, W, C) in, same shape out (Swin), when ``channels_last``."""
    tensors = [a for a in call.args if isinstance(a, torch.Tensor)]
    tensors += [v for v in call.kwargs.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        return "called without a tensor"
    x = tensors[0]
    if x.dim() == 4 and not channels_last:
        return (f"input of shape {tuple(x.shape)} is a 4-D map that is not a channels-last token "
                "map (no norm or linear over its last dim)")
    if x.dim() not in (3, 4):
        return f"input of shape {tuple(x.shape)} is not a (B, N, C) token tensor"
    if batch is not None and x.shape[0] != batch:
        return (f"its tokens arrive regrouped (batch {x.shape[0]} for {batch} image(s)): the "
                "windows or patches are formed outside any block evoplug can convert, so it "
                "cannot tell which image position each token holds")
    out = call.output
    if not isinstance(out, torch.Tensor):
        return f"returns {type(out).__name__}, not the token tensor"
    if tuple(out.shape) != tuple(x.shape):
        return (f"output {tuple(out.shape)} is not the input token map {tuple(x.shape)} "
                "(not a self-attention token block, e.g. class attention or pooling)")
    return None


def _channels_last(m: nn.Module, call: ModuleCall, calls: Dict[int, ModuleCall]) -> bool:
    """A 4-D block input (B, H, W, C) is a channels-last token map when a norm or linear inside
    the block runs over its last dim on a map of that shape (Swin's ``norm1``)."""
    x = next((a for a in list(call.args) + list(call.kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if x is None or x.dim() != 4:
        return False
    for sub in m.modules():
        c = calls.get(id(sub))
        if c is None or sub is m:
            continue
        inp = next((a for a in c.args if isinstance(a, torch.Tensor)), None)
        if inp is None or tuple(inp.shape) != tuple(x.shape):
            continue
        if isinstance(sub, nn.Linear) and sub.in_features == x.shape[-1]:
            return True
        shape = getattr(sub, "normalized_shape", None)
        if shape is not None and tuple(shape) == (x.shape[-1],):
            return True
    return False


def _model_batch(model: nn.Module, calls: Dict[int, ModuleCall]) -> Optional[int]:
    root = calls.get(id(model))
    if root is None:
        return None
    for a in list(root.args) + list(root.kwargs.values()):
        if isinstance(a, torch.Tensor) and a.dim() >= 1:
            return int(a.shape[0])
    return None


def find_blocks(model: nn.Module, calls: Dict[int, ModuleCall]):
    """Walk the module tree top-down: the candidate blocks; the modules that look like token
    blocks but cannot be converted (*failed*: strict conversion raises on them); the modules
    with attention that are no token blocks (*skipped*, e.g. class attention, pooling).

    A module that holds no candidate is reported as one unit when its attention is its own or
    one child's (a block around its attention module): ``blocks.3``, not ``blocks.3.attn``."""
    candidates: List[Tuple[str, nn.Module, ModuleCall]] = []
    reports: List[Tuple[str, str, bool]] = []     # (name, reason, looks like a token block)
    batch = _model_batch(model, calls)

    def visit(name: str, m: nn.Module):
        c = calls.get(id(m))
        if c is None:  # containers that are not called themselves (ModuleList, ModuleDict)
            for child_name, child in m.named_children():
                visit(f"{name}.{child_name}" if name else child_name, child)
            return
        if c.attention_ops == 0:
            return
        reason = _token_block_reason(c, batch, _channels_last(m, c, calls))
        if c.n_calls == 1 and c.attention_ops == 1 and reason is None:
            candidates.append((name, m, c))
            return
        parallel = _parallel_branches(name, m, calls) if c.n_calls == 1 and reason is None else []
        if len(parallel) > 1:     # e.g. timm's ParallelThingsBlock: x + attn_1(x) + attn_2(x)
            reports.append((name, f"runs {c.attention_ops} attention computations per call, in "
                                  f"parallel branches on the same tokens ({', '.join(parallel)}); "
                                  "evoplug converts blocks with one self-attention over their "
                                  "tokens", True))
            return
        before, reported = len(candidates), len(reports)
        for child_name, child in m.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)
        inside = reports[reported:]
        if len(candidates) > before or len(inside) > 1 or not _one_unit(m, c, calls) or \
                (inside and _whole_block(model.get_submodule(inside[0][0]), calls)):
            return
        del reports[reported:]
        token_block = reason is None or reason.startswith("its tokens arrive regrouped")
        if c.n_calls > 1:
            why = f"called {c.n_calls} times per forward (shared module)"
        elif reason is None:
            why = (f"runs {c.attention_ops} attention computations per call; evoplug converts "
                   "blocks with one self-attention over their tokens")
        else:
            why = reason
        if inside and not inside[0][1].startswith(why):
            why += f" (inside: `{inside[0][0]}`: {inside[0][1]})"
        reports.append((name, why, token_block))

    visit("", model)
    candidates.sort(key=lambda t: t[2].order)
    failed = [(n, r) for n, r, block in reports if block]
    skipped = [(n, r) for n, r, block in reports if not block]
    return candidates, failed, skipped


def _parallel_branches(name: str, m: nn.Module, calls: Dict[int, ModuleCall]) -> List[str]:
    """The attention-running parts of ``m`` (its nearest called descendants) when several of
    them took the very same token tensor: parallel branches of one block, not blocks in a row
    (each of those takes the previous one's output)."""
    parts: List[Tuple[str, ModuleCall]] = []

    def collect(prefix: str, mod: nn.Module):
        for child_name, child in mod.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            c = calls.get(id(child))
            if c is None:
                collect(path, child)
            elif c.attention_ops:
                parts.append((path, c))

    collect(name, m)
    firsts = [next((a for a in c.args if isinstance(a, torch.Tensor)), None) for _, c in parts]
    shared = [p for (p, _), t in zip(parts, firsts) if t is not None and
              sum(t is u for u in firsts) > 1]
    return [f"`{p}`" for p in shared]


def _one_unit(m: nn.Module, c: ModuleCall, calls: Dict[int, ModuleCall]) -> bool:
    """Whether ``m`` is one attention unit: called more than once (shared), or its attention
    runs in its own forward or inside exactly one of its children."""
    if c.n_calls > 1:
        return True
    per_child = [_attention_below(child, calls) for child in m.children()]
    per_child = [n for n in per_child if n]
    return sum(per_child) < c.attention_ops or len(per_child) == 1


def _whole_block(m: nn.Module, calls: Dict[int, ModuleCall]) -> bool:
    """A module holding attention in one child and other work (an MLP: a child with parameters
    that ran no attention) in another: a block, reported under its own name."""
    ran = [(child, _attention_below(child, calls)) for child in m.children()
           if calls.get(id(child)) is not None]
    return any(n for _, n in ran) and any(
        not n and next(child.parameters(), None) is not None for child, n in ran)


def _attention_below(m: nn.Module, calls: Dict[int, ModuleCall]) -> int:
    c = calls.get(id(m))
    if c is not None:
        return c.attention_ops
    return sum(_attention_below(child, calls) for child in m.children())


def attention_modules(model: nn.Module, calls: Dict[int, ModuleCall]) -> Set[int]:
    return {mid for mid, c in calls.items() if c.attention_ops > 0}


def modules_to_trace(calls: Dict[int, ModuleCall]) -> Set[int]:
    """Modules the block tracer goes into: those that ran attention or a 2-D map operation
    (the grid operations must be visible to be fed the full map); all others are leaves."""
    return {mid for mid, c in calls.items() if c.attention_ops > 0 or c.grid_ops > 0}


def detect_prefix(model: nn.Module, call: ModuleCall, calls: Dict[int, ModuleCall],
                  num_tokens: int) -> Tuple[int, str]:
    """Number of leading prefix tokens at this block: N minus the patch grid (h*w) of the last
    4-D feature map produced before the block ran; else the model's ``num_prefix_tokens`` /
    ``num_extra_tokens`` attribute; else 0."""
    grid = None
    inside = inside_attention(model, calls) if model is not None else set()
    for mid, c in calls.items():
        fm = c.feature_map() if c.order < call.order and mid not in inside else None
        if fm is not None:
            hw = fm[0] * fm[1]
            if 0 <= num_tokens - hw <= max(16, num_tokens // 8):
                if grid is None or c.order > grid[0]:
                    grid = (c.order, hw, c.name, fm)
    if grid is not None:
        return num_tokens - grid[1], f"patch grid {grid[3][0]}x{grid[3][1]} from `{grid[2]}`"
    for attr in ("num_prefix_tokens", "num_extra_tokens"):
        v = getattr(model, attr, None)
        if isinstance(v, int):
            return v, f"model.{attr}"
    return 0, "assumed 0 (no patch grid found)"


_REDUCED_KV = ("keys/values come from a spatially reduced map ({} keys for {} tokens: "
               "spatial-reduction attention as in PVT/Twins), not supported yet")


def analyse_block(model: nn.Module, name: str, module: nn.Module, call: ModuleCall,
                  calls: Dict[int, ModuleCall], attn_mods: Set[int],
                  num_prefix_override: Optional[int],
                  global_query: str = "auto") -> Tuple[BlockAnalysis, fx.GraphModule]:
    """Trace one candidate block (eval mode), propagate shapes, and describe it."""
    plan = make_call_plan(module, name, call)
    traced = modules_to_trace(calls)
    gm = trace_block(module, name, plan, traced, training=False, call=call)
    token = next(n for n in gm.graph.nodes if n.op == "placeholder")
    x = call.args[0] if call.args and isinstance(call.args[0], torch.Tensor) else \
        plan.signature.bind(*call.args, **call.kwargs).arguments[plan.token_arg]
    token_map = x.dim() == 4          # channels-last (B, H, W, C) token map (Swin)
    if token_map:
        B, H, W, C = x.shape
        N = H * W
    else:
        B, N, C = x.shape
    # shapes of every node on the calibration input
    from torch.fx.passes.shape_prop import ShapeProp
    bound = plan.signature.bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    feed = plan.feed(*plan.bind(name, call.args, call.kwargs))
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*feed)
    except Exception as e:
        raise AnalysisError(name, f"the traced block does not run: {type(e).__name__}: {e}") from None

    try:
        site = find_attention(gm, name)
    except AnalysisError as e:
        hidden = [n.target for n in gm.graph.nodes if n.op == "call_module"
                  and id(gm.get_submodule(n.target)) in attn_mods]
        if hidden:
            sub = gm.get_submodule(hidden[0])
            raise AnalysisError(name, f"its attention runs inside `{hidden[0]}` "
                                      f"({type(sub).__name__}), which torch.fx does not trace into "
                                      "(timm's notrace registry)") from None
        raise e
    paths = tuple(n for n, m in module.named_modules() if id(m) in traced)
    a = BlockAnalysis(name, module, call, plan, paths, N, C)
    mark_batch_specialised(a, gm, B)
    if token_map:
        # a map has no room for prefix tokens: every position is a patch
        a.token_map, a.grid = True, (int(H), int(W))
        a.num_prefix, a.prefix_source = 0, f"none: the block takes a {H}x{W} channels-last map"
    else:
        if num_prefix_override is not None:
            a.num_prefix, a.prefix_source = int(num_prefix_override), "option num_prefix_tokens"
        else:
            a.num_prefix, a.prefix_source = detect_prefix(model, call, calls, N)
        if a.num_prefix >= N:
            raise AnalysisError(name, f"{a.num_prefix} prefix tokens but only {N} tokens")
        a.grid = patch_grid(call, calls, N - a.num_prefix, model)
    grid_ops = find_grid_ops(gm, a, site)
    a.grid_ops_expected = bool(grid_ops)
    for kind, node, _ in grid_ops:
        if token_map and any(u.op == "output" for u in node.users):
            what = "the block's output map (made from the restored tokens)"
        else:
            what = "fed the full map" if kind == "to" else "read back at the kept tokens"
        a.position_terms.append(f"2-D map op at `{node.name}` -> {what}")
    if token_map:
        a.position_terms.insert(0, "block input: the exact full map")
    if grid_ops and not token_map:
        a.notes.append("grid operations see the full map; positions of tokens that were not run "
                       "hold the representative token")
    # self-attention over all N tokens (or keys from the spatially reduced full map), or
    # attention computed inside the 2-D map part of the block (windowed attention)
    # windowed: the queries themselves come from the 2-D map (PVT's spatial reduction only
    # builds the keys/values from it)
    anc_q = ancestors(site.q) | {site.q} if isinstance(site.q, fx.Node) else set()
    a.windowed = any(kind == "to" and node in anc_q for kind, node, _ in grid_ops) and any(
        kind == "from" and site.node in ancestors(node) for kind, node, _ in grid_ops)
    site_shape = _shape(site.node)
    if site.kind != "mha" and site_shape is not None and site_shape[0] != B:
        # the attention runs on regrouped tokens: windows (B * windows, window tokens, ...)
        a.windowed = True
    if a.token_map and not a.windowed and not any(
            kind == "from" and node in anc_q for kind, node, _ in grid_ops):
        raise AnalysisError(name, "attention on the 4-D map that is neither windowed nor on a "
                                  "token view of it")
    if a.token_map:
        a.notes.append("channels-last map block: tokens that were not kept get " + (
            "their own attention update (the windows run on the full map)" if a.windowed else
            "the representative token's attention update") + " plus its MLP residual")
    if a.windowed:
        a.window_index = window_token_index(gm, site, a, feed, B)
        a.row_full = a.window_index is not None
        a.attention = (f"{site.kind} attention at `{site.node.name}` in windows of the 2-D map: run on "
                       "the full map; " + ("global row = each window's mean-query attention, mapped "
                                           "back to the tokens" if a.row_full else
                                           "no global row (windows could not be mapped to tokens)"))
    elif site.kind in ("softmax",):
        s = _shape(site.node)
        if s is not None and len(s) >= 2 and s[-2] == N and s[-1] != N:
            a.kv_grid = reduced_kv_grid(site.k, s[-1], grid_ops)
            if a.kv_grid is None:
                raise AnalysisError(name, _REDUCED_KV.format(s[-1], N))
            s = s[:-1] + (N,)
        if s is None or len(s) < 2 or s[-1] != N or s[-2] != N:
            raise AnalysisError(name, f"attention map {s} is not over the block's {N} tokens "
                                      "(not self-attention)")
        dim = softmax_dim(gm, site.node)
        if dim not in (-1, len(s) - 1):
            raise AnalysisError(name, f"softmax over dim {dim}, not over the keys (last dim)")
        a.attention = f"softmax(q.k^T) at `{site.node.name}`"
    elif site.kind == "sdpa":
        qs, ks = _shape(site.q), _shape(site.k)
        if qs and ks and qs[-2] == N and ks[-2] != N:
            a.kv_grid = reduced_kv_grid(site.k, ks[-2], grid_ops)
            if a.kv_grid is None:
                raise AnalysisError(name, _REDUCED_KV.format(ks[-2], N))
            ks = ks[:-2] + (N, ks[-1])
        if not qs or not ks or qs[-2] != N or ks[-2] != N:
            raise AnalysisError(name, f"scaled_dot_product_attention q{qs} k{ks} is not over the "
                                      f"block's {N} tokens (not self-attention)")
        a.attention = f"scaled_dot_product_attention at `{site.node.name}`"
    else:
        mha = _module_of(gm, site.node)
        if site.q is not site.k:
            if _shape(site.q) != _shape(site.k):
                raise AnalysisError(name, "nn.MultiheadAttention with different query and key "
                                          "tokens (cross-attention)")
        a.attention = f"nn.MultiheadAttention `{site.node.target}` (batch_first={mha.batch_first})"
    a.q = getattr(site.q, "name", str(site.q))
    a.k = getattr(site.k, "name", str(site.k))
    for b in site.biases:
        a.position_terms.append(f"bias `{b.name}` {_shape(b)} -> " + (
            "kept (the windows run on the full map)" if a.windowed else "gathered for the kept tokens"))
    for t in site.arg_terms:
        a.position_terms.append(f"argument `{t}` on the attention logits -> gathered")
    for tname in plan.tensor_args:
        t = bound.arguments[tname]
        if tname not in site.arg_terms:
            a.position_terms.append(f"argument `{tname}` {tuple(t.shape)} -> gathered by token index")
    if a.kv_grid is not None and not a.windowed:
        a.attention += f" (keys from the full map reduced to {a.kv_grid[0]}x{a.kv_grid[1]})"
        a.row_full = True
    a.branches, notes = residual_branches(gm, token, site, name)
    a.notes += notes
    a.global_query = resolve_global_query(model, a.num_prefix, global_query)
    check_no_mixing_outside_attention(gm, site, a, feed, bool(grid_ops))
    return a, gm


# --------------------------------------------------------------------------------------------
# Token mixing outside attention
# --------------------------------------------------------------------------------------------

#: tolerance of the mixing probe, relative to the output's scale (float32; 100x in half)
MIXING_TOLERANCE = 1e-4


def _zero_attention_output(out):
    """The attention's output replaced by zeros (nn.MultiheadAttention: its first item)."""
    if isinstance(out, tuple):
        return (torch.zeros_like(out[0]),) + tuple(out[1:])
    return torch.zeros_like(out)


def _attention_output(site: AttentionSite) -> Optional[fx.Node]:
    """Where the attention's result leaves it: the fused call, or for an explicit softmax the
    first product with the values downstream of it (after talking heads, dropout, ...)."""
    if site.kind in ("sdpa", "mha"):
        return site.node
    todo, seen = list(site.node.users), set()
    while todo:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if is_matmul(n):
            return n
        todo.extend(n.users)
    return None


def check_no_mixing_outside_attention(gm: fx.GraphModule, site: AttentionSite, a: BlockAnalysis,
                                      feed, has_grid_ops: bool):
    """Behavioural check that the block mixes tokens only in its attention: with the attention's
    output set to zero, changing one patch token must leave every other token as it was. An
    order-independent reduction over the tokens (a mean added to the output, pooling) passes
    the permutation probe but fails here; evoplug would compute it over the kept tokens only.
    Blocks with 2-D map operations (a depthwise conv) may change the token's neighbours: only
    the tokens far from it on the grid are compared."""
    out_node = _attention_output(site)
    if out_node is None:
        return
    graph = copy.deepcopy(gm.graph)
    target = next(n for n in graph.nodes if n.name == out_node.name)
    with graph.inserting_after(target):
        zero = graph.call_function(_zero_attention_output, (target,))
    target.replace_all_uses_with(zero, delete_user_cb=lambda u: u is not zero)
    probe = fx.GraphModule(gm, graph)
    x = feed[0]
    tokens = x.flatten(1, 2) if a.token_map else x
    B, N, C = tokens.shape
    P = a.num_prefix
    compare = torch.ones(N, dtype=torch.bool)
    compare[P] = False                          # the changed token: the first patch token
    if has_grid_ops:
        if a.grid is None:
            return
        h, w = a.grid
        r = min(h, w) // 2
        rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
        far = torch.maximum(rows, cols) > r     # Chebyshev distance from the corner token
        if not bool(far.any()):
            return
        compare = torch.cat([torch.zeros(P, dtype=torch.bool), far])
    gen = torch.Generator().manual_seed(0)
    changed = tokens.clone()
    noise = torch.randn(changed[:, P].shape, generator=gen).to(changed)
    changed[:, P] = noise * (3 * float(tokens.float().std()) + 1e-3)
    module = a.module
    was = module.training
    module.eval()
    try:
        with torch.no_grad(), hooks_suspended(module):
            ref = probe(*feed)
            out = probe(changed.reshape(x.shape), *feed[1:])
    except RuntimeError as e:    # e.g. an op that cannot take the zeros: said in explain()
        a.notes.append(f"the check for token mixing outside attention could not run "
                       f"({type(e).__name__}: {e})")
        return
    finally:
        module.train(was)
    if not isinstance(ref, torch.Tensor) or ref.shape != x.shape:
        return
    ref, out = ref.reshape(B, N, -1).float(), out.reshape(B, N, -1).float()
    if not (torch.isfinite(ref).all() and torch.isfinite(out).all()):
        return
    tol = MIXING_TOLERANCE * (1 if x.dtype in (torch.float32, torch.float64) else 100)
    err = float((out - ref)[:, compare.to(out.device)].abs().max())
    if err > tol * max(1.0, float(ref.abs().max())):
        raise AnalysisError(
            a.name, "mixes tokens outside its attention (with the attention's output set to "
                    f"zero, changing one patch token changed others by up to {err:.3g}): e.g. a "
                    "mean or sum over the tokens, which evoplug would take over the kept tokens "
                    "only")


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")


@contextlib.contextmanager
def hooks_suspended(module: nn.Module):
    """The hooks of ``module``'s submodules set aside (and put back): the probes compare the
    block's own computation with its program, which never runs the hooks of what it traced
    into."""
    saved = []
    for m in module.modules():
        for name in _HOOK_DICTS:
            d = getattr(m, name, None)
            if d:
                saved.append((d, dict(d)))
                d.clear()
    try:
        yield
    finally:
        for d, items in saved:
            d.update(items)


def window_token_index(gm: fx.GraphModule, site: AttentionSite, a: "BlockAnalysis", feed,
                       batch: int) -> Optional[torch.Tensor]:
    """Which token each window slot of a windowed attention holds, found by running the graph
    from the block's input to the keys on token *indices* instead of features.

    The input carries ``b * (N + 1) + n + 1`` in every channel of token n of image b; data
    movement (roll, pad, window partition, views) moves these values with the tokens, and the
    token-wise leaf modules on the way (norm, the qkv linear) are replaced by copying the index
    into their output channels. At the keys every channel of a slot must hold one integer: the
    token there (0 = padding). Checked: windows are batch-major and every token sits in exactly
    one window slot. Returns the (windows * window tokens,) index of image 0, or None when the
    path does arithmetic on the values or the windows overlap (the block then gives no row).
    """
    k = site.k
    if not isinstance(k, fx.Node) or site.kind not in ("softmax", "sdpa"):
        return None
    s_node, s_k = _shape(site.node), _shape(k)
    if s_node is None or s_k is None:
        return None
    nk = s_node[-1] if site.kind == "softmax" else s_k[-2]
    N = a.num_tokens
    stride = N + 1
    x = feed[0]
    shape = (2,) + tuple(x.shape[1:])
    ids = torch.arange(N, dtype=torch.float64, device=x.device) + 1
    ids = torch.stack([ids, ids + stride]).reshape(shape[:-1] + (1,)).expand(shape)
    needed = ancestors(k) | {k}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(p in needed for p in placeholders[1:]):
        return None    # the keys depend on another argument too
    def token_wise(n, args, kwargs):
        si, so = _shape(n.args[0]) if n.args else None, _shape(n)
        if si is None or so is None or si[:-1] != so[:-1]:
            raise fx.proxy.TraceError("not token-wise over the last dim")
        inp = args[0]
        return inp[..., :1].expand(*inp.shape[:-1], so[-1])

    try:
        with torch.no_grad():
            kv = run_nodes(gm.graph, k, gm, {placeholders[0]: ids}, token_wise)
        # keys as (leading dims..., channel, key) with the key dim last
        if site.kind == "softmax" and kv.shape[-1] == nk:
            lead = kv.select(-2, 0)                      # k^T: (..., d, Mk)
        elif kv.shape[-2] == nk:
            lead = kv.select(-1, 0)                      # k: (..., Mk, d)
        else:
            return None
        # leading dims along which the index does not change are heads (averaged by the row);
        # the others, with the batch, enumerate the windows
        head_dims = tuple(i for i in range(1, lead.dim() - 1)
                          if bool((lead == lead.narrow(i, 0, 1)).all()))
        for i in reversed(head_dims):
            lead = lead.select(i, 0)
        if not bool((lead == lead.round()).all()):
            return None
        w = lead.reshape(2, -1)                          # batch-major: image 0, image 1
        first, second = w[0], w[1]
        pad = first == 0
        if not bool(((first >= 0) & (first <= N)).all()) or \
                not bool(((second == first + stride) | (pad & (second == 0))).all()):
            return None
        idx = first.long()
        if not bool((torch.bincount(idx, minlength=N + 1)[1:] == 1).all()):
            return None
        a.window_head_dims = head_dims
        return idx
    except Exception:
        return None


def _getattr_path(obj, path: str):
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


_RESHAPES = ("reshape", "view", "flatten")
_LAYOUT_METHODS = ("contiguous", "clone", "float", "to", "type_as")
_SCALAR_FUNCS = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul}


def _is_size_query(n: fx.Node) -> bool:
    """x.shape / x.size() / x.dim(): reads sizes, passes no values on."""
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1:
        return n.args[1] in ("shape", "device", "dtype")
    return n.op == "call_method" and n.target in ("size", "dim")


def _is_scalar_or_layout_op(n: fx.Node) -> bool:
    if n.op == "call_method" and n.target in _LAYOUT_METHODS:
        return True
    others = [a for a in n.args[1:]] + list(n.kwargs.values())
    scalar = all(not isinstance(a, fx.Node) for a in others)
    if n.op == "call_function" and n.target in _SCALAR_FUNCS:
        return scalar
    return n.op == "call_method" and n.target in ("add", "mul", "sub", "div") and scalar


def _is_reshape(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target in _RESHAPES) or \
        (n.op == "call_function" and n.target in (torch.reshape, torch.flatten))


def find_grid_ops(gm: fx.GraphModule, a: "BlockAnalysis", site: Optional["AttentionSite"] = None):
    """Where the block turns its tokens into a 2-D map and back (PVT's depthwise-conv MLP and
    spatial-reduction keys): ``('to', node, token_dim)`` reshapes N tokens into the patch grid,
    ``('from', node, token_dim)`` flattens the grid back to tokens. Needs the shapes of a
    ShapeProp run. Slow-path programs feed the 'to' points the full map (canvas).

    With the attention ``site``: a map whose one window covers it all (Swin's last stage, 7x7
    tokens in 7x7 windows) is partitioned and merged by views that look like map <-> token
    views; those inside the windowed attention (a 'from' of the map into the attention, a 'to'
    from the attention's output before any residual add) are window views, not grid ops."""
    N, P, grid = a.num_tokens, a.num_prefix, a.grid
    if grid is None:
        return []
    grid = tuple(grid)
    M = grid[0] * grid[1]

    def layout(shape):   # 'cf' (B, C, H, W), 'cl' (B, H, W, C) or None
        if shape is None or len(shape) != 4:
            return None
        if tuple(shape[-2:]) == grid:
            return "cf"
        if tuple(shape[1:3]) == grid:
            return "cl"
        return None

    ops = []
    for n in gm.graph.nodes:
        if not _is_reshape(n):
            continue
        src = n.args[0] if n.args else None
        si, so = _shape(src), _shape(n)
        if si is None or so is None:
            continue
        # the token dim follows from the map's layout: (B, N, C) <-> (B, H, W, C) splits or
        # merges dim 1, (B, C, N) <-> (B, C, H, W) the last dim (this matters when C == N)
        if layout(so) and len(si) == 3 and N in si[1:]:
            dim = 1 if layout(so) == "cl" else 2
            if si[dim] != N:
                dim = len(si) - 1 - list(reversed(si)).index(N)
            ops.append(("to", n, dim))
        elif layout(si) and len(so) == 3 and M in so[1:]:
            dim = 1 if layout(si) == "cl" else 2
            if so[dim] != M:
                dim = len(so) - 1 - list(reversed(so)).index(M)
            ops.append(("from", n, (dim, layout(si))))
    if site is not None and ops:
        ops = _drop_single_window_views(ops, site)
    if ops and P:
        raise AnalysisError(a.name, "2-D map operations inside a block with prefix tokens are not "
                                    "supported")
    return ops


def _drop_single_window_views(ops, site: "AttentionSite"):
    before = ancestors(site.node)
    inner_from = [n for kind, n, _ in ops if kind == "from" and n in before and
                  any(k == "to" and m in ancestors(n) for k, m, _ in ops)]
    if not inner_from:
        return ops
    inner_to = []
    for kind, n, _ in ops:
        if kind == "to" and site.node in ancestors(n):
            between = {m for m in ancestors(n) if site.node in ancestors(m)}
            if not any(is_add(m) for m in between | {n}):
                inner_to.append(n)
    drop = set(inner_from) | set(inner_to)
    return [op for op in ops if op[1] not in drop]


def reduced_kv_grid(k: fx.Node, num_keys: int, grid_ops):
    """(h', w') of keys built from the full map by spatial reduction, else None."""
    if not grid_ops or not isinstance(k, fx.Node):
        return None
    anc = ancestors(k)
    if not any(kind == "to" and node in anc for kind, node, _ in grid_ops):
        return None
    for n in anc:
        s = _shape(n)
        if s is not None and len(s) == 4 and s[-2] * s[-1] == num_keys:
            return (int(s[-2]), int(s[-1]))
    return None


def inside_attention(model: nn.Module, calls: Dict[int, ModuleCall]) -> Set[int]:
    """ids of the modules that run inside an attention computation: the submodules of a
    module that computes attention in its own forward (not only in its children). Their 4-D
    outputs are per-head tensors (timm's ``k_norm`` on (B, N, heads, d)), attention maps or
    spatially reduced keys, never the patch grid."""
    derived = getattr(calls, "derived", None)       # a CallRecord caches it per forward
    if derived is not None and "inside_attention" in derived:
        return derived["inside_attention"]
    inside: Set[int] = set()
    for m in model.modules():
        c = calls.get(id(m))
        if c is None or c.attention_ops == 0 or m is model:
            continue
        if c.attention_ops > sum(_attention_below(child, calls) for child in m.children()):
            inside.update(id(sub) for sub in m.modules() if sub is not m)
    if derived is not None:
        derived["inside_attention"] = inside
    return inside


def patch_grid(call: ModuleCall, calls: Dict[int, ModuleCall], num_patches: int,
               model: Optional[nn.Module] = None):
    """(h, w) of the block's patch tokens: the last 4-D map before the block with h*w == M,
    else a square grid if M is a perfect square, else None."""
    best = None
    inside = inside_attention(model, calls) if model is not None else set()
    for mid, c in calls.items():
        fm = c.feature_map() if c.order < call.order and mid not in inside else None
        if fm is not None and fm[0] * fm[1] == num_patches and (best is None or c.order > best[0]):
            best = (c.order, fm)
    if best is not None:
        return best[1]
    r = int(round(num_patches ** 0.5))
    return (r, r) if r * r == num_patches else None


def resolve_global_query(model: nn.Module, num_prefix: int, choice: str) -> str:
    """'cls' when the first prefix token is a class token, else 'mean'.

    Without prefix tokens there is no cls token. With prefix tokens, a model that declares it
    has no class token (timm's ``cls_token is None``, e.g. register-only ViTs) uses the mean
    query too; otherwise the first prefix token is taken as the cls token.
    """
    if choice not in ("auto", "cls", "mean"):
        raise ValueError(f"global_query must be 'auto', 'cls' or 'mean', got {choice!r}")
    if choice == "cls" and num_prefix == 0:
        raise AnalysisError("", "global_query='cls' but the block has no prefix token")
    if choice != "auto":
        return choice
    if num_prefix == 0:
        return "mean"
    if declares_no_class_token(model):
        return "mean"
    return "cls"


def declares_no_class_token(model: nn.Module) -> bool:
    """The model says it has no class token: the shallowest module with a ``cls_token``
    attribute holds None (timm ViTs, and NaFlexViT's ``embeds.cls_token``), or it sets
    ``has_class_token = False``. Its prefix tokens are then registers, not a class token."""
    for _, m in model.named_modules():      # pre-order: the model itself first
        if getattr(m, "has_class_token", None) is False:
            return True
        if hasattr(m, "cls_token"):
            return getattr(m, "cls_token") is None
    return False
