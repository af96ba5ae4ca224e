"""``evoplug.tools.check`` and ``evoplug check``: the pre-flight check of a conversion, on models
the other tests do not cover (timm families found by ``benchmarks/model_sweep.py``), and that
the check finds what it is there to find."""
import json

import pytest
import timm
import torch

import evoplug
from evoplug.runtime import evolve as ev
from evoplug.tools import cli
from evoplug.tools.check import check_conversion

# families of timm 1.0.31 the sweep covers and no other test does (the others the sweep
# passes: docs/bench/timm_sweep.json): rotary embeddings with registers (DINOv3), a hybrid with
# a convolutional stem (ViTamin), and Hiera (mask-unit attention: windows cut from the sequence);
# with fewer blocks (the sweep converts them whole)
SWEPT = [("vit_small_patch16_dinov3", dict(depth=6), "converts"),
         ("vitamin_small_224", dict(depth=6), "converts"),
         ("hiera_tiny_224", dict(stages=(1, 2, 3, 2)), "converts")]


@pytest.mark.parametrize("name,kwargs,status", SWEPT, ids=[s[0] for s in SWEPT])
def test_swept_families_pass_the_check(name, kwargs, status):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear) and not head.weight.any():   # Hiera's: zero-initialised
        torch.nn.init.normal_(head.weight, std=0.02)   # (the check warns: test below)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = check_conversion(model)
    assert r.status == status, str(r)
    assert not r.problems and not r.warnings and r.ok
    assert r.keep1_fast_diff <= 1e-5 and r.keep1_machinery_diff <= 1e-5 and r.batch_diff <= 1e-4
    assert r.evolving >= 4 and all(0 < t < n for t, n in r.tokens_evolving)
    assert 0 < r.rel_change < 10                     # keep 0.5 changes the output, finitely
    assert not evoplug.is_converted(model)           # the model itself is left as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _small_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=6).eval()


def test_an_all_zero_output_is_a_warning():
    """A zero-initialised head (Hiera's) makes every output comparison empty: said, not passed
    over in silence."""
    model = _small_vit()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    assert "output is all zeros" in check_conversion(model).warnings[0]


