"""A pre-flight check of a conversion: does the converted model do what evoplug promises?

    from evoplug.tools.check import check_conversion
    result = check_conversion(model)                  # model: the dense nn.Module (untouched)
    print(result)                                     # one line; result.problems lists failures

    evoplug check deit_small_patch16_224 swinv2_tiny_window8_256     # the same from the shell

The checks are the ones the test suite makes on its own models, run on yours (random or
trained weights, its declared input or ``example_input``; batch 2, float32, the model's device),
on every floating-point tensor the model returns (a backbone's feature maps, a tuple or dict of
outputs: each compared, the worst one reported):

* **keep 1.0** reproduces the model through the identity fast path and through the selection
  machinery (``identity_fast_path=False``): max |diff| <= ``keep1_bound``. The machinery sums
  in another order than the original; where that alone exceeds the bound (a model whose
  outputs are large, or that thresholds its own activations: EoMT's masked attention), the
  machinery is compared again in float64 (``keep1_float64_diff``, relative): within 1e-9 it is
  a warning, the same computation in float32's rounding; beyond, a problem;
* **keep** ``keep_ratio`` gives the original output's shape and finite values, and every block
  planned to evolve runs fewer tokens than it has (one that runs them all was reached by no
  global scores: a warning where the report's ``unscored`` says so, as ``explain()`` does, a
  problem where it does not);
* **batch independence**: the first image alone gives what it gave in the batch of two (a
  selection or copy that mixed the images of a batch would not), within ``batch_bound``
  (relative to the output's largest value);
* **the Evo-ViT update itself** (keep < 1): up to three evolving blocks of the plain kind (the
  block called on its tokens alone, no 2-D map, windows, position terms or scaled skip) are
  rebuilt from the paper's rules on each block's own input, independently of the runtime: the
  top-k patch tokens by the global scores the block received (images with a near-tie at the cut
  left out), the representative token (the non-kept tokens weighted by their scores), the
  block's original forward on [prefix, kept, representative], the kept tokens' outputs put back
  at their places and the representative token's residual added to every other token
  (``representative=False``: no representative token, the other tokens keep their values). The
  block's output must match (``evolution_diff``, relative). This runs with ``reselect_every=1``
  and every block restoring the order, so that
* **the global scores** those blocks receive are rebuilt too, from the block that ran just
  before each (the one that computes the first scores included): its input scores and the
  attention map its own original forward computes on the same tokens (read by
  :mod:`evoplug.tools.attention_maps`, apart from the runtime): the class token's or the mean
  query's row, averaged over the heads, ``g = (1 - alpha) g + alpha a`` at the kept tokens
  (``scores_diff``, relative; a block whose forward computes no such map, or more than one, is
  not compared);
* **hand-on** is checked too: the model's output with tokens handed on between blocks in the
  selection's order equals its output with every block restoring the order (``hand_on_diff``);
* the model's ``state_dict`` loads strictly into the converted model and back;
* **gradients** (train mode, loss: the sum of ``out.pow(2).mean()`` over the outputs): finite, and every parameter that gets a
  gradient in the original gets one in the converted model; at keep 1.0 through the selection
  machinery (eval mode: no dropout draws) they are the original's, within ``grad_bound``
  relative to the largest (``keep1_grad_diff``).

A model evoplug refuses is reported with the refusal (``result.refused``), not raised.

With random weights attention is nearly uniform and the global scores of neighbouring tokens
differ in the 6th or 7th digit: float rounding alone (another batch size's GEMM, Inductor's
summation order) can swap the k-th and (k+1)-th token and change the output a lot. The check
measures how fragile the selection is (input noise of 1e-3 of the input's scale, against the
original's change: ``noise_change``, ``selection_stable``); where it is fragile, a batch or
compile difference is a warning, not a problem. Compiled keep 1.0 through the machinery (no
selection to swap) is always compared strictly.
"""
from __future__ import annotations

import dataclasses
import time
from typing import List, Optional, Tuple

import torch
from torch import nn

import evoplug
from evoplug.copies import copy_model
from evoplug.options import read_trade_off

from .attention_maps import AttentionMaps, global_row


