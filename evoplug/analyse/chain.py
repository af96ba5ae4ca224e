"""Which converted blocks feed only the next one: there, a block may hand its slow-path tokens
straight to the next block instead of restoring every token (runtime/block.py, segments).

Evidence from the calibration forward (analyse/calibrate.py), all of it required:
* the next converted block was called with this block's output object as its token argument;
* every torch function that took that output ran inside the next block;
* the model did not return it, and nothing but the calibration record still holds it (no
  list or attribute a model keeps its intermediate outputs in).
The runtime adds what only a call can tell (runtime/block.py: ``_hands_on``): the model's own
``forward`` is running (not ``forward_intermediates``), no hooks, no autograd.
"""
from __future__ import annotations

import gc
import sys
from typing import List, Optional, Sequence

import torch

from .block import BlockAnalysis
from .calibrate import CallRecord


def chain_links(analysed: Sequence[BlockAnalysis], calls: CallRecord) -> List[Optional[int]]:
    """For each analysed block (in execution order), the index of the block that takes its
    output and nothing else does, or None."""
    pairs = [i for i in range(len(analysed) - 1)
             if _can_hand_on(analysed[i]) and _can_hand_on(analysed[i + 1])
             and analysed[i].num_prefix == analysed[i + 1].num_prefix
             and analysed[i].num_suffix == analysed[i + 1].num_suffix
             and analysed[i].num_tokens == analysed[i + 1].num_tokens
             and _feeds_only(analysed[i], analysed[i + 1], calls)]
    held = _held_elsewhere([calls[id(analysed[i].module)].output for i in pairs], calls)
    links: List[Optional[int]] = [None] * len(analysed)
    for i in pairs:
        if id(calls[id(analysed[i].module)].output) not in held:
            links[i] = i + 1
    return links


def _held_elsewhere(outputs, calls: CallRecord) -> set:
    """ids of the ``outputs`` that something other than the calibration record refers to (a
    list or attribute a model keeps its intermediate outputs in): one scan of the objects, and
    one more after a garbage collection when the first finds a stranger (it may be garbage in a
    reference cycle)."""
    if not outputs or _held_by_the_record_alone(outputs, calls):
        return set()
    held = _strangers(outputs, calls)
    if held:
        gc.collect()
        held = _strangers(outputs, calls)
    return held


def _held_by_the_record_alone(outputs, calls: CallRecord) -> bool:
    """Whether each output's reference count is the references the record's own containers
    and ``outputs`` hold, counted object by object: then nothing else refers to it, without
    the scan of every object in the process (``gc.get_referrers``: 50 ms in a process holding
    many models, more beside a dataset of Python objects; twins are converted inside a
    training forward). Any other reference, even one the scan would accept, makes the count
    higher and sends the outputs to the scan."""
    known = dict.fromkeys((id(o) for o in outputs), 1)          # (the list ``outputs``)
    for c in calls.values():
        for held in (c.__dict__.values(), c.args, c.kwargs.values()):
            for v in held:
                if id(v) in known:
                    known[id(v)] += 1
    baseline = _references_beyond([object()], {})
    return _references_beyond(outputs, known) == [baseline[0]] * len(outputs)


def _references_beyond(objects, known: dict) -> list:
    """sys.getrefcount of each object less its ``known`` references (1 when not given: the
    list); what is left is this frame's own (the same for every object, whatever the Python)."""
    return [sys.getrefcount(o) - known.get(id(o), 1) for o in objects]


def _strangers(outputs, calls: CallRecord) -> set:
    known = _record_containers(calls)
    ids = {id(o) for o in outputs}
    held = set()
    for r in gc.get_referrers(*outputs):
        if id(r) in known or r is outputs:
            continue
        if not isinstance(r, (dict, list, tuple)):
            return ids        # an object of another kind: trust none
        held.update(id(v) for v in (r.values() if isinstance(r, dict) else r) if id(v) in ids)
    return held


def _can_hand_on(a: BlockAnalysis) -> bool:
    """A (B, N, C) block whose programs need only its subset (no whole input, no map), and
    whose programs per batch size are traced on a call of all its tokens (a one-window block,
    analyse/one_window.py, is traced as windowed attention first: MMPretrain's Swin asserts
    the map's size on its tokens)."""
    return not (a.token_map or a.uses_full or a.one_window) and a.call is not None


def _feeds_only(a: BlockAnalysis, b: BlockAnalysis, calls: CallRecord) -> bool:
    ca, cb = calls.get(id(a.module)), calls.get(id(b.module))
    if ca is None or cb is None or ca.n_calls != 1 or cb.n_calls != 1:
        return False
    out = ca.output
    if not isinstance(out, torch.Tensor) or id(out) in calls.returned:
        return False
    x, _ = b.plan.bind(b.name, cb.args, cb.kwargs)
    if x is not out:
        return False
    return all(id(b.module) in stack for stack in calls.uses.get(id(out), ()))


def _record_containers(calls: CallRecord) -> set:
    """The calibration record's own containers of call arguments and outputs."""
    ids = set()
    for c in calls.values():
        ids.update((id(c.__dict__), id(c.args), id(c.kwargs)))
    return ids
