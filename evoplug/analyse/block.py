"""torch.fx analysis: find transformer blocks in a model it was not written for.

Flow: :func:`find_blocks` walks the module tree top-down using the calibration record
(calibration.py): the highest module that ran exactly one attention computation per call, took
a (B, N, C) token tensor (or a channels-last (B, H, W, C) token map, as in Swin) and returned the
same shape is a *candidate block*. Each candidate is
traced **on its own** (whole models often do not trace) with every submodule that ran no
attention kept as a leaf, so the graph shows the attention internals and the residual stream:

* the attention site, recognised by what it computes: ``softmax`` over ``q @ k^T``,
  ``scaled_dot_product_attention`` (q, k, mask and scale read from its arguments) or an
  ``nn.MultiheadAttention`` call; never by class name;
* additive position terms on the attention logits that do not depend on the tokens (relative
  position bias tables): they must follow the selected tokens (see rewrite.py);
* the residual stream: which residual adds carry the attention branch and the MLP branch
  (layer scale, drop path, or a residual inside a submodule such as MMPretrain's FFN);
* the prefix tokens (cls, distillation, registers) from the patch grid seen during calibration;
* windowed attention (tokens regrouped into windows inside the block) and, by running the graph
  on token indices, which token each window slot holds (:func:`window_token_index`).

Python branches and ``int()`` on traced sizes are specialised on the calibration input (and refused
when they depend on the token count; a value that depends on the batch size makes block.py trace
one program per batch size); checks (``assert``, a branch that only raises) pass on the
calibration input and are dropped; buffers are traced as attributes so the programs read the live
ones.

The result is a :class:`BlockAnalysis` per block (what explain() prints) which rewrite.py turns
into a slow-path program.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Dict, FrozenSet, List, Optional, Set, Tuple

import torch
import torch.fx as fx
from torch import nn

from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_map

from ..errors import AnalysisError
from ..integrations.registry import hint
from ..runtime.call import CallPlan
from ..runtime.pairs import same_value
from .attention import AttentionSite, find_attention, sdpa_arg
from .calibrate import ModuleCall
from .discover import (detect_prefix, modules_to_trace, patch_grid, resolve_global_query,
                       special_rows)
from .graph import ancestors, computed_in, module_of, rolls, run_nodes, shape_of, softmax_dim
from .grid import (find_grid_ops, opaque_map_views, reduced_kv_grid, window_token_index,
                   windows_in_own_dim)
from .one_window import collapse_one_window
from .plain_tensors import python_read_tensors
from .probes import check_no_mixing_outside_attention, hooks_suspended
from .residual import Branch, residual_branches
from .snapshot import restore, snapshot
from .trace import make_call_plan, mark_batch_specialised, trace_block
from .writes import StateBeforeTrace, objects_set_by_forward, set_up_on_first_call


@dataclasses.dataclass
class BlockAnalysis:
    name: str
    module: nn.Module
    call: ModuleCall
    plan: CallPlan
    attention_paths: Tuple[str, ...]   # the block's submodules that ran attention, by path
    num_tokens: int
    dim: int
    num_prefix: int = 0
    num_suffix: int = 0              # trailing special tokens (YOLOS' detection tokens)
    prefix_source: str = ""
    global_query: str = "cls"        # 'cls' (query 0) or 'mean' (mean query of the patch tokens)
    grid: Optional[Tuple[int, int]] = None   # patch grid (h, w) of the M patch tokens, if known
    kv_grid: Optional[Tuple[int, int]] = None  # keys from the full map reduced to this grid (PVT)
    grid_ops_expected: bool = False            # the block turns tokens into a 2-D map (PVT)
    windowed: bool = False                     # attention inside the 2-D map part (windows)
    token_map: bool = False                    # block takes/returns a (B, H, W, C) map (Swin)
    window_index: Optional[torch.Tensor] = None  # (windows * window tokens,) token index + 1, 0 = pad
    window_head_dims: Tuple[int, ...] = ()     # dims of the attention logits that are heads
    window_heads_folded: int = 1               # heads merged into the leading dim (B*win*heads)
    one_window: bool = False                   # its one window read as attention over the tokens
    opaque_map_views: Tuple[str, ...] = ()     # einops calls between its tokens and the map
    row_full: bool = False                     # the global row covers every patch token
    batch_size: Optional[int] = None           # set when the trace specialised on the batch size
    heads_in_batch: bool = False               # its attention merges the heads into the batch dim
    uses_pos: bool = False                     # its programs read the subset's positions
    uses_full: bool = False                    # ... or the block's whole input
    whole_args: Tuple[str, ...] = ()           # per-token arguments the program gathers itself
    leaf_paths: Tuple[str, ...] = ()           # submodules its programs call as modules
    leaf_reads: FrozenSet[Tuple[str, str]] = frozenset()   # (path, name): their plain
    #                                          attributes its traced code read (reads.py)
    row_masked: bool = False                   # the mean query's rows are masked per query
    #                                          (causal, block-diagonal): _masked_per_query
    batch_args: Tuple[str, ...] = ()           # other tensor arguments whose first dim is the
    #                                          batch at calibration (gathered image by image)
    extra_shapes: Dict[str, Tuple[int, ...]] = dataclasses.field(default_factory=dict)  # other
    #                                          tensor arguments' shapes at calibration
    token_rest: Tuple[int, ...] = ()           # items of its tuple output, after the tokens,
    #                                          computed from them (an attention map): what an
    #                                          evolving block gives over its kept tokens only
    fresh_tokens: bool = False                 # as many tokens as the converted block before,
    #                                          but not its output row by row (another width,
    #                                          reordered): its scores start afresh (chain.py)
    stream_head: List[str] = dataclasses.field(default_factory=list)   # what the residual
    #                                          stream passes before its first add (a norm: the
    #                                          skip path's start, rewrite/skip_path.py)
    state_from_tokens: Tuple[str, ...] = ()    # tensors its forward sets on itself or a
    #                                          module it traced into from its arguments (an
    #                                          attention map): its programs set them too; and
    #                                          keeps_state a module it calls whole moves with
    #                                          its input (snapshot.moved_by_input)
    sets_own: Tuple[str, ...] = ()             # tensors its forward sets as attributes of
    #                                          the block itself (a size twin's block sets them
    #                                          on the model's block: runtime/block.py)
    python_tensors: Tuple[Tuple[str, str, torch.Tensor], ...] = ()   # (path, name, tensor):
    #                                          plain tensor attributes its forward reads in
    #                                          Python (analyse/plain_tensors.py): guarded
    python_writes: Tuple[Tuple[str, str, Any], ...] = ()   # (path, name, value): Python
    #                                          values its forward sets from its traced values
    #                                          (a size it records, ``self.hw = (H, W)``), on
    #                                          the calibration input: its programs set them
    #                                          (BlockSpec.writes)
    keeps_state: Tuple[str, ...] = ()          # ``path.name`` of the buffers and tensor
    #                                          attributes of its submodules the calibration's
    #                                          forwards changed (a counter, a running mean):
    #                                          the programs run such a module once per call

    attention: str = ""              # human-readable attention description
    q: str = ""
    k: str = ""
    position_terms: List[str] = dataclasses.field(default_factory=list)
    branches: List[Branch] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)

    def attention_ids(self) -> Set[int]:
        """ids of the submodules that ran attention (traced into), found by path in the block
        itself: a deep copy of a converted model (EMA) finds its own."""
        return {id(self.module.get_submodule(p)) for p in self.attention_paths}

    def __repr__(self) -> str:
        # (not the dataclass' own: the module, tensors and the calibration's call, which the
        # conversion drops, would be in it)
        return (f"BlockAnalysis({self.name!r}: {self.num_tokens} tokens, {self.num_prefix} prefix, "
                f"grid {self.grid}, {self.attention or 'attention not described'})")


_REDUCED_KV = ("its attention has {} keys for {} query tokens, and evoplug cannot rebuild them from "
               "the block's own tokens: no reshape of its tokens into the patch grid precedes "
               "them. Cross-attention to another sequence (a decoder's object queries attending "
               "to image features) is no self-attention to evolve; a spatially reduced map that "
               "converts (PVT's and Twins' spatial-reduction attention) is made from the tokens")
#: the keys a block appends to its tokens' own, at most, that the refusal calls sinks
_FEW_EXTRA_KEYS = 16
_EXTRA_KEYS = ("; {} key(s) more than its tokens: keys appended to the tokens' own (a learned "
               "attention sink, memory or register key concatenated in the block) are followed "
               "only as nn.MultiheadAttention makes them (add_bias_kv=True, add_zero_attn=True), "
               "whose softmax over them the global row includes")

#: a block whose forward changes Python state at each call (analyse/writes.py
#: StateBeforeTrace.moved_in_python; its programs left it as it was, without a word, until
#: audit J1 of the forty-fifth session)
_MOVED_IN_PYTHON = ("its forward changes Python state at each call: {}; its programs (traced code) "
                    "would not, so the converted block would leave it as the conversion did. Keep "
                    "such state in a tensor attribute (`self.n = self.n + 1`, `self.last = "
                    "t.detach()`), which the programs set as the forward does")


#: a block whose forward records its batch size on a module as a Python value (audit K6 of the
#: forty-sixth session: ``self.in_shape = x.shape`` raised an internal error of torch.fx)
_RECORDS_BATCH = ("its forward sets {} from its input's batch size, a Python value: its programs "
                  "set the one of the input it was converted with (a size twin's: one image) at "
                  "every call, where its own forward sets the call's. Record the batch size "
                  "outside the block")


#: a block whose forward branches in Python on the value of its own parameter or buffer (audit
#: A1 of the fifty-fourth session: the trace kept the branch of the conversion's weights)
_BRANCHES_ON_WEIGHTS = ("its forward takes a Python branch on the value of {} ({}), which a "
                        "trace keeps as the conversion's weights took it: once training, "
                        "load_state_dict or a change by hand moved it, the dense model would "
                        "take the other branch and its programs would not. Compute it with "
                        "tensor ops (torch.where), or hold the choice as a Python attribute "
                        "(a bool), which the programs check")


def branches_on_weights(name: str, gm: fx.GraphModule):
    """Refuses a block whose trace specialised a Python branch (or an ``int()``) on the value
    of one of its parameters or buffers (analyse/tracer.py ``_specialised``): the programs would
    keep the conversion's branch."""
    found = gm.meta.get("evo_weight_branches")
    if found:
        read, note = found[0]
        raise AnalysisError(name, _BRANCHES_ON_WEIGHTS.format(", ".join(f"`{t}`" for t in read), note))


