"""``evoplug.mm``: the public path of the MMPretrain integration (configs import it with
``custom_imports=dict(imports=['evoplug.mm'])``); the code lives in
:mod:`evoplug.integrations.mmpretrain`."""
import sys

from evoplug.integrations import mmpretrain as _impl
from evoplug.integrations.mmpretrain import *  # noqa: F401,F403
from evoplug.integrations.mmpretrain import checkpoint, models  # noqa: F401

sys.modules[__name__ + ".checkpoint"] = checkpoint
sys.modules[__name__ + ".models"] = models
__all__ = _impl.__all__
