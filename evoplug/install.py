"""The install step of a conversion: each converted block's class swapped for its evolving
subclass, with the :class:`~evoplug.runtime.spec.BlockSpec` it runs by (its programs, the
plain values its traced code read and set, and those code outside it sets), and the special
tokens the model's boolean arguments count (read by the entry hook). Called by
:mod:`evoplug.api` once nothing can fail any more."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import nn

from .analyse.block import BlockAnalysis
from .analyse.calibrate import plain_attributes
from .integrations import registry
from .rewrite.program import batch_program_factory
from .runtime.block import evo_class
from .runtime.entry import row_counts
from .runtime.spec import (BlockSpec, FlatTokens, MapTokens, leaf_groups, traced_state, traced_writes,
                           under)
from .runtime.state import EvoRuntime


def suffix_counts(specs, named) -> Tuple[Tuple[str, bool, str], ...]:
    """(argument, value, block) where a block's trailing special tokens are as many as the entries
    equal to ``value`` in every row of a boolean argument of the model's (recorded on the spec,
    ``suffix_from``). VideoMAE's pre-training decoder trails its mask tokens after the visible
    ones, as many as ``bool_masked_pos`` has True per row: that count follows the call, and the
    entry hook reads it as part of the input size (entry.counted; a call with another count
    kept the conversion's, ranking mask tokens as patches, until audit B1 of the forty-first
    session). A coincidental match costs a twin at another count, never a wrong output."""
    masks = [(n, t) for n, t in (named or {}).items()
             if t.dtype == torch.bool and t.dim() >= 2 and t.shape[0]]
    found = []
    for spec in specs:
        for n, t in masks if spec.num_suffix else ():
            for value in (True, False):
                if row_counts(t, value) == (spec.num_suffix, spec.num_suffix):
                    spec.suffix_from += ((n, value),)
                    if (n, value) not in [f[:2] for f in found]:
                        found.append((n, value, spec.name))
    return tuple(found)


def install_block(index: int, a: BlockAnalysis, programs, buffers_before, runtime: EvoRuntime,
             volatile=None, images: Optional[int] = None, set_by=None, filled=None) -> BlockSpec:
    """Swap the block's class and hand it what it needs at run time (``filled``: the caches a
    forward filled, analyse/calibrate.py ``filled_with_tensors``: not watched)."""
    module = a.module
    x = a.plan.bind(a.name, a.call.args, a.call.kwargs)[0]
    per_image = x.shape[0] // images if images and x.shape[0] % images == 0 else None
    volatile = with_recorded(volatile, module, a.python_writes, set_by)
    # (a tensor its forward sets, analyse/writes.py tensors_set, is no size it records)
    sizes = any(not isinstance(v, torch.Tensor) for *_, v in a.python_writes)
    spec = BlockSpec(
        index, a.name, a.plan, a.num_prefix, a.grid, MapTokens if a.token_map else FlatTokens,
        a.row_full, runtime, programs, type(module), analysis=a, batch_size=a.batch_size,
        program_factory=None if a.batch_size is None else batch_program_factory(a, type(module)),
        inner=tuple(module.get_submodule(p) for p in a.attention_paths if p),
        leaves=leaf_groups(p for p in a.leaf_paths if p),
        added_buffers=tuple(n for n in module._buffers if n not in buffers_before),
        buffer_values={n: t.detach().cpu().clone() for n, t in module._buffers.items()
                       if n not in buffers_before and t is not None},
        needs_pos=a.uses_pos or bool(a.plan.tensor_args),
        returns=type(a.call.output) if isinstance(a.call.output, (tuple, list)) else None,
        idle_hook=registry.hook_is_idle, family_hook=registry.hook_is_family,
        maps_collected=registry.maps_collected if a.token_rest and not a.windowed else None,
        num_suffix=a.num_suffix, whole_args=a.whole_args,
        batch_args=a.batch_args,
        traced=traced_state(module, a.attention_paths, plain_attributes, volatile, a.leaf_paths,
                            functools.partial(registry.traced_settings, converting=True), filled),
        settings_of=registry.traced_settings, extra_shapes=dict(a.extra_shapes),
        per_image=per_image, windowed_tokens=a.num_tokens if a.windowed and not a.token_map else None,
        writes_at=tuple(x.shape[1:]) if sizes else None,
        state_from_tokens=a.state_from_tokens, sets_own=a.sets_own)
    leaf_writes, spec.leaf_values = leaf_state(module, a.leaf_paths, volatile, set_by)
    spec.leaf_reads = read_values(module, a.leaf_reads, spec.leaf_values, spec.traced, set_by)
    spec.writes = traced_writes(spec.traced, volatile) + leaf_writes
    spec.set_outside = set_outside(module, spec.writes, set_by)
    spec.python_tensors = tuple(
        (p, k, m, m.__dict__[k], m.__dict__[k]._version) for p, k, _ in a.python_tensors
        if not under(p, [q for q in a.leaf_paths if q]) and isinstance(
            (m := module.get_submodule(p)).__dict__.get(k), torch.Tensor))
    module.__class__ = evo_class(type(module))
    module._evoplug_spec = spec
    del a.call  # do not keep the calibration tensors alive
    return spec


def set_outside(block: nn.Module, writes, set_by) -> tuple:
    """(name, value) of the plain attributes of the block and of the modules it traced into
    that code outside it set at the calibration (a parent's ``blk.H, blk.W = H, W`` before each
    call, or ``blk.dw.H = H``: name ``dw.H``; ``set_by``: analyse/writes.py
    ``recorded_assignments``), with the value its programs were traced with (``writes``): they
    take calls only while the block holds that value (runtime/twins.py ``_bound``). A value set
    on a submodule was left out until audit D3 of the fiftieth session: a compiled call at
    another size ran the programs' reshape to the conversion's map (a raw error), or was
    refused as the user's change."""
    inside = {id(m) for m in block.modules()}
    found = []
    for path, name, value in writes:
        who = (set_by or {}).get((id(vars(block.get_submodule(path))), name))
        if who and not who & inside:
            found.append((f"{path}.{name}" if path else name, value))
    return tuple(found)


