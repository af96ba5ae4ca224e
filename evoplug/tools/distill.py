"""Label-free distillation: the dense model teaches its converted form on unlabeled images.

    fast = evoplug.convert(model, keep_ratio=0.5)
    result = evoplug.distill(fast, images, steps=300)     # trains ``fast`` in place
    torch.save(fast.state_dict(), "evo.pth")                # the same keys as the dense model

The teacher is, by default, the converted model's own weights as they are when ``distill`` is
called, run at keep 1.0 (the original forward): its logits (and the features asked for) are
computed once on every image before the first step, so no second copy of the model is made.
With ``augment`` (a batch transform) or ``mixup`` (each batch blended with itself reversed,
weight ~ Beta(mixup, mixup), the teacher seeing the same blend: "consistent" distillation,
Beyer et al. 2022), targets change every step, so a frozen copy of those weights is made instead. A ``teacher`` module may also be given (a larger model, the dense
checkpoint); it runs on every batch, in eval mode.

Loss: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` on the logits, plus, with ``features``
(names of submodules, e.g. the final norm), ``feature_weight`` times the mean squared error of
their outputs (the converted model restores the token order at the end, so a final norm's
tokens line up with the teacher's). AdamW, linear warm-up then cosine decay, gradient clipping.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import evoplug

from ..errors import EvoplugError


@dataclasses.dataclass
class DistillResult:
    """What :func:`distill` did: the (same, trained in place) model, the loss of every step,
    the teacher used, and the wall time (targets included)."""
    model: nn.Module
    losses: List[float]
    teacher: str
    seconds: float

    @property
    def steps(self) -> int:
        return len(self.losses)


@contextlib.contextmanager
def dense(model: nn.Module):
    """The converted ``model`` running its original forward (keep 1.0) inside the block."""
    old = evoplug.get_report(model).options
    evoplug.set_options(model, keep_ratio=1.0, identity_fast_path=True)
    try:
        yield model
    finally:
        evoplug.set_options(model, keep_ratio=old.keep_ratio, identity_fast_path=old.identity_fast_path)


class _Captured:
    """Outputs of named submodules of a model during its forward (forward hooks)."""

    def __init__(self, model: nn.Module, names: Sequence[str], who: str):
        mods = dict(model.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise EvoplugError(f"distill: {who} has no submodule {missing[0]!r} to match features at")
        self.values: Dict[str, torch.Tensor] = {}
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, output):
            self.values[name] = evoplug.quality.logits_of(output, name) if not isinstance(output, torch.Tensor) \
                else output
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _schedule(steps: int, warmup: float) -> Callable[[int], float]:
    w = max(1, int(round(steps * warmup)))
    return lambda i: (i + 1) / w if i < w else 0.5 * (1 + math.cos(math.pi * (i - w) / max(1, steps - w)))


@torch.no_grad()
def _targets(teacher: nn.Module, images: torch.Tensor, features: Sequence[str], batch: int):
    """The teacher's logits and feature outputs on every image (eval mode, on the CPU)."""
    cap = _Captured(teacher, features, "the teacher") if features else None
    logits, feats = [], {n: [] for n in features}
    dev = evoplug.quality.device_of(teacher)
    was = teacher.training
    teacher.eval()              # (a model built from a config is in train mode: no dropout here)
    try:
        for i in range(0, len(images), batch):
            logits.append(evoplug.quality.logits_of(teacher(images[i:i + batch].to(dev)), "the teacher").float().cpu())
            for n in features:
                feats[n].append(cap.values[n].float().cpu())
    finally:
        teacher.train(was)
        if cap:
            cap.remove()
    return torch.cat(logits), {n: torch.cat(v) for n, v in feats.items()}


class _Precomputed:
    """The model's own dense forward as teacher: logits (and features) of every image, once."""

    def __init__(self, model: nn.Module, x: torch.Tensor, features: Sequence[str], batch: int):
        with dense(model):
            self.logits, self.feats = _targets(model, x, features, batch)
        self.name = "its own weights at keep 1.0 (targets computed once)"

    def __call__(self, idx: torch.Tensor, xb: torch.Tensor):
        """(the batch the student sees, teacher logits, teacher features)"""
        return xb, self.logits[idx].to(xb.device), {n: v[idx].to(xb.device) for n, v in self.feats.items()}

    def close(self):
        pass


