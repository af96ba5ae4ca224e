"""evoplug for MMSegmentation: importing this (``custom_imports=dict(imports=['evoplug.mmseg'])``)
registers ``EvoVisionTransformer``, ``EvoMixVisionTransformer`` (SegFormer's MiT) and
``EvoSwinTransformer`` (mmseg's own backbones, converted at build time) into mmseg's ``MODELS``.
Also registers evoplug.mm's types. See :mod:`evoplug.integrations.openmmlab`."""
import evoplug.mm  # noqa: F401  (first: MMPretrain's multi-modal switch, see mmpretrain/compat.py)
from evoplug.integrations.openmmlab import register_mmseg

REGISTERED = register_mmseg()
