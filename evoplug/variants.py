"""Twins of a converted model for calls it was not converted for: another input size, or
block arguments of another form (a padding mask that is None in one batch and a tensor in the
next). A twin is the model converted again on that call, whose converted blocks (and their
ancestors) are new module objects sharing every parameter, buffer and other submodule with the
model (runtime/entry.py ``SizeVariant``); the runtime asks for one through the factory api.py
installs with the entry hook (:func:`size_variant`), at the first forward that needs it."""
from __future__ import annotations

import dataclasses
import inspect
import time
import types
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

from .analyse.discover import _SQUARE
from .analyse.modes import _OWN_CHECKPOINT
from .analyse.probes import CALL_HOOK_DICTS, hooks_suspended
from .copies import remade_class
from .errors import ConversionError, EvoplugError
from .options import EvoOptions
from .report import ConversionReport, get_report
from .runtime.block import evo_class
from .runtime.sharded import fsdp_name, made_by_fsdp, sharded_inside
from .runtime.spec import BlockSpec
from .runtime.entry import SizeVariant, images_in
from .runtime.state import Plan


def on_more_images(convert_on: Callable[[int], Any]):
    """``convert_on(n)`` on 1 image, then on 2 and 3 where a block's token count is 1 (a
    pyramid's last stage at a small size): batch 1 cannot tell the batch dim from the token dim
    (the refusal ``_SQUARE``). For the first conversion and for twins alike."""
    square = _SQUARE.split("{}")[1]
    for n in (1, 2, 3):
        try:
            return convert_on(n)
        except ConversionError as e:
            if n == 3 or square not in str(e):
                raise


def size_variant(model: nn.Module, args, kwargs, strict: bool = True,
                 batch_dims=None, on: str = "first", *, convert: Callable) -> SizeVariant:
    """The model converted again for the input of this call (another size than the one it was
    converted at): a twin whose converted blocks and their ancestors are new module objects
    (sharing every parameter, buffer and other submodule with the model), converted with the
    model's options on the call's first image. Called by the runtime at the first forward with
    that input size (see runtime/entry.py SizeVariant); what it cost is kept in ``seconds``.
    ``on``: which of the call's images it is converted on (:func:`_convert_twin`; a form twin,
    runtime/twins.py ``_form_twin``: the form of a padding mask follows the whole batch, not its
    first image). ``convert``: :func:`evoplug.convert`, which converts the twin (handed in by
    api.py: this module is below it)."""
    _refuse_under_vmap(model, on)
    _refuse_sharded(model, on)
    report = get_report(model)
    t0 = time.perf_counter()
    # (blocks removed after conversion, timm's prune_intermediate_layers: the twin converts the
    # ones left, in their roles at the conversion; a KeyError until the twenty-sixth session)
    present = [s for s in report.blocks if s.name not in report.removed]
    if len(present) < 2:
        raise EvoplugError(
            f"{type(model).__name__}: converted blocks were removed after conversion "
            f"({', '.join(report.removed)}) and {len(present)} is left, which evolves no tokens; "
            "a call at a new input size would convert the model again, which needs two blocks. "
            "evoplug.revert(model) gives the dense model, which runs at any size")
    twin, pairs = _twin(model, {id(s.analysis.module) for s in present})
    for s in present:
        m = pairs[id(s.analysis.module)]
        m.__class__ = unconverted_class(s)     # (with a parametrization made since)
        m.__dict__.pop("_evoplug_spec", None)
        for name in s.added_buffers:
            m._buffers.pop(name, None)
    twin.__dict__.pop("_evoplug_report", None)
    options = {f.name: getattr(report.options, f.name) for f in dataclasses.fields(report.options)}
    shared = [m for m in model.modules() if id(m) not in pairs]
    for m in pairs.values():
        # (transformers' output-capturing hooks: the twin's calibration installs its own, which
        # heads reading the hidden states need; dropped below)
        m.__dict__.pop("_output_capturing_hooks_installed", None)
    try:
        # the user's hooks on the modules the twin shares do not see its analysis' forwards
        # (no other thread runs the model meanwhile: EvoRuntime.variant_for)
        with hooks_suspended(*shared):
            _convert_twin(convert, twin, args, kwargs, batch_dims, strict, options, on)
        # (the twin's blocks run inside the model's, whose hooks fire: hooks its analysis left
        # on its own modules fired again, transformers' hidden states and attentions twice each;
        # the conversion's restore, analyse/snapshot.py, removes them with the rest)
    except ConversionError as e:
        what = "an input of another size than the one it was converted at needs the model " \
               "converted again for that size" if on == "first" else \
               "a call whose block arguments take another form (None or a tensor) than at the " \
               "conversion needs the model converted again on that call"
        raise EvoplugError(f"{type(model).__name__}: {what}, which failed: {e}") from None
    converted = get_report(twin).blocks
    _check_twin_blocks(model, report, [id(s.analysis.module) for s in converted],
                       [id(pairs[id(s.analysis.module)]) for s in present],
                       [s.analysis.name for s in converted])
    blocks = [pairs.get(id(s.analysis.module)) for s in report.blocks]    # (by spec.index)
    runtime = converted[0].runtime
    runtime.parent = report.blocks[0].runtime
    if report.removed:
        runtime.plan = plan_of_blocks_left(runtime.plan.options, report.blocks[0].runtime.plan.roles,
                                           blocks)
    added = {id(s.analysis.module): set(s.added_buffers) for s in report.blocks}
    triples = [(m, pairs[id(m)], tuple(n for n in m._buffers if n not in added.get(id(m), ())))
               for m in model.modules() if id(m) in pairs]
    return SizeVariant(twin, blocks, triples, time.perf_counter() - t0, runtime)


