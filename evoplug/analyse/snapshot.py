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
import random
from typing import List, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from .writes import is_number, nested_containers

#: torch's own bookkeeping in every module's ``__dict__`` (hooks, parameters, ...)
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"training"}
_CONTAINERS = (list, dict, set)
_MISSING = object()
#: a module's dicts of the hooks that run around its calls
CALL_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                   "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                   "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def own_state(m: nn.Module) -> dict:
    """A module's own attributes (not torch's bookkeeping, not evoplug's)."""
    return {k: v for k, v in vars(m).items()
            if k not in _MODULE_INTERNALS and not k.startswith("_evoplug")}


#: buffers the analysis itself registers on a block (traced constants, window indices, taps):
#: they stay, the program reads them
_OWN_BUFFERS = ("_tensor_constant", "_evo_")


def snapshot(model: nn.Module) -> List[tuple]:
    """For every module: (module, its class, [(name, buffer or None, a copy of its values)], the
    non-persistent buffer names, its own attributes (containers as shallow copies, everything
    else by identity), {name: a copy of the values} of the attributes that are tensors, its
    children's names, {hook dict: a copy}, the containers nested in its containers, each with
    a shallow copy: analyse/writes.py ``nested_containers``, put back in place too: a twin
    built at another input size left a nested dict as its calibration had set it, and the next
    call was refused as the user's change, until the fiftieth session). Of a TorchScript
    module (``torch.jit.script``, whose forward sets no Python attribute) the values of its buffers alone: its ``_modules``
    and ``_buffers`` are TorchScript's, which cannot be iterated (a raw ``KeyError: 0`` until
    audit H4 of the forty-fourth session)."""
    from torch.nn.parameter import is_lazy
    saved = []
    for m in model.modules():
        if isinstance(m, torch.jit.ScriptModule):   # (a leaf: no Python state, no hooks)
            saved.append((m, type(m), [(k, b, b.detach().clone()) for k, b in
                                       m.named_buffers(recurse=False)], set(), {}, {}, set(), {}, []))
            continue
        attrs = own_state(m)
        saved.append((m, type(m),
                      [(k, b, None if b is None or is_lazy(b) else b.detach().clone())
                       for k, b in m._buffers.items()],
                      set(m._non_persistent_buffers_set),
                      {k: copy.copy(v) if isinstance(v, _CONTAINERS) else v for k, v in attrs.items()},
                      {k: v.detach().clone() for k, v in attrs.items()
                       if isinstance(v, torch.Tensor) and not is_lazy(v)},
                      set(m._modules),
                      {name: dict(vars(m)[name]) for name in CALL_HOOK_DICTS if name in vars(m)},
                      [(c, before) for _, c, before in nested_containers(attrs)]))
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
    tensor attributes and buffers, buffers they registered, filled (``None`` before) or removed,
    children they made in place of an attribute, and its hooks (those the forwards installed
    and left, transformers' output-capturing hooks with their flag, go; the flag put back alone
    doubled every hidden state; a hook that removed itself comes back). All of it: a flag put
    back without the table it says is filled, or a size key put back beside the table cached
    for another size, leaves a model that is wrong or fails at its next call (audits U4, U6,
    thirty-sixth session; V0, V6, thirty-seventh). A module whose class the forwards changed (a
    lazy module materialised) keeps its new state. Not seen: an object other than a tensor or
    a container changed in place, attributes in ``__slots__``, modules outside the module tree."""
    tensors = []
    for m, cls, bufs, non_persistent, attrs, values, children, hooks, nested in saved:
        if type(m) is not cls:
            continue
        if isinstance(m, torch.jit.ScriptModule):   # (its buffers' values, in place)
            tensors += [({}, k, b, values) for k, b, values in bufs]
            continue
        for name, before in hooks.items():
            d = vars(m).get(name)
            if d is not None and (d.keys() != before.keys() or any(d[h] is not f for h, f in before.items())):
                d.clear()
                d.update(before)
        _put_back_attributes(m, attrs, children)
        for c, before in nested:
            if not _same(before, c):
                c.clear()
                c.extend(before) if isinstance(c, list) else c.update(before)
        tensors += [(vars(m), k, attrs[k], v) for k, v in values.items()]
        tensors += _put_back_buffers(m, bufs, non_persistent)
    _put_back(tensors)


def _put_back_attributes(m: nn.Module, attrs: dict, children: set):
    now = own_state(m)
    for k in now.keys() | attrs.keys():
        old, cur = attrs.get(k, _MISSING), now.get(k, _MISSING)
        if old is _MISSING:
            del vars(m)[k]
        elif cur is _MISSING or not _same(old, cur):
            if cur is _MISSING and k in m._modules and k not in children:
                del m._modules[k]           # (a child the forward made in place of a None)
            if isinstance(old, _CONTAINERS) and type(cur) is type(old):
                cur.clear()          # (in place: others may hold the container)
                cur.extend(old) if isinstance(cur, list) else cur.update(old)
            else:
                vars(m)[k] = old


def _put_back_buffers(m: nn.Module, bufs: list, non_persistent: set) -> list:
    """The buffers as they were (registered anew, ``None`` again, removed if the forwards made
    them), and the entries whose values :func:`_put_back` writes back."""
    names = {k for k, _, _ in bufs}
    for k in [k for k in m._buffers if k not in names and not k.startswith(_OWN_BUFFERS)]:
        del m._buffers[k]
    for k, b, _ in bufs:
        m._buffers[k] = b
    own = {k for k in m._non_persistent_buffers_set if k not in names and k in m._buffers}
    if m._non_persistent_buffers_set != non_persistent | own:
        m._non_persistent_buffers_set.clear()
        m._non_persistent_buffers_set.update(non_persistent | own)
    return [(m._buffers, k, b, values) for k, b, values in bufs if values is not None]


def _put_back(entries: list):
    """Each tensor back in its place with its values: written in place, or replaced by the copy
    where it cannot be (an inference tensor, a tensor made by ``expand``, a sparse tensor)."""
    with torch.no_grad():
        for where, k, t, values in entries:
            where[k] = t
            try:
                if t.layout == torch.strided and t.shape == values.shape and torch.equal(t, values):
                    continue
                if t.shape != values.shape:
                    t.resize_(values.shape)
                t.copy_(values)
            except (RuntimeError, NotImplementedError, TypeError):
                where[k] = values


def changed_tensors(saved: List[tuple], but: Optional[dict] = None) -> dict:
    """id(module) -> the names of its buffers and tensor attributes whose values the forwards
    since :func:`snapshot` changed or made: state a module keeps from its forwards (a counter, a
    running mean, the last input), or sets up at its first call (a table built lazily, an
    ActNorm scale). A module whose class changed (a lazy one materialised), the analysis' own
    buffers and the names in ``but`` ({id(module): names}: what ``eval()`` changed, a
    ``train()`` override's cache) are not counted; BatchNorm's statistics do not move in eval
    mode."""
    from torch.nn.parameter import is_lazy
    found = {}
    for m, cls, bufs, _, _, values, _, _, _ in saved:
        if type(m) is not cls:
            continue
        before = {**{k: v for k, _, v in bufs if v is not None}, **values}
        now = dict(m.named_buffers(recurse=False)) if isinstance(m, torch.jit.ScriptModule) else \
            {**{k: b for k, b in m._buffers.items() if not k.startswith(_OWN_BUFFERS)},
             **{k: v for k, v in own_state(m).items() if isinstance(v, torch.Tensor)}}
        names = tuple(k for k, t in now.items() if t is not None and not is_lazy(t) and
                      not _equal(before.get(k), t) and k not in (but or {}).get(id(m), ()))
        if names:
            found[id(m)] = names
    return found


def changed_values(saved: List[tuple], but: Optional[dict] = None) -> dict:
    """id(module) -> the names of its plain Python values (numbers, flags, strings, None, tuples
    of them) that the forwards since :func:`snapshot` changed or made (an ActNorm's
    ``initialized`` flag, transformers' Swin's shift set to 0), but those in ``but`` (as
    :func:`changed_tensors`)."""
    found = {}
    for m, cls, _, _, attrs, _, _, _, _ in saved:
        if type(m) is not cls or isinstance(m, torch.jit.ScriptModule):
            continue
        names = tuple(k for k, v in own_state(m).items() if is_number(v) and k not in (but or {}).get(
            id(m), ()) and (k not in attrs or not _same(attrs[k], v)))
        if names:
            found[id(m)] = names
    return found


#: a norm's running statistics, which the programs already move once per call in training
#: (runtime/gather.py ``without_stat_update``)
_NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def changed_in_training(module: nn.Module, call) -> dict:
    """:func:`changed_tensors` of one train-mode run of ``module`` on its calibration ``call``
    (no autograd; its modes, the random number generators and all it changed put back), less
    BatchNorm's running statistics: state its submodules keep in training only (``if
    self.training: self.n += 1``), which the conversion's forwards, all in eval mode, never
    move (it counted 3 calls for each of the block's until audit K6 of the forty-sixth
    session). A forward that fails in training tells nothing (the dense model's fails too)."""
    from torch.nn.modules.batchnorm import _NormBase
    modes, saved, python_rng = [(m, m.training) for m in module.modules()], snapshot(module), \
        random.getstate()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            module.train(True)
            module(*call.args, **call.kwargs)
    except Exception:   # noqa: BLE001 - nothing learned
        pass
    finally:
        random.setstate(python_rng)
        module.train(modes[0][1])       # (its own train() overrides: LeViT's bias cache)
        for m, mode in modes:
            m.training = mode
        changed = changed_tensors(saved)
        restore(saved)
    norms = {id(m) for m in module.modules() if isinstance(m, _NormBase)}
    changed = {i: tuple(k for k in names if i not in norms or k not in _NORM_STATISTICS)
               for i, names in changed.items()}
    return {i: names for i, names in changed.items() if names}


def _equal(old, new: torch.Tensor) -> bool:
    if old is None or old.shape != new.shape or old.dtype != new.dtype or old.layout != new.layout:
        return False
    try:
        return bool(torch.equal(old, new.detach()))
    except (RuntimeError, NotImplementedError, TypeError):
        return True       # (not comparable: taken as unchanged)


def kept_below(module: nn.Module, changed: dict) -> tuple:
    """``path.name`` (from ``module``) of the state :func:`changed_tensors` found in its
    submodules, ``module`` itself left out."""
    return tuple(f"{p}.{k}" for p, m in module.named_modules() if p for k in changed.get(id(m), ()))


def moved_by_input(module: nn.Module, call, leaves, kept, num_tokens: int) -> tuple:
    """Of ``kept`` (``path.name`` of the state :func:`kept_below` found in ``module``'s
    submodules), that of a submodule in ``leaves`` (which the programs call whole, on the tokens
    they run) moved by what it is called with: run again from the same state on other values at
    another token count, in eval and in train mode, it ends otherwise than on what ``module``'s
    calibration ``call`` gave it (a running mean of its input, a count of its tokens). State it
    computes from its parameters and buffers alone ends alike (``spectral_norm``'s ``weight``,
    ``weight_u`` and ``weight_v``, a call counter): where the block evolves it is the dense
    model's, and was said to be the tokens' until audit K6 of the forty-sixth session; so does
    that of a submodule called with no tensor at all (a parametrization's: audit D9 of the
    forty-ninth). Where it cannot be told (no tensor the submodule is called with has a dim of
    ``num_tokens``, a call fails), taken as moved by it."""
    under = {p: [k for k in kept if k.startswith(p + ".")] for p in leaves}
    under = {p: names for p, names in under.items() if names}
    if not under:
        return ()
    calls, moved = _calls_of(module, call, under), set()
    for path, names in under.items():
        rel = [k[len(path) + 1:] for k in names]
        moved |= {f"{path}.{k}" for k in _moved_in(module.get_submodule(path), calls.get(path, []),
                                                   rel, num_tokens)}
    return tuple(k for k in kept if k in moved)


def _calls_of(module: nn.Module, call, paths) -> dict:
    """{path: [(args, kwargs), ...]}: copies of what the submodules at ``paths`` are called with
    in one run of ``module`` on its calibration ``call`` (no autograd; all it changed put back);
    {} where that run fails."""
    found, handles = {p: [] for p in paths}, []

    def recorder(path):
        def record(m, args, kwargs):
            found[path].append(tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor)
                                        else v, (args, kwargs)))
        return record
    saved, python_rng = snapshot(module), random.getstate()
    try:
        for p in paths:
            handles.append(module.get_submodule(p).register_forward_pre_hook(
                recorder(p), prepend=True, with_kwargs=True))
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            module(*call.args, **call.kwargs)
    except Exception:   # noqa: BLE001 - nothing learned: its state taken as moved by its input
        found = {}
    finally:
        for h in handles:
            h.remove()
        random.setstate(python_rng)
        restore(saved)
    return found


