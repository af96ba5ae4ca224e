"""Converted blocks: the block's class is swapped for a subclass whose ``forward`` runs the
slow-fast token evolution around the block's own computation.

Swapping the class (not wrapping the module) keeps every parameter, buffer, hook, attribute,
``isinstance`` check and state_dict key of the block. What the block needs at run time is a
:class:`~evoplug.runtime.spec.BlockSpec`, made by the conversion (spec.py); a call of another
size or form than the analysed one runs a twin's block (twins.py). The per-forward state
travels as an :class:`~evoplug.runtime.state.EvoState` (state.py): nothing a forward computes
is stored on the modules.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

from ..errors import EvoplugError
from ..options import EvoOptions, read_trade_off
from . import evolve as ev
from .gather import gather_extras
from .programs import set_on
from .spec import BlockSpec
from .state import _RUNTIMES, EvoRuntime, EvoState, Segment, _in_backward, _saving_hooks
from .twins import (bind, check_suffix_count, following, note_ran, own_forward_noted,
                    own_forward_twin, set_back, size_twin)


_NO_TORCHSCRIPT = ("`{}` is a converted block, which TorchScript cannot take ({}: its selection "
                   "and per-forward state are Python, and a trace would keep the first call's "
                   "cached constants); use torch.export or torch.compile, and for ONNX "
                   "torch.onnx.export(..., dynamo=True) (docs/export.md)")


_NO_FX = ("`{}` is a converted block, which torch.fx cannot record (torch.fx.symbolic_trace, "
          "torchvision's create_feature_extractor): its token selection and per-forward state "
          "are Python, and the trace would keep the block's own dense forward. Trace with the "
          "converted blocks as leaf modules (create_feature_extractor(model, return_nodes, "
          "tracer_kwargs={{'leaf_modules': [{}]}})); timm's create_feature_extractor takes "
          "no tracer_kwargs: call timm.layers.register_notrace_module on that class first. Or "
          "use torch.export or torch.compile (docs/export.md). torchvision's get_graph_node_names and create_feature_extractor "
          "put the model in train mode before they trace and leave it there after this error: "
          "call model.eval() before evaluating it")


def _apart(block: nn.Module, spec: BlockSpec) -> bool:
    """Whether ``block``, whose runtime no model's entry hook drives (a converted block
    deep-copied apart from its model: ``model.blocks[2] = copy.deepcopy(model.blocks[1])``,
    depth up-scaling), runs inside the forward of a converted model on this thread, which does
    not drive it either: it then runs its own forward, told once per copy with its place. It
    ran through its own runtime without a word, and explain() called its place "removed after
    conversion", until audit F1 of the forty-second session. (Run alone, such copies go on as
    blocks of a method called directly; compiled, they run their own forward:
    :func:`_apart_compiled`.)"""
    rt = spec.runtime
    if torch.compiler.is_compiling():
        return _apart_compiled(rt, spec.name)
    models = _models_running(rt)
    if not models or spec.name in rt.apart_told:
        return bool(models)
    where = _place(block, models) or "this block"
    _tell_copy(rt, spec.name, f"{where} is a copy", "", stacklevel=5)
    return True


def _models_running(rt: EvoRuntime) -> list:
    """The converted models other than ``rt``'s whose forward runs on this thread."""
    return [call[1] for other in list(_RUNTIMES) if other is not rt
            for call in getattr(other._local, "call", None) or ()]


def _place(block: nn.Module, models: list) -> Optional[str]:
    return next((f"`{n}` of {type(model).__name__}" for model in models
                 for n, m in model.named_modules() if m is block), None)


def _foreign(block: nn.Module, spec: BlockSpec) -> bool:
    """Whether ``block``, run outside a forward of the model it was converted in, is a module
    of another converted model whose forward runs (``model_a.blocks[2] = model_b.blocks[2]``
    after both were converted): it then runs its own forward, told once per block. Its
    runtime, that of the other model, has no scores of this forward: it ran as its own forward
    did, without a word, until the forty-fourth session (a copy of a block of the same model
    was told: :func:`_apart`). Blocks of another model called from a hook are no module of the
    running model: they run as blocks of a method called directly."""
    rt = spec.runtime
    where = _place(block, _models_running(rt)) if _RUNTIMES else None
    if where is None:
        return False
    if spec.name not in rt.foreign_told:
        rt.foreign_told = rt.foreign_told | {spec.name}
        _tell_own_forward(f"{where} is the converted block `{spec.name}` of another model (put "
                          "there after both were converted)", "revert the model it came from "
                          "(evoplug.revert(other_model), or put a copy of its original block "
                          "there), then convert this one again: evoplug.convert(evoplug.revert("
                          "model), ...) (said once per block)", stacklevel=4)
    return True