def _moved_at_a_second_call(module: nn.Module, call: ModuleCall, gm: fx.GraphModule) -> Tuple[str, ...]:
    """What of the Python state of ``module`` (keys of its dicts, items of its sets, attributes
    of its plain objects included) a second eager call on the calibration input changes after
    a first one, each call on fresh copies of the input tensors (a new ``id(x)``): a block whose
    trace made a dict, set or object gain a key may keep a log (``self.log[len(self.log)] =
    t``, ``self.ids.add(id(x))``), which gains again, or a cache (LeViT's attention-bias cache
    keyed by the device, a table per input size), which the first call fills and the second
    reads. Any key gained was taken for a cache, so a log stayed as the conversion left it (a
    known gap of the forty-fifth session). So does a size it records (analyse/writes.py
    ``python_writes``) that is not the same at the second call: a log set anew
    (``self.sizes = self.sizes + [n]``). The state is put back after."""
    def call_once():
        args, kwargs = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                                (call.args, call.kwargs))
        module(*args, **kwargs)
        return args, kwargs
    saved, first, was = snapshot(module), StateBeforeTrace(module), module.training
    module.eval()
    try:
        with torch.no_grad(), hooks_suspended(module):
            inputs = [call_once()]      # (kept: a freed input's id may come again)
            again = StateBeforeTrace(module)
            inputs.append(call_once())
            recorded = {f"{p}.{n}" if p else n: (p, n, v) for p, n, v in gm.meta["evo_python_writes"]}
            return again.moved_in_python(gains=True, skip=recorded) + tuple(
                f"`{w}` ({v!r}, then {now!r} after one more call)" for w, (p, n, v) in recorded.items()
                if not same_value(now := getattr(module.get_submodule(p), n, None), v) or
                type(now) is not type(v))
    except Exception as e:  # noqa: BLE001 - a cache cannot be told from a log: refused
        return (f"{', '.join(gm.meta['evo_grown_in_python'] or ['its records'])} at its trace, and a second call of "
                f"the block raised {type(e).__name__}: {e}: a cache cannot be told from a log",)
    finally:
        first.put_back()
        restore(saved)
        module.train(was)