class _RandomlyMasked(torch.nn.Module):
    """MAE's pre-training encoder: a random half of the patches, drawn at every forward."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, img):
        v = self.vit
        x = v.patch_embed(img) + v.pos_embed[:, 1:]
        keep = torch.rand(x.shape[:2], device=x.device).argsort(1)[:, :x.shape[1] // 2]
        x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([(v.cls_token + v.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], 1)
        return v.head(v.norm(v.blocks(x))[:, 0])


def test_a_model_that_draws_at_random_is_said_so_not_blamed_on_the_conversion():
    """Two forwards of a model with random masking differ: the check reported the conversion
    WRONG (keep 1.0 off by 2.5) until the eighteenth session; it says the model draws, and
    compares forwards that start from the same seed."""
    r = check_conversion(_RandomlyMasked(_small_vit()), example_input=torch.randn(2, 3, 64, 64))
    assert r.status == "converts" and not r.problems, str(r)
    assert any("changes between two calls on the same input" in w for w in r.warnings), str(r)
    assert r.keep1_machinery_diff <= 1e-5


def test_blocks_that_add_nothing_are_a_warning():
    """Blocks whose residual branches are zero at initialisation (timm's SwinV2 zero-initialises
    its post-norms) give the original output at keep 0.5 although they run fewer tokens: the
    check says its output comparisons showed nothing, instead of passing it in silence (the
    swept families of the test above, with the same random weights, are not flagged)."""
    model = _small_vit()
    assert not any("cannot show the selection" in w for w in check_conversion(model).warnings)
    with torch.no_grad():
        for blk in model.blocks:
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    r = check_conversion(model)
    assert r.rel_change == 0 and r.evolving >= 1 and all(t < n for t, n in r.tokens_evolving)
    assert any("changes the output by 0.0e+00 only" in w for w in r.warnings), r.warnings


def test_the_check_finds_images_of_a_batch_mixed(monkeypatch):
    """A runtime whose subset copy took its rows from the next image of the batch would give
    plausible outputs at keep 0.5; the batch-independence check catches it."""
    take = ev.gather_subset

    def mixed(x, sel, rep):
        return take(x.roll(1, 0), sel, rep)
    monkeypatch.setattr(ev, "gather_subset", mixed)
    import evoplug.runtime.block as block
    monkeypatch.setattr(block.ev, "gather_subset", mixed)
    r = check_conversion(_small_vit())
    assert r.status == "WRONG" and any("image 0 alone differs" in p for p in r.problems), str(r)
    assert r.keep1_fast_diff == 0                    # the fast path alone would not have shown it
    # the machinery's difference is no float32 rounding: float64 shows it as well
    assert r.keep1_float64_diff > 1e-3
    assert any(p.startswith("keep1_machinery_diff") and "float64" in p for p in r.problems), str(r)


def test_the_check_finds_gradients_a_backward_scales_at_keep_1(monkeypatch):
    """A restore whose backward scales the slow path's gradient by 1.01 (its forward exact):
    every output comparison passes; the keep-1.0 gradients against the original's do not."""
    restore = ev.restore

    def scaled(base, out_sub, sel, rep):
        return restore(base, out_sub + 0.01 * (out_sub - out_sub.detach()), sel, rep)
    monkeypatch.setattr(ev, "restore", scaled)
    r = check_conversion(_small_vit())
    assert r.keep1_fast_diff == 0 and r.keep1_machinery_diff < 1e-5, str(r)
    assert r.status == "WRONG" and 1e-3 < r.keep1_grad_diff < 0.1, str(r)
    assert any("gradients off the original's" in p for p in r.problems), str(r)
    monkeypatch.setattr(ev, "restore", restore)
    r = check_conversion(_small_vit())
    assert r.status == "converts" and r.keep1_grad_diff < 1e-5, str(r)
    # float32 rounding over a bound: float64 shows the same computation, a warning
    r = check_conversion(_small_vit(), grad_bound=0.0)
    assert r.status == "converts" and r.keep1_grad_diff > 0.0, str(r)
    assert any("gradients off the original's" in w and "in float64" in w for w in r.warnings)


def _planted(how):
    """A runtime with one of the Evo-ViT rules broken, each a plausible slip: the lowest-scored
    tokens kept, no representative residual on the tokens not kept, the kept tokens' outputs
    written back one place off."""
    select, restore = ev.select, ev.restore
    if how == "bottom_k":
        def broken(g, k, P, C, *args, **kwargs):
            flipped = g.clone()
            flipped[..., P:] = -flipped[..., P:]
            return select(flipped, k, P, C, *args, **kwargs)._replace(
                vals=select(g, k, P, C, *args, **kwargs).vals)
        return "select", broken

    def broken(base, out_sub, sel, rep):
        if how == "no_representative" and rep is not None:
            return base.scatter(1, sel.index, out_sub[:, :sel.index.shape[1]])
        if how == "one_place_off" and sel.index.shape[1] < base.shape[1]:
            sel = sel._replace(index=torch.cat([sel.index[:, :1], sel.index[:, 1:].roll(1, 1)], 1))
        return restore(base, out_sub, sel, rep)
    return "restore", broken


@pytest.mark.parametrize("how", ["bottom_k", "no_representative", "one_place_off"])
def test_the_check_rebuilds_the_evo_vit_update_and_finds_a_broken_rule(monkeypatch, how):
    """At keep 0.5 the check compared shapes, finite values, token counts and batch
    independence only: a runtime that kept the worst tokens, dropped the representative
    token's residual, or wrote the kept tokens' outputs back one place off passed it (audit U2,
    thirty-sixth session). It now rebuilds the update of plain evolving blocks from the paper's
    rules on each block's own input and the block's original forward."""
    model = _small_vit()
    honest = check_conversion(model)
    assert honest.ok and honest.evolution_checked[0] == 3 and honest.evolution_checked[1] >= 3
    assert honest.evolution_diff < 1e-5 and honest.hand_on_diff < 1e-5, str(honest)
    assert "rebuilt from the paper's rules" in str(honest)
    name, broken = _planted(how)
    monkeypatch.setattr(ev, name, broken)
    r = check_conversion(model)
    assert r.status == "WRONG" and r.evolution_diff > 1e-2, str(r)
    assert any("rebuilt from the paper's rules" in p for p in r.problems), str(r)
    assert r.keep1_fast_diff == 0 and r.batch_diff < 1e-4     # (what the check had: all fine)


