"""Slow-path programs as plain functions with their source attached.

A program is the ``forward`` of a rewritten block graph (see rewrite.py), called with the
converted block as ``self``. Its source (imports included) rides along as
``__evoplug_source__``: a pickled model stores the source and compiles it again when loaded.
This module needs no torch.fx, so the runtime can load programs without the compiler.
"""
from __future__ import annotations

from typing import Callable, Dict

from ..errors import EvoplugError


def compile_program(source: str) -> Callable:
    """The ``forward`` function defined by a program's source (imports included)."""
    scope: Dict[str, object] = {}
    exec(compile(source, "<evoplug program>", "exec"), scope)  # noqa: S102 - our own generated code
    fn = scope["forward"]
    fn.__evoplug_source__ = source
    return fn


def program_source(program: Callable, block_name: str = "") -> str:
    src = getattr(program, "__evoplug_source__", None)
    if src is None:
        raise EvoplugError(f"{block_name or '<block>'}: its program calls a function Python cannot "
                           "import by name, so the converted model cannot be pickled; save its "
                           "state_dict and convert again after loading")
    return src
