"""Loading MMEngine's own checkpoints on torch >= 2.6, without trusting arbitrary pickles.

mmengine 0.10.7 calls ``torch.load(filename, map_location)`` without ``weights_only``; since
torch 2.6 that means ``weights_only=True``, and the checkpoints MMEngine's Runner saves do not
load: their ``message_hub`` holds :class:`mmengine.logging.HistoryBuffer` objects (numpy arrays
of the logged scalars, and HistoryBuffer's statistics methods pickled as
``getattr(HistoryBuffer, 'mean')``), and ``meta`` holds numpy scalars. ``load_from`` of such a
checkpoint and ``resume=True`` both fail with ``UnpicklingError: Weights only load failed``.

The fix here is deliberate and narrow. The loader stays ``torch.load(..., weights_only=True)``,
and only these globals are allow-listed, only while MMEngine loads a checkpoint:

=====================================================  ==========================================
global in the pickle                                   resolves to
=====================================================  ==========================================
``numpy.ndarray``, ``numpy.dtype``                     themselves (array and dtype reconstruction)
``numpy._core.multiarray._reconstruct`` (and the       ``ndarray`` reconstruction (numpy 2 and
``numpy.core.multiarray`` spelling of numpy 1)         numpy 1 checkpoints)
``numpy._core.multiarray.scalar`` (both spellings)     numpy scalars
``numpy.dtypes.Float64DType`` etc.                     the numeric and bool dtype classes
``mmengine.logging.history_buffer.HistoryBuffer``      itself (plain attributes, numpy arrays)
``builtins.getattr``                                   :func:`history_buffer_statistic`: resolves
                                                       ``getattr(HistoryBuffer, name)`` for its own
                                                       statistics methods (``mean``, ``max``,
                                                       ``min``, ``current``) and refuses anything
                                                       else. A real ``getattr`` is never allowed.
=====================================================  ==========================================

:func:`install` (run by ``import evoplug.mm``) registers :func:`load_from_local` as MMEngine's
loader for local files (the ``''`` scheme of :class:`mmengine.runner.CheckpointLoader`, MMEngine's
own extension point) and runs its ``http(s)://`` loader inside the same allow-list. Anything else
in a checkpoint (your own classes in ``meta``) still fails, with torch's message naming it; if
you trust that file, allow-list the global yourself with ``torch.serialization.add_safe_globals``.
"""
from __future__ import annotations

import functools
import os.path as osp
import pickle
from typing import Any, Callable, List

import torch

_STATISTICS = ("mean", "max", "min", "current")


def history_buffer_statistic(obj: Any, name: str) -> Callable:
    """Stands in for ``builtins.getattr`` while unpickling an MMEngine checkpoint.

    MMEngine pickles ``HistoryBuffer._statistics_methods`` (plain functions of the class) as
    ``getattr(HistoryBuffer, 'mean')``; only those four lookups resolve here.
    """
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and name in _STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f"evoplug.mm checkpoint allow-list: refusing getattr({obj!r}, {name!r}); only "
        f"HistoryBuffer's statistics methods {_STATISTICS} resolve")


def mmengine_safe_globals() -> List[Any]:
    """The globals allow-listed for MMEngine checkpoints (see the module docstring)."""
    import numpy as np
    from mmengine.logging import HistoryBuffer
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    out: List[Any] = [np.ndarray, np.dtype, HistoryBuffer,
                      (history_buffer_statistic, "builtins.getattr")]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        out.append((multiarray._reconstruct, f"{mod}._reconstruct"))
        out.append((multiarray.scalar, f"{mod}.scalar"))
    # ``np.dtype('f8', ...)`` is rebuilt as an instance of ``numpy.dtypes.Float64DType``: the
    # numeric and bool dtype classes (numpy >= 1.25), not object/string/void dtypes
    dtypes = getattr(np, "dtypes", None)
    for name in sorted(dir(dtypes) if dtypes is not None else ()):
        cls = getattr(dtypes, name)
        if isinstance(cls, type) and name.endswith("DType") and \
                issubclass(getattr(cls, "type", object), (np.number, np.bool_)) and cls not in out:
            out.append(cls)
    return out


class allow_mmengine_checkpoints:
    """Context manager: the allow-list above is active inside it (torch's own
    ``safe_globals``; entries the user had already allow-listed are left as they were)."""

    def __enter__(self):
        have = torch.serialization.get_safe_globals()
        self._ctx = torch.serialization.safe_globals(
            [g for g in mmengine_safe_globals() if g not in have])
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def load_from_local(filename: str, map_location=None):
    """MMEngine's local-file checkpoint loader, with ``weights_only=True`` and the allow-list."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    with allow_mmengine_checkpoints():
        return torch.load(filename, map_location=map_location, weights_only=True)


def _with_allow_list(loader: Callable) -> Callable:
    @functools.wraps(loader)
    def load(*args, **kwargs):
        with allow_mmengine_checkpoints():
            return loader(*args, **kwargs)
    load._evoplug_allow_list = True
    return load


_installed = False


def install() -> bool:
    """Make MMEngine's checkpoint loading use the allow-list (idempotent).

    Returns False (and changes nothing) on a torch without ``torch.serialization.safe_globals``
    (< 2.4), whose ``torch.load`` does not default to ``weights_only=True`` anyway.
    """
    global _installed
    if _installed:
        return True
    if not hasattr(torch.serialization, "safe_globals"):
        return False
    from mmengine.runner import checkpoint as mm_ckpt
    mm_ckpt.CheckpointLoader.register_scheme(prefixes="", loader=load_from_local, force=True)
    mm_ckpt.CheckpointLoader.register_scheme(
        prefixes=("http://", "https://"), loader=_with_allow_list(mm_ckpt.load_from_http),
        force=True)
    _installed = True
    return True