@pytest.mark.parametrize("how", ["bottom_k", "one_place_off"])
def test_without_the_representative_token_the_update_and_scores_are_still_rebuilt(monkeypatch, how):
    """With ``representative=False`` (``evoplug check --no-representative``) the update and the
    global scores were not rebuilt at all (``evolution_checked (0, 0)``, ``scores_checked 0``)
    and a runtime that kept the worst tokens or wrote the kept tokens back one place off passed
    (until the forty-third session, audit G2 of the forty-third session). The reference
    without the representative token: the non-selected tokens keep their values."""
    model = _small_vit()
    for opts in (dict(), dict(global_query="mean", trade_off=0.3)):
        honest = check_conversion(model, representative=False, **opts)
        assert honest.ok and honest.evolution_checked[0] == 3 and honest.scores_checked >= 1, str(honest)
        assert honest.evolution_diff < 1e-5 and honest.scores_diff < 1e-5, str(honest)
    name, broken = _planted(how)
    monkeypatch.setattr(ev, name, broken)
    r = check_conversion(model, representative=False)
    assert r.status == "WRONG" and r.evolution_diff > 1e-2, str(r)
    assert any("rebuilt from the paper's rules" in p for p in r.problems), str(r)


def _planted_scores(how):
    """A runtime whose score update is wrong and whose update rule is right: the kept tokens'
    scores not refreshed, refreshed with each other's attention, or the first scores put on
    the tokens in reverse order."""
    refresh, first = ev.refresh, ev.first_scores
    if how == "not_refreshed":
        return "refresh", lambda sel, row, weight: sel
    if how == "rows_swapped":
        return "refresh", lambda sel, row, weight: refresh(sel, row.flip(-1), weight)
    return "first_scores", lambda row, *args, **kwargs: first(row.flip(-1), *args, **kwargs)


@pytest.mark.parametrize("how", ["not_refreshed", "rows_swapped", "first_row_reversed"])
def test_the_check_rebuilds_the_global_scores_and_finds_a_broken_update(monkeypatch, how):
    """The update check took the global scores from the runtime: a runtime that ranked the
    tokens by wrong scores passed it (a known limit until the thirty-eighth session). The
    scores each block receives are now rebuilt from the block before it: its input scores and
    the attention map its own forward computes (read by ``tools/attention_maps.py``, apart
    from the runtime), g = (1 - alpha) g + alpha a at the kept tokens."""
    model = _small_vit()              # (honest: test_the_rebuilt_scores_agree_with_the_runtime)
    name, broken = _planted_scores(how)
    monkeypatch.setattr(ev, name, broken)
    r = check_conversion(model)
    assert r.status == "WRONG" and r.scores_diff > 1e-2, str(r)
    assert any("global attention scores" in p for p in r.problems), str(r)
    assert r.evolution_diff < 1e-5 and r.hand_on_diff < 1e-5     # (what the check had: fine)


class _EncoderLayersViT(torch.nn.Module):
    """PyTorch's ``nn.TransformerEncoderLayer`` (sequence-first, its default) over a class
    token and 4 px patches."""

    def __init__(self, d=64, depth=6):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, d, 4, 4)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, d))
        self.enc = torch.nn.Sequential(*[torch.nn.TransformerEncoderLayer(
            d, 4, 2 * d, dropout=0.0) for _ in range(depth)])

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        return self.enc(t.transpose(0, 1))[0]