#: a block whose forward sets up state at its first call (writes.set_up_on_first_call): the
#: conversion's forwards set it up, the snapshot put it back, and its programs (traced with it
#: set up) read it as they found it, never setting it up: a raw error where a tensor was None
#: again, a buffer never filled (0.47 off), without a word until audit K6 of the forty-sixth
#: session
_SET_UP_ON_FIRST_CALL = (
    "its forward sets up {} at its first call and reads it after: the conversion's own forwards "
    "(calibration, probes) ran that first call on the calibration's data, and its programs, "
    "traced with the state set up, would never set it up (the model keeps it as it was before "
    "the conversion). Run the model once on real data before converting: the state is then set "
    "up, and the block converts")


#: a block whose forward sets an attribute to a Python object no program sets
#: (writes.objects_set_by_forward): the converted model would keep the one from before the
#: conversion, without a word, until the fiftieth session
_SETS_OBJECTS = (
    "its forward sets {} at each call, a Python object evoplug cannot follow (its programs, "
    "traced code, would not set it, and the model would keep the one from before the "
    "conversion): set a plain value instead (a number, a tuple or named tuple, a dict, or a "
    "dataclass of plain values compared with ==), or a tensor as an attribute of its own")


def _refuse_state(name: str, gm: fx.GraphModule, module: nn.Module, call: ModuleCall, calls):
    """Refuses a block whose forward changes Python state at each call (a dict, set or object
    its trace made gain a key, or a value it records, told by a second eager call), records its
    batch size as a Python value, or sets up state at its first call (its programs would
    follow none of them)."""
    moved = gm.meta.get("evo_moved_in_python") or (
        (gm.meta.get("evo_grown_in_python") or gm.meta.get("evo_python_writes"))
        and _moved_at_a_second_call(module, call, gm))
    if moved:
        raise AnalysisError(name, _MOVED_IN_PYTHON.format(", ".join(moved)))
    if gm.meta.get("evo_batch_writes"):
        raise AnalysisError(name, _RECORDS_BATCH.format(
            ", ".join(f"`{t}`" for t in gm.meta["evo_batch_writes"])))
    set_up = set_up_on_first_call(gm, module, *(getattr(calls, "derived", {}).get(k, {})
                                                for k in ("kept_state", "set_values", "set_by")))
    if set_up:
        raise AnalysisError(name, _SET_UP_ON_FIRST_CALL.format(", ".join(set_up)))
    derived = getattr(calls, "derived", {})
    objects = objects_set_by_forward(gm, module, derived.get("objects_set", {}), derived.get("set_by", {}))
    if objects:
        raise AnalysisError(name, _SETS_OBJECTS.format(", ".join(objects)))
    branches_on_weights(name, gm)


def refuse_python_state(name: str, gm: fx.GraphModule):
    """The refusal of a block whose forward, traced into ``gm`` (eval mode here; train mode in
    rewrite/program.py ``build_program``), changed Python state (analyse/writes.py
    ``moved_in_python``). Python changed in training only (``if self.training:
    self.hist.append(t)``) converted without a word until audit K6 of the forty-sixth session:
    the train-mode trace's was not looked at."""
    if gm.meta.get("evo_moved_in_python"):
        raise AnalysisError(name, _MOVED_IN_PYTHON.format(", ".join(gm.meta["evo_moved_in_python"])))