@dataclasses.dataclass
class CheckResult:
    """What :func:`check_conversion` found. ``status``: 'converts' (every block, no problem),
    'partly' (converted with ``strict=False``, no problem), 'refused', or 'WRONG' (problems);
    ``evoplug check`` adds 'failed' (the model could not be built or run; why in ``refused``)."""
    status: str
    refused: str = ""                  # the strict conversion's refusal, when there was one
    blocks: int = 0                    # converted blocks
    evolving: int = 0                  # of them evolving at keep_ratio
    not_converted: List[str] = dataclasses.field(default_factory=list)
    tokens_evolving: List[Tuple[int, int]] = dataclasses.field(default_factory=list)
    keep1_fast_diff: float = float("nan")
    keep1_machinery_diff: float = float("nan")
    keep1_float64_diff: float = float("nan")   # machinery vs original in float64 (relative), when
                                               # keep1_machinery_diff is over the bound
    batch_diff: float = float("nan")
    rel_change: float = float("nan")   # mean |converted - original| / mean |original| at keep_ratio
    convert_s: float = 0.0
    problems: List[str] = dataclasses.field(default_factory=list)
    warnings: List[str] = dataclasses.field(default_factory=list)   # checks that compared nothing
    # with compile=True: graphs dynamo makes of the converted forward, why it broke, and the
    # compiled output's max |diff| from the eager one at keep_ratio (relative to its scale)
    # the converted output's change under input noise of 1e-3 of the input's scale, against the
    # original's: with random weights attention is nearly uniform, scores differ in the 6th
    # digit, and float rounding alone can swap the k-th and (k+1)-th token; when the selection
    # is that fragile, batch and compile differences are warnings, not problems
    noise_change: float = float("nan")
    selection_stable: bool = True
    graphs: int = 0
    graph_breaks: List[str] = dataclasses.field(default_factory=list)
    compile_diff: float = float("nan")
    # the Evo-ViT update rebuilt from the paper's rules on plain evolving blocks (relative), and
    # how many blocks and images it compared; the output with tokens handed on between blocks
    # against every block restoring the order (relative)
    evolution_diff: float = float("nan")
    evolution_checked: Tuple[int, int] = (0, 0)
    hand_on_diff: float = float("nan")
    # the parameters' gradients at keep 1.0 through the machinery against the original's (eval
    # mode), the largest |diff| relative to the largest gradient
    keep1_grad_diff: float = float("nan")
    # the global scores blocks received against the ones rebuilt from the block before them
    # (its input scores and its own attention map, read by tools/attention_maps.py; relative),
    # and how many blocks' scores it compared
    scores_diff: float = float("nan")
    scores_checked: int = 0

    @property
    def ok(self) -> bool:
        return self.status in ("converts", "partly")

    def __str__(self) -> str:
        if self.status in ("refused", "failed"):
            return f"{self.status}: {self.refused}"
        t = self.tokens_evolving[0] if self.tokens_evolving else ("-", "-")
        first = f" (first: {t[0]} of {t[1]} tokens)" if t[0] != -1 else " (keep 1.0: every token)"
        blocks, images = self.evolution_checked
        update = (f", Evo-ViT update of {blocks} block(s) rebuilt from the paper's rules "
                  f"{self.evolution_diff:.1e}" if blocks and images else "")
        if self.scores_checked:
            update += (f", global scores of {self.scores_checked} block(s) rebuilt from the "
                       f"attention maps {self.scores_diff:.1e}")
        text = (f"{self.status}: {self.evolving}/{self.blocks} blocks evolving{first}, keep 1.0 "
                f"max diff {self.keep1_fast_diff:.1e} (fast path) / "
                f"{self.keep1_machinery_diff:.1e} (machinery), gradients at keep 1.0 "
                f"{self.keep1_grad_diff:.1e}, batch independence "
                f"{self.batch_diff:.1e}{update}, converted in {self.convert_s:.1f} s")
        if self.graphs:
            text += (f"; torch.compile: {self.graphs} graph(s), compiled vs eager "
                     f"{self.compile_diff:.1e}" + "".join(f"\n  graph break: {b}" for b in self.graph_breaks))
        return text + "".join(f"\n  PROBLEM: {p}" for p in self.problems) + \
            "".join(f"\n  WARNING: {w}" for w in self.warnings)


def outputs(o) -> List[torch.Tensor]:
    """Every floating-point tensor a model returns (the items of tuples, lists and dicts,
    recursively, in order): a backbone's feature maps are all compared, not the first one
    (a dense first stage: the check compared nothing until the twenty-second session)."""
    if isinstance(o, (tuple, list)):
        return [t for item in o for t in outputs(item)]
    if isinstance(o, dict):
        return [t for item in o.values() for t in outputs(item)]
    return [o] if isinstance(o, torch.Tensor) and o.is_floating_point() else []


