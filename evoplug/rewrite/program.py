"""Rewrite one traced block into its slow-path program.

The program takes the block's own arguments (the token tensor replaced by the subset's tokens)
plus ``_evo_pos`` (B, n): the original index of each token of the subset it runs on (``None``
for a dense run), ``_evo_full``: the block's full token input, and ``_evo_block``: the block,
on which it sets what the forward sets on itself (an attention map kept for visualisation, a
counter), where the forward sets it (:func:`_set_by_forward`). It returns
``(tokens_out, global_row)``, plus a third item ``fast_base`` for blocks whose windowed
attention runs on the full map (Swin's map blocks, Twins' locally-grouped blocks): every
token's exact stream after attention and the representative token's, from which the converted
block starts the fast update; a block that returns a tuple (Hugging Face layers) has its other
items as a fourth:

* position terms found by the analysis (token-independent additive terms on the attention
  logits, e.g. BEiT's relative position bias) are gathered with ``_evo_pos``, so the kept tokens
  and the representative token keep their own biases; a term sized from the token count reads
  the size of the full input;
* the attention row of the global query (cls token, or the mean query when there is no prefix
  token) over the patch keys is computed next to the attention: taken from the softmax output,
  or computed from q and k for fused ``scaled_dot_product_attention`` / from the module's
  weights for ``nn.MultiheadAttention``; for windowed attention, each window's mean-query row
  mapped back to its tokens with the window index found by the analysis;
* 2-D map operations (a reshape of the tokens into the patch grid and back) are fed the full
  map and read back at the subset's positions; a block that takes a channels-last map (Swin)
  starts from the exact full map and returns tokens.

Each step is a pass over the block's graph: positions.py (position terms, per-token arguments),
maps.py (2-D map operations), row.py (the global attention row); this module traces the block,
runs the passes in order and makes the program.

The program is the generated ``forward`` of an fx GraphModule, called with the *block itself*
as ``self``: it reads the block's live parameters and buffers (so ``.to()``, ``.half()`` and
``load_state_dict`` need nothing special) and adds no module, parameter or state_dict key.
"""
from __future__ import annotations

import functools
import operator
from typing import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _format_import_block
from torch.package import sys_importer
from torch.package.importer import ObjMismatchError, ObjNotFoundError

from ..analyse.attention import find_attention
from ..analyse.block import BlockAnalysis, branches_on_weights, refuse_python_state
from ..analyse.calibrate import ModuleCall
from ..analyse.graph import (ancestors, getattr_path, is_add, is_whole_view, no_side_effects,
                             writes_in_place)
from ..analyse.grid import find_grid_ops
from ..analyse.one_window import collapse_one_window
from ..analyse.trace import mark_batch_specialised, trace_block
from ..analyse.writes import set_by_forward
from ..errors import AnalysisError
from ..runtime.gather import first_not_none, in_evolving_run, skip_fast_base, tokens_to_map
from ..runtime.programs import compile_program, modes_restored, set_written, sets_modes
from .context import Rewrite, viewed_attribute
from .grad_mode import keep_grad_modes
from .maps import map_operations
from .positions import position_terms, whole_token_args
from .row import global_row
from .skip_path import clone_path, is_identity, skip_path

fx.node.has_side_effect(set_written)     # (a call with no users: no dead-code pass drops it)


def build_program(a: BlockAnalysis, training: bool, gm: fx.GraphModule = None,
                  call=None, root: nn.Module = None) -> Callable:
    """Slow-path program of block ``a`` for train or eval mode (traces bake ``self.training``),
    specialised on ``call`` (default: the calibration call; the per-batch factory passes a
    call of another batch size, and ``root``: a stand-in of the block with its original class,
    so the converted block is traced without being changed)."""
    if gm is None:
        call = a.call if call is None else call
        gm = trace_block(a.module if root is None else root, a.name, a.plan, a.attention_ids(),
                         training, call)
        refuse_python_state(a.name, gm)
        branches_on_weights(a.name, gm)
        mark_batch_specialised(a, gm, a.plan.bind(a.name, call.args, call.kwargs)[0].shape[0])
        if a.grid_ops_expected:
            _shape_prop_without_side_effects(a, gm, call)
        else:
            # (the shapes tell heads merged into the batch dim: without them the train-mode and
            # per-batch programs read the global row unmerged, (B * heads, 1, N), and their
            # blocks ran every token, silently; audits of the twenty-ninth session)
            try:
                _shape_prop_without_side_effects(a, gm, call)
            except Exception:   # noqa: BLE001 - the program runs without them as before
                pass
        if a.one_window:
            _one_window_again(a, gm, call)
    a.leaf_reads = a.leaf_reads | gm.meta.get("evo_leaf_reads", frozenset())
    rw = _start(a, gm)
    for rewrite_pass in (position_terms, whole_token_args, _stream_head, map_operations,
                         global_row, _skip_fast_base, _outputs):
        rewrite_pass(rw)
    # what the runtime must hand the program (a block that reads neither can take its kept
    # tokens straight from the block before it, see runtime/block.py)
    a.uses_pos = a.uses_pos or bool(rw.pos.users)
    a.uses_full = a.uses_full or bool(rw.full.users)
    keep_grad_modes(gm.graph)
    gm.graph.lint()
    gm.recompile()
    _check_attrs_resolve(a, gm, training)
    # the submodules the program calls by path on the live block (what they compute, and
    # what replaces them, is read at run time: not part of what runtime/block.py checks)
    a.leaf_paths = tuple(sorted(set(a.leaf_paths) | {n.target for n in gm.graph.nodes
                                                     if n.op == "call_module"}))
    return _as_program(a, gm)


