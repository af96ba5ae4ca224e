"""User-facing options of a conversion (shared by every converted block of one model).

:class:`EvoOptions` is immutable and checked field by field when it is made: a value of the
wrong type or out of range raises a ``TypeError`` / ``ValueError`` naming the field, and
nothing is stored. Numbers may be Python, NumPy or 0-d tensor numbers; they are stored as
Python ``float`` / ``int`` / ``bool``.

Most options are read at run time: :func:`evoplug.set_options` swaps in a new options object
and the next forward uses it, without re-converting. Two are read when the blocks are
analysed (``num_prefix_tokens``, ``global_query``): ``set_options`` refuses to change them
(``CONVERSION_FIELDS``); convert the model again for that.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import types
from typing import Any, Callable, Optional, Union

#: options fixed when the blocks are analysed: changing them needs a new conversion
CONVERSION_FIELDS = frozenset({"num_prefix_tokens", "global_query"})

GLOBAL_QUERIES = ("auto", "cls", "mean")


def _plain(value: Any) -> Any:
    """A NumPy scalar or 0-d tensor -> the Python number it holds (other values unchanged); one
    of less than 64 bits -> the shortest decimal that rounds to it (``np.float32(0.29)`` ->
    0.29, not 0.28999999165534973: k = floor(M * keep) was one token fewer than for the
    Python float at M = 400, audit O3 of the twenty-seventh session)."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _shortest(value) if value.dtype.kind == "f" and value.dtype.itemsize < 8 else value.item()
    if type(value).__name__ in ("Tensor", "Parameter") and hasattr(value, "dim") and value.dim() == 0 \
            and not getattr(value, "requires_grad", False) and not value.is_meta:
        if str(value.dtype) in ("torch.float32", "torch.float16"):
            return _plain(value.detach().cpu().numpy()[()])     # (the NumPy scalar of its type)
        return value.item()     # (bfloat16 has no NumPy type: its value as it is)
    return value


def _shortest(value) -> float:
    """The Python float of the shortest decimal NumPy prints for a float32 / float16 scalar."""
    return float(str(value))


def _real(name: str, value: Any) -> float:
    v = _plain(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(v)
    if math.isnan(v):
        raise ValueError(f"{name} must be a number, got nan")
    return v


def read_trade_off(alpha: Callable[[], Any]) -> Any:
    """What a callable ``trade_off`` gives at an update, checked: a number in [0, 1], or a
    one-element floating-point tensor (a learnable one; its value is read on the CPU in eager
    mode; compiled, exported or on an accelerator, where reading it would wait for the device,
    the device asserts the range)."""
    a = alpha()
    import torch     # (this module is read without torch elsewhere)
    # (a tensor of any kind: a Parameter, a FakeTensor while exporting; not a numpy scalar. An
    # isinstance check: dynamo cannot trace callable(getattr(a, ...)) on a tensor, and a
    # learnable trade-off broke the compiled graph in every block until audit E1 of the
    # forty-first session)
    if isinstance(a, torch.Tensor):
        if a.numel() != 1 or not a.is_floating_point():
            raise TypeError(f"trade_off() must give a number in [0, 1] or a one-element "
                            f"floating-point tensor, got a {a.dtype} tensor of shape {tuple(a.shape)}")
        if a.device.type == "cpu" and not torch.compiler.is_compiling():
            if not 0.0 <= float(a.detach()) <= 1.0:
                raise ValueError(f"trade_off() must give a number in [0, 1], got {float(a.detach())}")
        else:   # (compiled, exported or on an accelerator: checked by the device, no wait)
            torch._assert_async((a >= 0) & (a <= 1), "evoplug: trade_off() must give a number "
                                                      "in [0, 1]")
        # (the scores are float32 whatever the model's dtype: a float64 or half-precision alpha
        # failed torch.lerp's dtype check; audit Z of the twenty-fifth session)
        return a if a.dtype == torch.float32 else a.float()
    v = _real("trade_off()", a)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"trade_off() must give a number in [0, 1], got {a!r}")
    return v


