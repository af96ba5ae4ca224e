"""A learnable trade-off: ``EvoOptions.trade_off`` may be a callable returning alpha (e.g. a
module computing sigmoid(w)); it is read at every update, so gradients reach ``w``."""
import warnings

import pytest
import torch
from torch import nn

import evoplug
from evoplug.runtime import evolve as ev
from plain_vit import PlainViT


class SigmoidAlpha(nn.Module):
    def __init__(self):
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(()))

    def forward(self):
        return torch.sigmoid(self.logit)


def test_update_scores_calls_the_trade_off():
    g = torch.tensor([[0.2, 0.8]])
    a = torch.tensor([[0.6, 0.4]])
    w = nn.Parameter(torch.tensor(0.3))
    out = ev.update_scores(g, a, lambda: torch.sigmoid(w))
    alpha = torch.sigmoid(torch.tensor(0.3))
    assert torch.allclose(out, (1 - alpha) * g + alpha * a)
    out[:, 0].sum().backward()   # d out_0 / d alpha = a_0 - g_0 = 0.4
    assert w.grad is not None and float(w.grad.abs()) > 0
    # the first update is g = a, whatever alpha
    assert torch.equal(ev.update_scores(None, a, lambda: torch.sigmoid(w)), a)


def test_options_accept_a_callable_and_still_check_floats():
    alpha = SigmoidAlpha()
    assert evoplug.EvoOptions(trade_off=alpha).trade_off is alpha
    with pytest.raises(ValueError):
        evoplug.EvoOptions(trade_off=1.5)


def _learnable():
    """A small ViT converted with a learnable trade-off, its alpha and an input. alpha reaches
    the output through the representative weights of the next selection: select in every block
    (3 evolving blocks, fewer than the default reselect_every)."""
    torch.manual_seed(0)
    model = PlainViT(img=32, patch=4, width=32, heads=2, depth=4)
    alpha = SigmoidAlpha()
    x = torch.randn(2, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], trade_off=alpha,
                           start_block=1, reselect_every=1)
    return fast, alpha, x


def test_learnable_trade_off_gets_a_gradient_through_the_representative_token():
    fast, alpha, x = _learnable()
    fast.train()
    fast(x).square().mean().backward()
    assert alpha.logit.grad is not None and float(alpha.logit.grad.abs()) > 0
    # same forward with the float it evaluates to gives the same output
    with torch.no_grad():
        fast.eval()
        y1 = fast(x)
        evoplug.set_options(fast, trade_off=0.5)
        y2 = fast(x)
    assert torch.allclose(y1, y2, atol=1e-6)


def test_a_learnable_trade_off_trains_after_an_inference_mode_pass():
    """The score-update constants are cached per runtime: made in an inference_mode pass
    (validation, a sanity check) they were inference tensors, and a learnable trade-off's mask,
    saved for backward, failed every later training step (until the eighteenth session)."""
    fast, alpha, x = _learnable()
    with torch.inference_mode():
        fast.eval()
        fast(x)
    fast.train()
    fast(x).square().mean().backward()
    assert alpha.logit.grad is not None and torch.isfinite(alpha.logit.grad)


def test_a_trade_off_module_of_the_model_follows_the_copy_convert_makes():
    """``model.alpha = SigmoidAlpha(); convert(model, trade_off=model.alpha)`` converts a copy
    (inplace=False): its forward read the original's alpha, which got the gradients, while the
    copy's, which the optimiser steps and the checkpoint saves, did nothing (audit E of the
    twenty-third session). The copy's own module is the trade-off now."""
    torch.manual_seed(0)
    model = PlainViT(img=32, patch=4, width=32, heads=2, depth=4)
    model.alpha = SigmoidAlpha()
    x = torch.randn(2, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], trade_off=model.alpha,
                           start_block=1, reselect_every=1)
    assert evoplug.get_report(fast).options.trade_off is fast.alpha
    fast.train()
    fast(x).square().mean().backward()
    assert model.alpha.logit.grad is None
    assert fast.alpha.logit.grad is not None and float(fast.alpha.logit.grad.abs()) > 0
    # a function reading the original's parameters as a global name cannot follow the copy:
    # refused, not ignored
    global _MODEL
    _MODEL = model
    with pytest.raises(ValueError, match="`_MODEL`.* as a global name"):
        evoplug.convert(model, keep_ratio=0.5, example_input=x[:1],
                        trade_off=lambda: torch.sigmoid(_MODEL.alpha.logit))
    # an alpha outside the model stays the caller's
    outside = SigmoidAlpha()
    other = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], trade_off=outside)
    assert evoplug.get_report(other).options.trade_off is outside


