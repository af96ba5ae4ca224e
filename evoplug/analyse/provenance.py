"""Where the tokens come from: eager forwards of the model (eval, no grad) with noise added to
its first patch map, to its inputs, or to every block's output, compared with the calibration
forward (calibrate.py). They tell the special tokens from the patches
(:func:`token_provenance`), blocks that see no image (text towers), token streams of their own
(:func:`stream_starts`: a second image tower) and block arguments that come from the inputs
(:func:`varying_arguments`). Results go to ``calls.derived``."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import List, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .calibrate import AsCalibrated, CallRecord, _call, _tensors_in, noise, split_tokens, this_thread
from .pointwise import seeded
from ..runtime.entry import row_counts


#: relative change of a token row that counts as "comes from the patch map"
_PROVENANCE_TOLERANCE = 1e-4


def token_provenance(model: nn.Module, example_input, calls: CallRecord, blocks):
    """Which token rows of the blocks' inputs come from the image: one more eager forward
    (eval, no grad) in which the first 4-D map the model computes before the first block
    (outside attention: the patch embedding's, or a convolutional stem's first) gets random
    noise added, or, with no such map (a patch embedding by reshape and ``nn.Linear``, a
    ``Conv3d`` over video), every floating-point input and integer image does
    (:func:`_image_input`); the rows of a block's token input that stay the same are the
    tokens that are not patches (cls, distillation, registers, detection tokens, the learned
    group tokens a later stage appends). Read at the first block with each token count N
    whose input the noise reached. Stored as
    ``calls.derived['untouched'] = {N: rows}``; nothing for a block without a (B, N, C) input.
    (Evo-ViT ranks patches and keeps the other tokens: a token that is neither leading,
    trailing nor a patch would be ranked as one, see discover.special_rows.)

    Also ``calls.derived['image_free']``: the blocks whose input no image input of the
    model reaches, when another block's does (a text encoder's layers beside an image
    encoder's, before or after it): see :func:`_image_free`."""
    every = {}
    for block in sorted((b for b in blocks if calls.get(id(b)) is not None),
                        key=lambda b: calls[id(b)].order):
        c = calls.get(id(block))
        x = c.tokens() if c is not None else None
        if isinstance(x, torch.Tensor) and x.dim() in (3, 4):
            every[id(block)] = (c.name, x)
    if not any(x.dim() == 3 for _, x in every.values()):
        return
    first_order = min(calls[k].order for k, (_, x) in every.items() if x.dim() == 3)
    source = _first_feature_map(model, calls, first_order)
    by_id = {id(b): b for b in blocks}
    seen = _inputs_seen(model, example_input, by_id, every, () if source is None else (source,), calls=calls)
    if seen is None:
        return
    seen = _as_tokens(seen, calls)
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
                                            {k: every[k] for k in same + before}, calls)
    calls.derived["image_free"] = tuple(every[k][0] for k in same)
    inputs = {}
    for k, (_, x) in every.items():
        y = seen.get(k)
        if x.dim() != 3 or x.shape[1] in inputs or k in same or not isinstance(y, torch.Tensor) \
                or y.shape != x.shape:
            continue
        rows = torch.nonzero(_unchanged_rows(x, y)).flatten()
        inputs[x.shape[1]] = tuple(int(i) for i in rows)
    calls.derived["untouched"] = inputs
    calls.derived["mask_counts"] = mask_counts(example_input)


def mask_counts(example_input) -> frozenset:
    """The counts of True and of False entries per row (image) of each boolean input of two or
    more dims where every row has as many (VideoMAE's ``bool_masked_pos``): as many tokens may
    not come from the image at all (its pre-training decoder trails one mask token per True
    entry), which discover.special_rows then believes though the noise reached fewer tokens
    than the patch grid has."""
    items = list(example_input.values()) if isinstance(example_input, dict) else (
        list(example_input) if isinstance(example_input, (tuple, list)) else [example_input])
    counts = set()
    for t in items:
        if isinstance(t, torch.Tensor) and t.dtype == torch.bool and t.dim() >= 2 and t.shape[0]:
            fewest, most = row_counts(t, True)
            if fewest == most:
                counts.update((fewest, t[0].numel() - fewest))
    return frozenset(counts)


