"""What a block's program does with the places of the tokens it runs on: position-dependent
terms follow the selected tokens (``pos`` (B, n) holds the original index 0..N-1 of every token
of the subset), 2-D map operations see a full map (a canvas: each token at its place, the
representative token elsewhere) and are read back at the subset's places, and map or windowed
blocks hand the fast update the exact stream they computed on every token. They run inside the
rewritten block graphs (rewrite/positions.py and rewrite/maps.py put them there); ``pos is None``
is a dense run, which every function passes through unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

#: the attribute of a subset's positions ``pos`` that holds what :func:`per_selection` made
_MEMO = "_evoplug_per_selection"


def per_selection(pos: Tensor, key: tuple, make, source: Optional[Tensor] = None) -> Tensor:
    """``make()``, made once per selection: the index tensors a block derives from its subset's
    places ``pos`` (and a term gathered from a tensor ``source`` that every block of the model
    is handed, EVA's rotary table) are the same in every block that runs that selection (the
    blocks between selections, reselect_every > 1), so the first makes them and the others
    take them: kept on ``pos`` itself, gone with it. ``key`` names what is made (ints and
    strings); ``source`` is checked by identity and version (a tensor written in place between
    two blocks is gathered again; an inference tensor, which keeps no version, every time), and
    so is the kept tensor (a block that wrote into it).
    Made every time: what holds autograd history (a gather of a trained table: its backward
    must see each block's use, and a recomputation in backward the same ops), and while
    compiling or under a functorch transform (the graph makes it, once). Bitwise the same
    values: no output changes, and no op dispatched (an attribute read)."""
    if torch.compiler.is_compiling() or type(pos) is not Tensor or \
            torch._C._functorch.is_functorch_wrapped_tensor(pos):
        return make()
    if source is not None and source.is_inference():
        return make()       # (no version counter: a write into it could not be told)
    memo = pos.__dict__.get(_MEMO)
    if memo is None:
        memo = {}
        setattr(pos, _MEMO, memo)
    full = key if source is None else key + (id(source),)
    hit = memo.get(full)
    if hit is not None:
        src, version, out, out_version = hit
        if src is source and (source is None or source._version == version) and \
                out_version == _version(out):
            return out
    out = make()
    if not out.requires_grad:
        memo[full] = (source, None if source is None else source._version, out, _version(out))
    return out


def _version(t: Tensor) -> int:
    """``t``'s version counter; -1 for an inference tensor, which keeps none (only index tensors
    made from ``pos`` here, which nothing but the gathers reads)."""
    return -1 if t.is_inference() else t._version


def gather_pair_bias(bias: Tensor, pos: Optional[Tensor], heads: int = 0) -> Tensor:
    """Gather an additive attention term (..., Nq, Nk) to the subset's tokens.

    Used for relative position biases and masks that do not depend on the input tokens. A dim
    of size 1 broadcasts and is left alone; others are indexed by ``pos``. Result (B, L, n, n)
    (or with 1 where the input had 1). ``heads`` > 0: the attention merges its ``heads`` into
    the batch dim (logits (B * heads, N, N); one head with no head dim: ``heads`` 1), and a
    term (N, N), (1, N, N), (heads, N, N) or (B * heads, N, N) is gathered to (B * heads, n, n)
    (a 2-D one came out (B, 1, n, n), broadcast against the logits to rank 4, until the
    forty-first session). ``pos is None`` (dense run) returns the term unchanged.
    """
    if pos is None or bias.dim() < 2:
        return bias
    rows = _ROW_SELECT if _ROW_SELECT is not None else bias.device.type == "cpu"
    make = _gathered_pair_rows if rows else _gathered_pair
    return per_selection(pos, ("pair", heads, rows), lambda: make(bias, pos, heads), bias)


def _gathered_pair(bias: Tensor, pos: Tensor, heads: int) -> Tensor:
    """:func:`gather_pair_bias` on a subset. A pair term (..., N, N) takes one ``index`` of
    every entry at once, with the subset's rows and columns and its leading dims' indices made
    once per selection (:func:`per_selection`): 1 op per block, where two gathers on indices
    expanded every time took 10 (BEiT's relative position bias in every block). A term that
    broadcasts on a token dim (a key mask (..., 1, N)) takes the gathers. Not on a CPU
    (:data:`_ROW_SELECT`): there the one ``index`` took 2x the time of the two gathers
    (narrowed BEiT, batch 1, one thread: 8 of them 1.0 ms against 0.55 ms, and the forward
    0.5-1.5 ms slower; fifty-second session), which the CPU form keeps, on indices expanded
    once per selection. A GPU launches fewer kernels (not measured yet)."""
    B, n = pos.shape
    R, K = bias.shape[-2], bias.shape[-1]
    merged = heads > 0 and bias.dim() <= 3
    if merged:
        b = bias.reshape(-1, heads, R, K) if bias.dim() == 3 and bias.shape[0] > 1 else bias.reshape(1, 1, R, K)
    elif bias.dim() == 4 and (bias.shape[0] == 1 or bias.shape[0] == B) or bias.dim() <= 3:
        b = bias
    else:
        b = bias.reshape(1, -1, R, K)
    lead = b.shape[:-2]
    if R == 1 or K == 1 or (len(lead) == 2 and lead[0] not in (1, B)):
        return _gathered_pair_rows(bias, pos, heads)
    L = heads if merged else (lead[-1] if lead else 1)
    index = [_lead_index(pos.device, size, target, dim) for dim, size, target in
             zip(range(2 - len(lead), 2), lead, (B, L)[2 - len(lead):])]
    index += [per_selection(pos, ("pair-rows",), lambda: pos.view(B, 1, n, 1)),
              per_selection(pos, ("pair-cols",), lambda: pos.view(B, 1, 1, n))]
    out = b[tuple(index)]                                           # (B, L, n, n)
    return out.view(B * heads, n, n) if merged else out


#: (1, 1, 1, 1)-shaped indices of a pair term's leading dims, per (dim, size, target, device)
_LEAD_INDICES: dict = {}


def _lead_index(device, size: int, target: int, dim: int) -> Tensor:
    """The index of a pair term's leading dim ``dim`` (0: the images, 1: the heads) of ``size``
    (1: broadcast) onto ``target`` entries, shaped to broadcast against (B, L, n, n): the same
    for every selection, made once per device (as rows._head_mask)."""
    def make():
        shape = [1, 1, 1, 1]
        shape[dim] = target
        if size == 1:
            return torch.zeros((), dtype=torch.long, device=device).expand(shape)
        return torch.arange(target, device=device).view(shape)
    return device_constant(_LEAD_INDICES, (dim, size, target, device), make)


def device_constant(cache: dict, key: tuple, make) -> Tensor:
    """``make()``, kept in ``cache`` under ``key`` (which names the device): a constant the
    blocks use at every call (an index, a head mask), made once and outside inference mode (no
    inference tensor: it serves every mode); made inside the graph while compiling
    (constant-folded)."""
    if torch.compiler.is_compiling():
        return make()
    out = cache.get(key)
    if out is None:
        with torch.inference_mode(False):
            out = cache[key] = make()
    return out


def _gathered_pair_rows(bias: Tensor, pos: Tensor, heads: int) -> Tensor:
    """:func:`gather_pair_bias` by a gather along each token dim that is not 1."""
    B, n = pos.shape
    R, K = bias.shape[-2], bias.shape[-1]
    merged = heads > 0 and bias.dim() <= 3
    if merged:
        b4 = (bias.reshape(-1, heads, R, K) if bias.dim() == 3 and bias.shape[0] > 1
              else bias.reshape(1, 1, R, K)).expand(B, heads, R, K)
    elif bias.dim() == 4 and bias.shape[0] == B and B > 1:
        b4 = bias
    else:
        b4 = bias.reshape(1, -1, R, K).expand(B, -1, -1, -1)
    L = b4.shape[1]
    if R != 1:
        b4 = torch.gather(b4, 2, per_selection(pos, ("rows", L, K), lambda: pos[:, None, :, None].expand(B, L, n, K)))
        R = n
    if K != 1:
        b4 = torch.gather(b4, 3, per_selection(pos, ("cols", L, R), lambda: pos[:, None, None, :].expand(B, L, R, n)))
    return b4.reshape(B * heads, R, b4.shape[-1]) if merged else b4


def gather_aligned(t: Tensor, pos: Optional[Tensor], dim: int) -> Tensor:
    """A per-token term lined up with the tokens by the block, ``t`` (1 or B, ..., N, ...) with
    the token dim ``dim`` (MLCD's rotary cos (1, N, 1, d) against queries (B, N, heads, d); a
    per-image mask (B, N)), gathered image by image to the subset: (B, ..., n, ...). ``pos is
    None`` (dense run): ``t``."""
    if pos is None:
        return t
    B, n = pos.shape
    size = list(t.shape)
    size[0], size[dim] = B, n
    index = pos.view(B, *([1] * (dim - 1)), n, *([1] * (t.dim() - dim - 1))).expand(size)
    return t.expand(B, *t.shape[1:]).gather(dim, index)


def patch_positions(pos: Optional[Tensor], num_prefix: int, num_suffix: int) -> Optional[Tensor]:
    """The places among the patch tokens of a subset's patch tokens (it runs its ``num_prefix``
    + ``num_suffix`` special tokens first): where a table of the patch tokens only is gathered.
    ``pos is None`` (dense run): None."""
    return None if pos is None else pos[:, num_prefix + num_suffix:] - num_prefix


def gather_token_arg(t: Tensor, pos: Tensor, dim: int, batched: bool = False) -> Tensor:
    """Gather a per-token tensor argument (e.g. rotary embeddings (M, D)) along ``dim``.

    Returns (B, *t.shape[:dim], n, *t.shape[dim+1:]), padded with singleton dims after the
    batch to rank 4 so that it broadcasts against (B, heads, n, d) like the original did.
    ``batched``: the argument's first dim is the batch (a per-image mask or conditioning
    stream (B, ..., N, ...), as at calibration; or 1, broadcast over the batch): each image's
    row gathered with its own positions, in the argument's own shape.
    """
    if batched and dim >= 1 and t.shape[0] in (1, pos.shape[0]):
        return gather_aligned(t, pos, dim)
    if dim == 0:                            # (no movedim: each is an op, even in place)
        out = t[pos]                        # (B, n, *rest)
    else:
        out = t[(slice(None),) * dim + (pos,)].movedim(dim, 0)     # (*lead, B, n, *rest) first
    while out.dim() < 4:
        out = out.unsqueeze(1)
    return out


#: how :func:`_take` copies rows: None = by where it runs (``index_select`` of whole rows on a
#: CPU, ``gather`` elsewhere), True / False = always the one / the other. On a CPU, ``gather``
#: with its index expanded over the channels reads an index per element: measured on the AMD
#: EPYC (2 threads, batch 32, docs/benchmarks.md) PVTv2-b1 ran 1.14x with it and 1.26x with
#: row copies (inference; training step at batch 16: 1.13x and 1.23x), Twins-S 1.17x and 1.23x.
#: Row copies cost 4 ATen ops more per call (the row offsets): on a GPU in eager mode each op is
#: host time (issue 12's op budgets count the ``gather`` form), so it keeps ``gather`` there.
#: Pair terms (:func:`gather_pair_bias`) follow it: two gathers on a CPU, one ``index`` elsewhere.
#: Private: tests/test_op_budget.py counts both forms.
_ROW_SELECT: Optional[bool] = None


def _take(t: Tensor, pos: Tensor) -> Tensor:
    """t (B, N, *rest), pos (B, n) -> (B, n, *rest): t[b, pos[b, i]] (:data:`_ROW_SELECT`)."""
    B, n = pos.shape
    N, rest = t.shape[1], t.shape[2:]
    rows = _ROW_SELECT
    if rows is None:
        rows = t.device.type == "cpu"
    # (the row offsets and the expanded index: made once per selection, :func:`per_selection`)
    if rows and t.is_contiguous():
        flat = per_selection(pos, ("flat-rows", N), lambda: (pos + torch.arange(
            0, B * N, N, dtype=pos.dtype, device=pos.device).unsqueeze(1)).view(-1))
        return t.flatten(0, 1).index_select(0, flat).view(B, n, *rest)
    return t.gather(1, per_selection(pos, ("rows-index", *rest), lambda: pos.reshape(
        B, n, *([1] * len(rest))).expand(B, n, *rest)))


def _rows_of(pos: Tensor, rows: int) -> Tensor:
    """``pos`` (B, n) for a tensor whose leading dim is ``rows``: B, or B * r with the images
    outermost (heads merged into the batch dim, timm's SAM): each image's row repeated r times."""
    B, n = pos.shape
    if rows == B:
        return pos
    if rows % B:
        raise ValueError(f"a tensor with {rows} rows for {B} images: not a whole number per image")
    return per_selection(pos, ("rows-of", rows), lambda: pos[:, None].expand(B, rows // B, n).reshape(rows, n))


def gather_pair_term(term: Tensor, pos: Optional[Tensor]) -> Tensor:
    """An additive term on the attention logits computed from the tokens on the full map
    (the decomposed relative positions of SAM / ViTDet: ``q_i . R[p_i - p_j]``), leading dims
    image-major (B * heads, M, M) or (B, heads, M, M), to the subset's pairs (..., n, n)."""
    if pos is None:
        return term
    B, n = pos.shape
    t = term.reshape(B, -1, term.shape[-2], term.shape[-1])
    L, K = t.shape[1], t.shape[-1]
    t = t.gather(2, pos[:, None, :, None].expand(B, L, n, K))
    t = t.gather(3, pos[:, None, None, :].expand(B, L, n, n))
    return t.reshape(*term.shape[:-2], n, n)


def to_canvas(t: Tensor, pos: Optional[Tensor], num_patches: int, dim: int) -> Tensor:
    """Full patch map for a 2-D operation inside a block (depthwise conv, spatial reduction).

    ``t`` holds the subset's n tokens along ``dim``; each goes to its original position, every
    other position holds the last token of the subset (the representative token), so a
    convolution over the map sees real neighbours where they were run and the tokens' summary
    elsewhere. ``pos is None`` (dense run) returns ``t``. No prefix tokens (checked by analysis).
    """
    if pos is None:
        return t
    t = t.movedim(dim, 1)
    pos = _rows_of(pos, t.shape[0])
    B, n = t.shape[:2]
    # the subset row each map position reads: its own token, else the representative token.
    # One row gather writes the map once (a fill + a scatter of the rows would write it 1.5x).
    # (out of place: under torch.func.vmap the positions are batched and the full map is not)
    src = per_selection(pos, ("canvas", num_patches), lambda: torch.full(
        (B, num_patches), n - 1, dtype=pos.dtype, device=pos.device).scatter(
        1, pos, torch.arange(n, dtype=pos.dtype, device=pos.device).expand(B, n)))
    return _take(t, src).movedim(1, dim)


def first_not_none(a, b):
    return b if a is None else a


def sized_as_full(t: Tensor, full: Tensor) -> Tensor:
    """A stand-in of ``t`` (made token by token from the subset's tokens, of another width or
    dtype: ``qkv(x)``) with the full input's token count, read for its sizes, dtype and device
    (an expanded scalar: nothing is allocated)."""
    return t.new_empty(()).expand(t.shape[0], *full.shape[1:-1], t.shape[-1])


def in_evolving_run(full: Optional[Tensor], t: Tensor) -> Optional[Tensor]:
    """``t`` in evolving runs (the block's full input given), None in dense runs."""
    return None if full is None else t


def without_stat_update(module: torch.nn.Module, t: Tensor) -> Tensor:
    """``module(t)`` for a module holding a BatchNorm that also runs on other tokens of the same
    forward (the block's full input beside the subset): in train mode it normalises ``t`` by the
    batch's own statistics, as the module does, but leaves the running statistics and the batch
    count to the run on the subset, so they move once per forward as in the original. A torch
    BatchNorm itself is run as ``F.batch_norm`` without them (nothing of it changes: threads may
    share it); a module holding one (timm's ``ConvNorm``) runs on copies of them. A
    SyncBatchNorm takes this process's statistics here."""
    norms = [n for n in module.modules()
             if isinstance(n, _NormBase) and n.training and n.track_running_stats]
    if not norms:
        return module(t)        # (eval mode, or no running statistics: nothing moves)
    if norms == [module] and isinstance(module, _BatchNorm) and \
            type(module).forward in (_BatchNorm.forward, torch.nn.SyncBatchNorm.forward):
        return torch.nn.functional.batch_norm(t, None, None, module.weight, module.bias, True, 0.0,
                                              module.eps)
    # the run moves copies of the statistics, the module's own are put back untouched (written
    # back in place, they broke the backward: BatchNorm saves them for it; audit U4)
    own = [(n, k, n._buffers[k]) for n in norms
           for k in ("running_mean", "running_var", "num_batches_tracked") if n._buffers.get(k) is not None]
    for n, k, b in own:
        n._buffers[k] = b.clone()
    try:
        return module(t)
    finally:
        for n, k, b in own:
            n._buffers[k] = b


def without_state_update(module: torch.nn.Module, t: Tensor) -> Tensor:
    """``module(t)`` for a module whose forwards changed its buffers or tensor attributes at the
    conversion (a counter, a running mean: BlockAnalysis.keeps_state) that the program runs
    again on other tokens of the same forward (the fast update's base, the full map): it runs
    on copies of them, and the module's own (its submodules' too) are put back as they were,
    so they move once per forward, in the block's own run of it, as in the dense model (three
    times until audit J1 of the forty-fifth session). Attributes it makes go again."""
    saved = []
    for m in module.modules():
        own = vars(m)
        saved.append((m, dict(m._buffers), dict(own)))
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = b.clone()
        for k, v in list(own.items()):
            if isinstance(v, Tensor):
                own[k] = v.clone()
    try:
        return module(t)
    finally:
        for m, buffers, own in saved:
            for k in [k for k in m._buffers if k not in buffers]:
                del m._buffers[k]
            m._buffers.update(buffers)
            for k in [k for k in vars(m) if k not in own]:
                del vars(m)[k]
            vars(m).update(own)


def full_canvas(t: Tensor, t_full: Optional[Tensor], pos: Optional[Tensor]) -> Tensor:
    """The exact full map: the block's token-wise ops re-run on its full input (dense run:
    the tokens themselves)."""
    return t if pos is None or t_full is None else t_full


def from_canvas_map(t: Tensor, pos: Optional[Tensor], dim: int, layout: str) -> Tensor:
    """A 2-D map (B, C, H, W) ('cf') or (B, H, W, C) ('cl': or its windows merged back,
    (B, H / ws, ws, W / ws, ws, C)), or windows cut from the token sequence ('seq<k>': dims
    1..k are the tokens, the rest channels), back to tokens along ``dim``, read at the subset's
    positions (all positions for a dense run)."""
    if layout.startswith("seq"):
        return from_canvas(t.flatten(1, int(layout[3:])).flatten(2), pos, dim)
    t = t.flatten(2) if layout == "cf" else t.flatten(1, -2)      # (B, C, M) / (B, M, C)
    if (layout == "cf") != (dim == 2):
        t = t.transpose(1, 2)
    return from_canvas(t, pos, dim)


def from_canvas(t: Tensor, pos: Optional[Tensor], dim: int) -> Tensor:
    """Read a full map (tokens along ``dim``) back at the subset's positions."""
    if pos is None:
        return t
    t = t.movedim(dim, 1)
    return _take(t, _rows_of(pos, t.shape[0])).movedim(1, dim)


def tokens_to_map(t: Tensor, full: Optional[Tensor], height: int, width: int) -> Tensor:
    """Entry of a block that takes a channels-last map (B, H, W, C) (Swin): the exact full map
    (the block's whole input, ``full``) in evolving runs; the tokens themselves in dense runs."""
    src = t if full is None else full
    return src.reshape(src.shape[0], height, width, src.shape[-1])


def from_stream_map(t: Tensor, pos: Optional[Tensor], dim: int, layout: str, sub: Tensor,
                    full: Optional[Tensor]) -> Tensor:
    """The residual stream of a map block, computed on the full map, read back at the subset's
    positions. Each subset token keeps its own stream value: ``+ (sub - full[pos])`` turns the
    representative token's slot (read at ``rep_pos``) into ``representative + that position's
    attention residual``; it is zero for the selected tokens."""
    out = from_canvas_map(t, pos, dim, layout)
    if pos is None or full is None:
        return out
    # sub equals full at every selected position: only the last slot (the representative
    # token's, when there is one) can differ, so only it is corrected (out is a fresh gather)
    slot = out.narrow(dim, out.shape[dim] - 1, 1)
    slot += (sub[:, -1:] - _take(full, per_selection(pos, ("last",), lambda: pos[:, -1:]))).movedim(1, dim)
    return out


def map_fast_base(stream: Tensor, stream_sub: Tensor, pos: Optional[Tensor], dim: int, layout: str):
    """A map block's windows run on the full map, so every token's attention update is exact:
    the fast update starts from the full stream after attention (not from the block input) and
    adds only the representative token's MLP residual. Returns (full stream as tokens (B, N, C),
    the representative's stream value (B, 1, C)) in evolving runs, None in dense runs."""
    if pos is None:
        return None
    return from_canvas_map(stream, None, dim, layout), stream_sub[:, -1:]


def stream_fast_base(full: Optional[Tensor], branch_full: Tensor, stream_sub: Tensor,
                     pos: Optional[Tensor]):
    """(B, N, C) blocks with windowed attention (Twins): the attention branch ran on every
    token, so the fast update starts from ``full + branch_full`` (each token's exact attention
    update) and adds the representative token's MLP residual. None in dense runs."""
    if pos is None or full is None:
        return None
    return full + branch_full, stream_sub[:, -1:]


def skip_fast_base(skip_full: Tensor, skip_rep: Tensor, pos: Optional[Tensor],
                   full: Optional[Tensor]):
    """(B, N, C) blocks whose skip path scales the stream (MetaFormer's ResScale ``s * x +
    f(norm(x))``; rewrite/skip_path.py): the fast update starts from every token's own skip
    path ``S(x_j)`` and adds the representative token's residual over its own, ``r_after -
    S(r_before)``. None in dense runs."""
    if pos is None or full is None:
        return None
    return skip_full, skip_rep


def gather_extras(block: str, extras, pos: torch.Tensor, N: int, P: int, S: int = 0, whole=(),
                  batched=(), shapes=None):
    """The block's other tensor arguments for a subset run: each gathered (:func:`gather_extra`)
    but those the program gathers itself (``whole``); ``batched``: the names of those whose
    first dim was the batch at calibration. An argument whose first dim was 1 there (one
    calibration image: read as one table for all) and is the batch now (``shapes``: the
    calibration's) holds one per image: gathered so (a mask made from integer ids, which the
    noise does not reach, was gathered as one table and its (B, N) raised a shape error in the
    block; audit of the twenty-ninth session)."""
    B = pos.shape[0] if pos is not None else 1     # (None: every token, in order)
    grown = () if B == 1 or not shapes else tuple(
        n for n, t in extras.items() if n not in batched and isinstance(t, torch.Tensor) and
        t.dim() >= 2 and t.shape[0] == B and
        len(shapes.get(n, ())) == t.dim() and shapes[n][0] == 1)
    return {n: t if n in whole else gather_extra(block, n, t, pos, N, P, S, n in batched or n in grown)
            for n, t in extras.items()}


def gather_extra(block: str, name: str, t: torch.Tensor, pos: torch.Tensor, N: int, P: int,
                 S: int = 0, batched: bool = False):
    """Other tensor arguments of the block follow the selected tokens: a trailing (N, N) pair
    (bias or mask) is gathered on both token dims; a dim of size N by token index; a dim of
    size M = N - P - S (patch-only terms such as EVA's rotary embedding) by patch index (the
    subset's P + S special tokens come first)."""
    if batched and t.dim() == 3 and t.shape[-2:] == (N, N):
        # a pair term per image (B, N, N): gathered image by image (taken for (1, heads, N, N),
        # it came out (B, B, n, n), a raw shape error in the probes; audit Q5 of the
        # twenty-eighth session)
        return gather_pair_bias(t.unsqueeze(1), pos).squeeze(1)
    if (t.dim() >= 2 and t.shape[-2:] == (N, N)) or (t.dim() == 4 and t.shape[-2:] in ((1, N), (N, 1))):
        # (a key mask (B or 1, 1, 1, N) too: gathered per token it came out of rank 5, a shape
        # error in the program after a twin analysed on a (1, 1, N, N) mask; audit S of the
        # twenty-fifth session)
        return gather_pair_bias(t, pos)
    first = 1 if batched and t.shape[0] in (1, pos.shape[0]) else 0    # (not the batch dim)
    for dim, size in enumerate(t.shape[first:], first):
        if size == N:
            return per_selection(pos, ("token", dim, batched), lambda: gather_token_arg(t, pos, dim, batched), t)
    for dim, size in enumerate(t.shape[first:], first):
        if size == N - P - S:
            # (the same table in every block: gathered once per selection, EVA's rotary one)
            # (a table of its own per block, trained: ViT-RoPE's mixed frequencies) and the
            # patch places, once per selection
            patches = per_selection(pos, ("patch-places", P, S), lambda: pos[:, P + S:] - P)
            return per_selection(pos, ("patch", dim, batched, P + S),
                                 lambda: gather_token_arg(t, patches, dim, batched), t)
    # no token dim: one value per image or for all (DiT's adaLN conditioning (B, C)), the same
    # for every token of an image and for a subset of them (refused until the twenty-eighth
    # session; the analysis' probes run the subset with it)
    return t
