"""MMPretrain model types whose backbone is converted by evoplug when the registry builds them.

* ``EvoImageClassifier``: an :class:`mmpretrain.models.ImageClassifier` (a subclass: same
  ``backbone``/``neck``/``head`` attributes and state_dict keys) whose backbone is converted in
  place by :func:`evoplug.convert` right after it is built, plus the paper's training extras as
  options (mean-token head, auxiliary cls-token head, learnable trade-off).
* ``EvoVisionTransformer``, ``EvoDistilledVisionTransformer``, ``EvoLeViT``,
  ``EvoSwinTransformer``: the MMPretrain
  backbones, converted in ``__init__``; for configs that build a backbone alone (mmdet, mmseg,
  feature extraction): ``backbone=dict(type='mmpretrain.EvoVisionTransformer', evo=dict(...))``.

Conversion happens at build time, so before the optimizer is built, before ``init_weights``
(``init_cfg``), ``load_from`` and resume, and before EMAHook copies the model. It adds no
parameter to the backbone: a dense checkpoint loads strictly.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

import evoplug
from evoplug.options import CONVERSION_FIELDS, EvoOptions, check_flag

from mmengine.logging import print_log
from mmpretrain.models.backbones import (DistilledVisionTransformer, LeViT, SwinTransformer,
                                         VisionTransformer)
from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.registry import MODELS

#: keys of ``evo=dict(...)`` passed to :class:`evoplug.EvoOptions`
OPTION_KEYS = frozenset(f.name for f in dataclasses.fields(EvoOptions))
#: keys of ``evo=dict(...)`` for the conversion itself
CONVERT_KEYS = frozenset({"input_size", "strict"})
#: keys of ``evo=dict(...)`` for the classifier's training extras
EXTRA_KEYS = frozenset({"learnable_trade_off", "mean_token_head", "aux_cls_head"})


def is_converted(module: nn.Module) -> bool:
    return evoplug.is_converted(module)


def example_input(backbone: nn.Module, input_size=None) -> torch.Tensor:
    """A (1, C, H, W) calibration image for an MMPretrain backbone: ``input_size`` (int or
    (H, W)) if given, else what the backbone declares (:func:`evoplug.input_size`: its
    ``img_size``, its patch embedding's ``init_input_size``), else 224; channels from its
    first convolution."""
    if input_size is None and evoplug.input_size(backbone) is None:
        input_size = 224
    return evoplug.example_input(backbone, size=input_size)


def _split_evo(evo: Optional[Dict[str, Any]], allowed, where: str) -> Dict[str, Any]:
    if evo is not None and not isinstance(evo, Mapping):
        raise TypeError(f"{where}: evo must be a dict of options (evo=dict(keep_ratio=0.5, ...)), "
                        f"got {type(evo).__name__} {evo!r}")
    evo = dict(evo or {})
    unknown = set(evo) - set(allowed)
    if unknown:
        raise TypeError(f"{where}: unknown key(s) in evo=dict(...): {sorted(unknown)}; allowed: "
                        f"{sorted(allowed)}")
    size = evo.get("input_size")
    if size is not None and not (_is_side(size) or (isinstance(size, (tuple, list)) and
                                                     len(size) == 2 and all(map(_is_side, size)))):
        raise TypeError(f"{where}: evo input_size must be a positive int or an (H, W) pair of "
                        f"positive ints, got {type(size).__name__} {size!r}")
    return evo


def _is_side(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def convert_backbone(backbone: nn.Module, *, input_size=None, strict: bool = True,
                     **options) -> nn.Module:
    """Convert an MMPretrain backbone in place with evoplug's own analysis (the same object,
    same parameters and state_dict keys). ``options``: fields of :class:`evoplug.EvoOptions`."""
    x = example_input(backbone, input_size)
    # analyse in eval mode (the registry builds models in train mode): modules whose train()
    # adds or drops cached tensors (MMPretrain LeViT's attention-bias cache `ab`) are then
    # traced in the state their eval program reads; every module's mode is restored afterwards,
    # parents first, by its own train() (a backbone's frozen stages stay in eval mode: one
    # backbone.train(was) put them in train mode, their dropout on; audit V, twenty-fifth session)
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    try:
        evoplug.convert(backbone, inplace=True, example_input=x, strict=strict, **options)
    finally:
        for m, training in modes:
            if m.training != training:
                m.train(training)
    return backbone


class LearnableTradeOff(nn.Module):
    """The learnable trade-off of the global attention update: ``alpha = sigmoid(logit)``
    (Evo-LeViT). Called with no argument it returns alpha; evoplug reads it at every update,
    and gradients reach ``logit`` through the representative token's weights."""

    def __init__(self, init: float = 0.5):
        super().__init__()
        init = float(init)
        if not 0.0 < init < 1.0:
            raise ValueError(f"a learnable trade-off starts strictly inside (0, 1), got {init}")
        self.logit = nn.Parameter(torch.tensor(math.log(init / (1.0 - init))))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)

    def extra_repr(self) -> str:
        return f"alpha=sigmoid(logit)={float(torch.sigmoid(self.logit.detach())):.4f}"


