"""The residual stream of a block: which residual adds carry the attention branch and the MLP
branch (layer scale, drop path, or a residual inside a submodule such as MMPretrain's FFN)."""
from __future__ import annotations

import dataclasses
import operator
import weakref
from typing import List, Optional, Set, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..errors import AnalysisError
from .attention import AttentionSite
from .graph import (ancestors, is_add, is_reshape, is_scalar_or_layout_op, is_size_query, module_of,
                    shape_of, value_ancestors)


@dataclasses.dataclass
class Branch:
    role: str             # 'attention' | 'mlp' | 'other'
    add: str              # the residual add node
    path: List[str]       # leaf modules / notable ops on the branch, in order
    skip: Optional[str] = None   # the ``stream * scale`` node the add takes instead of the
    #                              stream itself (MetaFormer's ResScale: ``s * x + f(norm(x))``)


MULS = {operator.mul, operator.imul, torch.mul}
DIVS = {operator.truediv, operator.itruediv, torch.div}


def is_call(n: fx.Node, functions, method: str) -> bool:
    return (n.op == "call_function" and n.target in functions) or \
        (n.op == "call_method" and n.target in (method, method + "_"))


def scales(gm: fx.GraphModule, u: fx.Node, stream: fx.Node, token: fx.Node) -> bool:
    """``u`` scales ``stream`` by a scale that does not depend on the tokens and scales each
    position alike: ``stream * scale`` or ``stream / scale`` (a number, or a tensor whose dims
    are 1 but the last, the channels'), or a leaf module that computes ``x * parameter`` and
    nothing else (timm's ``Scale``). Shared with rewrite/skip_path.py."""
    if u.op == "call_module":
        return bool(u.args) and u.args[0] is stream and u.all_input_nodes == [stream] and \
            shape_of(u) == shape_of(stream) and scales_by_a_parameter(gm.get_submodule(u.target))
    if len(u.args) != 2 or u.kwargs:
        return False
    if is_call(u, MULS, "mul") and stream in u.args:
        return channel_scale(u.args[1] if u.args[0] is stream else u.args[0], stream, token)
    return is_call(u, DIVS, "div") and u.args[0] is stream and channel_scale(u.args[1], stream, token)


def channel_scale(other, stream: fx.Node, token: fx.Node) -> bool:
    """``other`` scales ``stream`` alike at every position: a number, or a tensor that does not
    depend on the tokens whose dims are 1 but the last, which is 1 or the channels', and the
    first, which may be the batch's (a scale per image: DiT's adaLN)."""
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        return True
    shape, s = shape_of(other), shape_of(stream)
    if not (isinstance(other, fx.Node) and other is not token and token not in ancestors(other)
            and shape is not None and s is not None and len(shape) <= len(s)):
        return False
    lead = shape[1:-1] if len(shape) == len(s) and shape[0] == s[0] else shape[:-1]
    return all(d == 1 for d in lead) and (not shape or shape[-1] in (1, s[-1]))


def _branch_path(gm: fx.GraphModule, branch_nodes: Set[fx.Node], graph: fx.Graph) -> List[str]:
    out = []
    for n in graph.nodes:
        if n in branch_nodes:
            if n.op == "call_module":
                out.append(f"{n.target}:{type(module_of(gm, n)).__name__}")
            elif n.op == "get_attr":
                out.append(f"{n.target}(param)")
    return out


def _adds_a_branch(u: fx.Node, stream: fx.Node, token: fx.Node) -> bool:
    """Whether ``u`` adds to ``stream`` something computed from the block's tokens: such a
    residual add goes before a token-independent term added to the stream, as in ``x +
    attn(norm(x + cond))``, which adds its conditioning on the branch's way, not to the stream
    (every such block was told "no residual attention branch": audit K5, twenty-eighth session)."""
    if not (is_add(u) and stream in u.args[:2]):
        return False
    other = u.args[1] if u.args[0] is stream else u.args[0]
    return isinstance(other, fx.Node) and (other is token or token in value_ancestors(other))


def _stream_first(users: List[fx.Node], stream: fx.Node, token: fx.Node) -> List[fx.Node]:
    """The stream's users with its residual add first: before the adds of a term computed on a
    branch's way (``x + attn(norm(x + cond))``, ``x + attn(norm(x + lin(x)))``: an add whose
    result another add of the stream reads), then those that add something computed from the
    tokens' values (a conditioning sized by ``c[:, None].expand(-1, n, -1)`` reads only their
    count). Such blocks were told "no residual attention branch" (audit Q5, twenty-eighth
    session)."""
    adds = [u for u in users if is_add(u) and stream in u.args[:2]]
    inner = {u for u in adds if any(u in ancestors(w) for w in adds if w is not u)}
    return sorted(users, key=lambda u: (u in inner, not _adds_a_branch(u, stream, token)))


