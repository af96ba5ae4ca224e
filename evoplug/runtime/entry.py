"""The converted model's entry hook and its size twins: the hook tells the blocks when the
model's own forward runs and with which input, keyed by its size and argument forms
(:func:`input_key`, :func:`batch_dims`, :func:`counted`); a call at a key the model was not
converted at runs the blocks of a :class:`SizeVariant`, the model converted again for it (made
by the factory api.py hands the hook: evoplug/variants.py)."""
from __future__ import annotations

import functools
import inspect
import sys
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import EvoplugError
from .pairs import same_value
from .sharded import made_by_fsdp
from .state import EvoRuntime


def _shapes(key) -> tuple:
    return tuple(k[0] for k in key) if key is not None else None


def named_tensors(module, args, kwargs) -> Optional[Dict[str, torch.Tensor]]:
    """The call's tensor arguments by the names of ``module.forward``'s parameters (a call by
    keyword and one by position give the same names); None where they do not bind."""
    bound = _bind(module, args, kwargs)
    if bound is None:
        return None
    return {n: v for n, v in bound.arguments.items() if isinstance(v, torch.Tensor)}


def _bind(module, args, kwargs) -> Optional[inspect.BoundArguments]:
    """The call bound to ``module.forward``'s parameters; None where it does not bind."""
    try:
        return inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return None


def named_flags(module, args, kwargs) -> Dict[str, object]:
    """The call's other arguments than tensors by name, given by keyword or by position: a flag
    given by position (``ViTModel(x, None, True)``: ``interpolate_pos_encoding``) was left out of
    the example a new size's twin is converted on, which then failed where the model runs (audit
    V3, thirty-seventh session)."""
    flags = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    bound = _bind(module, args, kwargs)
    for n, v in bound.arguments.items() if bound is not None else ():
        kind = bound.signature.parameters[n].kind
        if kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL) and \
                not isinstance(v, torch.Tensor):      # (**kwargs: in ``kwargs``; *args: no name)
            flags.setdefault(n, v)
    return flags


