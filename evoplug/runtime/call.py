"""How a converted block is called: which argument is the token tensor, which other tensor
arguments follow the tokens, which constants the trace baked in (checked at every call)."""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import AnalysisError


@dataclasses.dataclass
class CallPlan:
    """How a block is called: the token argument, other tensor arguments, constant arguments."""
    token_arg: str
    tensor_args: List[str]
    constants: Dict[str, Any]
    signature: inspect.Signature
    single: bool = False     # forward(x, <params whose defaults the analysis saw>): fast bind
    var_keyword: Optional[str] = None   # forward(..., **kwargs): its keywords bound by name
    var_positional: Optional[str] = None   # forward(..., *args): must stay empty
    names: Tuple[str, ...] = ()   # every argument by name, in order, **kwargs' keywords last
    ignored: Tuple[str, ...] = ()   # keywords of **kwargs the block never reads on the path
    #                               its program runs (a family hint: transformers' output_*
    #                               flags, collected by hooks): dropped when binding
    export_masks: Tuple[str, ...] = ()   # masks a family builds only while exporting (see
    #                               integrations/registry.py FamilyHints.export_masks)
    token_perm: Tuple[int, ...] = ()   # the block takes its tokens in another layout than
    #                               (B, N, C) or a channels-last map: sequence-first (N, B, C),
    #                               PyTorch's nn.TransformerEncoderLayer by default, (1, 0, 2);
    #                               a channels-first map the block permutes itself (VitDet),
    #                               (0, 2, 3, 1); binding gives ``x.permute(token_perm)``, and the
    #                               block's output goes back with :meth:`to_call`; also a map
    #                               the block keeps channels first (CoAtNet, LeViT-conv), whose
    #                               graph is rewritten into token form when it is traced
    keeps_channels_first: bool = False
    perm_args: Tuple[str, ...] = ()   # other tensor arguments laid out like the tokens, tokens
    #                               first (DETR's positions (N, B, C), a gate (N, B), beside
    #                               sequence-first tokens): their first two dims swapped too
    packed: Dict[str, Tuple[type, int]] = dataclasses.field(default_factory=dict)
    #                               an argument that is a tuple of tensors (rotary (cos, sin)):
    #                               its container type and length; its items are arguments
    #                               ``name__0``, ``name__1``, ... (see :func:`packed_name`)

    def bind(self, module_name: str, args, kwargs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if self.single and len(args) == 1 and not kwargs:
            x = args[0]              # block(x): nothing else to bind or check
            return (x.permute(self.token_perm) if self.token_perm else x), {}
        values = self.arguments(module_name, args, kwargs)
        if set(values) != set(self.names):
            extra = sorted(set(values) - set(self.names)) or sorted(set(self.names) - set(values))
            raise AnalysisError(module_name, f"called with other keyword arguments than when it was "
                                             f"analysed ({extra}); re-run evoplug.convert with an "
                                             "example input that calls it this way")
        for name, const in self.constants.items():
            v = values.get(name)
            if not same_constant(v, const):
                if const is None and name in self.export_masks and _keeps_every_key(v):
                    continue
                raise AnalysisError(
                    module_name,
                    f"argument {name!r} was {_short(const)} when the block was analysed but is "
                    f"{_short(v)} now; re-run evoplug.convert with an example input that calls it "
                    "this way", sized=isinstance(const, (int, float, tuple, list)) and
                    not isinstance(const, bool))
        extras = {}
        for n in self.tensor_args:
            v = values[n]
            if not isinstance(v, torch.Tensor):
                raise AnalysisError(module_name, f"argument {n!r} was a tensor at analysis, got {type(v).__name__}")
            extras[n] = v.transpose(0, 1) if n in self.perm_args else v
        x = values[self.token_arg]
        if self.token_perm and isinstance(x, torch.Tensor):
            x = x.permute(self.token_perm)
        return x, extras

    def tokens(self, args, kwargs) -> Optional[torch.Tensor]:
        """The token argument of a call, as given (None: not a tensor, or not found)."""
        if self.single and args and not kwargs:
            x = args[0]
        elif self.token_arg in kwargs:
            x = kwargs[self.token_arg]
        else:
            i = self.signature_index
            x = args[i] if i < len(args) else None
        return x if isinstance(x, torch.Tensor) else None

    @functools.cached_property
    def signature_index(self) -> int:
        """The token argument's place among the positional parameters (huge: keyword-only)."""
        names = [p.name for p in self.signature.parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return names.index(self.token_arg) if self.token_arg in names else 1 << 30

    def to_call(self, out: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C) in the layout the block takes and returns (see ``token_perm``)."""
        return out.permute(inverse(self.token_perm)) if self.token_perm else out

    def arguments(self, module_name: str, args, kwargs) -> Dict[str, Any]:
        """The call's arguments by name, defaults applied, the keywords of ``**kwargs``
        flattened in (a program has one parameter per argument)."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise AnalysisError(module_name, f"unexpected call arguments: {e}") from None
        bound.apply_defaults()
        values = dict(bound.arguments)
        if self.var_positional is not None:
            if values.pop(self.var_positional, ()):
                raise AnalysisError(module_name, f"forward received extra positional arguments "
                                                 f"(*{self.var_positional}): evoplug traces a fixed "
                                                 "signature")
        if self.var_keyword is not None:
            extra = values.pop(self.var_keyword, {})
            values.update((k, v) for k, v in extra.items() if k not in self.ignored)
        for name, (kind, n) in self.packed.items():
            v = values.get(name)
            if not isinstance(v, (tuple, list)) or len(v) != n:
                raise AnalysisError(module_name, f"argument {name!r} was a {kind.__name__} of {n} "
                                                 f"tensors when the block was analysed, got {v!r:.80}")
            del values[name]
            values.update((packed_name(name, i), t) for i, t in enumerate(v))
        return values

    def feed(self, x: torch.Tensor, extras: Dict[str, torch.Tensor]) -> List[Any]:
        """Positional arguments of the traced program: the tokens, then the other tensor
        arguments in signature order (constants are baked into the trace)."""
        return [x] + [extras[n] for n in self.tensor_args]


def inverse(perm: Tuple[int, ...]) -> Tuple[int, ...]:
    """The permutation that undoes ``perm``."""
    return tuple(sorted(range(len(perm)), key=lambda i: perm[i]))


def packed_name(name: str, i: int) -> str:
    """The argument name of item ``i`` of a tuple argument ``name``."""
    return f"{name}__{i}"


def tensor_tuple(v) -> bool:
    """A tuple or list of tensors (rotary ``(cos, sin)``): an argument the block reads item by
    item, each following the tokens like a tensor argument."""
    return isinstance(v, (tuple, list)) and bool(v) and all(isinstance(t, torch.Tensor) for t in v)


def same_constant(a, b) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):   # no single truth value (arrays, tensors)
        return a is b


def _short(v) -> str:
    """A value for a message: a tensor by its shape and dtype, anything else by a short repr."""
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)} ({v.dtype})"
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _keeps_every_key(mask) -> bool:
    """While exporting, a mask that the analysis saw as None (see ``CallPlan.export_masks``): the
    exported program asserts at run time that it keeps every key (a bool mask all True, an
    additive one all 0), and the block runs the program analysed without it."""
    if not (isinstance(mask, torch.Tensor) and torch.compiler.is_exporting()):
        return False
    keeps = mask.all() if mask.dtype == torch.bool else (mask == 0).all()
    torch._assert_async(keeps, "evoplug: an attention mask built while exporting masks a key; "
                               "the converted blocks were analysed without a mask")
    return True
