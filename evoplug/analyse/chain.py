"""Which converted blocks feed only the next one: there, a block may hand its slow-path tokens
straight to the next block instead of restoring every token (runtime/block.py, segments).

Evidence from the calibration forward (analyse/calibrate.py), all of it required:
* the next converted block was called with this block's output object as its token argument;
* every torch function that took that output ran inside the next block;
* the model did not return it, and nothing but the calibration record still holds it (no
  list or attribute a model keeps its intermediate outputs in).
The runtime adds what only a call can tell (runtime/block.py: ``_hands_on``): the model's own
``forward`` is running (not ``forward_intermediates``), no hooks, no autograd.

Also which converted blocks take as many tokens as the block before but not its output row by
row (:func:`fresh_token_blocks`: a decoder after its encoder): their scores start afresh.
"""
from __future__ import annotations

import gc
import sys
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .block import BlockAnalysis
from .calibrate import CallRecord, ModuleCall, noise
from .provenance import _inputs_seen, _unchanged_rows


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


def fresh_token_blocks(model: nn.Module, example_input, analysed: Sequence[BlockAnalysis]) -> List[int]:
    """Positions of the analysed blocks (in execution order) whose tokens, as many as the block
    before's, are not that block's output row by row: another width, other special tokens, rows
    reordered or replaced on the way (MAE's decoder: the encoder ran the patches in the noise's
    shuffled order, the decoder in the image's; CLIPSeg's and Hiera's decoders on projected
    tokens). Their scores start afresh (api.plan_roles); where the count changes, the grids
    decide. A block called with the output itself carries it (or with the tokens the block before
    took, that tensor or a copy: blocks side by side), one of another shape does not;
    where the shapes are equal (a position encoding, a projection, a reordering), one eager
    forward (eval, no grad) tells: each such block before hands on its calibration output with
    noise on a quarter of its patch rows, and those rows must change in the next block's input
    at their own places (a depthwise convolution between them, Twins' position encoding,
    changes their neighbours too). A forward the noise breaks starts them afresh."""
    fresh, check = [], {}
    for i in range(1, len(analysed)):
        a, b = analysed[i - 1], analysed[i]
        out, x = _first(a.call.output), b.call.raw_tokens()
        if a.num_tokens != b.num_tokens or a.call.n_calls != 1 or b.call.n_calls != 1 or x is out \
                or not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor) \
                or _same_tokens(x, a.call.raw_tokens()):
            # (the output itself; or the tokens the block before took, that tensor or a copy:
            # blocks side by side on the same tokens share its selection)
            continue
        if _rows(a.call, out).shape != _rows(b.call, x).shape \
                or (a.num_prefix, a.num_suffix) != (b.num_prefix, b.num_suffix):
            fresh.append(i)
        else:
            M = a.num_tokens - a.num_prefix - a.num_suffix
            order = torch.randperm(M, generator=torch.Generator().manual_seed(i))
            check[i] = a.num_prefix + order[:max(1, M // 4)]
    if check:
        carried = _rows_carried(model, example_input, analysed, check)
        fresh += [i for i in check if i not in carried]
    return sorted(fresh)


def _same_tokens(x: torch.Tensor, y) -> bool:
    return x is y or (isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y))


def _rows_carried(model: nn.Module, example_input, analysed, check: Dict[int, torch.Tensor]) -> set:
    """Of the positions ``check`` (block -> patch rows of the block before's output to noise),
    those whose input changes at every one of those rows (see :func:`fresh_token_blocks`).
    Where every patch row changed, the rows may differ from call to call (MAE shuffling by a
    noise it draws itself): carried only if the outputs handed on without noise give the
    block its calibration input again."""
    changed = _changed_rows(model, example_input, analysed, check)
    carried = {i for i, ch in changed.items() if ch[check[i]].all()}
    every = {i: check[i][:0] for i in carried if changed[i][
        analysed[i].num_prefix:analysed[i].num_tokens - analysed[i].num_suffix].all()}
    if every:
        again = _changed_rows(model, example_input, analysed, every)
        carried -= {i for i in every if i not in again or again[i].any()}
    return carried


def _changed_rows(model: nn.Module, example_input, analysed, check: Dict[int, torch.Tensor]) -> dict:
    """Position -> which rows of the block's input (N,) change in one eager forward (eval, no
    grad) in which the block before each returns its calibration output with noise on the
    ``check`` rows; {} where the model cannot take it."""
    seen = _inputs_seen(model, example_input, {i: analysed[i].module for i in check}, check,
                        calls={i: analysed[i].call for i in check},
                        outputs={analysed[i - 1].module: _handing_on(analysed[i - 1].call, rows, i)
                                 for i, rows in check.items()})
    if seen is None:    # noise the model cannot take: none is known to carry
        return {}
    out = {}
    for i in check:
        c = analysed[i].call
        x, y = _rows(c, c.raw_tokens()), seen.get(i)
        if isinstance(y, torch.Tensor) and _rows(c, y).shape == x.shape:
            out[i] = ~_unchanged_rows(x, _rows(c, y))
    return out


def _handing_on(call: ModuleCall, rows: torch.Tensor, seed: int):
    """A forward hook that makes a block return its calibration output (``call.output``) with
    noise on the token ``rows``."""
    def hook(_m, _args, out):
        t = _first(call.output)
        v = call.tokens(t)
        flat = v.reshape(v.shape[0], -1, v.shape[-1])
        mask = torch.zeros(flat.shape[1], dtype=torch.bool, device=t.device)
        mask[rows.to(t.device)] = True
        y = torch.where(mask[:, None], noise(flat, seed), flat).reshape(v.shape)
        if call.token_perm:
            y = y.permute(sorted(range(y.dim()), key=call.token_perm.__getitem__))
        y = torch.empty_like(t).copy_(y)
        return (y, *out[1:]) if isinstance(out, (tuple, list)) else y
    return hook


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) and out else out


def _rows(call: ModuleCall, t: torch.Tensor) -> torch.Tensor:
    """``t`` in a block's layout as (B, N, C) token rows (a (B, H, W, C) map flattened)."""
    v = call.tokens(t)
    return v.flatten(1, -2) if v.dim() == 4 else v
