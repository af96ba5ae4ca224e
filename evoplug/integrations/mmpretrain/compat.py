"""MMPretrain 1.2 next to transformers 5: MMPretrain turns its multi-modal models (BLIP, Flamingo,
LLaVA, ...) on when ``transformers>=4.28`` and ``pycocotools`` are installed (mmdet brings
pycocotools), and their code needs transformers 4.x: ``import mmpretrain.models`` then fails
(``TypeError: NoneType takes no arguments`` in ``blip/language_model.py``), and with it
``evoplug.mm``, ``mmdet.models`` and ``mmseg.models``. :func:`multimodal_off` makes MMPretrain
register its placeholders for those models instead (they raise "requires extra multi-modal
dependencies" when built), as it does when the dependencies are missing. Must run before
``mmpretrain.models`` is imported; ``evoplug.mm`` and ``evoplug.integrations.mmcv_ops`` call it."""
from __future__ import annotations

import sys


def multimodal_off() -> bool:
    """Switch MMPretrain's multi-modal models off when transformers >= 5 is installed and
    ``mmpretrain.models`` is not imported yet. Returns whether it did."""
    if "mmpretrain.models" in sys.modules:
        return False
    try:
        from importlib.metadata import version
        major = int(version("transformers").split(".")[0])
    except Exception:  # noqa: BLE001 - not installed, or an unparsable version: nothing to do
        return False
    if major < 5:
        return False
    from mmpretrain.utils import dependency
    dependency.WITH_MULTIMODAL = False
    return True
