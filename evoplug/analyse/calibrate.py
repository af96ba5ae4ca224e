"""One eager forward on an example input that records, for every module, how it was called.

This is what makes the fx analysis work on models it was not written for: it tells which
modules run attention (softmax / scaled_dot_product_attention / nn.MultiheadAttention) and how
many times, the arguments each module was called with (so a block can be traced with its real
call pattern, e.g. EVA's ``rope=`` tensor or BEiT's ``shared_rel_pos_bias=None``), the token
count N at each block and the patch grid (for the number of prefix tokens).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import threading
import types
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..integrations import registry
from ..runtime.pairs import is_plain
from .writes import unfollowed

ATTENTION_FUNCTIONS = {
    F.softmax, torch.softmax, torch.Tensor.softmax,
    F.scaled_dot_product_attention,
    F.multi_head_attention_forward,
}


#: ops over the last dim that tell a channels-last map (discover.channels_last)
_LAST_DIM_OPS = {F.layer_norm, F.rms_norm, F.linear}


#: attention kernels evoplug does not read: their score and mask functions are Python code, not
#: tensors, so no attention row can be taken from them (matched by name: no import of them)
UNREAD_ATTENTION = frozenset({"flex_attention"})

_OWN = object()     # ModuleCall.tokens: of the call's own first argument


@dataclasses.dataclass
class ModuleCall:
    name: str
    order: int                       # position of the (first) call in execution order
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    output: Any = None
    n_calls: int = 0
    attention_ops: int = 0           # attention computations run while this module ran (all calls)
    grid_ops: int = 0                # leaf modules run on a 4-D (B, C, H, W) map inside this one
    attention_map: bool = False      # its output is what an attention function returned
    module_type: Optional[type] = None
    token_perm: Tuple[int, ...] = ()  # a sequence-first block: its tokens as (B, N, C) are
    #                                   args[0].permute(token_perm) (see runtime/call.py)
    keeps_channels_first: bool = False   # a (B, C, H, W) block that keeps its map channels
    #                                   first (analyse/channels_first.py), not one that permutes it
    token_key: Any = None            # where its tokens are when not in the first argument (an
    #                                   index of args or a keyword; see _token_arguments)
    last_dim_maps: set = dataclasses.field(default_factory=set)   # shapes of the 4-D maps a
    #                                   norm or linear ran over the last dim of inside it, as a
    #                                   module or a function (discover.channels_last)

    def tokens(self, x=_OWN):
        """The token argument (or ``x``, another call's of this module), a token tensor as
        (B, N, C) (or a (B, H, W, C) map)."""
        if x is _OWN:
            x = self.raw_tokens()
        return x.permute(self.token_perm) if self.token_perm and isinstance(x, torch.Tensor) else x

    def raw_tokens(self):
        """The token argument as the call gave it: the first one unless ``token_key`` says."""
        return split_tokens(self.args, self.kwargs, self.token_key)[0]

    def other_tensors(self) -> List[torch.Tensor]:
        """The call's tensor arguments but its tokens, in call order."""
        return split_tokens(self.args, self.kwargs, self.token_key)[1]

    def first_tensor(self) -> Optional[torch.Tensor]:
        """The tokens where ``token_key`` says, else the call's first tensor argument."""
        if self.token_key is not None:
            return self.raw_tokens()
        return next((a for a in (*self.args, *self.kwargs.values()) if isinstance(a, torch.Tensor)), None)

    def feature_map(self) -> Optional[Tuple[int, int]]:
        """(h, w) when this module's (first) output is a 4-D spatial feature map (B, C, h, w):
        not an attention map (B, heads, queries, keys) passed on by e.g. ``attn_drop``, and
        with both sides >= 2 (a (B, heads, 1, N) class-attention row is no grid)."""
        out = self.output
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or self.attention_map:
            return None
        h, w = int(out.shape[-2]), int(out.shape[-1])
        return (h, w) if h >= 2 and w >= 2 else None

    def map_sides(self) -> Optional[Tuple[int, ...]]:
        """The sides of a spatial feature map this module outputs: (h, w) of a 4-D one
        (:meth:`feature_map`), (t, h, w) of a 5-D (B, C, T, H, W) one (a ``Conv3d``'s over
        video, whose T*H*W positions are the patch tokens; counted where the prefix is
        (discover.detect_prefix), never taken for a 2-D grid); None otherwise."""
        out = self.output
        if isinstance(out, torch.Tensor) and out.dim() == 5 and not self.attention_map:
            t, h, w = (int(s) for s in out.shape[2:])
            return (t, h, w) if h >= 2 and w >= 2 else None
        return self.feature_map()

    @property
    def attention_per_call(self) -> float:
        return self.attention_ops / max(1, self.n_calls)


def split_tokens(args, kwargs, key=None) -> Tuple[Any, List[torch.Tensor]]:
    """(the tokens, the other tensor arguments in call order) of a call ``(args, kwargs)``: the
    tokens are the first argument (of a call by keywords only, ``blk(x=x)``, the first tensor
    keyword, as :meth:`ModuleCall.first_tensor` reads it: None here until the thirty-eighth
    session, which left such blocks out of the provenance forward, and a class token after a
    linear patch embedding was ranked as a patch; audit W4), or where ``key`` says
    (``ModuleCall.token_key``)."""
    if key is None and not args:
        key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
    if key is None:
        token, rest = (args[0] if args else None), [*args[1:], *kwargs.values()]
    else:
        token = (args[key] if key < len(args) else None) if isinstance(key, int) else kwargs.get(key)
        rest = [a for i, a in enumerate(args) if i != key] + [v for k, v in kwargs.items() if k != key]
    return token, [v for v in rest if isinstance(v, torch.Tensor)]


def _token_arguments(model: nn.Module, calls: Dict[int, "ModuleCall"], example_input):
    """Where each block's tokens are among its arguments (``ModuleCall.token_key``), where that
    is not the first tensor of the call as given: the first tensor argument in the signature's
    order (keywords given in another order), or another argument where the first one is a
    table (``forward(self, pos, x)``, DETR's layers). Decided per class of blocks over all their
    calls: the tokens are the one other argument that has the block's output shape in every
    call (and the first one's, but for its dims of 1, unless the first one is a parameter or a
    view of one) and is no parameter; and it carries what the blocks of the class return (noise
    on their outputs reaches it in a later call), where the first one does not (a position
    table: the same in every call whatever the blocks return). A stream handed to two towers
    or parallel branches, learned queries that are a decoder's stream, are no table (audits J
    and J2 of the thirty-second session)."""
    own = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    modules = {id(m): m for m in model.modules()}
    by_class: Dict[type, list] = {}
    for mid, c in calls.items():
        if c.attention_ops and mid in modules:
            by_class.setdefault(c.module_type, []).append((modules[mid], c, _named_tensors(modules[mid], c)))
    for members in by_class.values():
        members.sort(key=lambda m: m[1].order)
        chosen = _table_first(members, own)
        if chosen and not _carries_the_blocks_outputs(model, example_input, members, chosen):
            chosen = None
        for _, c, named in members:
            key = next((k for n, k, _ in named if n == chosen), None) if chosen else (
                named[0][1] if named else None)
            given = next((i for i, a in enumerate(c.args) if isinstance(a, torch.Tensor)),
                         next((k for k, v in c.kwargs.items() if isinstance(v, torch.Tensor)), None))
            if key is not None and (key != given or chosen):     # (the plan's default: the
                c.token_key = key                                 # first in signature order)


def _named_tensors(module: nn.Module, c: "ModuleCall") -> List[Tuple[str, Any, torch.Tensor]]:
    """The call's tensor arguments in the order of the module's signature: (name, key, tensor),
    the key an index of ``c.args`` or a keyword; [] where the signature does not bind them."""
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*c.args, **c.kwargs)
    except (TypeError, ValueError):
        return []
    positional = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    out = []
    for name, v in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            return []
        items = v.items() if kind == inspect.Parameter.VAR_KEYWORD else [(name, v)]
        for n, t in items:
            i = positional.index(n) if n in positional else len(c.args)
            if isinstance(t, torch.Tensor):
                out.append((n, i if i < len(c.args) else n, t))
    return out