@torch.compiler.assume_constant_result
def _apart_compiled(rt: EvoRuntime, name: str) -> bool:
    """:func:`_apart` while torch.compile (or torch.export) traces the call: no entry hook
    marks a compiled forward of the model, so a copy cannot tell whether one calls it; it runs
    its own forward, as in the model's eager forward, told once per copy when it is traced (run
    while dynamo traces, a constant in the graph: nothing per call). It ran through its own
    runtime without a word until the forty-third session: copies sharing one (``blocks.extend(
    copy.deepcopy(blocks[2:]))``) evolved from each other's scores, 0.03 off the eager forward."""
    if name not in rt.apart_told:
        _tell_copy(rt, name, "a copy", ", is compiled (or exported)", stacklevel=2)
    return True


def _tell_copy(rt: EvoRuntime, name: str, who: str, how: str, stacklevel: int):
    """The warning, once per copy, that a copy of the converted block ``name`` runs its own
    forward (``who``: where it is; ``how``: how it is run). Copies deep-copied together share
    a runtime (``blocks.extend(copy.deepcopy(blocks[2:]))``): each is told (the first alone was,
    until audit H1 of the forty-fourth session)."""
    rt.apart_told = rt.apart_told | {name}
    _tell_own_forward(f"{who} of the converted block `{name}`, made apart from the model it was "
                      f"converted in (copy.deepcopy of the block after the conversion){how}",
                      "convert the model that holds it again: evoplug.convert(evoplug.revert("
                      "model), ...) (said once per copy)", stacklevel=stacklevel + 2)


def _tell_own_forward(what: str, fix: str, stacklevel: int):
    """The warning that a converted block in a place its runtime does not drive (``what``)
    runs its own forward, and how to have it evolve (``fix``)."""
    warnings.warn(f"evoplug: {what}: it runs its own forward, on every token (no speed-up; "
                  f"evoplug.set_options does not reach it). To have it evolve, {fix}",
                  stacklevel=stacklevel + 1)


