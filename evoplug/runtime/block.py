"""Converted blocks: the block's class is swapped for a subclass whose ``forward`` runs the
slow-fast token evolution around the block's own computation.

Swapping the class (not wrapping the module) keeps every parameter, buffer, hook, attribute,
``isinstance`` check and state_dict key of the block.

Per-forward state (the global attention ``g``, the current selection) is an immutable
:class:`EvoState` that each block takes in and hands on; nothing a forward computes is stored
on the modules. :class:`EvoRuntime` (one per converted model, shared by its blocks) passes it
from block to block:

* per thread: two threads running the same model each see their own forward;
* for recomputation in backward (gradient checkpointing): in training, the state a block
  started from is recorded with its input tensor (and the state it left with its output and
  the output's autograd node), so a block that checkpointing runs again in backward starts
  from the state of *its* forward, not from whatever the last forward left behind. A block
  recomputed with an input evoplug cannot trace back to its forward raises instead of
  guessing;
* options and roles are an immutable :class:`Plan` that a forward takes once, at its first
  converted block: :func:`evoplug.set_options` swaps the plan, and a forward in flight in
  another thread finishes with the plan it started with.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import threading
import weakref
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..errors import EvoplugError
from ..options import EvoOptions
from . import evolve as ev
from .programs import compile_program, program_source

#: key of the state a converted block left, in the metadata of its output's autograd node
_GRAD_FN_KEY = "evoplug_state"
#: autograd nodes searched, at most, for the state of a block recomputed in backward
_MAX_GRAPH_SEARCH = 10_000


class Plan(NamedTuple):
    """Options and the role of every converted block (by index), swapped as one object."""
    options: EvoOptions
    roles: Tuple[str, ...]


class EvoState(NamedTuple):
    """What one forward carries from block to block (immutable: kept for recomputation)."""
    index: int                        # the converted block that left it (-1: none yet)
    plan: Plan                        # the plan this forward runs with
    scores: Optional[torch.Tensor] = None   # (B, M) global attention, float32, detached
    sel: Optional[torch.Tensor] = None      # (B, k) current selection
    rep_pos: Optional[torch.Tensor] = None  # (B,) position of the representative token
    since_select: int = 0
    grid: Optional[Tuple[int, int]] = None  # patch grid the scores live on


def _in_backward() -> bool:
    """True while the autograd engine runs a backward on this thread (what gradient
    checkpointing recomputes runs there)."""
    return torch._C._current_graph_task_id() != -1


def _tensor_key(t: torch.Tensor):
    """Identifies a tensor's data: equal for the tensor and its aliases of the same geometry
    (``detach()``, which reentrant checkpointing applies to its inputs), until it is written."""
    return (t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride(), t._version)


class EvoRuntime:
    """Per converted model: the current :class:`Plan`, each thread's forward in progress and
    the states recorded for recomputation in backward. Pickles and copies without the
    per-thread and recorded parts (they belong to forwards of this process)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._local = threading.local()
        self._recorded: Dict[tuple, Tuple[weakref.ref, EvoState]] = {}

    def __getstate__(self):
        return {"plan": self.plan}

    def __setstate__(self, state):
        self.__init__(state["plan"])

    # -- the forward in progress on this thread ------------------------------------------
    def enter(self, index: int) -> EvoState:
        """The state block ``index`` starts from. A block that does not come after the last
        block of this thread's forward in progress starts a new forward (with the plan in
        force now); so does the first block ever run."""
        local = self._local
        cur = getattr(local, "state", None)
        if cur is None or local.last >= index:
            cur = EvoState(-1, self.plan)
            local.state = cur
        local.last = index          # every converted block, dense ones too, moves it on
        return cur

    def leave(self, state: EvoState):
        self._local.state = state

    def current(self) -> Optional[EvoState]:
        """The state the last converted block run on this thread left (None before any)."""
        return getattr(self._local, "state", None)

    # -- recomputation in backward --------------------------------------------------------
    def record(self, t: torch.Tensor, state: EvoState):
        """Remember that ``t`` (a block's input or output) goes with ``state``; forgotten when
        ``t`` is freed."""
        fn = t.grad_fn
        if fn is not None:
            fn.metadata[_GRAD_FN_KEY] = state
        try:
            key = _tensor_key(t)
        except RuntimeError:    # no storage (a wrapper subclass): the autograd node must do
            return
        recorded = self._recorded

        def forget(_, key=key):
            entry = recorded.get(key)
            if entry is not None and entry[0]() is None:
                recorded.pop(key, None)

        recorded[key] = (weakref.ref(t, forget), state)

    def recall(self, t: torch.Tensor) -> Optional[EvoState]:
        """The state recorded with ``t`` (or an alias of it), else the state of the nearest
        block upstream of ``t`` in the autograd graph; None when there is none."""
        entry = self._entry(t)
        if entry is not None:
            return entry[1]
        todo = collections.deque([t.grad_fn])
        seen = set()
        while todo and len(seen) < _MAX_GRAPH_SEARCH:
            fn = todo.popleft()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            state = fn.metadata.get(_GRAD_FN_KEY)
            if state is not None:
                return state
            var = getattr(fn, "variable", None)     # a leaf (reentrant checkpointing's inputs)
            entry = self._entry(var) if isinstance(var, torch.Tensor) else None
            if entry is not None:
                return entry[1]
            todo.extend(f for f, _ in fn.next_functions)
        return None

    def _entry(self, t: torch.Tensor):
        try:
            entry = self._recorded.get(_tensor_key(t))
        except RuntimeError:
            return None
        return entry if entry is not None and entry[0]() is not None else None