def _flag(value, name: str) -> bool:
    """An on/off setting of the config: a bool (``'False'`` or ``'no'`` read as true turned
    the extras on until the thirty-seventh session; audit V9)."""
    return check_flag(f"EvoImageClassifier: evo.{name}", value)


def _refuse_conversion_keys(backbone: nn.Module, evo: dict, input_size, strict):
    """Options a conversion reads, given to a classifier whose backbone converted itself when it
    was built: refused, pointing to the backbone's own ``evo`` (the refusal of ``global_query``
    pointed to Python, not to the config; audit Y3 of the thirty-ninth session)."""
    read = [k for k in evo if k in CONVERSION_FIELDS] + \
        (["input_size"] if input_size is not None else []) + ([] if strict is True else ["strict"])
    if read:
        verb = "is" if len(read) == 1 else "are"
        raise ValueError(
            f"EvoImageClassifier: evo {' / '.join(read)} {verb} read by a conversion, and the "
            f"backbone ({type(backbone).__name__}) converted itself when it was built: set them "
            "in the backbone's own evo=dict(...)")


def _refuse_conflicting_options(backbone: nn.Module, backbone_cfg, evo: dict):
    """Options that the classifier's ``evo`` and the self-converted backbone's own ``evo`` both
    set, to different values: refused, naming both (the classifier's silently replaced the
    backbone's until audit E1 of the forty-first session)."""
    own = backbone_cfg.get("evo") if isinstance(backbone_cfg, Mapping) else None
    options = evoplug.get_report(backbone).options
    clash = [k for k in evo if k in (own or {}) and
             getattr(options.replace(**{k: evo[k]}), k) != getattr(options, k)]
    if clash:
        ours = ", ".join(f"{k}={evo[k]!r}" for k in clash)
        theirs = ", ".join(f"{k}={own[k]!r}" for k in clash)
        raise ValueError(
            f"EvoImageClassifier: evo {ours} differs from the backbone's own evo=dict(...) "
            f"({type(backbone).__name__}: {theirs}), which converted it: set each option in one "
            "place (a derived config may need model.evo's key removed, e.g. with _delete_=True)")


def _learnable_trade_off(evo: dict, own: EvoOptions) -> LearnableTradeOff:
    """``learnable_trade_off=True``: alpha starts at evo's ``trade_off``, else at the one in force
    (``own``: a self-converted backbone's options, or the defaults)."""
    if evo.get("representative", own.representative) is False:
        # (alpha reaches the loss only through the representative token's weights: without
        # it `w` never got a gradient, without a word, until audit E1 of the forty-first session)
        raise ValueError("EvoImageClassifier: learnable_trade_off=True needs the representative "
                         "token (representative=False leaves alpha without a gradient: it "
                         "reaches the loss only through the representative token's weights)")
    return LearnableTradeOff(evo.get("trade_off", own.trade_off))


