"""How a converted block is called: which argument is the token tensor, which other tensor
arguments follow the tokens, which constants the trace baked in (checked at every call)."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, List, Tuple

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

    def bind(self, module_name: str, args, kwargs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if self.single and len(args) == 1 and not kwargs:
            return args[0], {}       # block(x): nothing else to bind or check
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise AnalysisError(module_name, f"unexpected call arguments: {e}") from None
        bound.apply_defaults()
        values = bound.arguments
        for name, const in self.constants.items():
            v = values.get(name)
            if not same_constant(v, const):
                raise AnalysisError(
                    module_name,
                    f"argument {name!r} was {const!r} when the block was analysed but is {v!r} "
                    "now; re-run evoplug.convert with an example input that calls it this way")
        extras = {}
        for n in self.tensor_args:
            v = values[n]
            if not isinstance(v, torch.Tensor):
                raise AnalysisError(module_name, f"argument {n!r} was a tensor at analysis, got {type(v).__name__}")
            extras[n] = v
        return values[self.token_arg], extras

    def feed(self, x: torch.Tensor, extras: Dict[str, torch.Tensor]) -> List[Any]:
        """Positional arguments of the traced program: the tokens, then the other tensor
        arguments in signature order (constants are baked into the trace)."""
        return [x] + [extras[n] for n in self.tensor_args]


def same_constant(a, b) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):   # no single truth value (arrays, tensors)
        return a is b
