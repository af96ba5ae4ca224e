"""Configs shipped inside the evoplug package.

MMPretrain / MMEngine (old-style configs). mmengine's ``pkg::path`` form only knows the
OpenMMLab packages of its hard-coded table, so evoplug's base is named by its file path. A
``_base_`` entry is a Python expression that mmengine evaluates, so a user's config can ask the
installed package where it is (works from any directory, for regular and editable installs,
with ``python -m evoplug.mm.train`` and with MMPretrain's own ``tools/train.py``)::

    _base_ = [
        'mmpretrain::deit/deit-small_4xb256_in1k.py',
        __import__('evoplug.configs').configs.MMPRETRAIN_BASE,
    ]
    model = dict(type='EvoImageClassifier', evo=dict(keep_ratio=0.5))

This module only builds paths; importing it imports the ``evoplug`` package (and torch) first.
"""
import os

CONFIG_ROOT = os.path.dirname(os.path.abspath(__file__))

#: evoplug's base config for MMPretrain: ``custom_imports`` of ``evoplug.mm``
MMPRETRAIN_BASE = os.path.join(CONFIG_ROOT, "mmpretrain", "evoplug_runtime.py")


def config_path(*parts: str) -> str:
    """Absolute path of a config shipped with evoplug, e.g. ``config_path('mmpretrain',
    'evoplug_runtime.py')``; raises FileNotFoundError if there is none."""
    path = os.path.join(CONFIG_ROOT, *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"evoplug ships no config {os.path.join(*parts)!r} "
                                f"(looked in {CONFIG_ROOT})")
    return path
