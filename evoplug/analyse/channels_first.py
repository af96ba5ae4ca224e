"""Blocks that take and keep their tokens a channels-first ``(B, C, H, W)`` map (timm's CoAtNet
transformer blocks, LeViT with ``use_conv``: a 1x1 ``Conv2d`` for each linear layer, a
``LayerNorm2d`` or ``BatchNorm2d`` for each norm, attention over ``map.view(B, heads, d, H * W)``)
rewritten into token form: the residual stream and every op that treats each position alike
run on ``(B, H * W, C)`` tokens, the attention's operands are views of those tokens, and a 2-D
op (a 3x3 convolution, a pooling) reads a view of the tokens as the map.

The block is traced taking the channels-last map (``CallPlan.token_perm``): its graph starts
with ``cf = map.permute(0, 3, 1, 2)``. Each node whose value is a channels-first map computed
from ``cf`` gets a *twin*, the same values as ``(B, H * W, c)`` tokens:

- an op with that map as its one tensor input that treats every position alike (checked on the
  calibration values: run on the map laid out as one row ``(B, c, 1, H * W)`` it gives the
  output laid out so) runs on the twin in that row layout, ``twin.transpose(1, 2)
  .unsqueeze(2)``; a 1x1 convolution, ``LayerNorm2d``, ``BatchNorm2d`` (its statistics over
  the same positions), a ``(C, 1, 1)`` layer scale and the activations are such ops. (A row,
  not a column ``(B, c, H * W, 1)``: the column's gradients reach the op strided (.., 1, c, 1),
  which torch 2.14.1's CPU ``BatchNorm2d`` backward gets wrong against a contiguous input:
  LeViT-conv's gradients were off by 100% in the thirty-third session's first version; the
  row's are strided as a channels-last map's);
- an elementwise op of two twinned maps (the residual add) runs on the two twins;
- a view of a twinned map into ``(B, s..., H * W)`` (the heads split off the channels) is a view
  of the twin, ``twin.reshape(B, -1, *s).permute(0, 2, .., 1)``, and a view of such a tensor
  back into a map, ``o.view(B, -1, H, W)``, has the twin ``o.flatten(1, -2).transpose(1, 2)``.

Every rewrite gives the same values (the row layout is checked, the views are exact), so
the analysis that follows sees a block of tokens, as it does PVT's."""
from __future__ import annotations

import operator
from typing import Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .graph import ancestors, inserting_as, is_reshape, is_size_query, no_side_effects, shape_of
from .pointwise import mixes_positions, perturbed_copy, perturber, seeded, treats_positions_alike

_ELEMENTWISE = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul,
                torch.sub}
#: ops a twinned map's original left without users may be removed with (shape reads, views)
_PURE_METHODS = {"size", "dim", "view", "reshape", "flatten", "permute", "transpose",
                 "contiguous", "squeeze", "unsqueeze", "chunk", "split", "unbind"}

_PURE_FUNCTIONS = {getattr, operator.getitem, operator.mul, operator.add, operator.floordiv}


def _placeholder_permute(graph: fx.Graph) -> Optional[fx.Node]:
    """``map.permute(0, 3, 1, 2)`` of the block's token placeholder (its first)."""
    ph = next((n for n in graph.nodes if n.op == "placeholder"), None)
    for u in (ph.users if ph is not None else ()):
        dims = u.args[1:] if u.op == "call_method" and u.target == "permute" else ()
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        if tuple(dims) == (0, 3, 1, 2):
            return u
    return None