def _pairs(a, b):
    a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
    if len(a) != len(b):
        raise ValueError(f"{len(a)} output tensor(s) against {len(b)}")
    return list(zip(a, b))


def _diff(a, b) -> float:
    """Largest |a - b| over the outputs (tensors or lists of them)."""
    return max((float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
                for x, y in _pairs(a, b)), default=0.0)


def _first(out: List[torch.Tensor], batch: int) -> List[torch.Tensor]:
    """Image 0 of every output whose first dim is the batch."""
    return [t[:1] for t in out if t.dim() and t.shape[0] == batch]


def _grads(model: nn.Module, x: torch.Tensor, train: bool = True):
    was = model.training
    model.train(train)
    model.zero_grad(set_to_none=True)
    sum(t.float().pow(2).mean() for t in outputs(model(x))).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.train(was)
    return got


def check_conversion(model: nn.Module, example_input: Optional[torch.Tensor] = None,
                     keep_ratio: float = 0.5, keep1_bound: float = 1e-5,
                     batch_bound: float = 1e-4, compile: Optional[str] = None,
                     grad_bound: float = 1e-4, **options) -> CheckResult:
    """Convert a copy of ``model`` (left untouched) and check it; see the module docstring.
    ``example_input``: a batch of at least 2 (default: 2 images of the declared input size);
    ``compile``: also compile the converted model with this ``torch.compile`` backend
    ('inductor', 'aot_eager', ...): the graphs and breaks ``torch._dynamo.explain`` finds, and
    the compiled output against the eager one (a problem beyond ``batch_bound``, relative);
    ``options``: :class:`evoplug.EvoOptions` fields."""
    model = copy_model(model)       # (as convert copies it: evoplug/copies.py)
    model.eval()            # (not chained: MMPretrain's backbones' train() returns None)
    x = example_input if example_input is not None else evoplug.example_input(model, batch=2)
    if x.shape[0] < 2:
        raise ValueError("check_conversion needs an example input of at least 2 images")
    with torch.no_grad():
        ref = outputs(model(x))
        again = outputs(model(x))
    if not ref:
        raise ValueError(f"{type(model).__name__} returns no floating-point tensor to compare")
    r = CheckResult(status="converts")
    if not all(torch.equal(a, b) for a, b in _pairs(ref, again)):
        # a model that draws random numbers in eval mode (MAE's masking): compare like with like
        model.register_forward_pre_hook(_same_draws)     # (the converted copy inherits it)
        r.warnings.append(
            f"the model's output changes between two calls on the same input (by "
            f"{_diff(ref, again):.1e}: it draws random numbers in eval mode, e.g. MAE-style "
            "masking): every forward of this check starts from the same seed")
        with torch.no_grad():
            ref = outputs(model(x))
    if not any(bool(t.any()) for t in ref):
        r.warnings.append("the model's output is all zeros on this input (a zero-initialised "
                          "head?): the output comparisons compare nothing; check trained weights "
                          "or a model with a non-zero head")
    t0 = time.perf_counter()
    try:
        fast = evoplug.convert(model, keep_ratio=keep_ratio, example_input=x, **options)
    except evoplug.EvoplugError as e:
        r.refused = f"{type(e).__name__}: {e}"
        try:
            fast = evoplug.convert(model, keep_ratio=keep_ratio, example_input=x, strict=False,
                                   **options)
            r.status = "partly"
        except evoplug.EvoplugError:
            r.status = "refused"
            return r
    r.convert_s = round(time.perf_counter() - t0, 2)
    report = evoplug.get_report(fast)
    r.blocks = len(report.blocks)
    r.evolving = sum(s.role == "evolve" for s in report.blocks)
    r.not_converted = [f"{n}: {why}" for n, why in report.failed]
    _check_outputs(r, model, fast, x, ref, keep_ratio, keep1_bound, batch_bound, options)
    _check_evolution(r, fast, x, keep_ratio, batch_bound)
    try:
        fast.load_state_dict(model.state_dict(), strict=True)
        model.load_state_dict(fast.state_dict(), strict=True)
    except Exception as e:                     # noqa: BLE001 (a problem to report)
        r.problems.append(f"state_dict: {e}"[:300])
    _check_gradients(r, model, fast, x, grad_bound, options)
    if compile:
        _check_compiled(r, fast, x, compile, batch_bound)
    if r.problems:
        r.status = "WRONG"
    return r