_VIEWS = {"view", "reshape", "unsqueeze", "expand_as", "view_as", "to", "type_as"}


_SCALES: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def scales_by_a_parameter(module: nn.Module) -> bool:
    """``module``'s forward is ``x * p`` (``p`` its one parameter or buffer, viewed), read from
    its code: no value can make it do anything else. (Traced once per module, by evoplug's
    tracer: torch.fx's own patches every module's call in the process while it traces, and
    another thread's model ran into it: tests/test_sizes.py.)"""
    if list(module.children()) or len([*module.parameters(), *module.buffers()]) != 1:
        return False
    if module not in _SCALES:
        _SCALES[module] = _traced_scale(module)
    return _SCALES[module]


def _traced_scale(module: nn.Module) -> bool:
    """(What the trace set on the module is put back: a counter, ``self.calls += 1``, stayed a
    proxy for the rest of the analysis, seen with audit K6 of the forty-sixth session.)"""
    from .tracer import BlockTracer
    from .writes import StateBeforeTrace
    before = StateBeforeTrace(module)
    try:
        graph = BlockTracer(set()).trace(module)
    except Exception:  # noqa: BLE001 - a module fx cannot trace is no plain scale
        return False
    finally:
        before.put_back()
    nodes = list(graph.nodes)
    ph = [n for n in nodes if n.op == "placeholder"]
    out = nodes[-1].args[0] if nodes and nodes[-1].op == "output" else None
    if len(ph) != 1 or not isinstance(out, fx.Node) or not (
            is_call(out, MULS, "mul")) or \
            len(out.args) != 2 or out.kwargs or ph[0] not in out.args:
        return False
    scale = out.args[1] if out.args[0] is ph[0] else out.args[0]
    while isinstance(scale, fx.Node) and scale.op == "call_method" and scale.target in _VIEWS:
        scale = scale.args[0]
    rest = [n for n in nodes if n.op not in ("placeholder", "output", "get_attr")
            and n is not out and not (n.op == "call_method" and n.target in _VIEWS)]
    return isinstance(scale, fx.Node) and scale.op == "get_attr" and not rest and \
        all(u is out for u in ph[0].users)


def _with_scaled_skips(gm: fx.GraphModule, users: List[fx.Node], stream: fx.Node, token: fx.Node):
    """(user, None) for each user of the stream, then (add, skip) for each add of a scaled
    skip ``skip = stream * scale`` that adds a branch computed from the tokens."""
    out = [(u, None) for u in users]
    for u in users:
        if scales(gm, u, stream, token):
            out += [(w, u) for w in u.users if _adds_a_branch(w, u, token)]
    return out


def residual_branches(gm: fx.GraphModule, token: fx.Node, site: AttentionSite,
                      name: str) -> Tuple[List[Branch], List[str], List[str]]:
    graph = gm.graph
    stream = token
    branches: List[Branch] = []
    notes: List[str] = []
    visited = set()
    passed: List[fx.Node] = []      # modules the stream went through after the last branch
    before: List[str] = []          # ... before the first add (``x = n0(x)``): returned third
    while True:
        users = _stream_first(list(stream.users), stream, token)
        nxt = None
        for u, skip in _with_scaled_skips(gm, users, stream, token):
            if is_add(u) and (skip or stream) in u.args[:2]:
                other = u.args[1] if u.args[0] is (skip or stream) else u.args[0]
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
                        branches.append(Branch(role, u.name, _branch_path(gm, nodes, graph),
                                               skip.name if skip is not None else None))
                        nxt, passed = u, []
                        break
        flow = [u for u in users if not is_size_query(u)]
        if nxt is None and len(flow) == 1 and flow[0].args and flow[0].args[0] is stream and (
                is_reshape(flow[0]) or is_scalar_or_layout_op(flow[0]) or (
                    stream is token and flow[0].op == "call_method" and
                    flow[0].target == "permute")):
            # the stream viewed as tokens (Swin: (B, H, W, C) -> (B, N, C)), or passed through
            # an op with a constant (x * 1.0, x.contiguous()); a sequence-first block's tokens
            # taken back to (N, B, C) (analyse/trace.py: CallPlan.token_perm)
            nxt = flow[0]
        if nxt is None and _through(flow, stream, site, after_add=bool(branches)):
            # post-norm: the stream goes on through a norm after its add (or a module kept
            # whole); before the first add, through a norm or a leaf function (the skip path)
            nxt = flow[0]
            passed.append(nxt)
            before += [] if branches else [nxt.name]
        if nxt is None:
            # a shape-preserving leaf module on the stream (e.g. FFN adding its identity inside)
            # ... it takes the stream itself and a branch computed from it (FFN(ln2(x), identity=x))
            mods = [u for u in users if u.op == "call_module" and shape_of(u) == shape_of(stream)
                    and u is not site.node and any(
                        i is not stream and stream in ancestors(i) for i in u.all_input_nodes)]
            if len(users) >= 1 and mods and any(b.role == "attention" for b in branches):
                u = mods[0]
                branches.append(Branch("mlp", u.name, [f"{u.target}:{type(module_of(gm, u)).__name__} "
                                                         "(residual inside)"]))
                nxt = u
        if nxt is None or nxt in visited:
            break
        visited.add(nxt)
        stream = nxt
    if not any(b.role == "attention" for b in branches):
        raise AnalysisError(name, NO_RESIDUAL + _changed_scales(gm, token), not_a_block="no residual")
    if not any(b.role == "mlp" for b in branches):
        notes.append(_no_mlp_note(gm, passed))
    return branches, notes + [BEFORE_THE_ADDS.format(n) for n in before], before


