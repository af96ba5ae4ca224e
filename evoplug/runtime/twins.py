"""Which code a converted block's call runs when it is not the one the conversion analysed:
binding a call to the block's program (:func:`bind`) and, where the call's sizes or argument
forms differ, the block of a twin converted for them (runtime/entry.py ``SizeVariant``): in the
model's forward (:func:`size_twin`), in a method called directly, in a recomputation in backward,
or for an argument that is None in one call and a tensor in another (form twins).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..errors import AnalysisError, EvoplugError
from .spec import _READ_OUTSIDE, BlockSpec, MapTokens, check_unchanged
from .entry import _value, input_key
from .pairs import _MODULE_KEYS, is_plain, same_value
from .state import NOT_NOTED, EvoState, _in_backward



def bind(spec: BlockSpec, args, kwargs, strict: bool, twins: bool = False,
         state: Optional[EvoState] = None):
    """The token input and other tensor arguments of a call that runs the program, after
    checking that nothing it traced changed (:meth:`BlockSpec.changed`); None for a call the
    conversion did not see (DINO's get_last_selfattention passes return_attention=True), which
    runs the block's own forward, on every token, exactly (``strict``: raise instead).
    ``twins``: a call of another size outside the model's own forward (``forward_features``
    called directly, or under torch.compile, whose graphs skip the model's entry hook) runs the
    block of a twin an earlier eager call of the model converted for that size, when one takes
    it (returned instead of the binding; compiled, the failed binding is a graph break).
    ``state``: the forward's; where no block of it has scored tokens yet, a call whose tensor
    arguments differ from the analysed ones only in being None or not (a padding mask) runs the
    form twin for it (:func:`_form_twin`)."""
    check_unchanged(spec)
    try:
        bound = _bound(spec, args, kwargs, whole=not strict)
    except AnalysisError as e:
        if strict:
            raise
        if getattr(spec.call.tokens(args, kwargs), "is_nested", False):
            # (a call the conversion did not see: nested tokens without the padding mask)
            _tell_nested(spec)
            return None
        if torch.compiler.is_exporting():     # an exported program is no place for a quiet fallback
            raise EvoplugError(
                f"`{spec.name}` cannot run its evolving program in this export: "
                f"{e.reason.split('; re-run')[0]}. The exported program would run it on every "
                "token (the dense model). Export at the input size and with the arguments the "
                "model was converted with (docs/export.md)") from None
        if twins and spec.runtime.variants and not spec.runtime.entered():
            twin = _twin_taking(spec, args, kwargs)
            if twin is not None:
                return twin
        if state is not None and state.g is None and state.segment is None and \
                not torch.compiler.is_compiling():
            twin = _form_twin(spec, args, kwargs)
            if twin is _SAID:
                return None
            if twin is not None:
                return twin
        # (the size hint where the call differs in its sizes, not in a flag such as
        # transformers' output_attentions=True, which needs every token's attention)
        hint = "" if spec.runtime.entered() or not e.sized else (
            "; a call of the model itself (eager or compiled) with a new input size converts a "
            "twin for it, which methods such as forward_features called directly then use at "
            "that size too")
        warnings.warn(f"evoplug: {e.reason.split('; re-run')[0]}: `{spec.name}` runs its original "
                      f"forward (every token) for such calls{hint}", stacklevel=6)
        return None
    if bound[0].is_nested:      # (the one attribute read on the common path)
        _tell_nested(spec)
        return None
    if twins and spec.runtime.drift and not spec.runtime.entered():
        # (where a forward set a value on some blocks at another size, the call runs the twin
        # converted with it, every block, as the model's forward does: compiled, only the
        # drifted blocks ran it, each from a state of its own, 0.5 off, until audit D1 of the
        # forty-ninth session)
        twin = _twin_taking(spec, args, kwargs)
        if twin is not None:
            return twin
    return bound


def _tell_nested(spec: BlockSpec):
    """Once per model: a block given its tokens as a nested tensor runs its own forward, which
    takes one (nn.TransformerEncoder's fast path makes one of a padded batch in inference when
    built with ``enable_nested_tensor=True``, its default); the program, on padded tokens,
    raised torch's "NestedTensorImpl doesn't support sizes" until audit A4 of the fortieth
    session."""
    if spec.runtime.nested_told:
        return
    spec.runtime.nested_told = True
    warnings.warn(f"evoplug: `{spec.name}` is given its tokens as a nested tensor (nn."
                  "TransformerEncoder's fast path for a padded batch in inference, with "
                  "enable_nested_tensor=True): it runs its original forward (every token), as "
                  "every converted block given one does. Build the encoder with "
                  "enable_nested_tensor=False to evolve padded batches", stacklevel=7)


def _bound(spec: BlockSpec, args, kwargs, whole: bool = True, held: Optional[nn.Module] = None):
    """``spec.call.bind``, and for a map block its map checked against the conversion's (the
    programs' window indices and map views are that map's): AnalysisError if either differs.
    So are the tokens' shape where the block records sizes from it (``writes_at``), unless the
    call's tokens are not all of them (not ``whole``: a segment's, handed on in the model's
    forward at the size of the block's conversion), and the values a parent sets on the block
    (``set_outside``) that ``held`` holds (the model's block, of which ``spec``'s is a twin's;
    default the block itself)."""
    bound = spec.call.bind(spec.name, args, kwargs)
    if spec.set_outside:
        _check_set_outside(spec, held)
    drifted = spec.drifted() if spec.runtime.drift else None
    if drifted is not None:
        # (its programs ran the value they were traced with: transformers' Swin, called at 32
        # px where it was converted at 64, kept its shift of 2 at 64 px after, 0.27 off, until
        # audit L1 of the forty-seventh session)
        name, now, then = drifted
        raise AnalysisError(spec.name, f"its forward set `{name}` to {now!r} at another input "
                            f"size, as the original's does, and its programs were traced with "
                            f"{then!r} (an eager call of the model at this size converts a twin "
                            "with it, which such calls then run)")
    if whole and spec.writes_at is not None and tuple(bound[0].shape[1:]) != spec.writes_at:
        # (its programs set the sizes of the conversion's tokens: a compiled call at another
        # size ran them, and the block kept the conversion's size, until audit L2 of the
        # forty-seventh session)
        raise AnalysisError(spec.name, f"its forward records sizes from its tokens, of shape "
                            f"{spec.writes_at} when it was analysed, {tuple(bound[0].shape[1:])} "
                            "now", sized=True)
    for n, t in bound[1].items():
        want = spec.extra_shapes.get(n)
        if want is not None and t.dim() != len(want):
            # (EVA's rotary table gathered per image by timm's patch dropout in training: (B, 1,
            # N', d) where the program took (N, d))
            raise AnalysisError(spec.name, f"its argument {n!r} has shape {tuple(t.shape)}, of "
                                f"another rank than when it was analysed {want}", sized=True)
    if spec.windowed_tokens is not None and bound[0].shape[1] != spec.windowed_tokens:
        # (MAE's visible tokens of a masked Hiera: the windows were cut from all of them)
        raise AnalysisError(spec.name, f"its windows were cut from {spec.windowed_tokens} tokens, "
                            f"and it has {bound[0].shape[1]} (a call that dropped tokens, as MAE's "
                            "masking does)", sized=True)
    if spec.layout is MapTokens and tuple(bound[0].shape[1:3]) != spec.grid:
        raise AnalysisError(spec.name, f"its token map is {tuple(bound[0].shape[1:3])}, the "
                            f"map it was analysed on {spec.grid}", sized=True)
    return bound


def _check_set_outside(spec: BlockSpec, held: Optional[nn.Module]):
    """AnalysisError where the block (``held``: the model's, when ``spec`` is a twin's) holds
    another value of an attribute a parent sets on it before each call (``blk.H, blk.W = H,
    W``) than its programs were traced with: they run that value (a depthwise conv's reshape to
    the conversion's map). A compiled call at another input size ran the model's programs, a
    raw reshape error, until audit D1 of the forty-ninth session: dynamo skips the entry hook
    that gives the model's eager calls their twin; so did a block called directly at another
    size."""
    block = held if held is not None else _block_of(spec)
    for name, value in spec.set_outside if block is not None else ():
        now = _value(block, name, _NONE)        # (``dw.H``: a parent's ``blk.dw.H = H``)
        if not same_value(now, value):
            raise AnalysisError(spec.name, f"its attribute `{name}`, which code outside it "
                                f"sets before its calls (a parent's `blk.{name} = ...`), is "
                                f"{now!r}, and its programs were traced with {value!r}", sized=True)


def _block_of(spec: BlockSpec) -> Optional[nn.Module]:
    """The block ``spec`` is the spec of (the first module its programs traced into), None for
    a spec without them."""
    own = spec.traced[0] if spec.traced else None
    return own[3] if own is not None and own[0] is None else None


def _twin_taking(spec: BlockSpec, args, kwargs, sticky: bool = True) -> Optional[nn.Module]:
    """The block of a size twin (runtime/entry.py SizeVariant) whose program takes this call,
    with the twin's modes synced; None if none. Where the block's trailing special tokens follow
    a boolean argument's count (``suffix_from``), only a twin converted at the block's count: a
    compiled call has it (entry.py refuses another), and twins of one size at other counts have
    the same shapes (a compiled call at 48 px with 8 masked ran the twin for 24 that an eager
    call had converted first, 1.0 off, until the forty-second session)."""
    for variant in list(spec.runtime.variants.values()):
        twin = variant.blocks[spec.index]
        if variant.stale() or (spec.suffix_from and twin._evoplug_spec.num_suffix != spec.num_suffix):
            continue                # (a stale one: the next call of the model converts anew)
        try:
            _bound(twin._evoplug_spec, args, kwargs, held=_block_of(spec))
        except AnalysisError:
            continue
        variant.sync()
        if sticky and not torch.compiler.is_compiling():
            spec.runtime._local.direct = (variant, spec.index)      # (see _sticky_twin)
        return twin
    return None


def own_forward_twin(spec: BlockSpec, args, kwargs) -> Optional[nn.Module]:
    """Outside the model's eager forward (compiled: dynamo skips the entry hook that gives an
    eager call of another size its twin, :func:`size_twin`; a frame dynamo runs uncompiled past
    its recompile limit; a method called directly), a block that runs its own forward (keep
    1.0 on the identity fast path, a dense block): the block of the twin that takes the call
    where its own programs do not, or where a forward set a value on a block at another size
    (``drift``), as :func:`bind` finds one for an evolving block. Its own forward on the
    model's block set what the dense block sets at that size (a gain, Swin's shift) there, with
    no twin's record of it (``drift``, :func:`set_back`): the next eager call refused it as a
    change made after conversion, at every size, until audit D1 of the fiftieth session. None:
    the block runs its own forward."""
    if torch.compiler.is_exporting() or spec.hooked():
        return None
    if not spec.runtime.drift:
        try:
            _bound(spec, args, kwargs)
            return None
        except AnalysisError:
            pass
    return _twin_taking(spec, args, kwargs)


def own_forward_noted(block: nn.Module, args, kwargs):
    """The block's own forward on the model's block, outside the model's eager forward (a
    method called directly, compiled) where no twin takes the call (:func:`own_forward_twin`:
    none converted for its size yet), with what it sets that its programs were traced with
    another value of (a gain, Swin's shift, set at this size) noted as ``drift``, as
    :func:`set_back` notes a twin's: on the block, the modules it traced into and the ones its
    programs call whole (``leaf_values``). Unnoted, every later call that ran the programs (keep
    below 1.0, keep 1.0 off the identity fast path), at every size, was refused as a change
    made after conversion ("`gain` changed from 1.0 to 0.5"), until the fifty-third session;
    now the next eager call converts a twin with it, as after an eager call at that size. A
    value that differed before the call (the user's change: refused by the next program's call,
    as it was) is left unnoted. Not in the model's compiled forward: its entry hook converted
    a twin for a size of its own (``_twin_outside_the_graph``), whose blocks take such calls."""
    spec = block._evoplug_spec
    if torch.compiler.is_compiling() and (spec.runtime.parent or spec.runtime).compiled_entries > 0:
        return spec.orig_class.forward(block, *args, **kwargs)
    clean = spec.changed() is None if spec.traced else True
    out = spec.orig_class.forward(block, *args, **kwargs)
    if clean:
        spec.note_drift(block, [(p, k, v) for p, k, v in spec.leaf_values
                                if _value(block, f"{p}.{k}" if p else k, v) is not v])
    return out


def check_suffix_count(spec: BlockSpec):
    """A block whose trailing special tokens are as many as a boolean argument of the model's
    has True (or False) entries per image (``suffix_from``: VideoMAE's decoder trails one mask
    token per True entry of ``bool_masked_pos``) learns that count only from a call of the model
    (entry.py ``counted``). Called outside one (``model.decoder(x, n)`` called directly) it
    cannot tell how many of its tokens are special: refused by name. (It kept the conversion's
    count, ranking mask tokens as patches, 2.6 off with 24 mask tokens where it was converted
    at 8, until the forty-second session.) While compiling, the model's forwards dynamo traces
    are counted instead (``EvoRuntime.compiled_entries``; a compiled direct call ran at the
    conversion's count until the forty-third session); the entry hook refuses the model's
    compiled calls at another count."""
    owner = spec.runtime.parent or spec.runtime       # (a size twin's: the model's runtime)
    if getattr(owner._local, "entry", None) or \
            torch.compiler.is_compiling() and owner.compiled_entries > 0:
        return
    arg, value = spec.suffix_from[0]
    raise EvoplugError(
        f"`{spec.name}` keeps its last tokens as special tokens, as many as the model's argument "
        f"`{arg}` has {value} entries per image ({spec.num_suffix} at the conversion), a count "
        "only a call of the model gives: called outside the model's forward (a module holding "
        "it called directly), it cannot tell how many of its tokens are special. Call the "
        "model itself, or set keep_ratio=1.0 for such calls")


def _form_twin(spec: BlockSpec, args, kwargs) -> Optional[nn.Module]:
    """In a forward of the model, the first block that runs a program, called with a tensor
    argument that is None where its analysis had a tensor or the reverse: the block of the twin
    converted on this forward's call (runtime/entry.py SizeVariant; on 2 of its images that
    give its form, variants.py ``_form_images``, else on all), which the rest of the forward runs.
    Such arguments follow the data: transformers passes a padding mask only when some image of
    the batch is padded (``None`` for a batch without padding), so a model converted on either
    form met the other in ordinary batches; its blocks ran their original forward then, and an
    image's output depended on the images batched with it (up to 2.5 apart on Siglip2), until
    the twenty-fourth session. None when the call differs in another way, or outside a model
    forward."""
    rt = spec.runtime
    owner = rt.parent or rt          # (a size twin's block: the model's runtime keeps the twins)
    call = owner.call()
    if call is None or call[0].factory is None:
        return None
    plan = spec.call
    try:
        values = plan.arguments(spec.name, args, kwargs)
    except AnalysisError:
        return None
    flipped, other, form = _other_form(plan, values)
    if form is None:
        return None
    hook, model, cargs, ckwargs = call
    key = (input_key(cargs, ckwargs, hook.batch_dims), form)
    if key in owner._no_form:
        # (its one warning was given: each block, at each call, said it again, audit V3 of the
        # thirty-seventh session)
        return _SAID
    if other and len(_flag_values(owner, other)) >= _FLAG_TWINS:
        # (a flag that changes with every call, a step count, would convert a twin each time)
        owner._no_form[key] = "too many values"
        warnings.warn(f"evoplug: `{spec.name}` is called with {', '.join(other)} of "
                      f"{_FLAG_TWINS} other values already, each of which converted a twin of the "
                      "model; for further values the blocks run their own forward (every token)",
                      stacklevel=7)
        return _SAID
    make = hook._factory()

    def takes(variant) -> bool:
        try:
            _bound(variant.blocks[spec.index]._evoplug_spec, args, kwargs)
        except AnalysisError:
            return False
        return True

    def build(m, a, k):     # on 2 images that give the call's form; else on all of them
        try:
            variant = make(m, a, k, on="form")
        except Exception:       # (a twin on all images may still convert)
            return make(m, a, k, on="all")
        return variant if takes(variant) else make(m, a, k, on="all")
    try:
        variant = owner.variant_for(key, build, model, cargs, ckwargs)
    except Exception as e:      # (the forward goes on as before the twins: each block its own)
        owner._no_form[key] = str(e)
        warnings.warn(f"evoplug: `{spec.name}` is called with {', '.join(flipped)} in another form "
                      f"than when it was analysed (None or a tensor, or another value), and "
                      f"converting the model on this call failed: {e}; the blocks run their own "
                      "forward (every token) for such calls", stacklevel=7)
        return _SAID
    if not takes(variant):
        return None
    variant.sync()
    owner.use_variant(variant)
    return variant.blocks[spec.index]


#: :func:`_form_twin`: the call's form was refused before, with a warning; the block runs its
#: original forward without another
_SAID = object()


def _other_form(plan, values):
    """How a call's arguments differ from the analysed ones in form: (the tensor arguments that
    are None where the analysis had a tensor or the reverse, and the flags of another value; the
    form's key, None where neither). A flag of another value: transformers' BEiT layers read
    ``interpolate_pos_encoding``, which a caller may pass at every size: at the conversion's
    size they ran their own forward, with a warning per layer and call (audits Q and T of the
    twenty-fifth session)."""
    flipped = [n for n in plan.names if n not in plan.packed and (
        (n in plan.tensor_args and values.get(n) is None) or
        (n in plan.constants and plan.constants[n] is None and isinstance(values.get(n), torch.Tensor)))]
    other = [n for n in plan.names if n not in plan.packed and n in plan.constants and n in values
             and _plain(plan.constants[n]) and _plain(values[n]) and values[n] != plan.constants[n]]
    if not flipped and not other:
        return flipped, other, None
    form = ("form", tuple((n, values.get(n) is None) for n in flipped) +
            tuple((n, "=", values[n]) for n in other))
    return flipped + other, other, form


#: twins converted for other values of a block's flags, at most (per flag)
_FLAG_TWINS = 4


def _flag_values(owner, names) -> set:
    """The values of the flags ``names`` that form twins were converted (or tried) for."""
    keys = list(owner.variants) + list(owner._no_form)
    return {e for k in keys if len(k) == 2 and isinstance(k[1], tuple) and k[1][:1] == ("form",)
            for e in k[1][1] if len(e) == 3 and e[0] in names}


def _plain(v) -> bool:
    """A flag's value (None, a bool, a number, a string): another one makes a form twin."""
    return v is None or isinstance(v, (bool, int, float, str))


def following(block: nn.Module, twin: nn.Module) -> nn.Module:
    """The twin's block with the plain tensor attributes the model's block holds now (not its
    parameters, buffers or submodules, which the twin shares): prune's pruned weight, which its
    forward pre-hook on the model's block sets anew at each call, or the hook-based
    ``weight_norm``'s. The twin copied the block's attributes when it was built and read those
    (off by 1.2 after prune, audit O of the twenty-fifth session); one the block no longer holds
    leaves the twin (after ``prune.remove`` a stale copy hid the parameter again). So are its
    plain Python values (:func:`_synced`): a size a parent sets on the block before each call
    (``blk.H, blk.W = H, W``), which the twin's block kept from its build, a raw reshape error,
    until audit L1 of the forty-seventh session. Rescanned only when the block's attributes
    are added or removed (a pre-hook replaces a value: same keys)."""
    d, t = block.__dict__, twin.__dict__
    spec = twin._evoplug_spec
    size, names, plain = (*spec.attributes, None)[:3]      # (a pickle from before: 2 items)
    if size != len(d) or plain is None:
        names = tuple(k for k, v in d.items() if isinstance(v, torch.Tensor))
        for k in [k for k, v in t.items() if isinstance(v, torch.Tensor) and k not in d]:
            del t[k]
        plain = tuple(k for k, v in d.items() if _synced(k, v))
        spec.attributes = (len(d), names, plain)
    for k in names + plain:
        v = d.get(k, _NONE)
        if v is not _NONE and t.get(k) is not v:
            t[k] = v
    return twin


def set_back(block: nn.Module, twin: nn.Module):
    """The values the twin's block holds after a call other than the model's block's (its
    forward, or its programs, set them) set on the model's block, which the user and the next
    calls read: its plain Python values (:func:`_synced`) and plain tensor attributes (not its
    parameters or buffers): transformers' Swin sets its shift to 0 for good once a map fits its
    window, and at 32 px, a twin's size, that stayed on the twin, so at 64 px the model's block
    kept its shift of 2 (0.27 off its dense model, keep 1.0 included) until audit L1 of the
    forty-seventh session; an enum member, a numpy scalar or a tensor (``self.g =
    torch.tensor(0.5)``) stayed on the twin until the forty-ninth. One its programs were traced
    with another value of, set here or in place on a module the twins share (``self.attn.temp
    = 0.5``, ``self.cfg["g"] = 0.5``), is kept as the runtime's ``drift``
    (BlockSpec.note_drift). So are the names of the twin's ``writes`` (``_``-named too)."""
    d, t = block.__dict__, twin.__dict__
    spec = block._evoplug_spec
    written = {name for path, name, _ in twin._evoplug_spec.writes if not path}
    for k, v in t.items():
        if d.get(k, _NONE) is not v and (_synced(k, v) or _tensor(k, v, spec) or (
                k in written and k not in _MODULE_KEYS)):
            setattr(block, k, v)
    spec.note_drift(block, twin._evoplug_spec.writes)


def _tensor(name: str, value, spec: BlockSpec) -> bool:
    """A plain tensor attribute a twin's block holds, other than the model's block's (its
    forward set it), but one :func:`block._twin_ran` sets (``sets_own``: as a buffer where the
    forward registers one)."""
    return isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and \
        not name.startswith("_") and name not in spec.sets_own


def _synced(name: str, value) -> bool:
    """Whether a block's attribute is a plain Python value (a number, flag, string, or a list,
    tuple or dict of them: ``runtime/pairs.is_plain``) a twin's block and the model's hold
    alike: not nn.Module's own (``training``, which the twin syncs by mode) nor ``_``-named,
    nor one read outside the block's forward (transformers' ``gradient_checkpointing``: the
    model's block's call checkpoints, and the twin's block, without the checkpointing function
    ``gradient_checkpointing_enable`` set on the model's, raised an AttributeError)."""
    return not name.startswith("_") and name not in _MODULE_KEYS and \
        name not in _READ_OUTSIDE and is_plain(value)


_NONE = object()


def size_twin(spec: BlockSpec, args, kwargs) -> Optional[nn.Module]:
    """The block of the size twin this call runs: the one the model's forward runs with (an
    input of another size), or in a method called directly at a twin's size the twin an earlier
    block of it ran; None: this block runs the call."""
    rt = spec.runtime
    variant = rt.variant()
    if variant is not None and not spec.hooked():     # a forward of another input size
        check_unchanged(spec)          # (the twin copied the block's attributes)
        return variant.blocks[spec.index]
    if rt.entered():
        return None
    if not torch.compiler.is_compiling() and _in_backward():
        return _recomputed_twin(spec, args, kwargs)
    return _sticky_twin(spec, args, kwargs)


def _recomputed_twin(spec: BlockSpec, args, kwargs) -> Optional[nn.Module]:
    """In backward, a block recomputed by gradient checkpointing whose forward ran a size
    twin's block (the model's forward has ended: no variant in force): that twin's block, found
    by the state its forward recorded with the block's input, which belongs to the twin's own
    runtime. (Recomputed as the block itself, it ran every token: wrong gradients under
    reentrant checkpointing, a CheckpointError under non-reentrant, until the twenty-third
    session.)"""
    rt = spec.runtime
    try:
        x = spec.call.arguments(spec.name, args, kwargs).get(spec.call.token_arg)
    except AnalysisError:
        return None
    if not isinstance(x, torch.Tensor):
        return None
    # what the forward's call ran, as it noted (runtime/block.py): a twin's blocks run at the
    # conversion's size once a forward set a value on a block at another (transformers' Swin,
    # its shift: entry.py ``drift``), and such a block recomputed on the identity fast path,
    # which records no state, ran the model's own, which does not checkpoint inside where the
    # twin's did: torch's CheckpointError, until audit D1 of the forty-ninth session
    ran = rt.ran_with(x)
    if ran is None or ran is not NOT_NOTED and _takes(ran[spec.index], args, kwargs):
        return None if ran is None else ran[spec.index]
    # the model's own records, else the nearest state upstream in the autograd graph (whichever
    # runtime made it: the nodes carry it), found once; a reentrant checkpoint's input is a
    # leaf with no graph, recorded by the twin's runtime only
    state = rt.recall(x, spec.index)
    if state is not None and state.plan is rt.plan:
        return None
    for variant in list(rt.variants.values()):
        twin = variant.blocks[spec.index]
        trt = twin._evoplug_spec.runtime
        found = state if state is not None else trt.recall(x, twin._evoplug_spec.index)
        if found is not None and found.plan is trt.plan:
            return twin
    if state is not None:
        return None
    # nothing recorded names it (the stage's input, a block run in its own forward before it:
    # PVTv2's first stage under non-reentrant checkpointing at another size): the forward's
    # rule, a twin's block that takes a call the block does not (see bind); the block itself
    # ran every token, and a scoring block saved fewer tensors than its forward, torch's raw
    # CheckpointError, until the forty-fourth session
    try:
        _bound(spec, args, kwargs)
        return None
    except AnalysisError:
        return _twin_taking(spec, args, kwargs, sticky=False)


def _takes(twin: nn.Module, args, kwargs) -> bool:
    """Whether the program of a twin's block takes the call."""
    try:
        _bound(twin._evoplug_spec, args, kwargs)
    except AnalysisError:
        return False
    return True


def note_ran(block: nn.Module, args, kwargs, twin: Optional[nn.Module], out=_NONE):
    """Note, where the model has twins and autograd may recompute the call, that a converted
    block's call (in a forward, or its recomputation in backward) runs ``twin``, a size twin's
    block (None: its own): on its tokens before it runs, on its output (``out``) after, but for
    its own block's not where it handed the call to a twin's, which noted it (bind)
    (:meth:`EvoRuntime.note_ran`)."""
    rt = block._evoplug_spec.runtime
    if not rt.variants or torch.compiler.is_compiling():    # (compiled: nothing is noted)
        return
    spec = block._evoplug_spec
    x = spec.call.tokens(args, kwargs)
    if not isinstance(x, torch.Tensor) or not (torch.is_grad_enabled() or x.requires_grad):
        return
    blocks = None if twin is None else next(
        (v.blocks for v in list(rt.variants.values()) if v.blocks[spec.index] is twin), NOT_NOTED)
    if blocks is not NOT_NOTED:
        rt.note_ran(None if out is not _NONE else x, blocks, None if out is _NONE else out,
                    replace=twin is not None)


def _sticky_twin(spec: BlockSpec, args, kwargs) -> Optional[nn.Module]:
    """In a method called directly (``forward_features``) whose earlier block ran a size
    twin's block, the same twin's block for this one when it takes the call: a block whose
    shapes are also those of another size (PVTv2's last 2x2 stage at 48 and 64 px) ran that
    size's block, from scores it did not have (the output then differed from the model's
    forward at that size, and with the twins built before)."""
    if torch.compiler.is_compiling():
        return None
    local = spec.runtime._local
    held = getattr(local, "direct", None)
    if held is None:
        return None
    variant, last = held
    if spec.index <= last:            # a new forward
        local.direct = None
        return None
    twin = variant.blocks[spec.index]
    try:
        _bound(twin._evoplug_spec, args, kwargs, held=_block_of(spec))
    except AnalysisError:
        local.direct = None
        return None
    local.direct = (variant, spec.index)
    return twin