def class_token_rows(model: nn.Module, example_input, calls: CallRecord, blocks):
    """Where the class token is among a block's tokens: one more eager forward (eval, no grad)
    with noise on the model's declared class token (the shallowest ``cls_token`` parameter);
    the one row of the first block with each token count N that changes is the class token's.
    Stored as ``calls.derived['class_rows'] = {N: row}``; nothing where no ``cls_token``
    parameter is declared, or where the noise changes no row or several. Evo-ViT ranks by the
    class token's query, which evoplug reads as the first prefix token's: registers before the
    class token (``[reg, cls, patches]``) had a register rank the tokens (audit W4)."""
    token = next((m.cls_token for _, m in model.named_modules()
                  if isinstance(getattr(m, "cls_token", None), nn.Parameter)), None)
    if token is None or not token.is_floating_point() or not token.numel():
        return
    every, sizes = {}, set()
    for block in sorted((b for b in blocks if calls.get(id(b)) is not None),
                        key=lambda b: calls[id(b)].order):
        x = calls[id(block)].tokens()
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] not in sizes:
            every[id(block)] = (calls[id(block)].name, x)
            sizes.add(x.shape[1])
    seen = _inputs_seen(model, example_input, {id(b): b for b in blocks}, every, calls=calls,
                        mode=_InPlaceOf(token, noise(token.detach(), 1)))
    rows = {}
    for k, (_, x) in every.items():
        y = (seen or {}).get(k)
        if isinstance(y, torch.Tensor) and y.shape == x.shape:
            changed = torch.nonzero(~_unchanged_rows(x, y)).flatten()
            if changed.numel() == 1:
                rows[x.shape[1]] = int(changed)
    calls.derived["class_rows"] = rows


def rows_followed(model: nn.Module, example_input, calls: CallRecord, into: nn.Module,
                  source: nn.Module, least: int = 1) -> Optional[torch.Tensor]:
    """(N,) which token rows of ``into``'s input each follow one row of ``source``'s (B, N', C)
    output, token by token: eager forwards (eval, no grad, the random numbers of seed 0 in each:
    a subset drawn at random is drawn alike) in which ``source`` returns its output
    with small noise (1e-3 of its scale: a ranking by the rows keeps its order) on all its rows,
    then, for each bit of a row's index, on the rows with the bit set and on the others. A row
    of one source row (copied, gathered, then normed, scaled, projected, cast, given a position
    term) changes with all of them and in one forward of each pair; a row made of several (a
    pooling, a patch merging, an attention subsample) changes in both forwards of a bit where
    two of its rows differ. Stops once fewer than ``least`` rows can follow one; None where the
    model cannot take the noise."""
    n_rows = calls[id(source)].output.shape[1]
    index = torch.arange(n_rows)
    masks = [index >= 0]
    for b in range(max(1, (n_rows - 1).bit_length())):
        masks += [(index >> b) % 2 == 1, (index >> b) % 2 == 0]
    x, followed, last = None, None, None
    for i, mask in enumerate([index < 0] + masks):
        seen = seeded(_inputs_seen, model, example_input, {id(into): into}, {id(into): None},
                      calls=calls, outputs={source: _small_noise_on(mask, i)})
        y = None if seen is None else seen.get(id(into))
        if not isinstance(y, torch.Tensor) or (x is not None and y.shape != x.shape):
            return None
        if i == 0:
            x = y
            continue
        changed = ~_unchanged_rows(x, y)
        followed = changed if i == 1 else followed & ~(last & changed) if i % 2 == 1 else followed
        if int(followed.sum()) < least:
            break
        last = changed
    return followed


def _small_noise_on(rows: torch.Tensor, seed: int):
    """A forward hook adding seeded noise of 1e-3 of the output's scale to its token ``rows``."""
    def hook(_m, _args, out):
        g = torch.Generator().manual_seed(seed)
        step = torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.device, out.dtype)
        scale = (out.float().std() + 1.0).to(out.dtype) * 1e-3
        return torch.where(rows.to(out.device)[:, None], out + step * scale, out)
    return hook


def _unchanged_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) whether each token row of ``y`` (B, N, C) is ``x``'s, within the tolerance."""
    change = (y.float() - x.float()).abs().amax(dim=(0, 2))
    return change <= _PROVENANCE_TOLERANCE * x.float().abs().amax(dim=(0, 2)).clamp_min(1.0)