def _check_twin_blocks(model: nn.Module, report: ConversionReport, converted, present, names):
    """A twin must convert the blocks left of the conversion's (``present``), in their order
    (ids of the twin's modules). The same blocks in another order are blocks reordered after
    the conversion, whose twin would run in the new order and the model at the conversion's
    size in the old one: refused naming them (the refusal said "other blocks convert", listing
    the same names, until the forty-third session)."""
    if converted == present:
        return
    if sorted(converted) == sorted(present) and report.moved:
        where = ", ".join(f"`{now}` (converted as `{then}`)" for then, now in report.moved.items())
        raise EvoplugError(
            f"{type(model).__name__}: its converted blocks were put in another order after the "
            f"conversion ({where}); converted blocks keep the order of the conversion, and a "
            "call at another input size, which converts the model again for that size, cannot "
            "run them in it. Convert after reordering blocks: "
            "evoplug.convert(evoplug.revert(model), ...)")
    raise EvoplugError(f"{type(model).__name__}: at this input size other blocks convert "
                       f"({names}) than at the size it was converted at; convert it for this size")


def plan_of_blocks_left(options: EvoOptions, roles, blocks) -> Plan:
    """The plan of a twin of the blocks left after some were removed (``blocks``: the twin's
    block for each converted block, None for a removed one): their roles in the model, not
    those a conversion of fewer blocks would give."""
    return Plan(options, [r for r, b in zip(roles, blocks) if b is not None])


def _refuse_under_vmap(model: nn.Module, on: str):
    """A twin cannot be analysed inside ``torch.func.vmap`` (its analysis draws noise and
    compares tensors: functorch's raw errors came out, audit P of the twenty-sixth session);
    other transforms (grad, jvp) build it as usual."""
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        inside = any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())
    except (ImportError, AttributeError):        # (private API: not there, nothing to check)
        return
    if inside:
        what = "an input size" if on == "first" else "a form of the block arguments"
        raise EvoplugError(
            f"{type(model).__name__}: called inside torch.func.vmap with {what} it was not "
            "converted at: evoplug converts the model again for it first, which it cannot do "
            "inside vmap. Call the model once at this size outside vmap (one input is enough), "
            "then vmap it: later calls at that size run under vmap")