def _refuse_reduced_kv(name: str, keys: int, N: int):
    """The refusal of an attention over ``keys`` keys for ``N`` tokens that no map reduced;
    a few keys more than the tokens are named as appended ones (a hand-written sink column got
    the words about cross-attention alone until the forty-fifth session)."""
    extra = keys - N
    raise AnalysisError(name, _REDUCED_KV.format(keys, N) +
                        (_EXTRA_KEYS.format(extra) if 0 < extra <= _FEW_EXTRA_KEYS else ""))


def analyse_block(model: nn.Module, name: str, module: nn.Module, call: ModuleCall,
                  calls: Dict[int, ModuleCall], attn_mods: Set[int],
                  num_prefix_override: Optional[int],
                  global_query: str = "auto", prior=None) -> Tuple[BlockAnalysis, fx.GraphModule]:
    """Trace one candidate block (eval mode), propagate shapes, and describe it."""
    if name in getattr(calls, "derived", {}).get("image_free", ()):
        raise AnalysisError(name, "its tokens do not come from the image (noise on the model's "
                                  "floating-point inputs changes other blocks' tokens, not one "
                                  "of these): not a vision block (a text encoder's?)")
    plan = make_call_plan(module, name, call, hint(model, "ignored_keywords")[0] or (),
                          hint(model, "export_masks")[0] or ())
    traced = modules_to_trace(calls)
    gm = trace_block(module, name, plan, traced, training=False, call=call)
    _refuse_state(name, gm, module, call, calls)
    x, extras = plan.bind(name, call.args, call.kwargs)
    feed = plan.feed(x, extras)
    try:
        if not gm.meta.get("evo_shapes"):     # (a rewritten map block has them: canon.py)
            with torch.no_grad():
                ShapeProp(gm).propagate(*feed)
    except Exception as e:  # noqa: BLE001 - any error: the block is refused, with its message
        raise AnalysisError(name, f"the traced block does not run: {type(e).__name__}: {e}") from None
    site = _attention_site(gm, name, attn_mods)
    N = x.shape[1] * x.shape[2] if x.dim() == 4 else x.shape[1]
    a = BlockAnalysis(name, module, call, plan, tuple(n for n, m in module.named_modules()
                                                      if id(m) in traced), N, x.shape[-1])
    mark_batch_specialised(a, gm, x.shape[0])
    a.python_writes = gm.meta.get("evo_python_writes", ())
    a.python_tensors = python_read_tensors(module, call, gm)
    if gm.meta.get("evo_specialised"):
        a.notes.append("Python values taken from the calibration input: "
                       + "; ".join(gm.meta["evo_specialised"]))
    if gm.meta.get("evo_tokenised"):
        a.notes.append("token-wise ops on the (B, H, W, C) map run on its tokens: "
                       + "; ".join(gm.meta["evo_tokenised"]))
    _tokens_and_grid(a, model, call, calls, x, num_prefix_override, prior)
    grid_ops = find_grid_ops(gm, a, site)
    if collapse_one_window(gm, a, site, grid_ops, feed, x.shape[0]):
        with torch.no_grad():
            ShapeProp(gm).propagate(*feed)
        grid_ops = find_grid_ops(gm, a, site)
        a.one_window = True
        a.notes.append("one window covering the map, unshifted and unpadded: attention over the "
                       "tokens (its partition and merge removed)")
    _describe_map_operations(a, grid_ops)
    a.opaque_map_views = opaque_map_views(gm, a.grid)
    _attention_kind(a, gm, site, grid_ops, x.shape[0], feed)
    varying = getattr(calls, "derived", {}).get("varying", ())
    rows = getattr(calls, "derived", {}).get("rows_not_images", ())
    raw = plan.arguments(name, call.args, call.kwargs)      # (the calibration's own tensors)
    _describe_arguments(a, site, extras, x.shape[0], {n for n in extras if id(raw.get(n)) in varying}, gm,
                        {n for n in extras if id(raw.get(n)) in rows})
    try:
        a.branches, notes, a.stream_head = residual_branches(gm, gm_token(gm), site, name)
    except AnalysisError as e:
        raise _tokens_maybe_elsewhere(e, plan, x, extras) from None
    a.notes += notes
    class_row = getattr(calls, "derived", {}).get("class_rows", {}).get(a.num_tokens)
    a.global_query = resolve_global_query(model, a.num_prefix, global_query, class_row)
    if a.global_query == "mean" and class_row is not None and 0 < class_row < a.num_prefix:
        a.notes.append(f"the class token is prefix token {class_row} of {a.num_prefix} (noise on "
                       "`cls_token` showed it): the mean query ranks the tokens (evoplug reads "
                       "the class query as the first token's)")
    if a.global_query == "mean" and not a.windowed:
        a.row_masked = _masked_per_query(gm, site, feed, a)
    _check_trailing_tokens(a, grid_ops)
    check_no_mixing_outside_attention(gm, site, a, feed, bool(grid_ops))
    a.token_rest = _token_rest(gm, plan.token_arg)
    return a, gm


