"""Train / fine-tune an MMPretrain config with MMEngine's Runner (evoplug registered first).

    python -m evoplug.mm.train CONFIG [--work-dir DIR] [--resume [CHECKPOINT]] [--amp]
                               [--cfg-options key=value ...]

The same as MMPretrain's ``tools/train.py`` for a single process; that script works too, since
evoplug's base config imports ``evoplug.mm`` through ``custom_imports``.
"""
from __future__ import annotations

import argparse
import os.path as osp
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None):
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(prog="python -m evoplug.mm.train", description=__doc__.split("\n")[0])
    p.add_argument("config", help="config file (e.g. examples/mmpretrain/evo-deit-small_4xb256_in1k.py)")
    p.add_argument("--work-dir", help="where logs and checkpoints go (default ./work_dirs/<config name>)")
    p.add_argument("--resume", nargs="?", type=str, const="auto",
                   help="resume from this checkpoint, or without a value from the latest one in the work dir")
    p.add_argument("--amp", action="store_true", help="automatic mixed precision")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default=None,
                   help="override config settings, e.g. train_cfg.max_epochs=1 load_from=dense.pth")
    return p.parse_args(argv)


def build_runner(cfg):
    """MMEngine's Runner for ``cfg`` (``runner_type`` honoured), after importing evoplug.mm."""
    import evoplug.mm  # noqa: F401  registers the model types and the checkpoint allow-list
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    return Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)


def main(argv: Optional[List[str]] = None):
    import evoplug.mm  # noqa: F401
    from mmengine.config import Config
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    if args.resume == "auto":
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    runner = build_runner(cfg)
    runner.train()
    return runner


if __name__ == "__main__":
    main()