def _one_window_again(a: BlockAnalysis, gm: fx.GraphModule, call):
    """The analysis read the block's one window as attention over its tokens (analyse/
    one_window.py): a program traced again (train mode, another batch size) reads it so too."""
    site = find_attention(gm, a.name)
    feed = a.plan.feed(*a.plan.bind(a.name, call.args, call.kwargs))
    if not collapse_one_window(gm, a, site, find_grid_ops(gm, a, site), feed, feed[0].shape[0]):
        raise AnalysisError(a.name, "its one window covering the map, read as attention over its "
                                    "tokens at the conversion, is not one in the program traced "
                                    "for this call (another mode or batch size)")
    _shape_prop_without_side_effects(a, gm, call)


def _start(a: BlockAnalysis, gm: fx.GraphModule) -> Rewrite:
    """Add the ``_evo_pos``, ``_evo_full`` and ``_evo_block`` arguments; a block that takes a
    (B, H, W, C) map runs its map part on the exact full map (its whole input), the token part
    on the subset."""
    graph = gm.graph
    gm.meta["evo_keeps_state"] = a.keeps_state      # (rewrite/context.py keeps_state)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    token = placeholders[0]
    _drop_whole_views(graph, token)
    with graph.inserting_after(placeholders[-1]):
        pos = graph.placeholder("_evo_pos", default_value=None)
    with graph.inserting_after(pos):
        full = graph.placeholder("_evo_full", default_value=None)
    with graph.inserting_after(full):
        block = graph.placeholder("_evo_block", default_value=None)
    root = token
    if a.token_map:
        with graph.inserting_after(block):
            root = graph.call_function(tokens_to_map, (token, full, a.grid[0], a.grid[1]))
        if "tensor_meta" in token.meta:     # (the map's shape: a view of it may be the first op)
            root.meta["tensor_meta"] = token.meta["tensor_meta"]
        token.replace_all_uses_with(root, delete_user_cb=lambda u: u is not root)
    rw = Rewrite(a, gm, find_attention(gm, a.name), token, pos, full, block, root,
                 root if a.token_map else full)
    rw.stream_in, rw.stream_full = token, full
    return rw


def _drop_whole_views(graph: fx.Graph, token: fx.Node):
    """Views of every token, in order (``x[:, 0:]``: an optional class token's cut with none,
    ``x[:, :N]``, ``x.narrow(1, 0, N)``), are the tokens themselves: on the subset too (a
    ``narrow`` of the full length would fail there), and followed like them (the map re-run on
    the full input sees through them: keys reduced from a patchwork map of the kept tokens and
    the representative token until audit Y5 of the thirty-ninth session)."""
    for n in list(graph.nodes):
        if is_whole_view(n) and token in ancestors(n) | {n.args[0]}:
            n.replace_all_uses_with(n.args[0])
            graph.erase_node(n)


def _stream_head(rw: Rewrite):
    """A windowed or map block whose stream passes a token-wise op before its adds (``x =
    n0(x)``): the windows' exact update and the representative token's stream value start from
    ``n0`` of the tokens, not the tokens (the forty-first session (check F2): 0.02-6.8 off)."""
    a, graph = rw.a, rw.graph
    head = [n for n in graph.nodes if n.name in a.stream_head]
    if not head or not (a.windowed or a.token_map):
        return
    path = [head[0].all_input_nodes[0]] + head
    with graph.inserting_before(head[-1].next):
        whole = graph.call_function(first_not_none, (rw.full, rw.token))
        rw.stream_full = graph.call_function(in_evolving_run, (rw.full, clone_path(graph, path, whole)))
        if a.token_map:     # (the head runs on the entry map: the subset's own tokens get theirs)
            rw.stream_in = clone_path(graph, path, rw.token)
    if not a.token_map:
        rw.stream_in = head[-1]


