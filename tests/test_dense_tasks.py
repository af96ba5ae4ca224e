"""MMSegmentation and MMDetection with Evo backbones on a machine with mmcv-lite only: the
opt-in stand-in for mmcv's compiled ops (``evoplug.integrations.mmcv_ops``) lets their model
packages import; a segmenter (EncoderDecoder + UPerHead) with ``mmpretrain.EvoVisionTransformer``
and a detector (RetinaNet) with ``mmpretrain.EvoSwinTransformer`` build, take training steps
and predict. Skipped without mmseg / mmdet."""
import sys
import types

import pytest
import torch

pytest.importorskip("mmseg")
pytest.importorskip("mmdet")
pytest.importorskip("mmpretrain")

from evoplug.integrations import mmcv_ops  # noqa: E402  (installs the stand-in if needed)

import evoplug  # noqa: E402
import evoplug.mm  # noqa: E402,F401


def test_stand_in_serves_nms_and_names_the_ops_it_cannot_run():
    from mmcv.ops import batched_nms, nms
    from torchvision.ops import nms as tv_nms
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g) * 10], 1)
    scores = torch.rand(50, generator=g)
    dets, keep = nms(boxes, scores, 0.3)
    assert torch.equal(keep, tv_nms(boxes, scores, 0.3))
    assert torch.equal(dets[:, 4], scores[keep])
    _, keep_b = batched_nms(boxes, scores, torch.arange(50) % 3, dict(type="nms", iou_threshold=0.3))
    assert len(keep_b) >= len(keep)
    if mmcv_ops.installed():
        ext = sys.modules["mmcv._ext"]
        with pytest.raises(mmcv_ops.CompiledOpMissing, match="`ms_deform_attn_forward` needs a compiled mmcv"):
            ext.ms_deform_attn_forward(torch.zeros(1))
        with pytest.raises(mmcv_ops.CompiledOpMissing, match="use_torchvision=True"):
            ext.roi_align_backward()


def test_stand_in_is_never_used_over_a_compiled_mmcv(monkeypatch):
    """A real ``mmcv._ext`` that imports wins: install() changes nothing and says so."""
    real = types.ModuleType("mmcv._ext")
    monkeypatch.setitem(sys.modules, "mmcv._ext", real)
    assert mmcv_ops.install() is False and sys.modules["mmcv._ext"] is real
    assert not mmcv_ops.installed()


TINY_VIT = dict(arch=dict(embed_dims=96, num_layers=6, num_heads=3, feedforward_channels=384),
                img_size=64, patch_size=8, out_indices=(1, 3, 5), out_type="featmap")


def _segmenter(backbone_type, **evo):
    from mmseg.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope("mmseg")
    backbone = dict(type=backbone_type, **TINY_VIT, **({"evo": evo} if evo else {}))
    from mmengine.config import ConfigDict
    return MODELS.build(ConfigDict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[0.0] * 3, std=[1.0] * 3, size=(64, 64)),
        backbone=backbone,
        neck=dict(type="MultiLevelNeck", in_channels=[96, 96, 96], out_channels=64, scales=[2, 1, 0.5]),
        decode_head=dict(type="UPerHead", in_channels=[64, 64, 64], in_index=[0, 1, 2], pool_scales=(1, 2),
                         channels=32, num_classes=4, norm_cfg=dict(type="BN"), align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss")),
        train_cfg=dict(), test_cfg=dict(mode="whole")))


def _seg_batch(n=2):
    from mmseg.structures import SegDataSample
    from mmengine.structures import PixelData
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(n):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, 4, (1, 64, 64), generator=g))
        s.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(s)
    return dict(inputs=[torch.rand(3, 64, 64, generator=g) * 255 for _ in range(n)], data_samples=samples)


