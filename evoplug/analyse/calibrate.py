"""One eager forward on an example input that records, for every module, how it was called.

This is what makes the fx analysis work on models it was not written for: it tells which
modules run attention (softmax / scaled_dot_product_attention / nn.MultiheadAttention) and how
many times, the arguments each module was called with (so a block can be traced with its real
call pattern, e.g. EVA's ``rope=`` tensor or BEiT's ``shared_rel_pos_bias=None``), the token
count N at each block and the patch grid (for the number of prefix tokens).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..integrations import registry

ATTENTION_FUNCTIONS = {
    F.softmax, torch.softmax, torch.Tensor.softmax,
    F.scaled_dot_product_attention,
    F.multi_head_attention_forward,
}


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

    def feature_map(self) -> Optional[Tuple[int, int]]:
        """(h, w) when this module's (first) output is a 4-D spatial feature map (B, C, h, w):
        not an attention map (B, heads, queries, keys) passed on by e.g. ``attn_drop``, and
        with both sides >= 2 (a (B, heads, 1, N) class-attention row is no grid)."""
        out = self.output
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or self.attention_map:
            return None
        h, w = int(out.shape[-2]), int(out.shape[-1])
        return (h, w) if h >= 2 and w >= 2 else None

    @property
    def attention_per_call(self) -> float:
        return self.attention_ops / max(1, self.n_calls)


class _AttentionCounter(TorchFunctionMode):
    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.recorder
        rec.note_uses(args, kwargs)
        if func in ATTENTION_FUNCTIONS and rec.inside_attention == 0:
            rec.count_attention()
            rec.inside_attention += 1
            try:
                out = func(*args, **kwargs)
            finally:
                rec.inside_attention -= 1
            rec.attention_outputs[id(out)] = out     # kept alive: the id stays unique
            return out
        return func(*args, **kwargs)


class _Recorder:
    def __init__(self, model: nn.Module):
        self.calls: Dict[int, ModuleCall] = {}
        self.stack: List[int] = []
        self.inside_attention = 0
        self.attention_outputs: Dict[int, Any] = {}   # what attention functions returned, by id
        self.order = 0
        self.names = {id(m): n for n, m in model.named_modules()}
        self.leaves = registry.leaf_modules()
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
        if next(module.children(), None) is None and any(
                isinstance(a, torch.Tensor) and a.dim() == 4 for a in args):
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


class CallRecord(dict):
    """id(module) -> :class:`ModuleCall` of one calibration forward; ``derived`` caches what the
    analysis computes from the whole record once (e.g. the modules inside attention)."""

    def __init__(self, calls, uses=None, returned=()):
        super().__init__(calls)
        self.derived: Dict[str, Any] = {}
        self.uses: Dict[int, List[Tuple[int, ...]]] = uses or {}   # see _Recorder.note_uses
        self.returned = frozenset(returned)     # ids of the tensors the model's forward returned


def calibrate(model: nn.Module, example_input) -> Dict[int, ModuleCall]:
    """Run ``model(example_input)`` once (eval, no grad) and record every module call."""
    rec = _Recorder(model)
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(rec.pre, with_kwargs=True))
        handles.append(m.register_forward_hook(rec.post, with_kwargs=True))
    was_training = model.training
    model.eval()
    before = {id(m): plain_attributes(m) for m in model.modules()}
    try:
        with torch.no_grad(), _AttentionCounter(rec):
            if isinstance(example_input, (tuple, list)):
                out = model(*example_input)
            elif isinstance(example_input, dict):
                out = model(**example_input)
            else:
                out = model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    calls = CallRecord(rec.calls, rec.uses, [id(t) for t in _tensors_in(out)])
    # plain attributes a forward sets (a cached size): state, not what the trace depends on
    calls.derived["volatile"] = {
        id(m): {k for k, v in plain_attributes(m).items() if before.get(id(m), {}).get(k, _GONE) != v}
        for m in model.modules()}
    return calls


_GONE = object()
_PLAIN = (bool, int, float, str, type(None))


def plain_attributes(m: nn.Module) -> Dict[str, Any]:
    """A module's attributes of plain Python values (not ``training``): numbers, flags,
    strings (what a trace bakes into the code it records)."""
    return {k: v for k, v in vars(m).items()
            if not k.startswith("_") and k != "training" and type(v) in _PLAIN}


def _tensors_in(obj, depth: int = 4):
    """The tensors in a model's output: nested tuples, lists, dicts and plain objects (e.g. a
    dataclass of outputs)."""
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


#: relative change of a token row that counts as "comes from the patch map"
_PROVENANCE_TOLERANCE = 1e-4


def token_provenance(model: nn.Module, example_input, calls: CallRecord, blocks):
    """Which token rows of the blocks' inputs come from the image: one more eager forward
    (eval, no grad) in which the first 4-D map the model computes before the first block
    (outside attention: the patch embedding's, or a convolutional stem's first) gets random
    noise added, or, with no such map (a patch embedding by reshape and ``nn.Linear``, a
    ``Conv3d`` over video), every floating-point input does; the rows of a block's token input
    that stay the same are the tokens that are not patches (cls, distillation, registers,
    detection tokens, the learned group tokens a later stage appends). Read at the first
    block with each token count N whose input the noise reached. Stored as
    ``calls.derived['untouched'] = {N: rows}``; nothing for a block without a (B, N, C) input.
    (Evo-ViT ranks patches and keeps the other tokens: a token that is neither leading,
    trailing nor a patch would be ranked as one, see discover.special_rows.)

    Also ``calls.derived['image_free']``: the blocks whose input no floating-point input of
    the model reaches, when another block's does (a text encoder's layers beside an image
    encoder's, before or after it): see :func:`_image_free`."""
    every = {}
    for block in sorted((b for b in blocks if calls.get(id(b)) is not None),
                        key=lambda b: calls[id(b)].order):
        c = calls.get(id(block))
        x = c.args[0] if c is not None and c.args else None
        if isinstance(x, torch.Tensor) and x.dim() in (3, 4):
            every[id(block)] = (c.name, x)
    if not any(x.dim() == 3 for _, x in every.values()):
        return
    first_order = min(calls[k].order for k, (_, x) in every.items() if x.dim() == 3)
    source = _first_feature_map(model, calls, first_order)
    by_id = {id(b): b for b in blocks}
    seen = _inputs_seen(model, example_input, by_id, every, source)
    if seen is None:
        return
    if source is None:     # the noise was on every input: what it did not reach is image-free
        same = _image_free(every, seen)
    else:
        # (blocks inside the module the noise was added to cannot see it; those that ran
        # before it, a text tower run first, are checked with noise on every input below)
        inside = {id(m) for m in source.modules()}
        after = {k: v for k, v in every.items()
                 if k not in inside and calls[k].order > calls[id(source)].order}
        before = [k for k in every if k not in after and k not in inside]
        same = _image_free(after, seen)
        if same or (before and any(not _same_input(seen, k, after[k][1]) for k in after)):
            # confirmed on noise in every floating-point input (CrossViT's second branch
            # starts from its own patch map, which the first map's noise does not reach)
            same = _unchanged_by_the_inputs(model, example_input, by_id,
                                            {k: every[k] for k in same + before})
    calls.derived["image_free"] = tuple(every[k][0] for k in same)
    inputs = {}
    for k, (_, x) in every.items():
        y = seen.get(k)
        if x.dim() != 3 or x.shape[1] in inputs or k in same or not isinstance(y, torch.Tensor) \
                or y.shape != x.shape:
            continue
        change = (y.float() - x.float()).abs().amax(dim=(0, 2))
        scale = x.float().abs().amax(dim=(0, 2)).clamp_min(1.0)
        rows = torch.nonzero(change <= _PROVENANCE_TOLERANCE * scale).flatten()
        inputs[x.shape[1]] = tuple(int(i) for i in rows)
    calls.derived["untouched"] = inputs