def _skip_fast_base(rw: Rewrite):
    """A block whose skip path is not the identity (rewrite/skip_path.py): the fast update
    starts from every token's own skip path, ``S(x_j) + r_after - S(r_before)``."""
    a, graph = rw.a, rw.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    result = out_node.args[0]
    scaled = [b.skip for b in a.branches if b.skip]
    if a.token_map or not isinstance(result, fx.Node):
        path = None
    else:
        path = skip_path(rw.gm, rw.token, result, a.stream_head)
        path = None if path is None or is_identity(rw.gm, path) else path
    if path is not None and rw.fast_base is not None and not scaled and \
            all(is_add(n) or n.name in a.stream_head for n in path[1:]):
        return      # (windows run on every token: their update starts from the head, _stream_head)
    if (a.token_map or a.windowed or rw.fast_base is not None) and (scaled or path is not None):
        ops = scaled or [n.name for n in path[1:] if not is_add(n)]
        raise AnalysisError(a.name, "its residual stream is scaled or passes a token-wise op on "
                                    "its way (`" + "`, `".join(ops) + "`), which evoplug does "
                                    "not combine with a map block or windowed attention")
    if path is None:
        return
    with graph.inserting_before(out_node):
        z = graph.call_function(first_not_none, (rw.full, rw.token))
        rep = graph.call_function(operator.getitem, (rw.token, (slice(None), slice(-1, None))))
        s_full, s_rep = clone_path(graph, path, z), clone_path(graph, path, rep)
        rw.fast_base = graph.call_function(skip_fast_base, (s_full, s_rep, rw.pos, rw.full))


def _outputs(rw: Rewrite):
    """The program returns (tokens, row), and the fast-update base where there is one; a block
    that returns a tuple adds the tuple's other items as a fourth (see BlockSpec.returns); what
    the forward sets on the block the program sets itself (:func:`_set_by_forward`)."""
    a, graph = rw.a, rw.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    result = out_node.args[0]
    if not isinstance(result, fx.Node):
        raise AnalysisError(a.name, f"block returns {type(result).__name__}, not one token tensor")
    if a.token_map and rw.fast_base is None and not rw.stream_is_input:
        raise AnalysisError(a.name, "its residual stream never becomes tokens (no (B, H, W, C) -> "
                                    "(B, N, C) view of it): nothing would run on fewer tokens")
    rest = out_node.meta.get("evo_rest")
    _set_by_forward(rw)
    if rest is not None:     # a tuple-returning block: its other items, as the program made them
        out_node.args = ((result, rw.row, rw.fast_base, tuple(rest)),)
    elif rw.fast_base is not None or a.token_map:
        out_node.args = ((result, rw.row, rw.fast_base),)
    else:
        out_node.args = ((result, rw.row),)


def _set_by_forward(rw: Rewrite):
    """The tensors the block's forward sets on itself or a module it traced into (analyse/
    writes.py ``set_by_forward``: ``self.attn_map = attn.detach()``), each set by the program
    where the forward sets it, once the value is computed and the old one read for the last
    time (:func:`_where_set`): a call of runtime/programs.py ``set_written`` with the block, an
    attribute or a buffer, as the forward's kind; values of another kind (a size) are the
    calibration's (BlockSpec.writes). Set after the program returned, they were never set by a
    recomputation that torch's non-reentrant checkpoint stops once it has the tensors it saves
    (a plain tensor counter of the first block counted its forwards only, half the dense
    model's; audit J1 of the forty-fifth session). Those computed from the block's arguments
    are named in ``a.state_from_tokens``: an evolving block holds them for the tokens it ran
    (audit H4 of the forty-fourth session: the programs set nothing, and the attribute kept a
    batch from before the conversion). So are an attribute's in-place writes from them, of
    their values or at a place read from the token count (``self.acc += x.mean()``,
    ``self.hist[:, :N] += a.mean(...)``, ``self.buf[n - 1] = 1``, ``self.m.mul_(0.9).add_(
    x.mean())``: the tokens' order and count the block ran, also at keep 1.0 off the identity
    fast path, without a word, until the forty-fifth session)."""
    graph, own, from_tokens = rw.graph, [], []
    for n in [n for n in graph.nodes if n.op == "call_function" and n.target is set_by_forward]:
        path, name, value, kind = n.args
        graph.erase_node(n)
        of = value.meta.get("type")
        if of is not None and not issubclass(of, torch.Tensor):
            continue
        target = f"{path}.{name}" if path else name
        with graph.inserting_after(_where_set(rw, value, target)):
            graph.call_function(set_written, (rw.block, path, name, value, kind))
        if not path:
            own.append(name)
        if any(v.op == "placeholder" for v in ancestors(value) | {value}):
            from_tokens.append(target)
    for n in [n for n in graph.nodes if writes_in_place(n)]:
        written = viewed_attribute(n.args[0])
        if written is not None and any(v.op == "placeholder" for v in ancestors(n)):
            from_tokens.append(written.target)
    rw.a.state_from_tokens = tuple(dict.fromkeys(rw.a.state_from_tokens + tuple(from_tokens)))
    rw.a.sets_own = tuple(dict.fromkeys(rw.a.sets_own + tuple(own)))