def test_a_learnable_trade_off_in_a_reentrant_checkpoint_is_refused():
    """A reentrant checkpoint runs its forward without autograd: the refreshed scores, which
    carry alpha's gradient to the next selection, leave it as state, so alpha got no gradient
    and trained silently frozen (audit E of the twenty-third session). Refused by name; the
    non-reentrant checkpoint gives the plain backward's gradient."""
    timm = pytest.importorskip("timm")
    from timm.layers import config, set_reentrant_ckpt
    before = config._USE_REENTRANT_CKPT
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                              depth=4, embed_dim=32, num_heads=2, num_classes=10)
    alpha = SigmoidAlpha()
    x = torch.randn(2, 3, 32, 32)
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], trade_off=alpha,
                           start_block=1, reselect_every=1).train()
    fast(x).square().mean().backward()
    plain = alpha.logit.grad.clone()
    alpha.logit.grad = None
    fast.set_grad_checkpointing(True)
    try:
        set_reentrant_ckpt(False)
        fast(x).square().mean().backward()
        torch.testing.assert_close(alpha.logit.grad, plain)
        set_reentrant_ckpt(True)
        with pytest.raises(evoplug.EvoplugError, match="reentrant gradient checkpoint"):
            fast(x).square().mean().backward()
    finally:
        set_reentrant_ckpt(before)


def test_an_out_of_range_learnable_trade_off_is_refused_compiled_and_exported_too():
    """The range of a learnable trade-off was checked in eager mode only: compiled or exported,
    1.7 extrapolated the score update without a word (audit H of the twenty-third session).
    There the device asserts it now (no wait for a value)."""
    fast, alpha, x = _learnable()
    with torch.no_grad():
        alpha.logit.fill_(2.0)
    fast.eval()
    too_big = lambda: alpha.logit * 0.85          # noqa: E731 - 1.7
    evoplug.set_options(fast, trade_off=too_big)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fast(x)
    torch._dynamo.reset()
    with pytest.raises((RuntimeError, ValueError), match=r"in \[0, 1\]"):   # (or a graph break)
        torch.compile(fast, backend="eager")(x)
    with pytest.raises(RuntimeError, match=r"in \[0, 1\]"):     # exporting or running it
        torch.export.export(fast, (x,)).module()(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_learnable_trade_off_in_a_model_of_another_dtype_learns(dtype):
    """A learnable trade-off kept in the model follows its dtype; the scores are float32, and
    ``torch.lerp`` refused a float64 or (without a class token) half-precision weight: every
    forward raised (audit Z of the twenty-fifth session). It is read as float32, its gradient
    kept."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4,
                              num_classes=10, class_token=False, global_pool="avg")
    model.evo_alpha = SigmoidAlpha()
    model = model.to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    fast = evoplug.convert(model, keep_ratio=0.5, trade_off=model.evo_alpha, reselect_every=1,
                           example_input=x[:1])
    fast.train()
    fast(x).float().sum().backward()
    assert fast.evo_alpha.logit.grad is not None and fast.evo_alpha.logit.grad.dtype == dtype


def _alpha_model():
    torch.manual_seed(0)
    model = PlainViT(img=32, patch=4, width=32, heads=2, depth=4)
    model.alpha_logit = nn.Parameter(torch.tensor(0.0))
    return model


def _closure(m):
    return lambda: torch.sigmoid(m.alpha_logit)


def _reads_its_own_parameter(m, x):
    """``m``'s trade-off reads ``m``'s own ``alpha_logit``: set anew, the output is that of a
    fresh conversion of ``m``'s weights, and a backward gives that parameter a gradient."""
    import copy
    with torch.no_grad():
        m.alpha_logit.fill_(3.0)
    ref = _alpha_model()
    ref.load_state_dict(evoplug.revert(copy.deepcopy(m)).state_dict())
    ref = evoplug.convert(ref, keep_ratio=0.5, example_input=x[:1], start_block=1,
                          reselect_every=1, inplace=True, trade_off=_closure(ref))
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), atol=1e-6, rtol=0)
    m.train()
    m(x).square().mean().backward()
    assert m.alpha_logit.grad is not None and float(m.alpha_logit.grad.abs()) > 0