def images_in(args, kwargs) -> Optional[int]:
    """The first dim of the first floating-point tensor of 4 dims or more among a call's
    arguments (the images of a vision model's call; not a float attention mask), None
    without one."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 4:
            return v.shape[0]
    return None


def _empty(args, kwargs, batch_dims) -> bool:
    """Whether the call's first tensor argument holds no image (a batch of 0 along its batch
    dim)."""
    for k, v in (*enumerate(args), *kwargs.items()):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[(batch_dims or {}).get(k, 0)] == 0
    return False


def input_key(args, kwargs, batch_dims=None) -> tuple:
    """What identifies an input size: every tensor argument's shape without the batch dim,
    dtype and device, in order. ``batch_dims``: the arguments (by position or keyword) whose
    batch dim is not dim 0 (a sequence-first model's (N, B, C) tokens: :func:`batch_dims`)."""
    if not batch_dims:          # (every forward passes here: the common case stays one pass)
        items = list(args) + [kwargs[k] for k in sorted(kwargs)]
        return tuple((tuple(v.shape[1:]), v.dtype, v.device.type) for v in items
                     if isinstance(v, torch.Tensor))
    items = list(enumerate(args)) + [(k, kwargs[k]) for k in sorted(kwargs)]
    return tuple((_unbatched(v.shape, batch_dims.get(k, 0)), v.dtype, v.device.type)
                 for k, v in items if isinstance(v, torch.Tensor))


def row_counts(t: torch.Tensor, value: bool) -> Tuple[int, int]:
    """(fewest, most) entries equal to ``value`` in a row (an image) of a boolean tensor."""
    per_row = (t.reshape(t.shape[0], -1) == value).sum(1)
    lo, hi = torch.aminmax(per_row)
    return tuple(torch.stack([lo, hi]).tolist())


def counted(key: tuple, counts, named: Optional[Dict[str, torch.Tensor]]) -> tuple:
    """``key`` with the counts the blocks' trailing special tokens follow (``counts``: (argument,
    value, block) of :class:`EntryHook`), read from the call's ``named`` tensors: VideoMAE's
    decoder trails as many mask tokens as ``bool_masked_pos`` has True per row, so a call with
    another count is another input (a twin) at the same shapes. Read on the host, only for such
    models (the model itself indexes with that mask). An argument missing counts as None."""
    if not counts:
        return key
    found = []
    for arg, value, block in counts:
        t = (named or {}).get(arg)
        if t is None or t.dtype != torch.bool or t.dim() < 2 or not t.shape[0]:
            found.append(None)
            continue
        lo, hi = row_counts(t, value)
        if lo != hi:
            raise EvoplugError(
                f"`{block}` keeps its last tokens as special tokens, as many as `{arg}` has "
                f"{value} entries per image; this call's images have from {lo} to {hi}, and one "
                "conversion serves one count: call the model with as many in every image")
        found.append(lo)
    return key + ((tuple(found),),)


def _unbatched(shape, dim: int) -> tuple:
    return tuple(shape[:dim]) + tuple(shape[dim + 1:])


def batch_dims(args, kwargs, seq_batch: Optional[int]) -> Dict:
    """The model's tensor arguments (by position and by keyword) laid out (N, B, ...): when its
    first converted block is sequence-first and takes ``seq_batch`` images, an argument whose
    dim 1 (and not dim 0) has that size (the tokens a sequence-first model is called with, and
    what is laid out like them); {} otherwise (every batch dim is dim 0)."""
    if seq_batch is None:
        return {}
    items = list(enumerate(args)) + list(kwargs.items())
    return {k: 1 for k, v in items if isinstance(v, torch.Tensor) and v.dim() >= 2
            and v.shape[0] != seq_batch and v.shape[1] == seq_batch}


class SizeVariant:
    """The model converted again for another input size: a twin of the model whose modules are
    new objects holding the *same* parameters and buffers (so training, optimizers and
    ``load_state_dict`` act on both), converted by the conversion's own factory at the first
    forward with that size. A converted block called in a forward of that size runs its twin
    (``blocks[spec.index]``). ``pairs`` (original, twin, shared) keep the twin's train/eval modes in
    step with the model's; ``shared`` names the buffers of the model's own (not the ones its
    conversion added), which the twin follows when ``.to()`` replaces them."""

    def __init__(self, model, blocks, pairs, seconds: float, runtime: Optional[EvoRuntime] = None):
        self.model = model
        self.runtime = runtime          # the twin's own (its blocks' forward state is kept there)
        self.blocks = blocks
        self.pairs = pairs
        self.seconds = seconds          # what building it cost (the first call's extra time)
        self.classes = tuple((orig, type(orig)) for orig, _, _ in pairs)
        owner = runtime.parent if runtime is not None else None
        # (the (block index, name) of every value a forward set at another size than its
        # programs hold, while this twin was in use: see stale)
        self.drift = set(owner.drift) if owner is not None else set()
        self._blocks_at = None          # block index -> (the model's block, the twin's)
        # (the model's block's attributes, by name, that its forward sets at the conversion's
        # size, and the value the twin's programs hold of each: see stale)
        self.watched = tuple((vars(_owner(orig, name)), name.rpartition(".")[2], value)
                             for orig, twin, _ in pairs
                             for name, value in _held(orig, twin, _written(orig)))

    def stale(self) -> bool:
        """Whether a module the twin copied has changed class since it was built
        (``torch.nn.utils.parametrize`` on a block's own parameter makes a subclass and moves
        the parameter): the twin's copy lacks the change; a new twin is converted instead. So
        when a block of the twin has programs traced with another value of a plain attribute
        than the model's block holds now, where a forward sets it on the model's block: at the
        conversion's size (its ``writes``), or at another (the model's runtime's ``drift``):
        transformers' Swin sets its shift to 0 for good once a map fits its window, and a twin
        built before kept the shift it was traced with, silently, until audit L1 of the
        forty-seventh session. A twin whose own forward sets the value at its size is not.
        FSDP's ``fully_shard`` puts a class in front of a block's (:func:`made_by_fsdp`) that
        computes as before, and the twin shares the parameter dicts it fills: still fresh
        (rebuilt, the twin's conversion ran on parameters not gathered, until the fifty-sixth
        session; runtime/sharded.py)."""
        if any(type(orig) is not cls and not made_by_fsdp(type(orig), cls)
               for orig, cls in self.classes):
            return True
        if any(_other(d.get(name, value), value) for d, name, value in self.watched):
            return True
        owner = self.runtime.parent if self.runtime is not None else None
        if owner is None or not (owner.drift or self.drift):
            return False
        # (the values the model's blocks hold now, not the runtime's record of them: a value
        # set back by hand keeps its key there, and a twin built with it then ran, refused
        # as changed by the user, once the block's forward set the other value again, until
        # audit D8 of the forty-ninth session)
        self.drift.update(owner.drift)
        return any(self._holds_other(i, name) for i, name in self.drift)

    def _holds_other(self, index: int, name: str) -> bool:
        """Whether the twin's block ``index`` has programs traced with another value of its
        plain attribute ``name`` (dotted: a module it traced into) than the model's block
        holds now."""
        if self._blocks_at is None:
            self._blocks_at = {orig._evoplug_spec.index: (orig, twin) for orig, twin, _ in self.pairs
                               if getattr(orig, "_evoplug_spec", None) is not None}
        orig, twin = self._blocks_at.get(index, (None, None))
        return orig is not None and any(_other(_value(orig, n, v), v)
                                        for n, v in _held(orig, twin, (name,)))

    def sync(self):
        """The model's train/eval modes, and the buffers ``.to()``/``.half()`` replaced on the
        model's own copied modules, onto the twin (before each forward of this size)."""
        for orig, twin, shared in self.pairs:
            if twin.training != orig.training:
                twin.training = orig.training
            for name in shared:
                buf = orig._buffers.get(name)
                if twin._buffers.get(name) is not buf:
                    twin._buffers[name] = buf
            for name, buf in twin._buffers.items():
                if buf is not None and name not in shared:
                    _follow(twin, name, buf, orig._buffers.get(name))


_NONE = object()


def _written(block) -> set:
    """The names of the plain attributes a converted block's forward sets on itself and its
    submodules (dotted: ``mlp.0.gain``; a twin traced with another value of one, which the
    block's code read as a constant, ran, 1.66 off, until audit D5 of the fiftieth session)."""
    spec = getattr(block, "_evoplug_spec", None)
    return {f"{path}.{name}" if path else name for path, name, _ in spec.writes} \
        if spec is not None else set()


def _owner(block: nn.Module, name: str) -> nn.Module:
    """The module that holds the attribute ``name`` of the block (dotted: of a submodule)."""
    return block.get_submodule(name.rpartition(".")[0])


def _held(orig, twin, names):
    """(name, value) of each of ``names`` that the programs of ``twin``, the twin of the
    converted block ``orig``, were traced with."""
    spec = getattr(twin, "_evoplug_spec", None)
    if spec is None or getattr(orig, "_evoplug_spec", None) is None:
        return ()
    return tuple((n, v) for n in names for v in (spec.traced_value(n, _NONE),) if v is not _NONE)


def _other(now, then) -> bool:
    return not same_value(now, then)


def _value(block: nn.Module, name: str, default):
    """The value of the block's attribute ``name`` (``attn.temp``: of its submodule ``attn``)."""
    path, _, key = name.rpartition(".")
    try:
        m = block.get_submodule(path)
    except AttributeError:      # (a submodule removed since)
        return default
    return vars(m).get(key, default)


@torch._dynamo.disable
def _twin_outside_the_graph(hook: "EntryHook", module, args, kwargs):
    """A compiled call of the model at an input size no twin exists for: the twin is converted
    here, in eager mode (a graph break), and the compiled blocks then run its blocks (block.py
    ``_twin_taking``), as after an eager call at that size. (They ran their own forward on every
    token, the dense model, with a warning, until the twenty-third session.)"""
    if images_in(args, kwargs) == 0 or _empty(args, kwargs, hook.batch_dims):
        return
    key = hook._key(module, args, kwargs)
    if hook.counts and _shapes(key)[-1] != hook._key_shapes[-1]:
        # (compiled blocks find a twin only by a call their own program does not take: one at
        # the same shapes with another count would run the conversion's count)
        (arg, value, block), now, then = hook.counts[0], _shapes(key)[-1], hook._key_shapes[-1]
        raise EvoplugError(
            f"`{block}` keeps its last tokens as special tokens, as many as `{arg}` has {value} "
            f"entries per image ({now[0]} in this call, {then[0]} at the "
            "conversion): a compiled call with another count cannot take the twin converted "
            "for it. Call the model eagerly for such calls, or convert it at that count")
    if len(args) == hook.num_args and kwargs.keys() == hook.kwargs and (hook.runtime.drift or (
            _shapes(key) != hook._key_shapes and key not in hook.runtime.variants)):
        # (a value a forward set on a block at another size, other than its programs hold: the
        # twin converted with it, at every size, as in an eager call; compiled, the drifted
        # blocks ran their own forward until an eager call had converted it, until audit D1 of
        # the forty-ninth session)
        hook.runtime.variant_for(key, hook._factory(), module, args, kwargs)


def _follow(twin, name: str, buf: torch.Tensor, ref: Optional[torch.Tensor]):
    """A buffer the twin's conversion added (window index, upsampling taps) onto the device,
    and if floating-point the dtype, of the model's own one of that name, which ``.to()``
    moved (the twin's modules are not the model's: ``.to()`` does not reach them)."""
    if ref is None:
        return
    dtype = ref.dtype if buf.is_floating_point() and ref.is_floating_point() else buf.dtype
    if buf.device != ref.device or buf.dtype != dtype:
        twin._buffers[name] = buf.to(ref.device, dtype)


class EntryHook:
    """Forward pre-hook (and, as :meth:`exit`, forward hook) on the converted model: marks that
    this thread runs its ``forward`` called the way calibration called it (same positional
    count and keywords). Methods like ``forward_intermediates`` or ``forward_features`` called
    directly do not pass here: their blocks restore the original order after each block.
    A forward with an input of another size than the conversion's (``key``) runs with the
    :class:`SizeVariant` for it, when the conversion gave the runtime a factory."""

    def __init__(self, runtime: EvoRuntime, num_args: int, kwargs, key: Optional[tuple] = None,
                 factory: Optional[Callable] = None):
        self.runtime = runtime
        runtime.served = True
        self.num_args = num_args
        self.kwargs = frozenset(kwargs)
        self.key = key
        self.factory = factory      # (model, args, kwargs) -> SizeVariant; a picklable function
        self._key_shapes = _shapes(key)

    names: Tuple[str, ...] = ()       # calibration's tensor arguments, by parameter name
    _named_shapes = None
    batch_dims: Dict = {}             # arguments whose batch dim is not dim 0 (:func:`batch_dims`)
    counts: Tuple = ()                # (argument, value, block): the block's trailing special
    #                                   tokens are as many as ``value`` entries per row of that
    #                                   boolean argument; the count is part of the key (counted)

    def set_names(self, named: Dict[str, torch.Tensor]):
        self.names = tuple(sorted(named))
        self._named_shapes = _shapes(counted(input_key((), named, self.batch_dims), self.counts, named))

    def set_counts(self, counts: Tuple, named: Optional[Dict[str, torch.Tensor]]):
        """The conversion's counts (:func:`counted`) into its key."""
        self.counts = counts
        self.key = counted(self.key, counts, named)
        self._key_shapes = _shapes(self.key)

    def _key(self, module, args, kwargs) -> tuple:
        key = input_key(args, kwargs, self.batch_dims)
        return counted(key, self.counts, named_tensors(module, args, kwargs)) if self.counts else key

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._key_shapes = _shapes(self.key)
        self.runtime.served = True       # (a copy of the model: its runtime, copied with it)

    def __call__(self, module, args, kwargs):
        # every forward of the model passes here: no per-call sets or tuples beyond the input key
        if torch.compiler.is_compiling():
            self.runtime.compiled_entries += 1
            # (shapes are static while dynamo traces: at the conversion's size nothing is added to
            # the graph, unless a forward set a value on a block at another size: ``drift``; at
            # another, a graph break builds the twin the blocks then take)
            if self.factory is not None and not torch.compiler.is_exporting() and (
                    self.counts or self.runtime.drift or len(args) == self.num_args and
                    kwargs.keys() == self.kwargs and
                    _shapes(input_key(args, kwargs, self.batch_dims)) != self._key_shapes):
                _twin_outside_the_graph(self, module, args, kwargs)
            return
        matches = len(args) == self.num_args and kwargs.keys() == self.kwargs
        if matches and next(reversed(module._forward_pre_hooks.values())) is not self:
            matches = self._move_last(module)
        variant = None
        self.runtime.admit()
        images = images_in(args, kwargs)
        try:
            if images == 0 or (images is None and _empty(args, kwargs, self.batch_dims)):
                # an empty batch: nothing to calibrate a twin on, nothing to speed up; every
                # block runs its own forward (block.py: ``rt.images() == 0``)
                images = 0
            elif matches and self.factory is not None:
                key = self._key(module, args, kwargs)
                # (dtype or device alone need no twin; a value a forward set on a block at
                # another size, other than its programs hold, needs one at every size: drift)
                if _shapes(key) != self._key_shapes or self.runtime.drift:
                    variant = self.runtime.variant_for(key, self._factory(), module, args, kwargs)
                    variant.sync()
            elif self.factory is not None and self.names:
                variant = self._variant_by_name(module, args, kwargs)
        finally:     # (exit, called whatever happens, pops and releases)
            self.runtime.push_entry(matches, variant, images, (self, module, args, kwargs),
                                    sys._getframe(1))

    def _move_last(self, module) -> bool:
        """A forward pre-hook registered after this one (test-time augmentation that stacks
        flipped copies, a resize) changes the input after it was read here: the blocks then
        saw another batch or size than the one read (a misleading error, a wrong twin). This
        hook goes last for the next forwards; this one runs as a call of another form (each
        block on its own, exact). Returns False (no match) when it moved."""
        hooks = module._forward_pre_hooks
        key = next((k for k, h in hooks.items() if h is self), None)
        if key is None:
            return True
        hooks.move_to_end(key)
        return False

    def _factory(self) -> Callable:
        return functools.partial(self.factory, batch_dims=self.batch_dims) if self.batch_dims \
            else self.factory

    def _variant_by_name(self, module, args, kwargs) -> Optional[SizeVariant]:
        """Another call form (by keyword, with other flags or tensors): the input size is read
        from the tensors bound to the names calibration's input had."""
        named = named_tensors(module, args, kwargs)
        if named is None or not all(n in named for n in self.names):
            return None
        mine = {n: named[n] for n in self.names}
        key = counted(input_key((), mine, self.batch_dims), self.counts, named)
        if _shapes(key) == self._named_shapes and not self.runtime.drift:
            return None
        flags = named_flags(module, args, kwargs)
        # (the call's flags and its other tensors go with the twin's example:
        # interpolate_pos_encoding=True, NaFlex's patch_coord and patch_valid)
        variant = self.runtime.variant_for(key, self._factory(), module, (), {**flags, **named})
        variant.sync()
        return variant

    def exit(self, module, args, kwargs, output):
        if torch.compiler.is_compiling():
            self.runtime.compiled_entries -= 1
        else:
            if self.runtime.entered() and len(self.runtime._local.entry) == 1 and \
                    sys.exc_info()[0] is None and self.runtime.variant() is None:
                # (not a forward that raised, nor one a twin ran)
                self.runtime.check_evolved()
            self.runtime.pop_entry()
            self.runtime.release()
            local = self.runtime._local
            cur = getattr(local, "state", None)
            if cur is not None and cur.segment is not None and not self.runtime.entered():
                local.state = cur._replace(segment=None)    # the forward is over: nothing follows
            cur = None
            guard = getattr(local, "guard", None)
            if guard is not None and (guard.watched or guard.on_stack) and not self.runtime.entered():
                return guard.finish(output, raised=sys.exc_info()[0] is not None)
        return None
