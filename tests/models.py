"""The models the core must convert, at small inputs where the model allows."""
import timm
import torch

from plain_vit import PlainViT

# name -> (factory kwargs, input size, expected prefix tokens)
TIMM_MODELS = {
    "vit_tiny_patch16_224": (dict(), 224, 1),
    "vit_small_patch16_224": (dict(img_size=112), 112, 1),
    "vit_base_patch16_224": (dict(img_size=64), 64, 1),
    "deit_tiny_patch16_224": (dict(), 224, 1),
    "deit_small_patch16_224": (dict(img_size=112), 112, 1),
    "deit_tiny_distilled_patch16_224": (dict(img_size=112), 112, 2),
    "deit3_small_patch16_224": (dict(img_size=112), 112, 1),
    "beit_base_patch16_224": (dict(img_size=64), 64, 1),
    "eva02_tiny_patch14_224": (dict(), 224, 1),
    "cait_xxs24_224": (dict(img_size=112), 112, 0),
    "vit_small_patch14_reg4_dinov2": (dict(img_size=56), 56, 5),
}


def build(name, **extra):
    if name == "plain_vit":
        return PlainViT(**extra), 32, 1
    kwargs, size, prefix = TIMM_MODELS[name]
    return timm.create_model(name, pretrained=False, **kwargs, **extra), size, prefix


ALL = list(TIMM_MODELS) + ["plain_vit"]