def test_segmenter_with_an_evo_backbone_trains_and_predicts():
    torch.manual_seed(0)
    dense = _segmenter("mmpretrain.VisionTransformer")
    evo = _segmenter("mmpretrain.EvoVisionTransformer", keep_ratio=0.5)
    evo.load_state_dict(dense.state_dict(), strict=True)
    assert len(evoplug.get_report(evo.backbone).blocks) == 6
    optim = torch.optim.AdamW(evo.parameters(), lr=1e-3)
    evo.train()
    for _ in range(2):
        losses = evo.loss(**evo.data_preprocessor(_seg_batch(), True))
        loss = sum(v for k, v in losses.items() if "loss" in k)
        optim.zero_grad()
        loss.backward()
        optim.step()
        assert torch.isfinite(loss)
    assert dict(evoplug.tokens_per_block(evo.backbone))["layers.5"] == 1 + 32 + 1
    evo.eval()
    with torch.no_grad():
        pred = evo.test_step(_seg_batch())
    assert pred[0].pred_sem_seg.data.shape == (1, 64, 64)


def test_detector_with_an_evo_swin_backbone_takes_a_step_and_predicts():
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmengine.registry import init_default_scope
    from mmengine.structures import InstanceData
    init_default_scope("mmdet")
    torch.manual_seed(0)
    from mmengine.config import ConfigDict
    det = MODELS.build(ConfigDict(
        type="RetinaNet",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=[0.0] * 3, std=[1.0] * 3, pad_size_divisor=32),
        backbone=dict(type="mmpretrain.EvoSwinTransformer", arch=dict(embed_dims=32, depths=[2, 2, 2, 2],
                      num_heads=[1, 2, 4, 8]), img_size=128, out_indices=(1, 2, 3), window_size=4,
                      evo=dict(keep_ratio=0.5)),
        neck=dict(type="FPN", in_channels=[64, 128, 256], out_channels=32, start_level=0,
                  add_extra_convs="on_input", num_outs=3),
        bbox_head=dict(type="RetinaHead", num_classes=3, in_channels=32, stacked_convs=1, feat_channels=32,
                       anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4,
                                             scales_per_octave=1, ratios=[1.0], strides=[8, 16, 32]),
                       bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
                       loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
                       loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        train_cfg=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                                     ignore_iof_thr=-1), sampler=dict(type="PseudoSampler"),
                       allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=dict(nms_pre=100, min_bbox_size=0, score_thr=0.0, nms=dict(type="nms", iou_threshold=0.5),
                      max_per_img=20)))
    assert len(evoplug.get_report(det.backbone).blocks) == 8

    def batch():
        s = DetDataSample()
        s.gt_instances = InstanceData(bboxes=torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]]),
                                      labels=torch.tensor([0, 2]))
        s.set_metainfo(dict(img_shape=(128, 128), ori_shape=(128, 128), pad_shape=(128, 128),
                            scale_factor=(1.0, 1.0), batch_input_shape=(128, 128)))
        return dict(inputs=[torch.rand(3, 128, 128) * 255], data_samples=[s])

    det.train()
    data = det.data_preprocessor(batch(), True)
    losses = det.loss(data["inputs"], data["data_samples"])
    loss = sum(sum(v) if isinstance(v, list) else v for k, v in losses.items() if "loss" in k)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(t > 0 for _, t in evoplug.tokens_per_block(det.backbone))
    det.eval()
    with torch.no_grad():
        out = det.test_step(batch())
    assert out[0].pred_instances.bboxes.shape[-1] == 4 and len(out[0].pred_instances) <= 20