def _fx_tracing(args, kwargs) -> bool:
    """Whether torch.fx records this call (an argument is a Proxy of its trace)."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing() and any(
        isinstance(v, torch.fx.Proxy) for v in (*args, *kwargs.values()))


class EvoBlockMixin:
    """Mixed in front of the block's own class by :func:`evoplug.convert`."""

    _evoplug_spec: BlockSpec

    def __reduce_ex__(self, protocol):
        # the converted class is made at run time: pickle names the original class
        return (_rebuild_block, (self._evoplug_spec.orig_class,), self.__getstate__())

    def init_non_persistent_buffers(self):
        """timm's convention for buffers no checkpoint holds (``to_empty`` then
        ``reinit_non_persistent_buffers``): the buffers the conversion added (the window index,
        traced constants) get the values it computed, on their current device and dtype; the
        block's own class makes its own, where it can."""
        for name, value in self._evoplug_spec.buffer_values.items():
            cur = self._buffers.get(name)
            if cur is not None:
                self._buffers[name] = value.to(device=cur.device, dtype=cur.dtype)
        own = getattr(super(), "init_non_persistent_buffers", None)
        if own is not None:
            own()

    def _apply(self, fn, recurse=True):
        """A dtype or device change (``.half()``, ``.to(...)``) casts the floating-point buffers
        the conversion added from the values it computed, not from their last cast: after
        ``.bfloat16().float()`` PVTv2's upsampling taps kept their bfloat16 rounding for good,
        and the selection moved (6e-2 off the same weights converted afresh; audit X2 of the
        thirty-ninth session). In place, so a buffer shared by ``share_memory`` stays shared.
        The integer ones too (PVTv2's upsampling indices, Swin's window index), which a cast
        leaves alone but ``to_empty`` does not: until the fifty-fifth session they held
        whatever memory ``to_empty`` gave them, and the plain recipe that the dense model
        survives (``to_empty``, then ``load_state_dict`` of its checkpoint) gave a raw index
        error or, memory holding small numbers, an output 0.08-0.14 off, without a word."""
        out = super()._apply(fn, recurse)
        spec = self.__dict__.get("_evoplug_spec")
        if spec is not None:
            with torch.no_grad():
                for name, value in spec.buffer_values.items():
                    cur = self._buffers.get(name)
                    if cur is not None and not cur.is_meta:
                        cur.copy_(value)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The block's own keys as always; then the buffers the conversion added (no checkpoint
        holds them) that are on the meta device, after ``model.to('meta')`` and
        ``load_state_dict(..., assign=True)``, get the values it computed, on the loaded
        tensors' device (they stayed on meta: a bare device error in the first forward; audit Y
        of the twenty-fifth session). ``init_non_persistent_buffers`` does it after ``to_empty``."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        spec = self.__dict__.get("_evoplug_spec")
        if spec is None or not any(getattr(self._buffers.get(n), "is_meta", False)
                                   for n in spec.buffer_values):
            return
        loaded = next((v for k, v in state_dict.items() if k.startswith(prefix) and
                       isinstance(v, torch.Tensor) and not v.is_meta), None)
        if loaded is None:
            return
        for name, value in spec.buffer_values.items():
            cur = self._buffers.get(name)
            if cur is not None and cur.is_meta:
                self._buffers[name] = value.to(device=loaded.device, dtype=cur.dtype)

    def __prepare_scriptable__(self):
        raise EvoplugError(_NO_TORCHSCRIPT.format(self._evoplug_spec.name, "torch.jit.script"))

    def forward(self, *args, **kwargs):
        spec = self.__dict__.get("_evoplug_spec")
        if spec is None:
            return _reverted(self, args, kwargs)
        if not spec.runtime.served and _apart(self, spec):    # (a copy put in a converted model)
            spec.tokens_run = -1
            return spec.orig_class.forward(self, *args, **kwargs)
        if torch.compiler.is_compiling():      # no hand-on in compiled graphs: nothing to guard
            return self._forward(*args, **kwargs)
        if torch._C._get_tracing_state() is not None:
            raise EvoplugError(_NO_TORCHSCRIPT.format(self._evoplug_spec.name, "torch.jit.trace"))
        if _fx_tracing(args, kwargs):
            raise EvoplugError(_NO_FX.format(self._evoplug_spec.name, "type(block)"))
        rt = self._evoplug_spec.runtime
        local = rt._local
        # outside a forward of the model (``forward_features`` called directly) the block runs
        # admitted like a forward: not while another thread builds a twin, which runs the modules
        # they share with the user's hooks set aside and its analysis' hooks on them
        entry = getattr(local, "entry", None)
        if entry and getattr(local, "last", -1) >= self._evoplug_spec.index:
            # a run of the blocks starts (once per forward): one of the model's forwards this
            # thread left by a KeyboardInterrupt ends here (the blocks of a method called
            # directly went unadmitted, a twin build beside them: audit Q4, twenty-eighth session)
            rt._drop_abandoned(admitted=0)
        outside = not entry
        if outside and _foreign(self, self._evoplug_spec):
            self._evoplug_spec.tokens_run = -1
            return self._evoplug_spec.orig_class.forward(self, *args, **kwargs)
        if outside:
            rt.admit()
        guard = getattr(local, "guard", None)
        if guard is not None and guard.on_stack:   # this block's own ops pass untouched
            guard.off()
        if guard is not None and guard.watched:
            # handed-on tokens reach only the block they were handed to; any other converted
            # block (blocks run in another order, one run twice) gets them in the original order
            cur = getattr(local, "state", None)
            seg = cur.segment if cur is not None else None
            to = seg.out if seg is not None and seg.to == self._evoplug_spec.index else None
            args, kwargs = _stray_restored(guard, args, kwargs, to)
        try:
            return self._forward(*args, **kwargs)
        finally:
            guard = getattr(local, "guard", None)
            if guard is not None and guard.watched:
                guard.on()
            if outside:
                rt.release()

    def _forward(self, *args, **kwargs):
        spec = self._evoplug_spec
        rt = spec.runtime
        twin = size_twin(spec, args, kwargs) if rt.variants else None
        if twin is not None:
            return _twin_ran(self, twin, args, kwargs)
        if torch.compiler.is_compiling():
            return self._entered(rt.enter(spec.index), False, args, kwargs)
        if rt.variants:     # (for a recomputation in backward: twins.py ``_recomputed_twin``)
            note_ran(self, args, kwargs, None)
        if _in_backward():
            out = self._entered(None, True, args, kwargs)
        else:
            out = self._entered(rt.enter(spec.index, spec.call.tokens(args, kwargs)), False,
                                args, kwargs)
            rt.left(out)
        if rt.variants:
            note_ran(self, args, kwargs, None, out)
        return out

    def _entered(self, state: Optional[EvoState], recompute: bool, args, kwargs):
        """The block's call from ``state`` (None: recomputed in backward, from the state its
        forward recorded)."""
        spec = self._evoplug_spec
        rt = spec.runtime
        if state is not None and spec.starts_stream and state.index >= 0:
            state = EvoState(-1, state.plan)     # another tower: its own scores, from here
        if state is not None and not torch.is_grad_enabled():
            _mark_untied(rt, args)
        plan = state.plan if state is not None else rt.plan
        role = plan.roles[spec.index]
        opt = plan.options
        segment = state is not None and state.segment is not None
        if not segment and _runs_own_forward(spec, role, opt):
            return self._own_forward(args, kwargs, twins=not recompute)
        if spec.suffix_from and not recompute:
            check_suffix_count(spec)
        bound = bind(spec, args, kwargs, strict=segment, twins=not recompute, state=state)
        if bound is None:       # a call the conversion did not see: the block's own forward
            return self._unconverted(args, kwargs, noted=not recompute)
        if isinstance(bound, nn.Module):      # a twin converted for this size: it runs the call
            return _twin_ran(self, bound, args, kwargs)
        x, extras = bound
        if spec.per_image and not recompute and rt.entered():
            _check_images(spec, x, rt.images())
        if segment:
            state, segment, x = _segment_taken(spec, state, x, recompute, rt._local)
        program = spec.program(self.training, x.shape[0], args, kwargs)
        if program is None:      # (no program at this batch size: told once, in its build)
            return self._unconverted(args, kwargs, noted=not recompute)
        if role == "evolve" and not rt.leaf_hooks_told and spec.leaves:
            spec.tell_leaf_hooks(self)
        spec.run_weight_hooks()
        if spec.writes:
            spec.replay_writes(self)
        record = not torch.compiler.is_compiling() and (
            self.training or torch.is_grad_enabled() or getattr(rt._local, "untied", False))
        if recompute:
            state = _recomputed_state(spec, rt, x, role)
            opt = state.plan.options
            segment = state.segment is not None     # its forward took a segment: so does this
            if segment and tuple(x.shape) != state.segment.shape:
                raise EvoplugError(
                    f"`{spec.name}` runs again in backward (gradient checkpointing) on tokens "
                    "that are not the ones its forward took from the block before it, in the "
                    "selection's order. Checkpoint whole blocks, or set reselect_every=1")
        elif record and not segment:    # a handed-on input was recorded as the output before
            rt.record(x, state)
        if (record or recompute) and not segment and not torch.is_grad_enabled():
            rt.record_checkpointed(state, spec.index)   # (how a reentrant checkpoint runs it)
        if segment:
            out, new, rest = self._run(x, extras, program, state, state.selection, state.g,
                                 state.since_select, state.segment.x0, state.segment.rep0)
        else:
            out, new, rest = self._evolve(spec.layout.tokens(x), extras, program, state, role, opt)
        if new.segment is None:
            with _history_kept(out):
                out = spec.call.to_call(spec.layout.restore(out, x))
        if record or recompute:
            rt.record(out, new)
        if not recompute:
            rt.leave(new)
        return out if spec.returns is None else spec.returns((out, *rest))

    def _own_forward(self, args, kwargs, twins: bool):
        """The block's own forward (hooks of its submodules fire as always; an evolving block
        passes the state on unchanged); outside the model's eager forward (compiled, or a
        method called directly: ``twins``, not a recomputation in backward) at a twin's size,
        the twin's block runs it (twins.py ``own_forward_twin``), as in an eager call of the
        model."""
        spec = self._evoplug_spec
        twin = own_forward_twin(spec, args, kwargs) if twins and spec.runtime.variants and \
            not spec.runtime.entered() else None
        if twin is not None:
            return _twin_ran(self, twin, args, kwargs)
        return self._unconverted(args, kwargs, noted=twins)

    def _unconverted(self, args, kwargs, noted: bool):
        """The block's own forward, every token; ``noted`` (not a recomputation in backward):
        outside the model's eager forward, with what it sets at a size no twin takes noted
        (twins.py ``own_forward_noted``)."""
        spec = self._evoplug_spec
        spec.tokens_run = -1
        if noted and not spec.runtime.entered():
            return own_forward_noted(self, args, kwargs)
        return spec.orig_class.forward(self, *args, **kwargs)

    def _evolve(self, x: torch.Tensor, extras, program, state: EvoState, role: str, opt: EvoOptions):
        """One block on tokens ``x`` (B, N, C) in the original order, from ``state``: (output
        tokens, new state, the other items of a tuple-returning block)."""
        spec = self._evoplug_spec
        B, N, C = x.shape
        P, S = spec.num_prefix, spec.num_suffix
        M = N - P - S
        k = ev.num_keep(M, opt.keep_ratio)
        g, sel = state.g, state.selection
        if g is not None and g.shape[0] == B and g.shape[-1] != N and role == "evolve":
            # a new stage of a pyramid: pool the scores onto this stage's grid
            pooled = None if S or state.num_suffix else ev.carry_scores(
                ev.patch_scores(ev.current_scores(g, sel), state.num_prefix), state.grid, spec.grid)
            g = None if pooled is None else ev.first_scores(pooled[:, None], spec.runtime.ranks(P, x.device), True)
            sel = None
        if role == "score" or g is None or g.shape != (B, 1, N):
            return self._dense(x, extras, program, state, None)       # (re)starts the scores
        if k >= M and opt.identity_fast_path:
            return self._dense(x, extras, program, state, ev.current_scores(g, sel))
        since = state.since_select
        if sel is None or sel.top.shape[-1] != P + S + k or since % opt.reselect_every == 0:
            g = ev.current_scores(g, sel)
            with_rep = opt.representative and k < M
            # (the window is read where ties are taken: near ties at the cut, or the place of the
            # representative; DeiT's selections take neither)
            with_pos = spec.needs_pos or spec.selects_pos
            window = ev.tie_window(x) if spec.near_ties or (with_rep and with_pos) \
                else ev.TIES_FLOAT32
            sel = ev.select(g, k, P + S, C, with_rep, with_pos, spec.near_ties, window)
            since = 0
        rep = ev.representative(x, sel)
        return self._run(ev.gather_subset(x, sel, rep), extras, program, state, sel, g, since, x, rep)

    def _dense(self, x, extras, program, state: EvoState, g):
        """Every token through the block, its row (re)starting (``g`` None) or refreshing the
        scores."""
        spec = self._evoplug_spec
        out, row, *more = program(self, *spec.call.feed(x, extras), None, None, self)
        spec.tokens_run = x.shape[1]
        if row is not None:
            S = spec.num_suffix
            row = ev.first_scores(ev.untangled(row), spec.runtime.ranks(spec.num_prefix + S, x.device),
                                  spec.full_row, S)
            g = row if g is None else ev.update_scores(g, row, state.plan.options.trade_off)
        new = EvoState(spec.index, state.plan, g, grid=spec.grid, num_prefix=spec.num_prefix,
                       num_suffix=spec.num_suffix)
        return out, new, (more[1] if len(more) > 1 else ())

    def _run(self, sub, extras, program, state: EvoState, sel, g, since: int, x0, rep0):
        """The slow path on ``sub`` [prefix, kept, representative], then either the original
        order restored (fast update) or, inside a segment, ``sub``'s output handed on."""
        spec = self._evoplug_spec
        P, S = spec.num_prefix, spec.num_suffix
        opt = state.plan.options
        N = x0.shape[1]
        if spec.needs_pos and sel.pos is None:
            raise EvoplugError(
                f"`{spec.name}` reads its tokens' original positions (a 2-D map op, a position "
                "term), but runs on a selection made without them by a block before it; set "
                "reselect_every=1")
        sub_extras = gather_extras(spec.name, extras, sel.pos, N, P, S, spec.whole_args,
                                   spec.batch_args, spec.extra_shapes)
        out_sub, row, *fast = program(self, *spec.call.feed(sub, sub_extras), sel.pos, x0, self)
        rest = fast[1] if len(fast) > 1 else ()
        if row is not None:
            if callable(opt.trade_off) and self.training and not torch.is_grad_enabled():
                _check_alpha_learns(spec, opt.trade_off)
            kept = ev.row_at_kept(row, sel, P) if spec.full_row else ev.row_of_kept(row, sel, P)
            sel = ev.refresh(sel, kept, spec.runtime.score_weight(opt.trade_off, P + S,
                                                                   sel.vals.shape[-1], row.device))
        since += 1
        spec.tokens_run = sub.shape[1]
        new = EvoState(spec.index, state.plan, g, sel, since, spec.grid, P, num_suffix=S)
        if since % opt.reselect_every and self._hands_on(state.plan):
            spec.runtime.guard().watch(out_sub, functools.partial(ev.restore, x0, sel=sel, rep=rep0),
                                      spec.name)
            segment = Segment(out_sub, x0, rep0, tuple(out_sub.shape), spec.chain_next.index)
            return out_sub, new._replace(segment=segment), rest
        with _history_kept(out_sub):
            if fast and fast[0] is not None:   # map block: exact attention update for every token
                base, base_rep = fast[0]
                return ev.restore(base, out_sub, sel, base_rep if rep0 is not None else None), new, rest
            return ev.restore(x0, out_sub, sel, rep0), new, rest

    def _hands_on(self, plan) -> bool:
        """Whether this block may hand its slow-path tokens straight to the next block: the
        next block evolves with the same selection and only it receives this output (chained at
        conversion, inside the model's own forward, no hooks), no compiler is involved (graphs
        see the plain order), and either no autograd (inference) or autograd outside gradient
        checkpointing: not a training-mode forward without autograd (how reentrant
        checkpointing runs its forward), no saved-tensor hooks (non-reentrant checkpointing,
        offloading), not a recomputation in backward. Inside a checkpointed region every block
        restores the order, in its forward and its recomputation alike."""
        nxt = self._evoplug_spec.chain_next
        if (nxt is None or torch.compiler.is_compiling() or plan.roles[nxt.index] != "evolve"
                or not self._evoplug_spec.runtime.entered() or self._evoplug_spec.observed()
                or nxt.observed()):
            return False
        if not torch.is_grad_enabled():
            return not self.training and not getattr(self._evoplug_spec.runtime._local, "untied", False)
        return not _saving_hooks() and not _in_backward()


