"""Per-forward state of a converted model and how it travels.

:class:`EvoState` is what one forward carries from block to block (immutable); :class:`Plan`
the options and roles a forward runs with; :class:`EvoRuntime` (one per converted model)
passes the state on, per thread, and records it in training so gradient checkpointing
recomputes a block with the state of its own forward (see docs/guarantees.md).
"""
from __future__ import annotations

import collections
import contextlib
import sys
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.utils.checkpoint

from ..options import EvoOptions, read_trade_off
from .evolve import Selection, current_scores, patch_scores, prefix_ranks
from .guard import SegmentGuard

if TYPE_CHECKING:
    from .entry import SizeVariant


#: key of the state a converted block left, in the metadata of its output's autograd node
_GRAD_FN_KEY = "evoplug_state"
#: key of the size twin's blocks a converted block's call ran (None: its own), in the metadata
#: of its output's autograd node: (the model's runtime, weakly; the blocks)
_RAN_KEY = "evoplug_ran"
#: :meth:`EvoRuntime.ran_with`: no call noted which blocks ran
NOT_NOTED = object()
#: autograd nodes searched, at most, for the state of a block recomputed in backward
_MAX_GRAPH_SEARCH = 10_000


class Plan(NamedTuple):
    """Options and the role of every converted block (by index), swapped as one object."""
    options: EvoOptions
    roles: Tuple[str, ...]


class Segment(NamedTuple):
    """A segment in progress: the last block handed its slow-path tokens [prefix, kept,
    representative] straight to the next block (same selection), instead of restoring every
    token in the original order; the block that ends the segment restores them. Recorded for
    recomputation without ``out`` (see :meth:`EvoRuntime.record`)."""
    out: Optional[torch.Tensor]       # the tensor the block returned: the next block's input
    x0: torch.Tensor                  # the segment's first input, original order (B, N, C)
    rep0: Optional[torch.Tensor]      # the representative token made from it (B, 1, C)
    shape: Tuple[int, ...] = ()       # out's shape
    to: int = -1                      # the converted block it is handed to (chain_next)


class EvoState(NamedTuple):
    """What one forward carries from block to block (immutable: kept for recomputation)."""
    index: int                        # the converted block that left it (-1: none yet)
    plan: Plan                        # the plan this forward runs with
    g: Optional[torch.Tensor] = None  # (B, 1, N) token scores as of the last selection
    selection: Optional[Selection] = None   # the current selection (its scores refreshed)
    since_select: int = 0
    grid: Optional[Tuple[int, int]] = None  # patch grid the scores live on
    num_prefix: int = 0
    segment: Optional[Segment] = None       # set while tokens travel in the selection's order
    num_suffix: int = 0                     # trailing special tokens (after the patches)

    @property
    def scores(self) -> Optional[torch.Tensor]:
        """The patch tokens' global attention (B, M), float32, in the original order."""
        if self.g is None:
            return None
        return patch_scores(current_scores(self.g, self.selection), self.num_prefix, self.num_suffix)

    @property
    def sel(self) -> Optional[torch.Tensor]:
        """The kept patch tokens (B, k), by decreasing score (patch indices, original order)."""
        if self.selection is None:
            return None
        return self.selection.top[:, 0, self.num_prefix + self.num_suffix:] - self.num_prefix


def _in_backward() -> bool:
    """True while the autograd engine runs a backward on this thread (what gradient
    checkpointing recomputes runs there)."""
    return torch._C._current_graph_task_id() != -1