@pytest.mark.parametrize("form", ["closure", "partial", "default_argument", "nested_closure"])
def test_a_trade_off_function_holding_the_models_parameter_follows_every_copy(form):
    """A function holding the model's parameter (a closure, ``functools.partial``, a default
    argument) reads the copy's in the copy ``inplace=False`` converts and in a ``copy.deepcopy``
    of the converted model: the copy used and trained the original's, silently, off by 0.62-0.68
    (audit M of the thirty-fourth session; a closure was refused at convert)."""
    import copy
    import functools
    x = torch.randn(2, 3, 32, 32)

    def make(m):
        inner = _closure(m)
        return {"closure": _closure(m), "partial": functools.partial(torch.sigmoid, m.alpha_logit),
                "default_argument": lambda a=m.alpha_logit: torch.sigmoid(a),
                "nested_closure": lambda: inner()}[form]      # (audit P: the inner one stayed)
    model = _alpha_model()
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], start_block=1,
                           reselect_every=1, trade_off=make(model))
    for m in (fast, copy.deepcopy(fast)):
        _reads_its_own_parameter(m, x)
    assert model.alpha_logit.grad is None and fast.alpha_logit.grad is not None


def test_a_trade_off_reading_the_model_as_a_global_name_is_refused_when_copied_or_pickled():
    import copy
    import pickle
    global _MODEL
    x = torch.randn(2, 3, 32, 32)
    _MODEL = _alpha_model()
    fast = evoplug.convert(_MODEL, keep_ratio=0.5, example_input=x[:1], inplace=True,
                           trade_off=_global_alpha)
    with pytest.raises(ValueError, match="`_MODEL`.* as a global name"):
        copy.deepcopy(fast)
    with pytest.raises(TypeError, match="pickle cannot store"):
        pickle.dumps(fast)


_MODEL = None
_HOLDER = None


def _global_alpha():
    return torch.sigmoid(_MODEL.alpha_logit)


def _alpha_through_a_global_object():
    return _HOLDER.alpha()


def _scaled_alpha_through_a_global_object(scale):
    return scale * _HOLDER.alpha()


@pytest.mark.parametrize("form", ["function", "partial"])
def test_a_trade_off_reaching_the_model_through_a_global_object_is_refused_when_pickled(form):
    """Pickle stores a function by its name, so the loaded model's trade-off reads the global
    object the loading process holds: here the original model, whose parameter the loaded one
    read and trained without a word until the fifty-fourth session (only a tensor or module held
    by the global name itself was refused). A partial holding the model's own parameter is
    pickled with the model and follows it."""
    import functools
    import pickle
    global _HOLDER
    x = torch.randn(2, 3, 32, 32)
    model = _alpha_model()
    _HOLDER = _Holder(model)
    fn = {"function": _alpha_through_a_global_object,
          "partial": functools.partial(_scaled_alpha_through_a_global_object, 1.0)}[form]
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], start_block=1,
                           reselect_every=1, inplace=True, trade_off=fn)
    with pytest.raises(TypeError, match="global names of _(scaled_)?alpha_through_a_global_object, "
                                        "which pickle cannot store"):
        pickle.dumps(fast)
    model = _alpha_model()
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], start_block=1, reselect_every=1,
                           inplace=True, trade_off=functools.partial(torch.sigmoid, model.alpha_logit))
    _reads_its_own_parameter(pickle.loads(pickle.dumps(fast)), x)
    assert model.alpha_logit.grad is None


class _Holder:
    def __init__(self, model):
        self.model = model

    def alpha(self):
        return torch.sigmoid(self.model.alpha_logit)


def test_a_trade_off_evoplug_cannot_rebuild_for_the_copy_is_refused():
    """A method of a plain object holding the model, or a cached function of it, cannot follow
    the copy ``inplace=False`` converts: refused (audit P: the copy read and trained the
    original's parameter, 0.08 off, or served the first value it computed)."""
    import functools
    x = torch.randn(2, 3, 32, 32)
    model = _alpha_model()
    cached = functools.lru_cache(_closure(model))
    for fn, why in [(_Holder(model).alpha, "object evoplug cannot rebuild"),
                    (cached, "cached function")]:
        with pytest.raises(ValueError, match=why):
            evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], trade_off=fn)


class _Box:
    """An object holding another (a trainer, a config, a scheduler: the model a few objects
    down)."""

    def __init__(self, inner):
        self.inner = inner

    def alpha(self):
        o = self
        while isinstance(o, _Box):
            o = o.inner
        return torch.sigmoid(o.alpha_logit)


_HOLDER = None


def _global_holder_alpha():
    return _HOLDER.alpha()


