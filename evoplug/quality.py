"""How close a converted model stays to the dense one on images: the measurements that
``convert(..., images=...)`` (``global_query='auto'``), :func:`evoplug.plan` and
:func:`evoplug.distill` share, and the distillation loss. Plain torch; no knowledge of the
conversion."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

#: images per forward when a measurement runs over a set of images
EVAL_BATCH = 64


def logits_of(output: Any, who: str = "the model") -> torch.Tensor:
    """The (B, classes) logits in a model's output: the tensor itself, ``.logits`` (transformers'
    outputs), a dict's ``'logits'``, or a tuple's first item. Anything else raises, naming what
    was returned: a backbone's feature maps have no prediction to agree on."""
    if isinstance(output, torch.Tensor):
        t = output
    elif hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        t = output.logits
    elif isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        t = output["logits"]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        t = output[0]
    else:
        raise TypeError(f"{who} returned {type(output).__name__}, not class logits: agreement "
                        "with the dense model (evoplug.plan, evoplug.distill) needs a classifier's "
                        "(batch, classes) logits")
    if t.dim() != 2:
        raise TypeError(f"{who} returned a tensor of shape {tuple(t.shape)}, not a classifier's "
                        "(batch, classes) logits")
    return t


def check_classifier(model: nn.Module, who: str = "the model") -> None:
    """Refuse a model built without its classifier head (timm's ``num_classes=0``): its 2-D
    output is pooled features, whose argmax is no prediction (it was taken for logits)."""
    if getattr(model, "num_classes", None) == 0:
        raise ValueError(f"{who} ({type(model).__name__}) has num_classes=0: it returns features, "
                         "not class logits, and agreement with the dense model (evoplug.plan, "
                         "evoplug.distill) needs a classifier's head")


def as_image_tensor(images: Any, limit: Optional[int] = None) -> torch.Tensor:
    """Images as one (N, C, H, W) tensor: a tensor as is; a Dataset, DataLoader or other
    iterable read once, each item a batch or one image, alone or first in a tuple/list (labels
    are ignored) or under ``'img'``/``'inputs'``/``'pixel_values'`` in a dict. ``limit`` caps N."""
    if isinstance(images, torch.Tensor):
        out = images
    else:
        parts, n = [], 0
        for item in _iterate(images):
            t = _image_of(item)
            t = t.unsqueeze(0) if t.dim() == 3 else t
            parts.append(t)
            n += len(t)
            if limit is not None and n >= limit:
                break
        if not parts:
            raise ValueError("no images: the image source yielded nothing")
        out = torch.cat(parts)
    if out.dim() != 4 or not out.is_floating_point():
        raise ValueError(f"images must be float (N, C, H, W), got {tuple(out.shape)} {out.dtype}")
    return out[:limit] if limit is not None else out


def _iterate(source) -> Iterable:
    if hasattr(source, "__getitem__") and hasattr(source, "__len__") and not isinstance(source, (list, tuple)):
        return (source[i] for i in range(len(source)))       # a map-style Dataset
    return iter(source)


def _image_of(item) -> torch.Tensor:
    if isinstance(item, dict):
        for key in ("img", "inputs", "pixel_values", "image"):
            if isinstance(item.get(key), torch.Tensor):
                return item[key]
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"an image source item must be a tensor (or a tuple/dict holding one), "
                        f"got {type(item).__name__}")
    return item


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def outputs(model: nn.Module, images: torch.Tensor, batch: int = EVAL_BATCH) -> torch.Tensor:
    """The model's logits on every image, in eval mode (its mode restored), on the CPU."""
    was = model.training
    model.eval()
    dev = device_of(model)
    try:
        return torch.cat([logits_of(model(images[i:i + batch].to(dev))).float().cpu()
                          for i in range(0, len(images), batch)])
    finally:
        model.train(was)


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of images on which the top-1 class equals the reference's."""
    return float((logits.argmax(-1) == reference.argmax(-1)).float().mean())


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels.to(logits.device)).float().mean())


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Distillation loss on logits: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
    mean over the batch (``evoplug.distill`` and the MMPretrain ``EvoDistillClassifier``)."""
    T = temperature
    return T * T * F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(teacher / T, -1),
                            reduction="batchmean", log_target=True)