def _history_kept(out: torch.Tensor):
    """Gradients on while the tokens a program returns go back in order where they hold autograd
    history the caller's mode would drop: what the forward computes under ``torch.enable_grad()``
    (rewrite/grad_mode.py), whose history the dense block's output holds under ``no_grad`` too
    (dropped until the forty-eighth session)."""
    if torch.is_grad_enabled() or not out.requires_grad:
        return contextlib.nullcontext()
    return torch.enable_grad()


def _reverted(block: nn.Module, args, kwargs):
    """The converted forward called on a block :func:`evoplug.revert` gave its class back: by a
    forward set on its instance after the conversion that calls the converted one (MMEngine's
    checkpoint wrapper, a lambda around ``block.forward`` bound then), which revert leaves in
    place. The block's own forward runs, as in the dense model with that wrapper (a raw
    AttributeError, ``_evoplug_spec``, until the fifty-fifth session)."""
    if isinstance(block, EvoBlockMixin):
        raise EvoplugError(f"{type(block).__name__}: a converted block without its conversion "
                           "state (`_evoplug_spec` deleted?): convert the model again")
    return type(block).forward(block, *args, **kwargs)


def _twin_ran(block: nn.Module, twin: nn.Module, args, kwargs):
    """The call run by ``twin``, the block of a twin (a new object, its submodules shared); the
    tensors its forward set on itself (``self.last = x.detach()``, ``self.total = self.total +
    1``: BlockSpec.sets_own) set on the model's block, which the user reads (they stayed on the
    twin's block until the forty-fifth session), also from a call stopped midway: a
    recomputation torch's non-reentrant checkpoint stops once it has the tensors it saves sets
    what the twin's program set by then (never, until audit J1 of the forty-fifth session).
    So are the Python values its forward sets on itself at both sizes (BlockSpec.writes: a size
    it records, ``self.H, self.W = H, W``), the twin's size's: the model's block kept the
    conversion's size until audit K6 of the forty-sixth session."""
    spec = block._evoplug_spec
    note_ran(block, args, kwargs, twin)      # (and the call's output, below)
    try:
        out = following(block, twin)(*args, **kwargs)
    finally:
        spec.tokens_run = twin._evoplug_spec.tokens_run
        set_back(block, twin)
        for name in spec.sets_own:
            value = getattr(twin, name, None)
            if isinstance(value, torch.Tensor) and getattr(block, name, None) is not value:
                kind = "attribute" if name not in twin._buffers else "non-persistent buffer" \
                    if name in twin._non_persistent_buffers_set else "buffer"
                set_on(block, name, value, kind)
    note_ran(block, args, kwargs, twin, out)
    return out