def stream_starts(model: nn.Module, example_input, calls: CallRecord, blocks):
    """The blocks (names) that start a token stream of their own: one more eager forward (eval,
    no grad) with noise added to every block's token output leaves their input as it was,
    though a block ran before them (the second of two image towers, a text tower's first
    layer run before the image tower). Their scores restart (runtime/block.py): carried over,
    another stream's ranking would select their tokens. Stored as
    ``calls.derived['stream_starts']``."""
    ordered = sorted((b for b in blocks if calls.get(id(b)) is not None and calls[id(b)].n_calls == 1),
                     key=lambda b: calls[id(b)].order)
    every = {}
    for block in ordered[1:]:
        c = calls[id(block)]
        x = c.args[0] if c.args else None
        if isinstance(x, torch.Tensor) and x.dim() in (3, 4):
            every[id(block)] = (c.name, x)
    if not every:
        return

    missed = []

    def perturb(m, _args, out):
        t = out[0] if isinstance(out, (tuple, list)) and out else out
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            missed.append(m)      # an output it cannot add noise to: nothing can be told
            return None
        g = torch.Generator(device=t.device).manual_seed(2)
        t = t + torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype) * (
            t.float().std().nan_to_num() + 1.0).to(t.dtype)
        return (t, *out[1:]) if isinstance(out, (tuple, list)) else t

    seen = {}
    by_id = {id(b): b for b in ordered}
    handles = [b.register_forward_hook(perturb) for b in ordered]
    handles += [by_id[k].register_forward_pre_hook(_capture(seen, k), with_kwargs=True)
                for k in every]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            _call(model, example_input)
    except Exception:   # noqa: BLE001 - noise the model cannot take: one stream, as before
        return
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if missed:
        return
    starts = [k for k, (_, x) in every.items() if _same_input(seen, k, x)]
    calls.derived["stream_starts"] = tuple(every[k][0] for k in _foreign(
        model, example_input, calls, ordered, starts))