def _check_gradients(r: CheckResult, model: nn.Module, fast: nn.Module, x: torch.Tensor,
                     grad_bound: float, options: dict):
    """Every parameter that gets a gradient in the original gets a finite one in the converted
    model, and at keep 1.0 through the machinery the original's. A training forward evoplug
    refuses by name (a model that keeps block outputs handed on between selections:
    runtime/guard.py) is a warning with the refusal, as evoplug promises a clear error there
    (it ended the check with a traceback until the thirty-eighth session). Keep 1.0 first:
    a training step moves BatchNorm's running statistics, the original's and the converted
    model's apart (at ``keep_ratio`` its normed tokens are others)."""
    try:
        _check_keep1_gradients(r, model, fast, x, grad_bound, options)
        g_ref = _grads(model, x)
        g = _grads(fast, x)
    except evoplug.EvoplugError as e:
        r.warnings.append(f"a training step of the converted model is refused with these "
                          f"options, so gradients were not compared: {e}")
        return
    lost = sorted(set(g_ref) - set(g))
    if lost:
        r.problems.append(f"{len(lost)} parameter(s) lost their gradient: {lost[:4]}")
    if not all(bool(torch.isfinite(t).all()) for t in g.values()):
        r.problems.append("non-finite gradients")


def _check_keep1_gradients(r: CheckResult, model: nn.Module, fast: nn.Module, x: torch.Tensor,
                           bound: float, options: dict):
    """Keep 1.0 through the selection machinery (every token, in the selection's order) gives
    the original's gradients, eval mode (dropout would draw other masks for tokens in another
    order), relative to the largest gradient (softmax makes some exactly zero but for
    rounding: a key's bias). Over ``bound`` in float32, float64 decides as for the outputs: the
    same computation there is a warning, else a problem."""
    opts = evoplug.get_report(fast).options
    evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
    try:
        r.keep1_grad_diff = _grad_diff(_grads(fast, x, train=False),
                                       _grads(model, x, train=False))
    finally:
        evoplug.set_options(fast, keep_ratio=opts.keep_ratio,
                            identity_fast_path=opts.identity_fast_path)
    if not r.keep1_grad_diff > bound:       # (NaN: no gradient to compare)
        return
    text = (f"keep 1.0 through the machinery: gradients off the original's by "
            f"{r.keep1_grad_diff:.2e} (relative to the largest) > {bound}")
    f64 = _keep1_grads_float64(model, x, options)
    if f64 <= F64_BOUND:
        r.warnings.append(f"{text} in float32, but {f64:.1e} in float64: the same computation, "
                          "float32 rounding in another summation order, amplified by the model")
    else:
        r.problems.append(f"{text} (float64: {f64:.1e})")


def _grad_diff(got: dict, want: dict) -> float:
    """Largest |got - want| over the parameters, relative to the largest gradient (inf where
    one is missing; NaN where there is none)."""
    top = max((float(t.float().abs().max()) for t in want.values() if t.numel()), default=0.0)
    if top == 0.0:
        return float("nan")
    return max((float((got[n].float() - t.float()).abs().max()) if n in got else float("inf"))
               for n, t in want.items() if t.numel()) / top


def _keep1_grads_float64(model: nn.Module, x: torch.Tensor, options: dict) -> float:
    """:func:`_check_keep1_gradients` in float64 (NaN where the model does not run there)."""
    try:
        m64, x64 = copy_model(model).double(), x.double()
        fast = evoplug.convert(m64, example_input=x64, strict=False,
                               **dict(options, keep_ratio=1.0, identity_fast_path=False))
        return _grad_diff(_grads(fast, x64, train=False), _grads(m64, x64, train=False))
    except Exception:                          # noqa: BLE001 (no float64 comparison: a problem)
        return float("nan")


def _same_draws(module, args):
    """Forward pre-hook of a model that draws random numbers: every forward draws the same."""
    torch.manual_seed(0)


def _flag(r: CheckResult, text: str):
    """A difference that float rounding can cause where the selection is fragile (see
    ``CheckResult.noise_change``) is a warning there, a problem elsewhere."""
    if r.selection_stable:
        r.problems.append(text)
    else:
        r.warnings.append(f"{text}; the selection itself is that fragile here (input noise of "
                          f"1e-3 changes the output by {r.noise_change:.1e}: near-uniform "
                          "attention, e.g. random weights)")