class _Twins:
    def __init__(self, ctx, cf: fx.Node):
        self.ctx, self.graph, self.values = ctx, ctx.graph, ctx.values
        self.batch, self.grid = ctx.batch, tuple(ctx.grid)
        self.twin: Dict[fx.Node, fx.Node] = {}
        self.row: Dict[fx.Node, fx.Node] = {}      # twin -> its (B, c, 1, N) layout
        self._flat: Dict[fx.Node, fx.Node] = {}       # twin -> its (B, c, N) layout
        self.new: List[fx.Node] = []
        self.replaced: List[tuple] = []      # (node, its replacement): made once it converts
        self.cf, self.why = cf, None         # (why the output is not reached, where known)
        self.parts: Dict[fx.Node, fx.Node] = {}     # chunk/split of a map -> its twin's split
        ph = cf.args[0]
        with inserting_as(self.graph, cf, after=True):
            self.twin[cf] = self._add("call_method", "flatten", (ph, 1, 2))

    def _add(self, op, target, args, kwargs=None) -> fx.Node:
        n = self.graph.create_node(op, target, args, kwargs or {})
        self.new.append(n)
        return n

    def is_cf_map(self, n) -> bool:
        s = shape_of(n)
        return s is not None and len(s) == 4 and s[0] == self.batch and tuple(s[2:]) == self.grid

    def rows(self, t: fx.Node) -> fx.Node:
        if t not in self.row and t in self._flat:     # (B, c, N) -> (B, c, 1, N)
            self.row[t] = self._add("call_method", "unsqueeze", (self._flat[t], 2))
        if t not in self.row:
            self.row[t] = self._add("call_method", "unsqueeze",
                                       (self._add("call_method", "transpose", (t, 1, 2)), 2))
        return self.row[t]

    def row_wise(self, n: fx.Node, src: fx.Node) -> bool:
        """``n``, whose one tensor input that is a map is ``src``, treats each position alike: no
        convolution wider than 1x1 or pooling inside, and, run on ``src`` laid out as one row,
        it gives its output laid out so, and on a subset of the positions their outputs
        (analyse/pointwise.py: eval and train mode, parameters perturbed)."""
        x, want = self.values.get(src), self.values.get(n)
        if not isinstance(x, torch.Tensor) or not isinstance(want, torch.Tensor) or \
                not self.is_cf_map(n) or n.op not in ("call_module", "call_function", "call_method"):
            return False
        if any(self.is_cf_map(v) for v in n.all_input_nodes if v is not src) or \
                mixes_positions(self.ctx.gm, n, self.values):
            return False
        return treats_positions_alike(self._runner(n, src), x.contiguous(),
                                      lambda t: t.flatten(2).unsqueeze(2), 3)

    def _runner(self, n: fx.Node, src: fx.Node):
        """``run(input, training)``: ``n`` on ``input`` in place of ``src``, its parameters and
        constants perturbed (analyse/pointwise.py)."""
        perturbed = perturber()
        consts = {a: perturbed(self.values[a]) for a in n.all_input_nodes if a.op == "get_attr"
                  and isinstance(self.values.get(a), torch.Tensor)}
        mod = perturbed_copy(self.ctx.gm.get_submodule(n.target), perturbed) if n.op == "call_module" else None

        def run(inp, training):
            args, kwargs = (fx.map_arg(v, lambda a: inp if a is src else consts.get(a, self.values.get(a, a)))
                            for v in (n.args, n.kwargs))
            if n.op == "call_function" and n.target is F.batch_norm:
                # (a BatchNorm traced into, timm's BatchNormAct2d: its mode is an argument, as a
                # module's is its own; with the train trace's flag the subset's statistics made it
                # a map op feeding the attention the full map, a size error: audit U4)
                if len(args) > 5:
                    args = (*args[:5], training, *args[6:])
                else:
                    kwargs = {**kwargs, "training": training}
            with no_side_effects(self.ctx.gm):
                if mod is not None:
                    mod.train(training)     # (not chained: some modules' train() returns None)
                    return seeded(mod, *args, **kwargs)
                if n.op == "call_function":
                    return seeded(n.target, *args, **kwargs)
                return seeded(getattr(args[0], n.target), *args[1:], **kwargs)
        return run

    def visit(self, n: fx.Node) -> Optional[str]:
        """Give ``n`` a twin (or rewrite it to read one); what was done, or None."""
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in self.parts:
            return self._channel_parts(n, None)
        ins = [v for v in n.all_input_nodes if v in self.twin]
        if not ins or n.op == "output":
            return None
        maps = [v for v in n.args[:2] if isinstance(v, fx.Node) and self.is_cf_map(v)]
        if len(ins) == 1 and len(maps) == 2 and maps[0] is not maps[1] and \
                n.op == "call_function" and n.target in _ELEMENTWISE:
            other = maps[1] if maps[0] is ins[0] else maps[0]      # (a map not twinned yet)
            if ins[0] is self.cf:
                if self.cf in other.all_input_nodes and \
                        mixes_positions(self.ctx.gm, other, self.values):
                    self.why = (f"`{other.name}`, a map op that mixes positions, is added to the "
                                "block's input (a convolutional position encoding, CPVT's or "
                                "CvT's): the residual stream itself mixes tokens outside attention, "
                                "which evoplug refuses in token blocks too (not equivariant to the "
                                "token order)")
            elif other.target not in _ELEMENTWISE and self.cf in ancestors(other):
                # a 2-D op's output added to the tokens (PVTv2's depthwise convolution): read as
                # tokens, as the token layout reads it
                with inserting_as(self.graph, other, after=True):
                    f = self._add("call_method", "flatten", (other, 2))
                with inserting_as(self.graph, f, after=True):
                    self.twin[other] = self._add("call_method", "transpose", (f, 1, 2))
                self._flat[self.twin[other]] = f
                ins = [v for v in n.all_input_nodes if v in self.twin]
        if len(ins) == 2 and n.op == "call_function" and n.target in _ELEMENTWISE and \
                self.is_cf_map(n) and shape_of(ins[0]) == shape_of(ins[1]) == shape_of(n):
            with inserting_as(self.graph, n):
                self.twin[n] = self._add("call_function", n.target, fx.map_arg(
                    n.args, lambda a: self.twin.get(a, a)), dict(n.kwargs))
            return f"`{n.name}` on tokens"
        if len(ins) != 1:
            return None
        src = ins[0]
        parts = self._channel_parts(n, src)
        if parts:
            return parts
        if n.op == "call_module" and isinstance(self.ctx.gm.get_submodule(n.target), nn.Identity) \
                and n.args and n.args[0] is src:
            self.twin[n] = self.twin[src]       # (CoAtNet's shortcut: the stream goes on)
            return None
        if self.row_wise(n, src):
            with inserting_as(self.graph, n):
                row = self.rows(self.twin[src])
                new = self.graph.node_copy(n, lambda a: row if a is src else a)
                self.new.append(new)
                flat = self._add("call_method", "squeeze", (new, 2))
                t = self._add("call_method", "transpose", (flat, 1, 2))
            self.row[t], self._flat[t] = new, flat
            self.twin[n] = t
            return f"`{n.name}` on tokens"
        return self._heads_view(n, src)

    def _channel_parts(self, n: fx.Node, src: fx.Node) -> Optional[str]:
        """``src.chunk(k, dim=1)`` / ``src.split(sizes, dim=1)`` (q, k and v cut from the map's
        channels) -> the twin split along its channels; each part taken by ``[i]`` gets its part
        as twin."""
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in self.parts \
                and isinstance(n.args[1], int) and self.is_cf_map(n):
            with inserting_as(self.graph, n):
                self.twin[n] = self._add("call_function", operator.getitem,
                                         (self.parts[n.args[0]], n.args[1]))
            return f"`{n.name}`: a part of the tokens' channels"
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        if name not in ("chunk", "split") or n.args[0] is not src:
            return None
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
        parts = self.values.get(n)
        if dim not in (1, -3) or not isinstance(parts, (tuple, list)) or \
                not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in parts):
            return None
        with inserting_as(self.graph, n):
            self.parts[n] = self._add("call_method", "split",
                                      (self.twin[src], [int(t.shape[1]) for t in parts], 2))
        return None

    def _heads_view(self, n: fx.Node, src: fx.Node) -> Optional[str]:
        """``src.view(B, s..., H * W)`` -> ``twin.reshape(B, -1, *s).permute(0, 2, .., 1)``; also
        ``src.view(B, s..., H, W)`` whose one user merges ``H, W`` (``.flatten(-2)``)."""
        s_in, s_out = shape_of(src), shape_of(n)
        N = self.grid[0] * self.grid[1]
        if not is_reshape(n) or n.args[0] is not src or s_out is None or len(s_out) < 3 or \
                s_out[0] != self.batch:
            return None
        if len(s_out) > 4 and tuple(s_out[-2:]) == self.grid and len(n.users) == 1:
            u = next(iter(n.users))           # (B, s..., H, W) -> (B, s..., H * W)
            if not (is_reshape(u) and u.args[0] is n and shape_of(u) == (*s_out[:-2], N)):
                return None
            n, s_out = u, shape_of(u)
        if s_out[-1] != N or int(torch.Size(s_out[1:-1]).numel()) != s_in[1]:
            return None
        inner = [int(d) for d in s_out[1:-1]]
        with inserting_as(self.graph, n):
            t = self.twin[src]
            b = self._add("call_method", "size", (self._flat.get(t, t), 0))
            if t in self._flat:       # (B, c, n): the map's own memory order, a view
                p = self._add("call_method", "reshape", (self._flat[t], b, *inner, -1))
            else:
                r = self._add("call_method", "reshape", (t, b, -1, *inner))
                p = self._add("call_method", "permute", (r, 0, *range(2, 2 + len(inner)), 1))
        self.replaced.append((n, p))
        return f"`{n.name}`: the heads split off the tokens' channels"

    def back_to_map(self, n: fx.Node) -> Optional[str]:
        """``o.view(B, -1, H, W)`` of ``o`` (B, s..., H * W) -> twin ``o.flatten(1, -2)
        .transpose(1, 2)``."""
        if not ((is_reshape(n) or (n.op == "call_method" and n.target == "unflatten")) and
                self.is_cf_map(n) and isinstance(n.args[0], fx.Node)):
            return None
        o = n.args[0]
        s = shape_of(o)
        N = self.grid[0] * self.grid[1]
        if o in self.twin or s is None or len(s) < 3 or s[0] != self.batch or s[-1] != N or \
                int(torch.Size(s[1:-1]).numel()) != shape_of(n)[1]:
            return None
        with inserting_as(self.graph, n):
            f = self._add("call_method", "flatten", (o, 1, -2)) if len(s) > 3 else o
            self.twin[n] = self._add("call_method", "transpose", (f, 1, 2))
        self._flat[self.twin[n]] = f
        return f"`{n.name}`: the heads' outputs merged as tokens"

    def map_view(self, n: fx.Node) -> fx.Node:
        """The map ``n`` read from its twin (for an op that needs the map)."""
        c = shape_of(n)[1]
        return self._add("call_method", "reshape",
                         (self._add("call_method", "transpose", (self.twin[n], 1, 2)),
                          -1, int(c), *self.grid))