@MODELS.register_module()
class EvoImageClassifier(ImageClassifier):
    """``ImageClassifier`` with an Evo-ViT backbone.

    Args (besides ImageClassifier's):
        evo (dict): conversion settings:

            * fields of :class:`evoplug.EvoOptions`: ``keep_ratio`` (0.5), ``start_block``,
              ``trade_off``, ``reselect_every``, ``representative``, ``global_query``,
              ``num_prefix_tokens``, ``identity_fast_path``;
            * ``input_size``: calibration image size (default: the backbone's ``img_size``);
              ``strict`` (True): refuse a backbone with a block evoplug cannot convert;
            * training extras of the paper (all off by default):

              - ``learnable_trade_off=True``: alpha = sigmoid(w), ``w`` a parameter of the
                classifier (``evo_trade_off.logit``, outside the backbone), initialised so
                that alpha = ``trade_off``;
              - ``mean_token_head=True``: the head reads the mean of the patch tokens (after
                the final norm) instead of the cls token, in training and evaluation (ViT
                backbones with a single-token head: VisionTransformerClsHead, LinearClsHead);
              - ``aux_cls_head=dict(loss_weight=1.0, head=dict(...), init_from_head=True)``
                (or ``True``): a training-only head on the cls token next to the mean-token
                head (needs ``mean_token_head``); its config is the model's ``head`` updated
                with ``head``; the losses are logged as ``mean_token_loss`` and
                ``aux_cls_loss`` (``loss``: their sum, the one optimised).

    State dict: ``backbone.*``, ``neck.*``, ``head.*`` exactly as ``ImageClassifier``; the
    extras add ``evo_trade_off.logit`` and ``aux_head.*``. A checkpoint without the extras (a
    dense checkpoint) still loads strictly: those keys are forgiven as a group when *all* of
    them are missing, the trade-off keeps its initial value and, with ``init_from_head``, the
    auxiliary head starts as a copy of the loaded main head (the dense model's cls-token head).
    """

    def __init__(self, backbone: dict, neck: Optional[dict] = None, head: Optional[dict] = None,
                 *, evo: Optional[dict] = None, **kwargs):
        evo = _split_evo(evo, OPTION_KEYS | CONVERT_KEYS | EXTRA_KEYS, "EvoImageClassifier")
        learnable = _flag(evo.pop("learnable_trade_off", False), "learnable_trade_off")
        mean_head = _flag(evo.pop("mean_token_head", False), "mean_token_head")
        aux = evo.pop("aux_cls_head", None)
        if aux is not None and not isinstance(aux, dict):
            aux = _flag(aux, "aux_cls_head (a bool or a dict)")
        input_size = evo.pop("input_size", None)
        strict = _flag(evo.pop("strict", True), "strict")
        super().__init__(backbone=backbone, neck=neck, head=head, **kwargs)

        converted = is_converted(self.backbone)     # e.g. type='EvoVisionTransformer' as the backbone
        if converted:
            _refuse_conversion_keys(self.backbone, evo, input_size, strict)
            _refuse_conflicting_options(self.backbone, backbone, evo)
        # the options in force where evo sets none: the backbone's own, if it converted itself
        own = evoplug.get_report(self.backbone).options if converted else EvoOptions()
        if learnable:
            self.evo_trade_off = _learnable_trade_off(evo, own)
            evo["trade_off"] = self.evo_trade_off
        if converted:
            if evo:
                evoplug.set_options(self.backbone, **evo)
        else:
            if input_size is None and isinstance(backbone, Mapping):
                # (the config's img_size: LeViT keeps none on the module, and was calibrated at
                # 224 px whatever the config said; audit V, twenty-fifth session)
                input_size = backbone.get("img_size")
            convert_backbone(self.backbone, input_size=input_size, strict=strict, **evo)

        self.mean_token_head = mean_head
        self.aux_head = None
        self.aux_loss_weight = 1.0
        self.aux_init_from_head = True
        self._mean_norm = False
        if mean_head:
            bb = self.backbone
            if getattr(bb, "out_type", None) not in ("cls_token", "avg_featmap", "raw") \
                    or not hasattr(bb, "num_extra_tokens"):
                raise ValueError(f"mean_token_head needs a ViT-style backbone with out_type "
                                 f"and num_extra_tokens (got {type(bb).__name__})")
            if bb.num_extra_tokens > 1:
                raise ValueError(
                    f"mean_token_head replaces a single-token head by the mean patch token; "
                    f"{type(bb).__name__} has {bb.num_extra_tokens} extra tokens (a distilled "
                    "DeiT's head reads the class and the distillation token): leave it off")
            # an 'avg_featmap' backbone normalises its mean patch token with its own `ln2`,
            # which the classifier then applies (it was skipped: keep 1.0 was off by 0.6)
            self._mean_norm = bb.out_type == "avg_featmap"
            bb.out_type = "raw"      # (B, N, C) tokens; the classifier pools them
        if aux:
            if not mean_head:
                raise ValueError("aux_cls_head is the auxiliary cls-token head *next to* the "
                                 "mean-token head: set mean_token_head=True too")
            if getattr(self.backbone, "cls_token", None) is None:
                raise ValueError("aux_cls_head needs a backbone with a cls token")
            if head is None:
                raise ValueError("aux_cls_head is built from the model's `head` config: set one")
            aux = dict(aux) if isinstance(aux, dict) else {}
            self.aux_loss_weight = float(aux.pop("loss_weight", 1.0))
            self.aux_init_from_head = _flag(aux.pop("init_from_head", True), "aux_cls_head.init_from_head")
            aux_cfg = copy.deepcopy(head)
            aux_cfg.update(aux.pop("head", {}))
            if aux:
                raise TypeError(f"aux_cls_head: unknown key(s) {sorted(aux)}")
            self.aux_head = MODELS.build(aux_cfg)
        self.register_load_state_dict_post_hook(_load_extras_hook)

    # ------------------------------------------------------------------ token heads
    def _pool(self, outs: Tuple[torch.Tensor, ...]):
        """Raw token outputs -> (mean patch token per output, cls token of the last one)."""
        P = self.backbone.num_extra_tokens
        means = tuple(t[:, P:].mean(1) for t in outs)
        if getattr(self, "_mean_norm", False):
            means = tuple(self.backbone.ln2(m) for m in means)
        return means, outs[-1][:, 0]

    def extract_feat(self, inputs, stage="neck"):
        if not self.mean_token_head:
            return super().extract_feat(inputs, stage)
        assert stage in ("backbone", "neck", "pre_logits"), f'Invalid stage "{stage}"'
        feats, _ = self._pool(self.backbone(inputs))
        if stage == "backbone":
            return feats
        if self.with_neck:
            feats = self.neck(feats)
        if stage == "neck":
            return feats
        return self.head.pre_logits(feats)

    def loss(self, inputs, data_samples):
        if self.aux_head is None:
            return super().loss(inputs, data_samples)
        feats, cls = self._pool(self.backbone(inputs))
        if self.with_neck:
            feats = self.neck(feats)
        # no bare `loss` key: MMEngine's parse_losses logs the total under `loss`, and a head's
        # own `loss` key would overwrite it in the log (the optimised sum stays right)
        losses = {f"mean_token_{k}": v for k, v in self.head.loss(feats, data_samples).items()}
        for k, v in self.aux_head.loss((cls,), data_samples).items():
            losses[f"aux_cls_{k}"] = v * self.aux_loss_weight if "loss" in k else v
        return losses