def refuse_forward_on_instance(name: str, module: nn.Module):
    """Refuse a candidate block whose instance has a forward set (``block.forward = ...``: a
    hand adapter, a method bound to collect attention maps, MMEngine's
    ``activation_checkpointing`` or accelerate's hooks wrapping it). ``module(x)`` runs that
    forward, not the class's one evoplug traces and converts (fx traces ``type(root).forward``),
    so the converted block would never run: until the fifty-fifth session such a block was
    reported "evolving" and ran its own forward at every call (``tokens_per_block`` -1), a
    silent no-op; one wrapping a checkpoint was refused by whichever probe failed first
    ("extra positional arguments"), with the wrapper named after it (fifty-second session).
    A forward set after the conversion runs around or instead of the converted one, as its
    author meant (runtime/spec.py ``BlockSpec.changed``, ``observed``)."""
    fn = vars(module).get("forward")
    if fn is None:
        return
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "__func__", None), "__code__", None)
    what = f"{getattr(code, 'co_qualname', None) or type(fn).__name__!s:.60}"
    inner = getattr(fn, "__wrapped__", None)
    if inner is not None:
        what += (f", wrapping {getattr(inner, '__qualname__', inner)!s:.60}: torch.compile, a "
                 "checkpoint, MMEngine's activation_checkpointing?")
    raise AnalysisError(name, f"a forward set on its instance ({what}) runs instead of its "
                        "class's forward, which is what evoplug traces and converts: the converted "
                        "block would never run; delete it before converting (`del block.forward`) "
                        "and set it after converting (a wrapper then runs the converted block "
                        "inside it), or give the block a subclass whose forward it is")


def _tokens_maybe_elsewhere(e: AnalysisError, plan: CallPlan, x, extras) -> AnalysisError:
    """``e``, a block with no residual attention branch from the argument taken for its tokens,
    says which one that was and which other argument has the tokens' shape: the tokens may be
    that one (``forward(self, pos, x)`` where calibrate._token_arguments cannot tell the
    table from the tokens)."""
    same = [n for n, t in extras.items() if t.dim() == x.dim() and t.shape[1:] == x.shape[1:]]
    if e.not_a_block != "no residual" or not same:
        return e
    if next((n for n in plan.names if n == plan.token_arg or n in extras), None) != plan.token_arg:
        how = f"taking `{plan.token_arg}` for its tokens (the blocks' outputs reach it, not the first one)"
    else:
        how = f"taking its first tensor argument `{plan.token_arg}` for its tokens"
    return AnalysisError(e.module_name, f"{e.reason}, {how}; `{same[0]}` has their shape too: "
                                        "evoplug takes another argument than the first for the "
                                        "tokens only where noise on the outputs of the blocks of its "
                                        "class reaches that one in a later call and never the first "
                                        "one (a table), so blocks whose outputs reach no other's "
                                        "arguments (side by side) must take their tokens first",
                                        not_a_block=e.not_a_block)