def tokenise_channels_first(ctx) -> List[str]:
    """Rewrite a channels-first block's graph into token form (see the module's docstring).
    Nothing is changed unless the block's output gets a twin (the nodes added on the way are
    erased; the replacements are made only then)."""
    graph = ctx.graph
    cf = _placeholder_permute(graph)
    out = next(n for n in graph.nodes if n.op == "output")
    res = out.args[0] if isinstance(out.args[0], fx.Node) else None
    if cf is None or res is None or not (res.op == "call_method" and res.target == "permute"):
        return []
    tw = _Twins(ctx, cf)
    done = []
    for n in list(graph.nodes):
        if n is cf or n in tw.new:
            continue
        what = tw.back_to_map(n) or tw.visit(n)
        if what:
            done.append(what)
    last = res.args[0]
    if last not in tw.twin:        # (the graph is left as it was: only new nodes were added)
        ctx.gm.meta["evo_channels_first_stop"] = _where_it_stopped(ctx, tw, cf)
        for n in reversed(tw.new):
            graph.erase_node(n)
        return []
    for n, p in tw.replaced:
        n.replace_all_uses_with(p)
    originals = [n for n in tw.twin if n is not cf]
    _shape_reads(graph, [cf] + originals, cf)
    # ops that need the map read it from the twin: the block's input map too (a 2-D op on it,
    # ``x + dw(x)`` after the attention, kept the input a second stream and the residual walk
    # found no attention branch)
    for n in [cf] + originals:
        for u in list(n.users):
            if u is res or u in tw.new:
                continue
            with inserting_as(graph, u):
                u.replace_input_with(n, tw.map_view(n))
    with inserting_as(graph, out):
        size = graph.call_method("size", (cf.args[0],))
        view = graph.call_method("reshape", (tw.twin[last], size))
    out.replace_input_with(res, view)
    _remove_dead(graph, set(originals) | {res, cf} | set(tw.new))
    return done + ["the channels-first map's token-wise ops run on tokens"]