def _integer(name: str, value: Any) -> int:
    v = _plain(value)
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool (numpy's too); a TypeError naming ``name`` for anything else."""
    v = _plain(value)
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return v


def check_keep_ratio(keep_ratio) -> float:
    try:
        v = _real("keep_ratio", keep_ratio)
    except TypeError as e:          # (a string, None: the wrong type, as for the other options)
        raise TypeError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}") from e
    except ValueError:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}") from None
    if not 0.0 < v <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    return v


@dataclasses.dataclass(frozen=True)
class EvoOptions:
    """Options of the slow-fast token evolution.

    keep_ratio: fraction of the patch tokens that take the slow (full) update in an evolving
        block, in (0, 1]; ``1.0`` reproduces the original model exactly.
    start_block: index (among the converted blocks, in execution order) of the first evolving
        block. ``None`` -> the first third of the blocks stays dense (``max(1, len(blocks) // 3)``
        in each token stream, e.g. each tower of a two-tower model; blocks 5-12 of 12 evolve
        for DeiT, as in the paper). Must be >= 1: the block before it
        provides the first global class attention.
    trade_off: alpha of the global attention update ``g = (1 - alpha) * g + alpha * a``; a
        number in [0, 1], or a callable returning alpha (a learnable trade-off, e.g. a module
        computing ``sigmoid(w)``; called at each update, so gradients reach ``w`` through the
        representative weights of the selections after the first, by the tokens that leave
        the kept set (1-3% per selection at 0.5 on a trained DeiT: docs/reselect.md): a model
        needs more evolving blocks than ``reselect_every`` for it to matter).
    reselect_every: re-run the top-k selection every this many evolving blocks (default 4:
        once per "stage" of four blocks as in the authors' DeiT code; 1 = every block). Between
        selections the blocks hand the kept tokens on in the selection's order (inference, and
        training outside gradient checkpointing), which halves the ops per block; on two
        trained models the predictions match selecting every block within a few inputs
        (docs/reselect.md).
    representative: summarise the non-selected tokens into one representative token whose
        update is broadcast to them (fast update). ``False`` = the "placeholder" variant: the
        non-selected tokens are carried unchanged (the authors' DeiT code; one token fewer per
        block). The fast update matters where those tokens are read again: a later selection,
        a returned feature map (dense tasks); on small classifiers either setting gave the same
        top-1 within half a point (docs/benchmarks.md).
    num_prefix_tokens: override the detected number of leading prefix tokens (cls,
        distillation, registers). Read at conversion.
    global_query: which query ranks the tokens: ``'cls'`` (the class token, query 0, as in
        the paper), ``'mean'`` (the mean query of the patch tokens: its attention row, for
        models without a class token) or ``'auto'`` (cls when there is one). Read at conversion.
    identity_fast_path: with keep_ratio == 1.0 run each block's original forward (bit-exact,
        no overhead). ``False`` runs the selection machinery even at 1.0 (all tokens selected,
        gathered and scattered back): used by tests to check that path reproduces the model.
    """

    keep_ratio: float = 0.5
    start_block: Optional[int] = None
    trade_off: Union[float, Callable[[], Any]] = 0.5
    reselect_every: int = 4
    representative: bool = True
    num_prefix_tokens: Optional[int] = None
    global_query: str = "auto"
    identity_fast_path: bool = True

    def __post_init__(self):
        for name, value in self._checked().items():
            object.__setattr__(self, name, value)

    def _checked(self) -> dict:
        """Every field checked and in its canonical type; raises before anything is stored."""
        out = {"keep_ratio": check_keep_ratio(self.keep_ratio)}
        if self.start_block is None:
            out["start_block"] = None
        else:
            out["start_block"] = _integer("start_block", self.start_block)
            if out["start_block"] < 1:
                raise ValueError(
                    "start_block must be >= 1: the block before the first evolving block scores "
                    f"the tokens (got {self.start_block!r})")
        if callable(self.trade_off) and not isinstance(self.trade_off, (numbers.Number, str)):
            out["trade_off"] = self.trade_off
        else:
            alpha = _real("trade_off", self.trade_off)
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"trade_off must be in [0, 1], got {self.trade_off!r}")
            out["trade_off"] = alpha
        out["reselect_every"] = _integer("reselect_every", self.reselect_every)
        if out["reselect_every"] < 1:
            raise ValueError(f"reselect_every must be >= 1, got {self.reselect_every!r}")
        out["representative"] = check_flag("representative", self.representative)
        if self.num_prefix_tokens is None:
            out["num_prefix_tokens"] = None
        else:
            out["num_prefix_tokens"] = _integer("num_prefix_tokens", self.num_prefix_tokens)
            if out["num_prefix_tokens"] < 0:
                raise ValueError(f"num_prefix_tokens must be >= 0, got {self.num_prefix_tokens!r}")
        if not isinstance(self.global_query, str):
            raise TypeError(f"global_query must be 'auto', 'cls' or 'mean', got {self.global_query!r}")
        if self.global_query not in GLOBAL_QUERIES:
            raise ValueError(f"global_query must be 'auto', 'cls' or 'mean', got {self.global_query!r}")
        out["global_query"] = self.global_query
        out["identity_fast_path"] = check_flag("identity_fast_path", self.identity_fast_path)
        return out

    def replace(self, **changes) -> "EvoOptions":
        """A checked copy with ``changes``; unknown names raise a ``TypeError`` naming them."""
        check_names(changes)
        return dataclasses.replace(self, **changes)

    def __getstate__(self):
        # (pickle stores a function by its name: what its default arguments or the global names
        # it reads hold would be the loading process's, not the loaded model's)
        name = _stored_by_name_reading_state(self.trade_off)
        if name is not None:
            raise TypeError(f"trade_off reads tensors or modules through the default arguments or "
                            f"global names of {name}, which pickle cannot store with the model: "
                            "make trade_off a module of the model (evoplug.set_options(model, "
                            "trade_off=...)) before saving")
        return dict(self.__dict__)

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def __deepcopy__(self, memo):
        # (a copy of a converted model: a trade_off function reading the model's parameters
        # reads the copy's; the standard copy keeps the very function, which read and trained
        # the original's, silently: audit M of the thirty-fourth session)
        return self.replace(trade_off=follow_copy(self.trade_off, memo))