def _runs_own_forward(spec: BlockSpec, role: str, opt: EvoOptions) -> bool:
    """Whether the block runs its own forward (every token): a dense block, keep 1.0 on the
    identity fast path (and off it where the forward sets a tensor from its tokens, which the
    evolving path makes in score order: ``state_from_tokens``), a batch of no images, a hook
    on a module its programs traced into (said once per model: BlockSpec.tell_hooked), or a
    call that collects the attention map it returns (BlockSpec.maps_collected)."""
    if role == "dense" or (opt.keep_ratio >= 1.0 and (opt.identity_fast_path or
                                                       spec.state_from_tokens)):
        return True
    if spec.maps_collected is not None and spec.maps_collected():
        spec._tell_maps_collected()
        return True
    if spec.hooked():
        if not spec.runtime.hooked_told:
            spec.tell_hooked()
        return True
    return spec.runtime.images() == 0


def _check_alpha_learns(spec: BlockSpec, alpha):
    """A learnable trade-off read in a training forward without autograd whose tokens need
    gradients (a reentrant checkpoint's forward): the refreshed scores, which carry alpha's
    gradient to the next selection's representative token, leave the checkpoint as state,
    not as an output, so alpha would silently get no gradient."""
    if not getattr(spec.runtime._local, "untied", False):
        return
    with torch.enable_grad():
        a = read_trade_off(alpha)
    if isinstance(a, torch.Tensor) and a.requires_grad:
        raise EvoplugError(
            f"`{spec.name}` runs inside a reentrant gradient checkpoint (use_reentrant=True) "
            "with a learnable trade_off: its score update runs without autograd there, so the "
            "trade-off would get no gradient. Use non-reentrant checkpointing "
            "(use_reentrant=False; timm: set_reentrant_ckpt(False)), or a fixed trade_off")


