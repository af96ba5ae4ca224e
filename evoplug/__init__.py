"""evoplug: Evo-ViT slow-fast token evolution for existing vision transformers.

    fast = evoplug.convert(model, keep_ratio=0.5)
    print(evoplug.explain(fast))
"""
from .api import (ConversionReport, convert, explain, get_report, is_converted, revert,
                  set_keep_ratio, set_options, tokens_per_block)
from .errors import AnalysisError, ConversionError, EvoplugError
from .options import EvoOptions

__version__ = "0.1.0"

__all__ = ["convert", "explain", "set_options", "set_keep_ratio", "revert", "get_report",
           "tokens_per_block", "is_converted", "EvoOptions", "ConversionReport", "EvoplugError",
           "ConversionError", "AnalysisError", "__version__"]