def follow_copy(fn: Any, memo: dict, only_copied: bool = False) -> Any:
    """``fn`` (a ``trade_off``) for a copy of the model made by ``copy.deepcopy(..., memo)``:
    a module or bound method is deep-copied (the model's own map onto the copy's); a function or
    ``functools.partial`` is rebuilt with the tensors and modules it holds (closure cells, default
    arguments, the partial's arguments, and objects holding them) deep-copied; ``only_copied``:
    only those the copy copied (``memo``), the caller's others left as they are, and an object
    holding the model's refused (a ``ValueError``: only its own copy could hold the copy's). One
    that reads a tensor or module as a global name, or what holds one, cannot follow: a
    ``ValueError`` naming it."""
    import copy
    import functools

    within = memo if only_copied else None      # (the model's own, where they are known)

    def moved(v):
        if isinstance(v, (types.FunctionType, functools.partial)) and v is not fn:
            return follow_copy(v, memo, only_copied)     # (a function the closure calls)
        if not (_reaches_state(v, within=within) if within is not None else
                _holds_state(v) or _reaches_state(v, model_only=True)):
            return v
        if isinstance(v, (tuple, list)):
            return type(v)(moved(i) for i in v)
        if isinstance(v, dict):
            return {k: moved(i) for k, i in v.items()}
        if only_copied and not _holds_state(v):
            # (an object holding the model's: ``lambda: holder.alpha()``; it was left as it was,
            # and the copy read and trained the original's parameter, until the fifty-third
            # session)
            raise ValueError(_cannot_rebuild(type(v).__name__))
        return copy.deepcopy(v, memo)

    if isinstance(fn, functools.partial):
        return functools.partial(follow_copy(fn.func, memo, only_copied), *moved(list(fn.args)),
                                 **moved(dict(fn.keywords)))
    if isinstance(fn, types.FunctionType):
        names = _global_names(fn.__code__)
        bad = sorted(n for n in names if _global_holds(fn.__globals__.get(n), fn, within))
        if bad:
            raise ValueError(f"trade_off reads {', '.join(f'`{n}`' for n in bad)} (a tensor or module, "
                             "or what holds one) as a global name: a copy of the model would read "
                             "and train the original's. Make trade_off a module of the model, or a "
                             "function holding what it reads (a closure), or set_options(copy, "
                             "trade_off=...) with a function of the copy's")
        cells = tuple(_moved_cell(c, moved) for c in fn.__closure__ or ())
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__,
                                 moved(fn.__defaults__) if fn.__defaults__ else fn.__defaults__,
                                 cells or None)
        new.__kwdefaults__ = moved(fn.__kwdefaults__) if fn.__kwdefaults__ else fn.__kwdefaults__
        new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
        new.__dict__.update(fn.__dict__)
        return new
    if isinstance(fn, (numbers.Number, str)):
        return fn
    if hasattr(fn, "cache_info") and _reaches_state(getattr(fn, "__wrapped__", None), within=within):
        raise ValueError("trade_off is a cached function (functools.lru_cache) of tensors or "
                         "modules: it keeps giving the value it computed first, and a copy of the "
                         "model would share it. Make trade_off a module of the model")
    if only_copied:
        if _reaches_state(fn, within=within):
            raise ValueError(_cannot_rebuild(type(fn).__name__))
        return fn
    return copy.deepcopy(fn, memo)


