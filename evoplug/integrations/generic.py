"""Attribute conventions many hand-written models share (most copied from timm), asked for
every model after the families' own hints: ``num_prefix_tokens`` / ``num_extra_tokens``, a
``cls_token`` attribute (None: no class token), ``has_class_token``, ``patch_embed.img_size``
or ``img_size`` (``image_size``: torchvision, open_clip) with ``in_chans``."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .registry import FamilyHints, InputSize, int_attribute


def _num_prefix_tokens(model: nn.Module) -> Optional[int]:
    for attr in ("num_prefix_tokens", "num_extra_tokens"):
        v = int_attribute(attr)(model)
        if v is not None:
            return v
    return None


def _has_class_token(model: nn.Module) -> Optional[bool]:
    """The shallowest module with a ``cls_token`` attribute (NaFlexViT keeps it on ``embeds``)
    says: None means there is none; or a ``has_class_token`` flag."""
    for _, m in model.named_modules():      # pre-order: the model itself first
        flag = getattr(m, "has_class_token", None)
        if isinstance(flag, bool):
            return flag
        if hasattr(m, "cls_token"):
            return getattr(m, "cls_token") is not None
    return None


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _input_size(model: nn.Module) -> Optional[InputSize]:
    chans = getattr(model, "in_chans", None)
    chans = chans if isinstance(chans, int) else None
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        if chans is None and getattr(pe, "backbone", None) is None:   # not a hybrid's features
            proj = getattr(pe, "proj", None)
            chans = getattr(proj, "in_channels", None)
        h, w = _pair(pe.img_size)
        return chans, int(h), int(w), "`patch_embed.img_size`"
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if cfg.get("input_size"):
        c, h, w = cfg["input_size"]
        return c, int(h), int(w), "`pretrained_cfg['input_size']`"
    if getattr(model, "img_size", None) is not None:
        h, w = _pair(model.img_size)
        return chans, int(h), int(w), "`model.img_size`"
    # torchvision's VisionTransformer (an int, asserted in its forward), open_clip's (a pair)
    size = getattr(model, "image_size", None)
    if isinstance(size, int) or isinstance(size, (tuple, list)) and len(size) == 2 and \
            all(isinstance(v, int) for v in size):
        h, w = _pair(size)
        return chans, h, w, "`model.image_size`"
    return None


GENERIC = FamilyHints(
    name="attributes",
    num_prefix_tokens=_num_prefix_tokens,
    has_class_token=_has_class_token,
    input_size=_input_size,
)