def _mark_untied(rt: EvoRuntime, args):
    """A forward without autograd whose tokens need gradients runs inside a reentrant
    checkpoint (an eval-mode one too: input gradients, saliency): from here on this forward
    records its states for the recomputation and hands no tokens on, as a train-mode forward
    without autograd does."""
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        rt._local.untied = True


def _segment_taken(spec: BlockSpec, state: EvoState, x: torch.Tensor, recompute: bool, local):
    """(state, whether this block takes the segment in progress, its tokens): not when the
    tokens were handed to another block (blocks run in another order than at conversion), nor
    when the handed-on tokens were read (the guard restored them: a dropout between the blocks)
    or replaced before this block; then it starts from its input, in the original order, with
    the selection in force. Handed-on tokens written into in place (``x[:, 0] = 0`` between the
    blocks) are taken as the guard restored them, where the write landed (until the twenty-sixth
    session the block took the handed-on tensor, and the write was lost). (An input of the
    handed-on shape that is neither the handed-on tensor nor made after its tokens were
    restored is refused: its order cannot be told.)"""
    seg = state.segment
    guard = getattr(local, "guard", None)
    restored, written = guard.seen(seg.out) if guard is not None and not recompute else (None, False)
    if x is seg.out and written:
        return state._replace(segment=None), False, restored
    if seg.to != spec.index or (x is not seg.out and not recompute and (
            tuple(x.shape) != seg.shape or restored is not None)):
        return state._replace(segment=None), False, x
    _check_segment_arrived(spec.name, x, seg)
    return state, True, x


