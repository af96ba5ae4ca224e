"""MMPretrain's conventions, as hints (see evoplug/integrations/registry.py); needs no
MMPretrain to import: ``num_extra_tokens``, ``with_cls_token``, ``img_size`` /
``patch_embed.init_input_size``, and the first convolution's input channels."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..registry import FamilyHints, InputSize, bool_attribute, int_attribute


def is_mmpretrain(model: nn.Module) -> bool:
    return type(model).__module__.startswith(("mmpretrain.", "evoplug.integrations.mmpretrain"))


def _input_size(model: nn.Module) -> Optional[InputSize]:
    size, source = getattr(model, "img_size", None), "`img_size` (MMPretrain)"
    if size is None:
        size = getattr(getattr(model, "patch_embed", None), "init_input_size", None)
        source = "`patch_embed.init_input_size` (MMPretrain)"
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, (int, float)) else tuple(size)
    return None, int(h), int(w), source      # channels: the stem convolution's (inputs.py)


MMPRETRAIN = FamilyHints(
    name="mmpretrain",
    matches=is_mmpretrain,
    num_prefix_tokens=int_attribute("num_extra_tokens"),
    has_class_token=bool_attribute("with_cls_token"),
    input_size=_input_size,
)