def _refuse_sharded(model: nn.Module, on: str):
    """A twin cannot be converted while a unit of FSDP inside the model holds its parameters
    sharded (they are gathered only around that unit's forward; the twin's analysis runs
    the twin's blocks outside it): the build failed with a shape error from the analysis, or
    crashed the process (FSDP1 with flat parameters), until the fifty-sixth session. A twin
    built before the sharding runs (runtime/sharded.py)."""
    path = sharded_inside(model)
    if path is None:
        return
    what = "an input size" if on == "first" else "a form of the block arguments"
    raise EvoplugError(
        f"{type(model).__name__}: called with {what} it was not converted at, for which "
        f"evoplug converts it again (a twin sharing its parameters), while `{path}` is "
        f"sharded by {fsdp_name(model.get_submodule(path))}: its parameters are gathered only "
        "around its own forward, not for that conversion. Call the converted model once with "
        "each input size it will take (under torch.no_grad(), one image is enough) before "
        "sharding it: the twins built then run sharded. (Sharded as one unit, the whole model, "
        "it converts again at any size)")


def _convert_twin(convert: Callable, twin: nn.Module, args, kwargs, batch_dims, strict: bool,
                  options: dict, on: str = "first"):
    """Convert the twin on the call's first image (``on="form"``: on images that give the
    call's argument form, :func:`_form_images`; ``"all"``: on the whole call); where a block's
    token count is 1 (a pyramid's last stage at a small size), batch 1 cannot tell the batch
    dim from the token dim: then on 2 images, then 3 (the first repeated where the call has
    fewer). Images holding NaN or inf are left out (one corrupt first image made every block
    look as if it could not run on a token subset; audit A3 of the twenty-seventh session)."""
    args, kwargs = _finite_images(twin, args, kwargs, batch_dims)
    if on != "first":
        if args and kwargs:
            args, kwargs = _by_name(twin, args, kwargs)
        pick = _form_images(args, kwargs, batch_dims) if on == "form" else None
        if pick != [0]:
            try:
                return convert(twin, inplace=True, strict=strict, **options,
                               example_input=_first_image(args, kwargs, batch_dims, None, pick))
            except ConversionError as e:
                if _SQUARE.split("{}")[1] not in str(e):
                    raise
    on_more_images(lambda n: convert(twin, inplace=True, strict=strict, **options,
                                     example_input=_first_image(args, kwargs, batch_dims, n)))


def _finite_images(model: nn.Module, args, kwargs, batch_dims):
    """The call without its images whose floating-point tensors hold NaN or inf (the call
    itself when every image is finite); an :class:`EvoplugError` when none is."""
    tensors = _call_tensors(args, kwargs, batch_dims)
    images = _call_images(args, kwargs, tensors)
    floats = [(t, d) for t, d in tensors if t.is_floating_point() and t.shape[d] == images]
    if not floats:
        return args, kwargs
    bad = torch.zeros(images, dtype=torch.bool)
    for i, (t, d) in enumerate(floats):
        bad |= corrupt(t.detach().movedim(d, 0).reshape(images, -1), i == 0).any(1).cpu()
    if not bool(bad.any()):
        return args, kwargs
    if bool(bad.all()):
        raise EvoplugError(
            f"{type(model).__name__}: a call at an input size (or argument form) it was not "
            "converted at, whose every image holds NaN or inf (NaN outside the images): evoplug converts the model again "
            "for it on a finite image of the call (checking the blocks against the model on it); "
            "call it once with finite images")
    return _on_call_tensors(args, kwargs, batch_dims, _images_of((~bad).nonzero().flatten(), images))


def _images_of(index: torch.Tensor, images: int):
    """``(t, d) ->`` the images ``index`` of a call's tensor ``t`` with its batch dim ``d``; a
    tensor of another length than the call's images (a mask shared by the batch) whole."""
    return lambda t, d: t if t.shape[d] != images else t.index_select(d, index.to(t.device))


def _on_call_tensors(args, kwargs, batch_dims, fn):
    """(args, kwargs) of a call with ``fn(t, batch dim)`` applied to each of its tensors of one
    dim or more (in its dicts, lists and tuples too: NaFlex's dict of patches, coordinates and
    mask; batch dim 0 but for ``batch_dims``' arguments)."""
    dims = batch_dims or {}

    def one(k, v):
        if isinstance(v, (dict, list, tuple)):
            return torch.utils._pytree.tree_map(lambda t: one(None, t), v)
        return fn(v, dims.get(k, 0)) if isinstance(v, torch.Tensor) and v.dim() > 0 else v

    return tuple(one(i, v) for i, v in enumerate(args)), {k: one(k, v) for k, v in kwargs.items()}


