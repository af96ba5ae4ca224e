"""Public API: convert a model, explain what was done, change options, revert.

Data flows one way: calibrate (one eager forward) -> analyse (fx, per block) -> plan (roles
from the options) -> rewrite (slow-path programs, class swap).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import numbers
import random
import sys
import warnings
from typing import List, Optional, Tuple

import torch
from torch import nn

from .analyse.block import BlockAnalysis, analyse_block, refuse_forward_on_instance
from .analyse.discover import BETWEEN, attention_modules, find_blocks, regroup_parts, wrapped_block
from .analyse.probes import (check_count_free_program, count_probe_graph, probe_program,
                             quantised_hint)
from .analyse.calibrate import CalibrationFailed, calibrate
from .analyse.snapshot import (changed_in_training, changed_tensors, changed_values, kept_below,
                               moved_by_input, restore, snapshot)
from .analyse.writes import recorded_assignments
from .analyse.provenance import (class_token_rows, images_in_rows, rest_read, rows_not_images,
                                 stream_starts, token_provenance, varying_arguments)
from .analyse.chain import chain_links, fresh_token_blocks
from .analyse.inputs import declared_input
from .analyse.inputs import example_input as _example_input
from . import quality
from .copies import copy_model
from .install import install_block, suffix_counts
from .errors import AnalysisError, ConversionError
from .options import CONVERSION_FIELDS, EvoOptions, check_flag, check_names, follow_copy
from .rewrite.pairs import regroup_residual_pairs
from .rewrite.program import build_program
from .runtime import evolve as ev
from .report import ConversionReport, converted_inside, get_report, is_converted, unscored, unscored_reason
from .report import explain, format_report, gives_row, tokens_per_block  # noqa: F401 (API)
from .runtime.pairs import undo_regroup
from .runtime.block import EvoBlockMixin
from .runtime.spec import BlockSpec
from .runtime.entry import EntryHook, batch_dims, images_in, input_key, named_tensors
from .runtime.state import EvoRuntime, Plan
from .variants import corrupt, on_more_images, plan_of_blocks_left, size_variant, unconverted_class


def convert(model: nn.Module, keep_ratio: float = 0.5, *, example_input=None, images=None,
            strict: bool = True, inplace: bool = False, **options) -> nn.Module:
    """Inject Evo-ViT slow-fast token evolution into the transformer blocks of ``model``.

    Returns a converted **copy** by default (``inplace=True`` converts ``model`` itself). The
    converted model has the same parameters, buffers, state_dict keys and output shapes: an
    existing checkpoint loads into it strictly and it fine-tunes as usual.

    Args:
        keep_ratio: fraction of patch tokens updated slowly in evolving blocks, in (0, 1].
        example_input: an input to run once for the analysis; by default an image batch of the
            model's declared input size (:func:`input_size`), or the first of ``images``.
        images: calibration images (a (N, C, H, W) tensor or an iterable of them) of a
            classifier: with ``global_query='auto'`` and a class token, the model is converted
            with both queries and the one whose predictions agree more often with the dense
            model's on these images at ``keep_ratio`` is kept (both agreements are in
            ``get_report(m).query_agreement`` and :func:`explain`). Without a class token, or
            with another ``global_query``, they only provide the example input.
        strict: raise :class:`evoplug.ConversionError` if a block that looks like a transformer
            block cannot be converted (naming the module and reason); ``strict=False`` converts
            the others and :func:`explain` reports the rest. A model with fewer than two
            convertible blocks (nothing would evolve) raises whatever ``strict`` is.
        inplace: convert ``model`` itself instead of a copy.
        **options: fields of :class:`evoplug.EvoOptions` (start_block, trade_off,
            reselect_every, representative, global_query, num_prefix_tokens,
            identity_fast_path).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"evoplug.convert takes an nn.Module, got {type(model).__name__}"
                        + (" (some modules' train()/eval() return None: call model.eval() on its "
                           "own line)" if model is None else ""))
    check_names(options, ("example_input", "images", "strict", "inplace"))
    if _compiled_inner(model) is not None:
        # a torch.compile wrapper: its module is converted (the analysis' forwards ran through
        # Dynamo, recompiling at each and hitting its recompile limit: 16.7 s against 0.34 s
        # for a 4-block ViT-Ti until the fifty-second session), in the wrapper (or its copy),
        # which compiles the converted model at its next call as torch.compile(convert(m)) does
        out = model if check_flag("inplace", inplace) else copy_model(model)
        convert(_compiled_inner(out), keep_ratio, example_input=example_input, images=images,
                strict=strict, inplace=True, **options)
        return out
    with _plain_modes():
        return _convert_checked(model, keep_ratio, example_input, images, strict, inplace, options)


def _compiled_inner(model: nn.Module) -> Optional[nn.Module]:
    """The module a ``torch.compile`` wrapper (Dynamo's ``OptimizedModule``) compiles, or None."""
    frame = sys.modules.get("torch._dynamo.eval_frame")     # (not imported: no such wrapper)
    if frame is None or not isinstance(model, frame.OptimizedModule):
        return None
    inner = model._modules.get("_orig_mod")
    return inner if isinstance(inner, nn.Module) else None