def _stray_restored(guard, args, kwargs, expected):
    """The call's arguments, a handed-on tensor other than ``expected`` in the original order."""
    def fix(v):
        return guard.restored(v) if isinstance(v, torch.Tensor) and v is not expected else v
    return tuple(fix(v) for v in args), {k: fix(v) for k, v in kwargs.items()}


def _rebuild_block(orig_class: type):
    """Unpickling: an empty instance of the converted class of ``orig_class``."""
    return object.__new__(evo_class(orig_class))


def _check_images(spec: BlockSpec, x: torch.Tensor, images: Optional[int]):
    """A block must see as many token sequences per image as at calibration: a model that
    packs several images into one sequence (transformers' Pixtral) would have their tokens
    ranked together."""
    if images is not None and x.shape[0] != images * spec.per_image:
        raise EvoplugError(
            f"`{spec.name}` runs on a batch of {x.shape[0]} token sequence(s) for {images} "
            f"image(s), where the conversion saw {spec.per_image} per image: the model packs or "
            "regroups its images before this block (several images in one sequence), and "
            "evoplug would rank the tokens of different images together. Call it with one "
            "image at a time, or leave it dense")


def _check_segment_arrived(name: str, x: torch.Tensor, segment: Segment):
    """A block after one that handed its kept tokens on must get exactly that output, and with
    autograd when it was made with autograd."""
    if x is not segment.out:
        raise EvoplugError(
            f"`{name}` did not receive the output of the converted block before it, unlike in "
            "the forward evoplug analysed: that block handed its kept tokens on in the "
            "selection's order. Convert with an example input that runs the model this way, or "
            "set reselect_every=1")
    if segment.out.requires_grad and not torch.is_grad_enabled():
        raise EvoplugError(
            f"`{name}` runs without autograd (reentrant gradient checkpointing around it, or "
            "torch.no_grad) right after a converted block that ran with autograd and handed its "
            "kept tokens on in the selection's order: the gradients of the tokens it did not "
            "keep would be lost. Checkpoint every converted block or none, use non-reentrant "
            "checkpointing (use_reentrant=False), or set reselect_every=1")