def _table_first(members, own) -> Optional[str]:
    """The name of the argument that may be the tokens of a class of blocks whose first tensor
    argument may be a table, by their shapes (see :func:`_token_arguments`), else None.
    ``members``: [(module, call, named tensors)] in call order, two at least."""
    def param(t):
        return id(t) in own or (t._base is not None and id(t._base) in own)

    def out_of(c):
        o = c.output[0] if isinstance(c.output, (tuple, list)) and c.output else c.output
        return o if isinstance(o, torch.Tensor) else None
    if len(members) < 2 or any(len(named) < 2 or out_of(c) is None for _, c, named in members):
        return None
    first = members[0][2][0][0]
    if any(named[0][0] != first for _, _, named in members):
        return None

    def fits(c, named, t):     # the output's shape, and the table's where it is not 1
        f, o = named[0][2], out_of(c)
        return t.shape == o.shape and not param(t) and (param(f) or (f.dim() == t.dim() and all(
            a in (1, b) for a, b in zip(f.shape, t.shape))))
    names = [n for n, _, _ in members[0][2][1:]
             if all(any(m == n and fits(c, named, t) for m, _, t in named[1:]) for _, c, named in members)]
    return names[0] if len(names) == 1 else None


def _carries_the_blocks_outputs(model: nn.Module, example_input, members, name: str) -> bool:
    """One eager forward (eval, no grad) with noise added to the outputs of the blocks
    ``members`` (see :func:`_table_first`): whether it reaches their argument ``name`` in some
    call and never their first tensor argument."""
    got: Dict[int, Tuple[Any, Any]] = {}
    keys = {id(m): (named[0][1], next(k for n, k, _ in named if n == name)) for m, _, named in members}

    def capture(m, args, kwargs):     # (the forward calls the blocks as the calibration's did)
        if id(m) not in got:
            got[id(m)] = tuple(_argument(args, kwargs, k) for k in keys[id(m)])

    def noisy(_m, _args, out):
        t = out[0] if isinstance(out, (tuple, list)) and out else out
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return None
        t = noise(t, 3)
        return (t, *out[1:]) if isinstance(out, (tuple, list)) else t
    handles = []
    for m, _, _ in members:
        handles.append(m.register_forward_pre_hook(this_thread(capture), with_kwargs=True))
        handles.append(m.register_forward_hook(this_thread(noisy)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), AsCalibrated():
            _call(model, example_input)
    except Exception:   # noqa: BLE001 - noise the model cannot take: the first argument stays
        return False
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    moved, stayed = False, True
    for m, c, named in members:
        first, tokens = got.get(id(m), (None, None))
        was_first = named[0][2]
        was_tokens = next(t for n, _, t in named if n == name)
        if not (isinstance(first, torch.Tensor) and isinstance(tokens, torch.Tensor)):
            return False
        stayed = stayed and first.shape == was_first.shape and torch.equal(first, was_first)
        moved = moved or tokens.shape != was_tokens.shape or not torch.equal(tokens, was_tokens)
    return moved and stayed


def _argument(args, kwargs, key):
    if isinstance(key, int):
        return args[key] if key < len(args) else None
    return kwargs.get(key)


def noise(t: torch.Tensor, seed: int) -> torch.Tensor:
    """``t`` plus seeded Gaussian noise on the scale of its values."""
    g = torch.Generator(device=t.device).manual_seed(seed)
    return t + torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype) * (
        t.float().std().nan_to_num() + 1.0).to(t.dtype)