class _InPlaceOf(TorchFunctionMode):
    """Hands ``noised`` to every torch function this thread's forward calls with ``param`` (at
    the top level of an argument, or in a list or tuple: ``torch.cat([cls, x])``): the
    parameter itself is left as it is (a twin build's forward runs while other threads may
    read the model's parameters; writing the noise into it showed them a class token 3.3 off,
    audit W5 of the thirty-eighth session)."""

    def __init__(self, param: torch.Tensor, noised: torch.Tensor):
        super().__init__()
        self.param, self.noised = param, noised

    def _swap(self, a):
        if a is self.param:
            return self.noised
        if isinstance(a, (list, tuple)) and any(v is self.param for v in a):
            return type(a)(self.noised if v is self.param else v for v in a)
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args = tuple(self._swap(a) for a in args)
        kwargs = {k: self._swap(v) for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)


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
        x = c.raw_tokens()
        if isinstance(x, torch.Tensor) and x.dim() in (3, 4):
            every[id(block)] = (c.name, x)
    if not every:
        return

    by_id = {id(b): b for b in ordered}
    seen = _inputs_seen(model, example_input, by_id, every, ordered, seed=2, calls=calls)
    if seen is None:    # noise the model cannot take, or an output it cannot go on: one stream
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
    every = {id(b): (calls[id(b)].name, calls[id(b)].raw_tokens()) for b in ordered
             if isinstance(calls[id(b)].raw_tokens(), torch.Tensor)}
    by_id = {id(b): b for b in ordered}
    reached = []
    for i in range(n):
        seen = _inputs_seen(model, example_input, by_id, every, only=i, calls=calls)
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
        return c.other_tensors()
    every = {}
    for b in blocks:
        c = calls.get(id(b))
        batch_dim = 1 if c is not None and c.token_perm else 0     # (sequence-first: (N, B, ...))
        if c is not None and isinstance(c.raw_tokens(), torch.Tensor) and any(
                t.is_floating_point() and t.dim() >= 2 and t.shape[batch_dim] == 1
                for t in others(c)):
            every[id(b)] = (c.name, c.raw_tokens())
    if not every:
        return
    got = {}
    if _inputs_seen(model, example_input, {id(b): b for b in blocks}, every, args=got, calls=calls) is None:
        return
    calls.derived["varying"] = {id(t) for t, u in _argument_pairs(calls, every, got)
                                if t.shape != u.shape or not torch.equal(t, u)}


def _argument_pairs(calls: CallRecord, every, got: dict):
    """(calibration tensor, the same argument in another forward, ``got``) for the other tensor
    arguments of the blocks ``every``, where both forwards gave as many."""
    for k in every:
        before, after = calls[k].other_tensors(), got.get(k, [])
        if len(before) == len(after):
            yield from zip(before, after)


def rows_not_images(model: nn.Module, example_input, calls: CallRecord, blocks):
    """Which of the blocks' other tensor arguments have a first dim as long as the calibration's
    batch (B > 1) by chance: one eager forward with one image more (each input tensor of first
    dim B grown by its first image) leaves their first dim at B (a per-head bias (heads, N, N)
    shared by the blocks, BEiT's, calibrated on as many images as heads: taken for one per image,
    each image got one head's bias; audit of the twenty-ninth session). Stored as
    ``calls.derived['rows_not_images']``, the ids of the calibration's argument tensors."""
    def others(c):
        return c.other_tensors()
    every, B = {}, None
    for b in blocks:
        c = calls.get(id(b))
        if c is None or c.token_perm or not isinstance(c.raw_tokens(), torch.Tensor):
            continue
        B = c.raw_tokens().shape[0]
        if B > 1 and any(t.dim() >= 2 and t.shape[0] == B for t in others(c)):
            every[id(b)] = (c.name, c.raw_tokens())
    if not every:
        return
    got, seen = {}, {}
    if not _one_image_more(model, example_input, B, {
            b: _capture(seen, id(b), got, calls[id(b)].token_key) for b in blocks if id(b) in every}):
        return
    calls.derived["rows_not_images"] = {id(t) for t, u in _argument_pairs(calls, every, got)
                                        if t.dim() >= 2 and t.shape[0] == B and u.shape[0] == B}


def images_in_rows(model: nn.Module, example_input, calls: CallRecord):
    """Which modules that ran attention on tokens laid out as sequence-first ones look, (X, B,
    C) with B the calibration's images and no ``nn.MultiheadAttention`` to say (see
    discover.sequence_first), hold the images along dim 0: tokens regrouped (B*N, T', C), as
    divided space-time attention runs over each position's frames, T' equal to B by chance.
    One eager forward with one image more: sequence-first tokens grow along dim 1, regrouped
    ones along dim 0. Stored as ``calls.derived['images_in_rows']`` (ids), read by
    discover.find_blocks (taken for sequence-first, such blocks were refused for another
    reason, special tokens between the patches, until audit B1 of the forty-first session)."""
    from .discover import _model_batch, mha_layout, sequence_first
    batch, every, seen = _model_batch(model, calls), {}, {}
    for m in model.modules():
        c = calls.get(id(m))
        x = c.first_tensor() if c is not None and c.attention_ops else None
        if isinstance(x, torch.Tensor) and sequence_first(x, batch) and \
                not isinstance(m, nn.MultiheadAttention) and mha_layout(m, x, calls) is None:
            every[m] = x

    def capture(m, args, kwargs):   # (the tokens as the calibration's first_tensor reads them)
        seen.setdefault(m, dataclasses.replace(calls[id(m)], args=args, kwargs=kwargs).first_tensor())
    if every and _one_image_more(model, example_input, batch, {m: capture for m in every}):
        calls.derived["images_in_rows"] = {
            id(m) for m, x in every.items() if isinstance(seen.get(m), torch.Tensor)
            and seen[m].shape[1:] == x.shape[1:] and seen[m].shape[0] > x.shape[0]}


