"""Slow-path programs as plain functions with their source attached.

A program is the ``forward`` of a rewritten block graph (see rewrite.py), called with the
converted block as ``self`` and as its last argument, ``_evo_block``, on which it sets what the
forward sets (:func:`set_written`: a graph cannot name ``self``). Its source (imports
included) rides along as ``__evoplug_source__``: a pickled model stores the source and compiles
it again when loaded.
This module needs no torch.fx, so the runtime can load programs without the compiler.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from ..errors import EvoplugError


def compile_program(source: str) -> Callable:
    """The ``forward`` function defined by a program's source (imports included)."""
    scope: Dict[str, object] = {}
    exec(compile(source, "<evoplug program>", "exec"), scope)  # noqa: S102 - our own generated code
    fn = scope["forward"]
    takes = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    if "_evo_full" in takes and "_evo_block" not in takes:      # (a block's, pickled before)
        fn = _without_block_argument(fn)
    if sets_modes(source):
        fn = modes_restored(fn)
    fn.__evoplug_source__ = source
    return fn


#: what a program that sets the gradient modes its forward sets calls (rewrite/grad_mode.py)
_MODE_SETTERS = ("torch._C._set_grad_enabled(", "_enter_inference_mode(")


def sets_modes(source: str) -> bool:
    """Whether a program's source sets a gradient mode (rewrite/grad_mode.py)."""
    return any(s in source for s in _MODE_SETTERS)


def modes_restored(program: Callable) -> Callable:
    """``program``, a program that sets the gradient modes its block's forward sets around the
    ops that ran in them (rewrite/grad_mode.py), called so that an error raised inside such a
    run leaves the caller's gradient mode as it was, as the forward's ``with torch.no_grad():``
    does (the program puts it back itself when it runs through). Inference mode is put back by
    the guard the program holds while in it, once the error lets go of it (asking for it here,
    ``torch.is_inference_mode_enabled``, breaks a ``torch.compile`` graph at each block)."""
    def forward(*args):
        with torch.set_grad_enabled(torch.is_grad_enabled()):
            return program(*args)
    return forward


def _without_block_argument(program: Callable) -> Callable:
    """A program of a model pickled before programs took the block (the forty-sixth session),
    called as programs are now (the block last): it returned what the forward sets on the
    block as a fifth item, (module path, name, value, kind), set here once it returns, as the
    runtime did then. Called with one argument more than it takes, it raised a raw
    ``TypeError`` at every call of such a model."""
    def forward(self, *args):
        *args, block = args
        out = program(self, *args)
        if isinstance(out, tuple) and len(out) > 4:
            for path, name, value, kind in out[4]:
                set_written(block, path, name, value, kind)
            out = out[:4]
        return out
    return forward


def set_written(block, path: str, name: str, value, kind: str = "attribute"):
    """Set on ``block``, or its module at ``path``, a tensor its forward sets there (``kind``:
    an attribute or a buffer), as its program computed it; a program calls it where the
    forward sets it (rewrite/program.py ``_set_by_forward``), so what a recomputation cut short
    in a checkpoint runs sets what the forward's own run would. Nothing without a block (the
    conversion's probes)."""
    if block is not None:
        set_on(block.get_submodule(path), name, value, kind)


def set_on(module, name: str, value, kind: str):
    """``setattr``, but a buffer the forward registers (``self.register_buffer('last', ...)``,
    kind ``"buffer"`` or ``"non-persistent buffer"``) that the module does not hold (the
    conversion took the calibration's away) is registered as one, as the forward would: set as a
    plain attribute, the forward's own ``register_buffer`` then raised ``KeyError: "attribute
    'last' already exists"`` (audit J1 of the forty-fifth session)."""
    if kind != "attribute" and name not in module._buffers:
        module.register_buffer(name, value, persistent=kind == "buffer")
    else:
        setattr(module, name, value)


def program_source(program: Callable, block_name: str = "") -> str:
    src = getattr(program, "__evoplug_source__", None)
    if src is None:
        raise EvoplugError(f"{block_name or '<block>'}: its program calls a function Python cannot "
                           "import by name, so the converted model cannot be pickled; save its "
                           "state_dict and convert again after loading")
    return src
