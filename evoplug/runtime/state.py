"""Per-forward state of a converted model and how it travels.

:class:`EvoState` is what one forward carries from block to block (immutable); :class:`Plan`
the options and roles a forward runs with; :class:`EvoRuntime` (one per converted model)
passes the state on, per thread, and records it in training so gradient checkpointing
recomputes a block with the state of its own forward (see docs/guarantees.md).
"""
from __future__ import annotations

import collections
import threading
import weakref
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from ..options import EvoOptions


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
