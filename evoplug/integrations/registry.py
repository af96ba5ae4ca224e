"""Extension points: what evoplug may be told about modules, functions and model families.

The analysis recognises blocks, attention and the residual stream by what they compute. What it
cannot see from a forward are a family's conventions; those come from hints registered here
(in the spirit of timm's ``register_notrace_module``), never from branches in the analysis:

* :func:`register_leaf_module`: instances of a module class are never traced into, and a
  softmax inside them is not counted as attention (a router or gate, not self-attention);
* :func:`register_leaf_function`: calls of a function become one node of the traced graph
  (a helper with data-dependent Python control flow, which a trace cannot specialise);
* :func:`register_family`: a :class:`FamilyHints` answering, for the models it matches, how
  many prefix tokens they declare, whether they have a class token and what input they take.

evoplug registers its own families at import (timm, MMPretrain, then the generic attribute
conventions); hints registered later are asked first.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

#: what ``FamilyHints.input_size`` returns: (channels or None, height, width, where it came from)
InputSize = Tuple[Optional[int], int, int, str]


@dataclasses.dataclass(frozen=True)
class FamilyHints:
    """What evoplug may ask about models of one family. Every hint takes the model and returns
    ``None`` when it has no answer (the next family is asked, then evoplug's own analysis).

    name: shown in messages.
    matches: whether a model belongs to the family.
    num_prefix_tokens: the leading non-patch tokens (class, distillation, register tokens) the
        model declares; asked when no patch grid is seen before a block.
    has_class_token: whether the first prefix token is a class token (False: registers only,
        the mean query ranks the tokens).
    input_size: the input the model takes, as ``(channels or None, height, width, source)``.
    input_frames: the frames of the video a video model takes, as (B, frames, channels, height,
        width) (transformers' VideoMAE, ViViT, TimeSformer): the input evoplug makes is a video.
    leaf_modules / leaf_functions: module classes and functions the tracer keeps whole, for
        every model (timm's notrace registry is one such source).
    ignored_keywords: keywords a block's ``**kwargs`` may receive that its computation never
        reads (transformers' ``output_hidden_states``/``output_attentions``: hooks collect
        those): the call plan drops them, so a call with or without them runs the same program.
    export_masks: arguments the family materialises only while exporting, as a mask that keeps
        every key (transformers builds its attention mask under ``torch.export`` where eager calls
        pass None): a block analysed with None takes such a mask in an export, with a run-time
        assert in the exported program that it keeps every key.
    idle_hook: whether a forward hook does nothing at this moment (True) or does something
        (False), for hooks the family installs (None for others): a converted block runs its
        own forward while a submodule it traced into has a hook that is not idle.
    collects_maps: whether a call now running collects the attention maps the family's layers
        return (transformers' ``output_attentions=True``, whose hook may sit on a module above
        the layer: Swin's stage); a block whose returned map is over the tokens it runs (not
        windows on the full map) then runs its own forward, so the map is over every token.
    traced_settings: for a module a block's programs trace into, what its forward reads beyond
        its own plain attributes and the trace bakes in ({name: value}: transformers' attention
        implementation, read from the shared config and a global registry); a change after the
        conversion is refused by name like a changed attribute. Its second argument is True
        when the conversion asks (then the family may warn about what it sees).
    """
    name: str
    matches: Callable[[nn.Module], bool] = lambda model: True
    num_prefix_tokens: Optional[Callable[[nn.Module], Optional[int]]] = None
    has_class_token: Optional[Callable[[nn.Module], Optional[bool]]] = None
    input_size: Optional[Callable[[nn.Module], Optional[InputSize]]] = None
    input_frames: Optional[Callable[[nn.Module], Optional[int]]] = None
    leaf_modules: Callable[[], Tuple[type, ...]] = lambda: ()
    leaf_functions: Callable[[], Tuple[Callable, ...]] = lambda: ()
    ignored_keywords: Optional[Callable[[nn.Module], Optional[Tuple[str, ...]]]] = None
    export_masks: Optional[Callable[[nn.Module], Optional[Tuple[str, ...]]]] = None
    idle_hook: Optional[Callable[[Callable], Optional[bool]]] = None
    collects_maps: Optional[Callable[[], bool]] = None
    traced_settings: Optional[Callable[[nn.Module, bool], Optional[Dict[str, Any]]]] = None


def int_attribute(name: str) -> Callable[[nn.Module], Optional[int]]:
    """A hint reading an integer attribute of the model (None when absent or not an int)."""
    def read(model: nn.Module) -> Optional[int]:
        v = getattr(model, name, None)
        return v if isinstance(v, int) and not isinstance(v, bool) else None
    return read


def bool_attribute(name: str) -> Callable[[nn.Module], Optional[bool]]:
    """A hint reading a boolean attribute of the model (None when absent or not a bool)."""
    def read(model: nn.Module) -> Optional[bool]:
        v = getattr(model, name, None)
        return v if isinstance(v, bool) else None
    return read


_LOCK = threading.Lock()


def _new_lock():                # (a child forked while another thread held it)
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock)
_FAMILIES: List[FamilyHints] = []          # asked in this order
_BUILT_IN: List[FamilyHints] = []          # evoplug's own, asked after the users'
_LEAF_MODULES: List[type] = []
_LEAF_FUNCTIONS: List[Callable] = []


def register_leaf_module(cls: type) -> type:
    """Never trace into instances of ``cls``, and do not count a softmax inside them as
    attention. Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module takes an nn.Module subclass, got {cls!r}")
    with _LOCK:
        if cls not in _LEAF_MODULES:
            _LEAF_MODULES.append(cls)
    return cls


def register_leaf_function(fn: Callable) -> Callable:
    """Record calls of ``fn`` as one graph node instead of tracing through it (it runs as is in
    the converted block, on the tokens the block runs). Usable as a decorator; ``fn`` must be
    importable by name (a module-level function) for the model to pickle."""
    if not callable(fn):
        raise TypeError(f"register_leaf_function takes a function, got {fn!r}")
    with _LOCK:
        if fn not in _LEAF_FUNCTIONS:
            _LEAF_FUNCTIONS.append(fn)
    return fn


def register_family(hints: FamilyHints, *, built_in: bool = False) -> FamilyHints:
    """Add a family's hints; asked before the ones registered earlier and before evoplug's."""
    if not isinstance(hints, FamilyHints):
        raise TypeError(f"register_family takes a FamilyHints, got {type(hints).__name__}")
    with _LOCK:
        target = _BUILT_IN if built_in else _FAMILIES
        target[:] = [h for h in target if h.name != hints.name]
        if built_in:
            target.append(hints)
        else:
            target.insert(0, hints)
    return hints


def families() -> Tuple[FamilyHints, ...]:
    return tuple(_FAMILIES) + tuple(_BUILT_IN)


def hint(model: nn.Module, name: str) -> Tuple[Any, Optional[str]]:
    """The first answer to hint ``name`` among the families that match ``model``:
    (answer, family name), or (None, None)."""
    for family in families():
        ask = getattr(family, name)
        if ask is None or not family.matches(model):
            continue
        answer = ask(model)
        if answer is not None:
            return answer, family.name
    return None, None


def leaf_modules() -> Tuple[type, ...]:
    """Module classes registered with :func:`register_leaf_module` (the user's, always whole)."""
    return tuple(_LEAF_MODULES)


def leaf_functions() -> Tuple[Callable, ...]:
    """Functions kept whole: registered ones and every family's (timm's notrace functions)."""
    out = list(_LEAF_FUNCTIONS)
    for family in families():
        out.extend(f for f in family.leaf_functions() if f not in out)
    return tuple(out)


def hook_is_idle(hook: Callable) -> bool:
    """Whether a family says ``hook`` does nothing at this moment (see FamilyHints.idle_hook);
    False when none knows it. What the converted blocks are handed (runtime/block.py)."""
    for family in families():
        if family.idle_hook is not None:
            answer = family.idle_hook(hook)
            if answer is not None:
                return answer
    return False


def maps_collected() -> bool:
    """Whether a family says a call now running collects attention maps (see
    FamilyHints.collects_maps). What the converted blocks that return one are handed."""
    return any(f.collects_maps is not None and f.collects_maps() for f in families())


def hook_is_family(hook: Callable) -> bool:
    """Whether ``hook`` is a family's own (one its ``idle_hook`` knows: transformers' output
    capturing), not the user's: a block it makes run its own forward is not warned about."""
    return any(f.idle_hook is not None and f.idle_hook(hook) is not None for f in families())


def traced_settings(module: nn.Module, converting: bool = False) -> Tuple[Tuple[str, Any], ...]:
    """What the families say ``module``'s traced forward read beyond its plain attributes
    (see FamilyHints.traced_settings), as sorted (name, value) pairs; () when none does.
    ``converting``: asked by the conversion (a family may warn then), not by a call."""
    out: Dict[str, Any] = {}
    for family in families():
        if family.traced_settings is not None:
            out.update(family.traced_settings(module, converting) or {})
    return tuple(sorted(out.items()))


def family_leaf_modules() -> Tuple[type, ...]:
    """Module classes the families keep whole unless they hold the block's attention (timm's
    notrace modules: they often trace once the block's constant arguments are known)."""
    out: List[type] = []
    for family in families():
        out.extend(c for c in family.leaf_modules() if c not in out)
    return tuple(out)