def _rel(a, b) -> float:
    """Largest |a - b| relative to the largest |b|, the worst over the outputs."""
    return max((_diff(x, y) / max(float(y.abs().max()) if y.numel() else 0.0, 1e-6)
                for x, y in _pairs(a, b)), default=0.0)


def _shapes(out: List[torch.Tensor]) -> str:
    return ", ".join(str(tuple(t.shape)) for t in out)


def _check_outputs(r: CheckResult, model, fast, x, ref, keep_ratio, keep1_bound, batch_bound,
                   options):
    report = evoplug.get_report(fast)
    with torch.no_grad():
        out = outputs(fast(x))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
        noisy = x + noise * (1e-3 * x.float().std().to(x.dtype))
        dense_change = _rel(outputs(model(noisy)), ref)
        r.noise_change = _rel(outputs(fast(noisy)), out)
        r.selection_stable = r.noise_change <= max(batch_bound, 100 * dense_change)
        evolving = [s for s in report.blocks if s.role == "evolve"]
        r.tokens_evolving = [(s.tokens_run, s.analysis.num_tokens) for s in evolving]
        finite = all(bool(torch.isfinite(t).all()) for t in out)
        if [t.shape for t in out] != [t.shape for t in ref] or not finite:
            r.problems.append(f"keep {keep_ratio} output {_shapes(out)} (original "
                              f"{_shapes(ref)}), finite: {finite}")
            return
        idle = [s.analysis.name for s in evolving if s.tokens_run == s.analysis.num_tokens]
        unscored = set(report.unscored)                      # what explain() says they do
        said = [n for n in idle if n in unscored]
        few = [n for n in idle if n in set(report.too_few)]             # (explain() says so)
        idle = [n for n in idle if n not in said and n not in few]
        if keep_ratio < 1 and few:
            r.warnings.append(f"{len(few)} evolving block(s) have too few tokens to run fewer at "
                              f"keep {keep_ratio}, as explain() says: {few[:3]}")
        if keep_ratio < 1 and idle:
            r.problems.append(f"{len(idle)} evolving block(s) ran every token: {idle[:3]}")
        if keep_ratio < 1 and said:
            r.warnings.append(f"{len(said)} evolving block(s) ran every token, as explain() "
                              f"says (no global scores reach them): {said[:3]}")
        r.rel_change = max(float((o - f).abs().mean() / f.abs().mean().clamp_min(1e-12))
                           for o, f in zip(out, ref))          # the output that moved most
        if keep_ratio < 1 and evolving and r.rel_change <= 1e-6 and any(bool(t.any()) for t in ref):
            r.warnings.append(f"keep {keep_ratio} changes the output by {r.rel_change:.1e} only "
                              f"(relative) although {len(evolving)} evolving block(s) ran fewer "
                              "tokens: their residual branches add (almost) nothing here (an "
                              "identity-like initialisation: timm's SwinV2 zero-initialises its "
                              "post-norms, CaiT scales its branches by 1e-5), so the output "
                              "comparisons cannot show the selection at work; check trained weights")
        one = _first(outputs(fast(x[:1])), 1)
        r.batch_diff = _rel(one, _first(out, x.shape[0]))
        if not r.batch_diff <= batch_bound:
            _flag(r, f"image 0 alone differs from image 0 in the batch by {r.batch_diff:.2e} "
                     "(relative)")
        opts = report.options
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=True)
        r.keep1_fast_diff = _diff(outputs(fast(x)), ref)
        evoplug.set_options(fast, identity_fast_path=False)
        r.keep1_machinery_diff = _diff(outputs(fast(x)), ref)
        evoplug.set_options(fast, keep_ratio=opts.keep_ratio, identity_fast_path=opts.identity_fast_path)
    if not r.keep1_fast_diff <= keep1_bound:
        r.problems.append(f"keep1_fast_diff {r.keep1_fast_diff:.2e} > {keep1_bound}")
    if not r.keep1_machinery_diff <= keep1_bound:          # NaN included
        _check_keep1_machinery(r, model, x, keep1_bound, options)


#: keep 1.0 through the machinery against the original, both float64: the same computation
F64_BOUND = 1e-9


