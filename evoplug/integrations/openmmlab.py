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


class _Classes:
    """Where pickle finds a framework's Evo backbone classes (``__qualname__``
    ``mmseg_classes.EvoSwinTransformer`` in this module: their names are MMPretrain's own Evo
    classes' too, so the whole models did not pickle until the eighteenth session). An attribute
    asked for before the registration (unpickling in a fresh process) registers them."""

    def __init__(self, name: str, register: str):
        self._name, self._register = name, register
        self.__module__ = __name__

    def __reduce__(self):
        # pickle's protocols below 4 save a dotted name as getattr(parent, name), the parent by
        # reference: this module's own object, not a copy
        return self._name

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        globals()[self._register]()
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(name) from None


mmseg_classes = _Classes("mmseg_classes", "register_mmseg")
mmdet_classes = _Classes("mmdet_classes", "register_mmdet")


def _register(registry, classes: Dict[str, str], where: str) -> List[str]:
    import importlib
    names = []
    for cls_name, module in classes.items():
        evo_name = f"Evo{cls_name}"
        if evo_name not in registry.module_dict:
            try:
                package = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if "mmcv._ext" not in str(e):
                    raise
                raise ImportError(
                    f"{module} needs mmcv's compiled ops ({e}), which mmcv-lite does not have: "
                    "import evoplug.integrations.mmcv_ops first, e.g. custom_imports=dict("
                    f"imports=['evoplug.integrations.mmcv_ops', 'evoplug.{where[:5]}']) (docs/mmpretrain.md, "
                    "'MMSegmentation and MMDetection without a compiled mmcv')") from e
            evo = evo_backbone_class(getattr(package, cls_name))
            evo.__module__, evo.__qualname__ = __name__, f"{where}.{evo_name}"
            setattr(globals()[where], evo_name, evo)
            registry.register_module(name=evo_name)(evo)
        names.append(evo_name)
    return names


def register_mmseg() -> List[str]:
    """Register ``Evo<Backbone>`` into MMSegmentation's ``MODELS``; returns their names."""
    from mmseg.registry import MODELS
    return _register(MODELS, MMSEG, "mmseg_classes")


def register_mmdet() -> List[str]:
    """Register ``Evo<Backbone>`` into MMDetection's ``MODELS``; returns their names."""
    from mmdet.registry import MODELS
    return _register(MODELS, MMDET, "mmdet_classes")
