"""What the analysis' forwards leave behind, and how it is put back.

The conversion runs the model (a calibration forward, the probes of every block: 13 forwards,
and as many again for each twin built at a new input size). Those forwards may change the
model's own state: a counter, a quantisation observer's range, a table cached for the last
input size with the size it was made for, a layer that sets its shift to 0 when the map fits its
window. :func:`snapshot` records it before; :func:`restore` puts back all of it, so that the
converted model starts from the state the user's model was in.
"""
from __future__ import annotations

import copy
from typing import List

import torch
from torch import nn

from .probes import _HOOK_DICTS

#: torch's own bookkeeping in every module's ``__dict__`` (hooks, parameters, ...)
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"training"}
_CONTAINERS = (list, dict, set)
_MISSING = object()


def own_state(m: nn.Module) -> dict:
    """A module's own attributes (not torch's bookkeeping, not evoplug's)."""
    return {k: v for k, v in vars(m).items()
            if k not in _MODULE_INTERNALS and not k.startswith("_evoplug")}


def snapshot(model: nn.Module) -> List[tuple]:
    """For every module: (module, [(name, buffer, a copy of its values)], its own attributes
    (containers as shallow copies, everything else by identity), {name: a copy of the values}
    of the attributes that are tensors, {hook dict: the ids of its hooks})."""
    from torch.nn.parameter import is_lazy
    saved = []
    for m in model.modules():
        attrs = own_state(m)
        saved.append((m, [(k, b, b.detach().clone()) for k, b in m._buffers.items()
                          if b is not None and not is_lazy(b)],
                      {k: copy.copy(v) if isinstance(v, _CONTAINERS) else v for k, v in attrs.items()},
                      {k: v.detach().clone() for k, v in attrs.items()
                       if isinstance(v, torch.Tensor) and not is_lazy(v)},
                      {name: set(vars(m)[name]) for name in _HOOK_DICTS if name in vars(m)}))
    return saved


def _same(old, new) -> bool:
    """Whether an attribute is as it was: plain values by value, containers and tuples item by
    item (the items by identity), anything else by identity."""
    if old is new:
        return True
    if type(old) is not type(new):
        return False
    if isinstance(old, dict):
        return old.keys() == new.keys() and all(old[k] is new[k] for k in old)
    if isinstance(old, (list, tuple)):
        return len(old) == len(new) and all(a is b or _same(a, b) for a, b in zip(old, new))
    if isinstance(old, (set, bool, int, float, str)):
        return old == new
    return False


def restore(saved: List[tuple]):
    """Put back everything the forwards since :func:`snapshot` changed: every module's own
    attributes (plain values, containers in place, objects they replaced), the values of its
    tensor attributes and buffers. All of it: a flag put back without the table it says is
    filled, or a size key put back beside the table cached for another size, leaves a model
    that is wrong or fails at its next call (audits U4, U6, thirty-sixth session; V0,
    thirty-seventh). An object changed in place (not a tensor, not a list, dict or set) is not
    seen. Hooks the forwards installed and left (transformers' output-capturing hooks, with
    their flag ``_output_capturing_hooks_installed``) go too: the flag put back alone had
    transformers install its hooks a second time, every hidden state returned twice."""
    for m, _, attrs, tensors, hooks in saved:
        for name, ids in hooks.items():
            d = vars(m).get(name)
            for hook_id in [h for h in d or () if h not in ids]:
                del d[hook_id]
        now = own_state(m)
        for k in now.keys() | attrs.keys():
            old, cur = attrs.get(k, _MISSING), now.get(k, _MISSING)
            if old is _MISSING:
                del vars(m)[k]
            elif cur is _MISSING or not _same(old, cur):
                if isinstance(old, _CONTAINERS) and type(cur) is type(old):
                    cur.clear()          # (in place: others may hold the container)
                    cur.extend(old) if isinstance(cur, list) else cur.update(old)
                else:
                    vars(m)[k] = old
        _put_back([(vars(m), k, attrs[k], values) for k, values in tensors.items()])
    _put_back([(m._buffers, k, b, values) for m, bufs, *_ in saved for k, b, values in bufs])


def _put_back(entries: list):
    """Each tensor back in its place with its values: written in place, or replaced by the copy
    where it cannot be (an inference tensor, a tensor made by ``expand``)."""
    with torch.no_grad():
        for where, k, t, values in entries:
            where[k] = t
            if t.shape == values.shape and torch.equal(t, values):
                continue
            try:
                if t.shape != values.shape:
                    t.resize_(values.shape)
                t.copy_(values)
            except RuntimeError:
                where[k] = values