def _moved_in(leaf: nn.Module, calls: list, names: list, num_tokens: int) -> tuple:
    """Of ``names`` (``path.name`` in ``leaf``), those a call of ``leaf`` on other tokens
    (:func:`_other_tokens`) leaves otherwise than one of its ``calls`` does, in eval or in train
    mode; all of them where there is no call, or no other tokens it runs on."""
    moved, rng = set(), (torch.random.get_rng_state(), random.getstate())
    for given in calls or [None]:
        moved |= set(names) if given is None else _moved_by(leaf, given, names, num_tokens, rng)
    return tuple(k for k in names if k in moved)


def _moved_by(leaf: nn.Module, given, names: list, num_tokens: int, rng) -> set:
    """Of ``names``, those ``leaf`` leaves otherwise after the ``given`` call than after the
    first of its other tokens it runs on in both modes; all of them where it runs on none, but
    where ``given`` holds no tensor at all: then it moves them from its own state alone
    (``attn.parametrizations.weight``, which a block traced into ``attn`` calls with no
    argument: parametrize's spectral_norm's ``_u`` and ``_v`` were said to be the tokens' until
    audit D9 of the forty-ninth session)."""
    if not any(isinstance(v, torch.Tensor) for v in tree_leaves(given)):
        return set()
    for other in _other_tokens(*given, num_tokens):
        after = [(_state_after(leaf, given, names, training, rng),
                  _state_after(leaf, other, names, training, rng)) for training in (False, True)]
        if all(b for _, b in after):       # (it ran on the other tokens, in both modes)
            return {k for a, b in after for k in names
                    if k not in a or k not in b or not _equal(a[k], b[k])}
    return set(names)