class _Live:
    """A teacher run on every batch, after ``augment`` and ``mixup`` (the same images as the
    student's): a given module, or a frozen dense copy of the model."""

    def __init__(self, model, teacher, features, augment, mixup: float, seed: int):
        self.was = None
        if teacher is None:
            teacher = evoplug.revert(copy.deepcopy(model)).requires_grad_(False)
            self.name = "a frozen copy of its own weights (dense)"
        elif teacher is model:
            raise EvoplugError("distill: the teacher is the model it trains (run at its keep ratio, "
                               "not dense): pass teacher=None (a frozen dense copy) or another module")
        else:
            # (run under no_grad, in eval mode for the steps; its parameters keep their
            # requires_grad: one it shares with the model is trained, and after distill the
            # teacher is as it was; until the twenty-sixth session both were frozen for good)
            self.name, self.was = type(teacher).__name__, teacher.training
        teacher.eval()      # (not chained: MMPretrain's backbones' train() returns None)
        self.teacher = teacher
        self.features, self.augment, self.mixup = features, augment, mixup
        self.rng = random.Random(seed)
        self.cap = _Captured(teacher, features, "the teacher") if features else None

    def __call__(self, idx: torch.Tensor, xb: torch.Tensor):
        if self.augment is not None:
            xb = self.augment(xb)
        if self.mixup:     # the teacher sees the same blend (consistent targets)
            lam = self.rng.betavariate(self.mixup, self.mixup)
            xb = lam * xb + (1 - lam) * xb.flip(0)
        with torch.no_grad():
            logits = evoplug.quality.logits_of(self.teacher(xb), "the teacher").float()
            feats = {n: self.cap.values[n].float() for n in self.features}
        return xb, logits, feats

    def close(self):
        if self.cap is not None:
            self.cap.remove()
        if self.was is not None:
            self.teacher.train(self.was)


def _check(model, steps, batch_size, temperature, mixup):
    if not evoplug.is_converted(model):
        raise EvoplugError("distill teaches a converted model: call evoplug.convert(model, ...) first "
                           "(the dense teacher is the converted model's own weights at keep 1.0)")
    evoplug.quality.check_classifier(model)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mixup < 0:
        raise ValueError(f"mixup must be >= 0, got {mixup}")


def distill(model: nn.Module, images, teacher: Optional[nn.Module] = None, *, steps: int = 300,
            batch_size: int = 32, lr: float = 5e-4, weight_decay: float = 0.05, warmup: float = 0.1,
            temperature: float = 1.0, features: Sequence[str] = (), feature_weight: float = 1.0,
            clip_grad: Optional[float] = 1.0, augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
            mixup: float = 0.0, max_images: Optional[int] = None, seed: int = 0,
            progress: bool = True) -> DistillResult:
    """Train the converted ``model`` (in place) to reproduce the dense model's predictions on
    unlabeled ``images`` (a (N, C, H, W) tensor, a Dataset or DataLoader of images, labels
    ignored). See the module docstring; returns a :class:`DistillResult`."""
    _check(model, steps, batch_size, temperature, mixup)
    features = tuple(features)
    x = evoplug.quality.as_image_tensor(images, max_images)
    t0 = time.perf_counter()
    was = model.training
    if teacher is None and augment is None and not mixup:
        source = _Precomputed(model, x, features, 2 * batch_size)
    else:
        source = _Live(model, teacher, features, augment, mixup, seed)
    s_cap = _Captured(model, features, "the model") if features else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    dev = evoplug.quality.device_of(model)
    losses: List[float] = []
    bar = _progress(steps, progress)
    model.train()
    try:
        for _ in range(steps):
            idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
            xb, tl, tf = source(idx, x[idx].to(dev))
            loss = evoplug.quality.kd_loss(evoplug.quality.logits_of(model(xb), "the model").float(), tl, temperature)
            for n in features:
                loss = loss + feature_weight * F.mse_loss(s_cap.values[n].float(), tf[n])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        model.train(was)
        source.close()
        if s_cap is not None:
            s_cap.remove()
        if bar is not None:
            bar.close()
    return DistillResult(model, losses, source.name, time.perf_counter() - t0)


def _progress(total: int, on: bool):
    if not on:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="evoplug distill", unit="step")
