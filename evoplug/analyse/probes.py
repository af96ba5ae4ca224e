"""Behavioural probes of an analysed block on the calibration input."""
from __future__ import annotations

import contextlib
import copy
import io
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..copies import copy_model
from ..errors import AnalysisError
from ..runtime.gather import gather_extras
from .attention import attention_output, find_attention
from .discover import token_output
from .graph import shape_of
from .same_start import SameStart
from .snapshot import CALL_HOOK_DICTS

if TYPE_CHECKING:
    from .attention import AttentionSite
    from .block import BlockAnalysis

#: tolerance of the program probe (reproduction, permutation), relative to the output scale
PROBE_TOLERANCE = 1e-4
#: tolerance of the mixing probe, relative to the output's scale (float32; 100x in half)
MIXING_TOLERANCE = 1e-4


def _constant_attention_output(out):
    """The attention's output replaced by a constant, the same for every token (nn.Multihead-
    Attention: its first item): not zeros, which a branch scaled after the attention's product
    (``proj(o) * s`` without a bias) keeps zero whatever it is scaled by."""
    if isinstance(out, tuple):
        return (torch.full_like(out[0], 0.5),) + tuple(out[1:])
    return torch.full_like(out, 0.5)


def _values_of(target: fx.Node):
    """The values ``v`` of an attention output ``attn @ v`` or ``sdpa(q, k, v)`` where the
    output has their shape (self-attention, as many heads): the constant made from them leaves
    the attention itself dead code, so the probe runs where a term of the logits is sized from
    the full token count (a relative position bias); None otherwise."""
    if target.op != "call_function":
        return None
    if target.target is F.scaled_dot_product_attention:
        v = target.kwargs.get("value", target.args[2] if len(target.args) > 2 else None)
    else:
        v = ([a for a in target.args if isinstance(a, fx.Node)] or [None])[-1]
    return v if isinstance(v, fx.Node) and shape_of(v) is not None and \
        shape_of(v) == shape_of(target) else None