def _token_rest(gm: fx.GraphModule, token_arg: str) -> Tuple[int, ...]:
    """The items after the tokens of a tuple-returning block's output (traced: ``evo_rest``)
    that are computed from its tokens (an attention map), by position in the output (1, ...):
    api.py ``_drop_read_rest`` checks whether the model reads them."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    x = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target == token_arg), None)
    if x is None:
        return ()
    return tuple(i for i, r in enumerate(out.meta.get("evo_rest") or (), start=1)
                 if isinstance(r, fx.Node) and (r is x or x in ancestors(r)))


def _masked_per_query(gm: fx.GraphModule, site: AttentionSite, feed, a: BlockAnalysis) -> bool:
    """Whether the mean query's input (the softmax's logits, or the mask given to
    ``scaled_dot_product_attention`` or ``nn.MultiheadAttention``) masks keys for some patch queries and not for others at
    calibration (a causal or block-diagonal mask: entries at or below half the dtype's lowest
    value, -inf included). The mean of such rows is no mask of the mean query (it masks every
    key any patch query cannot see, or overflows to NaN): the runtime then averages each key's
    unmasked entries (runtime/rows.py _masked_row_mean)."""
    if site.kind == "softmax":
        node = site.logits
    else:     # (nn.MultiheadAttention's bool mask: True masks)
        node = sdpa_arg(site.node, 3, "attn_mask") if site.kind == "sdpa" else site.node.kwargs.get(
            "attn_mask", site.node.args[5] if len(site.node.args) > 5 else None)
    if not isinstance(node, fx.Node):
        return False
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        with torch.no_grad():
            v = run_nodes(gm.graph, node, gm, dict(zip(holders, feed)))
    except Exception:   # noqa: BLE001 - the probes report a block that does not run
        return False
    if not isinstance(v, torch.Tensor) or v.dim() < 2 or v.shape[-2] == 1:
        return False
    if v.dtype == torch.bool:
        off = v if site.kind == "mha" else ~v
    elif v.is_floating_point():
        off = v <= torch.finfo(v.dtype).min / 2
    else:
        return False
    rows = off.narrow(-2, a.num_prefix, off.shape[-2] - a.num_prefix - a.num_suffix) \
        if off.shape[-2] == a.num_tokens else off
    return bool((rows != rows[..., :1, :]).any())


def _check_trailing_tokens(a: BlockAnalysis, grid_ops):
    """Trailing special tokens are kept like the prefix by a block on a token sequence (the mean
    query averages the patch queries between the special tokens); where the patches' place in
    the sequence matters otherwise (a 2-D map of them, windows) they are refused by name."""
    if not a.num_suffix:
        return
    if grid_ops or a.windowed or a.row_full:
        raise AnalysisError(a.name, f"{a.num_suffix} special tokens follow the patches and its "
                                    "tokens are made into a 2-D map: evoplug keeps trailing "
                                    "tokens only in blocks on a token sequence")


def gm_token(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder")


def _attention_site(gm: fx.GraphModule, name: str, attn_mods: Set[int]) -> AttentionSite:
    """The block's attention site; when the graph shows none because it runs inside a module
    the tracer kept whole, say which."""
    try:
        return find_attention(gm, name)
    except AnalysisError:
        hidden = [n.target for n in gm.graph.nodes if n.op == "call_module"
                  and id(gm.get_submodule(n.target)) in attn_mods
                  and not isinstance(gm.get_submodule(n.target), nn.MultiheadAttention)]
        if not hidden:
            raise
    sub = gm.get_submodule(hidden[0])
    why = ("a torch.nn module, which torch.fx keeps whole" if type(sub).__module__.startswith(
        "torch.nn.") else "a leaf: timm's notrace registry or evoplug.register_leaf_module")
    raise AnalysisError(name, f"its attention runs inside `{hidden[0]}` ({type(sub).__name__}), "
                              f"which torch.fx does not trace into ({why})")


def _tokens_and_grid(a: BlockAnalysis, model: nn.Module, call: ModuleCall,
                     calls: Dict[int, ModuleCall], x: torch.Tensor, num_prefix_override,
                     prior=None):
    """Prefix tokens and patch grid. A channels-last (B, H, W, C) map (Swin) has no room for
    prefix tokens: every position is a patch."""
    if x.dim() == 4:
        H, W = int(x.shape[1]), int(x.shape[2])
        a.token_map, a.grid = True, (H, W)
        a.num_prefix, a.prefix_source = 0, f"none: the block takes a {H}x{W} channels-last map"
        a.position_terms.append("block input: the exact full map")
        return
    if num_prefix_override is not None:
        a.num_prefix, a.prefix_source = int(num_prefix_override), "option num_prefix_tokens"
        a.num_suffix = special_rows(a.name, calls, a.num_tokens)[1]
        seen, _, source = detect_prefix(model, call, calls, a.num_tokens, prior)
        if seen != a.num_prefix and not source.startswith("assumed"):
            # (the option is for a model whose prefix evoplug gets wrong; one that contradicts
            # what the tokens show is more often a slip: cls ranked as a patch, patches always kept)
            a.prefix_source += f", where the tokens show {seen} ({source})"
    else:
        a.num_prefix, a.num_suffix, a.prefix_source = detect_prefix(model, call, calls, a.num_tokens,
                                                                    prior)
    if a.num_prefix + a.num_suffix >= a.num_tokens:
        raise AnalysisError(a.name, f"{a.num_prefix + a.num_suffix} special tokens but only "
                                    f"{a.num_tokens} tokens")
    a.grid = patch_grid(call, calls, a.num_tokens - a.num_prefix - a.num_suffix, model)


def _describe_map_operations(a: BlockAnalysis, grid_ops):
    a.grid_ops_expected = bool(grid_ops)
    for kind, node, _ in grid_ops:
        if a.token_map and any(u.op == "output" for u in node.users):
            what = "the block's output map (made from the restored tokens)"
        else:
            what = "fed the full map" if kind == "to" else "read back at the kept tokens"
        a.position_terms.append(f"2-D map op at `{node.name}` -> {what}")
    if grid_ops and not a.token_map:
        a.notes.append("grid operations see the full map; positions of tokens that were not run "
                       "hold the representative token")


def _attention_kind(a: BlockAnalysis, gm: fx.GraphModule, site: AttentionSite, grid_ops,
                    batch: int, feed):
    """Self-attention over all N tokens (or keys from the spatially reduced full map), or
    attention inside the 2-D map part of the block (windows)."""
    # windowed: the queries themselves come from the 2-D map (PVT's spatial reduction only
    # builds the keys/values from it), or the attention runs on regrouped tokens
    anc_q = ancestors(site.q) | {site.q} if isinstance(site.q, fx.Node) else set()
    a.windowed = any(kind == "to" and node in anc_q for kind, node, _ in grid_ops) and any(
        kind == "from" and site.node in ancestors(node) for kind, node, _ in grid_ops)
    site_shape, q_shape = shape_of(site.node), shape_of(site.q)
    if site.kind != "mha" and site_shape is not None and site_shape[0] != batch and not (
            q_shape is not None and len(q_shape) >= 2 and q_shape[-2] == a.num_tokens):
        a.windowed = True          # (B * windows, window tokens, ...), not (B * heads, N, ...)
    elif windows_in_own_dim(site, a.num_tokens):
        a.windowed = True          # Hiera's mask units: (B, heads, windows, window tokens, d)
    elif a.token_map and any(rolls(n) for n in anc_q):
        a.windowed = True          # one shifted window as large as the map (always_partition)
    elif (a.token_map and site.kind != "mha" and q_shape is not None and len(q_shape) >= 2
          and q_shape[-2] > a.num_tokens
          and any(n.op == "call_function" and n.target is torch.nn.functional.pad for n in anc_q)):
        a.windowed = True          # one window larger than the map, which is padded to it
    if a.token_map and not a.windowed and not any(kind == "from" and node in anc_q
                                                  for kind, node, _ in grid_ops):
        # one window cut from the map by a view, permute and reshape that the grid ops do not
        # read as a token view (torchvision's Swin, whose last stage at 224 px is one 7x7
        # window: refused until the thirty-eighth session): run on the full map like windows,
        # where the window index maps every query row to a token. Not a map one token high or
        # wide: NesT's (B, T, N, C) blocks of tokens are no 2-D map, and its last level (T = 1)
        # stays refused (its scores would come from a (T, N) "grid")
        # (or windows as many slots as the map has tokens, padded: a 2x8 map in two 4x4
        # windows, 32 slots for 16 tokens; taken for attention over the tokens by its shape)
        index = window_token_index(gm, site, a, feed, batch) if min(a.grid) >= 2 else None
        if index is None or index.numel() < a.num_tokens:
            raise AnalysisError(a.name, "attention on the 4-D map that is neither windowed nor "
                                        "on a token view of it")
        a.windowed = True
    if a.token_map:
        a.notes.append("channels-last map block: tokens that were not kept get " + (
            "their own attention update (the windows run on the full map)" if a.windowed else
            "the representative token's attention update") + " plus its MLP residual")
    if not a.windowed and site.kind in ("softmax", "sdpa"):
        _check_queries_follow_tokens(a, gm, site, feed)
    if a.windowed:
        _windowed_attention(a, gm, site, feed, batch)
    elif site.kind == "softmax":
        _softmax_attention(a, gm, site, grid_ops)
    elif site.kind == "sdpa":
        _sdpa_attention(a, site, grid_ops)
    else:
        _mha_attention(a, gm, site, grid_ops)
    a.q = getattr(site.q, "name", str(site.q))
    a.k = getattr(site.k, "name", str(site.k))
    if a.kv_grid is not None and not a.windowed:
        a.attention += f" (keys from the full map reduced to {a.kv_grid[0]}x{a.kv_grid[1]})"
        a.row_full = True


def _windowed_attention(a: BlockAnalysis, gm, site, feed, batch):
    a.window_index = window_token_index(gm, site, a, feed, batch)
    a.row_full = a.window_index is not None
    seq = windows_in_own_dim(site, a.num_tokens)
    where, whole = ("the token sequence", "sequence") if seq else ("the 2-D map", "map")
    a.attention = (f"{site.kind} attention at `{site.node.name}` in windows of {where}: run on "
                   f"the full {whole}; " + ("global row = each window's mean-query attention, mapped "
                                       "back to the tokens" if a.row_full else
                                       "no global row (windows could not be mapped to tokens)"))


def _check_queries_follow_tokens(a: BlockAnalysis, gm, site, feed):
    """Where the queries' last dim is as long as the token count, whether their rows (dim -2)
    are the tokens: a change to one patch token must reach a few query rows (its own; a
    convolutional projection adds its neighbours), not every row. Cross-covariance attention
    (XCiT) lays the queries out (..., channels, tokens) and attends channel to channel; with
    as many channels per head as tokens, its map has the shape of a token map."""
    N, qs = a.num_tokens, shape_of(site.q)
    if not isinstance(site.q, fx.Node) or qs is None or len(qs) < 2 or qs[-1] != N or qs[-2] != N:
        return
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    x = feed[0]
    j = a.num_prefix                       # the first patch token (a corner of the grid)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    moved = flat.clone()
    gen = torch.Generator().manual_seed(0)
    moved[:, j] += torch.randn(moved[:, j].shape, generator=gen).to(x) * (flat.std() + 1)
    try:
        with torch.no_grad():
            q0, q1 = (run_nodes(gm.graph, site.q, gm, dict(zip(holders, (t.reshape(x.shape),
                                                                         *feed[1:]))))
                      for t in (flat, moved))
    except Exception:   # noqa: BLE001 - the probes report a block that does not run
        return
    if not isinstance(q0, torch.Tensor) or q0.shape != q1.shape or not q0.is_floating_point():
        return
    d = (q1.float() - q0.float()).abs()
    rows = d.transpose(-2, -1).reshape(-1, N).amax(0)       # the change per query row
    if rows.max() > 0 and int((rows > 1e-3 * rows.max()).sum()) > N // 2:
        raise AnalysisError(a.name, f"the attention map {shape_of(site.node)} is not token by "
                                    f"token: changing one token changes all {N} rows of the "
                                    f"queries `{site.q.name}` {tuple(qs)}, whose last dim holds the "
                                    "tokens (attention between channels, as XCiT's cross-"
                                    "covariance attention); evoplug ranks tokens by a "
                                    "token-to-token attention map")


def _between_channels(s, N: int) -> str:
    """A square map whose side is not the token count (and not a window of it) is most likely
    attention between channels (XCiT's, EdgeNeXt's cross-covariance attention)."""
    if s is not None and len(s) >= 2 and s[-1] == s[-2] and s[-1] != N and N % s[-1]:
        return "; a square map of that side is most likely attention between channels, " \
               "as XCiT's or EdgeNeXt's cross-covariance attention"
    return ""


def _softmax_attention(a: BlockAnalysis, gm, site, grid_ops):
    N = a.num_tokens
    s = shape_of(site.node)
    dim = softmax_dim(gm, site.node)
    if s is not None and dim not in (-1, len(s) - 1):    # before reading the keys off the last dim
        raise AnalysisError(a.name, f"softmax over dim {dim} of the attention map {tuple(s)}, not "
                                    "over its last dim: evoplug reads the keys on the last dim "
                                    "(lay the logits out (..., queries, keys) before the softmax)")
    if s is not None and len(s) >= 2 and s[-2] == N and s[-1] != N:
        a.kv_grid = reduced_kv_grid(site.k, s[-1], grid_ops)
        if a.kv_grid is None:
            _refuse_reduced_kv(a.name, s[-1], N)
        s = s[:-1] + (N,)
    if s is None or len(s) < 2 or s[-1] != N or s[-2] != N:
        raise AnalysisError(a.name, f"attention map {s}{computed_in(site.node, a.name)} is not "
                                    f"over the block's {N} tokens (not self-attention"
                                    f"{_between_channels(s, N)})")
    a.attention = f"softmax(q.k^T) at `{site.node.name}`"


def _sdpa_attention(a: BlockAnalysis, site, grid_ops):
    N = a.num_tokens
    qs, ks = shape_of(site.q), shape_of(site.k)
    if qs and ks and qs[-2] == N and ks[-2] != N:
        a.kv_grid = reduced_kv_grid(site.k, ks[-2], grid_ops)
        if a.kv_grid is None:
            _refuse_reduced_kv(a.name, ks[-2], N)
        ks = ks[:-2] + (N, ks[-1])
    if not qs or not ks or qs[-2] != N or ks[-2] != N:
        raise AnalysisError(a.name, f"scaled_dot_product_attention q{qs} k{ks}"
                                    f"{computed_in(site.node, a.name)} is not over the block's "
                                    f"{N} tokens (not self-attention{_between_channels(ks, N)})")
    a.attention = f"scaled_dot_product_attention at `{site.node.name}`"


def _mha_attention(a: BlockAnalysis, gm, site, grid_ops):
    mha = module_of(gm, site.node)
    if site.q is not site.k and shape_of(site.q) != shape_of(site.k):
        qs, ks = shape_of(site.q), shape_of(site.k)
        t = 1 if mha.batch_first else 0          # the token dim of nn.MultiheadAttention's inputs
        if qs and ks and len(qs) == 3 and len(ks) == 3 and qs[t] == a.num_tokens:
            # keys/values from the full map reduced (PVTv2 / SegFormer in mmdet / mmseg)
            a.kv_grid = reduced_kv_grid(site.k, ks[t], grid_ops)
        if a.kv_grid is None:
            raise AnalysisError(a.name, "nn.MultiheadAttention with different query and key tokens "
                                        "(cross-attention)")
    a.attention = f"nn.MultiheadAttention `{site.node.target}` (batch_first={mha.batch_first})"


def _describe_arguments(a: BlockAnalysis, site: AttentionSite, extras, batch: int, varying=(),
                        gm: Optional[fx.GraphModule] = None, rows=()):
    a.extra_shapes = {n: tuple(t.shape) for n, t in extras.items()}
    # first dim the batch: at one image, a floating-point table is per image if it came from
    # the inputs (provenance.varying_arguments), and follows the batch like one if the block adds
    # or multiplies it into a tensor of its own rank (a position table added to the tokens);
    # a mask (bool, int) is taken as per image; at more, not one whose first dim stayed when
    # the batch grew (``rows``: provenance.rows_not_images)
    same_rank = _same_rank_arguments(gm, a) if gm is not None else set()
    a.batch_args = tuple(n for n, t in extras.items() if t.dim() >= 2 and (
        (t.shape[0] == batch and (batch > 1 or not t.is_floating_point() or n in varying)
         and not _token_table(a, t, n in varying) and n not in rows)
        or (t.shape[0] == 1 and n in same_rank)))
    for b in site.biases:
        a.position_terms.append(f"bias `{b.name}` {shape_of(b)} -> " + (
            "kept (the windows run on the full map)" if a.windowed else "gathered for the kept tokens"))
    for t in site.arg_terms:
        a.position_terms.append(f"argument `{t}` on the attention logits -> gathered")
    M = a.num_tokens - a.num_prefix - a.num_suffix
    for tname, t in extras.items():
        if tname not in site.arg_terms:
            follows = a.num_tokens in t.shape[1:] or M in t.shape[1:] or t.shape[0] in (a.num_tokens, M)
            a.position_terms.append(f"argument `{tname}` {tuple(t.shape)} -> " + (
                "gathered by token index" if follows else "as it is (no token dim)"))


def _token_table(a: BlockAnalysis, t, varying: bool) -> bool:
    """A floating-point argument as long as the batch *and* the tokens (EVA's rotary table
    (M, d) at a calibration batch of M images) is a table over the tokens when the model's
    inputs do not move it and its rows differ: rows for the images would be copies."""
    M = a.num_tokens - a.num_prefix - a.num_suffix
    if varying or not t.is_floating_point() or t.shape[0] not in (a.num_tokens, M):
        return False
    return not bool((t == t[:1]).all())


_ARITHMETIC = {operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.sub}


def _same_rank_arguments(gm: fx.GraphModule, a: BlockAnalysis) -> set:
    """The block's other tensor arguments it first adds, subtracts or multiplies into a tensor
    of the same rank (so their first dim lines up with the batch, as the tokens' does)."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"][1:1 + len(a.plan.tensor_args)]
    out = set()
    for name, node in zip(a.plan.tensor_args, holders):
        rank = len(shape_of(node) or ())
        users = list(node.users)
        if name in a.plan.perm_args:    # (a sequence-first argument: past its transpose back)
            users = [w for u in users for w in (u.users if u.op == "call_method" and
                                                 u.target == "transpose" else [u])]
        for u in users:
            arith = (u.op == "call_function" and u.target in _ARITHMETIC) or (
                u.op == "call_method" and u.target in ("add", "mul", "sub"))
            others = [v for v in u.args if isinstance(v, fx.Node) and v is not node]
            if arith and rank and any(len(shape_of(v) or ()) == rank for v in others):
                out.add(name)
    return out
