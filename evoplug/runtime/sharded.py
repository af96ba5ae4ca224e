"""FSDP as the runtime meets it: ``fully_shard`` (FSDP2, and ``replicate``, built on it), which
puts ``FSDPModule`` in front of a module's class, and ``FullyShardedDataParallel`` (FSDP1), a
wrapper module. Both gather a unit's parameters around that unit's own forward only.

Sharding whole converted blocks (and then the model) works: the block's call is the unit, its
programs run on the gathered parameters, and a size twin built before the sharding shares the
modules whose parameter dicts FSDP fills (tests/test_fsdp.py); so does a unit on a module the
programs call whole (an MLP). What cannot work is said by name: a unit on a module the programs
trace into (the attention), whose hooks cannot fire inside them, and a twin converted while
blocks are units, whose conversion would run on parameters that are not gathered.
Nothing here imports ``torch.distributed`` unless a process group exists (FSDP needs one)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


def _fsdp_types() -> Tuple[type, ...]:
    """(FSDPModule, FullyShardedDataParallel), or () where no process group exists."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ()
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    return FSDPModule, FullyShardedDataParallel


def made_by_fsdp(now: type, was: type) -> bool:
    """Whether class ``now`` is the one ``fully_shard`` (or ``replicate``) made of class
    ``was``: ``FSDP{was}`` with bases ``(FSDPModule, was)``; the module computes as before."""
    bases = now.__bases__
    if len(bases) != 2 or bases[1] is not was:
        return False
    types = _fsdp_types()
    return bool(types) and issubclass(bases[0], types[0])


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP unit of its own (FSDP2's ``fully_shard``, FSDP1's wrapper)."""
    types = _fsdp_types()
    return bool(types) and isinstance(module, types)


def sharded_inside(model: nn.Module) -> Optional[str]:
    """The path of the first FSDP unit strictly inside ``model``: its parameters are gathered
    only around its own forward (the model itself as the unit gathers everything first)."""
    types = _fsdp_types()
    if not types:
        return None
    return next((path for path, m in model.named_modules() if path and isinstance(m, types)), None)


def fsdp_name(module: nn.Module) -> str:
    """How the refusals name the way ``module`` is sharded."""
    types = _fsdp_types()
    if types and isinstance(module, types[1]):
        return "FSDP's FullyShardedDataParallel"
    return "FSDP's fully_shard"


def only_fsdp_hooks(module: nn.Module) -> bool:
    """Whether every forward hook and pre-hook on ``module`` is ``fully_shard``'s own (the
    gather and release of its parameters, bound to its ``FSDPState``): they read no tokens, so
    a module the programs call whole runs them on the kept tokens as on every token."""
    if not is_sharded(module):
        return False
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:         # (a private path: without it, every hook counts)
        return False
    hooks = (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
    return all(isinstance(getattr(h, "__self__", None), FSDPState) for h in hooks)
