"""Opt-in stand-in for mmcv's compiled ops on machines that have only ``mmcv-lite``.

What it is: ``mmcv-lite`` is mmcv without its compiled extension ``mmcv._ext``. MMSegmentation
1.2 and MMDetection 3.3 import ``mmcv.ops`` when their ``models`` package is imported, and
``mmcv.ops`` loads ``mmcv._ext`` at import time, so neither imports at all without a compiled
mmcv (and no PyPI release of full mmcv has a wheel for torch 2.14; building it fails here).
:func:`install` puts a small module in ``sys.modules['mmcv._ext']``:

* ``nms`` (so also mmcv's ``batched_nms`` and the detectors' test-time NMS) is served by
  ``torchvision.ops.nms`` (``offset=0`` only, the mmdet 3.x default);
* ``roi_align_forward`` by ``torchvision.ops.roi_align`` (average pooling, inference); for
  training, configure ``RoIAlign(use_torchvision=True)``, which mmcv runs through torchvision
  with autograd and never reaches this module;
* every other compiled op raises, when called (not when imported), a ``RuntimeError`` that
  names the op and says it needs a compiled mmcv.

It is never active when a real ``mmcv._ext`` imports: :func:`install` then returns False and
changes nothing. Nothing installs it implicitly; call ``evoplug.integrations.mmcv_ops.install()``
(or put ``'evoplug.integrations.mmcv_ops'`` first in a config's ``custom_imports``, whose import
installs it) before importing ``mmseg.models`` / ``mmdet.models``.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

import torch

MODULE = "mmcv._ext"


class CompiledOpMissing(RuntimeError):
    """A compiled mmcv op was called on a machine with mmcv-lite and evoplug's stand-in."""


def _missing(name: str):
    def op(*args, **kwargs):
        raise CompiledOpMissing(
            f"mmcv op `{name}` needs a compiled mmcv (mmcv-lite has no `mmcv._ext`); evoplug's "
            "stand-in (evoplug.integrations.mmcv_ops) serves only nms and roi_align_forward "
            "through torchvision")
    op.__name__ = name
    return op


def nms(bboxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0):
    """mmcv's ``ext_module.nms``: indices of the kept boxes, by descending score."""
    if offset != 0:
        raise CompiledOpMissing("mmcv op `nms` with offset=1 (legacy box convention) needs a "
                                "compiled mmcv; torchvision's nms uses offset 0")
    from torchvision.ops import nms as tv_nms
    if bboxes.numel() == 0:
        return bboxes.new_zeros((0,), dtype=torch.long)
    return tv_nms(bboxes.float(), scores.float(), float(iou_threshold))


def roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height, aligned_width,
                      spatial_scale, sampling_ratio, pool_mode, aligned):
    """mmcv's ``ext_module.roi_align_forward`` (writes ``output`` in place), average pooling."""
    if pool_mode != 1:
        raise CompiledOpMissing("mmcv op `roi_align_forward` with max pooling needs a compiled "
                                "mmcv; torchvision's roi_align averages")
    from torchvision.ops import roi_align
    out = roi_align(input, rois, (aligned_height, aligned_width), spatial_scale,
                    sampling_ratio, aligned)
    output.copy_(out)
    return output


def roi_align_backward(*args, **kwargs):
    raise CompiledOpMissing("mmcv op `roi_align_backward` needs a compiled mmcv; train with "
                            "RoIAlign(use_torchvision=True) (torchvision's roi_align has autograd)")


_SERVED = {"nms": nms, "roi_align_forward": roi_align_forward,
           "roi_align_backward": roi_align_backward}


def _stand_in() -> types.ModuleType:
    mod = types.ModuleType(MODULE, "evoplug's stand-in for mmcv's compiled ops: "
                                   "evoplug.integrations.mmcv_ops")
    mod.__dict__.update(_SERVED)

    def __getattr__(name: str):        # every other op: present (mmcv's loader checks), raising
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(name)
    mod.__getattr__ = __getattr__
    mod.EVOPLUG_STAND_IN = True
    mod.__spec__ = importlib.machinery.ModuleSpec(MODULE, None)   # importlib.util.find_spec reads it
    return mod


def _late_names():
    """``mmcv.cnn.bricks.transformer`` re-exports ``MultiScaleDeformableAttention`` from
    ``mmcv.ops`` and skips it, with a warning, when ``mmcv.ops`` does not import: if it was
    imported before the stand-in (by ``mmpretrain.models``), the name is added now (mmdet and
    mmseg import it from there)."""
    bricks = sys.modules.get("mmcv.cnn.bricks.transformer")
    if bricks is not None and not hasattr(bricks, "MultiScaleDeformableAttention"):
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttention
        bricks.MultiScaleDeformableAttention = MultiScaleDeformableAttention


def installed() -> bool:
    """Whether the stand-in is the ``mmcv._ext`` in use."""
    return getattr(sys.modules.get(MODULE), "EVOPLUG_STAND_IN", False)


def install() -> bool:
    """Put the stand-in in place unless a compiled ``mmcv._ext`` imports. Returns whether the
    stand-in is in use."""
    if installed():
        return True
    try:
        importlib.import_module(MODULE)
        return False                        # a real compiled mmcv: never replaced
    except ImportError:
        pass
    import mmcv  # noqa: F401  (mmcv-lite must be there)
    sys.modules[MODULE] = _stand_in()
    _late_names()
    try:        # mmdet/mmseg import mmpretrain.models, which needs this next to transformers 5
        from .mmpretrain.compat import multimodal_off
        multimodal_off()
    except ImportError:
        pass
    return True


install()