def _other_tokens(args, kwargs, num_tokens: int):
    """(args, kwargs) with their tensors' dims of ``num_tokens`` halved and new values in those
    of floating point: every such dim, then, where a tensor has more than one (as many channels
    as tokens), each alone; none where no tensor has such a dim."""
    counts = [list(v.shape).count(num_tokens) for v in tree_leaves((args, kwargs))
              if isinstance(v, torch.Tensor)]
    if num_tokens < 2 or not any(counts):
        return
    for only in [None, *range(max(counts))] if max(counts) > 1 else [None]:
        generator = torch.Generator().manual_seed(0)
        yield tree_map(lambda v: _fewer(v, num_tokens, only, generator), (args, kwargs))


def _fewer(v, num_tokens: int, only: Optional[int], generator: torch.Generator):
    """``v`` with its dims of ``num_tokens`` (all, or the ``only``-th) halved, new values where
    it is of floating point; ``v`` itself where it is no tensor."""
    if not isinstance(v, torch.Tensor):
        return v
    dims = [d for d, size in enumerate(v.shape) if size == num_tokens]
    for d in dims if only is None else dims[only:only + 1]:
        v = v.narrow(d, 0, num_tokens // 2)
    if not v.is_floating_point():
        return v.clone()
    return torch.randn(v.shape, generator=generator).to(v.device, v.dtype)


def _state_after(leaf: nn.Module, call, names: list, training: bool, rng) -> dict:
    """{name: a copy of its value} after one call of ``leaf`` in ``training`` mode from its
    state now, the random number generators set to ``rng`` (no autograd; its modes and all it
    changed put back); {} where the call fails."""
    (args, kwargs), modes, saved = call, [(m, m.training) for m in leaf.modules()], snapshot(leaf)
    python_rng = random.getstate()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.random.set_rng_state(rng[0])
            random.setstate(rng[1])
            leaf.train(training)
            leaf(*args, **kwargs)
            values = {k: _value_at(leaf, k) for k in names}
            return {k: v for k, v in values.items() if v is not None}
    except Exception:   # noqa: BLE001 - nothing learned: taken as moved by its input
        return {}
    finally:
        random.setstate(python_rng)
        leaf.train(modes[0][1])
        for m, mode in modes:
            m.training = mode
        restore(saved)


def _value_at(leaf: nn.Module, name: str) -> Optional[torch.Tensor]:
    path, _, attr = name.rpartition(".")
    v = getattr(leaf.get_submodule(path), attr, None)
    return v.detach().clone() if isinstance(v, torch.Tensor) else None
