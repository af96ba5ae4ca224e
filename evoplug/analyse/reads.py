"""The plain attributes of the modules a block's programs call whole that the block's own code
reads while a trace runs it (``x * self.norm2.gain``, timm's ``dropout_p=self.attn_drop.p``):
the trace reads them as Python values, so its programs hold them as constants, while the
modules themselves run live. The runtime refuses a call once one of them changed
(runtime/spec.py ``BlockSpec.changed``), as it does for the modules the trace ran the code of.

A trace never runs a leaf module's forward (fx records a call), so any read of a leaf's plain
attribute while the block is traced comes from code the program holds, the leaf's other methods
that code calls included (``self.ls2.scale_for(x)``: unseen until the fifty-second session, 0.32
off once changed): but not a call of the leaf itself (a Python branch evaluated on real tensors
runs the real modules, through torch.nn's call machinery) nor fx's and evoplug's own
bookkeeping, which are left out (:func:`_by_traced_code`). Reads are seen through a subclass of
each leaf's class set on the instance for the trace (``__getattribute__`` notes the watched
names, on the tracing thread only), and the class put back after it."""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Dict, Iterator, Set, Tuple

from torch import nn
from torch.nn.utils import parametrize

from .calibrate import plain_attributes

#: id(module) -> (names watched, names read, thread): the leaves of the traces running now
_WATCHED: Dict[int, Tuple[frozenset, Set[str], int]] = {}
_READERS: Dict[type, type] = {}
_LOCK = threading.Lock()
#: frames whose reads are bookkeeping, not the block's code
_OWN = ("evoplug.", "torch.fx.")


@contextlib.contextmanager
def leaf_reads(block: nn.Module, traced_into: Set[int]) -> Iterator[Set[Tuple[str, str]]]:
    """Yields the set that gets, while the block is traced on this thread, (path, name) of each
    plain attribute of a submodule outside ``traced_into`` (ids of the modules the trace runs
    the code of: the others are called whole, or sit inside one) that code other than that
    module's own methods reads."""
    found: Set[Tuple[str, str]] = set()
    thread, swapped = threading.get_ident(), []
    try:
        for path, m in block.named_modules():
            names = frozenset(plain_attributes(m)) if path and id(m) not in traced_into else ()
            if not names or id(m) in _WATCHED or parametrize.is_parametrized(m):
                continue
            reader = _reader(type(m))
            if reader is None:
                continue
            read: Set[str] = set()
            _WATCHED[id(m)] = (names, read, thread)
            try:
                m.__class__ = reader
            except TypeError:       # (a class whose instances cannot take another)
                del _WATCHED[id(m)]
                continue
            swapped.append((path, m, read, reader.__bases__[0]))
        yield found
    finally:
        for path, m, read, cls in swapped:
            m.__class__ = cls
            del _WATCHED[id(m)]
            found.update((path, k) for k in read)


def _reader(cls: type):
    """``cls``'s subclass that notes reads of the watched names (None where ``cls`` takes no
    subclass, or one of its classes has an ``__init_subclass__``, which may register it): the
    same name, qualified name and module, so the tracer's leaf rule (fx's ``torch.nn`` test, the
    families' registries by ``isinstance``) sees the same class."""
    with _LOCK:
        if cls in _READERS:
            return _READERS[cls]
        if any("__init_subclass__" in vars(c) for c in cls.__mro__[:-1]):
            _READERS[cls] = None
            return None
        get = cls.__getattribute__

        def __getattribute__(self, name):
            watched = _WATCHED.get(id(self))
            if watched is not None and name in watched[0] and threading.get_ident() == watched[2]:
                if _by_traced_code(self, sys._getframe(1)):
                    watched[1].add(name)
            return get(self, name)

        try:
            reader = type(cls)(cls.__name__, (cls,), {
                "__getattribute__": __getattribute__, "__module__": cls.__module__,
                "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
        except Exception:   # noqa: BLE001 - a class that refuses subclasses: its reads unseen
            reader = None
        _READERS[cls] = reader
        return reader


def _by_traced_code(module: nn.Module, frame) -> bool:
    """Whether a read from ``frame`` comes from code the trace holds: up through the module's own
    methods (and torch's wrappers around them), the first other code decides (fx's and
    evoplug's bookkeeping do not count), unless a call of the module (torch.nn's machinery:
    ``_call_impl``, ``__repr__``) is found first, where the module runs for real."""
    while frame is not None:
        code, where = frame.f_code, frame.f_globals.get("__name__", "")
        if code.co_argcount and frame.f_locals.get(code.co_varnames[0]) is module:
            if where == "torch.nn.modules.module":
                return False
        elif where.startswith(_OWN):
            return False
        elif not where.startswith("torch."):
            return True
        frame = frame.f_back
    return False
