"""Converted blocks: the block's class is swapped for a subclass whose ``forward`` runs the
slow-fast token evolution around the block's own computation.

Swapping the class (not wrapping the module) keeps every parameter, buffer, hook, attribute,
``isinstance`` check and state_dict key of the block. Per-forward state (the global attention
``g`` and the current selection) lives in an explicit :class:`EvoContext` shared by the blocks
of one model; the first converted block of a forward resets it, so it works for ``forward``,
``forward_features``, ``forward_intermediates`` alike and nothing is kept in module globals.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

import torch
from torch import nn

from . import evolution as ev
from .analysis import BlockAnalysis
from .calibration import ModuleCall
from .errors import EvoplugError
from .options import EvoOptions
from .rewrite import build_program


class EvoContext:
    """Per-forward state carried from block to block."""

    __slots__ = ("scores", "sel", "rep_pos", "since_select", "grid")

    def __init__(self):
        self.reset()

    def reset(self):
        self.scores: Optional[torch.Tensor] = None   # (B, M) global attention, float32
        self.sel: Optional[torch.Tensor] = None      # (B, k) current selection
        self.rep_pos: Optional[torch.Tensor] = None
        self.since_select = 0
        self.grid = None                             # patch grid the scores live on


@dataclasses.dataclass
class BlockSpec:
    """What a converted block needs at run time (not a module: adds no state_dict key)."""
    index: int                 # position among the converted blocks (execution order)
    analysis: BlockAnalysis
    options: EvoOptions        # shared by all blocks of the model
    context: EvoContext        # shared by all blocks of the model
    programs: Dict[bool, Callable]   # training flag -> slow-path program
    orig_class: type
    role: str = "evolve"       # 'dense' | 'score' | 'evolve' (set from options.start_block)
    tokens_run: int = -1       # tokens the last call ran through attention/MLP (diagnostic)
    batch_programs: Dict = dataclasses.field(default_factory=dict)   # (training, B) -> program


class EvoBlockMixin:
    """Mixed in front of the block's own class by :func:`evoplug.convert`."""

    _evoplug_spec: BlockSpec

    def forward(self, *args, **kwargs):
        spec = self._evoplug_spec
        opt = spec.options
        if spec.role == "dense" or (opt.keep_ratio >= 1.0 and opt.identity_fast_path):
            if spec.index == 0:
                spec.context.reset()
            spec.tokens_run = -1
            return spec.orig_class.forward(self, *args, **kwargs)
        a = spec.analysis
        x, extras = a.plan.bind(a.name, args, kwargs)
        program = spec.programs[self.training]
        if a.batch_size is not None and x.shape[0] != a.batch_size:
            program = _batch_program(spec, self.training, args, kwargs, x.shape[0])
        if a.token_map:   # (B, H, W, C) map: evolve its H * W tokens, give the map back
            shape = x.shape
            out = self._evo_tokens(x.flatten(1, 2), extras, program)
            return out.reshape(shape)
        return self._evo_tokens(x, extras, program)

    def _evo_tokens(self, x: torch.Tensor, extras, program):
        spec = self._evoplug_spec
        opt = spec.options
        a = spec.analysis
        ctx = spec.context
        if spec.index == 0:
            ctx.reset()
        B, N, C = x.shape
        P = a.num_prefix
        M = N - P
        k = ev.num_keep(M, opt.keep_ratio)
        if ctx.scores is not None and ctx.scores.shape[0] == B and ctx.scores.shape[1] != M \
                and spec.role == "evolve":
            # a new stage of a pyramid: pool the scores onto this stage's grid
            ctx.scores = ev.carry_scores(ctx.scores, ctx.grid, a.grid)
            ctx.sel = None
        fresh = ctx.scores is None or ctx.scores.shape != (B, M)
        if spec.role == "score" or fresh:
            # dense run that (re)starts the global attention
            out, row = program(self, *a.plan.feed(x, extras), None, None)[:2]
            ctx.scores = None if row is None else ev.update_scores(None, row, opt.trade_off)
            ctx.sel, ctx.since_select, ctx.grid = None, 0, a.grid
            spec.tokens_run = N
            return out
        if k >= M and opt.identity_fast_path:
            out, row = program(self, *a.plan.feed(x, extras), None, None)[:2]
            if row is not None:
                ctx.scores = ev.update_scores(ctx.scores, row, opt.trade_off)
            spec.tokens_run = N
            return out
        with_rep = opt.representative
        if ctx.sel is None or ctx.sel.shape[1] != k or ctx.since_select % opt.reselect_every == 0:
            ctx.sel, ctx.rep_pos = ev.select_tokens(ctx.scores, k, with_rep)
            ctx.since_select = 0
        ctx.since_select += 1
        sel, rep_pos = ctx.sel, ctx.rep_pos
        weights = ev.representative_weights(ctx.scores, sel) if rep_pos is not None else None
        rows = ev.selection_rows(x, P, sel)
        sub, pos, rep = ev.gather_subset(x, P, sel, rep_pos, weights, rows)
        sub_extras = {n: _gather_extra(a, n, t, pos, N, P) for n, t in extras.items()}
        out_sub, row, *fast = program(self, *a.plan.feed(sub, sub_extras), pos, x)
        if row is not None:
            row_sel = row.gather(1, sel) if a.row_full else row[:, :k]
            ctx.scores = ev.update_scores(ctx.scores, row_sel, opt.trade_off, sel)
        ctx.grid = a.grid
        spec.tokens_run = sub.shape[1]
        if fast and fast[0] is not None:   # map block: exact attention update for every token
            base, base_rep = fast[0]
            return ev.restore(base, out_sub, P, sel, base_rep, rows)
        return ev.restore(x, out_sub, P, sel, rep, rows)