def _where_set(rw: Rewrite, value: fx.Node, target: str) -> fx.Node:
    """The node after which the program sets ``target`` to ``value``: the last of ``value``,
    the reads of ``target``'s old value (``get_attr``: a read after the set gets ``value``
    itself in the trace) and the program's arguments (the block among them)."""
    order = {n: i for i, n in enumerate(rw.graph.nodes)}
    reads = [n for n in rw.graph.nodes if n.op == "get_attr" and n.target == target]
    return max([value, rw.block, *reads], key=order.__getitem__)


def batch_program_factory(a: BlockAnalysis, orig_class: type) -> Callable:
    """What the runtime calls, ``factory(training, args, kwargs)``, for the program of a block
    whose trace specialised a value on the batch size, at a batch size it has not seen: the
    call's own arguments are the calibration input."""
    return functools.partial(_program_for_batch, a, orig_class)


def _program_for_batch(a: BlockAnalysis, orig_class: type, training: bool, args, kwargs) -> Callable:
    detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
    call = ModuleCall(a.name, -1, tuple(map(detach, args)), {k: detach(v) for k, v in kwargs.items()})
    return build_program(a, training, call=call, root=stand_in(a.module, orig_class))


def stand_in(module: nn.Module, cls: type) -> nn.Module:
    """An instance of ``cls`` that shares ``module``'s attribute dict: the same parameters,
    buffers and submodules, seen through the original class (to trace its forward without
    changing the converted block other threads may be running)."""
    twin = object.__new__(cls)
    twin.__dict__ = module.__dict__
    return twin


def _as_program(a: BlockAnalysis, gm: fx.GraphModule) -> Callable:
    """The program as a plain function compiled from its own source (imports included), which
    is what a pickled model keeps and compiles again; the same path runs at every conversion.
    A graph that calls something Python cannot import by name keeps fx's function (such a
    model converts and runs, but does not pickle)."""
    code = gm.graph.python_code(root_module="self")
    try:
        imports = _format_import_block(code.globals, sys_importer)
    except (ObjNotFoundError, ObjMismatchError):   # a global Python cannot import by name
        return modes_restored(type(gm).forward) if sets_modes(code.src) else type(gm).forward
    return compile_program(imports + "\n" + code.src)


def _shape_prop_without_side_effects(a: BlockAnalysis, gm: fx.GraphModule, call):
    """Shapes for a new trace, on ``call``'s input, leaving no trace (buffers and the RNG state
    put back); already there when the trace rewrote a map block (analyse/canon.py)."""
    from torch.fx.passes.shape_prop import ShapeProp
    if gm.meta.get("evo_shapes"):
        return
    with no_side_effects(a.module), torch.no_grad():
        ShapeProp(gm).propagate(*a.plan.feed(*a.plan.bind(a.name, call.args, call.kwargs)))


def _check_attrs_resolve(a: BlockAnalysis, gm: fx.GraphModule, training: bool):
    """The program runs with the block as ``self``: every attribute it reads must be the
    block's own (in the program's mode: some modules cache tensors only in eval mode). Tensors
    baked in by tracing are already non-persistent buffers of the block (analysis.trace_block)."""
    was = a.module.training
    a.module.train(training)
    try:
        for n in gm.graph.nodes:
            if n.op not in ("get_attr", "call_module"):
                continue
            try:
                if n.op == "call_module":
                    a.module.get_submodule(n.target)
                else:
                    getattr_path(a.module, n.target)
            except AttributeError:
                raise AnalysisError(a.name, f"traced program reads `{n.target}`, which the block "
                                            "does not have") from None
    finally:
        a.module.train(was)