def _keep1_float64(model: nn.Module, x: torch.Tensor, options: dict) -> float:
    """Relative max |diff| of keep 1.0 through the selection machinery from the original, both
    in float64 (nan where the model does not run in float64)."""
    try:
        m64, x64 = copy_model(model).double(), x.double()
        with torch.no_grad():
            ref = outputs(m64(x64))
            fast = evoplug.convert(m64, keep_ratio=1.0, example_input=x64, strict=False,
                                   **dict(options, identity_fast_path=False))
            return _rel(outputs(fast(x64)), ref)
    except Exception:                          # noqa: BLE001 (then float32 decides)
        return float("nan")


def _check_keep1_machinery(r: CheckResult, model, x, keep1_bound: float, options: dict):
    """keep 1.0 through the machinery went over the bound in float32: a warning when float64
    shows the same computation, else (NaN included) a problem."""
    r.keep1_float64_diff = _keep1_float64(model, x, options)
    text = f"keep1_machinery_diff {r.keep1_machinery_diff:.2e} > {keep1_bound}"
    if r.keep1_float64_diff <= F64_BOUND:
        r.warnings.append(f"{text} in float32, but {r.keep1_float64_diff:.1e} (relative) in "
                          "float64: the same computation, float32 rounding in another summation "
                          "order, amplified by the model (large outputs, or thresholds on its own "
                          "activations)")
    else:
        r.problems.append(f"{text} (float64: {r.keep1_float64_diff:.1e} relative)")


def _check_compiled(r: CheckResult, fast: nn.Module, x: torch.Tensor, backend: str, bound: float):
    """The graphs dynamo makes; the compiled output against eager at the options' keep ratio
    (a selection-fragile difference is a warning) and at keep 1.0 through the selection
    machinery (scores, top-k, copies, restore: no selection to swap, so always a problem)."""
    fast.eval()             # (not chained: MMPretrain's backbones' train() returns None)
    torch._dynamo.reset()
    opts = evoplug.get_report(fast).options
    with torch.no_grad():
        ex = torch._dynamo.explain(fast)(x)
        r.graphs = ex.graph_count
        r.graph_breaks = sorted({str(b.reason).splitlines()[0][:200] for b in ex.break_reasons})
        torch._dynamo.reset()
        compiled = torch.compile(fast, backend=backend)
        r.compile_diff = _rel(outputs(compiled(x)), outputs(fast(x)))
        evoplug.set_options(fast, keep_ratio=1.0, identity_fast_path=False)
        machinery = _rel(outputs(compiled(x)), outputs(fast(x)))
        evoplug.set_options(fast, keep_ratio=opts.keep_ratio, identity_fast_path=opts.identity_fast_path)
    if not r.compile_diff <= bound:
        _flag(r, f"torch.compile ({backend}) differs from eager by {r.compile_diff:.2e} (relative)")
    if not machinery <= bound:
        r.problems.append(f"torch.compile ({backend}) at keep 1.0 through the selection machinery "
                          f"differs from eager by {machinery:.2e} (relative)")
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# The Evo-ViT update rebuilt from the paper's rules
# --------------------------------------------------------------------------------------------

#: images whose scores at the cut are closer than this (relative) are not compared: a near-tie
#: goes either way with the summation order
_CUT_GAP = 1e-4


def _plain(spec, role: str = "evolve") -> bool:
    """A block of ``role`` the rules can be rebuilt on with its own forward: no 2-D map,
    windows, position terms, whole-input reads, extra arguments, trailing tokens or scaled
    skip."""
    a = spec.analysis
    return spec.role == role and not (
        a.grid_ops_expected or a.windowed or a.token_map or a.one_window or a.uses_pos or
        a.uses_full or a.whole_args or a.token_rest or a.batch_args or a.num_suffix or
        any(b.skip for b in a.branches))