class AsCalibrated(TorchFunctionMode):
    """A torch-function mode that changes nothing: a forward under it takes the kernels the
    calibration's forward took (PyTorch's ``nn.TransformerEncoderLayer`` takes its fused path
    only where no such mode runs), so a block the noise did not reach gets exactly its
    calibration input. (Text layers after the first got inputs 1e-7 off and were taken for
    layers the image reaches; audit M of the twenty-fourth session.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _AttentionCounter(TorchFunctionMode):
    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.recorder
        rec.note_uses(args, kwargs)
        rec.note_last_dim_op(func, args, kwargs)
        if func in ATTENTION_FUNCTIONS and rec.inside_attention == 0:
            rec.count_attention()
            rec.inside_attention += 1
            try:
                out = func(*args, **kwargs)
            finally:
                rec.inside_attention -= 1
            rec.attention_outputs[id(out)] = out     # kept alive: the id stays unique
            return out
        if rec.inside_attention == 0 and rec.stack and getattr(func, "__name__", None) in UNREAD_ATTENTION:
            rec.unread.setdefault(rec.names.get(rec.stack[-1], "?"), func.__name__)
        return func(*args, **kwargs)


class _Recorder:
    def __init__(self, model: nn.Module):
        self.calls: Dict[int, ModuleCall] = {}
        self.stack: List[int] = []
        self.inside_attention = 0
        self.attention_outputs: Dict[int, Any] = {}   # what attention functions returned, by id
        self.unread: Dict[str, str] = {}            # module -> an UNREAD_ATTENTION kernel it ran
        self.order = 0
        self.names = {id(m): n for n, m in model.named_modules()}
        self.leaves = registry.leaf_modules()
        self.childless: set = set()                 # ids of the modules with no submodules
        self.outputs: Dict[int, int] = {}           # id(tensor a module returned) -> id(module)
        self.uses: Dict[int, List[Tuple[int, ...]]] = {}   # ... -> module stack of each use

    def note_uses(self, args, kwargs):
        """Which modules were running when a torch function took a module's output: tells
        whether a block's output went only into the next block (see analyse/chain.py)."""
        if not self.outputs:
            return
        for v in tree_leaves((args, kwargs)):
            if isinstance(v, torch.Tensor) and id(v) in self.outputs:
                self.uses.setdefault(id(v), []).append(tuple(self.stack))

    def note_last_dim_op(self, func, args, kwargs):
        """A layer norm, RMS norm or linear over the last dim of a 4-D map called by a module
        with submodules (a block's own ``F.layer_norm(x, (C,), w, b)``): its shape, for every
        module running. One inside a module without submodules is a unit of its own input
        (``nn.LayerNorm``; a channels-first ``LayerNorm2d`` that permutes the map to norm it),
        which discover.channels_last reads as a module: its shape is that module's alone (a
        block written with functions only, its norms included, was refused as "not a
        channels-last token map" until the forty-fourth session)."""
        if not self.stack or func not in _LAST_DIM_OPS:
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return
        arg = args[1] if len(args) > 1 else kwargs.get("weight" if func is F.linear else "normalized_shape")
        if func is F.linear:
            over = isinstance(arg, torch.Tensor) and arg.dim() == 2 and arg.shape[1] == x.shape[-1]
        else:
            shape = (arg,) if isinstance(arg, int) else arg
            over = isinstance(shape, (tuple, list)) and list(shape) == [x.shape[-1]]
        if over:
            for mid in self.stack[-1:] if self.stack[-1] in self.childless else self.stack:
                self.calls[mid].last_dim_maps.add(tuple(x.shape))

    def count_attention(self):
        for mid in self.stack:
            self.calls[mid].attention_ops += 1

    def pre(self, module, args, kwargs):
        mid = id(module)
        c = self.calls.get(mid)
        if c is None:
            c = self.calls[mid] = ModuleCall(self.names.get(mid, "?"), self.order, args, dict(kwargs),
                                             module_type=type(module))
        self.order += 1
        c.n_calls += 1
        if next(module.children(), None) is None:
            self.childless.add(mid)
        if mid in self.childless and any(isinstance(a, torch.Tensor) and a.dim() == 4 for a in args):
            for outer in self.stack:      # e.g. a depthwise conv inside an MLP, PVT's sr conv
                self.calls[outer].grid_ops += 1
        self.stack.append(mid)
        if isinstance(module, nn.MultiheadAttention):  # its fast path may bypass the functions
            if self.inside_attention == 0:
                self.count_attention()
            self.inside_attention += 1
        elif self.leaves and isinstance(module, self.leaves):
            self.inside_attention += 1    # a registered leaf: a softmax inside is no attention

    def post(self, module, args, kwargs, output):
        mid = id(module)
        if isinstance(module, nn.MultiheadAttention) or (self.leaves and isinstance(module, self.leaves)):
            self.inside_attention -= 1
        if self.stack and self.stack[-1] == mid:
            self.stack.pop()
        c = self.calls[mid]
        if isinstance(output, torch.Tensor):
            self.outputs[id(output)] = mid
        if c.n_calls == 1:
            c.output = output
            # an attention map passed on unchanged (attn_drop in eval) is no feature map
            c.attention_map = isinstance(output, torch.Tensor) and id(output) in self.attention_outputs


