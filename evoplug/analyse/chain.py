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
from typing import List, Optional, Sequence

import torch

from .block import BlockAnalysis
from .calibrate import CallRecord


def chain_links(analysed: Sequence[BlockAnalysis], calls: CallRecord) -> List[Optional[int]]:
    """For each analysed block (in execution order), the index of the block that takes its
    output and nothing else does, or None."""
    links: List[Optional[int]] = [None] * len(analysed)
    known = _record_containers(calls)
    gc.collect()      # argument dicts the analysis bound and dropped (in reference cycles)
    for i in range(len(analysed) - 1):
        a, b = analysed[i], analysed[i + 1]
        if _can_hand_on(a) and _can_hand_on(b) and a.num_prefix == b.num_prefix \
                and a.num_tokens == b.num_tokens and _feeds_only(a, b, calls, known):
            links[i] = i + 1
    return links


def _can_hand_on(a: BlockAnalysis) -> bool:
    """A (B, N, C) block whose programs need only its subset (no whole input, no map)."""
    return not (a.token_map or a.uses_full) and a.call is not None


def _feeds_only(a: BlockAnalysis, b: BlockAnalysis, calls: CallRecord, known) -> bool:
    ca, cb = calls.get(id(a.module)), calls.get(id(b.module))
    if ca is None or cb is None or ca.n_calls != 1 or cb.n_calls != 1:
        return False
    out = ca.output
    if not isinstance(out, torch.Tensor) or id(out) in calls.returned:
        return False
    x, _ = b.plan.bind(b.name, cb.args, cb.kwargs)
    if x is not out:
        return False
    if any(id(b.module) not in stack for stack in calls.uses.get(id(out), ())):
        return False
    return all(id(r) in known for r in gc.get_referrers(out))


def _record_containers(calls: CallRecord) -> set:
    """The calibration record's own containers of call arguments and outputs."""
    ids = set()
    for c in calls.values():
        ids.update((id(c.__dict__), id(c.args), id(c.kwargs)))
    return ids