KINDS = ["cls_query", "mean_query_and_trade_off", "plain_mha", "torch_layers", "explicit_softmax",
         "blocks_before_the_first_converted"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_rebuilt_scores_agree_with_the_runtime(kind):
    """The scores rebuilt from the blocks' own maps agree with the runtime's, on timm's fused
    attention with a class token and on the other forms of attention: the mean query (no class token), another trade-off,
    ``nn.MultiheadAttention`` in a hand-written layer, PyTorch's ``nn.TransformerEncoderLayer``
    (sequence-first; its fused fast path) and a softmax written out."""
    torch.manual_seed(0)
    options = {}
    if kind == "plain_mha":
        from plain_vit import PlainViT
        model = PlainViT(batch_first=False).eval()
    elif kind == "torch_layers":
        model = _EncoderLayersViT().eval()
    elif kind == "cls_query":
        model = _small_vit()
    elif kind == "blocks_before_the_first_converted":
        # ConViT: 4 GPSA blocks (refused: two attention computations), then 2 converted ones;
        # the first converted block's context is the last forward's (a false alarm of 0.23
        # in the sweep until the check took no scores into the first block of a forward)
        model = timm.create_model("convit_tiny", pretrained=False, img_size=64, depth=6,
                                  local_up_to_layer=4).eval()
    else:
        mean = kind.startswith("mean_query")
        kw = dict(class_token=False, global_pool="avg") if mean else {}
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,
                                  depth=6, **kw).eval()
        if kind == "explicit_softmax":
            for blk in model.blocks:
                blk.attn.fused_attn = False
        options = dict(trade_off=0.2) if mean else {}
    x = torch.randn(2, 3, 32, 32) if kind in ("plain_mha", "torch_layers") else None
    r = check_conversion(model, x, **options)
    want = 1 if kind == "blocks_before_the_first_converted" else 3
    assert r.ok and r.scores_checked == want and r.scores_diff < 1e-5, str(r)
    assert f"global scores of {want} block(s) rebuilt" in str(r)


class _TwoMaps(torch.nn.Module):
    """A backbone returning a map of its (dense) stem first, then the last block's tokens."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, img):
        v = self.vit
        x = v._pos_embed(v.patch_embed(img))
        return {"stem": x, "last": v.norm(v.blocks(x))}


def test_every_output_of_a_backbone_is_checked(monkeypatch):
    """The check compared the first output only: a backbone's first map comes before any
    evolving block, so keep 0.5 'changed nothing' (a warning) and a runtime that mixed the
    images of a batch passed (SegFormer's MiT in mmseg, audit of the twenty-second session)."""
    model = _TwoMaps(_small_vit())
    r = check_conversion(model, example_input=torch.randn(2, 3, 64, 64))
    assert r.status == "converts" and r.ok, str(r)
    assert r.rel_change > 1e-3 and not any("cannot show" in w for w in r.warnings), str(r)
    take = ev.gather_subset
    import evoplug.runtime.block as block
    monkeypatch.setattr(block.ev, "gather_subset", lambda x, sel, rep: take(x.roll(1, 0), sel, rep))
    r = check_conversion(model, example_input=torch.randn(2, 3, 64, 64))
    assert r.status == "WRONG" and any("image 0 alone differs" in p for p in r.problems), str(r)


def test_float32_rounding_the_model_amplifies_is_a_warning():
    """Logits of 1e5 (EoMT thresholds its own mask logits, with the same effect): keep 1.0
    through the machinery sums in another order and differs by more than the absolute bound in
    float32, by nothing in float64."""
    model = _small_vit()
    with torch.no_grad():
        model.head.weight.mul_(1e5)
    r = check_conversion(model)
    assert r.ok and r.keep1_machinery_diff > 1e-5 and r.keep1_float64_diff <= 1e-9, str(r)
    assert any("float64" in w for w in r.warnings)


@pytest.mark.slow
def test_the_check_finds_blocks_that_no_scores_reach(monkeypatch):
    """Swinv2 with its windows not mapped (see test_pyramid): the strict conversion refuses it,
    the check converts with strict=False and reports the blocks that run every token: a
    warning where explain() says so (the report's ``unscored``), a problem where it does not."""
    from evoplug.analyse import grid
    from evoplug.runtime import block as runtime_block
    monkeypatch.setattr(grid, "_LINEAR", ())
    monkeypatch.setattr(grid, "_index_through_token_wise", lambda *args: None)
    # (narrowed, fewer blocks: the same kinds of blocks and tokens, several times faster)
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, embed_dim=48,
                              depths=(1, 2, 2, 2)).eval()
    r = check_conversion(model)
    assert r.status == "partly" and "no global attention row" in r.refused and not r.problems
    assert any("4 evolving block(s) ran every token, as explain() says" in w for w in r.warnings), str(r)
    # a block that runs every token where explain() says it evolves is a problem
    dense = runtime_block.EvoBlockMixin._dense
    monkeypatch.setattr(runtime_block.EvoBlockMixin, "_evolve",
                        lambda self, x, extras, program, state, role, opt:
                        dense(self, x, extras, program, state, None))
    r = check_conversion(model)
    assert r.status == "WRONG" and any("ran every token: [" in p for p in r.problems), str(r)