@pytest.mark.parametrize("framework, cfg, size", [
    ("mmseg", dict(type="EvoVisionTransformer", img_size=(64, 64), patch_size=8, embed_dims=96, num_layers=6,
                   num_heads=3, out_indices=(1, 3, 5)), 64),
    ("mmseg", dict(type="EvoMixVisionTransformer", embed_dims=32, num_layers=[2, 2, 2, 2], num_heads=[1, 2, 5, 8],
                   out_indices=(0, 1, 2, 3)), 64),
    ("mmseg", dict(type="EvoSwinTransformer", embed_dims=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                   window_size=4, pretrain_img_size=128), 128),
    ("mmdet", dict(type="EvoSwinTransformer", embed_dims=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                   window_size=4, pretrain_img_size=128), 128),
    ("mmdet", dict(type="EvoPyramidVisionTransformerV2", embed_dims=32, num_layers=[2, 2, 2, 2]), 128),
])
def test_framework_backbones_registered_in_evo_form(framework, cfg, size):
    """mmseg's / mmdet's own transformer backbones as ``Evo<Name>`` in their registries: every
    block converts (SegFormer's and PVTv2's spatial-reduction attention through
    nn.MultiheadAttention included), the dense weights load strictly, keep 1.0 through the
    selection machinery gives the dense feature maps, keep 0.5 other values of the same shapes.
    A backbone built for a size (``img_size``, Swin's ``pretrain_img_size``) is converted at that
    size without ``input_size`` (Swin's was converted at 224 px, then again at its first call:
    audit M4 of the twenty-eighth session)."""
    import importlib
    importlib.import_module(f"evoplug.{framework}")
    from mmengine.registry import init_default_scope
    registry = importlib.import_module(f"{framework}.registry").MODELS
    init_default_scope(framework)
    torch.manual_seed(0)
    dense_cfg = dict(cfg, type=cfg["type"][3:])
    dense = registry.build(dense_cfg)
    built_for = "img_size" in cfg or "pretrain_img_size" in cfg
    evo = registry.build(dict(cfg, evo=dict(keep_ratio=0.5) if built_for else
                              dict(keep_ratio=0.5, input_size=size)))
    evo.load_state_dict(dense.state_dict(), strict=True)
    dense.eval()
    evo.eval()
    report = evoplug.get_report(evo)
    assert not report.failed and len(report.blocks) in (6, 8)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        d, half = dense(x), evo(x)
        evoplug.set_options(evo, keep_ratio=1.0, identity_fast_path=False)
        full = evo(x)
    assert [t.shape for t in half] == [t.shape for t in d]
    for a, b in zip(d, full):
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(a.abs().max()))
    assert any(not torch.allclose(a, b) for a, b in zip(d, half))
    assert not report.blocks[0].runtime.variants      # no second conversion at the first call


def test_segmentation_config_trains_on_digit_canvases_with_the_runner(tmp_path):
    """The shipped example config (mmseg's own UPerNet-ViT model config, the backbone as
    EvoVisionTransformer) on a few real MNIST canvases: MMEngine's Runner trains, validates with
    mmseg's IoUMetric and saves; the checkpoint loads strictly into the dense config's model."""
    import importlib.util
    import os
    from mmengine.config import Config
    from evoplug.mm.train import build_runner
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "mmseg")
    spec = importlib.util.spec_from_file_location("digit_canvas", os.path.join(examples, "digit_canvas.py"))
    canvas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(canvas)
    root = str(tmp_path / "canvas")
    info = canvas.write_canvases(root, n_train=8, n_val=4)       # one batch each
    assert info["classes"][0] == "background" and len(info["classes"]) == 11
    cfg = Config.fromfile(os.path.join(examples, "evo-vit-uper_digit-canvas.py"))
    for dl in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[dl].dataset.data_root = root
    cfg.val_dataloader.batch_size = 4
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=1, val_interval=1)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=1)
    cfg.work_dir = str(tmp_path / "work")
    runner = build_runner(cfg)
    runner.train()
    assert 0.0 <= float(runner.message_hub.get_scalar("val/mIoU").current()) <= 100.0
    assert dict(evoplug.tokens_per_block(runner.model.backbone))["layers.5"] == 1 + 128 + 1
    dense_cfg = Config.fromfile(os.path.join(examples, "vit-uper_digit-canvas.py"))
    from mmseg.registry import MODELS
    dense = MODELS.build(dense_cfg.model)
    state = torch.load(os.path.join(cfg.work_dir, "iter_1.pth"), map_location="cpu", weights_only=False)
    dense.load_state_dict(state["state_dict"], strict=True)


