"""The plain tensor attributes a block's forward reads in Python (fifty-fourth session).

A tensor set as a plain attribute (``self.thr = torch.tensor(1.0)`` in ``__init__``: neither
parameter nor buffer) that the forward uses in a tensor op is read by the trace through a
``get_attr`` node, and its programs follow a replacement. One the forward reads in Python
(``if self.thr > 0:``, ``self.idx.tolist()``) is evaluated on the real tensor while tracing,
unseen by the trace: its programs keep what it held at the conversion. Those are found here by
perturbing each such tensor and running the block eagerly on the calibration input; the
runtime then refuses a call once one was replaced or changed in place (runtime/spec.py
``BlockSpec.python_tensors``). Until then a change by hand was neither followed nor refused:
1.41 off the dense model at keep 1.0 off the fast path, in a probe.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from .calibrate import ModuleCall
from .probes import hooks_suspended
from .snapshot import restore, snapshot


def _candidates(module: nn.Module, gm: fx.GraphModule) -> List[Tuple[str, str, nn.Module]]:
    """(path, name, module) of the non-empty plain tensors of ``module`` and its submodules
    that the trace does not read through a ``get_attr`` node."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    out = []
    for path, m in module.named_modules():
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.numel() \
                    and not k.startswith("_evo") and (f"{path}.{k}" if path else k) not in read:
                out.append((path, k, m))
    return out


def _perturbed(t: torch.Tensor) -> List[torch.Tensor]:
    """Other values of ``t`` that take the other side of a sign test, an equality or a
    threshold in most branches (``if t > c``, ``if t == c``, ``if t``)."""
    with torch.no_grad():
        if t.dtype == torch.bool:
            return [~t]
        return [-t - 1, t + 1000, t - 1000]


def python_read_tensors(module: nn.Module, call: ModuleCall, gm: fx.GraphModule) -> Tuple:
    """(path, name, tensor) of the plain tensor attributes of ``module`` and its submodules
    (not parameters, buffers, or tensors its trace reads by ``get_attr``) on whose value the
    block's output depends: another value changes its eager output on the calibration input
    (or makes it raise). Tensors its forward sets or changes in place are left out (its
    programs set them too). The model's state is put back after."""
    found = _candidates(module, gm)
    if not found:
        return ()
    saved, was = snapshot(module), module.training

    def run():
        args, kwargs = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                                (call.args, call.kwargs))
        return [t.clone() for t in tree_leaves(module(*args, **kwargs)) if isinstance(t, torch.Tensor)]

    module.eval()
    try:
        with torch.no_grad(), hooks_suspended(module):
            before = [(p, k, m, m.__dict__[k], m.__dict__[k]._version) for p, k, m in found]
            ref = run()
            kept = [(p, k, m, t) for p, k, m, t, v in before
                    if m.__dict__.get(k) is t and t._version == v]
            return tuple((p, k, t) for p, k, m, t in kept if _reads(m, k, t, run, ref))
    finally:
        restore(saved)
        module.train(was)


def _reads(m: nn.Module, k: str, t: torch.Tensor, run, ref) -> bool:
    """Whether another value of ``m.k`` (``t``) changes the output of ``run`` from ``ref``."""
    try:
        for other in _perturbed(t):
            m.__dict__[k] = other
            try:
                out = run()
            except Exception:  # noqa: BLE001 - its value decides what the forward does
                return True
            if len(out) != len(ref) or any(a.shape != b.shape or not torch.equal(a, b)
                                           for a, b in zip(out, ref)):
                return True
        return False
    finally:
        m.__dict__[k] = t