@dataclasses.dataclass(eq=False)
class BlockSpec:
    """What a converted block needs at run time (not a module: adds no state_dict key)."""
    index: int                 # position among the converted blocks (execution order)
    analysis: BlockAnalysis
    runtime: EvoRuntime        # shared by all blocks of the model
    programs: Dict[bool, Callable]   # training flag -> slow-path program
    orig_class: type
    inner: Tuple[nn.Module, ...] = ()   # submodules traced into (their hooks need its own forward)
    added_buffers: Tuple[str, ...] = ()  # non-persistent buffers the conversion added (revert)
    tokens_run: int = -1       # tokens the last call ran through attention/MLP (diagnostic)
    batch_programs: Dict = dataclasses.field(default_factory=dict)   # (training, B) -> program
    program_factory: Optional[Callable] = None   # (training, args, kwargs) -> program of that batch
    _program_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def options(self) -> EvoOptions:
        return self.runtime.plan.options

    @property
    def role(self) -> str:
        """'dense' | 'score' | 'evolve' under the options in force."""
        return self.runtime.plan.roles[self.index]

    @property
    def context(self) -> Optional[EvoState]:
        """The state the last converted block run on this thread left (what a forward hook on
        a converted block reads: the selection it ran with, the updated scores)."""
        return self.runtime.current()

    # pickling: programs are generated code, kept as their source and compiled again
    def __getstate__(self):
        state = dict(self.__dict__)
        name = self.analysis.name
        state["programs"] = {k: program_source(p, name) for k, p in self.programs.items()}
        state["batch_programs"] = {k: program_source(p, name) for k, p in self.batch_programs.items()}
        del state["_program_lock"]
        return state

    def __setstate__(self, state):
        state["programs"] = {k: compile_program(s) for k, s in state["programs"].items()}
        state["batch_programs"] = {k: compile_program(s) for k, s in state["batch_programs"].items()}
        state["_program_lock"] = threading.Lock()
        self.__dict__.update(state)

    def __deepcopy__(self, memo):
        # programs are shared (they read everything from the block they are called with)
        new = object.__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k in ("programs", "batch_programs"):
                new.__dict__[k] = dict(v)
            elif k == "_program_lock":
                new.__dict__[k] = threading.Lock()
            else:
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def hooked(self) -> bool:
        """Whether a submodule of the block has hooks: they fire only in its own forward."""
        for m in self.inner:
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return True
        return False