@contextlib.contextmanager
def _plain_modes():
    """A conversion runs outside autocast and inference mode, whatever the caller's: the analysis
    runs in the model's own dtype (under autocast the probes compared bfloat16 outputs at float32
    tolerances and refused every block), and what it makes (the copy's parameters, index
    buffers, a twin built in an inference_mode validation pass) are plain tensors that training
    can use (until the eighteenth session they were inference tensors, and training failed)."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        stack.enter_context(torch.inference_mode(False))
        yield


def _convert_checked(model, keep_ratio, example_input, images, strict, inplace, options):
    # (flags of the wrong type are refused as the options' are: strict='False' was read as
    # true, MMPretrain's backbone configs included; audit Y3 of the thirty-ninth session)
    strict, inplace = check_flag("strict", strict), check_flag("inplace", inplace)
    if images is not None:
        images = quality.as_image_tensor(images)
        if example_input is None:
            example_input = images[:1]
        if options.get("global_query", "auto") == "auto":
            return _convert_choosing_query(model, keep_ratio, images, example_input, strict,
                                           inplace, options)
    one = example_input is None or (isinstance(example_input, torch.Tensor)
                                    and example_input.dim() >= 1 and example_input.shape[0] == 1)
    if not one:
        return _convert(model, keep_ratio, example_input, strict, inplace, options)

    def on(n: int):     # the input evoplug makes, or the caller's one image repeated
        x = example_input
        if n > 1:
            x = _example_input(model, n)[0] if x is None else torch.cat([x] * n)
        return _convert(model, keep_ratio, x, strict, inplace, options)
    return on_more_images(on)


def _convert(model: nn.Module, keep_ratio, example_input, strict: bool, inplace: bool,
             options: dict) -> nn.Module:
    """:func:`convert` with its arguments checked: calibrate -> analyse -> plan -> rewrite ->
    install."""
    # everything is checked before the model is touched: a conversion that fails (inplace or
    # not) leaves the model exactly as it was
    opts = EvoOptions(keep_ratio=keep_ratio, **options)
    _refuse_converted(model)
    _check_model(model)
    if not inplace:
        model, opts = _copy_for_conversion(model, opts)
    analysed, parts = [], []
    with _no_side_effects(model) as moved:
        with recorded_assignments() as set_by:      # (who set what: writes.set_up_on_first_call)
            calls, attn_mods, candidates, failed, skipped, example, regrouped = _calibrate_pairs(
                model, example_input)
        # (what the forwards moved, tensors and plain values, and who set what)
        calls.derived.update(zip(("kept_state", "set_values"), moved()), set_by=set_by)
        try:
            for name, module, call in candidates:
                try:
                    prior = analysed[-1][0] if analysed else None
                    analysed.append(_analyse_candidate(model, name, module, call, calls,
                                                       attn_mods, opts, prior))
                except AnalysisError as e:
                    if e.not_a_block:
                        parts.append((name, e.reason, e.not_a_block))
                    else:      # (a quantised block says so, whichever probe refused it)
                        failed.append((name, e.reason + quantised_hint(module, e.reason)))
            _drop_read_rest(model, example, analysed, failed)
            failed += _parts_refused(model, calls, parts, [an.name for an, _, _ in analysed])
            failed.sort(key=lambda f: _order(calls, model, f[0]))
            _check_convertible(model, analysed, failed, skipped, strict)
            starts, roles, links = _plan(model, example, [a for a, _, _ in analysed], calls, opts,
                                         strict)
        except BaseException:
            for a, _, added in analysed:
                _drop_added_buffers(a.module, added)
            for name in regrouped:
                undo_regroup(model.get_submodule(name))
            raise
        regrouped = _keep_regrouped(model, regrouped, [a.name for a, _, _ in analysed])
    runtime = EvoRuntime(Plan(opts, roles))
    volatile, set_by, filled = (calls.derived.get(k, {}) for k in ("volatile", "set_by", "filled"))
    images = (images_in((), example) if isinstance(example, dict) else
              images_in(tuple(example), {}) if isinstance(example, (tuple, list)) else
              images_in((example,), {}))
    seq_batch = _sequence_first_batch(analysed[0][0])
    specs = [install_block(i, a, programs, added, runtime, volatile, images, set_by, filled)
             for i, (a, programs, added) in enumerate(analysed)]
    _relate(specs, links, starts)
    _tell_state_from_tokens(specs)
    model._evoplug_report = ConversionReport(type(model).__name__, opts, specs, failed, skipped,
                                             _install_entry_hook(model, runtime, example, strict,
                                                                 seq_batch, specs), regrouped=regrouped)
    return model


def _refuse_converted(model: nn.Module):
    """A ``ConversionError`` where ``model`` is, holds, or shares blocks with a converted model,
    saying what to do instead."""
    if not is_converted(model):
        return
    whole = getattr(model, "_evoplug_report", None) is not None
    inner, block = converted_inside(model)
    raise ConversionError(
        f"{type(model).__name__} is already converted; use evoplug.set_options() to change "
        "its options" if whole else
        f"{type(model).__name__} holds a model evoplug converted, `{inner}`: convert "
        f"evoplug.revert(model.{inner}) first, or change its options with "
        f"evoplug.set_options(model.{inner}, ...)" if inner else
        # (blocks shared with a model converted elsewhere: they named nothing, and the advice
        # given, set_options or revert on this model, raised; audit C2, twenty-sixth session)
        f"{type(model).__name__} holds blocks of a model evoplug converted (`{block}`; this "
        "is a part of it, or shares blocks with it): change the options on that model "
        "(evoplug.set_options(that_model, ...)), revert it (evoplug.revert(that_model)), or "
        "convert a copy of this one with blocks of its own (copy.deepcopy of the original)")


def _tell_state_from_tokens(specs):
    """Warn where a block's forward sets a tensor from its tokens on itself or a module it
    traced into (an attention map kept for visualisation), or a module its programs call whole
    changed a buffer or tensor attribute at the calibration with what it was called with (a
    running mean in ``norm1``, a count in ``mlp``: audit J1 of the forty-fifth session; not
    what it computes from its weights, ``spectral_norm``'s: analyse/snapshot.py
    ``moved_by_input``): an evolving block sets it for the tokens it runs (audit H4 of the
    forty-fourth session: it kept a batch from before the conversion, without a word)."""
    found = [(s.name, a) for s in specs for a in s.state_from_tokens]
    if found:
        names = ", ".join(f"`{b}.{a}`" for b, a in found[:4]) + (" ..." if len(found) > 4 else "")
        warnings.warn(f"evoplug: {names}: set by the block's forward (or a module it calls) "
                      "from its tokens; where the block evolves it holds the value of the tokens "
                      "it ran (prefix, kept tokens in score order, the representative token), not "
                      "of every token in order; keep_ratio=1.0 runs the block's own forward",
                      stacklevel=4)


def _plan(model: nn.Module, example, blocks: List[BlockAnalysis], calls, opts: EvoOptions,
          strict: bool):
    """(where token streams start, the blocks' roles, the block each hands its tokens on to)
    of the converted ``blocks``; marks those whose tokens are not the block before's output
    row by row (``fresh_tokens``: their scores start afresh)."""
    names = set(calls.derived.get("stream_starts", ()))
    starts = [i for i, a in enumerate(blocks) if i and a.name in names]
    for i in fresh_token_blocks(model, example, blocks):
        blocks[i].fresh_tokens = True
    roles = plan_roles(opts, blocks, starts)
    _check_scored(model, blocks, roles, strict, starts)
    return starts, roles, chain_links(blocks, calls)


def _calibrate_pairs(model: nn.Module, example_input):
    """:func:`_calibrate`, and again where residual pairs were regrouped into blocks
    (``rewrite/pairs.py``: then found as any block); the regrouped parents' names last."""
    found = _calibrate(model, example_input)
    regrouped, why = regroup_residual_pairs(model, found[0])
    if regrouped:
        try:
            found = _calibrate(model, found[-1])
        except BaseException:
            for name in regrouped:
                undo_regroup(model.get_submodule(name))
            raise
    found[0].derived["not_regrouped"] = why
    return (*found, regrouped)


def _parts_refused(model: nn.Module, calls, parts, converted):
    """The refusals of parts that are no blocks (:func:`regroup_parts`), with why a parent's
    residual pairs were not regrouped into blocks, where that parent holds them."""
    why, out = calls.derived.get("not_regrouped", {}), []
    for name, reason in regroup_parts(model, calls, parts, converted):
        parent = next((p for p in why if not p or name == p or name.startswith(p + ".")), None)
        out.append((name, reason if parent is None else (
            f"{reason}; {f'`{parent}`' if parent else 'the model'} adds its pairs' residual branches itself, and they were not "
            f"regrouped into blocks: {why[parent]}")))
    return out


def _keep_regrouped(model: nn.Module, regrouped: List[str], converted: List[str]) -> Tuple[str, ...]:
    """The regrouped parents that hold a converted pair; the others put back as they were."""
    kept = []
    for name in regrouped:
        pairs = model.get_submodule(name)._evoplug_regrouped.pairs
        inside = {f"{name}.{p}" if name else p for p in pairs}
        if inside & set(converted):
            kept.append(name)
        else:
            undo_regroup(model.get_submodule(name))
    return tuple(kept)


def _relate(specs: List[BlockSpec], links, starts):
    """What the installed blocks know of each other: the next block each hands its tokens on
    to (``links``, :func:`chain_links`), where a token stream starts, and whether the scores
    come from a reduced map somewhere (PVT, Twins, SegFormer: ties the map's symmetry makes are
    rounded apart by the batch, and the selection takes near-ties at its cut as ties)."""
    near_ties = any(s.analysis.kv_grid is not None for s in specs)
    for spec, link in zip(specs, links):
        # (a sequence-first block takes its tokens through a transpose: none is handed on)
        spec.chain_next = None if link is None or spec.call.token_perm or \
            specs[link].call.token_perm else specs[link]
        spec.starts_stream = spec.index in starts
        spec.near_ties = near_ties
    _share_positions(specs)


def _share_positions(specs: List[BlockSpec]):
    """A selection serves the blocks after it until the next one (``reselect_every``), within a
    run of blocks of the same tokens in one stream: where any of them reads the tokens' original
    positions (a 2-D map op, a position term), every selection in the run takes them. Until the
    thirty-ninth session a plain block's selection had none, and a depthwise-conv MLP after it
    got the subset for its map (a shape error; audit Y5)."""
    run: List[BlockSpec] = []
    for spec in specs + [None]:
        if run and (spec is None or spec.starts_stream or _tokens(spec) != _tokens(run[-1])):
            reads = any(s.needs_pos for s in run)
            for s in run:
                s.selects_pos = reads
            run = []
        if spec is not None:
            run.append(spec)


def _tokens(spec: BlockSpec):
    return spec.analysis.num_tokens, spec.num_prefix, spec.num_suffix


def _convert_choosing_query(model, keep_ratio, images, example_input, strict, inplace, options):
    """``global_query='auto'`` measured: with a class token, the conversion (cls or mean query)
    whose top-1 predictions on ``images`` agree more often with the dense model's."""
    options = {k: v for k, v in options.items() if k != "global_query"}
    first = convert(model, keep_ratio, example_input=example_input, strict=strict, **options)
    report = get_report(first)
    if not report.blocks or report.blocks[0].analysis.global_query != "cls":
        chosen, agree = "mean", None           # no class token: the mean query is the only one
    else:
        dense = quality.outputs(model, images)
        agree = {"cls": quality.agreement(quality.outputs(first, images), dense)}
        second = convert(model, keep_ratio, example_input=example_input, strict=strict,
                         global_query="mean", **options)
        agree["mean"] = quality.agreement(quality.outputs(second, images), dense)
        chosen = "mean" if agree["mean"] > agree["cls"] else "cls"
        first = second if chosen == "mean" else first
    if inplace:      # the measurement ran on copies; the model itself converted once more
        first = convert(model, keep_ratio, example_input=example_input, strict=strict,
                        inplace=True, global_query=chosen, **options)
    get_report(first).query_agreement = agree
    return first


def _sequence_first_batch(first: BlockAnalysis) -> Optional[int]:
    """The images of the first converted block when it is sequence-first (bound as (B, N, C)
    from (N, B, C)), else None."""
    if first.plan.token_perm[:1] != (1,):
        return None
    return first.plan.bind(first.name, first.call.args, first.call.kwargs)[0].shape[0]


def _install_entry_hook(model: nn.Module, runtime: EvoRuntime, example_input,
                        strict: bool = True, seq_batch: Optional[int] = None,
                        specs: Tuple[BlockSpec, ...] = ()) -> Tuple[int, int]:
    """Hooks that tell the blocks when the model's own forward runs, called like calibration
    called it, and with which input size (see runtime/entry.py EntryHook, SizeVariant); returns
    their ids (revert removes them). ``seq_batch``: the images of the first converted block when
    it is sequence-first (an input laid out (N, B, ...) has its batch dim 1: ``batch_dims``)."""
    factory = functools.partial(size_variant, strict=strict, convert=convert)
    args, kwargs = ((), example_input) if isinstance(example_input, dict) else \
        (tuple(example_input), {}) if isinstance(example_input, (tuple, list)) else ((example_input,), {})
    named = named_tensors(model, args, kwargs)
    dims = {**batch_dims(args, kwargs, seq_batch), **batch_dims((), named or {}, seq_batch)}
    hook = EntryHook(runtime, len(args), kwargs, input_key(args, kwargs, dims), factory)
    hook.batch_dims = dims
    hook.set_counts(suffix_counts(specs, named), named)
    if named:      # other call forms (by keyword, with flags) find their input size by name
        hook.set_names(named)
    pre = model.register_forward_pre_hook(hook, with_kwargs=True)
    post = model.register_forward_hook(hook.exit, with_kwargs=True, always_call=True)
    return pre.id, post.id


@contextlib.contextmanager
def _restored(setter, state):
    try:
        yield
    finally:
        setter(state)


@contextlib.contextmanager
def _no_side_effects(model: nn.Module):
    """The analysis runs the model's modules (calibration, shape propagation, probes) in eval
    mode, with the random number generators restored afterwards: converting a model in train
    mode updates no BatchNorm statistics and draws no random numbers. Every module's mode is
    put back as it was, and so is all of its own state (analyse/snapshot.py). Yields a
    function that tells what the forwards changed in it: the state modules keep or set up at
    their first call (tensors, plain values; not what ``eval()`` changed, a ``train()``
    override's cache: MMPretrain LeViT's ``ab``)."""
    modes = [(m, m.training) for m in model.modules()]
    saved = snapshot(model)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    python_rng = random.getstate()        # (a model's own Python draws, e.g. in its embedding)
    with _restored(random.setstate, python_rng), torch.random.fork_rng(devices=devices):
        model.eval()
        tensors, values = changed_tensors(saved), changed_values(saved)
        by_eval = {k: tensors.get(k, ()) + values.get(k, ()) for k in tensors.keys() | values.keys()}
        try:
            yield lambda: (changed_tensors(saved, by_eval), changed_values(saved, by_eval))
        finally:
            model.train(modes[0][1])          # runs the modules' own train() overrides
            for m, mode in modes:
                if m.training != mode:
                    m.training = mode
            restore(saved)


def _check_model(model: nn.Module):
    """What refuses a model before anything runs: a graph traced by torch.fx, meta tensors."""
    _check_not_traced(model)
    _check_materialised(model)


def _check_not_traced(model: nn.Module):
    traced = next((n for n, m in model.named_modules() if isinstance(m, torch.fx.GraphModule)
                   and any(_inlines_attention(m, node) for node in m.graph.nodes)), None)
    if traced is not None:
        # (timm's features_only=True, feature_cls='fx'; torchvision's create_feature_extractor)
        raise ConversionError(
            f"{type(model).__name__}: `{traced or type(model).__name__}` is a torch.fx GraphModule "
            "with attention inlined in its graph (a feature extractor traced by torch.fx): it "
            "runs the blocks' code, not the blocks, so evoplug cannot convert them. Convert the "
            "model before tracing it, with the blocks as leaf modules (docs/export.md), or use "
            "timm's features_only with feature_cls='hook'")


def _check_materialised(model: nn.Module):
    meta = next((n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if t.is_meta), None)
    if meta is not None:
        raise ConversionError(
            f"{type(model).__name__}: `{meta}` is on the meta device (no values): evoplug runs the "
            "model once to analyse it. Materialise it first (model.to_empty(device=...) and "
            "load_state_dict), then convert")


def _inlines_attention(gm: torch.fx.GraphModule, node) -> bool:
    """A softmax or a fused attention in a traced graph (not behind a module that holds it)."""
    t = node.target
    if node.op == "call_module":
        return isinstance(gm.get_submodule(t), nn.Softmax)
    return node.op in ("call_function", "call_method") and (
        t in (torch.nn.functional.scaled_dot_product_attention, torch.softmax,
              torch.nn.functional.softmax, "softmax"))


def _calibrate(model: nn.Module, example_input):
    """One recorded forward on the example input (the model's declared input size when none
    is given), and the candidate blocks it shows."""
    source = "example_input"
    if example_input is None:
        example_input, source = _example_input(model)
        if example_input is None:
            raise ConversionError(
                f"{type(model).__name__}: cannot tell its input size ({source}); pass example_input=")
    # an input made under inference_mode (a twin's, from an inference_mode forward) is copied
    # into a plain tensor: the analysis writes into tensors made from it
    example_input = torch.utils._pytree.tree_map(
        lambda t: t.clone() if isinstance(t, torch.Tensor) and torch.is_inference(t) else t,
        example_input)
    floats = [t for t in torch.utils._pytree.tree_leaves(example_input)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if any(bool(corrupt(t.detach(), i == 0).any()) for i, t in enumerate(floats)):
        raise ConversionError(f"{type(model).__name__}: the example input holds NaN or inf (NaN "
                              "outside the images): the analysis checks every converted block "
                              "against the model on it; pass finite images")
    try:
        calls = calibrate(model, example_input)
    except Exception as failed:     # (CalibrationFailed: the model's forward, where it raised)
        known = isinstance(failed, CalibrationFailed)
        e, hint = failed.error if known else failed, ""
        if source != "example_input":
            hint = (f" (evoplug made a default input of shape {tuple(example_input.shape)} from "
                    f"{source}; if the model takes another size or channel count, pass "
                    "example_input=)")
        where = f" (it raised in `{failed.where}`)" if known and failed.where else ""
        raise ConversionError(f"{type(model).__name__}: the example input does not run through "
                              f"the model{hint}, run in eval mode under torch.no_grad() as "
                              f"evoplug runs it{where}: {type(e).__name__}: {e}") from e
    images_in_rows(model, example_input, calls)
    candidates, failed, skipped = find_blocks(model, calls)
    skipped = skipped + _unread_attention(calls)
    if candidates:
        token_provenance(model, example_input, calls, [c[1] for c in candidates])
        class_token_rows(model, example_input, calls, [c[1] for c in candidates])
        stream_starts(model, example_input, calls, [c[1] for c in candidates])
        varying_arguments(model, example_input, calls, [c[1] for c in candidates])
        rows_not_images(model, example_input, calls, [c[1] for c in candidates])
    return calls, attention_modules(model, calls), candidates, failed, skipped, example_input


def _unread_attention(calls) -> list:
    """The modules whose attention ran through a kernel evoplug does not read (flex attention:
    refused as "no attention computation ran" without a name until the thirty-seventh session,
    audit V3)."""
    unread = list(calls.derived.get("unread_attention", {}).items())
    return [(name, f"its attention runs through torch's {fn}, whose score and mask functions are "
                   "code evoplug cannot read a class-attention row from: run it with "
                   "scaled_dot_product_attention or an explicit softmax (transformers: "
                   "attn_implementation='sdpa' or 'eager')" if i == 0 else f"{fn} too")
            for i, (name, fn) in enumerate(unread)]


def _analyse_candidate(model: nn.Module, name: str, module: nn.Module, call, calls, attn_mods,
                       opts: EvoOptions, prior):
    """(analysis, programs, buffers before) of a candidate block, or of the block it only wraps
    (:func:`wrapped_block`: a stage holding one block), where the candidate itself is no block.
    Raises the candidate's own :class:`AnalysisError` when neither is."""
    added = set(module._buffers)
    try:
        refuse_forward_on_instance(name, module)
        a, gm_eval = analyse_block(model, name, module, call, calls, attn_mods,
                                   opts.num_prefix_tokens, opts.global_query, prior)
        # (state moved in training only too: audit K6 of the forty-sixth session)
        a.keeps_state = tuple(dict.fromkeys(kept_below(module, calls.derived.get("kept_state", {}))
                                            + kept_below(module, changed_in_training(module, call))))
        counted = count_probe_graph(gm_eval, a)     # (before the rewrite changes gm_eval)
        programs = {False: build_program(a, False, gm_eval), True: build_program(a, True)}
        # (state the modules its programs call whole keep is the tokens' it ran where it moves
        # with what they are called with: audit J1 of the forty-fifth session; not where they
        # compute it from their weights, spectral_norm's: audit K6 of the forty-sixth)
        a.state_from_tokens += moved_by_input(module, call, a.leaf_paths, [
            k for k in a.keeps_state if k not in a.state_from_tokens], a.num_tokens)
        probe_program(a, programs[False])
        check_count_free_program(a, lambda g: build_program(copy.copy(a), False, g), counted)
        inner = wrapped_block(name, module, call, calls) if a.stream_head else None
        if inner is not None:
            # a stage holding one block behind an identity downsampling passes it on the
            # stream before the block's adds: the block it wraps is the block, where it is one
            try:
                found = _analyse_candidate(model, *inner, calls, attn_mods, opts, prior)
            except AnalysisError:
                return a, programs, added
            _drop_added_buffers(module, added)
            return found
        return a, programs, added
    except AnalysisError as e:
        _drop_added_buffers(module, added)
        inner = wrapped_block(name, module, call, calls)
        if inner is None:
            raise
        try:
            return _analyse_candidate(model, *inner, calls, attn_mods, opts, prior)
        except AnalysisError:
            raise e from None
    except BaseException:
        _drop_added_buffers(module, added)
        raise


def _drop_read_rest(model: nn.Module, example, analysed, failed):
    """Blocks that return, besides their tokens, a tensor computed from them (an attention
    map) that the model reads after them are not converted (moved from ``analysed`` to
    ``failed``): an evolving block computes it over its kept tokens only, in their order. A
    hand-written ViT pooling by its last block's class attention got that map over the subset:
    off by 0.39 at keep 1.0, and a shape error or a wrong token at keep 0.5 (audit L of the
    twenty-fourth session). Such items nothing reads (``x, _ = block(x)``) are no matter."""
    read = {id(m) for m in rest_read(model, example, [(a.module, set(a.token_rest))
                                                      for a, _, _ in analysed if a.token_rest])}
    for i in [i for i, (a, _, _) in enumerate(analysed) if id(a.module) in read][::-1]:
        a, _, added = analysed.pop(i)
        _drop_added_buffers(a.module, added)
        out = a.call.output
        what = ", ".join(f"item {j} (shape {tuple(out[j].shape)})" for j in a.token_rest
                         if isinstance(out[j], torch.Tensor))
        failed.append((a.name, f"it returns, besides its tokens, {what} computed from them (an "
                               "attention map?), which the model reads after it: an evolving block "
                               "computes that over its kept tokens only, so what reads it would be "
                               "wrong. Have the block return only its tokens, or read the map "
                               "from a block that stays dense (start_block)"))


def _order(calls, model: nn.Module, name: str) -> int:
    try:
        c = calls.get(id(model.get_submodule(name)))
    except AttributeError:
        return 1 << 30
    return c.order if c is not None else 1 << 30


def _drop_added_buffers(module: nn.Module, before):
    """Undo what the analysis registered on a block it did not convert (traced constants,
    the window index)."""
    for name in [n for n in module._buffers if n not in before]:
        del module._buffers[name]


def _refused(skipped):
    """The skipped modules an error's ``failures`` names: not those merely left as they are
    between the converted blocks (no attention in them)."""
    return [(n, r) for n, r in skipped if not r.startswith(BETWEEN)]


def _check_convertible(model: nn.Module, analysed, failed, skipped, strict: bool):
    if not analysed:
        if failed or skipped:
            detail = "; ".join(f"`{n}`: {r}" for n, r in failed + skipped)
        else:
            detail = ("no attention computation (softmax over q.k^T, scaled_dot_product_attention "
                      "or nn.MultiheadAttention) ran in its forward" + _scripted(model))
        # (failures name the modules and reasons: the model itself ('') where no module ran any
        # attention; the list was empty then, and with one block, audit X4 of the 39th session)
        raise ConversionError(f"evoplug found no convertible transformer block in "
                              f"{type(model).__name__}: {detail}", failed or skipped or [("", detail)])
    if failed and strict:
        detail = "\n".join(f"  `{n}`: {r}" for n, r in failed)
        raise ConversionError(f"evoplug cannot convert {len(failed)} block(s) of "
                              f"{type(model).__name__} (strict=True; strict=False converts the "
                              f"others and reports these):\n{detail}", failed)
    if len(analysed) < 2:
        only = (f"only one convertible block (`{analysed[0][0].name}`); Evo-ViT ranks tokens with "
                "the attention of the blocks before the evolving ones, so nothing would evolve")
        raise ConversionError(f"{type(model).__name__}: {only}",
                              (failed or _refused(skipped)) + [(analysed[0][0].name, only)])
    rowless = [a for a, _, _ in analysed if a.windowed and a.window_index is None]
    if len(rowless) == len(analysed):
        note = next((n for n in rowless[0].notes if n.startswith("windows not mapped")), "")
        raise ConversionError(
            f"{type(model).__name__}: no converted block gives a global attention row (the "
            f"windows of `{rowless[0].name}` and the others could not be mapped back to their "
            f"tokens{': ' + note if note else ''}), so no token would ever be ranked and "
            "nothing would evolve", failed or _refused(skipped))
    odd = next((a for a, _, _ in analysed if ", where the tokens show" in a.prefix_source), None)
    if odd is not None:      # (block.py _tokens_and_grid)
        warnings.warn(f"evoplug: num_prefix_tokens={odd.num_prefix} differs from what the tokens of "
                      f"`{odd.name}` show: {odd.prefix_source.split('where the tokens show ')[1]}; a "
                      "class token counted as a patch can be left out of the slow path, a patch "
                      "counted as a prefix token always runs it", stacklevel=3)


def _scripted(model: nn.Module) -> str:
    """Where the model holds TorchScript modules, which run as leaves (no hooks, nothing seen
    inside them: an attention in one is not found), the outermost of them named."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names if o)]
    if not names:
        return ""
    shown = ", ".join(f"`{n}`" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f" outside its TorchScript modules ({shown}), which evoplug runs as they are and cannot "
            "see into: an attention inside one is not found; convert the model before scripting it")


def _check_scored(model: nn.Module, analyses, roles, strict: bool, starts=()):
    if "evolve" not in roles:
        # (every convertible block dense or scoring: a NesT of one block per level, whose
        # scores restart at each level, converted with strict=False into a model that did
        # nothing, without a word; audit W6 of the thirty-eighth session)
        raise ConversionError(
            f"{type(model).__name__}: nothing would evolve: every convertible block is dense or "
            "computes the global scores afresh (" + ", ".join(
                f"`{a.name}`: {r}" for a, r in zip(analyses, roles)) + "): Evo-ViT needs a "
            "block after the scoring one with the same tokens (a lower start_block, or more "
            "blocks per stage)", [(a.name, f"role {r}") for a, r in zip(analyses, roles)])
    idle = unscored(analyses, roles, starts)
    if idle and strict:
        raise ConversionError(f"{type(model).__name__}: {unscored_reason(analyses, idle)}",
                              [(analyses[i].name, "no global scores reach it") for i in idle])


def _copy_for_conversion(original: nn.Module, opts: EvoOptions):
    """The copy ``inplace=False`` converts, and the options with its trade-off (:func:`_on_copy`)."""
    memo = {}
    copied = copy_model(original, memo)
    return copied, opts.replace(trade_off=_on_copy(original, copied, opts.trade_off, memo))


def _on_copy(original: nn.Module, copied: nn.Module, alpha, memo: dict):
    """A learnable ``trade_off`` that belongs to the model (a submodule, or a method of one),
    taken from the copy that ``inplace=False`` converts: the original's would get the gradients
    and the copy's, which the optimiser steps and the checkpoint saves, would do nothing. A
    function holding the original's modules or parameters (closure, default arguments, a
    ``functools.partial``'s) gets the copy's (``memo``: what the copy copied); one reading them as
    global names is refused (options.follow_copy: audit M of the thirty-fourth session)."""
    if not callable(alpha) or isinstance(alpha, (numbers.Number, str)):
        return alpha
    owner = alpha.__self__ if inspect.ismethod(alpha) else alpha
    if isinstance(owner, nn.Module):
        path = next((n for n, m in original.named_modules() if m is owner), None)
        if path is not None:
            new = copied.get_submodule(path)
            return getattr(new, alpha.__name__) if inspect.ismethod(alpha) else new
    return follow_copy(alpha, memo, only_copied=True)


def plan_roles(opts: EvoOptions, analyses, starts=()) -> Tuple[str, ...]:
    """:func:`assign_roles`, then an evolving block scores its tokens again ('score', as the
    runtime does there) where they are not the block before's output row by row
    (``fresh_tokens``: another width, reordered; MAE's decoder after its unmasked encoder), or
    where the tokens change and the scores cannot be carried onto the new ones (a grid unknown
    or only guessed: MAE's decoder after its visible patches, a model that drops patches
    between blocks; special tokens after the patches: ``ev.can_carry``)."""
    roles = list(assign_roles(opts, len(analyses), starts))
    prev = None
    for i, a in enumerate(analyses):
        if i in starts:
            prev = None
        if roles[i] == "dense":
            continue
        if roles[i] == "evolve" and prev is not None and (a.fresh_tokens or (
                a.num_tokens != prev.num_tokens
                and (prev.num_suffix or a.num_suffix or not ev.can_carry(prev.grid, a.grid)))):
            roles[i] = "score"
        prev = a
    return tuple(roles)


def assign_roles(opts: EvoOptions, n: int, starts=()) -> Tuple[str, ...]:
    """Role of each of ``n`` converted blocks: 'dense', then one 'score' block, then 'evolve'.
    ``starts``: the positions where another token stream starts (a second tower,
    provenance.stream_starts): each stream gets these roles of its own (``start_block`` counted
    in it; a stream too short for it stays dense). Raises (before anything is changed) when
    ``start_block`` is past the last block of every stream."""
    bounds = [0] + sorted(i for i in set(starts) if 0 < i < n) + [n]
    roles, longest = [], 0
    for lo, hi in zip(bounds, bounds[1:]):
        m = hi - lo
        longest = max(longest, m)
        start = opts.start_block if opts.start_block is not None else max(1, m // 3)
        roles += ["dense" if i < start - 1 or start >= m else ("score" if i == start - 1 else "evolve")
                  for i in range(m)]
    start = opts.start_block if opts.start_block is not None else max(1, longest // 3)
    if start >= longest:
        where = f"{n} converted blocks" if len(bounds) == 2 else \
            f"token streams of at most {longest} converted blocks"
        raise ValueError(f"start_block={start} but the model has {where} "
                         f"(start_block must be in 1..{longest - 1})")
    return tuple(roles)


def input_size(model: nn.Module) -> Optional[Tuple[int, int, int]]:
    """(channels, height, width) of the input ``model`` declares (timm's built size and data
    config, MMPretrain's ``img_size``, ``patch_embed.img_size``, a registered family's hint),
    or None."""
    decl = declared_input(model)
    return None if decl is None else decl[:3]


def example_input(model: nn.Module, batch: int = 1, size=None) -> torch.Tensor:
    """A seeded random image batch of the model's declared input size (``size``: (H, W) or an
    int instead), on its parameters' device and dtype; what :func:`convert` calibrates with
    when no ``example_input`` is given. A video model's (transformers' VideoMAE, ViViT,
    TimeSformer) is a video (batch, frames, C, H, W)."""
    x, source = _example_input(model, batch, size)
    if x is None:
        raise ConversionError(f"{type(model).__name__}: cannot tell its input size ({source}); "
                              "pass size=")
    return x


def set_options(model: nn.Module, **changes) -> EvoOptions:
    """Change options of a converted model, e.g. ``set_options(m, keep_ratio=0.7)``: the next
    forward uses them, without re-conversion. Every change is checked first; on an error
    nothing changes. ``num_prefix_tokens`` and ``global_query`` are read when the blocks are
    analysed: changing them raises (convert the model again). A forward already running in
    another thread finishes with the options it started with."""
    report = get_report(model)
    old = report.options
    fixed = sorted(k for k in CONVERSION_FIELDS & set(changes) if changes[k] != getattr(old, k))
    if fixed:
        raise ValueError(
            f"{', '.join(fixed)} cannot change after conversion (read when the blocks are "
            f"analysed): convert again, e.g. evoplug.convert(evoplug.revert(model), "
            f"{fixed[0]}=...)")
    _keep_a_learnable_trade_off(model, old.trade_off, changes)
    new = old.replace(**changes)                      # checks every field
    roles = plan_roles(new, [b.analysis for b in report.blocks],      # checks start_block
                       [b.index for b in report.blocks if b.starts_stream])
    if not report.blocks:
        report._options = new
        return new
    runtime = report.blocks[0].runtime
    with runtime.between_builds():     # (a twin built meanwhile would keep the old options)
        report._options = new
        runtime.plan = Plan(new, roles)
        for variant in list(runtime.variants.values()):   # the same blocks at other sizes
            if any(b is None for b in variant.blocks):      # (blocks removed: their roles)
                inner = get_report(variant.model)
                inner._options = new
                inner.blocks[0].runtime.plan = plan_of_blocks_left(new, roles, variant.blocks)
            else:
                set_options(variant.model, **changes)
    return new


def _keep_a_learnable_trade_off(model: nn.Module, alpha, changes: dict):
    """Warn where a learnable ``trade_off`` (a module with trainable parameters, or a method of
    one: MMPretrain's ``learnable_trade_off=True`` puts one on the classifier) is replaced by
    anything else: its parameters stay in the optimiser and the checkpoint with no gradient
    (an ``EvoOptionsHook`` schedule or ``set_options(trade_off=0.5)`` did that silently until
    audit E1 of the forty-first session; a warning, not an error: comparing with a fixed
    value at evaluation is a fair use)."""
    if "trade_off" not in changes or changes["trade_off"] is alpha or not callable(alpha) \
            or isinstance(alpha, (numbers.Number, str)) or changes["trade_off"] == alpha:
        return
    owner = alpha.__self__ if inspect.ismethod(alpha) else alpha
    if isinstance(owner, nn.Module) and any(p.requires_grad for p in owner.parameters()):
        warnings.warn(
            f"evoplug: trade_off was learnable ({type(owner).__name__}, trained with the model) "
            f"and is now {changes['trade_off']!r}: its parameters get no gradient while it is "
            "replaced, though they stay in the optimiser and the checkpoint. Schedule or set a "
            "trade-off only on a model without a learnable one, or freeze it "
            "(requires_grad_(False)) to silence this", stacklevel=3)


def set_keep_ratio(model: nn.Module, keep_ratio: float) -> EvoOptions:
    """``set_options(model, keep_ratio=keep_ratio)``: returns the new options."""
    return set_options(model, keep_ratio=keep_ratio)


def revert(model: nn.Module) -> nn.Module:
    """Undo a conversion in place (restores the blocks' classes); returns ``model``."""
    report = get_report(model)
    # with the converted blocks deep-copied into the model apart from it since (they run their
    # own forward: runtime/block.py ``_apart``; revert left them converted, and converting
    # again was refused, until audit F1 of the forty-second session)
    copies = [m._evoplug_spec for m in model.modules() if isinstance(m, EvoBlockMixin)
              and not m._evoplug_spec.runtime.served]
    classes = [unconverted_class(spec) for spec in report.blocks + copies]     # (checked first)
    for spec, cls in zip(report.blocks + copies, classes):
        m = spec.analysis.module
        m.__class__ = cls
        del m._evoplug_spec
        for name in spec.added_buffers:     # traced constants, the window index
            m._buffers.pop(name, None)
    for name in report.regrouped:
        undo_regroup(model.get_submodule(name))
    for hook_id in report.entry_hooks:
        for hooks in (model._forward_pre_hooks, model._forward_pre_hooks_with_kwargs, model._forward_hooks,
                      model._forward_hooks_with_kwargs, model._forward_hooks_always_called):
            hooks.pop(hook_id, None)
    del model._evoplug_report
    return model


