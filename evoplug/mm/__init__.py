"""evoplug for OpenMMLab's MMPretrain (mmengine >= 0.10, mmpretrain >= 1.2, mmcv-lite).

Importing this package (directly, or through ``custom_imports=dict(imports=['evoplug.mm'])``,
which evoplug's base config sets) registers into MMPretrain's ``MODELS`` registry:

* ``EvoImageClassifier``: an ImageClassifier whose backbone is converted by evoplug at build
  time (``model = dict(type='EvoImageClassifier', evo=dict(keep_ratio=0.5))``), with the
  paper's training extras as options;
* ``EvoVisionTransformer``, ``EvoDistilledVisionTransformer``, ``EvoLeViT``,
  ``EvoSwinTransformer``: converted backbones for configs that build a backbone alone (dense
  tasks);
* ``EvoDistillClassifier`` and the hook ``EvoDistillHook``: label-free distillation from the
  dense model with the Runner (:mod:`evoplug.integrations.mmpretrain.distill`);
* the hook ``EvoOptionsHook``: evoplug options that change at given epochs of training, e.g.
  the authors' schedule of selecting in every block first and once per stage later
  (:mod:`evoplug.integrations.mmpretrain.hooks`);

and makes MMEngine load its own checkpoints on torch >= 2.6 with ``weights_only=True`` and a
short allow-list (:mod:`evoplug.mm.checkpoint`).

and registers ``CpuBf16OptimWrapper`` (``--amp`` on CPUs) into MMEngine's ``OPTIM_WRAPPERS``.

Train: ``python -m evoplug.mm.train CONFIG`` (or MMPretrain's ``tools/train.py``); distributed:
``torchrun --nproc_per_node N -m evoplug.mm.train CONFIG --launcher pytorch``.
"""
import sys

try:
    import mmengine  # noqa: F401
    import mmpretrain  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"evoplug.mm needs MMPretrain ({e}): pip install 'evoplug[mm]', i.e. "
                      "mmengine mmcv-lite mmpretrain 'setuptools<81' (mmcv-lite, not mmcv)") from e

from evoplug.integrations.mmpretrain.compat import multimodal_off  # noqa: E402

multimodal_off()      # MMPretrain's multi-modal models need transformers 4 (see compat.py)
from evoplug.integrations.mmpretrain import checkpoint, models  # noqa: E402
from evoplug.integrations.mmpretrain.models import (  # noqa: E402
    EvoDistilledVisionTransformer, EvoImageClassifier, EvoLeViT, EvoSwinTransformer,
    EvoVisionTransformer, LearnableTradeOff, convert_backbone, evo_backbone_class, example_input)

checkpoint.install()
from evoplug.integrations.mmpretrain.distill import EvoDistillClassifier, EvoDistillHook  # noqa: E402
from evoplug.integrations.mmpretrain.hooks import EvoOptionsHook  # noqa: E402
from evoplug.integrations.mmpretrain.train import register_optim_wrappers  # noqa: E402

CpuBf16OptimWrapper = register_optim_wrappers()
# ``import evoplug.mm.checkpoint`` / ``evoplug.mm.models`` keep working
sys.modules[__name__ + ".checkpoint"] = checkpoint
sys.modules[__name__ + ".models"] = models

__all__ = ["EvoImageClassifier", "EvoVisionTransformer", "EvoDistilledVisionTransformer",
           "EvoLeViT", "EvoSwinTransformer", "LearnableTradeOff", "convert_backbone", "evo_backbone_class",
           "example_input", "checkpoint", "CpuBf16OptimWrapper", "EvoDistillClassifier",
           "EvoDistillHook", "EvoOptionsHook"]
