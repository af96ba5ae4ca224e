"""Errors raised by evoplug. Every message names the module it is about and the reason."""
from __future__ import annotations


class EvoplugError(RuntimeError):
    """Base class of evoplug's errors."""


class ConversionError(EvoplugError):
    """A model (or one of its blocks) cannot be converted.

    ``failures`` is a list of ``(module_name, reason)`` pairs (``''`` names the model itself).
    """

    def __init__(self, message: str, failures=()):
        self.failures = list(failures)
        super().__init__(message)


class AnalysisError(EvoplugError):
    """The fx analysis of one module failed; carries the module name and the reason.

    ``not_a_block``: why the module may be no block on its own, but a part of a larger one
    (see analyse.discover.regroup_parts): ``'no attention'`` in its graph, or ``'no residual'``
    around its attention; empty otherwise. ``sized``: a call that differs from the analysed one
    in a size (a map, a window cut, a size argument), which a twin for that size can take."""

    def __init__(self, module_name: str, reason: str, not_a_block: str = "", sized: bool = False):
        self.module_name = module_name
        self.reason = reason
        self.not_a_block = not_a_block
        self.sized = sized
        super().__init__(f"{module_name or '<root>'}: {reason}")