def this_thread(hook):
    """``hook`` for the calls made on the thread that registers it; other threads' calls of the
    module pass untouched. A twin's analysis hooks modules it shares with the model while other
    threads may run them (``forward_features`` called directly, see runtime/state.py): their
    calls must neither count in the record nor get its noise."""
    me = threading.get_ident()

    def only_here(*args, **kwargs):
        return hook(*args, **kwargs) if threading.get_ident() == me else None
    return only_here


class CallRecord(dict):
    """id(module) -> :class:`ModuleCall` of one calibration forward; ``derived`` caches what the
    analysis computes from the whole record once (e.g. the modules inside attention)."""

    def __init__(self, calls, uses=None, returned=()):
        super().__init__(calls)
        self.derived: Dict[str, Any] = {}
        self.uses: Dict[int, List[Tuple[int, ...]]] = uses or {}   # see _Recorder.note_uses
        self.returned = frozenset(returned)     # ids of the tensors the model's forward returned


class CalibrationFailed(Exception):
    """The calibration forward raised ``error`` inside the module at path ``where`` (the
    innermost that ran; "" where none of the model's submodules did)."""

    def __init__(self, where: str, error: Exception):
        super().__init__(where, error)
        self.where, self.error = where, error


def calibrate(model: nn.Module, example_input) -> Dict[int, ModuleCall]:
    """Run ``model(example_input)`` once (eval, no grad) and record every module call; raises
    :class:`CalibrationFailed` naming the module it fails in (a block that takes gradients
    without ``torch.enable_grad()``: audit M3 of the forty-ninth session named none)."""
    rec = _Recorder(model)
    handles = []
    for m in model.modules():
        if isinstance(m, torch.jit.ScriptModule):
            continue    # (TorchScript takes no hooks: a scripted module is a leaf, not recorded)
        handles.append(m.register_forward_pre_hook(this_thread(rec.pre), with_kwargs=True))
        handles.append(m.register_forward_hook(this_thread(rec.post), with_kwargs=True))
    was_training = model.training
    model.eval()
    before = {id(m): plain_attributes(m) for m in model.modules()}
    held = {id(m): dict(vars(m)) for m in model.modules()}       # (by identity: objects_set)
    try:
        with torch.no_grad(), _AttentionCounter(rec):
            if isinstance(example_input, (tuple, list)):
                out = model(*example_input)
            elif isinstance(example_input, dict):
                out = model(**example_input)
            else:
                out = model(example_input)
    except Exception as e:
        raise CalibrationFailed(rec.names.get(rec.stack[-1], "") if rec.stack else "", e) from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    calls = CallRecord(rec.calls, rec.uses, [id(t) for t in _tensors_in(out)])
    calls.derived["unread_attention"] = rec.unread
    calls.derived["example_input"] = example_input     # (for the probes run on demand)
    _token_arguments(model, calls, example_input)
    # plain attributes a forward sets (a cached size, transformers' Swin's shift set to 0 for
    # good): state, not what the trace depends on; with the values the forward left
    calls.derived["volatile"] = {
        id(m): {k: v for k, v in plain_attributes(m).items()
                if before.get(id(m), {}).get(k, _GONE) != v}
        for m in model.modules()}
    calls.derived["objects_set"] = objects_set(model, held)
    calls.derived["filled"] = filled_with_tensors(model, before)
    return calls


