"""Rewrite pass for the global attention row: the row of the global query (the class token,
or the mean query where there is none) over the patch keys, computed next to the attention:
taken from the softmax output, computed from q and k for fused ``scaled_dot_product_attention``
or from the module's weights for ``nn.MultiheadAttention``; for windowed attention each
window's mean-query row, mapped back to its tokens with the analysis' window index."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..analyse.attention import AttentionSite, sdpa_arg
from ..analyse.block import BlockAnalysis
from ..analyse.graph import ancestors, is_reshape, module_of, shape_of
from ..errors import AnalysisError
from ..runtime.rows import (logits_query_row, mha_attn_mask, mha_query_row, patch_span,
                            probs_query_row, sdpa_query_row, upsample_row, upsample_taps,
                            window_logits_row, window_row, window_sdpa_row, window_slots)
from .context import Rewrite


def _argument_reaches(a: BlockAnalysis, node) -> bool:
    """Whether a tensor argument of the block other than the tokens reaches ``node`` (the
    logits, the mask): a padding mask may then arrive, whatever the calibration's held, and by
    any path (timm's ``maybe_add_mask`` is one call, no add)."""
    if not isinstance(node, fx.Node):
        return False
    holders = [n for n in node.graph.nodes if n.op == "placeholder"][1:1 + len(a.plan.tensor_args)]
    up = ancestors(node) | {node}
    return any(h in up for h in holders)


def global_row(rw: Rewrite):
    """The global query's attention row over the patch keys, next to the attention."""
    a, graph, site = rw.a, rw.graph, rw.site
    P, cls_query = a.num_prefix, a.global_query == "cls"
    if a.num_suffix and not cls_query:    # the mean query's patches: between the special tokens
        with graph.inserting_after(rw.full):
            P = graph.call_function(patch_span, (a.num_prefix, a.num_suffix, rw.pos))
    with graph.inserting_after(site.node):
        if a.windowed:
            row = _window_row(a, rw.gm, site)
        elif site.kind == "softmax":
            extra = _images_if_heads_merged(rw)
            flags = {"masked": True} if a.row_masked else {}
            if not _argument_reaches(a, site.logits):    # no mask among the block's arguments
                flags["padded"] = False
            row = graph.call_function(probs_query_row, (site.node, P) + extra) if cls_query else \
                graph.call_function(logits_query_row, (site.logits, P) + extra, flags)
        elif site.kind == "sdpa":
            mask = sdpa_arg(site.node, 3, "attn_mask")
            flags = {"masked": True} if a.row_masked and not cls_query else {}
            if not _argument_reaches(a, mask):
                flags["padded"] = False
            row = graph.call_function(sdpa_query_row, (site.q, site.k, mask, site.scale, P,
                                                       cls_query) + _images_if_heads_merged(rw),
                                      flags)
        else:
            row = _mha_row(rw, P, cls_query)
    if a.kv_grid is not None and row is not None:   # keys are regions of the reduced map
        row = _upsampled(a, rw.gm, row)
    rw.row = row


def _mha_arg(node: fx.Node, index: int, name: str):
    return node.kwargs.get(name, node.args[index] if len(node.args) > index else None)


def _mha_row(rw: Rewrite, P, cls_query: bool) -> fx.Node:
    """nn.MultiheadAttention's global row, with its masks as the module takes them; an
    ``attn_mask`` gathered for the subset ((B, 1, n, n), :func:`gather_pair_bias`) goes to
    the module as (B * heads, n, n)."""
    graph, site = rw.graph, rw.site
    mha_module = module_of(rw.gm, site.node)
    mask = _mha_arg(site.node, 5, "attn_mask")
    if isinstance(mask, fx.Node):
        with graph.inserting_before(site.node):
            mask = graph.call_function(mha_attn_mask, (mask, mha_module.num_heads))
        if "attn_mask" in site.node.kwargs:
            site.node.update_kwarg("attn_mask", mask)
        else:
            site.node.update_arg(5, mask)
    with graph.inserting_before(site.node):
        mha = graph.get_attr(site.node.target)
    flags = {"masked": True} if rw.a.row_masked and not cls_query else {}
    return graph.call_function(mha_query_row, (mha, site.q, site.k, mask, P, cls_query,
                                               _mha_arg(site.node, 3, "key_padding_mask")), flags)


def _constant_buffer(a: BlockAnalysis, gm: fx.GraphModule, name: str, value: torch.Tensor):
    """A constant the program reads (a non-persistent buffer: no checkpoint holds it), on the
    graph module and on the block (the program runs with the block as self)."""
    if not hasattr(a.module, name):
        a.module.register_buffer(name, value, persistent=False)
    gm.register_buffer(name, value, persistent=False)


def _upsampled(a: BlockAnalysis, gm: fx.GraphModule, row: fx.Node) -> fx.Node:
    """The row over the reduced map's keys spread onto the tokens (:func:`upsample_row`),
    with its bilinear taps made once here as buffers."""
    graph = gm.graph
    try:
        device = next(t.device for t in list(a.module.parameters()) + list(a.module.buffers()))
    except StopIteration:
        device = None
    names = []
    for side, (size_in, size_out) in enumerate(zip(a.kv_grid, a.grid)):
        taps = upsample_taps(size_in, size_out, device)
        if side == 0:
            taps = (taps[0], taps[1], taps[2].unsqueeze(1))    # rows: weights (h, 1)
        for part, t in zip(("first", "second", "weight"), taps):
            name = f"_evo_upsample_{'hw'[side]}_{part}"
            _constant_buffer(a, gm, name, t)
            names.append(name)
    with graph.inserting_before(row):
        nodes = [graph.get_attr(n) for n in names]
    with graph.inserting_after(row):
        taps = (tuple(nodes[:3]), tuple(nodes[3:]))
        return graph.call_function(upsample_row, (row, a.kv_grid, a.grid, taps))


def _images_if_heads_merged(rw: Rewrite) -> tuple:
    """``(batch size node,)`` where the attention merges the heads into the batch dim
    ((B * heads, N, d), timm's SAM), else ``()``."""
    q, token = shape_of(rw.site.q), shape_of(rw.token)
    if q is None or token is None or q[0] == token[0]:
        return ()
    rw.a.heads_in_batch = True
    _check_batch_outer(rw, q[0], token[0])
    graph = rw.graph
    with graph.inserting_before(rw.site.node):
        return (graph.call_method("size", (rw.root, 0)),)


def _check_batch_outer(rw: Rewrite, merged: int, images: int):
    """Heads merged into the batch dim are read with the batch outer ((B * heads, N, d), as
    torch's MultiheadAttention merges them): a merge with the heads outer (``q.transpose(0, 1)
    .reshape(heads * B, N, d)``) ranked each image by other images' rows, silently (audit Q4 of
    the twenty-eighth session), and is refused. Found at the reshape that merges the two dims
    on the queries' way (the calibration's batch tells them apart)."""
    heads, n = merged // images, rw.site.q
    for _ in range(32):
        src = next((a for a in n.all_input_nodes if (shape_of(a) or (0,))[0] == merged), None) \
            if not is_reshape(n) else n.args[0]
        if is_reshape(n):
            dims = shape_of(src) if isinstance(src, fx.Node) else None
            if dims is not None and len(dims) >= 2 and dims[0] * dims[1] == merged and \
                    dims[:2] == (heads, images) and heads != images:
                raise AnalysisError(rw.a.name, f"its attention merges the heads into the batch dim "
                                               f"with the heads outer (`{n.name}`: {tuple(dims)} -> "
                                               f"heads * batch); evoplug reads such a merge with "
                                               f"the batch outer (batch * heads, as torch's "
                                               f"MultiheadAttention merges them)")
            if dims is None or dims[0] != merged:
                return
        if src is None or not isinstance(src, fx.Node):
            return
        n = src


def _window_row(a: BlockAnalysis, gm: fx.GraphModule, site: AttentionSite):
    """Windowed attention: the mean query's attention in every window (the no-cls global
    query, per window), mapped back to the tokens with the window index found by the analysis;
    None when the windows could not be mapped."""
    if a.window_index is None or site.kind not in ("softmax", "sdpa"):
        return None
    graph = gm.graph
    _constant_buffer(a, gm, "_evo_window_index", a.window_index)
    slots = window_slots(a.window_index, a.num_tokens)     # windows partition the map
    if slots is not None:
        _constant_buffer(a, gm, "_evo_window_slots", slots)
    heads, folded = a.window_head_dims, a.window_heads_folded
    with graph.inserting_after(site.node):
        if site.kind == "softmax":
            per_window = graph.call_function(window_logits_row, (site.logits, heads, folded))
        else:
            mask = sdpa_arg(site.node, 3, "attn_mask")
            per_window = graph.call_function(window_sdpa_row, (site.q, site.k, mask, site.scale,
                                                               heads, folded))
    with graph.inserting_after(per_window):
        index = graph.get_attr("_evo_window_index")
    last = index
    if slots is not None:
        with graph.inserting_after(index):
            last = graph.get_attr("_evo_window_slots")
    with graph.inserting_after(last):
        return graph.call_function(window_row, (per_window, index, a.num_tokens,
                                                None if slots is None else last))
