"""User-facing options of a conversion (shared by every converted block of one model).

The options object is shared, so changing ``keep_ratio`` (or any other field) on a converted
model takes effect at the next forward, without re-converting: see :func:`evoplug.set_options`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional


def check_keep_ratio(keep_ratio) -> float:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    keep_ratio = float(keep_ratio)
    if not (0.0 < keep_ratio <= 1.0) or math.isnan(keep_ratio):
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    return keep_ratio


@dataclasses.dataclass
class EvoOptions:
    """Options of the slow-fast token evolution.

    keep_ratio: fraction of the patch tokens that take the slow (full) update in an evolving
        block; ``1.0`` reproduces the original model exactly.
    start_block: index (among the converted blocks, in execution order) of the first evolving
        block. ``None`` -> the first third of the blocks stays dense (``len(blocks) // 3``,
        blocks 5-12 of 12 evolve for DeiT, as in the paper). Must be >= 1: the block before it
        provides the first global class attention.
    trade_off: alpha of the global attention update ``g = (1 - alpha) * g + alpha * a``; a
        float in [0, 1], or a callable returning alpha (a learnable trade-off, e.g. a module
        computing ``sigmoid(w)``; called at each update, so gradients reach ``w``).
    reselect_every: re-run the top-k selection every this many evolving blocks (1 = every
        block; 4 = per "stage" of four blocks as in the authors' DeiT code).
    representative: summarise the non-selected tokens into one representative token whose
        update is broadcast to them (fast update). ``False`` = the "placeholder" variant: the
        non-selected tokens are carried unchanged.
    num_prefix_tokens: override the detected number of leading prefix tokens (cls,
        distillation, registers).
    global_query: which query ranks the tokens: ``'cls'`` (the class token, query 0, as in
        the paper), ``'mean'`` (the mean query of the patch tokens: its attention row, for
        models without a class token) or ``'auto'`` (cls when there is one).
    identity_fast_path: with keep_ratio == 1.0 run each block's original forward (bit-exact,
        no overhead). ``False`` runs the selection machinery even at 1.0 (all tokens selected,
        gathered and scattered back): used by tests to check that path reproduces the model.
    """

    keep_ratio: float = 0.5
    start_block: Optional[int] = None
    trade_off: float = 0.5
    reselect_every: int = 1
    representative: bool = True
    num_prefix_tokens: Optional[int] = None
    global_query: str = "auto"
    identity_fast_path: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self):
        self.keep_ratio = check_keep_ratio(self.keep_ratio)
        if not callable(self.trade_off) and not (0.0 <= float(self.trade_off) <= 1.0):
            raise ValueError(f"trade_off must be in [0, 1], got {self.trade_off!r}")
        if int(self.reselect_every) < 1:
            raise ValueError(f"reselect_every must be >= 1, got {self.reselect_every!r}")
        if self.start_block is not None and int(self.start_block) < 1:
            raise ValueError(
                "start_block must be >= 1: the block before the first evolving block scores "
                f"the tokens (got {self.start_block!r})")
        if self.global_query not in ("auto", "cls", "mean"):
            raise ValueError(f"global_query must be 'auto', 'cls' or 'mean', got {self.global_query!r}")
        if self.num_prefix_tokens is not None and int(self.num_prefix_tokens) < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {self.num_prefix_tokens!r}")
