"""The Runner schedule the from-scratch dense-vs-Evo benchmarks on digit images share
(benchmarks/mmseg_digits.py, benchmarks/mmdet_digits.py): ``iters`` iterations with one
validation at the end, a linear warm-up then cosine to 1e-5, one checkpoint at the end."""


def short_run(cfg, work_dir: str, iters: int, seed: int, warm: int, logs: int):
    """Set ``cfg`` (an MMEngine Config) to that schedule, ``logs`` log lines, seed ``seed``."""
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters)
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.01, by_epoch=False, end=warm),
                           dict(type="CosineAnnealingLR", eta_min=1e-5, by_epoch=False, begin=warm, end=iters)]
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=iters, max_keep_ckpts=1)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=max(1, iters // logs), log_metric_by_epoch=False)
    cfg.work_dir = work_dir
    cfg.randomness = dict(seed=seed)
    return cfg
