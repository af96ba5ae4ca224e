"""The attention maps a block's own forward computes, read apart from evoplug's analysis and
runtime: a ``TorchFunctionMode`` that sees the block's calls of ``softmax``,
``scaled_dot_product_attention`` and ``multi_head_attention_forward`` (``nn.MultiheadAttention``
and PyTorch's encoder layers: the mode turns their fused fast paths off) and keeps, for each
self-attention over the call's tokens, the pre-softmax logits in float64. ``evoplug check``
rebuilds the global attention rows from them (the class token's query, or the mean of the
patch queries) and with them the score update the runtime should have made.

Only the maps of the calls made at the block's own level of the forward are seen (a mode does
not see the calls inside a function it hands on); a block whose attention is computed
elsewhere (a custom autograd function, a compiled kernel) shows no map and is not compared.
"""
from __future__ import annotations

import inspect
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class AttentionMaps(TorchFunctionMode):
    """``with AttentionMaps(n) as maps: block(x)``: ``maps.logits`` holds a float64 tensor
    (..., n, n) for each self-attention over ``n`` tokens the forward computed."""

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.logits: List[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SOFTMAX:
            self._softmax(*args, **kwargs)
        elif func is F.scaled_dot_product_attention:
            self._sdpa(*args, **kwargs)
        elif func is F.multi_head_attention_forward:
            self._mha(args, kwargs)
        return func(*args, **kwargs)

    def _keep(self, logits: torch.Tensor):
        if logits.dim() >= 3 and logits.shape[-2:] == (self.tokens, self.tokens):
            self.logits.append(logits.detach().double())

    def _softmax(self, x, dim=None, *args, **kwargs):
        dim = kwargs.get("dim", dim)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and dim is not None and \
                dim % max(x.dim(), 1) == x.dim() - 1:
            self._keep(x)

    def _sdpa(self, q, k, v=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        if is_causal:
            return
        if enable_gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        logits = q.double() @ k.double().transpose(-2, -1) * scale
        self._keep(_masked(logits, attn_mask, keep_where_true=True))

    def _mha(self, args, kwargs):
        """The per-head weights of the same call (``need_weights``, not averaged), as logits up
        to a constant per row: log-probabilities (the softmax of a row, and of the mean of rows,
        is the same shifted by a constant)."""
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.arguments.update(need_weights=True, average_attn_weights=False)
        with torch.no_grad():
            weights = F.multi_head_attention_forward(*bound.args, **bound.kwargs)[1]
        if weights is not None:
            self._keep(weights.double().log())


def _masked(logits: torch.Tensor, mask: Optional[torch.Tensor], keep_where_true: bool):
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask if keep_where_true else mask, float("-inf"))
    return logits + mask.double()


def global_row(logits: torch.Tensor, images: int, num_prefix: int, query: str) -> Optional[torch.Tensor]:
    """The global attention row (images, n) of a map's logits (images * ..., n, n), mean over
    the heads: of query 0 (``query='cls'``) or of the mean of the queries after the
    ``num_prefix`` first (``'mean'``). None where the map has masked entries in those rows."""
    n = logits.shape[-1]
    rows = logits.reshape(images, -1, n, n)
    rows = rows[:, :, :1] if query == "cls" else rows[:, :, num_prefix:]
    if not bool(torch.isfinite(rows).all()):
        return None
    return rows.mean(-2).softmax(-1).mean(1)