def _global_holds(value, fn, within: Optional[dict]) -> bool:
    """Whether a global name the function ``fn`` reads is a tensor or module, or reaches one of
    the model's (``within``; where None, a module or parameter: ``_reaches_state``'s
    ``model_only``): a global object or function holding the model (``HOLDER.alpha()``) was
    left to the copy, which read and trained the original's, until the fifty-third session."""
    if value is fn or isinstance(value, (type, types.ModuleType)):
        return False
    return _holds_state(value) or _reaches_state(value, within=within, model_only=within is None)


def _cannot_rebuild(what: str) -> str:
    return (f"trade_off ({what}) holds tensors or modules through an object evoplug cannot "
            "rebuild for the copy inplace=False converts: the copy would read and train the "
            "original's. Convert with inplace=True, or make trade_off a module of the model (it "
            "then follows the copy), a method of one, or a function holding what it reads")


def _reaches_state(f, within: Optional[dict] = None, model_only: bool = False) -> bool:
    """An object (a ``trade_off`` callable) that holds a tensor or module (one of ``within``'s
    keys, ids, where given; ``model_only``: a module or parameter, what a model is made of, not
    a plain tensor such as a schedule's the user steps, which a copy of the model shares, as
    before the fifty-third session: ``copy.deepcopy`` of a converted model, where the model's
    own are not known yet, copies or refuses what holds those only): through a function's closure, default arguments and the global
    names it reads, a partial's function and arguments, a bound method's object, an object's
    attributes (a callable object's, a module's), and the tuples, lists and dicts among them, at
    any depth. Four levels down until the fifty-third session: a method of an object reaching
    the model's parameter five deep (``holder.a.b.c.model``) was left to the copy
    ``inplace=False`` converts, which read and trained the original's, 0.0008 off, without a
    word. Walked with a stack of its own, each object once."""
    import torch
    seen, stack = set(), [f]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen or isinstance(v, (type, types.ModuleType)):
            continue
        seen.add(id(v))
        if _holds_state(v) and (within is None or _some_in(v, within)) and (
                not model_only or isinstance(v, (torch.nn.Module, torch.nn.Parameter))):
            return True
        if not isinstance(v, (torch.Tensor, numbers.Number, str, bytes)):
            stack.extend(_held_by(v))
    return False


