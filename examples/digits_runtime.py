# What the digit-canvas (mmseg) and digit-box (mmdet) example configs share: the Runner's loops,
# hooks (each config adds its task's visualization hook and visualizer), environment and logging.
# No dist_cfg backend: `python -m evoplug.mm.train CONFIG --launcher pytorch` picks NCCL on GPUs
# and gloo on CPUs (a backend named here would be used on both).
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0))
vis_backends = [dict(type='LocalVisBackend')]
log_processor = dict(by_epoch=False)
log_level = 'INFO'
randomness = dict(seed=0)
load_from = None
resume = False
