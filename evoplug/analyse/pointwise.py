"""Whether an op on a 4-D map treats every map position alike, so the rewrites into token form
(canon.py for channels-last maps, channels_first.py for channels-first ones) may run it on the
kept tokens alone (and rewrite/maps.py may re-run an op between a map block's input and its
global attention on the subset's own tokens: node_treats_tokens_alike, an op of any rank).
Checked by running the op, which is what its code computes, whatever kind of module it is:

- laid out as tokens, it gives its output laid out so, in eval and in train mode (the same
  random numbers: ``Dropout2d`` on a channels-last map drops whole rows of it, DropBlock
  squares);
- run on a subset of the positions, in another order, it gives the same subset of its output
  (in eval mode: a global context ``x + gamma * fc(x.mean(positions))`` gives the same mean in
  any layout, but not over a subset; in train mode ``BatchNorm`` takes its statistics over the
  positions it is given, which evoplug's blocks do by design: over the tokens that run);
- both with its parameters perturbed: a term that is zero or an identity at the conversion
  (GCNet's zero-initialised ``gamma``, a zero-initialised convolution) mixes positions once
  trained (audits K and L, thirty-third and thirty-fourth sessions: each converted, and was
  silently off by 0.2-0.5 once the weights changed).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..copies import copy_model
from .graph import getattr_path, is_size_query, no_side_effects, shape_of, value_ancestors, value_inputs

#: how far the op on tokens may be from the op on the map, relative to the values (rounding of
#: another summation order; an op that mixes positions is off by the values' own size)
RTOL = 1e-4


_POSITION_MIXERS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                    nn.LPPool2d, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.Fold, nn.Unfold)
_POSITION_MIXING_FUNCTIONS = {F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d,
                              F.adaptive_max_pool2d, F.interpolate, F.pad, F.unfold, F.fold,
                              F.pixel_shuffle, F.pixel_unshuffle, torch.roll}
_CONVS = {F.conv1d, F.conv2d, F.conv3d}


def mixes_positions(gm: fx.GraphModule, n: fx.Node, values) -> bool:
    """A convolution wider than 1x1 (or strided), a pooling or a resampling in ``n`` (a module
    and its submodules, or a function): it mixes map positions whatever its weights are."""
    if n.op == "call_module":
        for m in gm.get_submodule(n.target).modules():
            if isinstance(m, _POSITION_MIXERS) or isinstance(m, nn.modules.conv._ConvNd) and (
                    any(k != 1 for k in m.kernel_size) or any(st != 1 for st in m.stride)):
                return True
        return False
    if n.op == "call_function" and n.target in _POSITION_MIXING_FUNCTIONS:
        return True
    if n.op == "call_function" and n.target in _CONVS:
        w = values.get(n.args[1]) if len(n.args) > 1 else values.get(n.kwargs.get("weight"))
        stride = n.args[3] if len(n.args) > 3 else n.kwargs.get("stride", 1)
        return not (isinstance(w, torch.Tensor) and all(k == 1 for k in w.shape[2:])) or \
            any(st != 1 for st in (stride if isinstance(stride, (tuple, list)) else (stride,)))
    return n.op == "call_method" and n.target in ("roll", "unfold")


def perturber(seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t -> t + noise`` of the size of ``t``'s values (and at least 0.1: a zero stays no zero),
    the noise not negative (a running variance stays one)."""
    g = torch.Generator().manual_seed(seed)

    def perturbed(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        return t + torch.randn(t.shape, generator=g, dtype=t.dtype).abs() * (t.abs().mean() + 0.1)
    return perturbed


def perturbed_copy(module: nn.Module, perturbed: Callable) -> nn.Module:
    """A copy of ``module`` whose floating-point parameters and buffers are perturbed (a
    zero-initialised ``gamma`` held as a buffer hid a context over every position: audit O)."""
    mod = copy_model(module)
    with torch.no_grad():
        for p in (*mod.parameters(), *mod.buffers()):
            if p.is_floating_point():
                p.copy_(perturbed(p))
    return mod


def seeded(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the random numbers of seed 0, the caller's left as they were.
    The CPU generator, and CUDA's only once CUDA runs: ``torch.manual_seed`` queues a seed for
    every lazy device back end it has not started, with a formatted stack each (a third of a
    conversion's time on a small model)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(0)
        for i in cuda:
            torch.cuda.default_generators[i].manual_seed(0)
        return fn(*args, **kwargs)


def treats_positions_alike(run: Callable[[torch.Tensor, bool], object], x: torch.Tensor,
                           to_tokens: Callable[[torch.Tensor], torch.Tensor], dim: int,
                           rtol: float = RTOL) -> bool:
    """``run(input, training)``: the op (its parameters perturbed, its random numbers seeded) on
    ``input``; ``x``: the map it takes; ``to_tokens``: a map laid out as the op will run on the
    tokens, whose positions are along ``dim``. See the module's docstring."""
    try:
        tokens = to_tokens(x)
        for training in (False, True):
            if not _close(run(tokens, training), _tokens_of(run(x, training), to_tokens, x.dim()), rtol):
                return False
        n = tokens.shape[dim]
        some = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max(2, n // 2)]
        want = _tokens_of(run(x, False), to_tokens, x.dim())
        return want is not None and _close(run(tokens.index_select(dim, some), False),
                                           want.index_select(dim, some), rtol)
    except Exception:  # noqa: BLE001 - an op that needs the map is not one that treats positions alike
        return False


def _tokens_of(out, to_tokens, rank: int) -> Optional[torch.Tensor]:
    return to_tokens(out) if isinstance(out, torch.Tensor) and out.dim() == rank else None


def node_treats_tokens_alike(gm: fx.GraphModule, n: fx.Node, x_node: fx.Node, shape) -> bool:
    """``n`` (a module, function or method of ``gm``'s graph) gives each token of its input
    ``x_node`` (``shape``: the batch, positions, channels last) its output from that token
    alone (treats_positions_alike, on random values): a norm, a scaling by a parameter, a
    cast, a registered leaf function that acts token by token. Its other arguments must be
    constants (parameters, buffers, numbers: perturbed) or sizes, dtypes and devices (read on
    stand-ins of the tensors they are read from: ``x.dtype``, the ``x`` of ``t.type_as(x)``);
    anything else it reads is not known: False."""
    meta = x_node.meta.get("tensor_meta")
    dtype = getattr(meta, "dtype", torch.float32)
    held = next(iter([*gm.parameters(), *gm.buffers()]), None)
    x = torch.randn((max(1, shape[0]), *shape[1:]), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float32).to(dtype=dtype, device=None if held is None else held.device)
    perturbed = perturber()
    try:
        values = value_inputs(n)
        args, kwargs = fx.map_arg((n.args, n.kwargs), lambda v: v if v is x_node else
                                  _stand_in(v) if v not in values and _is_tensor(v) else
                                  _constant(gm, v, perturbed))
        mod = perturbed_copy(gm.get_submodule(n.target), perturbed) if n.op == "call_module" else None
    except Exception:  # noqa: BLE001 - what it reads besides its input is not a constant
        return False

    def run(inp, training):
        a, k = fx.map_arg((args, kwargs), lambda v: inp if v is x_node else v)
        if mod is not None:
            mod.train(training)
            with no_side_effects(gm):
                return seeded(mod, *a, **k)
        return seeded(getattr(a[0], n.target), *a[1:], **k) if n.op == "call_method" else \
            seeded(n.target, *a, **k)
    rtol = RTOL if dtype in (torch.float32, torch.float64) else 100 * RTOL
    return treats_positions_alike(run, x, lambda t: t.flatten(1, -2), 1, rtol)


def token_wise_input(gm: fx.GraphModule, n: fx.Node, source: fx.Node) -> Optional[fx.Node]:
    """The one input of ``n`` whose values come from ``source`` (``source`` itself, or a node made
    from it), where ``n`` acts on each of its tokens alone (:func:`node_treats_tokens_alike`; its
    shape known: batch, positions, channels); None otherwise. What grid.py carries a token index
    through, and what rewrite/maps.py re-runs on the full input of PVTv2's reduced keys and
    of windows. A read of ``source``'s dtype, shape or device (``t.to(x.dtype)``,
    ``t.type_as(x)``, ``t * x.shape[-1] ** 0``) is no second input (until audit G1 of the
    forty-third session it was, and such a block's windows ran on the kept tokens and the
    representative token in place of the others)."""
    on_path = [i for i in value_inputs(n) if i is source or source in value_ancestors(i)]
    shape = shape_of(on_path[0]) if len(on_path) == 1 else None
    if shape is None or len(shape) < 3 or not node_treats_tokens_alike(gm, n, on_path[0], shape):
        return None
    return on_path[0]

def _constant(gm: fx.GraphModule, v: fx.Node, perturbed: Callable):
    """The value of ``v``, made of parameters, buffers and numbers (perturbed) and of sizes of
    tensors (read on zeros of their shapes); raises where ``v`` reads any tensor's values."""
    if v.op == "get_attr":
        t = getattr_path(gm, v.target)
        return perturbed(t) if isinstance(t, torch.Tensor) else t
    if v.op not in ("call_function", "call_method"):
        raise ValueError(f"`{v.name}` is no constant")
    if is_size_query(v) and v.args[0].op != "get_attr":
        args, kwargs = (_stand_in(v.args[0]), *v.args[1:]), v.kwargs
    else:
        args, kwargs = fx.map_arg((v.args, v.kwargs), lambda u: _constant(gm, u, perturbed))
    if v.op == "call_method":
        return getattr(args[0], v.target)(*args[1:], **kwargs)
    return v.target(*args, **kwargs)


def _stand_in(v: fx.Node) -> torch.Tensor:
    """Zeros of ``v``'s shape and dtype, whose sizes, dtype and device are read (not its values)."""
    meta = v.meta["tensor_meta"]
    return torch.zeros(meta.shape, dtype=meta.dtype)


def _is_tensor(v: fx.Node) -> bool:
    return hasattr(v.meta.get("tensor_meta"), "shape")


def _close(got, want, rtol: float) -> bool:
    if not (isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)) or got.shape != want.shape:
        return False
    scale = float(want.abs().max()) if want.numel() else 0.0
    return bool(torch.allclose(got, want, rtol=rtol, atol=rtol * max(scale, 1.0)))
