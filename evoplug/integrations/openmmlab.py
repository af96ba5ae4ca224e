"""Evo backbones in MMSegmentation's and MMDetection's registries: their own transformer
backbones converted by evoplug at build time, as ``evoplug.mm`` does for MMPretrain's
(``type='EvoSwinTransformer', evo=dict(keep_ratio=0.5, input_size=...)``). MMPretrain's Evo
backbones work in their configs too, by scope: ``type='mmpretrain.EvoVisionTransformer'``.

Public paths: ``evoplug.mmseg`` and ``evoplug.mmdet`` (for ``custom_imports``; on a machine with
mmcv-lite only, ``evoplug.integrations.mmcv_ops`` first)."""
from __future__ import annotations

from typing import Dict, List

from .mmpretrain.models import evo_backbone_class

#: backbone class names converted and registered, per framework (the paths they import from)
MMSEG = {"VisionTransformer": "mmseg.models.backbones", "MixVisionTransformer": "mmseg.models.backbones",
         "SwinTransformer": "mmseg.models.backbones"}
MMDET = {"SwinTransformer": "mmdet.models.backbones", "PyramidVisionTransformerV2": "mmdet.models.backbones"}


def _register(registry, classes: Dict[str, str]) -> List[str]:
    import importlib
    names = []
    for cls_name, module in classes.items():
        evo_name = f"Evo{cls_name}"
        if evo_name not in registry.module_dict:
            cls = getattr(importlib.import_module(module), cls_name)
            registry.register_module(name=evo_name)(evo_backbone_class(cls))
        names.append(evo_name)
    return names


def register_mmseg() -> List[str]:
    """Register ``Evo<Backbone>`` into MMSegmentation's ``MODELS``; returns their names."""
    from mmseg.registry import MODELS
    return _register(MODELS, MMSEG)


def register_mmdet() -> List[str]:
    """Register ``Evo<Backbone>`` into MMDetection's ``MODELS``; returns their names."""
    from mmdet.registry import MODELS
    return _register(MODELS, MMDET)
