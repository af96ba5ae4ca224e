"""timm's conventions, as hints (see registry.py): the notrace registry (module classes and
functions torch.fx should keep whole), the data config (input size and channels) and the
class/prefix token attributes. timm is imported only when asked."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import nn

from .registry import FamilyHints, InputSize, bool_attribute, int_attribute


def is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def _notrace_modules() -> Tuple[type, ...]:
    try:
        from timm.layers import get_notrace_modules
    except ImportError:
        return ()
    return tuple(get_notrace_modules())


def _notrace_functions() -> Tuple:
    try:
        from timm.layers import get_notrace_functions
    except ImportError:
        return ()
    return tuple(get_notrace_functions())


def _input_size(model: nn.Module) -> Optional[InputSize]:
    """The size the model was built for (``patch_embed.img_size``; timm's data config keeps
    the pretrained size when ``img_size=`` changed it), channels from the patch embedding's
    convolution (``in_chans=1``: the data config keeps the pretrained 3), else (a hybrid's, whose
    convolution reads its backbone's features) from the data config."""
    from timm.data import resolve_model_data_config
    chans, h, w = resolve_model_data_config(model)["input_size"]
    for where in ("", "model.", "body."):    # features_only wrappers hold `model` (FeatureGetterNet)
        holder = getattr(model, where[:-1], None) if where else model    # or `body` (FeatureHookNet)
        embed = getattr(holder, "patch_embed", None)
        size = getattr(embed, "img_size", None)
        if size is not None:
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            proj = getattr(embed, "proj", None)
            if getattr(embed, "backbone", None) is None:    # (a hybrid's proj reads features)
                chans = getattr(proj, "in_channels", chans)
            return chans, int(h), int(w), f"`{where}patch_embed.img_size` (timm)"
    return chans, int(h), int(w), "timm's data config (`resolve_model_data_config`)"


TIMM = FamilyHints(
    name="timm",
    matches=is_timm,
    num_prefix_tokens=int_attribute("num_prefix_tokens"),
    has_class_token=bool_attribute("has_class_token"),
    input_size=_input_size,
    leaf_modules=_notrace_modules,
    leaf_functions=_notrace_functions,
)