def _foreign(model: nn.Module, example_input, calls: CallRecord, ordered, starts) -> List[int]:
    """Of the blocks ``starts`` (ids) that no block before them reaches, those whose tokens
    come from other model inputs than the block before them: another image (a second tower),
    token ids (a text tower). Streams of one input (CrossViT's two branches of the same image)
    keep one ranking: it is of the same image regions. One forward per floating-point input,
    noise on it alone."""
    n = _float_inputs(example_input)
    if not starts or n < 2:
        return []
    every = {id(b): (calls[id(b)].name, calls[id(b)].args[0]) for b in ordered
             if calls[id(b)].args and isinstance(calls[id(b)].args[0], torch.Tensor)}
    by_id = {id(b): b for b in ordered}
    reached = []
    for i in range(n):
        seen = _inputs_seen(model, example_input, by_id, every, None, only=i)
        if seen is None:
            return []
        reached.append({k for k, (_, x) in every.items() if not _same_input(seen, k, x)})
    order = [id(b) for b in ordered]
    out = []
    for k in starts:
        before = order[order.index(k) - 1]
        if {i for i, r in enumerate(reached) if k in r} != {i for i, r in enumerate(reached) if before in r}:
            out.append(k)
    return out


def varying_arguments(model: nn.Module, example_input, calls: CallRecord, blocks):
    """Which of the blocks' other floating-point tensor arguments with a first dim of 1 come
    from the inputs (a per-image conditioning stream) rather than being shared by every image
    (a position table): at a calibration batch of one image the shape cannot tell. One eager
    forward with noise on every floating-point input; stored as ``calls.derived['varying']``,
    the ids of the calibration's argument tensors that changed."""
    def others(c):
        return [v for v in (*c.args[1:], *c.kwargs.values()) if isinstance(v, torch.Tensor)]
    every = {}
    for b in blocks:
        c = calls.get(id(b))
        if c is not None and c.args and isinstance(c.args[0], torch.Tensor) and any(
                t.is_floating_point() and t.dim() >= 2 and t.shape[0] == 1 for t in others(c)):
            every[id(b)] = (c.name, c.args[0])
    if not every:
        return
    got = {}
    if _inputs_seen(model, example_input, {id(b): b for b in blocks}, every, None, args=got) is None:
        return
    varying = set()
    for k in every:
        before, after = others(calls[k]), got.get(k, [])
        if len(before) == len(after):
            varying.update(id(t) for t, u in zip(before, after)
                           if t.shape != u.shape or not torch.equal(t, u))
    calls.derived["varying"] = varying


def _same_input(seen, key, x) -> bool:
    y = seen.get(key)
    return isinstance(y, torch.Tensor) and y.shape == x.shape and torch.equal(y, x)