def _stored_by_name_reading_state(fn) -> Optional[str]:
    """The qualified name of a function pickle stores by its name (``fn`` itself, or one that a
    partial, bound method or callable object ``fn`` holds) whose default
    arguments or global names hold a tensor or module, or reach a module or parameter at any
    depth (:func:`_reaches_state`); None where there is none. A module, pickled with the model,
    is not looked into. Until the fifty-fourth session only what those held directly (or in a
    tuple, list or dict) was looked at: a global object holding the model (``HOLDER.model``),
    or a partial of a function reading one, pickled, and the loaded model read and trained the
    original's parameter, without a word."""
    import torch
    seen, stack = set(), [fn]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen or isinstance(v, (type, types.ModuleType, torch.nn.Module,
                                                        torch.Tensor, numbers.Number, str, bytes)):
            continue
        seen.add(id(v))
        if isinstance(v, types.FunctionType):     # (its closure: pickle refuses a local function)
            held = list(v.__defaults__ or ()) + list((v.__kwdefaults__ or {}).values())
            held += [v.__globals__.get(n) for n in _global_names(v.__code__)]
            if any(_holds_state(h) or _reaches_state(h, model_only=True) for h in held):
                return v.__qualname__
            stack.extend(vars(v).values())        # (``__wrapped__``)
        else:
            stack.extend(_held_by(v))
    return None


def _held_by(v) -> list:
    """What :func:`_reaches_state` follows from ``v``."""
    import functools
    if isinstance(v, (tuple, list, set, frozenset)):
        return list(v)
    if isinstance(v, dict):
        return list(v.values())
    if isinstance(v, functools.partial):
        return [v.func, *v.args, *v.keywords.values()]
    if isinstance(v, types.FunctionType):
        parts = [c.cell_contents for c in v.__closure__ or () if _filled(c)]
        parts += list(v.__defaults__ or ()) + list((v.__kwdefaults__ or {}).values())
        parts += list(vars(v).values())        # (``__wrapped__``: the function it wraps)
        return parts + [v.__globals__.get(n) for n in _global_names(v.__code__)]
    if isinstance(v, types.MethodType):
        return [v.__self__, v.__func__]
    return list(vars(v).values()) if hasattr(v, "__dict__") else []


def _some_in(v, ids: dict) -> bool:
    """``v`` or a tensor or module it holds (in a tuple, list or dict; a module's own
    parameters) is one whose id is a key of ``ids``."""
    if isinstance(v, (tuple, list)):
        return any(_some_in(i, ids) for i in v)
    if isinstance(v, dict):
        return any(_some_in(i, ids) for i in v.values())
    return id(v) in ids


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _holds_state(v) -> bool:
    """``v`` is or holds (in a tuple, list or dict) a tensor or a module."""
    if isinstance(v, (tuple, list)):
        return any(_holds_state(i) for i in v)
    if isinstance(v, dict):
        return any(_holds_state(i) for i in v.values())
    if type(v).__module__.startswith("numpy") or isinstance(v, (numbers.Number, str, type(None))):
        return False
    import torch
    return isinstance(v, (torch.Tensor, torch.nn.Module))


def _moved_cell(cell, moved):
    try:
        value = cell.cell_contents
    except ValueError:          # (an empty cell: a name the function defines after it is made)
        return cell
    new = moved(value)
    import types
    return cell if new is value else types.CellType(new)


def _global_names(code) -> set:
    """The global names a code object (and the functions and lambdas defined in it) reads."""
    out = set(code.co_names)
    for c in code.co_consts:
        if hasattr(c, "co_names"):
            out |= _global_names(c)
    return out


def check_names(options, arguments=()) -> None:
    """A ``TypeError`` naming the unknown ones of ``options`` (names), with the option (or one
    of ``arguments``, the calling function's own) each is closest to: ``convert(m,
    example_inputs=x)`` said only that ``EvoOptions.__init__()`` got an unexpected keyword."""
    names = sorted(f.name for f in dataclasses.fields(EvoOptions))
    unknown = sorted(set(options) - set(names))
    if not unknown:
        return
    import difflib
    hints = [f"{u!r} (did you mean {close[0]!r}?)" if close else repr(u) for u in unknown
             for close in [difflib.get_close_matches(u, names + list(arguments), n=1, cutoff=0.6)]]
    raise TypeError(f"unknown evoplug option(s) {', '.join(hints)}; options are {names}")