class EvoBlockMixin:
    """Mixed in front of the block's own class by :func:`evoplug.convert`."""

    _evoplug_spec: BlockSpec

    def __reduce_ex__(self, protocol):
        # the converted class is made at run time: pickle names the original class
        return (_rebuild_block, (self._evoplug_spec.orig_class,), self.__getstate__())

    def forward(self, *args, **kwargs):
        spec = self._evoplug_spec
        rt = spec.runtime
        recompute = not torch.compiler.is_compiling() and _in_backward()
        state = rt.enter(spec.index) if not recompute else None
        plan = state.plan if state is not None else rt.plan
        role = plan.roles[spec.index]
        opt = plan.options
        if role == "dense" or (opt.keep_ratio >= 1.0 and opt.identity_fast_path) or spec.hooked():
            # the block's own forward (hooks of its submodules fire as always); an evolving
            # block passes the state on unchanged
            spec.tokens_run = -1
            return spec.orig_class.forward(self, *args, **kwargs)
        a = spec.analysis
        x, extras = a.plan.bind(a.name, args, kwargs)
        program = spec.programs[self.training]
        if a.batch_size is not None and x.shape[0] != a.batch_size:
            program = _batch_program(spec, self.training, args, kwargs, x.shape[0])
        record = not torch.compiler.is_compiling() and (self.training or torch.is_grad_enabled())
        if recompute:
            state = _recomputed_state(spec, rt, x, role)
            opt = state.plan.options
        elif record:
            rt.record(x, state)
        tokens = x.flatten(1, 2) if a.token_map else x   # (B, H, W, C) map: its H * W tokens
        out, new = self._evolve(tokens, extras, program, state, role, opt)
        if a.token_map:
            out = out.reshape(x.shape)
        if record or recompute:
            rt.record(out, new)
        if not recompute:
            rt.leave(new)
        return out

    def _evolve(self, x: torch.Tensor, extras, program, state: EvoState, role: str, opt: EvoOptions):
        """One block on tokens ``x`` (B, N, C) from ``state``: (output tokens, new state)."""
        spec = self._evoplug_spec
        a = spec.analysis
        B, N, C = x.shape
        P = a.num_prefix
        M = N - P
        k = ev.num_keep(M, opt.keep_ratio)
        scores = state.scores
        if scores is not None and scores.shape[0] == B and scores.shape[1] != M and role == "evolve":
            # a new stage of a pyramid: pool the scores onto this stage's grid
            scores = ev.carry_scores(scores, state.grid, a.grid)
            state = state._replace(scores=scores, sel=None, rep_pos=None)
        if role == "score" or scores is None or scores.shape != (B, M):
            # dense run that (re)starts the global attention
            out, row = program(self, *a.plan.feed(x, extras), None, None)[:2]
            spec.tokens_run = N
            return out, EvoState(spec.index, state.plan, None if row is None else
                                 ev.update_scores(None, row, opt.trade_off), grid=a.grid)
        if k >= M and opt.identity_fast_path:
            out, row = program(self, *a.plan.feed(x, extras), None, None)[:2]
            if row is not None:
                scores = ev.update_scores(scores, row, opt.trade_off)
            spec.tokens_run = N
            return out, state._replace(index=spec.index, scores=scores)
        sel, rep_pos, since = state.sel, state.rep_pos, state.since_select
        if sel is None or sel.shape[1] != k or since % opt.reselect_every == 0:
            sel, rep_pos = ev.select_tokens(scores, k, opt.representative)
            since = 0
        weights = ev.representative_weights(scores, sel) if rep_pos is not None else None
        rows = ev.selection_rows(x, P, sel)
        sub, pos, rep = ev.gather_subset(x, P, sel, rep_pos, weights, rows)
        sub_extras = {n: _gather_extra(a, n, t, pos, N, P) for n, t in extras.items()}
        out_sub, row, *fast = program(self, *a.plan.feed(sub, sub_extras), pos, x)
        if row is not None:
            row_sel = row.gather(1, sel) if a.row_full else row[:, :k]
            scores = ev.update_scores(scores, row_sel, opt.trade_off, sel)
        spec.tokens_run = sub.shape[1]
        new = EvoState(spec.index, state.plan, scores, sel, rep_pos, since + 1, a.grid)
        if fast and fast[0] is not None:   # map block: exact attention update for every token
            base, base_rep = fast[0]
            return ev.restore(base, out_sub, P, sel, base_rep, rows), new
        return ev.restore(x, out_sub, P, sel, rep, rows), new


def _rebuild_block(orig_class: type):
    """Unpickling: an empty instance of the converted class of ``orig_class``."""
    return object.__new__(evo_class(orig_class))


def _recomputed_state(spec: BlockSpec, rt: EvoRuntime, x: torch.Tensor, role: str) -> EvoState:
    """The state a block recomputed in backward ran with in its forward."""
    if role == "score":   # a scoring block starts the scores from its own attention
        return EvoState(-1, rt.plan)
    state = rt.recall(x)
    if state is not None and state.plan != rt.plan:
        raise EvoplugError(
            f"`{spec.analysis.name}` runs again in backward (gradient checkpointing) after "
            "evoplug.set_options changed the options of its forward: the recomputation would "
            "not match the forward. Change options between training steps, not between a "
            "forward and its backward")
    if state is None:
        raise EvoplugError(
            f"`{spec.analysis.name}` runs again in backward (gradient checkpointing), but evoplug "
            "cannot trace its input back to the forward it belongs to, so it cannot know which "
            "tokens that forward selected. Checkpoint whole blocks (timm's "
            "set_grad_checkpointing, torch.utils.checkpoint around converted blocks), or "
            "convert with keep_ratio=1.0 for this run")
    return state


def _batch_program(spec: BlockSpec, training: bool, args, kwargs, batch: int) -> Callable:
    """The program of a block whose trace specialised a value on the batch size (MMPretrain's
    Swin computes it with ``int()``), for this batch size: made at its first call by the
    factory the conversion handed over, then kept. The factory never changes the block, so
    other threads keep running it."""
    key = (training, batch)
    program = spec.batch_programs.get(key)
    if program is not None:
        return program
    with spec._program_lock:
        program = spec.batch_programs.get(key)
        if program is None:    # the factory the conversion handed over (it runs the compiler)
            program = spec.program_factory(training, args, kwargs)
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
_CLASS_LOCK = threading.Lock()


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