def _map_reach(gm: fx.GraphModule) -> int:
    """How far (in grid steps) the block's convolution and pooling modules can carry a token's
    change, in sum (as if each fed the next)."""
    reach = 0
    for n in gm.graph.nodes:
        m = gm.get_submodule(n.target) if n.op == "call_module" else None
        k = getattr(m, "kernel_size", None)
        if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.pooling._AvgPoolNd,
                          nn.modules.pooling._MaxPoolNd)) and k is not None:
            ks = k if isinstance(k, tuple) else (k,)
            d = getattr(m, "dilation", 1)
            ds = d if isinstance(d, tuple) else (d,) * len(ks)
            reach += max((kk - 1) // 2 * dd for kk, dd in zip(ks, ds))
    return reach


def check_no_mixing_outside_attention(gm: fx.GraphModule, site: AttentionSite, a: BlockAnalysis,
                                      feed, has_grid_ops: bool):
    """Behavioural check that the block mixes tokens only in its attention: with the attention's
    output set to a constant, changing one patch token must leave every other token as it was. An
    order-independent reduction over the tokens (a mean added to the output, pooling) passes
    the permutation probe but fails here; evoplug would compute it over the kept tokens only.
    Blocks with 2-D map operations (a depthwise conv) may change the token's neighbours: only
    the tokens far from it on the grid are compared."""
    probe = _constant_attention_probe(gm, site)
    if probe is None:
        return
    x = feed[0]
    tokens = x.flatten(1, 2) if a.token_map else x
    B, N, C = tokens.shape
    P = a.num_prefix
    compare = torch.ones(N, dtype=torch.bool)
    compare[P] = False                          # the changed token: the first patch token
    if has_grid_ops:
        if a.grid is None:
            return
        h, w = a.grid
        # (a 1-wide grid: not the direct neighbours; at least as far as the block's
        # convolutions and pools reach: FastViT's 7x7 depthwise convolution on a 4x4 map was
        # taken for mixing, audit A4 of the fortieth session)
        r = max(1, min(h, w) // 2, _map_reach(gm))
        rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
        far = torch.maximum(rows, cols) > r     # Chebyshev distance from the corner token
        if not bool(far.any()):
            return
        compare = torch.cat([torch.zeros(P, dtype=torch.bool), far])
    if not bool(compare.any()):                 # one patch token: nothing to compare
        return
    gen = torch.Generator().manual_seed(0)
    changed = tokens.clone()
    noise = torch.randn(changed[:, P].shape, generator=gen).to(changed)
    changed[:, P] = noise * (3 * float(tokens.float().std()) + 1e-3)
    module = a.module
    was = module.training
    module.eval()
    try:
        with torch.no_grad(), hooks_suspended(module):
            ref = probe(*feed)
            out = probe(changed.reshape(x.shape), *feed[1:])
    except RuntimeError as e:    # e.g. an op that cannot take the zeros: said in explain()
        a.notes.append(f"the check for token mixing outside attention could not run "
                       f"({type(e).__name__}: {e})")
        return
    finally:
        module.train(was)
    if not isinstance(ref, torch.Tensor) or ref.shape != x.shape:
        return
    ref, out = ref.reshape(B, N, -1).float(), out.reshape(B, N, -1).float()
    if not (torch.isfinite(ref).all() and torch.isfinite(out).all()):
        return
    tol = MIXING_TOLERANCE * (1 if x.dtype in (torch.float32, torch.float64) else 100)
    err = float((out - ref)[:, compare.to(out.device)].abs().max())
    if err > tol * max(1.0, float(ref.abs().max())):
        raise AnalysisError(
            a.name, "mixes tokens outside its attention (with the attention's output set to "
                    f"a constant, changing one patch token changed others by up to {err:.3g}): e.g. a "
                    "mean or sum over the tokens, which evoplug would take over the kept tokens "
                    "only" + quantised_hint(a.module) + _opaque_view_hint(a))
    if not has_grid_ops and not a.token_map:
        _check_count_free(probe, a, feed, ref.reshape(B, N, -1), tol * max(1.0, float(ref.abs().max())))


def _check_count_free(probe: fx.GraphModule, a: BlockAnalysis, feed, ref: torch.Tensor, tol: float):
    """With the attention's output set to a constant, a token's output is the same on a subset of the
    tokens: what the block computes outside its attention does not read the token count (a
    branch scaled by ``N0 / n`` was scaled for the kept tokens' count, silently: audit Q5 of
    the twenty-eighth session). A block that does not run on the subset this way (a table of
    the full count added) is left to the program's probes."""
    x = feed[0]
    B, N, C = x.shape
    P, S = a.num_prefix, a.num_suffix
    M = N - P - S
    if M < 2:
        return
    pos = _count_subset(B, N, P, S, x.device)
    extras = dict(zip(a.plan.tensor_args, feed[1:]))
    module, was = a.module, a.module.training
    module.eval()
    try:
        ex = gather_extras(a.name, extras, pos, N, P, S, a.whole_args, a.batch_args)
        with torch.no_grad(), hooks_suspended(module), \
                contextlib.redirect_stderr(io.StringIO()):    # (fx prints the errors it raises)
            out = probe(*a.plan.feed(x.gather(1, pos[..., None].expand(-1, -1, C)), ex))
    except Exception:   # noqa: BLE001 - it does not run on a subset this way
        return
    finally:
        module.train(was)
    if not isinstance(out, torch.Tensor) or out.shape[:2] != pos.shape:
        return
    want = ref.gather(1, pos[..., None].expand(-1, -1, ref.shape[-1]))
    err = float((out.reshape(want.shape).float() - want).abs().max())
    if err > tol:
        raise AnalysisError(a.name, _COUNT_MESSAGE.format(err=err))


def _count_subset(B: int, N: int, P: int, S: int, device) -> torch.Tensor:
    """The count probes' token subset (B, n): the special tokens and half the patches, drawn
    with a fixed seed."""
    M = N - P - S
    gen = torch.Generator().manual_seed(2)
    patches = (torch.randperm(M, generator=gen)[:max(1, M // 2)] + P).to(device)
    return torch.cat([torch.arange(P, device=device), torch.arange(N - S, N, device=device),
                      patches]).expand(B, -1)


def count_probe_graph(gm: fx.GraphModule, a: BlockAnalysis):
    """For a block the count probe above skips (2-D map operations need the full map, which a
    token subset does not make): a copy of its traced graph with the attention's output set to
    a constant, for :func:`check_count_free_program` to build a program of (the program feeds
    its map operations the full map). None for other blocks, or where the output is not found."""
    if not (a.grid_ops_expected or a.token_map):
        return None
    return _constant_attention_probe(gm, find_attention(gm, a.name), keep_attention=True)


def check_count_free_program(a: BlockAnalysis, build: Callable, gm: Optional[fx.GraphModule]):
    """The count probe of a block with 2-D map operations, on its program: with the attention's
    output set to a constant, the program on a token subset (its map operations fed the full
    map, where a patch not in the subset holds the subset's last token: the dense reference
    holds it there too) must give each token what it gives with every token. A branch scaled by the token
    count (``mlp(x, H, W) * (N0 / n)``) in a PVT-style block was scaled for the kept tokens'
    count, silently (thirtieth session). ``build(gm)``: the program of ``gm``."""
    if gm is None:
        return
    m, args, kwargs = _in_float32(a.module, a.call.args, a.call.kwargs)
    was = m.training
    m.eval()
    try:
        program = build(gm)
        x, extras = a.plan.bind(a.name, args, kwargs)
        if a.token_map:
            x = x.flatten(1, 2)
        B, N, C = x.shape
        P, S = a.num_prefix, a.num_suffix
        pos = _count_subset(B, N, P, S, x.device)
        # the dense reference sees what the subset's maps see: every patch not in the subset
        # holds the subset's last token (runtime/gather.py to_canvas), the same through the token-wise ops
        others = torch.ones(N, dtype=torch.bool, device=x.device)
        others[pos[0]] = False
        x = torch.where(others[:, None], x[:, pos[0, -1]][:, None], x)
        ex = gather_extras(a.name, extras, pos, N, P, S, a.whole_args, a.batch_args)
        with torch.no_grad(), hooks_suspended(m), contextlib.redirect_stderr(io.StringIO()):
            ref = program(m, *a.plan.feed(x, extras), None, None)[0]
            out = program(m, *a.plan.feed(x.gather(1, pos[..., None].expand(-1, -1, C)), ex), pos, x)[0]
    except Exception as e:  # noqa: BLE001 - said in explain(), as the mixing probe does
        a.notes.append(f"the check that the block's tokens do not read their count could not run "
                       f"({type(e).__name__}: {e})")
        return
    finally:
        m.train(was)
    ref = ref.reshape(B, N, -1).float()
    want = ref.gather(1, pos[..., None].expand(-1, -1, ref.shape[-1]))
    if out.numel() != want.numel() or not (torch.isfinite(want).all() and torch.isfinite(out).all()):
        return
    tol = MIXING_TOLERANCE * max(1.0, float(ref.abs().max()))
    err = float((out.reshape(want.shape).float() - want).abs().max())
    if err > tol:
        raise AnalysisError(a.name, _COUNT_MESSAGE.format(err=err))


_COUNT_MESSAGE = ("computes its tokens outside its attention from their count (with the "
                  "attention's output set to a constant, a token's output changed by up to "
                  "{err:.3g} on a subset of the tokens): e.g. a branch scaled by the token "
                  "count, which on the kept tokens would take their count")


def _constant_attention_probe(gm: fx.GraphModule, site: AttentionSite, keep_attention: bool = False):
    """A copy of the traced block whose attention output is a constant (None where the output
    is not found). ``keep_attention``: the attention stays in the graph (its output unread), so
    the rewrite finds it and builds a program of the copy."""
    out_node = attention_output(site)
    if out_node is None:
        return None
    graph = copy.deepcopy(gm.graph)
    target = next(n for n in graph.nodes if n.name == out_node.name)
    values = None if keep_attention else _values_of(target)
    with graph.inserting_after(target):
        const = graph.call_function(_constant_attention_output, (target if values is None else values,))
    const.meta = dict(target.meta)
    target.replace_all_uses_with(const, delete_user_cb=lambda u: u is not const)
    probe = fx.GraphModule(gm, graph)
    probe.meta.update(gm.meta)
    if values is not None:
        probe.graph.eliminate_dead_code()
        probe.recompile()
    return probe


def quantised_hint(block: nn.Module, reason: str = "") -> str:
    """Why a dynamically quantised block fails the mixing probe (or another: the count probe,
    the batch probe, whose refusals of such a block named no quantisation until audit F1 of the
    forty-second session), and what to do instead; '' where ``reason`` says it already."""
    quantised = [n for n, m in block.named_modules() if type(m).__module__.startswith(
        ("torch.ao.nn.quantized.dynamic", "torch.nn.quantized.dynamic"))]
    if not quantised or "is dynamically quantised" in reason:
        return ""
    return (f". `{quantised[0]}` is dynamically quantised: its activation scale is taken over "
            "every token of the batch, so one token changes the others' outputs. Convert the "
            "float model and quantise the converted one; for input sizes other than the "
            "conversion's, call it at each size first and quantise in place "
            "(quantize_dynamic(..., inplace=True): the twins made for those sizes are kept)")


@contextlib.contextmanager
def hooks_suspended(*modules: nn.Module):
    """The hooks of ``modules`` and their submodules set aside (and put back): the probes
    compare the block's own computation with its program, which never runs the hooks of what it
    traced into."""
    saved = []
    for m in {id(m): m for top in modules for m in top.modules()}.values():
        for name in CALL_HOOK_DICTS:
            d = getattr(m, name, None)
            if d is not None:
                saved.append((d, dict(d)))
                d.clear()
    try:
        yield
    finally:
        # exactly what was there: a hook the analysis' forwards made (transformers installs its
        # output-capturing hooks at a model's first call) does not stay
        for d, items in saved:
            d.clear()
            d.update(items)


_ON_SUBSET = "the traced program on a token subset"     # (the probe step _failed tells apart)


def probe_program(a: BlockAnalysis, program, atol: float = PROBE_TOLERANCE):
    """Behavioural check of a block and its program on the calibration input (eval mode), each
    run from the block's state before the first (:class:`SameStart`: a block that keeps a
    running average and reads it back was refused as differing from itself until the
    forty-eighth session):

    1. the traced program reproduces the block's own forward (dense);
    2. permutation equivariance: running it on the patch tokens in another order, with the
       position terms following them, gives the same tokens in that order. A block that mixes
       tokens outside attention (convolution over the grid, pooling) or has a position term
       evoplug does not follow fails here instead of giving wrong outputs later;
    3. it runs on a subset of the tokens plus a representative token.
    """
    m, args, kwargs = _in_float32(a.module, a.call.args, a.call.kwargs)
    was = m.training
    m.eval()
    step = "the block's own forward on the calibration input"
    try:
        with torch.no_grad(), hooks_suspended(m):
            start = SameStart(m)
            try:
                ref = token_output(start.reference(lambda: type(a.module).forward(m, *args, **kwargs)))
                if not bool(torch.isfinite(ref).all()):
                    raise AnalysisError(a.name, "the block's own output on the calibration input is "
                                                "not finite (NaN or inf): the traced program cannot "
                                                "be checked against it")
                _probe_steps(a, start, program, m, args, kwargs, ref, atol)
            finally:
                start.end()
    except AnalysisError:
        raise
    except _StepFailed as e:
        raise _failed(a.name, e.step, e.error) from None
    except Exception as e:
        raise _failed(a.name, step, e) from None
    finally:
        m.train(was)


def moving_every_token(M: int, gen: torch.Generator) -> torch.Tensor:
    """A random order of M tokens in which no token keeps its place (one cycle through all of
    them, in a random order): ``randperm`` with the probe's seed left 2 tokens in place (and 2
    of 4), so a block of a 2-token stage was checked for equivariance on its own order, and a
    program that mixed two token orders converted (the fifty-seventh session)."""
    order = torch.randperm(M, generator=gen)
    perm = torch.empty_like(order)
    perm[order] = order.roll(-1)
    return perm


class _StepFailed(Exception):
    """A probe step (``step``) that raised ``error``."""

    def __init__(self, step: str, error: Exception):
        super().__init__(step)
        self.step, self.error = step, error


def _probe_steps(a: BlockAnalysis, start: SameStart, program, m: nn.Module, args, kwargs,
                 ref: torch.Tensor, atol: float):
    """Steps 1-3 of :func:`probe_program` and the two images' check, against ``ref``, the
    block's own output: the dense run writes what it computes, the others what the block's own
    forward wrote (:meth:`SameStart.run`)."""
    step = "the traced program on all the tokens"
    try:
        if a.plan.token_perm:     # a sequence-first block: compared as (B, N, C)
            ref = ref.permute(a.plan.token_perm)
        x, extras = a.plan.bind(a.name, args, kwargs)
        if a.token_map:   # (B, H, W, C) maps: compare as tokens
            ref, x = ref.flatten(1, 2), x.flatten(1, 2)
        out, row = start.from_start(program, m, *a.plan.feed(x, extras), None, None)[:2]
        scale = max(1.0, float(ref.abs().max()))
        err = float((out - ref).abs().max())
        if err > atol * scale:
            raise AnalysisError(a.name, f"traced program differs from the block (max abs diff {err:.3g})")
        B, N, C = x.shape
        P, S = a.num_prefix, a.num_suffix
        M = N - P - S
        want = (B, 1, M if a.row_full else N)    # over the patches of the full map, or the keys
        if row is not None and row.shape != want:
            raise AnalysisError(a.name, f"global attention row has shape {tuple(row.shape)}, expected {want}")
        step = "the traced program on the tokens in another order"
        program = start.replayed(program)
        gen = torch.Generator().manual_seed(0)
        perm = moving_every_token(M, gen).to(x.device)
        special = torch.cat([torch.arange(P), torch.arange(N - S, N)]).to(x.device)
        pos = torch.cat([special, perm + P]).expand(B, N)    # the runtime's order
        xp = x.gather(1, pos[..., None].expand(-1, -1, C))
        ex = gather_extras(a.name, extras, pos, N, P, S, a.whole_args, a.batch_args)
        outp = program(m, *a.plan.feed(xp, ex), pos, x)[0]
        err = float((outp - ref.gather(1, pos[..., None].expand(-1, -1, C))).abs().max())
        if err > atol * scale:
            raise AnalysisError(
                a.name, "not equivariant to the token order (max abs diff "
                        f"{err:.3g} after permuting the patch tokens): it mixes tokens outside "
                        "attention or has a position-dependent term evoplug cannot follow"
                        + _one_image_hint(a, extras, B) + _opaque_view_hint(a))
        step = _ON_SUBSET
        k = max(1, M // 2)
        sub_pos = pos[:, :P + S + k + 1] if k + 1 <= M else pos
        xs = x.gather(1, sub_pos[..., None].expand(-1, -1, C))
        ex = gather_extras(a.name, extras, sub_pos, N, P, S, a.whole_args, a.batch_args)
        outs = program(m, *a.plan.feed(xs, ex), sub_pos, x)[0]
        if outs.shape != xs.shape or not torch.isfinite(outs).all():
            raise AnalysisError(a.name, f"does not run on a token subset (got {tuple(outs.shape)})")
        step = "the traced program on two images"
        _check_images_apart(a, program, m, x, extras, pos, k, atol * scale)
    except AnalysisError:
        raise
    except Exception as e:
        raise _StepFailed(step, e) from None


def _check_images_apart(a: BlockAnalysis, program, m: nn.Module, x: torch.Tensor, extras, pos,
                        k: int, tol: float):
    """Each image's kept tokens and global row come from that image alone: on the calibration
    images (two made from one), each in its own token order, a new last image must leave the
    others' results as they were. What evoplug reads or gathers per image on a tensor whose
    batch dim is another's (heads merged into the batch dim with the heads outer, by a reshape
    or a ``torch.cat`` of the split heads, in any calibration batch) ranked and gathered each
    image by another's values, silently (audit Q5 of the twenty-eighth session)."""
    B, N, C = x.shape
    if B == 1:
        if a.batch_size is not None and a.heads_in_batch:
            raise AnalysisError(
                a.name, "its trace specialised on the batch size and its attention merges the "
                        "heads into the batch dim: one calibration image cannot show whether "
                        "each image keeps its own heads (the programs for other batch sizes are "
                        "built at run time); convert on two or more example images")
        if a.batch_size is not None:    # (a trace specialised on one image: runs at one only)
            return
        x = x.expand(2, -1, -1)
        extras = {n: t.expand(2, *t.shape[1:]) if n in a.batch_args and t.shape[0] == 1 else t
                  for n, t in extras.items()}
    P, S = a.num_prefix, a.num_suffix
    gen = torch.Generator().manual_seed(1)
    new = x.clone()
    new[-1] = x[-1] + torch.randn(x[-1].shape, generator=gen).to(x) * (float(x.float().std()) + 1e-3)
    results = []
    for images, turn in ((x, 0), (new, 1)):
        orders = [pos[0, P + S:].roll(i + (i + 1 == len(x)) * turn * len(x), 0)    # (the new one's
                  for i in range(len(x))]                                           # its own too)
        p = torch.stack([torch.cat([pos[0, :P + S], o]) for o in orders])[:, :P + S + k + 1]
        xs = images.gather(1, p[..., None].expand(-1, -1, C))
        ex = gather_extras(a.name, extras, p, N, P, S, a.whole_args, a.batch_args)
        try:
            out = program(m, *a.plan.feed(xs, ex), p, images)
        except RuntimeError as e:
            if B > 1:
                raise
            _two_images_fail(a, program, m, images, extras, e)
            return     # (a block that runs one sequence whatever the images: Pixtral's packing)
        results.append((out[0][:-1], out[1][:-1] if out[1] is not None else None))
    for what, before, after in zip(("kept tokens", "global attention row"), *results):
        err = 0.0 if before is None else float((before - after).abs().max())
        if err > tol:
            raise AnalysisError(
                a.name, f"one image's {what} changed by {err:.3g} when another image of the batch "
                        "changed: evoplug reads its attention with the batch first, each image's "
                        "values its own (e.g. heads merged into the batch dim with the heads "
                        "outer, by `torch.cat` of the split heads, or a (heads, B, N, d) layout: "
                        "keep the batch first, (B, heads, ...) or B * heads)")


def _two_images_fail(a: BlockAnalysis, program, m: nn.Module, x: torch.Tensor, extras, e: Exception):
    """Made from one calibration image, two images run on a token subset failed (``e``): a
    block that runs them with every token (so the model runs a batch) is refused, naming its
    arguments shared by all images, which the subset gathers for each image (a shared key mask
    viewed ``(1, 1, 1, n)`` in the block converted and raised a raw error at a batch of 3;
    audit of the twenty-ninth session); one that cannot take two images at all is left alone
    (Pixtral's packing runs one sequence whatever the images)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            program(m, *a.plan.feed(x, extras), None, None)
    except Exception:   # noqa: BLE001 - not a batch of images: nothing to check here
        return
    shared = [f"`{n}` {tuple(t.shape)}" for n, t in extras.items()
              if isinstance(t, torch.Tensor) and n not in a.batch_args]
    raise AnalysisError(a.name, "runs on two images with every token, not on a subset of each "
                                f"({type(e).__name__}: {e})" + (
                                    f": its argument {', '.join(shared)}, the same for every "
                                    "image, is gathered for each image's kept tokens, and the "
                                    "block shapes it for one" if shared else ""))


def _one_image_hint(a, extras, images: int) -> str:
    """Calibrated on one image, a tensor argument of batch 1 that the noise on the inputs did
    not reach (an attention mask made from integer ids or thresholded) reads as one table for all
    images: named, with the way to tell (audit K5 of the twenty-eighth session)."""
    if images != 1:
        return ""
    shared = [f"`{n}` {tuple(t.shape)}" for n, t in extras.items() if isinstance(t, torch.Tensor)
              and t.dim() >= 2 and t.shape[0] == 1 and n not in a.batch_args]
    return "" if not shared else (
        f"; or its argument {', '.join(shared)} holds one value per image, which one calibration "
        "image cannot show: convert on two or more example images")


def _opaque_view_hint(a) -> str:
    """The einops calls between the block's tokens and its 2-D map (grid.opaque_map_views),
    which evoplug does not read as map views, with the way out."""
    if not a.opaque_map_views:
        return ""
    return (f"; {', '.join(a.opaque_map_views)} (einops) turns its tokens into the 2-D map or "
            "back as one opaque node, not recognised as a map view: written with `reshape` "
            "or `view` and `permute` it converts")


def _in_float32(m: nn.Module, args, kwargs):
    """A half-precision block is probed as a float32 copy, so the tolerance means the same
    thing: (module, args, kwargs)."""
    p = next((q for q in m.parameters() if q.is_floating_point()), None)
    if p is None or p.dtype in (torch.float32, torch.float64):
        return m, args, kwargs
    cast = lambda v: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    return copy_model(m).float(), tuple(cast(v) for v in args), {k: cast(v) for k, v in kwargs.items()}


def _failed(name: str, step: str, e: Exception) -> AnalysisError:
    """The error of a probe step that raised (not only the subset's run: the block's own
    forward or the program on all the tokens may fail first, audit H3)."""
    if step == _ON_SUBSET:
        return AnalysisError(name, f"does not run on a token subset: {type(e).__name__}: {e} (a "
                                   "tensor the block builds from the token count, such as "
                                   "positions from torch.arange(N) or a view of a fixed size, "
                                   "cannot follow the kept tokens)")
    return AnalysisError(name, f"{step} failed: {type(e).__name__}: {e}")