def test_evo_swin_backbone_takes_the_sizes_a_detector_trains_at():
    """mmdet's multi-scale training pads images to other sizes than the backbone was converted
    at (MMPretrain's Swin then called its blocks with another ``hw_shape``): each new size gets
    its own conversion at its first forward, sharing the weights; keep 1.0 stays exact. (Two
    stages, each with its shifted block; the new sizes' maps are padded to whole windows.)"""
    from mmpretrain.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope("mmpretrain")
    kw = dict(arch=dict(embed_dims=32, depths=[2, 2], num_heads=[1, 2]), img_size=128,
              out_indices=(0, 1), window_size=4)
    torch.manual_seed(0)
    dense = MODELS.build(dict(type="SwinTransformer", **kw))
    evo = MODELS.build(dict(type="EvoSwinTransformer", evo=dict(keep_ratio=0.5), **kw))
    evo.load_state_dict(dense.state_dict(), strict=True)
    dense.eval()
    evo.eval()
    for size in ((168, 168), (136, 200), (128, 128)):     # non-square maps too (COCO's are)
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            half = evo(x)
            evoplug.set_options(evo, keep_ratio=1.0, identity_fast_path=False)
            full, ref = evo(x), dense(x)
            evoplug.set_options(evo, keep_ratio=0.5, identity_fast_path=True)
        assert [t.shape for t in half] == [t.shape for t in ref]
        for a, b in zip(full, ref):
            assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))
    assert len(evoplug.get_report(evo).blocks[0].runtime.variants) == 2


def test_detection_config_trains_on_digit_boxes_with_the_runner(tmp_path):
    """The shipped detection config (mmdet's own RetinaNet model config, mmdet's Swin backbone as
    EvoSwinTransformer) on a few real MNIST canvases in COCO format: MMEngine's Runner trains,
    validates with mmdet's CocoMetric and saves; the checkpoint loads strictly into the dense
    config's model."""
    import importlib.util
    import os
    from mmengine.config import Config
    from evoplug.mm.train import build_runner
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "mmdet")
    spec = importlib.util.spec_from_file_location("digit_boxes", os.path.join(examples, "digit_boxes.py"))
    boxes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boxes)
    root = str(tmp_path / "boxes")
    info = boxes.write_boxes(root, n_train=4, n_val=4)          # one batch each
    assert len(info["classes"]) == 10
    cfg = Config.fromfile(os.path.join(examples, "evo-retinanet_swin_digit-boxes.py"))
    for dl in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[dl].dataset.data_root = root
    cfg.val_evaluator.ann_file = os.path.join(root, "annotations", "val.json")
    cfg.train_dataloader.batch_size = 4
    cfg.val_dataloader.batch_size = 4
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=1, val_interval=1)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=1)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.work_dir = str(tmp_path / "work")
    runner = build_runner(cfg)
    runner.train()
    assert torch.isfinite(torch.tensor(runner.message_hub.get_scalar("train/loss").current()))
    assert any(0 < t for _, t in evoplug.tokens_per_block(runner.model.backbone))
    from mmdet.registry import MODELS
    dense = MODELS.build(Config.fromfile(os.path.join(examples, "retinanet_swin_digit-boxes.py")).model)
    state = torch.load(os.path.join(cfg.work_dir, "iter_1.pth"), map_location="cpu", weights_only=False)
    dense.load_state_dict(state["state_dict"], strict=True)


def test_swin_t_coco_config_builds_on_mmdets_own_config():
    """examples/mmdet/evo-retinanet_swin-t-p4-w7_fpn_1x_coco.py: MMDetection's own RetinaNet +
    Swin-T config with the backbone in Evo form builds (converted here at a small non-square
    size instead of 800x1344), has the dense detector's state_dict keys and shapes, and its
    backbone gives the dense maps at keep 1.0 on a COCO-like non-square input."""
    import os
    from mmengine.config import Config
    from mmengine.hub import get_config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = Config.fromfile(os.path.join(root, "examples", "mmdet", "evo-retinanet_swin-t-p4-w7_fpn_1x_coco.py"))
    dense_cfg = get_config("mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py")
    assert cfg.model.backbone.type == "EvoSwinTransformer"
    assert cfg.model.backbone.embed_dims == 96 and cfg.model.backbone.depths == [2, 2, 6, 2]
    assert cfg.train_dataloader.dataset.type == "CocoDataset"     # mmdet's COCO pipeline, unchanged
    for c in (cfg, dense_cfg):
        c.model.backbone.init_cfg = None
    cfg.model.backbone.evo = dict(keep_ratio=0.5, input_size=(96, 160))
    torch.manual_seed(0)
    evo, dense = MODELS.build(cfg.model), MODELS.build(dense_cfg.model)
    assert {k: v.shape for k, v in evo.state_dict().items()} == \
        {k: v.shape for k, v in dense.state_dict().items()}
    evo.load_state_dict(dense.state_dict(), strict=True)
    evo.eval()
    dense.eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        half = evo.backbone(x)
        ran = dict(evoplug.tokens_per_block(evo.backbone))["stages.3.blocks.1"]   # 3x5 map
        evoplug.set_options(evo.backbone, keep_ratio=1.0, identity_fast_path=False)
        full, ref = evo.backbone(x), dense.backbone(x)
    assert 0 < ran < 15
    for a, b, h in zip(full, ref, half):
        assert a.shape == b.shape == h.shape
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


