"""One eager forward on an example input that records, for every module, how it was called.

This is what makes the fx analysis work on models it was not written for: it tells which
modules run attention (softmax / scaled_dot_product_attention / nn.MultiheadAttention) and how
many times, the arguments each module was called with (so a block can be traced with its real
call pattern, e.g. EVA's ``rope=`` tensor or BEiT's ``shared_rel_pos_bias=None``), the token
count N at each block and the patch grid (for the number of prefix tokens).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

ATTENTION_FUNCTIONS = {
    F.softmax, torch.softmax, torch.Tensor.softmax,
    F.scaled_dot_product_attention,
    F.multi_head_attention_forward,
}


@dataclasses.dataclass
class ModuleCall:
    name: str
    order: int                       # position of the (first) call in execution order
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    output: Any = None
    n_calls: int = 0
    attention_ops: int = 0           # attention computations run while this module ran (all calls)
    grid_ops: int = 0                # leaf modules run on a 4-D (B, C, H, W) map inside this one

    @property
    def attention_per_call(self) -> float:
        return self.attention_ops / max(1, self.n_calls)


class _AttentionCounter(TorchFunctionMode):
    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.recorder
        if func in ATTENTION_FUNCTIONS and rec.inside_attention == 0:
            rec.count_attention()
            rec.inside_attention += 1
            try:
                return func(*args, **kwargs)
            finally:
                rec.inside_attention -= 1
        return func(*args, **kwargs)


class _Recorder:
    def __init__(self, model: nn.Module):
        self.calls: Dict[int, ModuleCall] = {}
        self.stack: List[int] = []
        self.inside_attention = 0
        self.order = 0
        self.names = {id(m): n for n, m in model.named_modules()}

    def count_attention(self):
        for mid in self.stack:
            self.calls[mid].attention_ops += 1

    def pre(self, module, args, kwargs):
        mid = id(module)
        c = self.calls.get(mid)
        if c is None:
            c = self.calls[mid] = ModuleCall(self.names.get(mid, "?"), self.order, args, dict(kwargs))
        self.order += 1
        c.n_calls += 1
        if next(module.children(), None) is None and any(
                isinstance(a, torch.Tensor) and a.dim() == 4 for a in args):
            for outer in self.stack:      # e.g. a depthwise conv inside an MLP, PVT's sr conv
                self.calls[outer].grid_ops += 1
        self.stack.append(mid)
        if isinstance(module, nn.MultiheadAttention):  # its fast path may bypass the functions
            if self.inside_attention == 0:
                self.count_attention()
            self.inside_attention += 1

    def post(self, module, args, kwargs, output):
        mid = id(module)
        if isinstance(module, nn.MultiheadAttention):
            self.inside_attention -= 1
        if self.stack and self.stack[-1] == mid:
            self.stack.pop()
        c = self.calls[mid]
        if c.n_calls == 1:
            c.output = output


def calibrate(model: nn.Module, example_input) -> Dict[int, ModuleCall]:
    """Run ``model(example_input)`` once (eval, no grad) and record every module call."""
    rec = _Recorder(model)
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(rec.pre, with_kwargs=True))
        handles.append(m.register_forward_hook(rec.post, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _AttentionCounter(rec):
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            elif isinstance(example_input, dict):
                model(**example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return rec.calls


def default_example_input(model: nn.Module, batch: int = 1) -> Optional[torch.Tensor]:
    """An image batch of the model's input size, when the model says what that is
    (timm's ``patch_embed.img_size`` / ``pretrained_cfg['input_size']``, ``img_size``)."""
    size = None
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        hw = pe.img_size
        hw = (hw, hw) if isinstance(hw, int) else tuple(hw)
        chans = getattr(getattr(pe, "proj", None), "in_channels", 3)
        size = (chans, *hw)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        if cfg.get("input_size"):
            size = tuple(cfg["input_size"])
    if size is None and getattr(model, "img_size", None) is not None:
        hw = model.img_size
        hw = (hw, hw) if isinstance(hw, int) else tuple(hw)
        size = (getattr(model, "in_chans", 3), *hw)
    if size is None:
        return None
    p = next((q for q in model.parameters() if q.is_floating_point()), None)
    device = p.device if p is not None else "cpu"
    dtype = p.dtype if p is not None else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn((batch, *size), generator=gen).to(device=device, dtype=dtype)