def _one_image_more(model: nn.Module, example_input, batch: int, hooks: dict) -> bool:
    """One eager forward (eval, no grad) with each input tensor of first dim ``batch`` grown by
    its first image, ``hooks`` ({module: pre-hook with keywords}) installed; False where the
    model cannot take it (a model of one batch size: no answer, as before)."""
    def grown(v):
        return torch.cat([v, v[:1]]) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v
    if isinstance(example_input, dict):
        bigger = {k: grown(v) for k, v in example_input.items()}
    elif isinstance(example_input, (tuple, list)):
        bigger = type(example_input)(grown(v) for v in example_input)
    else:
        bigger = grown(example_input)
    handles = [m.register_forward_pre_hook(this_thread(h), with_kwargs=True) for m, h in hooks.items()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), AsCalibrated():
            _call(model, bigger)
    except Exception:   # noqa: BLE001 - a model of one batch size
        return False
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return True


def _as_tokens(seen: dict, calls: CallRecord) -> dict:
    """The block inputs ``seen`` as (B, N, C) tokens, as ``ModuleCall.tokens`` gives the
    calibration's (sequence-first blocks take them transposed)."""
    return {k: calls[k].tokens(y) for k, y in seen.items()}


def _same_input(seen, key, x) -> bool:
    y = seen.get(key)
    return isinstance(y, torch.Tensor) and y.shape == x.shape and torch.equal(y, x)


def _inputs_seen(model: nn.Module, example_input, by_id, every, sources=(), only=None,
                 args: Optional[dict] = None, seed: int = 0, calls=None,
                 mode: Optional[TorchFunctionMode] = None, outputs=None) -> Optional[dict]:
    """The first input of each block of ``every`` in one eager forward (eval, no grad) with
    noise added to the (first tensor) output of each module of ``sources``, or without sources
    to every floating-point input (``only``: to the one of that rank), or, with ``mode``, the
    inputs as they are under that mode (noise on a parameter: :class:`_InPlaceOf`); None when
    the model cannot take it or an output has no floating-point tensor to add it to. ``args``:
    filled with each block's other tensor arguments, in call order. ``calls``: the record,
    where a block's tokens are not its first argument (``ModuleCall.token_key``). ``outputs``:
    {module: forward hook} that change those modules' outputs in other ways (analyse/chain.py)."""
    seen, missed = {}, []

    def perturb(m, _args, out):
        t = out[0] if isinstance(out, (tuple, list)) and out else out
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            missed.append(m)
            return None
        t = noise(t, seed)
        return (t, *out[1:]) if isinstance(out, (tuple, list)) else t

    handles = [by_id[k].register_forward_pre_hook(this_thread(_capture(
        seen, k, args, calls[k].token_key if calls is not None else None)), with_kwargs=True) for k in every]
    handles += [m.register_forward_hook(this_thread(perturb)) for m in sources]
    handles += [m.register_forward_hook(this_thread(h)) for m, h in (outputs or {}).items()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), AsCalibrated(), mode or contextlib.nullcontext():
            _call(model, example_input if sources or mode or outputs else
                  _noisy_inputs(example_input, only))
    except Exception:   # noqa: BLE001 - noise the model cannot take: no provenance, as before
        return None
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return None if missed else seen


def _capture(seen: dict, key, others: Optional[dict] = None, token_key=None):
    """A pre-hook (with keywords) keeping a block's tokens (its first input, or where
    ``token_key`` says) under ``key``, and in ``others`` its other tensor arguments (it returns
    None: the arguments stay as they are)."""
    def hook(_m, args, kwargs):
        token, rest = split_tokens(args, kwargs, token_key)
        seen.setdefault(key, token)
        if others is not None:
            others.setdefault(key, rest)
    return hook