def test_blocks_with_too_few_tokens_to_run_fewer_are_a_warning():
    """PVTv2 at 32 px: its last stage has one token, which keep 0.5 keeps (and 2 tokens, one kept
    and the representative, would run both). explain() said "evolving" and the check called the
    model WRONG for blocks that ran every token (audit J); both say why now."""
    model = timm.create_model("pvt_v2_b0", pretrained=False, depths=(1, 1, 1, 2)).eval()
    r = check_conversion(model, torch.randn(2, 3, 32, 32))
    assert r.status == "converts" and not r.problems, str(r)
    assert any("2 evolving block(s) have too few tokens to run fewer at keep 0.5" in w for w in r.warnings)
    fast = evoplug.convert(model, 0.5, example_input=torch.randn(2, 3, 32, 32))
    assert evoplug.get_report(fast).too_few == ["stages.3.blocks.0", "stages.3.blocks.1"]
    assert "evolving, too few tokens: all run" in evoplug.explain(fast)
    assert [ev.runs_every_token(m, 0.5, True) for m in (1, 2, 3, 4)] == [True, True, False, False]
    assert [ev.runs_every_token(m, 0.5, False) for m in (1, 2, 3)] == [True, False, False]


def test_at_keep_1_no_block_is_said_to_have_too_few_tokens():
    """At keep 1.0 explain() labelled every evolving block "evolving, too few tokens: all run"
    and the report's ``too_few`` listed them all (until the forty-third session, audit G2 of
    the forty-third session): they run every token because keep 1.0 keeps every token, which
    is what it says now; the same blocks at keep 0.5 run fewer, as the check finds."""
    model = _small_vit()
    x = torch.randn(2, 3, 64, 64)
    fast = evoplug.convert(model, 1.0, example_input=x)
    evolving = [s.name for s in evoplug.get_report(fast).blocks if s.role == "evolve"]
    assert len(evolving) == 4 and evoplug.get_report(fast).too_few == []
    text = evoplug.explain(fast)
    assert "too few tokens" not in text and text.count("evolving, keep 1.0: all run") == 4
    evoplug.set_options(fast, keep_ratio=0.5)
    with torch.no_grad():
        fast(x)
    assert all(s.tokens_run < s.analysis.num_tokens for s in evoplug.get_report(fast).blocks
               if s.role == "evolve")
    assert evoplug.get_report(fast).too_few == [] and "all run" not in evoplug.explain(fast)


def test_the_check_reports_a_refusal():
    model = timm.create_model("resnet18", pretrained=False).eval()
    r = check_conversion(model, torch.randn(2, 3, 32, 32))
    assert r.status == "refused" and not r.ok and "no convertible transformer block" in r.refused
    with pytest.raises(ValueError, match="at least 2 images"):
        check_conversion(model, torch.randn(1, 3, 32, 32))


def test_the_check_copies_a_model_keeping_tensors_with_autograd_history():
    """The check's own copy of the model was ``copy.deepcopy``, which raised torch's raw "Only
    Tensors created explicitly by the user (graph leaves) support the deepcopy protocol" on a
    model that keeps the outputs of a training forward (kornia's ViT encoder, ``results``;
    audit W3 of the thirty-eighth session). It copies as the conversion does (detached)."""
    from plain_vit import RecordingViT
    torch.manual_seed(0)
    model, x = RecordingViT(depth=6), torch.randn(2, 3, 32, 32)
    model.train()
    model(x).mean().backward()
    model.eval()
    # (reselect_every=1: blocks' outputs a training forward keeps in the selection's order are
    # refused by name otherwise, runtime/guard.py)
    r = check_conversion(model, x, reselect_every=1)
    assert r.status == "converts" and not r.problems and not r.warnings, (r.problems, r.warnings)
    assert model.results[0].grad_fn is not None
    # with the default reselect_every, that refusal ended the check with a traceback (until
    # the thirty-eighth session): a warning now, the other checks made
    r = check_conversion(model, x)
    assert r.status == "converts" and not r.problems, r.problems
    assert any("training step of the converted model is refused" in w and "reselect_every=1" in w
               for w in r.warnings), r.warnings