def test_swin_with_checkpointing_inside_its_blocks_is_refused_naming_it():
    """MMPretrain's Swin with ``with_cp=True`` branches on ``x.requires_grad`` inside each block
    (to checkpoint it): the refusal named a value-dependent branch in general terms until the
    eighteenth session; it names the checkpointing and the fix now."""
    from mmpretrain.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope("mmpretrain")
    kw = dict(arch=dict(embed_dims=32, depths=[2, 2], num_heads=[2, 4]), img_size=64,
              window_size=4, out_indices=(1,))
    with pytest.raises(evoplug.ConversionError, match=r"x.requires_grad.*with_cp=True.*with_cp=False"):
        MODELS.build(dict(type="EvoSwinTransformer", with_cp=True, evo=dict(keep_ratio=0.5), **kw))
    model = MODELS.build(dict(type="EvoSwinTransformer", with_cp=False, evo=dict(keep_ratio=0.5), **kw))
    assert evoplug.get_report(model).blocks
    for stage in model.stages:          # set after the conversion: refused with the same fix
        for block in stage.blocks:
            block.with_cp = True
    with torch.no_grad(), pytest.raises(evoplug.errors.EvoplugError,
                                        match="with_cp.*checkpoint the converted blocks from outside"):
        model.eval()
        model(torch.randn(2, 3, 64, 64))


@pytest.mark.slow
def test_mmseg_and_mmdet_evo_backbones_save_whole_and_load_in_a_fresh_process(tmp_path):
    """Their classes were named like MMPretrain's own Evo classes in that module, so
    ``torch.save`` of the backbone (and of any segmentor or detector on it) failed until the
    eighteenth session; they are found under ``evoplug.integrations.openmmlab`` now, registered
    when a fresh process asks for them."""
    import evoplug.mmdet  # noqa: F401
    import evoplug.mmseg  # noqa: F401
    from mmdet.registry import MODELS as DET
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS as SEG
    torch.manual_seed(0)
    init_default_scope("mmseg")
    seg = SEG.build(dict(type="EvoMixVisionTransformer", embed_dims=32, num_layers=[1, 1, 1, 1],
                         num_heads=[1, 2, 4, 8], evo=dict(input_size=64)))
    init_default_scope("mmdet")
    det = DET.build(dict(type="EvoSwinTransformer", embed_dims=32, depths=[2, 2, 2, 2],
                         num_heads=[1, 2, 4, 8], window_size=4, pretrain_img_size=64,
                         evo=dict(input_size=64)))
    init_default_scope("mmpretrain")        # (as the other tests here leave it)
    models = {"seg": seg, "det": det}
    for m in models.values():
        m.eval()       # (mmengine's BaseModule.eval returns nothing here)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = {k: m(x) for k, m in models.items()}
    from models import run_in_a_fresh_process
    out = run_in_a_fresh_process(tmp_path, {"models": models, "x": x, "want": want}, (
        "with torch.no_grad():\n"
        "    for k, m in d['models'].items():\n"
        "        assert all(torch.equal(a, b) for a, b in zip(m(d['x']), d['want'][k])), k\n"
        "print(*(type(m).__qualname__ for m in d['models'].values()))\n"),
        setup="from evoplug.integrations import mmcv_ops\nmmcv_ops.install()\n")
    assert out.split() == ["mmseg_classes.EvoMixVisionTransformer",
                                  "mmdet_classes.EvoSwinTransformer"]