@pytest.mark.parametrize("form", ["method_five_deep", "closure_over_an_object", "global_object"])
def test_a_trade_off_reaching_the_models_parameter_through_objects_follows_or_is_refused(form):
    """A trade-off reaching the model's parameter through plain objects: a method of an object
    holding it five objects down (found four down: the walk stopped there), a closure over such
    an object (its cells were rebuilt only where they held a tensor or module, a container of
    them, or a function), a global object holding it (only a tensor or module was refused).
    The copy ``inplace=False`` converts, and for the closure a ``copy.deepcopy`` of the
    converted model, read and trained the original's parameter, 0.0008 off a model reading its
    own, the copy's parameter without a gradient, without a word, until the fifty-third
    session. The copy ``inplace=False`` makes refuses each now, naming the object; a deep copy
    of the converted model copies the object with the model (the global one: refused)."""
    import copy
    global _HOLDER
    x = torch.randn(2, 3, 32, 32)

    def make(m):
        global _HOLDER
        held = m
        for _ in range(5):
            held = _Box(held)
        _HOLDER = held
        return {"method_five_deep": held.alpha, "closure_over_an_object": lambda: held.alpha(),
                "global_object": _global_holder_alpha}[form]
    model = _alpha_model()
    with pytest.raises(ValueError, match="cannot rebuild|`_HOLDER`.* as a global name"):
        evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], start_block=1,
                        reselect_every=1, trade_off=make(model))
    fast = evoplug.convert(model, keep_ratio=0.5, example_input=x[:1], start_block=1,
                           reselect_every=1, inplace=True, trade_off=make(model))
    if form == "global_object":
        with pytest.raises(ValueError, match="`_HOLDER`.* as a global name"):
            copy.deepcopy(fast)
        return
    _reads_its_own_parameter(copy.deepcopy(fast), x)
    assert model.alpha_logit.grad is None


class _Schedule:
    """State outside the model a trade-off reads, which the user steps (a plain tensor)."""

    def __init__(self):
        self.alpha = torch.tensor(0.5)


_SCHEDULE = _Schedule()


@pytest.mark.parametrize("form", ["closure", "global"])
def test_a_copy_of_the_model_shares_the_schedule_object_its_trade_off_reads(form):
    """A trade-off reading state outside the model (a schedule object holding a plain tensor,
    which the user steps) is shared by a ``copy.deepcopy`` of the converted model, as it was
    before the fifty-third session's walk to any depth: it then deep-copied a closure's
    schedule (the copy's trade-off stood still when the user stepped it) and refused a global
    one ("reads `_SCHEDULE` ... as a global name"). What holds the model's parameters or modules
    is copied or refused (the test above)."""
    import copy
    x = torch.randn(2, 3, 32, 32)
    sched = _Schedule() if form == "closure" else _SCHEDULE
    fn = (lambda: sched.alpha) if form == "closure" else (lambda: _SCHEDULE.alpha)
    fast = evoplug.convert(_alpha_model(), keep_ratio=0.5, example_input=x[:1], start_block=1,
                           reselect_every=1, inplace=True, trade_off=fn)
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        before = twin(x)
        sched.alpha = torch.tensor(0.1)
        try:
            after = twin(x)
            assert not torch.equal(before, after)             # (the step reaches the copy)
            torch.testing.assert_close(after, fast(x), atol=0, rtol=0)
        finally:
            sched.alpha = torch.tensor(0.5)


def test_replacing_a_learnable_trade_off_is_warned_and_a_compiled_model_keeps_one_graph():
    """A learnable trade-off replaced by a number (``set_options(trade_off=0.5)``, or an
    MMPretrain ``EvoOptionsHook`` scheduling one on ``learnable_trade_off=True``) silently left
    its parameter in the optimiser and the checkpoint without a gradient; and a learnable
    trade-off split dynamo's graph at every block (``callable(getattr(tensor, ...))`` in
    options.read_trade_off), so ``--compile`` ran the backbone mostly eagerly (audit E1 of the
    forty-first session). Now the replacement is warned (the output is the number's), and the
    compiled model is one graph with the trade-off learning in it."""
    fast, alpha, x = _learnable()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fast)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    fast.train()
    torch.compile(fast, backend="aot_eager", fullgraph=True)(x).square().mean().backward()
    assert alpha.logit.grad is not None and float(alpha.logit.grad.abs()) > 0
    with pytest.warns(UserWarning, match=r"trade_off was learnable \(SigmoidAlpha.*now 0\.5"):
        evoplug.set_options(fast, trade_off=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evoplug.set_options(fast, trade_off=alpha)          # (back: no warning)
        alpha.requires_grad_(False)
        evoplug.set_options(fast, trade_off=0.25)           # (frozen: nothing is lost)