def filled_with_tensors(model: nn.Module, before: Dict[int, dict]) -> Dict[int, Tuple[str, ...]]:
    """id(module) -> the names of the plain containers (``before``: :func:`plain_attributes`)
    that the calibration's forward filled with tensors: a cache of the module's own
    (transformers' LeViT attention keeps its bias table in a dict keyed by the device, filled in
    eval mode), no setting a trace reads: runtime/spec.py ``changed`` does not watch them (an
    empty one was watched until audit A1 of the fifty-second session, and the layer's own
    forward, keep 1.0 on the fast path, filling it refused every later call). A log that grows
    at each call is refused by analyse/block.py ``_moved_at_a_second_call``."""
    found = {}
    for m in model.modules():
        now = vars(m)
        names = tuple(k for k, v in before.get(id(m), {}).items() if isinstance(v, _MUTABLE)
                      and k in now and not is_plain(now[k]))
        if names:
            found[id(m)] = names
    return found


def objects_set(model: nn.Module, held: Dict[int, dict]) -> Dict[int, Tuple[str, ...]]:
    """id(module) -> the names of the attributes the calibration's forward set to another
    Python object than ``held`` ({id(module): its attributes before}) that no program can set
    as it does (analyse/writes.py ``unfollowed``: an instance of a class of the model's code, a
    dataclass compared by identity or holding a tensor): analyse/block.py refuses the block
    whose own code set one."""
    found = {}
    for m in model.modules():
        names = tuple(k for k, v in vars(m).items() if not k.startswith("_") and
                      v is not held.get(id(m), {}).get(k) and unfollowed(v))
        if names:
            found[id(m)] = names
    return found


