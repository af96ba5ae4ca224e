"""Label-free distillation with MMEngine's Runner (the MMPretrain form of :func:`evoplug.distill`).

``EvoDistillClassifier`` is an :class:`EvoImageClassifier` whose training loss is the
distillation loss from the dense model: a frozen copy of the classifier's weights as the run
starts (after ``load_from``), run at keep 1.0 (the original forward). Labels are not read, so
the training set can be an image folder without classes (``CustomDataset(with_label=False)``).
Its state_dict is the classifier's (the teacher is not a submodule), so the checkpoints load
strictly into the dense ``ImageClassifier``; validation and prediction are the classifier's.

``EvoDistillHook`` takes the teacher snapshot in ``before_train`` (after the Runner loaded
``load_from``) and refuses a resumed run whose teacher would otherwise be the partly distilled
weights: set ``distill=dict(teacher_checkpoint=...)`` (the dense checkpoint) to resume.

    _base_ = ['./evo-deit-tiny_mnist5k.py']
    model = dict(type='EvoDistillClassifier', distill=dict(temperature=1.0))
    custom_hooks = [dict(type='EvoDistillHook')]
    train_dataloader = dict(dataset=dict(data_prefix='unlabeled', with_label=False))
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

import evoplug
from evoplug.quality import kd_loss
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmpretrain.registry import MODELS

from .models import EvoImageClassifier

DISTILL_KEYS = frozenset({"temperature", "teacher_checkpoint", "loss_weight"})


@MODELS.register_module()
class EvoDistillClassifier(EvoImageClassifier):
    """``EvoImageClassifier`` trained by the dense model on unlabeled images.

    Args (besides EvoImageClassifier's):
        distill (dict): ``temperature`` (1.0) of the KL loss on the logits (scaled by T^2);
            ``loss_weight`` (1.0); ``teacher_checkpoint`` (None): a checkpoint of the dense
            classifier to teach with; by default the classifier's own weights when training
            starts.
    """

    def __init__(self, *args, distill: Optional[dict] = None, **kwargs):
        distill = dict(distill or {})
        unknown = set(distill) - DISTILL_KEYS
        if unknown:
            raise TypeError(f"EvoDistillClassifier: unknown key(s) in distill=dict(...): "
                            f"{sorted(unknown)}; allowed: {sorted(DISTILL_KEYS)}")
        super().__init__(*args, **kwargs)
        self.temperature = float(distill.get("temperature", 1.0))
        self.kd_weight = float(distill.get("loss_weight", 1.0))
        self.teacher_checkpoint = distill.get("teacher_checkpoint")
        if self.temperature <= 0:
            raise ValueError(f"distill temperature must be > 0, got {self.temperature}")
        self.__dict__["_teacher"] = None      # not a submodule: not in state_dict, not in DDP

    @property
    def teacher(self):
        return self.__dict__["_teacher"]

    def set_teacher(self, resumed: bool = False) -> None:
        """Freeze the teacher: ``teacher_checkpoint`` loaded into a copy, else a copy of the
        current weights (refused for a resumed run: those are no longer the dense ones)."""
        t = copy.deepcopy(self)
        t.__dict__["_teacher"] = None
        if self.teacher_checkpoint:
            from mmengine.runner import load_checkpoint
            load_checkpoint(t, self.teacher_checkpoint, map_location="cpu", strict=True,
                            revise_keys=[(r"^module\.", "")])
            source = self.teacher_checkpoint
        elif resumed:
            raise RuntimeError("EvoDistillClassifier: a resumed distillation needs "
                               "distill=dict(teacher_checkpoint=...) (the dense checkpoint the run "
                               "started from); the current weights are already partly distilled")
        else:
            source = "the weights training starts from"
        evoplug.set_options(t.backbone, keep_ratio=1.0, identity_fast_path=True)
        t.eval()
        t.requires_grad_(False)
        self.__dict__["_teacher"] = t
        print_log(f"evoplug: distillation teacher = dense forward of {source}", logger="current")

    def loss(self, inputs, data_samples):
        if self.teacher is None:
            self.set_teacher()
        teacher = self.teacher
        if next(teacher.parameters()).device != inputs.device:
            teacher.to(inputs.device)
        with torch.no_grad():
            target = teacher.head(teacher.extract_feat(inputs)).float()
        logits = self.head(self.extract_feat(inputs)).float()
        kd = kd_loss(logits, target, self.temperature)
        agree = (logits.argmax(-1) == target.argmax(-1)).float().mean()
        return {"loss_kd": kd * self.kd_weight, "agreement": agree.detach()}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()      # the teacher stays in eval mode
        return self


@HOOKS.register_module()
class EvoDistillHook(Hook):
    """Takes the distillation teacher after the Runner loaded ``load_from`` (or resumed)."""

    priority = "VERY_HIGH"

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not isinstance(model, EvoDistillClassifier):
            raise TypeError(f"EvoDistillHook needs model type EvoDistillClassifier, got {type(model).__name__}")
        model.set_teacher(resumed=runner.iter > 0)