def _where_it_stopped(ctx, tw: _Twins, cf: fx.Node) -> str:
    """Why a channels-first block's output got no twin (for the refusal): the first op on a
    rewritten map that got no twin (shape reads and elementwise ops aside), else the first
    term added to the tokens that is not computed from them."""
    if tw.why:
        return tw.why
    replaced = {n for n, _ in tw.replaced}
    for n in ctx.graph.nodes:
        if n in tw.twin or n in tw.new or n in replaced or n is cf or n.op == "output" or \
                not any(v in tw.twin for v in n.all_input_nodes) or \
                is_size_query(n) or (n.op == "call_function" and n.target in _ELEMENTWISE):
            continue
        what = type(ctx.gm.get_submodule(n.target)).__name__ if n.op == "call_module" else \
            getattr(n.target, "__name__", str(n.target))
        return (f"`{n.name}` ({what}) on its channels-first map is no op evoplug runs on tokens "
                "(it treats the positions unalike, or is a form the rewrite does not know) and its "
                "output reaches the block's output otherwise than added to the tokens (as PVTv2's "
                "depthwise convolution is)")
    for n in ctx.graph.nodes:          # a term per map position, a parameter (1, C, H, W)
        if n.op == "call_function" and n.target in _ELEMENTWISE and n not in tw.twin and \
                any(v in tw.twin for v in n.all_input_nodes):
            for v in n.all_input_nodes:
                shape = shape_of(v)
                if v not in tw.twin and shape is not None and len(shape) >= 2 and \
                        tuple(shape[-2:]) == tw.grid and cf not in ancestors(v):
                    return (f"`{n.name}` combines the map with `{v.name}` {tuple(shape)}, a term "
                            "per map position the kept tokens cannot follow (the block is not "
                            "equivariant to the token order)")
    return "its output is not computed from its tokens by ops evoplug runs on tokens"