_GONE = object()
def plain_attributes(m: nn.Module) -> Dict[str, Any]:
    """A module's attributes of plain Python values (not ``training``): what a trace bakes
    into the code it records (a window or shift size, a flag, a mode): numbers, flags,
    strings, enum members, numpy scalars and containers of them (runtime/pairs.py
    ``is_plain``), the mutable ones copied (a forward that changes a dict in place changed
    it). Until the forty-ninth session only numbers, flags, strings and tuples of them: a
    forward that set an enum member, or a list where ``__init__`` had a tuple, went unseen."""
    return {k: copy.deepcopy(v) if isinstance(v, _MUTABLE) else v for k, v in vars(m).items()
            if not k.startswith("_") and k != "training" and is_plain(v)}


_MUTABLE = (list, dict, set, types.SimpleNamespace)


def _tensors_in(obj, depth: int = 4):
    """The tensors in a model's output: nested tuples, lists, dicts and plain objects (e.g. a
    dataclass of outputs), ``depth`` containers down (``CallRecord.returned``: a block whose
    output the model returns hands nothing on). One deeper is not missed for good: the record
    holds the model's output, so the block's output is held outside the record and makes no link
    there either (analyse/chain.py ``_held_elsewhere``; audit of the fifty-third session,
    ``test_a_block_output_the_model_returns_deeper_than_the_calibration_looks_is_not_handed_on``)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0:
        return []
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (tuple, list)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
        items = list(vars(obj).values())
    else:
        return []
    return [t for v in items for t in _tensors_in(v, depth - 1)]


def _call(model: nn.Module, example_input):
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)