def with_recorded(volatile, block: nn.Module, recorded, set_by=None) -> dict:
    """``volatile`` ({id(module): {name: value}}, the plain attributes the calibration's
    forward changed) with the plain values the block's own code assigned at the calibration,
    changed or not (``set_by``: analyse/writes.py ``recorded_assignments``; a parent's ``blk.H
    = H`` is not the block's), and the Python values its forward sets from its traced values (a
    size it records: analyse/writes.py ``python_writes``): its programs set them at each call.
    A size passed in as an int (``forward(x, H, W)``: ``self.H, self.W = H, W``) is a constant
    to the trace, and one assigned the value it held already (the model ran at the conversion's
    size before, ``__init__`` set it) changed nothing: no program set it, and the block kept
    the conversion's size after a call at another size (audit L2 of the forty-seventh session;
    a traced size, until audit K6 of the forty-sixth)."""
    out = dict(volatile or {})
    inside = {id(m) for m in block.modules()}
    for m in block.modules():
        assigned = {k: v for k, v in plain_attributes(m).items()
                    if (set_by or {}).get((id(vars(m)), k), set()) & inside}
        if assigned:
            out[id(m)] = {**assigned, **out.get(id(m), {})}     # (the calibration's, if changed)
    for path, name, value in recorded:
        m = block.get_submodule(path)
        out[id(m)] = {**out.get(id(m), {}), name: value}
    return out


def leaf_state(block: nn.Module, leaf_paths, volatile, set_by) -> Tuple[tuple, tuple]:
    """Of the modules the programs call whole (``leaf_paths``, and those inside them): (the
    plain values the block's traced code set on them at the calibration, ``self.scale.g =
    0.5``, as (path, name, value): its programs set them too, before they call the module,
    which reads them live (BlockSpec.writes); the other plain values they hold now, as (path,
    name, value), but those their own code set (a counter): where the block's code reads one,
    its programs hold that value (BlockSpec.leaf_values)). The programs set none until audit D6
    of the fiftieth session: a `Scale` whose `g` the block's forward set held `__init__`'s
    value, 3.45 off the dense model at keep 1.0 off the fast path."""
    leaves = [p for p in leaf_paths if p]
    named = list(block.named_modules(remove_duplicate=False))
    code = {id(m) for path, m in named if not under(path, leaves)}      # (whose code the trace ran)
    writes, values, seen = [], [], set()
    for path, m in named:
        if not under(path, leaves) or id(m) in seen:
            continue
        seen.add(id(m))
        set_here = (volatile or {}).get(id(m), {})
        for k, v in plain_attributes(m).items():
            who = (set_by or {}).get((id(vars(m)), k), set())
            if who & code and k in set_here:
                writes.append((path, k, set_here[k]))
            elif not who:
                values.append((path, k, v))
    return tuple(writes), tuple(values)


def read_values(block: nn.Module, reads, leaf_values, traced, set_by) -> tuple:
    """For :attr:`BlockSpec.leaf_reads`: (path parts, name, value) of each plain value the
    block's traced code read (``reads``: (path, name)) from a module its programs hold no code
    of: one they call whole (``leaf_values``), or one whose other method the block's code calls
    (``self.ls2.scale_for(x)``, which the trace ran as Python: no module call, so neither whole
    nor traced into; unseen until the fifty-second session). Not values some code set at the
    calibration (``set_by``), which the programs set as that code did."""
    values = {(p, k): v for p, k, v in leaf_values}
    held = {e[2] for e in traced}
    out = []
    for p, k in sorted(reads):
        if (p, k) not in values and p not in held:
            m = block.get_submodule(p)
            plain = plain_attributes(m)
            if (id(vars(m)), k) not in (set_by or {}) and k in plain:
                values[p, k] = plain[k]
        if (p, k) in values:
            out.append((tuple(p.split(".")), k, values[p, k]))
    return tuple(out)