def corrupt(t: torch.Tensor, images: bool) -> torch.Tensor:
    """Where a call's floating-point tensor holds a value no image has: NaN or inf in the
    images (the call's first floating-point tensor), NaN in the others (an additive mask holds
    -inf where it masks: PyTorch's documented float masks; audit Q3)."""
    return ~torch.isfinite(t) if images else torch.isnan(t)


def _form_images(args, kwargs, batch_dims) -> List[int]:
    """Two images of a call: its first, and of the images whose integer or boolean arguments of
    2 dims or more that hold one entry per image (a padding mask, not a label, nor a mask shared
    by the batch) differ from its, the one with the fewest nonzero entries in them (the most
    padded); the second image when none differs ([0] for one image). A model such as
    transformers' passes its blocks a mask only when some image is padded, so these two give
    the blocks the arguments (None or a tensor) the whole batch gives them, at the cost of 2
    images, not the batch's (and a per-image mask is analysed on 2, as it needs)."""
    tensors = _call_tensors(args, kwargs, batch_dims)
    images = _call_images(args, kwargs, tensors)
    leaves = [(t, d) for t, d in tensors
              if t.dim() >= 2 and not t.is_floating_point() and t.shape[d] == images]
    differ = [i for i in range(1, images)
              if any(not torch.equal(t.select(d, i), t.select(d, 0)) for t, d in leaves)]
    if not differ:
        return [0, 1] if images > 1 else [0]
    return [0, min(differ, key=lambda i: sum(int(t.select(d, i).count_nonzero()) for t, d in leaves))]


def _call_tensors(args, kwargs, batch_dims) -> List[Tuple[torch.Tensor, int]]:
    """The tensors of a call (in its dicts, lists and tuples too) with their batch dims."""
    dims = batch_dims or {}
    return [(t, dims.get(k, 0)) for k, v in (*enumerate(args), *kwargs.items())
            for t in torch.utils._pytree.tree_leaves(v) if isinstance(t, torch.Tensor) and t.dim() > 0]


def _call_images(args, kwargs, tensors) -> int:
    """The images of a call: :func:`images_in`, else the batch dim of its first tensor."""
    images = images_in(args, kwargs)
    if images is None:
        images = tensors[0][0].shape[tensors[0][1]] if tensors else 1
    return images


def _by_name(model: nn.Module, args, kwargs):
    """A call that passes some arguments by position and some by keyword, every argument by
    keyword (``model(x, attention_mask=m)``: an example input is a tuple or a dict); the call
    unchanged when its positional ones have no name (``*args``)."""
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return args, kwargs
    named = {}
    for name, v in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if v:
                return args, kwargs
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(v)
        else:
            named[name] = v
    return (), named