def _saving_hooks() -> bool:
    """True while saved-tensor hooks are active on this thread: the forward of non-reentrant
    gradient checkpointing (and its recomputation), ``torch.autograd.graph.save_on_cpu``."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError):   # not in this torch: assume they are (no segments)
        return True


#: the forward of torch.utils.checkpoint's reentrant checkpoint (use_reentrant=True)
_REENTRANT_FORWARD = getattr(getattr(torch.utils.checkpoint, "CheckpointFunction", None),
                             "forward", None)


def _reentrant_inputs():
    """The tensors given to each reentrant gradient checkpoint whose forward runs on this thread
    now (on its stack): its recomputation in backward gets them back detached, leaves whose
    graph ends there."""
    code = getattr(_REENTRANT_FORWARD, "__code__", None)
    frame = sys._getframe(1)
    while frame is not None and code is not None:
        if frame.f_code is code:
            yield from (a for a in frame.f_locals.get("args", ()) if isinstance(a, torch.Tensor))
        frame = frame.f_back


def _tensor_key(t: torch.Tensor):
    """Identifies a tensor's data: equal for the tensor and its aliases of the same geometry
    (``detach()``, which reentrant checkpointing applies to its inputs), until it is written."""
    return (t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride(), t._version)


#: what a forward leaves on its thread's runtime (EvoRuntime.enter, runtime/block.py; ``ran``:
#: a run of the converted blocks started in the model's forward in progress)
_FORWARD_STATE = ("state", "last", "untied", "direct", "run", "waiting", "ran")

#: the block call's tokens are not known (under torch.compile, which runs one forward at a time)
NO_TOKENS = object()
#: runs of the blocks kept waiting on a thread, at most (the oldest is dropped)
_MAX_WAITING = 8


class Run(NamedTuple):
    """A run of the converted blocks on a thread (see :meth:`EvoRuntime.enter`): the tensor its
    last block call returned (weakly), the state that block left, its index, ``untied``."""
    out: Callable[[], Optional[torch.Tensor]]
    state: EvoState
    last: int
    untied: bool

    def waits(self) -> bool:
        """Whether a later block call may go on with it: mid-way, outside the model's own
        forward (no tokens handed on). (One whose last output is gone can be gone on with
        only by tokens made from that output: kept, so that such a call is warned.)"""
        s = self.state
        return s.index >= 0 and s.segment is None and self.last < len(s.plan.roles) - 1


def first_tensor(obj) -> Optional[torch.Tensor]:
    """The tensor a block call gives as its tokens: ``obj`` itself, or the first item of a
    tuple or list (transformers' layers return ``(hidden_states, ...)``)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    return None


#: every runtime of this process (weakly): a forked child resets their thread bookkeeping
_RUNTIMES: "weakref.WeakSet[EvoRuntime]" = weakref.WeakSet()


def _tell_streams(index: int):
    """Runs wait at the block before ``index`` and its call's tokens are none of theirs."""
    warnings.warn(
        f"evoplug: runs of the converted blocks wait on this thread at block {index - 1}, and "
        f"block {index} got tokens that neither they nor the run that came last returned "
        "(changed in between, e.g. by a norm or a downsampling; or its tokens come from a run "
        "given up): it goes on from the run that came last. If token streams run block by "
        "block through the same blocks, they may be ranked by each other's scores: run them "
        "one after the other, or stack them in the batch (docs/guarantees.md)", stacklevel=8)


def _inside_another_block(rt: "EvoRuntime", index: int, top) -> bool:
    """Whether the call of converted block ``index`` of ``rt`` runs inside the call of another
    block of ``rt`` (a hook on it) in the forward that ``top`` (:meth:`EvoRuntime.push_entry`'s
    frame) runs. Walks the stack: only where a run starts in a forward where one started."""
    frame = sys._getframe(2)
    while frame is not None and frame is not top:
        spec = getattr(frame.f_locals.get("self"), "_evoplug_spec", None)
        if spec is not None and spec.runtime is rt and spec.index != index:
            return True
        frame = frame.f_back
    return False


def _placed(rt: "EvoRuntime", model, index: int) -> str:
    """Converted block ``index`` of ``rt`` by its place in ``model`` now and the name it was
    converted under."""
    for name, m in model.named_modules():
        spec = m.__dict__.get("_evoplug_spec")
        if spec is not None and spec.runtime is rt and spec.index == index:
            return f"`{name}`" if name == spec.name else f"`{name}` (converted as `{spec.name}`)"
    return f"converted block {index}"


def _reset_after_fork():
    for rt in list(_RUNTIMES):
        rt._after_fork()


def _on_stack(frame, top) -> bool:
    """Whether ``frame`` (None: not known, taken as running) is ``top`` or one it was called
    from."""
    if frame is None:
        return True
    while top is not None:
        if top is frame:
            return True
        top = top.f_back
    return False


class EvoRuntime:
    """Per converted model: the current :class:`Plan`, each thread's forward in progress and
    the states recorded for recomputation in backward. Pickles and copies without the
    per-thread and recorded parts (they belong to forwards of this process)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._local = threading.local()
        # the converting thread's forward state starts as a forward's end leaves it (a state
        # of the last block): torch.compile guards on what enter() reads, and a first call that
        # found no state compiled the model again at the second (audit T3 of the twenty-seventh
        # session). (A threading.local subclass that sets them for every thread lost enter()'s
        # writes under compile: each block started a new forward.)
        self._local.state = self._local.initial = EvoState(-1, plan)
        self._local.last = len(plan.roles) - 1
        # and so do its stacks of model forwards: compiled code guarded on their absence, and
        # the first eager call, which makes them, compiled the model again at the next compiled
        # call (audit V5 of the thirty-seventh session)
        self._frames: Dict[int, list] = {}
        self._new_stacks(self._local)
        self._recorded: Dict[tuple, Tuple[weakref.ref, EvoState]] = {}
        # a reentrant checkpoint's inputs -> the state its first converted block started from,
        # and that block's index (see record_checkpointed)
        self._checkpointed: Dict[tuple, Tuple[weakref.ref, EvoState, int]] = {}
        # a block's tokens -> the size twin's blocks its call ran, None: its own (see note_ran)
        self._ran: Dict[tuple, tuple] = {}
        self._consts: Dict[tuple, torch.Tensor] = {}
        # other input sizes (see SizeVariant): built by the conversion's factory (which the
        # EntryHook holds) at the first forward with a size, kept by input key; not pickled or
        # copied (a copy builds its own)
        self.variants: Dict[tuple, "SizeVariant"] = {}
        # building one runs the model's shared modules with the analysis' hooks on them: it
        # waits until no other thread runs the model, and the others wait at its entry
        self._gate = threading.Condition()
        self._inside: Dict[int, int] = {}     # thread id -> forwards of the model it runs
        self._builder: Optional[int] = None
        # self._frames: thread id -> the frames (torch's Module._call_impl) of the model forwards
        # it runs: one no longer on its thread's stack ended without the exit hook (a
        # KeyboardInterrupt: PyTorch calls always-call hooks for an Exception only) and is dropped
        self._owners: Dict[int, weakref.ref] = {}    # thread id -> the thread counted under it
        # a twin's runtime: the runtime of the model it is a twin of (whose forward runs the
        # twin's blocks, and which keeps every twin: runtime/twins.py ``_form_twin``)
        self.parent: Optional["EvoRuntime"] = None
        self._no_form: Dict[tuple, str] = {}     # form twins that failed to convert: why
        # (block index, name) -> the value a twin's forward set on the model's block, at
        # another input size, other than the one the block's programs were traced with
        # (transformers' Swin: its shift, 0 for good once a map fits its window): the model's
        # forwards then run twins converted with it (entry.py), its own programs none
        # (twins.py ``_bound``); copied and pickled with the plan, as the blocks keep the values
        self.drift: Dict[tuple, object] = {}
        _RUNTIMES.add(self)

    def _after_fork(self):
        """In a child process forked while other threads ran the model or built a twin: they
        do not exist there, and their counts held every twin build (and the builder's, every
        forward) waiting forever (audit Y of the twenty-fifth session). The forking thread's own
        forward, if it forked from inside one, still counts."""
        me = threading.get_ident()
        mine = self._inside.get(me, 0)
        self._gate = threading.Condition()
        self._inside = {me: mine} if mine else {}
        self._frames = {me: self._frames[me]} if me in self._frames else {}
        self._owners = {me: self._owners[me]} if me in self._owners else {}
        self._builder = None

    def __getstate__(self):
        return {"plan": self.plan, "drift": dict(self.drift)}

    #: a model's entry hook drives it (set by :class:`EntryHook`, also when one is copied or
    #: unpickled): False for the runtime of a converted block copied apart from its model
    served = False
    #: the copied blocks (by the name of the block they copy) a warning told, copied apart
    #: from their model, run their own forward (runtime/block._tell_copy)
    apart_told: frozenset = frozenset()
    #: the blocks a warning told run in another converted model (runtime/block._foreign)
    foreign_told: frozenset = frozenset()
    #: a warning told that a block runs its own forward for a module inside it in another
    #: train/eval mode (BlockSpec.mode_apart)
    mode_told = False
    #: a warning told that hooks inside an evolving block see its kept tokens (BlockSpec)
    leaf_hooks_told = False
    #: a warning told that a hook inside a block made it run its own forward (BlockSpec)
    hooked_told = False
    #: a warning told that a call collecting attention maps runs the blocks' own forward
    maps_told = False
    nested_told = False      # a block given a nested tensor was said (twins.py ``bind``)

    def __setstate__(self, state):
        self.__init__(state["plan"])
        self.drift = dict(state.get("drift", {}))

    # -- the forward in progress on this thread ------------------------------------------
    def enter(self, index: int, tokens=NO_TOKENS) -> EvoState:
        """The state block ``index`` starts from, called with ``tokens``. A block that does not
        come after the last block of this thread's forward in progress starts a new forward
        (with the plan in force now); so does the first block ever run.

        Token streams run block by block through the same blocks (``a = blk(a); b = blk(b)``):
        a run interrupted mid-way by a new one waits, and a block call whose tokens are the
        tensor a waiting run's last block returned goes on with that run (each stream from its
        own scores; the first went on from the second's until the thirty-first session, off by
        0.67, silently). So does a run whose state a compiled forward replaced meanwhile. A
        stream is known by that tensor only: tokens changed between two blocks go on with the
        run that came last (warned, outside a forward of the model, where runs wait at the
        block before)."""
        local = self._local
        cur = getattr(local, "state", None)
        if tokens is not NO_TOKENS:
            # (the usual call goes on with the run in progress, none waiting: nothing to do;
            # nor where no run is recorded, as with tokens handed on, and none waits)
            run = getattr(local, "run", None)
            if getattr(local, "waiting", ()) or run is not None and (
                    run.state is not cur or run.last != local.last or local.last >= index):
                cur = self._streams(local, cur, index, tokens, run)
        if cur is None or local.last >= index:
            if tokens is not NO_TOKENS:     # (not compiled: a compiled forward gives no tokens)
                self._run_starts(local, index)
            cur = EvoState(-1, self.plan)
            local.state = cur
            local.untied = False        # see runtime/block.py: a reentrant checkpoint's forward
        local.last = index          # every converted block, dense ones too, moves it on
        return cur

    reorder_told = False     # a warning told that converted blocks ran out of their order
    #: the model's forwards dynamo traces now (the entry hook counts them up, the exit hook
    #: down, while compiling; the traced code keeps no per-thread stacks): a block whose count
    #: of special tokens only the model's call gives is refused outside one
    compiled_entries = 0

    def _run_starts(self, local, index: int):
        """A run of the blocks starts at block ``index``, eagerly. In a forward of the model as
        calibration called it, where a run started already, a block ran after one with a later
        or equal index: blocks put in another order after the conversion (or one run twice),
        which the runtime does not follow; told once (it ran densely from no scores, and the
        blocks after it evolved from those, without a word, until the forty-second session).
        Blocks called inside another converted block's call (from a hook on it) are a run of
        their own beside the forward's, which goes on after them (see :meth:`enter`): not told.
        The blocks of a size twin built before the reordering are told so too, in the model's
        forward they run in (they ran so without a word until the forty-third session)."""
        owner = self.parent or self    # (a size twin's blocks: the model's forward, told once)
        if getattr(local, "ran", False) and not owner.reorder_told and owner.entered() and \
                not _inside_another_block(self, index, owner._local.frames[-1]):
            owner.reorder_told = True
            model = owner.call()[1]
            now, before = (_placed(owner, model, owner._model_index(self, i))
                           for i in (index, local.last))
            ran = "ran twice in a row" if index == local.last else f"ran after {before}"
            warnings.warn(
                f"evoplug: {now} {ran} in this forward of {type(model).__name__}: "
                "converted blocks keep the order of the conversion, so it started the scores "
                "anew, on every token, and the blocks after it evolved from those, not as the "
                "model converted in this order would (were blocks put in another order, or one "
                "run twice, after the conversion?). Convert after reordering blocks: "
                "evoplug.convert(evoplug.revert(model), ...) (said once)", stacklevel=7)
        local.ran = True

    def _model_index(self, rt: "EvoRuntime", index: int) -> int:
        """The index in this model runtime's blocks of block ``index`` of ``rt``, this one or
        the size twin this thread's forward runs with."""
        variant = self._local.variant[-1] if rt is not self else None
        return index if variant is None else next(
            (i for i, b in enumerate(variant.blocks) if b is not None and
             b._evoplug_spec.index == index), index)

    def _streams(self, local, cur: Optional[EvoState], index: int, tokens, run: Optional[Run]):
        """:meth:`enter` where runs wait or one may start: the state to go on from."""
        waiting = getattr(local, "waiting", None) or ()   # (None: put back by a nested forward)
        if run is not None and (run.state is not cur or run.last != local.last):
            # its state was replaced without a block call here (a compiled forward): it waits
            waiting, run = waiting + (run,), None
        found = None
        if tokens is not None:
            found = next((w for w in reversed(waiting) if w.last < index and w.out() is tokens), None)
        if found is not None:
            waiting = tuple(w for w in waiting if w is not found)
            if run is not None:
                waiting += (run,)
            local.state, local.last, local.untied, local.run = found.state, found.last, found.untied, found
            cur = found.state
        elif cur is None or local.last >= index:      # a new run: the one in progress waits
            if run is not None:
                waiting += (run,)
            local.run = None
        elif not getattr(local, "entry", None) and any(w.last == local.last for w in waiting) \
                and (run is None or run.out() is not tokens):
            _tell_streams(index)
        # (a run whose output is gone is kept only until the run in progress passes it: it
        # can be gone on with by no call's tokens, only warned of)
        local.waiting = tuple(w for w in waiting if w.waits() and (w.last >= index or w.out() is not None)
                              )[-_MAX_WAITING:]
        return cur

    def leave(self, state: EvoState):
        self._local.state = state

    def left(self, output):
        """A block call of this thread's forward returned ``output`` (see :meth:`enter`)."""
        t = first_tensor(output)
        local = self._local
        state = local.state
        # (tokens handed on in the selection's order are the model's own forward's: a state
        # with a segment holds its output, which must not outlive the forward)
        local.run = Run(weakref.ref(t), state, local.last, getattr(local, "untied", False)) \
            if t is not None and state is not None and state.segment is None else None

    def guard(self) -> SegmentGuard:
        """This thread's guard of the tokens handed on in the selection's order (guard.py)."""
        g = getattr(self._local, "guard", None)
        if g is None:
            g = self._local.guard = SegmentGuard()
        return g

    def current(self) -> Optional[EvoState]:
        """The state the last converted block run on this thread left (None before any)."""
        state = getattr(self._local, "state", None)
        return None if state is getattr(self._local, "initial", None) else state

    # -- the model's own forward (segments hand tokens on only inside it) ------------------
    def entered(self) -> bool:
        """Whether this thread runs the converted model's ``forward`` as calibration saw it
        called (see :class:`EntryHook`): only then is a block's output known to go only to the
        next block."""
        stack = getattr(self._local, "entry", None)
        return bool(stack) and stack[-1]

    _idle_warned = False

    def check_evolved(self):
        """After a forward of the model as calibration called it: warn (once) when it ran
        converted blocks but none that evolves tokens although the options ask for it (the
        evolving blocks were removed from the model after conversion: timm's
        ``prune_intermediate_layers``); the model then runs as the original, which is right,
        but not faster."""
        last, plan = getattr(self._local, "last", None), self.plan
        if last is None or self._idle_warned or plan.options.keep_ratio >= 1 or \
                "evolve" not in plan.roles or plan.roles.index("evolve") <= last:
            return
        self._idle_warned = True
        warnings.warn(f"evoplug: this forward ran converted blocks up to block {last} only, and the "
                      f"first that evolves tokens is block {plan.roles.index('evolve')}: no token was "
                      "sped up (were blocks removed after conversion? explain() lists them; convert "
                      "after removing blocks)", stacklevel=2)

    def push_entry(self, matches: bool, variant: Optional["SizeVariant"] = None,
                   images: Optional[int] = None, call: Optional[tuple] = None, frame=None):
        """A forward of the model starts on this thread: whether it is called as calibration
        called it, the twin it runs with, its images, ``call`` (the entry hook, the model and
        the call's arguments: what a twin for the call's argument form is converted from), and
        ``frame``, the frame that runs the forward (gone from the stack: the forward is over)."""
        local = self._local
        stack = getattr(local, "entry", None)
        if stack is None:
            stack = self._new_stacks(local)
        elif stack:
            self._drop_abandoned(admitted=1)
        # a forward inside a forward (the model called from a hook on one of its blocks): the
        # outer forward's state comes back when it ends (the outer forward's later blocks went
        # on from the inner one's scores, off by 0.59, until the twenty-fourth session), and so
        # does the state of the size twin the outer forward runs with, whose blocks keep theirs
        # on the twin's runtime (off by 0.04 at another size: audit C4 of the twenty-eighth)
        if stack:
            twin = local.variant[-1].runtime if local.variant[-1] is not None else None
            local.outer.append((self._forward_state(), twin,
                                twin._forward_state() if twin is not None else None))
        else:
            local.outer.append(None)
        local.ran = False
        if variant is not None:        # (a run of its blocks starts in this forward too)
            variant.runtime._local.ran = False
        stack.append(matches)
        local.frames.append(frame)
        self._local.variant.append(variant)
        self._local.images.append(images)
        self._local.call.append(call)

    def _new_stacks(self, local) -> list:
        """This thread's stacks of the model forwards it runs (empty); returns the entry stack."""
        local.entry, local.variant, local.images, local.call, local.outer = [], [], [], [], []
        local.frames = self._frames[threading.get_ident()] = []
        return local.entry

    def pop_entry(self):
        stack = getattr(self._local, "entry", None)
        if stack:
            stack.pop()
            self._local.frames.pop()
            self._local.variant.pop()
            self._local.images.pop()
            self._local.call.pop()
            outer = self._local.outer.pop()
            if outer is not None:
                mine, twin, theirs = outer
                self._set_forward_state(mine)
                if twin is not None:
                    twin._set_forward_state(theirs)

    def _drop_abandoned(self, admitted: int):
        """The forwards this thread had in progress that ended without the exit hook (a
        KeyboardInterrupt in a forward left its count, which held every twin build of another
        thread waiting forever, and the segment guard on the thread's torch-function stack:
        audit C4 of the twenty-eighth session) end now, as the exit hook ends a forward that
        raised. Called where a forward (``admitted``: 1, counted already) or a run of the blocks
        (0: a method such as ``forward_features``, which then counts itself) starts on a thread
        with forwards in progress."""
        frames = self._local.frames
        stale = 0
        # (the caller's frame, in no local: this frame holding its own frame object kept it
        # and, through f_back, every frame above alive past its return, with their tensors)
        while len(frames) > stale and not _on_stack(frames[-1 - stale], sys._getframe(1)):
            stale += 1
        for _ in range(stale):
            self.pop_entry()
        if stale:
            me = threading.get_ident()
            with self._gate:
                n = max(self._inside.get(me, 0) - stale, admitted)
                if n:
                    self._inside[me] = n
                else:
                    self._inside.pop(me, None)
                self._gate.notify_all()
            guard = getattr(self._local, "guard", None)
            if guard is not None and not self.entered() and (guard.watched or guard.on_stack):
                guard.finish(None, raised=True)

    def _forward_state(self) -> tuple:
        return tuple(getattr(self._local, k, None) for k in _FORWARD_STATE)

    def _set_forward_state(self, values: tuple):
        for k, v in zip(_FORWARD_STATE, values):
            setattr(self._local, k, v)

    def call(self) -> Optional[tuple]:
        """(entry hook, model, args, kwargs) of the model forward running on this thread."""
        stack = getattr(self._local, "call", None)
        return stack[-1] if stack else None

    def use_variant(self, variant: "SizeVariant"):
        """The rest of this thread's model forward runs with ``variant`` (a form twin, found by
        its first block that runs a program: runtime/twins.py ``_form_twin``)."""
        self._local.variant[-1] = variant
        variant.runtime._local.ran = False

    def images(self) -> Optional[int]:
        """The images of the model forward running on this thread (:func:`images_in`), None
        when unknown."""
        stack = getattr(self._local, "images", None)
        return stack[-1] if stack else None

    def variant(self) -> Optional["SizeVariant"]:
        """The size variant this thread's model forward runs with (None: the converted size)."""
        stack = getattr(self._local, "variant", None)
        return stack[-1] if stack else None

    def admit(self):
        """A forward of the model starts on this thread (it waits while another thread builds
        a size variant); so does a converted block called outside one (a method such as
        ``forward_features`` called directly: runtime/block.py), for the block's run. A thread
        admitted already goes on (a block called from a hook inside another): a build that began
        meanwhile waits for it, so waiting for the build would wait forever."""
        me = threading.get_ident()
        with self._gate:
            owner = self._owners.get(me)
            if owner is None or owner() is not threading.current_thread():
                # a thread that ended inside a forward left its count under an identifier
                # CPython gives the next thread (audit Q4 of the twenty-eighth session)
                self._inside.pop(me, None)
                self._owners[me] = weakref.ref(threading.current_thread())
            while self._builder is not None and self._builder != me and not self._inside.get(me):
                self._gate.wait()
            self._inside[me] = self._inside.get(me, 0) + 1

    def release(self):
        """A forward of the model ends on this thread."""
        me = threading.get_ident()
        with self._gate:
            n = self._inside.pop(me, 0) - 1
            if n > 0:
                self._inside[me] = n
            self._gate.notify_all()

    def _forget_abandoned(self):
        """(Gate held.) Threads counted inside a forward that they left without the exit hook
        (a KeyboardInterrupt) or that ended: they no longer hold a twin build back."""
        now = sys._current_frames()
        for tid in list(self._inside):
            frames = self._frames.get(tid)
            if tid not in now or (frames and not _on_stack(frames[0], now[tid])):
                del self._inside[tid]
                if tid not in now:
                    self._frames.pop(tid, None)

    def variant_for(self, key: tuple, factory: Callable, model, args, kwargs) -> "SizeVariant":
        """The variant for input ``key``, built once by ``factory(model, args, kwargs)`` (the
        conversion's) at the first forward with it, while no other thread runs the model (the
        analysis hooks and perturbs the modules the variant shares with it). A thread waiting
        here counts as idle: two threads that both need a variant do not wait for each other."""
        v = self.variants.get(key)
        if v is not None and not v.stale():
            return v
        me = threading.get_ident()
        with self._gate:
            mine = self._inside.pop(me, 0)
            if mine:            # a build waiting for this thread's forward to end goes on
                self._gate.notify_all()
            while self._builder is not None:
                self._gate.wait()
            v = self.variants.get(key)
            if v is not None and v.stale():
                del self.variants[key]
                v = None
            if v is None:
                self._builder = me
                while self._inside:            # the others' forwards end; new ones wait
                    if not self._gate.wait(1.0):
                        self._forget_abandoned()
            if mine:
                self._inside[me] = mine
        if v is not None:
            return v
        try:
            v = self.variants[key] = factory(model, args, kwargs)
        finally:
            with self._gate:
                self._builder = None
                self._gate.notify_all()
        return v

    @contextlib.contextmanager
    def between_builds(self):
        """Runs its body while no size variant is being built, and starts none meanwhile
        (set_options: a twin built meanwhile would keep the options its build read). A thread
        inside a forward counts as idle while it waits, as in :meth:`variant_for`."""
        me = threading.get_ident()
        with self._gate:
            mine = self._inside.pop(me, 0)
            if mine:
                self._gate.notify_all()
            while self._builder is not None and self._builder != me:
                self._gate.wait()
            if mine:
                self._inside[me] = mine
            yield

    # -- constants a forward needs (made once per device) -----------------------------------
    def ranks(self, num_prefix: int, device) -> Optional[torch.Tensor]:
        """(1, 1, P) rank constants of the prefix tokens (None without prefix tokens)."""
        if not num_prefix:
            return None
        return self._const(("ranks", num_prefix, device), lambda: prefix_ranks(num_prefix, device))

    def score_weight(self, alpha, num_prefix: int, n: int, device):
        """The trade-off alpha of the score update for [prefix, kept] entries: 0 at the P prefix
        entries (their rank constants stay exact), alpha at the others ((1, 1, n), or alpha
        itself without prefix tokens). A callable alpha (learnable) is read at each update."""
        if not callable(alpha):
            if not num_prefix:
                return alpha
            return self._const(("alpha", alpha, num_prefix, n, device),
                               lambda: _masked(alpha, num_prefix, n, device))
        a = read_trade_off(alpha)
        if not num_prefix:
            return a
        return self._const(("mask", num_prefix, n, device), lambda: _masked(1.0, num_prefix, n, device)) * a

    def _const(self, key, make):
        if torch.compiler.is_compiling():     # made inside the graph (constant-folded)
            return make()
        t = self._consts.get(key)
        if t is None:
            # never an inference tensor (made in an inference_mode validation pass): a learnable
            # trade-off's mask is saved for backward by every later training step
            with torch.inference_mode(False):
                t = self._consts[key] = make()
        return t

    # -- recomputation in backward --------------------------------------------------------
    def record(self, t: torch.Tensor, state: EvoState):
        """Remember that ``t`` (a block's input or output) goes with ``state``; forgotten when
        ``t`` is freed. A segment's ``out`` is dropped from what is kept: it is ``t`` itself (or
        the input of the block ``t`` came out of), and holding it here, or in ``t``'s autograd
        node, would keep ``t`` and its whole graph alive (a step's worth of memory per training
        step)."""
        seg = state.segment
        if seg is not None and seg.out is not None:
            state = state._replace(segment=seg._replace(out=None))
        fn = t.grad_fn
        if fn is not None:
            fn.metadata[_GRAD_FN_KEY] = state
        _remember(self._recorded, t, state)

    def note_ran(self, x: torch.Tensor, blocks, out=None, replace: bool = True):
        """A converted block's call on tokens ``x`` ran the blocks of a size twin (``blocks``,
        ``SizeVariant.blocks``; None: the model's own), in a forward of the model or in its
        recomputation in backward: the recomputation of a block checkpointed on ``x``, and of
        the blocks downstream of its output ``out`` recomputed on tokens recomputed from it (a
        stage checkpointed whole), runs the same ones (:meth:`ran_with`). ``replace``: not
        where a twin's block that the call ran said so already."""
        if x is not None:
            _remember(self._ran, x, blocks)
        t = first_tensor(out)
        fn = t.grad_fn if t is not None else None
        if fn is not None and (replace or _RAN_KEY not in fn.metadata):
            fn.metadata[_RAN_KEY] = (weakref.ref(self), blocks)

    def ran_with(self, x: torch.Tensor):
        """The blocks a call on tokens ``x`` ran in its forward (:meth:`note_ran`): a twin's,
        None (the model's own), or ``NOT_NOTED``; for tokens computed from the output of a
        call, a twin's that the nearest such call upstream ran (one that ran the model's own
        block says nothing of this one: a form twin takes over in the middle of a forward)."""
        entry = self._entry(x, self._ran)
        if entry is not None:
            return entry[1]
        for fn in _upstream(x.grad_fn):
            ran = fn.metadata.get(_RAN_KEY)
            if ran is not None and ran[0]() is self:
                return NOT_NOTED if ran[1] is None else ran[1]
        return NOT_NOTED

    def record_checkpointed(self, state: EvoState, index: int):
        """Block ``index`` starts from ``state`` inside the forward of reentrant checkpoints:
        remembered with those of their inputs that go with no block yet (it is their first
        converted block), for its recomputation, whose input may trace back to them only: a
        stage checkpointed whole whose input is no block's output (PVTv2's, after the stage
        before's norm and reshape, raised in backward until the forty-fourth session)."""
        for t in _reentrant_inputs():
            if self._entry(t, self._checkpointed) is None:
                _remember(self._checkpointed, t, state, index)

    def recall(self, t: torch.Tensor, index: Optional[int] = None) -> Optional[EvoState]:
        """The state recorded with ``t`` (or an alias of it), else the state of the nearest
        block upstream of ``t`` in the autograd graph; else, for block ``index``, the state it
        started from as the first block of a reentrant checkpoint whose input the graph ends
        at; None when there is none."""
        entry = self._entry(t)
        if entry is not None:
            return entry[1]
        leaves = [t]
        for fn in _upstream(t.grad_fn):
            state = fn.metadata.get(_GRAD_FN_KEY)
            if state is not None:
                return state
            var = getattr(fn, "variable", None)     # a leaf (reentrant checkpointing's inputs)
            entry = self._entry(var) if isinstance(var, torch.Tensor) else None
            if entry is not None:
                return entry[1]
            if isinstance(var, torch.Tensor):
                leaves.append(var)
        entries = (self._entry(leaf, self._checkpointed) for leaf in leaves)
        return next((e[1] for e in entries if e is not None and e[2] == index), None)

    def _entry(self, t: torch.Tensor, store: Optional[dict] = None):
        try:
            entry = (self._recorded if store is None else store).get(_tensor_key(t))
        except RuntimeError:
            return None
        return entry if entry is not None and entry[0]() is not None else None


def _upstream(fn):
    """The autograd nodes from ``fn`` up the graph, breadth first, each once (at most
    ``_MAX_GRAPH_SEARCH`` of them)."""
    todo, seen = collections.deque([fn]), set()
    while todo and len(seen) < _MAX_GRAPH_SEARCH:
        fn = todo.popleft()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        yield fn
        todo.extend(f for f, _ in fn.next_functions)


def _remember(store: dict, t: torch.Tensor, *values):
    """``store[t's key] = (a weak reference to t, *values)``, forgotten when ``t`` is freed."""
    try:
        key = _tensor_key(t)
    except RuntimeError:    # no storage (a wrapper subclass): the autograd node must do
        return

    def forget(_, key=key):
        entry = store.get(key)
        if entry is not None and entry[0]() is None:
            store.pop(key, None)

    store[key] = (weakref.ref(t, forget), *values)


def _masked(alpha: float, num_prefix: int, n: int, device) -> torch.Tensor:
    w = torch.full((1, 1, n), float(alpha), dtype=torch.float32, device=device)
    w[..., :num_prefix] = 0.0
    return w