def _recomputed_state(spec: BlockSpec, rt: EvoRuntime, x: torch.Tensor, role: str) -> EvoState:
    """The state a block recomputed in backward ran with in its forward."""
    if role == "score":   # a scoring block starts the scores from its own attention
        return EvoState(-1, rt.plan)
    state = rt.recall(x, spec.index)
    if state is not None and state.plan != rt.plan:
        raise EvoplugError(
            f"`{spec.name}` runs again in backward (gradient checkpointing) after "
            "evoplug.set_options changed the options of its forward: the recomputation would "
            "not match the forward. Change options between training steps, not between a "
            "forward and its backward")
    if state is None:
        raise EvoplugError(
            f"`{spec.name}` runs again in backward (gradient checkpointing), but evoplug "
            "cannot trace its input back to the forward it belongs to, so it cannot know which "
            "tokens that forward selected. Checkpoint whole blocks (timm's "
            "set_grad_checkpointing, torch.utils.checkpoint around converted blocks), or "
            "convert with keep_ratio=1.0 for this run")
    return state


#: converted classes by original class, while a converted block holds one: a parametrized
#: block's class is torch's, one per module, and the cache kept each of them alive for good
_CLASS_CACHE: "weakref.WeakValueDictionary[type, type]" = weakref.WeakValueDictionary()
_CLASS_LOCK = threading.Lock()


def _new_class_lock():          # (a child forked while another thread held it: never released)
    global _CLASS_LOCK
    _CLASS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_class_lock)


def evo_class(cls: type) -> type:
    """The converted class of a block class (one per original class)."""
    if issubclass(cls, EvoBlockMixin):
        return cls
    with _CLASS_LOCK:
        new = _CLASS_CACHE.get(cls)
        if new is None:
            new = type(f"Evo{cls.__name__}", (EvoBlockMixin, cls), {"__module__": cls.__module__})
            _CLASS_CACHE[cls] = new
    return new