def _inputs_seen(model: nn.Module, example_input, by_id, every, source, only=None,
                 args: Optional[dict] = None) -> Optional[dict]:
    """The first input of each block of ``every`` in one eager forward (eval, no grad) with
    noise added to ``source``'s output, or with ``source`` None to every floating-point input
    (``only``: to the one of that rank); None when the model cannot take it. ``args``: filled
    with each block's other tensor arguments, in call order."""
    seen = {}

    def perturb(_m, _args, out):
        g = torch.Generator(device=out.device).manual_seed(0)
        return out + torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype) * (
            out.float().std() + 1.0).to(out.dtype)

    handles = [by_id[k].register_forward_pre_hook(_capture(seen, k, args), with_kwargs=True)
               for k in every]
    if source is not None:
        handles.append(source.register_forward_hook(perturb))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            _call(model, example_input if source is not None else _noisy_inputs(example_input, only))
    except Exception:   # noqa: BLE001 - noise the model cannot take: no provenance, as before
        return None
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return seen


def _capture(seen: dict, key, others: Optional[dict] = None):
    """A pre-hook (with keywords) keeping a block's first input under ``key``, and in
    ``others`` its other tensor arguments (it returns None: the arguments stay as they are)."""
    def hook(_m, args, kwargs):
        seen.setdefault(key, args[0] if args else None)
        if others is not None:
            others.setdefault(key, [v for v in (*args[1:], *kwargs.values())
                                    if isinstance(v, torch.Tensor)])
    return hook


def _image_free(every, seen) -> List[int]:
    """The blocks (ids) whose input the noise on the image left exactly as it was, when it
    changed another block's (a text encoder's layers beside an image encoder's)."""
    same = [k for k, (_, x) in every.items() if _same_input(seen, k, x)]
    changed = any(isinstance(seen.get(k), torch.Tensor) and seen[k].shape == x.shape
                  and k not in same for k, (_, x) in every.items())
    return same if changed else []


def _unchanged_by_the_inputs(model: nn.Module, example_input, by_id, every) -> List[int]:
    """Of the blocks ``every`` ({id: (name, calibration input)}), those whose input stays
    exactly the same when noise is added to every floating-point tensor the model is given:
    nothing they compute comes from the image (token ids and masks are integers)."""
    if not every:
        return []
    seen = _inputs_seen(model, example_input, by_id, every, None)
    if seen is None:    # inputs the model cannot take noisy: nothing is refused
        return []
    return [k for k, (_, x) in every.items() if _same_input(seen, k, x)]


def _float_inputs(example_input) -> int:
    items = list(example_input.values()) if isinstance(example_input, dict) else (
        list(example_input) if isinstance(example_input, (tuple, list)) else [example_input])
    return sum(isinstance(v, torch.Tensor) and v.is_floating_point() for v in items)


def _noisy_inputs(example_input, only: Optional[int] = None):
    """``example_input`` with noise added to every floating-point tensor in it (a dict's
    values, a tuple's items or the tensor itself); ``only``: to the one of that rank among
    them."""
    seen = [-1]

    def noisy(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            seen[0] += 1
            if only is not None and seen[0] != only:
                return v
            g = torch.Generator(device=v.device).manual_seed(1)
            return v + torch.randn(v.shape, generator=g, device=v.device, dtype=v.dtype) * (
                v.float().std().nan_to_num() + 1.0).to(v.dtype)
        return v
    if isinstance(example_input, dict):
        return {k: noisy(v) for k, v in example_input.items()}
    if isinstance(example_input, (tuple, list)):
        return type(example_input)(noisy(v) for v in example_input)
    return noisy(example_input)


def _first_feature_map(model: nn.Module, calls: CallRecord, before: int):
    from .discover import inside_attention
    inside = inside_attention(model, calls)
    best = None
    for m in model.modules():
        c = calls.get(id(m))
        if c is None or c.order >= before or id(m) in inside or c.n_calls != 1:
            continue
        if c.feature_map() is not None and (best is None or c.order < best[0]):
            best = (c.order, m)
    return None if best is None else best[1]


def _call(model: nn.Module, example_input):
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)
