"""Gradients of a fuzzed model (benchmarks/fuzz_flat.py, fuzz_pyramids.py ``--grads``): a
training step's parameter gradients through the converted model against those through the
fuzzer's independent reference (autograd through its plain torch ops, the attention rows
detached: they rank tokens, docs/guarantees.md), and at keep 1.0 through the selection
machinery against the dense model's.

In float64 and train mode (dropout and drop-path at 0), loss ``(out * w).sum()`` with a fixed
random ``w``. The scores stay float32 in both (evoplug's rule), so the representative token's
weights differ by float32 rounding and the outputs by about 1e-8..1e-6 (relative): the
gradients then differ by up to about 20 times that (measured, the reference against itself
with its rows rounded otherwise), and more in parameters whose gradient is a cancellation (a
key's bias, a head's constant logit bias: zero but for rounding, as softmax ignores them). A
gradient is compared relative to its largest entry, or to 1e-2 of the model's largest where it
is smaller. ``grad_ok``: the gradients within 1000 times the outputs' difference (the largest
ratios seen: 184 in 950 flat seeds, 65 in 502 pyramids, 328 at keep 1.0; docs/models.md; 1e-9
where the outputs agree exactly), and so at keep 1.0 through the machinery against the dense
model (exact to about 1e-13, unless the model itself rounds to float32: a softmax in float32
sums the tokens in another order there). A backward that drops a term (a detached
representative token) gives ratios of 1e5 to 1e8 (checked by planting one)."""
import copy
from typing import Callable, Dict, Tuple

import torch
from torch import nn

import evoplug

GRAD_RATIO = 1000.0
TOP_FLOOR = 1e-2
GRAD_FLOOR = 1e-9


def gradients(model: nn.Module, run: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, Dict]:
    """The output of ``run()`` and the parameters' gradients of ``(out * w).sum()``."""
    model.zero_grad(set_to_none=True)
    out = run()
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    (out * w).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), got


def worst(got: Dict, want: Dict) -> Tuple[float, str]:
    """The largest relative difference of two gradient sets and its parameter (inf where one set
    lacks a parameter the other has)."""
    top = max((v.abs().max().item() for v in want.values()), default=0.0)
    bad, name = 0.0, None
    for n in sorted(set(got) | set(want)):
        if n not in got or n not in want:
            return float("inf"), n
        d = (got[n] - want[n]).abs().max().item() / max(want[n].abs().max().item(), TOP_FLOOR * top,
                                                         1e-30)
        if d > bad:
            bad, name = d, n
    return bad, name


def record(model: nn.Module, x: torch.Tensor,
           convert: Callable[[nn.Module, torch.Tensor], nn.Module],
           reference: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Dict:
    """The gradient fields of a fuzz row: ``convert(m, x)`` converts a model with the seed's
    options, ``reference(m, x)`` is the reference's output with autograd."""
    m, x = copy.deepcopy(model).double().train(), x.double()
    for mod in m.modules():
        if hasattr(mod, "p") and isinstance(getattr(mod, "p"), float):   # dropout, drop-path
            mod.p = 0.0
    fast = convert(m, x)
    dense_out, dense = gradients(m, lambda: m(x))
    ref_out, ref = gradients(m, lambda: reference(m, x))
    out, got = gradients(fast, lambda: fast(x))
    out_diff = ((out - ref_out).abs().max() / ref_out.abs().max()).item()
    diff, name = worst(got, ref)
    evoplug.set_keep_ratio(fast, 1.0)
    evoplug.set_options(fast, identity_fast_path=False)
    out1, got1 = gradients(fast, lambda: fast(x))
    out1_diff = ((out1 - dense_out).abs().max() / dense_out.abs().max()).item()
    keep1, name1 = worst(got1, dense)
    return {"grad_vs_reference": diff, "grad_worst_param": name, "out64_vs_reference": out_diff,
            "grad_keep1_machinery": keep1, "grad_keep1_worst_param": name1,
            "out64_keep1_machinery": out1_diff,
            "grad_ok": diff <= max(GRAD_RATIO * out_diff, GRAD_FLOOR) and
            keep1 <= max(GRAD_RATIO * out1_diff, GRAD_FLOOR)}