def through_on_the_stream(u: fx.Node, stream: fx.Node, site: AttentionSite, after_add: bool) -> bool:
    """``u`` passes the whole stream on, the same shape, through a module (a norm, a module
    kept whole) or, before the first residual add, a function (a registered leaf function):
    ``x = n0(x); x = x + attn(n1(x))`` (refused as "no residual attention branch" until audit
    A4 of the fortieth session). Whether it treats each token on its own, the probes tell.
    Shared with rewrite/skip_path.py."""
    return u is not site.node and u.all_input_nodes == [stream] and \
        shape_of(u) == shape_of(stream) and \
        (u.op == "call_module" or (not after_add and u.op == "call_function"))


def _through(flow: List[fx.Node], stream: fx.Node, site: AttentionSite, after_add: bool) -> bool:
    return len(flow) == 1 and through_on_the_stream(flow[0], stream, site, after_add)


NO_RESIDUAL = "the attention output is not added back to the token stream (no residual attention branch)"
BEFORE_THE_ADDS = ("the stream passes `{}` before its residual adds: on the block's skip path, a "
                   "token not run takes it in its fast update (rewrite/skip_path.py)")


def _changed_scales(gm: fx.GraphModule, token: fx.Node) -> str:
    """Where the block's input goes through a module that torch.nn.utils.parametrize or prune
    changed (a ``Scale`` on the skip path, CAFormer's ``res_scale1``): the residual add behind
    it is not recognised, for a scale is read only from plain ``x * parameter`` code; said,
    with the way out (the refusal said only "no residual attention branch" until audit W2 of
    the thirty-eighth session)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.prune import BasePruningMethod
    for n in token.users:
        if n.op != "call_module":
            continue
        m = gm.get_submodule(n.target)
        pruned = any(isinstance(h, BasePruningMethod) for h in m._forward_pre_hooks.values())
        changed = parametrize.is_parametrized(m)
        if changed or pruned:
            cls = type(m).__bases__[0] if changed else type(m)
            how = "parametrized" if changed else "pruned"
            return (f"; the block's input goes through `{n.target}` ({cls.__name__}), which is "
                    f"{how}: a residual add that takes the stream scaled is recognised only "
                    "where the scale is plain code (x * parameter); convert first and "
                    f"{'parametrize' if changed else 'prune'} after (the converted model "
                    "follows it)")
    return ""


def _no_mlp_note(gm: fx.GraphModule, passed: List[fx.Node]) -> str:
    """What a block without a residual MLP branch does after its attention: nothing but norms
    (an attention-only block), or the rest of the block inside a module the analysis keeps whole
    (kornia's ``ResidualAdd(LN -> FeedForward -> Dropout)``: one with layers of its own, not a
    norm), whose residual add it cannot see (said to be an attention-only block until audit W3
    of the thirty-eighth session)."""
    whole = [n for n in passed if _holds_layers(gm.get_submodule(n.target))]
    if not whole:
        return "no residual MLP branch found (attention-only block)"
    n = whole[0]
    return (f"the rest of the block runs inside `{n.target}` ({type(gm.get_submodule(n.target)).__name__}), "
            "which the analysis keeps whole (it holds no attention): an MLP branch and its "
            "residual add inside it are not seen as such. The kept tokens run it as the block "
            "does; the other tokens get what it adds through the representative token's "
            "residual (the fast update), as they would an MLP branch's")


def _holds_layers(m: nn.Module) -> bool:
    """Submodules, or a weight matrix (a linear layer): more than a norm."""
    return any(True for _ in m.children()) or any(p.dim() >= 2 for p in m.parameters(recurse=False))
