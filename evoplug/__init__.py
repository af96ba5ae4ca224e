"""evoplug: Evo-ViT slow-fast token evolution for existing vision transformers.

    fast = evoplug.convert(model, keep_ratio=0.5)
    print(evoplug.explain(fast))
    best = evoplug.plan(model, images, target_speedup=1.4).best      # measured on your images
    fast = evoplug.convert(model, **best.options())
    evoplug.distill(fast, images, steps=300)                          # label-free, in place
"""
from . import integrations  # noqa: F401  registers evoplug's own model families
from . import quality  # noqa: F401  agreement with the dense model (outputs, agreement, top1)
from .api import convert, example_input, input_size, revert, set_keep_ratio, set_options
from .report import ConversionReport, explain, get_report, is_converted, tokens_per_block
from .errors import AnalysisError, ConversionError, EvoplugError
from .integrations.registry import (FamilyHints, register_family, register_leaf_function,
                                    register_leaf_module)
from .options import EvoOptions
from .tools.distill import DistillResult, distill
from .tools.plan import PlanError, PlanResult, plan

__version__ = "0.1.0"

__all__ = ["convert", "explain", "set_options", "set_keep_ratio", "revert", "get_report",
           "tokens_per_block", "is_converted", "input_size", "example_input", "EvoOptions",
           "ConversionReport", "FamilyHints", "register_family", "register_leaf_module",
           "register_leaf_function", "EvoplugError", "ConversionError", "AnalysisError",
           "distill", "DistillResult", "plan", "PlanResult", "PlanError", "__version__"]