def _shape_reads(graph: fx.Graph, maps, cf: fx.Node):
    """Shape reads of the channels-first maps (the block's input ``cf`` and the maps that got a
    twin: ``B, C, H, W = x.shape``): the batch, height and width from the map the block was
    given (its placeholder (B, H, W, C)), the channels as the constant they are. So no op runs
    on a map for its shape only (a BatchNorm2d kept for ``x.shape`` ran twice per forward, its
    statistics too), and ``H * W`` reads as the grid's (rewrite/maps.py ``_subset_sizes``)."""
    ph, perm, shape = cf.args[0], (0, 3, 1, 2), None
    for n in maps:
        channels = int(shape_of(n)[1]) if shape_of(n) is not None else None
        for u in list(n.users):
            if u.op == "call_function" and u.target is getattr and u.args[1:] == ("shape",):
                reads = [(g, g.args[1]) for g in list(u.users)
                         if g.op == "call_function" and g.target is operator.getitem]
            elif u.op == "call_method" and u.target == "size" and len(u.args) == 2:
                reads = [(u, u.args[1])]
            else:
                continue
            for r, i in reads:
                if not isinstance(i, int) or not -4 <= i < 4 or (i % 4 == 1 and channels is None):
                    continue
                if i % 4 == 1:
                    for w in list(r.users):
                        w.args = fx.map_arg(w.args, lambda a: channels if a is r else a)
                        w.kwargs = fx.map_arg(w.kwargs, lambda a: channels if a is r else a)
                else:
                    if shape is None:
                        first = next(m for m in graph.nodes if m.op != "placeholder")
                        with inserting_as(graph, first):
                            shape = graph.call_function(getattr, (ph, "shape"))
                    with inserting_as(graph, r):
                        r.replace_all_uses_with(graph.call_function(operator.getitem,
                                                                    (shape, perm[i % 4])))
                graph.erase_node(r)
            if not u.users and u.op == "call_function":
                graph.erase_node(u)


def _remove_dead(graph: fx.Graph, candidates):
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph.nodes)):
            if n.users or n.op in ("placeholder", "output"):
                continue
            pure = n in candidates or (n.op == "call_function" and n.target in _PURE_FUNCTIONS) \
                or (n.op == "call_method" and n.target in _PURE_METHODS)
            if pure:
                graph.erase_node(n)
                changed = True
