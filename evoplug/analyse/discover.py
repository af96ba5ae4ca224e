"""Candidate blocks from the calibration record, the modules evoplug refuses (by block name,
with the reason), the prefix tokens, the patch grid and the class token."""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..errors import AnalysisError
from ..integrations.registry import hint
from ..runtime.evolve import GuessedGrid
from .calibrate import ModuleCall
from .provenance import rows_followed


def token_block_reason(call: ModuleCall, batch: Optional[int] = None,
                        channels_last: bool = False, seq: Optional[bool] = None) -> Optional[str]:
    """None if the call looks like a token block: (B, N, C) in, same shape out; or a
    channels-last token map (B, H, W, C) in, same shape out (Swin), when ``channels_last``."""
    tensors = [a for a in call.args if isinstance(a, torch.Tensor)]
    tensors += [v for v in call.kwargs.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        return container_reason(call) or "called without a tensor"
    x, rest = tensors[0], tensors[1:]
    if call.token_key is not None:      # (tokens not first: forward(self, pos, x))
        x, rest = call.first_tensor(), call.other_tensors()
    if x.dim() == 4 and not channels_last:
        return (f"input of shape {tuple(x.shape)} is a 4-D map that is not a channels-last token "
                "map (no norm or linear over its last dim)")
    if x.dim() not in (3, 4):
        return f"input of shape {tuple(x.shape)} is not a (B, N, C) token tensor"
    if seq is None:         # (N, B, C): known from the block's attention, else by the batch
        seq = sequence_first(x, batch)
    if batch is not None and x.shape[0] != batch and not seq:
        return (f"its tokens arrive regrouped (batch {x.shape[0]} for {batch} image(s)): the "
                "windows or patches are formed outside any block evoplug can convert, so it "
                "cannot tell which image position each token holds")
    out = token_output(call.output)
    if out is not None and out is not call.output and (
            (call.module_type is not None and issubclass(call.module_type, nn.MultiheadAttention))
            or x.dim() == 3 and x.shape[1] == 1 and not seq and any(
                t.dim() == 3 and t.shape[0] == x.shape[0] and t.shape[1] > 1 for t in rest)):
        # an attention module's (output, weights), a pooling query's attention over keys of
        # their own (a block of one token, transformers' Swin's last stage at 32 px, is a block)
        out = None
    if out is None:
        return _returned_container(call.output) or f"returns {type(call.output).__name__}, not the token tensor"
    if tuple(out.shape) != tuple(x.shape):
        return (f"output {tuple(out.shape)} is not the input token map {tuple(x.shape)} "
                "(not a self-attention token block, e.g. class attention or pooling)")
    return None


def sequence_first(x: torch.Tensor, batch: Optional[int]) -> bool:
    """Tokens (N, B, C) of ``batch`` images: a sequence-first block (PyTorch's
    ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` with ``batch_first=False``,
    their default). It converts like a batch-first one, through ``x.transpose(0, 1)``
    (``CallPlan.token_perm``)."""
    return batch is not None and x.dim() == 3 and x.shape[0] != batch and x.shape[1] == batch


def mha_layout(m: nn.Module, x: torch.Tensor, calls: Dict[int, ModuleCall]) -> Optional[str]:
    """The token layout an ``nn.MultiheadAttention`` inside block ``m`` says the block's input
    ``x`` has, where it takes ``x``'s shape as its query (no transpose between): 'sequence' or
    'batch' by its ``batch_first``; 'ambiguous' for a square (N, N, C) input (a calibration batch
    equal to the token count: a transpose would not show); None without such an attention."""
    if x is None or x.dim() != 3:
        return None
    for sub in m.modules():
        c = calls.get(id(sub))
        if not isinstance(sub, nn.MultiheadAttention) or c is None or sub is m:
            continue
        q = c.args[0] if c.args else c.kwargs.get("query")
        if not isinstance(q, torch.Tensor) or tuple(q.shape) != tuple(x.shape):
            continue
        if x.shape[0] == x.shape[1]:
            return "ambiguous"
        return "batch" if sub.batch_first else "sequence"
    return None


_SQUARE = ("its tokens {} are as many as the images in the calibration input: evoplug cannot "
           "tell the batch dim from the token dim (a sequence-first block takes (N, B, C)); "
           "convert with an example input of another batch size")


def token_output(out) -> Optional[torch.Tensor]:
    """The token tensor a block returns: the output itself, or the first item of a tuple or
    list (Hugging Face layers return ``(hidden_states, attn_weights)``; the other items are
    passed through, see rewrite/program.py); None otherwise."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


def container_reason(call: ModuleCall) -> Optional[str]:
    """Why a module is no block evoplug converts where its tokens come or go inside a container:
    no argument is a tensor but one is a tuple, list or dict holding them (``forward(self, xp)``
    with ``x, pos = xp``: blocks of an ``nn.Sequential`` handing (tokens, positions) on), or it
    returns a dict or a dataclass (a tuple or list whose first item is the tokens is read:
    :func:`token_output`). None otherwise. (Until audit H4 of the forty-fourth session the first
    raised a raw AttributeError and the second was told "no residual attention branch".)"""
    if call.first_tensor() is None:
        held = next((a for a in (*call.args, *call.kwargs.values()) if isinstance(a, (
            tuple, list, dict)) and any(isinstance(t, torch.Tensor) for t in tree_leaves(a))), None)
        if held is not None:
            return (f"its tokens come inside a {type(held).__name__} argument (`forward(self, xp)` "
                    "with `x, pos = xp`): evoplug converts blocks that take their tokens as a tensor "
                    "argument (`forward(self, x, pos)`, called from a loop: `for blk in self.blocks: "
                    "x = blk(x, pos)`)")
    return _returned_container(call.output)


def _returned_container(out) -> Optional[str]:
    if not isinstance(out, dict) and not (dataclasses.is_dataclass(out) and not isinstance(out, type)):
        return None
    kind = "dict" if isinstance(out, dict) else "dataclass"
    kind += "" if type(out) is dict else f" ({type(out).__name__})"
    return (f"returns a {kind}, not its tokens: evoplug converts blocks "
            "that return the token tensor, or a tuple or list whose first item it is")


def channels_last(m: nn.Module, call: ModuleCall, calls: Dict[int, ModuleCall]) -> bool:
    """A 4-D block input (B, H, W, C) is a channels-last token map when a norm or linear inside
    the block runs over its last dim on a map of that shape, or of its H and W swapped (Swin's
    ``norm1``; a module, or a function: ``F.layer_norm(x, (C,), w, b)``, recorded by the
    calibration. Such a block whose only norm over the map was a function was refused, "not a
    channels-last token map", until audit G1 of the forty-third session)."""
    x = call.first_tensor()
    if x is None or x.dim() != 4:
        return False
    B, H, W, C = x.shape
    maps = {(B, H, W, C), (B, W, H, C)}
    if id(m) in calls and calls[id(m)].last_dim_maps & maps:
        return True
    for sub in m.modules():
        c = calls.get(id(sub))
        if c is None or sub is m:
            continue
        inp = next((a for a in c.args if isinstance(a, torch.Tensor)), None)
        if inp is None or tuple(inp.shape) not in maps:
            continue
        if isinstance(sub, nn.Linear) and sub.in_features == x.shape[-1]:
            return True
        shape = getattr(sub, "normalized_shape", None)
        if shape is not None and tuple(shape) == (x.shape[-1],):
            return True
    return False


def channels_first(m: nn.Module, call: ModuleCall, x: torch.Tensor, calls: Dict[int, ModuleCall]) -> bool:
    """A 4-D block input ``x`` (B, C, H, W) that is a channels-first token map: the block
    permutes it into a channels-last map itself (transformers' VitDet layers: a norm or linear
    inside runs over the last dim of a map of the shape (B, H, W, C)), or keeps it channels
    first and runs a 1x1 convolution or a norm over its channels on it (timm's CoAtNet and
    LeViT with ``use_conv``; rewritten into token form, analyse/channels_first.py). It converts
    as the channels-last map, through ``x.permute(0, 2, 3, 1)`` (``CallPlan.token_perm``)."""
    if x.dim() != 4 or x.shape[1] == x.shape[3]:
        return False
    if channels_last(m, ModuleCall(call.name, call.order, (x.permute(0, 2, 3, 1),), {}), calls):
        return True
    call.keeps_channels_first = _channel_op_on(m, x, calls)
    return call.keeps_channels_first


def _channel_op_on(m: nn.Module, x: torch.Tensor, calls: Dict[int, ModuleCall]) -> bool:
    """A module inside ``m`` runs a 1x1 convolution, a BatchNorm2d or a norm over the channels
    (``LayerNorm2d``) on a channels-first map of ``x``'s shape; inside a stage (a ``Sequential``
    or ``ModuleList`` of modules, SwiftFormer's and EdgeNeXt's) on ``x`` itself, so that a stage
    whose first block starts with a wider convolution is looked into block by block."""
    C = x.shape[1]
    stage = isinstance(m, (nn.Sequential, nn.ModuleList)) or any(
        isinstance(ch, (nn.Sequential, nn.ModuleList)) and len(ch) > 1 for ch in m.children())
    for sub in m.modules():
        c = calls.get(id(sub))
        if c is None or sub is m:
            continue
        inp = next((a for a in c.args if isinstance(a, torch.Tensor)), None)
        if inp is None or tuple(inp.shape) != tuple(x.shape) or (stage and not _same_tensor(inp, x)):
            continue
        if isinstance(sub, nn.Conv2d) and sub.in_channels == C and sub.groups == 1 and \
                tuple(sub.kernel_size) == (1, 1) and tuple(sub.stride) == (1, 1):
            return True
        if isinstance(sub, nn.BatchNorm2d) and sub.num_features == C:
            return True
        shape = getattr(sub, "normalized_shape", None)
        if shape is not None and tuple(shape) == (C,):
            return True
    return False


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` is ``b`` or an alias of it of the same geometry. A twin built inside
    ``torch.func.grad`` or ``jvp`` sees functorch's wrappers, which have no storage: compared
    by the tensors they wrap (a raw "Cannot access data pointer" until audit B2 of the
    forty-first session); another tensor without storage only by identity."""
    if a is b:
        return True
    a, b = _unwrapped(a), _unwrapped(b)
    try:
        return a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.shape == b.shape
    except RuntimeError:                # (a wrapper subclass without storage)
        return False


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under functorch's wrappers (one per transform level)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


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
    regrouped = getattr(calls, "derived", {}).get("images_in_rows", ())

    def visit(name: str, m: nn.Module):
        c = calls.get(id(m))
        if c is None:  # containers that are not called themselves (ModuleList, ModuleDict)
            for child_name, child in m.named_children():
                visit(f"{name}.{child_name}" if name else child_name, child)
            return
        if c.attention_ops == 0:
            return
        x = c.first_tensor()
        layout = mha_layout(m, x, calls) if c.n_calls == 1 and c.attention_ops == 1 else None
        # (N, B, C) as the block's attention says (the model's batch may be misread: a (N, B, C)
        # model input), else where the calibration's batch sits, unless one image more grew
        # dim 0 (regrouped (B*N, T', C) with T' == B: provenance.images_in_rows)
        seq = layout == "sequence" or (layout is None and x is not None and sequence_first(x, batch)
                                       and id(m) not in regrouped)
        cf = not seq and x is not None and channels_first(m, c, x, calls)
        reason = token_block_reason(c, batch, cf or channels_last(m, c, calls), seq)
        if layout == "ambiguous" or (layout is None and reason is None and x is not None and
                                     x.dim() == 3 and x.shape[0] == x.shape[1] == batch):
            reason = _SQUARE.format(tuple(x.shape))
        if c.n_calls == 1 and c.attention_ops == 1 and reason is None:
            if _delegate_is_block(name, m, c, calls, visit, candidates, reports):
                return
            c.token_perm = (1, 0, 2) if seq else (0, 2, 3, 1) if cf else ()
            candidates.append((name, m, c))
            return
        if c.n_calls == 1 and c.attention_ops == 1 and x is not None and \
                reason == _SQUARE.format(tuple(x.shape)):
            # a block of as many tokens as images (one token, one image: transformers' Swin's
            # last stage at 32 px): refused as such, so that it is analysed on more images,
            # not through its attention module, whose windows are no token block
            reports.append((name, reason, True))
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
        reports.append((name, *_unit_report(c, reason, inside)))

    visit("", model)
    candidates.sort(key=lambda t: t[2].order)
    failed = [(n, r) for n, r, block in reports if block]
    skipped = [(n, r) for n, r, block in reports if not block]
    return candidates, failed, skipped + _between_blocks(model, calls, candidates, reports)


#: how a module without attention between the converted blocks is reported (``skipped``)
BETWEEN = "between converted blocks, "


def _between_blocks(model: nn.Module, calls: Dict[int, ModuleCall], candidates, reports):
    """Siblings of the candidate blocks, called between the first and the last of them, that
    compute no attention (MLP-Mixer blocks, conv blocks in a stage): left as they are, which
    ``explain`` says (they were not named anywhere; audit H3 of the twenty-seventh session)."""
    taken = {n for n, _, _ in candidates} | {n for n, _, _ in reports}
    parents: Dict[str, List[int]] = {}
    for name, _, c in candidates:
        if "." in name:
            parents.setdefault(name.rsplit(".", 1)[0], []).append(c.order)
    out = []
    for parent, orders in parents.items():
        for child_name, child in model.get_submodule(parent).named_children():
            name, c = f"{parent}.{child_name}", calls.get(id(child))
            if c is not None and c.attention_ops == 0 and name not in taken and \
                    min(orders) < c.order < max(orders):
                out.append((name, f"{BETWEEN}no attention computation in it ({type(child).__name__}); "
                                  "it runs on all the tokens in their original order"))
    return out


def _unit_report(c: ModuleCall, reason: Optional[str], inside) -> Tuple[str, bool]:
    """(why, whether it is a token block) of a module reported as one unit: its own reason, or
    why its attention computations cannot convert; with the first report from inside it."""
    # (a block whose token count equals the batch is a token block: strict refuses it)
    token_block = reason is None or reason.startswith("its tokens arrive regrouped") or \
        _SQUARE.split("{}")[1] in reason
    if c.n_calls > 1:
        why = f"called {c.n_calls} times per forward (shared module)"
    elif reason is None:
        why = (f"runs {c.attention_ops} attention computations per call; evoplug converts "
               f"blocks with one self-attention over their tokens{_SOFTMAX_COUNTS}")
    else:
        why = reason
    if inside and not inside[0][1].startswith(why):
        why += f" (inside: `{inside[0][0]}`: {inside[0][1]})"
    return why, token_block


def wrapped_block(name: str, m: nn.Module, call: ModuleCall, calls: Dict[int, ModuleCall]):
    """The one module ``m`` wraps, when ``m`` ran its attention only there and the attention
    itself runs deeper still: (name, module, call) of a stage that holds a single block behind
    an identity downsampling, of a one-block ``Sequential``, or of a sequence-first layer that
    a batch-first wrapper transposes its tokens around (or the other way round). ``find_blocks`` takes the
    outermost module with one attention; where that is no block (its residual stream is the
    inner block's), the block it wraps is analysed instead. None otherwise (a block around its
    attention module: the attention module is no block)."""
    x = call.tokens()
    while True:
        holders = [(n, c) for n, c in m.named_children() if _attention_below(c, calls)]
        if len(holders) != 1:
            return None
        child_name, child = holders[0]
        name = f"{name}.{child_name}"
        c = calls.get(id(child))
        if c is None:                       # a ModuleList: look inside
            m = child
            continue
        inner = c.raw_tokens()
        if c.n_calls != 1 or c.attention_ops != call.attention_ops or not isinstance(
                inner, torch.Tensor) or not isinstance(x, torch.Tensor) or not any(
                _attention_below(g, calls) for g in child.children()):
            return None
        if inner.shape == call.raw_tokens().shape:
            c.token_perm = call.token_perm      # (the same tensor layout as the wrapper's)
            c.keeps_channels_first = call.keeps_channels_first
        elif x.dim() == 3 and x.shape[0] != x.shape[1] and inner.shape in (
                x.shape, x.transpose(0, 1).shape):
            # a batch-first wrapper transposing its tokens around a sequence-first block
            # (PyTorch's nn.TransformerEncoderLayer), or the other way round
            c.token_perm = (1, 0, 2) if inner.shape != x.shape else ()
        else:
            return None
        return name, child, c


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


def _sole_delegate(m: nn.Module, c: ModuleCall, calls: Dict[int, ModuleCall]) -> Optional[str]:
    """The name of the child ``m`` hands its whole call to (``m(x)`` is ``child(x)``: the child
    took ``m``'s input tensor and returned its output, once, with all of its attention), or
    None. Until the fifty-first session such a wrapper was the converted block (a Swin stage's
    ``blocks``, an nn.Sequential of one block): with timm's gradient checkpointing on, which
    runs the Sequential's blocks one by one, the block ran dense and the next ones unscored,
    0.02 off the converted model without it, without a word."""
    x = c.first_tensor()
    for child_name, child in m.named_children():
        cc = calls.get(id(child))
        if cc is not None and cc.n_calls == 1 and cc.attention_ops == c.attention_ops and \
                x is not None and cc.first_tensor() is x and cc.output is c.output and \
                isinstance(c.output, torch.Tensor):
            return child_name
    return None


def _delegate_is_block(name: str, m: nn.Module, c: ModuleCall, calls, visit, candidates,
                       reports) -> bool:
    """Whether the child ``m`` hands its whole call to (:func:`_sole_delegate`) was visited
    and is a candidate block: a wrapper of one block is bypassed by code that runs the block
    itself (timm's ``checkpoint_seq``), so its block is converted instead (what the visit of
    a child that is no block found is dropped: ``m`` is the candidate)."""
    inner = _sole_delegate(m, c, calls)
    if inner is None:
        return False
    before, reported = len(candidates), len(reports)
    visit(f"{name}.{inner}" if name else inner, m._modules[inner])
    if len(candidates) > before:
        return True
    del candidates[before:], reports[reported:]
    return False


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
                  num_tokens: int, prior=None) -> Tuple[int, int, str]:
    """Leading prefix tokens P and trailing special tokens S at this block (YOLOS' detection
    tokens after the patches): the tokens a perturbation of the patch map leaves unchanged
    (provenance.token_provenance), which must lead or trail (with trailing ones, P is the
    larger of the leading ones and N minus the patch grid minus S: a cls token that has seen
    the image changes with it); else N minus the patch grid (h*w) of the last 4-D feature map
    (t*h*w of a 5-D video map) produced before the block ran, all leading; else what the model
    declares (a family hint: ``num_prefix_tokens``, MMPretrain's ``num_extra_tokens``, ...);
    else, where the tokens became fewer since the converted block before (``prior``, its
    analysis) with no patch map to show which remain, that block's leading prefix (token
    pruning keeps the class token first: ranked as a patch it went down the fast path); else 0."""
    grid = None
    inside = no_patch_maps(model, calls) if model is not None else set()
    for mid, c in calls.items():
        # (a video's 5-D map counts its T*H*W positions: until audit B1 of the forty-first
        # session only 4-D maps did, and a video ViT converted on a uint8 video had no prefix)
        fm = c.map_sides() if c.order < call.order and mid not in inside else None
        if fm is not None:
            hw = math.prod(fm)
            if 0 <= num_tokens - hw <= max(16, num_tokens // 8):
                if grid is None or c.order > grid[0]:
                    grid = (c.order, hw, c.name, "x".join(map(str, fm)))
    lead, trail = special_rows(call.name, calls, num_tokens, grid[1] if grid else None)
    if trail:   # a later stage's cls token has seen the image: the patch grid counts it
        if grid is not None and num_tokens - grid[1] - trail > lead:
            return num_tokens - grid[1] - trail, trail, (
                f"patch grid {grid[3]} from `{grid[2]}`, {trail} of the tokens "
                "that do not come from the patch map trailing")
        return lead, trail, (f"{lead} leading and {trail} trailing tokens that do not come from "
                             "the patch map")
    if lead is not None and grid is None and lead:   # no grid matched (a masked token set)
        return lead, 0, "tokens that do not come from the patch map (no patch grid matched)"
    if grid is not None:
        return num_tokens - grid[1], 0, f"patch grid {grid[3]} from `{grid[2]}`"
    declared, family = hint(model, "num_prefix_tokens")
    if declared is not None:
        return int(declared), 0, f"declared by the model ({family} hints)"
    if prior is not None and prior.num_prefix and not prior.token_map and \
            prior.num_prefix < num_tokens <= prior.num_tokens:
        return prior.num_prefix, 0, (f"kept from `{prior.name}` ({prior.num_tokens} -> {num_tokens} "
                                     "tokens with no patch map to show which remain: the leading "
                                     "special tokens are taken to stay first)")
    return 0, 0, "assumed 0 (no patch grid found)"


def special_rows(name: str, calls: Dict[int, ModuleCall], num_tokens: int,
                 patches: Optional[int] = None):
    """(leading, trailing) counts of the tokens that do not come from the patch map, as the
    provenance forward found them for blocks of ``num_tokens`` tokens; (None, 0) when it did
    not run, or when the noise did not reach as many tokens as there are ``patches`` (a
    model whose later stage hardly depends on its input, as random weights can make it: then
    the unchanged rows say nothing). Special tokens elsewhere (between the patches) are
    refused: evoplug keeps the leading and trailing ones and ranks the others as patches,
    which would be wrong."""
    derived = getattr(calls, "derived", {})
    rows = derived.get("untouched", {}).get(num_tokens)
    if rows is None or len(rows) >= num_tokens or (
            patches is not None and num_tokens - len(rows) < patches and not (
                len(rows) in derived.get("mask_counts", ()) and
                rows == tuple(range(num_tokens - len(rows), num_tokens)))):
        # (but a trailing run of as many as a boolean input masks per image is what it is:
        # VideoMAE's decoder trails its mask tokens after the visible patches, fewer than the
        # video's patch grid, which a 5-D map counts since the forty-first session)
        return None, 0
    lead = next((i for i, r in enumerate(rows) if r != i), len(rows))
    trail = len(rows) - lead
    if rows[lead:] != tuple(range(num_tokens - trail, num_tokens)):
        raise AnalysisError(
            name, f"tokens {_spans(rows)} of {num_tokens} do not come from the patch map and are "
            "neither leading nor trailing (such as a window's padding where the window is larger "
            "than the map): evoplug keeps leading and trailing special tokens and ranks the "
            "others as patches, which would be wrong here")
    return lead, trail


def _spans(rows, most: int = 6) -> str:
    """Token indices as runs (``4-13, 18-27, ...``), the first ``most`` of them, and how many."""
    runs, start = [], rows[0]
    for prev, r in zip(rows, rows[1:] + (None,)):
        if r != prev + 1:
            runs.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = r
    shown = ", ".join(runs[:most]) + (", ..." if len(runs) > most else "")
    return f"{shown} ({len(rows)} tokens)" if len(runs) > most else shown


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


def no_patch_maps(model: nn.Module, calls: Dict[int, ModuleCall]) -> Set[int]:
    """ids of the modules whose 4-D outputs are no patch map: those inside attention
    (:func:`inside_attention`) and those run on the model's own tables, a parameter or buffer
    as their only tensor input, with their submodules (Swinv2's continuous position bias MLP on
    its relative-coordinate table: MMPretrain's (1, 3, 3, heads) output at windows of 2 was
    taken for a 3x4 patch grid, 4 prefix tokens, and the stage refused)."""
    derived = getattr(calls, "derived", None)
    if derived is not None and "no_patch_maps" in derived:
        return derived["no_patch_maps"]
    own = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    out = set(inside_attention(model, calls))
    for m in model.modules():
        c = calls.get(id(m))
        if c is None or m is model:
            continue
        tensors = [v for v in list(c.args) + list(c.kwargs.values()) if isinstance(v, torch.Tensor)]
        if tensors and all(id(t) in own for t in tensors):
            out.update(id(sub) for sub in m.modules())
    if derived is not None:
        derived["no_patch_maps"] = out
    return out


def patch_grid(call: ModuleCall, calls: Dict[int, ModuleCall], num_patches: int,
               model: Optional[nn.Module] = None):
    """(h, w) of the block's patch tokens: a pair of integers the block is called with whose
    product is M (Swin's ``hw_shape``, transformers' ``input_dimensions``: the map the block
    itself views its tokens as), else the last 4-D map before the block with h*w == M, else
    None for tokens dropped from an earlier output (:func:`_kept_rows`), else a guess
    (:func:`_guessed_grid`)."""
    for v in list(call.args) + list(call.kwargs.values()):
        # (one side may be 1: PVTv2's last stage of a 32x128 image is a 1x4 map; a square
        # guessed from its 4 tokens was wrong)
        if isinstance(v, (tuple, list)) and len(v) == 2 and \
                all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in v) and \
                max(v) >= 2 and v[0] * v[1] == num_patches:
            return (int(v[0]), int(v[1]))
    best = last = None
    inside = no_patch_maps(model, calls) if model is not None else set()
    for mid, c in calls.items():
        fm = c.feature_map() if c.order < call.order and mid not in inside else None
        if fm is not None and fm[0] * fm[1] == num_patches and (best is None or c.order > best[0]):
            best = (c.order, fm)
        if fm is not None and (last is None or c.order > last[0]):
            last = (c.order, fm)
    if best is not None:
        return best[1]
    if _kept_rows(call, calls, num_patches, model):
        return None
    return _guessed_grid(num_patches, last[1] if last is not None else None)


def _kept_rows(call: ModuleCall, calls: Dict[int, ModuleCall], num_patches: int,
               model: Optional[nn.Module]) -> bool:
    """Whether the block's tokens are a subset of an earlier module's (B, N, C) output with more
    tokens: at least half its patches each follow one row of that output, token by token
    (provenance.rows_followed, on the last such output before the first call with this token
    count, so every block of the count agrees). A model that drops tokens between blocks (keeps
    the top ones, or a fixed subset) keeps no map: its kept patches are no grid, whatever their
    count (16 of an 8x8 map were taken for a 4x4 one, the scores pooled onto other places, 0.15
    off, until the forty-second session; a known gap of the forty-first; and where a per-token
    step followed the drop, a scaling, a position term, a cast, whose rows are no copies, 0.11
    to 0.32 off until the forty-third). A downsampling stage (LeViT's) computes each of its
    tokens from several: none follows one."""
    x = call.first_tensor()
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.shape[0] or not x.is_floating_point():
        return False
    B, n, C = x.shape

    def flat(t, count) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == B and \
            t.shape[2] == C and count(t.shape[1]) and t.dtype == x.dtype
    derived = getattr(calls, "derived", {})
    into, first = min(((k, c) for k, c in calls.items() if c.order <= call.order and
                       flat(c.first_tensor(), lambda m: m == n)), key=lambda kc: kc[1].order,
                      default=(None, call))
    earlier = [k for k, c in calls.items() if c.order < first.order and c.name and
               flat(c.output, lambda m: m > n) and not first.name.startswith(c.name + ".")]
    source = max((k for k in earlier if calls[k].n_calls == 1), key=lambda k: calls[k].order,
                 default=None)
    least = n - num_patches + max(1, num_patches // 2)
    followed = None
    if model is not None and into is not None and source is not None and "example_input" in derived:
        found = derived.setdefault("rows_followed", {})
        if (into, source) not in found:
            modules = {id(m): m for m in model.modules()}
            found[(into, source)] = rows_followed(model, derived["example_input"], calls,
                                                  modules[into], modules[source], least)
        followed = found[(into, source)]
    if followed is None:        # (no probe ran: rows copied as they are, from any earlier output)
        return any(_copied_rows(first.first_tensor()[0], calls[k].output[0], least) for k in earlier)
    return int(followed.sum()) >= least


def _copied_rows(rows: torch.Tensor, earlier: torch.Tensor, least: int) -> bool:
    """Whether at least ``least`` of the (nonzero) ``rows`` are rows of ``earlier``, exactly: the
    check of the forty-second session, where :func:`provenance.rows_followed` cannot run."""
    rows = rows[rows.abs().amax(-1) > 0]
    apart = torch.cdist(rows.float(), earlier.float(), compute_mode="donot_use_mm_for_euclid_dist")
    return int((apart == 0).any(1).sum()) >= least


def _guessed_grid(num_patches: int, seen: Optional[Tuple[int, int]]):
    """A grid for M tokens no map or size argument showed (runtime/evolve.py GuessedGrid): the
    last map before the block, each side divided by the smallest stride s >= 2 (rounded up or
    down) that gives M positions, as LeViT's token stages shrink its stem's map (8x32 -> 4x16
    -> 2x8; 8x12 -> 4x6 -> 2x3); else a square if M is one. (Until audit D1 of the forty-first
    session a square was guessed first: LeViT on a 128x512 image carried its scores onto 8x8
    and 4x4 grids, silently 0.06 off, and at 128x192 restarted them with a dense block.)"""
    if seen is not None:
        h0, w0 = seen
        for s in range(2, max(h0, w0) + 1):
            for h, w in ((-(-h0 // s), -(-w0 // s)), (h0 // s, w0 // s)):
                if h >= 1 and w >= 1 and h * w == num_patches:
                    return GuessedGrid((h, w))
    r = int(round(num_patches ** 0.5))
    return GuessedGrid((r, r)) if r * r == num_patches else None



def resolve_global_query(model: nn.Module, num_prefix: int, choice: str,
                         class_row: Optional[int] = None) -> str:
    """'cls' when the first prefix token is a class token, else 'mean'.

    Without prefix tokens there is no cls token. With prefix tokens, a model that declares it
    has no class token (timm's ``cls_token is None``, e.g. register-only ViTs) uses the mean
    query too; otherwise the first prefix token is taken as the cls token, unless noise on the
    declared class token showed it at another prefix position (``class_row``,
    provenance.class_token_rows: registers before it): the mean query then, for the class
    query evoplug reads is the first token's.
    """
    if choice not in ("auto", "cls", "mean"):
        raise ValueError(f"global_query must be 'auto', 'cls' or 'mean', got {choice!r}")
    if choice == "cls" and num_prefix == 0:
        raise AnalysisError("", "global_query='cls' but the block has no prefix token")
    if choice == "cls" and declares_no_class_token(model):
        raise AnalysisError("", "global_query='cls' but the model declares no class token (its "
                                "prefix tokens are registers): use 'mean' (what 'auto' picks)")
    behind = class_row is not None and 0 < class_row < num_prefix
    if choice == "cls" and behind:
        raise AnalysisError("", f"global_query='cls' but the class token is prefix token "
                                f"{class_row} of {num_prefix} (tokens before it: registers?): "
                                "evoplug reads the class query as the first token's; use "
                                "'mean' (what 'auto' picks)")
    if choice != "auto":
        return choice
    if num_prefix == 0 or behind:
        return "mean"
    if declares_no_class_token(model):
        return "mean"
    return "cls"


def declares_no_class_token(model: nn.Module) -> bool:
    """The model says it has no class token (a family hint: timm's ``cls_token is None``, also
    on NaFlexViT's ``embeds``; MMPretrain's ``with_cls_token``): its prefix tokens are
    registers, and the mean query ranks the tokens."""
    has, _ = hint(model, "has_class_token")
    return has is False


def regroup_parts(model: nn.Module, calls: Dict[int, ModuleCall], parts: List[Tuple[str, str, str]],
                  converted: List[str]) -> List[Tuple[str, str]]:
    """Candidates that turned out to be no blocks on their own, reported as the block they
    are parts of when one of them is an attention without its residual (the residual is the
    enclosing module's; a softmax gate beside it is the other part): the nearest enclosing
    module that takes and returns the tokens, runs more than one attention computation and
    holds no converted block. Other such failures stay as they are (``parts``: (name, reason,
    'no attention' | 'no residual'))."""
    batch = _model_batch(model, calls)
    groups: Dict[str, List[Tuple[str, str, str]]] = {}
    out: List[Tuple[str, str]] = []
    for name, reason, kind in parts:
        owner = _enclosing_block(model, calls, name, batch)
        held = _in_container_block(model, calls, name) if kind == "no residual" else None
        if owner is None and held is not None:
            out.append(held)
            continue
        if owner is None or any(c == owner or c.startswith(owner + ".") for c in converted):
            out.append((name, reason + _held_by(model, calls, name) if kind == "no residual"
                        and owner is None else reason))
        else:
            groups.setdefault(owner, []).append((name, reason, kind))
    for owner, members in groups.items():
        if not any(kind == "no residual" for _, _, kind in members):
            out.extend((n, r) for n, r, _ in members)
            continue
        c = calls[id(model.get_submodule(owner))]
        inside = "; ".join(f"`{n}`: {r}" for n, r, _ in members)
        out.append((owner, f"runs {c.attention_ops} attention computations per call, in parts that "
                           f"are no blocks on their own ({inside}); evoplug converts blocks with one "
                           f"self-attention{_SOFTMAX_COUNTS}"))
    return out


_SOFTMAX_COUNTS = (" (each softmax and fused attention call that ran counts as one: heads "
                   "computed one by one in a Python loop count one each, computed together in one "
                   "softmax over (B, heads, N, N) logits they are one attention; a softmax "
                   "that is no attention, a gate, a router or linear attention's feature maps, is "
                   "kept out by registering its module: evoplug.register_leaf_module)")


def _held_by(model: nn.Module, calls: Dict[int, ModuleCall], name: str) -> str:
    """Where an attention's residual may be its parent's and the parent runs more than one
    attention but is no token block either (TNT's block: two token streams, a tuple returned),
    the parent named: the attention was told "no residual" as if that were the reason. (Said
    as "the residual is the parent's" until the thirty-eighth session, unchecked: torchvision's
    MaxViT adds it in the attention's own layer, on a partitioned view; audit W1.)"""
    path = name.split(".")
    for cut in range(len(path) - 1, 0, -1):
        owner = ".".join(path[:cut])
        c = calls.get(id(model.get_submodule(owner)))
        if c is not None:
            return "" if c.attention_ops < 2 else (
                f"; the module around it, `{owner}`, runs {c.attention_ops} attention "
                f"computations per call and is no block evoplug converts (one self-attention "
                "over one token stream)")
    return ""


def _in_container_block(model: nn.Module, calls: Dict[int, ModuleCall], name: str):
    """(the block, why) where the attention ``name``, told "no residual", is the one attention of
    the module around it, a block whose tokens come or go inside a container
    (:func:`container_reason`): that is why it is not converted, not the residual it adds."""
    path = name.split(".")
    for cut in range(len(path) - 1, 0, -1):
        owner = ".".join(path[:cut])
        c = calls.get(id(model.get_submodule(owner)))
        if c is not None:
            why = container_reason(c) if c.n_calls == 1 and c.attention_ops == 1 else None
            return (owner, why) if why else None
    return None


def _enclosing_block(model: nn.Module, calls: Dict[int, ModuleCall], name: str,
                     batch: Optional[int]) -> Optional[str]:
    path = name.split(".")
    for cut in range(len(path) - 1, 0, -1):
        owner = ".".join(path[:cut])
        m = model.get_submodule(owner)
        c = calls.get(id(m))
        if c is None:
            continue
        if c.n_calls == 1 and c.attention_ops > 1 and \
                token_block_reason(c, batch, channels_last(m, c, calls)) is None:
            return owner
        return None
    return None