_HOOK_DICTS = CALL_HOOK_DICTS + ("_state_dict_hooks", "_state_dict_pre_hooks",
                                 "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _twin(model: nn.Module, blocks: set):
    """New objects for the converted blocks and the modules above them (their own attribute,
    buffer, child and hook dicts, without hooks); every other submodule, and every parameter
    and buffer, is shared. Returns (twin root, {id(original): twin})."""
    pairs = {}

    def copy(m: nn.Module) -> nn.Module:
        holds = id(m) in blocks or any(id(d) in blocks for d in m.modules())
        if not holds:
            return m
        t = object.__new__(type(m))
        t.__dict__ = dict(m.__dict__)
        # what is bound to the original runs the original: ``nn.Module.compile()``'s
        # ``_compiled_call_impl`` (the twin's calibration ran the model, which waited for the
        # twin: a hang) and methods bound on the instance (audit V6, thirty-seventh session)
        t.__dict__.pop("_compiled_call_impl", None)
        for k, v in list(t.__dict__.items()):
            if isinstance(v, types.MethodType) and v.__self__ is m:
                t.__dict__[k] = types.MethodType(v.__func__, t)
        if id(m) in blocks:
            _unwrapped(m, t)
        t._buffers = dict(m._buffers)      # (its conversion adds buffers of its own)
        # the parameters dict itself is shared: one replaced on the model (load_state_dict with
        # assign=True, a parameter set anew) is the twin's too
        for name in _HOOK_DICTS:
            if name in t.__dict__:
                t.__dict__[name] = type(m.__dict__[name])()
        pairs[id(m)] = t
        if id(m) not in blocks:
            t._modules = {n: (copy(c) if c is not None else None) for n, c in m._modules.items()}
        return t

    return copy(model), pairs


def _unwrapped(block: nn.Module, twin: nn.Module):
    """The twin's copy of a converted block without what the model's block's call does around
    its forward, inside which the twin's block runs (runtime/block.py ``_twin_ran``): a forward
    set on the instance that wraps the block's own (MMEngine's ``activation_checkpointing``,
    ``wrap_forward``: the copy's called the model's block's forward, and the twin's conversion
    refused it as "extra positional arguments", until the fifty-third session), and
    transformers' own checkpointing flag, on where ``gradient_checkpointing_enable()`` ran
    before the twin was built: its block checkpointed again inside the model's block's
    checkpoint, each layer recomputed twice in a reentrant backward (checkpoint calls nested 2
    deep, 12 a step for 4 layers where 4 do at the conversion's size). A twin built before
    never had it on: the model's block alone decides, as its flag now says. Any other forward
    set on the block's instance after the conversion goes too (the conversion refuses a block
    holding one, api.py ``_analyse_candidate``): the model's block runs it, and it reaches the
    twin's block only through the converted forward (a lambda calling the block's forward bound
    before: the copy called the model's block again, and the twin's conversion refused it as
    "extra positional arguments" until the fifty-fifth session)."""
    twin.__dict__.pop("forward", None)
    if twin.__dict__.get(_OWN_CHECKPOINT) is True:
        twin.__dict__[_OWN_CHECKPOINT] = False


def _first_image(args, kwargs, batch_dims=None, n: Optional[int] = 1,
                 pick: Optional[List[int]] = None):
    """The call's input with batch size ``n`` (along each argument's batch dim: dim 0 but for
    ``batch_dims``'; its first image repeated where the call has fewer; None: the whole call,
    or its images ``pick``, which leaves a tensor of another length than the call's images whole:
    a mask shared by the batch), in the form convert takes an example input."""
    if bool(args) == bool(kwargs):
        raise EvoplugError("an input of another size than the one the model was converted at, "
                           "passed both positionally and by keyword: convert the model for it")

    def first(t: torch.Tensor, d: int) -> torch.Tensor:
        if t.shape[d] >= n:
            return t.narrow(d, 0, n)
        return torch.cat([t.narrow(d, 0, 1)] * n, d)

    if n is not None:
        fn = first
    elif pick is not None:
        images = _call_images(args, kwargs, _call_tensors(args, kwargs, batch_dims))
        fn = _images_of(torch.tensor(pick), images)
    else:
        fn = lambda t, d: t  # noqa: E731
    a, k = _on_call_tensors(args, kwargs, batch_dims, fn)
    if kwargs:
        return k
    if len(args) == 1 and not isinstance(args[0], (dict, list, tuple)):
        return a[0]
    return a                                                    # (a lone dict stays positional)


def unconverted_class(spec: BlockSpec) -> type:
    """The class a converted block goes back to: its original class, with the subclasses made
    on top of the converted one since (``torch.nn.utils.parametrize`` makes one per
    parametrized module) made again on top of the original, so they keep working."""
    cls, evo, above = type(spec.analysis.module), evo_class(spec.orig_class), []
    while cls is not evo:
        if len(cls.__bases__) != 1 or not issubclass(cls, evo):
            how = " (by FSDP's fully_shard or replicate: revert before sharding, or load the " \
                "model's state_dict into the dense model)" if made_by_fsdp(cls, cls.__bases__[-1]) \
                else ""
            raise EvoplugError(f"`{spec.name}`: its class {cls.__qualname__} was changed after "
                               f"the conversion in a way revert cannot undo{how}")
        above.append(cls)
        cls = cls.__bases__[0]
    out = spec.orig_class
    for c in reversed(above):
        out = remade_class(c, (out,), c.__name__.replace(evo.__name__, spec.orig_class.__name__))
    return out