def test_check_command(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert cli.main(["check", "vit_tiny_patch16_224", "--img-size", "64", "--model-arg", "depth=6",
                     "--keep", "0.5", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "vit_tiny_patch16_224: converts: 4/6 blocks evolving (first: 10 of 17 tokens)" in text
    saved = json.loads(out.read_text())["vit_tiny_patch16_224"]
    assert saved["status"] == "converts" and saved["problems"] == []
    assert cli.main(["check", "resnet18", "--json", str(tmp_path / "refused.json")]) == 1
    assert "refused: ConversionError" in capsys.readouterr().out
    # strict JSON: figures not measured are null, not NaN (until the twenty-sixth session)
    def no_constant(c):
        raise AssertionError(f"{c} in the JSON")
    saved = json.loads((tmp_path / "refused.json").read_text(), parse_constant=no_constant)
    assert saved["resnet18"]["status"] == "refused"


@pytest.mark.slow
def test_the_check_compiles_and_compares():
    """compile=BACKEND: dynamo's graphs of the converted forward and the compiled output
    against the eager one (aot_eager here: the graph capture and functionalisation without
    Inductor's code generation)."""
    r = check_conversion(_small_vit(), compile="aot_eager")
    assert r.ok and r.graphs == 1 and not r.graph_breaks and r.compile_diff <= 1e-4, str(r)
    assert "torch.compile: 1 graph(s)" in str(r)


def test_the_check_tells_a_fragile_selection():
    """Where input noise of 1e-3 changes the converted output far more than the original's, the
    selection is fragile and batch or compile differences are warnings, not problems: PVTv2-b0
    with its queries' weights scaled by 30 (score margins of 2.5e-5 at the k-th token). With
    its random weights as they are its output moved by 0.77 under that noise until the
    nineteenth session: its scores tie exactly (a row upsampled from the reduced keys) and
    topk broke the ties by rounding; the stable sort breaks them by token index, and that
    selection is stable now, as a DeiT's is."""
    from evoplug.tools.check import CheckResult, _flag
    torch.manual_seed(0)
    pvt = timm.create_model("pvt_v2_b0", pretrained=False).eval()
    stable = check_conversion(pvt)
    assert stable.ok and stable.selection_stable and stable.noise_change < 0.01
    with torch.no_grad():
        for n, p in pvt.named_parameters():
            if n.endswith("attn.q.weight"):
                p.mul_(30.0)
    fragile = check_conversion(pvt)
    assert fragile.ok and not fragile.selection_stable and fragile.noise_change > 0.1
    vit = check_conversion(_small_vit())
    assert vit.selection_stable and vit.noise_change < 0.01
    r = CheckResult(status="converts", noise_change=0.5, selection_stable=False)
    _flag(r, "keep 0.5 batch of 2 vs alone: 0.4")
    assert not r.problems and "fragile" in r.warnings[0] and "5.0e-01" in r.warnings[0]


def test_the_check_runs_on_an_mmpretrain_backbone():
    """MMPretrain's backbones return None from ``train()`` (so from ``eval()``): the check's
    ``copy.deepcopy(model).eval()`` handed on None, and ``check_conversion`` of any MMPretrain
    backbone failed ('NoneType' object is not callable) until the thirty-sixth session. The
    rebuilt update agrees with its blocks."""
    import evoplug.mm  # noqa: F401 (before mmpretrain: its registry and transformers 5)
    mm = pytest.importorskip("mmpretrain.models")
    torch.manual_seed(0)
    model = mm.VisionTransformer(arch="deit-tiny", img_size=64, patch_size=8)
    model.eval()
    r = check_conversion(model, torch.randn(2, 3, 64, 64))
    assert r.status == "converts" and r.evolution_checked[0] == 3, str(r)
    assert r.evolution_diff < 1e-5 and not model.training