def _load_extras_hook(module: EvoImageClassifier, incompatible_keys) -> None:
    """Forgive the training extras' keys when a checkpoint has none of them (dense checkpoint).

    Runs for ``nn.Module.load_state_dict`` and MMEngine's ``load_state_dict`` (``load_from``,
    ``init_cfg=dict(type='Pretrained')`` at the classifier level). A checkpoint that has *some*
    of a group's keys is left to fail as usual.
    """
    missing = incompatible_keys.missing_keys
    groups = []
    if hasattr(module, "evo_trade_off"):
        groups.append(("evo_trade_off", module.evo_trade_off))
    if module.aux_head is not None:
        groups.append(("aux_head", module.aux_head))
    for name, sub in groups:
        rel = [f"{name}.{k}" for k in sub.state_dict()]
        prefix = None
        for k in missing:
            m = re.match(rf"^((?:.*\.)?){re.escape(rel[0])}$", k)
            if m:
                prefix = m.group(1)
                break
        if prefix is None:
            continue
        full = [prefix + r for r in rel]
        if not all(k in missing for k in full):
            continue
        for k in full:
            missing.remove(k)
        note = "kept its initial value"
        if name == "aux_head" and module.aux_init_from_head:
            head_keys = [f"{prefix}head.{k}" for k in module.head.state_dict()]
            same = {k: v.shape for k, v in module.head.state_dict().items()} == \
                {k: v.shape for k, v in sub.state_dict().items()}
            if same and not any(k in missing for k in head_keys):
                sub.load_state_dict(module.head.state_dict())
                note = "initialised from the loaded `head` (the dense cls-token head)"
        print_log(f"evoplug: `{prefix}{name}` is not in the checkpoint (a dense checkpoint); {note}",
                  logger="current")


def _built_size(cls: type, module, args, kwargs):
    """The image size a backbone was built for, from its arguments: MMPretrain's and mmseg's
    ViT ``img_size``, mmdet's and mmseg's Swin ``pretrain_img_size`` (given or the default);
    None where it takes neither."""
    try:
        bound = inspect.signature(cls.__init__).bind(module, *args, **kwargs)
    except TypeError:
        return kwargs.get("img_size")
    bound.apply_defaults()
    for name in ("img_size", "pretrain_img_size"):
        if bound.arguments.get(name) is not None:
            return bound.arguments[name]
    return None


def evo_backbone_class(cls: type) -> type:
    """``Evo<cls>``: the MMPretrain backbone class ``cls`` converted by evoplug in ``__init__``
    (an extra ``evo=dict(...)`` argument: EvoOptions fields, ``input_size``, ``strict``)."""

    def __init__(self, *args, evo: Optional[dict] = None, **kwargs):
        evo = _split_evo(evo, OPTION_KEYS | CONVERT_KEYS, f"Evo{cls.__name__}")
        cls.__init__(self, *args, **kwargs)
        input_size = evo.pop("input_size", None) or _built_size(cls, self, args, kwargs)
        convert_backbone(self, input_size=input_size, **evo)

    return type(f"Evo{cls.__name__}", (cls,), {
        "__init__": __init__, "__module__": __name__,
        "__doc__": f"MMPretrain's {cls.__name__}, converted by evoplug at build time "
                   f"(``evo=dict(keep_ratio=0.5, ...)``). Same parameters and state_dict keys."})


EvoVisionTransformer = MODELS.register_module()(evo_backbone_class(VisionTransformer))
EvoDistilledVisionTransformer = MODELS.register_module()(evo_backbone_class(DistilledVisionTransformer))
EvoLeViT = MODELS.register_module()(evo_backbone_class(LeViT))
EvoSwinTransformer = MODELS.register_module()(evo_backbone_class(SwinTransformer))
