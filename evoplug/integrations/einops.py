"""einops, as hints (see registry.py): its functions (``rearrange``, ``repeat``, ``reduce``,
``einsum``, ``pack``, ``unpack``) and layers (``Rearrange``, ``Reduce``, ``EinMix``) do their
shape arithmetic in Python on concrete sizes, which torch.fx's proxies cannot give them ("Tensor
type unknown to einops"). The tracer keeps them whole: one node each, run by einops itself on
the tensors it gets, so a block written with them runs on a token subset as on all the tokens.
einops is imported only when installed."""
from __future__ import annotations

from typing import Callable, Tuple

from .registry import FamilyHints

_FUNCTIONS = ("rearrange", "repeat", "reduce", "einsum", "pack", "unpack", "parse_shape")
_LAYERS = ("Rearrange", "Reduce", "EinMix")


def _functions() -> Tuple[Callable, ...]:
    try:
        import einops
    except ImportError:
        return ()
    return tuple(getattr(einops, n) for n in _FUNCTIONS if hasattr(einops, n))


def _layers() -> Tuple[type, ...]:
    try:
        import einops.layers.torch as layers
    except ImportError:
        return ()
    return tuple(getattr(layers, n) for n in _LAYERS if hasattr(layers, n))


EINOPS = FamilyHints(
    name="einops",
    matches=lambda model: False,    # (no model of its own: its leaves count for every model)
    leaf_modules=_layers,
    leaf_functions=_functions,
)
