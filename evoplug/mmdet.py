"""evoplug for MMDetection: importing this (``custom_imports=dict(imports=['evoplug.mmdet'])``)
registers ``EvoSwinTransformer`` and ``EvoPyramidVisionTransformerV2`` (mmdet's own backbones,
converted at build time) into mmdet's ``MODELS``. Also registers evoplug.mm's types. See
:mod:`evoplug.integrations.openmmlab`."""
import evoplug.mm  # noqa: F401  (first: MMPretrain's multi-modal switch, see mmpretrain/compat.py)
from evoplug.integrations.openmmlab import register_mmdet

REGISTERED = register_mmdet()
