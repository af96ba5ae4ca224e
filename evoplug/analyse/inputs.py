"""The input evoplug runs a model on when it is not given one: the one place that infers it.

The size comes from the model's family (see evoplug/integrations: timm's built size and data
config, MMPretrain's ``img_size``, the ``patch_embed.img_size`` / ``img_size`` conventions);
missing channels are the first convolution's input channels, else 3.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..integrations.registry import InputSize, hint


def declared_input(model: nn.Module) -> Optional[InputSize]:
    """(channels, height, width, where it came from), or None when the model declares nothing."""
    answer, _ = hint(model, "input_size")
    if answer is None:
        return None
    chans, h, w, source = answer
    return int(chans if chans is not None else declared_channels(model)), int(h), int(w), source


def example_input(model: nn.Module, batch: int = 1,
                  size: Union[None, int, Tuple[int, int]] = None) -> Tuple[Optional[torch.Tensor], str]:
    """A seeded random image batch of the model's input size, in its parameters' device and
    dtype: (input, where the size came from); (None, reason) when the size is unknown.
    ``size`` (int or (H, W)) overrides the declared height and width. A video model (a family's
    ``input_frames`` hint) gets a video (batch, frames, C, H, W)."""
    decl = declared_input(model)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        chans = decl[0] if decl is not None else declared_channels(model)
        source = "the size given"
    elif decl is None:
        return None, "the model declares no input size"
    else:
        chans, h, w, source = decl
    p = next((q for q in model.parameters() if q.is_floating_point()), None)
    device = p.device if p is not None else "cpu"
    dtype = p.dtype if p is not None else torch.float32
    frames, _ = hint(model, "input_frames")
    shape = (batch, chans, int(h), int(w)) if frames is None else (batch, int(frames), chans, int(h), int(w))
    if frames is not None:
        source = f"{source} and {frames} frames"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return x, source


def declared_channels(model: nn.Module) -> int:
    """The first convolution's input channels (the stem's), else 3."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3