def _image_free(every, seen) -> List[int]:
    """The blocks (ids) whose input the noise on the image left exactly as it was, when it
    changed another block's (a text encoder's layers beside an image encoder's)."""
    same = [k for k, (_, x) in every.items() if _same_input(seen, k, x)]
    changed = any(isinstance(seen.get(k), torch.Tensor) and seen[k].shape == x.shape
                  and k not in same for k, (_, x) in every.items())
    return same if changed else []


def _unchanged_by_the_inputs(model: nn.Module, example_input, by_id, every,
                             calls: CallRecord) -> List[int]:
    """Of the blocks ``every`` ({id: (name, calibration input)}), those whose input stays
    exactly the same when noise is added to every floating-point tensor and integer image the
    model is given: nothing they compute comes from the image (token ids and masks are
    integers of a lower rank)."""
    if not every:
        return []
    seen = _inputs_seen(model, example_input, by_id, every, calls=calls)
    if seen is None:    # inputs the model cannot take noisy: nothing is refused
        return []
    seen = _as_tokens(seen, calls)
    return [k for k, (_, x) in every.items() if _same_input(seen, k, x)]


def _image_input(v) -> bool:
    """A model input the noise forwards perturb: a floating-point tensor, or an integer one of
    an image's rank (a uint8 image (B, C, H, W) or video, which the model normalises itself;
    left alone, and the class token ranked as a patch, until audit B1 of the forty-first
    session); never token ids (B, L), a bool mask or a pixel mask (B, H, W)."""
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or (
        v.dim() >= 4 and v.dtype != torch.bool and not v.is_complex()))


def _float_inputs(example_input) -> int:
    """How many inputs the noise forwards perturb (:func:`_image_input`)."""
    items = list(example_input.values()) if isinstance(example_input, dict) else (
        list(example_input) if isinstance(example_input, (tuple, list)) else [example_input])
    return sum(_image_input(v) for v in items)


def _noisy_inputs(example_input, only: Optional[int] = None):
    """``example_input`` with noise added to every floating-point tensor in it and every
    integer image (:func:`_image_input`: a dict's values, a tuple's items or the tensor
    itself); ``only``: to the one of that rank among them. An integer image's noise is rounded
    and kept within the values it holds."""
    seen = [-1]

    def noisy(v):
        if _image_input(v):
            seen[0] += 1
            if only is not None and seen[0] != only:
                return v
            if not v.is_floating_point():
                return noise(v.double(), 1).round().clamp(int(v.min()), int(v.max())).to(v.dtype)
            return noise(v, 1)
        return v
    if isinstance(example_input, dict):
        return {k: noisy(v) for k, v in example_input.items()}
    if isinstance(example_input, (tuple, list)):
        return type(example_input)(noisy(v) for v in example_input)
    return noisy(example_input)


def _first_feature_map(model: nn.Module, calls: CallRecord, before: int):
    from .discover import no_patch_maps
    inside = no_patch_maps(model, calls)
    best = None
    for m in model.modules():
        c = calls.get(id(m))
        if c is None or c.order >= before or id(m) in inside or c.n_calls != 1:
            continue
        if c.feature_map() is not None and (best is None or c.order < best[0]):
            best = (c.order, m)
    return None if best is None else best[1]


def rest_read(model: nn.Module, example_input, blocks) -> List[nn.Module]:
    """Of ``blocks`` ([(module, items)]: blocks whose tuple output holds, at those positions,
    tensors computed from their tokens), the ones whose items the model reads after them:
    noise on those items changes the model's output (one eager forward, eval, no grad, with
    all of them perturbed; then one per block when that changed it). An evolving block computes
    them over its kept tokens only, so a model that reads them would read something else."""
    def run(chosen) -> Optional[list]:
        def perturb(m, _args, out):
            items = dict(chosen)[m]
            if type(out) not in (tuple, list):
                return None
            return type(out)(noise(t, 7 + i) if i in items and isinstance(t, torch.Tensor) and
                             t.is_floating_point() else t for i, t in enumerate(out))
        handles = [m.register_forward_hook(this_thread(perturb)) for m, _ in chosen]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return _tensors_in(_call(model, example_input))
        finally:
            for h in handles:
                h.remove()
            model.train(was)

    def differs(a, b) -> bool:
        return len(a) != len(b) or any(s.shape != t.shape or not torch.equal(s, t) for s, t in zip(a, b))

    if not blocks:
        return []
    ref = run([])
    if not differs(ref, run(blocks)) or differs(ref, run([])):   # (read by nothing, or noisy)
        return []
    return [m for m, items in blocks if differs(ref, run([(m, items)]))]