def _per_block(fast: nn.Module, x: torch.Tensor):
    """The converted model's outputs with every block restoring the order: under saved-tensor
    hooks (what non-reentrant gradient checkpointing runs its forward under) no block hands its
    tokens on."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        return [t.detach() for t in outputs(fast(x))]


def _check_evolution(r: CheckResult, fast: nn.Module, x: torch.Tensor, keep_ratio: float,
                     bound: float):
    """``hand_on_diff``, ``evolution_diff`` and ``scores_diff`` (see the module docstring), at
    keep < 1 where blocks evolve and nothing before went wrong."""
    if keep_ratio >= 1 or not r.evolving or r.problems:
        return
    report = evoplug.get_report(fast)
    opts = report.options
    with torch.no_grad():
        handed = outputs(fast(x))
    r.hand_on_diff = _rel(_per_block(fast, x), handed)
    if not r.hand_on_diff <= bound:
        _flag(r, f"the output with tokens handed on between blocks differs from every block "
                 f"restoring the order by {r.hand_on_diff:.2e} (relative)")
    specs = [s for s in report.blocks if _plain(s)][:3]
    if not specs:
        return
    scored = [s for s in report.blocks if s.role == "score" and _plain(s, "score")][:1]
    seen, order = _watch_blocks(fast, x, report, specs + scored)
    diffs, images, want = [], 0, {}
    for spec in specs + scored:
        if spec.index not in seen:
            continue
        # (without the representative token, the non-selected tokens keep their values: both
        # checks were skipped then until the forty-third session, audit G2)
        got = _rebuilt(spec, *seen[spec.index], alpha=opts.trade_off,
                       representative=opts.representative) \
            if spec.role == "evolve" else _first_scores(spec, *seen[spec.index], alpha=opts.trade_off)
        if got is not None:
            diffs += [got[0]] if got[0] is not None else []
            images += got[1]
            want[spec.index] = got[2]
    r.evolution_checked = (len(diffs), images)
    r.evolution_diff = max(diffs, default=float("nan"))
    if diffs and not r.evolution_diff <= bound:
        r.problems.append(f"an evolving block's output differs from the Evo-ViT update rebuilt "
                          f"from the paper's rules by {r.evolution_diff:.2e} (relative)")
    _compare_scores(r, seen, order, want, bound)


def _watch_blocks(fast: nn.Module, x: torch.Tensor, report, specs):
    """Run ``fast`` with every block restoring the order and ``reselect_every=1``; returns
    {block index: [args, kwargs, scores it received, output, tokens run]} of ``specs`` and the
    order in which every converted block ran."""
    seen, order, handles = {}, [], []
    keep = {s.index for s in specs}
    for spec in report.blocks:
        def before(mod, args, kwargs, spec=spec):
            order.append(spec.index)
            state = spec.context      # (before the first block: the last forward's, stale)
            scores = state.scores if state is not None and state.index >= 0 and \
                len(order) > 1 else None
            seen[spec.index] = [args, kwargs, None if scores is None else scores.detach().clone()]

        def after(mod, args, kwargs, out, spec=spec):
            seen[spec.index] += [out, spec.tokens_run]
        handles.append(spec.analysis.module.register_forward_pre_hook(before, with_kwargs=True))
        if spec.index in keep:
            handles.append(spec.analysis.module.register_forward_hook(after, with_kwargs=True))
    every = report.options.reselect_every
    evoplug.set_options(fast, reselect_every=1)
    try:
        _per_block(fast, x)
    finally:
        evoplug.set_options(fast, reselect_every=every)
        for h in handles:
            h.remove()
    return {i: v for i, v in seen.items() if i in keep and len(v) == 5}, order


def _compare_scores(r: CheckResult, seen, order, want, bound: float):
    """The scores each checked block received against the scores rebuilt from the block that
    ran just before it (its input scores and its own attention map)."""
    diffs = []
    for prev, nxt in zip(order, order[1:]):
        if want.get(prev) is None or nxt not in seen or seen[nxt][2] is None:
            continue
        expected, clear = want[prev]
        got = seen[nxt][2].double()
        if got.shape != expected.shape or not bool(clear.any()):
            continue
        scale = float(expected[clear].abs().max().clamp_min(1e-12))
        diffs.append(float((got[clear] - expected[clear]).abs().max()) / scale)
    r.scores_checked = len(diffs)
    r.scores_diff = max(diffs, default=float("nan"))
    if diffs and not r.scores_diff <= bound:
        r.problems.append(f"the global attention scores a block received differ from the ones "
                          f"rebuilt from the previous block's own attention map by "
                          f"{r.scores_diff:.2e} (relative)")


def _alpha(alpha) -> float:
    return float(read_trade_off(alpha)) if callable(alpha) else float(alpha)


@torch.no_grad()
def _first_scores(spec, args, kwargs, scores, out, tokens_run, alpha):
    """(None, 0, (scores expected after it, images)) of the block that computes the first
    global scores: its own attention row over the patch tokens (mixed into the scores it
    received, where it received some); None where its map cannot be read."""
    plan = spec.call
    x = plan.tokens(args, kwargs)
    if plan.tensor_args or plan.packed or len(plan.token_perm) not in (0, x.dim()) or x.dim() != 3:
        return None
    x = x.permute(plan.token_perm) if plan.token_perm else x
    P = spec.analysis.num_prefix
    with AttentionMaps(x.shape[1]) as maps:
        spec.orig_class.forward(spec.analysis.module, *args, **kwargs)
    if len(maps.logits) != 1:
        return None
    row = global_row(maps.logits[0], x.shape[0], P, spec.analysis.global_query)
    if row is None:
        return None
    row = row[:, P:]
    if scores is not None and scores.shape == row.shape:
        row = torch.lerp(scores.double(), row, _alpha(alpha))
    return None, 0, (row, torch.ones(row.shape[0], dtype=torch.bool))


@torch.no_grad()
def _rebuilt(spec, args, kwargs, scores, out, tokens_run, alpha, representative=True):
    """(relative max |diff|, images compared, (scores expected after it, images compared)) of
    the block's output against the update rebuilt from ``scores`` (B, M) on its input
    (``representative`` False: no representative token, the other tokens keep their values);
    None where nothing can be compared."""
    plan = spec.call
    x = plan.tokens(args, kwargs) if args is not None else None
    out = out[0] if isinstance(out, (tuple, list)) and out else out
    if scores is None or x is None or plan.tensor_args or plan.packed or \
            not isinstance(out, torch.Tensor) or tokens_run is None or tokens_run < 0 or \
            len(plan.token_perm) not in (0, x.dim()):
        return None
    if plan.token_perm:       # (sequence-first tokens, PyTorch's nn.TransformerEncoderLayer)
        x, out = x.permute(plan.token_perm), out.permute(plan.token_perm)
    x, P = x.detach(), spec.analysis.num_prefix
    B, N, C = x.shape if x.dim() == 3 else (0, 0, 0)
    k = tokens_run - P - int(representative)
    if out.shape != x.shape or scores.shape != (B, N - P) or not 0 < k < N - P - int(representative):
        return None
    g = scores.double()
    ranked = g.sort(-1, descending=True).values
    clear = (ranked[:, k - 1] - ranked[:, k]) > _CUT_GAP * ranked[:, k - 1].abs()
    if not bool(clear.any()):
        return None
    kept = g.topk(k, -1).indices + P                                    # (B, k) token indices
    w = g.scatter(-1, kept - P, 0.0)
    w = w / w.sum(-1, keepdim=True)
    rep = torch.einsum("bm,bmc->bc", w.to(x.dtype), x[:, P:])[:, None] if representative \
        else x[:, :0]
    index = kept[..., None].expand(B, k, C)
    sub = torch.cat([x[:, :P], x.gather(1, index), rep], 1)
    args, kwargs = _with_tokens(plan, args, kwargs, plan.to_call(sub))
    with AttentionMaps(sub.shape[1]) as maps:
        out_sub = spec.orig_class.forward(spec.analysis.module, *args, **kwargs)
    out_sub = out_sub[0] if isinstance(out_sub, (tuple, list)) else out_sub
    out_sub = out_sub.permute(plan.token_perm) if plan.token_perm else out_sub
    want = x + (out_sub[:, -1:] - rep) if representative else x.clone()
    want[:, :P] = out_sub[:, :P]
    want.scatter_(1, index, out_sub[:, P:P + k])
    scale = float(want[clear].abs().max().clamp_min(1e-6))
    diff = float((out.detach()[clear] - want[clear]).abs().max()) / scale
    row = global_row(maps.logits[0], B, P, spec.analysis.global_query) \
        if len(maps.logits) == 1 else None
    scores_after = None
    if row is not None:          # g = (1 - alpha) g + alpha a at the kept tokens
        at = kept - P
        scores_after = (g.scatter(-1, at, torch.lerp(g.gather(-1, at), row[:, P:P + k],
                                                     _alpha(alpha))), clear)
    return diff, int(clear.sum()), scores_after


def _with_tokens(plan, args, kwargs, tokens):
    """(args, kwargs) of a block's call with its token argument replaced by ``tokens``."""
    if plan.token_arg in kwargs:
        return args, dict(kwargs, **{plan.token_arg: tokens})
    i = 0 if plan.single else plan.signature_index
    return args[:i] + (tokens,) + args[i + 1:], kwargs