def _batch_program(spec: BlockSpec, training: bool, args, kwargs, batch: int) -> Callable:
    """The program of a block whose trace specialised a value on the batch size (MMPretrain's
    Swin computes it with ``int()``), for this batch size: traced at its first call, the call's
    own input being the calibration input, then kept."""
    key = (training, batch)
    program = spec.batch_programs.get(key)
    if program is None:
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        call = ModuleCall(spec.analysis.name, -1, tuple(map(detach, args)),
                          {k: detach(v) for k, v in kwargs.items()})
        module = spec.analysis.module
        converted, module.__class__ = module.__class__, spec.orig_class   # trace its own forward
        try:
            program = build_program(spec.analysis, training, call=call)
        finally:
            module.__class__ = converted
        spec.batch_programs[key] = program
    return program


def _gather_extra(a: BlockAnalysis, name: str, t: torch.Tensor, pos: torch.Tensor, N: int, P: int):
    """Other tensor arguments of the block follow the selected tokens: a trailing (N, N) pair
    (bias or mask) is gathered on both token dims; a dim of size N by token index; a dim of
    size M = N - P (patch-only terms such as EVA's rotary embedding) by patch index."""
    if t.dim() >= 2 and t.shape[-1] == N and t.shape[-2] == N:
        return ev.gather_pair_bias(t, pos)
    for dim, size in enumerate(t.shape):
        if size == N:
            return ev.gather_token_arg(t, pos, dim)
    for dim, size in enumerate(t.shape):
        if size == N - P:
            return ev.gather_token_arg(t, pos[:, P:] - P, dim)
    raise EvoplugError(f"{a.name}: tensor argument {name!r} of shape {tuple(t.shape)} has no "
                       f"token dimension ({N} tokens); evoplug cannot make it follow the tokens")


_CLASS_CACHE: Dict[type, type] = {}


def evo_class(cls: type) -> type:
    """The converted class of a block class (one per original class)."""
    if issubclass(cls, EvoBlockMixin):
        return cls
    new = _CLASS_CACHE.get(cls)
    if new is None:
        new = type(f"Evo{cls.__name__}", (EvoBlockMixin, cls), {"__module__": cls.__module__})
        _CLASS_CACHE[cls] = new
    return new
