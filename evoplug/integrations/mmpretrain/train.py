"""Train / fine-tune an MMPretrain config with MMEngine's Runner (evoplug registered first).

    python -m evoplug.mm.train CONFIG [--launcher {none,pytorch,slurm,mpi}] [--work-dir DIR]
                               [--resume [CHECKPOINT]] [--amp] [--compile] [--no-sync-bn]
                               [--cfg-options key=value ...]
    torchrun --nproc_per_node N -m evoplug.mm.train CONFIG --launcher pytorch

The same as MMPretrain's ``tools/train.py`` (that script works too, since evoplug's base config
imports ``evoplug.mm`` through ``custom_imports``), plus what it lacks without CUDA:

* ``--launcher pytorch`` on GPUs is MMEngine's own path: NCCL, one device per rank
  (``LOCAL_RANK``), DDP with ``device_ids=[LOCAL_RANK]``, and SyncBN (``sync_bn='torch'``) unless
  the config sets ``sync_bn`` or ``--no-sync-bn`` is given: BatchNorm statistics over the global
  batch (LeViT; a model without BatchNorm is unchanged).
* ``--launcher pytorch`` on CPUs: MMEngine's ``init_dist`` calls ``torch.cuda.set_device``, so the
  gloo process group is made here, before the Runner, and DDP is built without device ids.
  SyncBatchNorm runs on GPUs only: a config that asks for it on CPUs is refused.
* ``--amp``: float16 with a dynamic loss scale on GPUs (MMEngine's ``AmpOptimWrapper``),
  bfloat16 autocast on CPUs (:class:`CpuBf16OptimWrapper`; bfloat16 needs no loss scale).
* ``--compile`` (or ``compile=True`` / ``compile=dict(...)`` in the config): ``torch.compile`` of
  the model's backbone (``nn.Module.compile``: its forward, and through AOTAutograd its
  backward), static shapes unless the dict says otherwise. MMEngine's own ``compile`` compiles the whole ``train_step``,
  optimizer step included, which Dynamo of torch 2.14 fails on for dense and Evo models alike
  (``InternalTorchDynamoError`` in the optimizer's ``param_groups``); the backbone is where
  the evolution runs, and compiling it removes the per-op host time that bounds eager training
  steps on GPUs. The optimizer step stays eager; checkpoint keys do not change.

Progress is MMEngine's logger (``default_hooks.logger``: loss, lr, time and ETA every
``interval`` iterations, on rank 0).

A distributed run ends through :func:`finish_distributed` (see there): with torch 2.14 a gloo
process ended by the interpreter's own shutdown aborts now and then after training finished.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import os.path as osp
from typing import List, Optional

import torch

LAUNCHERS = ("none", "pytorch", "slurm", "mpi")


def parse_args(argv: Optional[List[str]] = None):
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(prog="python -m evoplug.mm.train", description=__doc__.split("\n")[0])
    p.add_argument("config", help="config file (e.g. examples/mmpretrain/evo-deit-small_4xb256_in1k.py)")
    p.add_argument("--work-dir", help="where logs and checkpoints go (default ./work_dirs/<config name>)")
    p.add_argument("--resume", nargs="?", type=str, const="auto",
                   help="resume from this checkpoint, or without a value from the latest one in the work dir")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: float16 + loss scale on GPUs, bfloat16 on CPUs")
    p.add_argument("--launcher", choices=LAUNCHERS, default="none",
                   help="how the processes were started: 'pytorch' under torchrun (default 'none': one process)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone (forward and backward; see the module docstring)")
    p.add_argument("--no-sync-bn", action="store_true",
                   help="keep per-process BatchNorm statistics in distributed GPU training")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0,
                   help="set by torch.distributed.launch (torchrun sets LOCAL_RANK instead)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default=None,
                   help="override config settings, e.g. train_cfg.max_epochs=1 load_from=dense.pth")
    args = p.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def build_runner(cfg):
    """MMEngine's Runner for ``cfg`` (``runner_type`` honoured), after importing evoplug.mm; a
    ``compile`` setting compiles the backbone (:func:`compile_backbone`) instead of MMEngine's
    ``train_step``."""
    import evoplug.mm  # noqa: F401  registers the model types and the checkpoint allow-list
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    options = compile_options(cfg.pop("compile", None))
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    if options is not None:
        compile_backbone(runner.model, options)
        runner.logger.info(f"evoplug: torch.compile of the backbone's forward ({options}); the "
                           "first iterations of each input shape and mode compile")
    return runner


def compile_options(setting) -> Optional[dict]:
    """torch.compile's keyword arguments from a config's ``compile`` (None/False: none;
    True: static shapes; a dict: those arguments, ``dynamic=False`` unless it says)."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return dict(dynamic=False)
    if not isinstance(setting, dict):
        raise ValueError(f"compile must be True, False or a dict of torch.compile arguments, "
                         f"got {setting!r}")
    return {"dynamic": False, **setting}


def compile_backbone(model, options: dict):
    """``nn.Module.compile`` of ``model``'s backbone (inside a DDP wrapper too; the model itself
    if it has none): its calls run ``torch.compile`` of the module's call. The parameters and the
    state_dict keys stay, and copies (EMA, pickling) drop the compiled call and run eagerly
    (torch's ``Module.__getstate__``) rather than call this module's."""
    from mmengine.model import is_model_wrapper
    inner = model.module if is_model_wrapper(model) else model
    target = getattr(inner, "backbone", None) or inner
    plain_scalars(target)
    target.compile(**options)
    return target


def plain_scalars(module) -> int:
    """NumPy scalars held as attributes of ``module``'s submodules (MMPretrain's drop-path rates
    come from ``np.linspace``) made Python numbers of the same value; returns how many.

    Dynamo treats a NumPy scalar as an array, so mmcv's ``if drop_prob == 0.`` breaks the graph
    in every block of a dense and an Evo backbone alike (27 graphs for a 6-layer MMPretrain ViT
    instead of one), and the block forwards compiled one by one then hit Dynamo's recompile
    limit."""
    import numpy as np
    n = 0
    for m in module.modules():
        for name, value in list(vars(m).items()):
            if isinstance(value, np.generic) and not isinstance(value, np.object_):
                setattr(m, name, value.item())
                n += 1
    return n


def configure_launch(cfg, launcher: str, cuda: bool, sync_bn: bool = True):
    """Set ``cfg`` up for ``launcher`` on GPUs (``cuda``) or CPUs: the process group backend, the
    DDP wrapper and SyncBN (see the module docstring). Returns whether this process must create
    the process group itself (CPUs: MMEngine's ``init_dist`` would call ``torch.cuda``)."""
    cfg.launcher = launcher
    if launcher == "none":
        return False
    if cfg.get("env_cfg") is None:
        cfg.env_cfg = {}
    if cfg.env_cfg.get("dist_cfg") is None:
        cfg.env_cfg.dist_cfg = {}
    dist_cfg = cfg.env_cfg.dist_cfg
    if cuda:
        if dist_cfg.get("backend") is None:
            dist_cfg.backend = "nccl"
        if sync_bn and "sync_bn" not in cfg:
            cfg.sync_bn = "torch"
        return False
    if launcher != "pytorch":
        raise ValueError(f"--launcher {launcher} needs GPUs here; on CPUs use --launcher pytorch "
                         "under torchrun")
    if cfg.get("sync_bn"):
        raise ValueError(f"sync_bn={cfg.sync_bn!r}: SyncBatchNorm runs on GPUs only; remove it "
                         "from the config for CPU training (BatchNorm then keeps per-process "
                         "statistics)")
    dist_cfg.backend = "gloo"
    wrapper = cfg.get("model_wrapper_cfg")
    if wrapper is None:
        # (broadcast_buffers=False as MMEngine's own default wrapper: BatchNorm keeps each
        # process's statistics, as on GPUs; rank 0's were copied to every rank each step)
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None,
                                     broadcast_buffers=False,
                                     find_unused_parameters=cfg.get("find_unused_parameters", False))
    elif _is_ddp(wrapper.get("type", "MMDistributedDataParallel")):
        # the config's own wrapper (find_unused_parameters=True): MMEngine would give it
        # device_ids=[LOCAL_RANK], which DDP refuses for a CPU module (audit T3)
        wrapper.setdefault("device_ids", None)
    return True


def _is_ddp(wrapper_type) -> bool:
    """Whether a model wrapper type (a registry name or a class) is a DistributedDataParallel,
    which MMEngine builds with ``device_ids``."""
    from mmengine.registry import MODEL_WRAPPERS
    from torch.nn.parallel import DistributedDataParallel
    cls = MODEL_WRAPPERS.get(wrapper_type) if isinstance(wrapper_type, str) else wrapper_type
    return isinstance(cls, type) and issubclass(cls, DistributedDataParallel)


def init_cpu_process_group(timeout_s: int = 1800):
    """The gloo process group of a torchrun-started CPU process (env:// rendezvous)."""
    import datetime
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))


def configure_amp(cfg, cuda: bool):
    """``--amp``: MMEngine's AmpOptimWrapper (float16, dynamic loss scale) on GPUs; bfloat16
    autocast without loss scale on CPUs (:class:`CpuBf16OptimWrapper`)."""
    if cuda:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        if cfg.optim_wrapper.get("loss_scale") is None:
            cfg.optim_wrapper.loss_scale = "dynamic"
    else:
        cfg.optim_wrapper.type = "CpuBf16OptimWrapper"
        cfg.optim_wrapper.pop("loss_scale", None)
        cfg.optim_wrapper.pop("dtype", None)   # (AmpOptimWrapper's: a TypeError here; audit V9)


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
        _resume_latest(cfg)
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    if args.compile and not cfg.get("compile"):
        cfg.compile = True
    cuda = torch.cuda.is_available()
    if args.amp:
        configure_amp(cfg, cuda)
    if configure_launch(cfg, args.launcher, cuda, sync_bn=not args.no_sync_bn):
        init_cpu_process_group(cfg.env_cfg.dist_cfg.get("timeout", 1800))
    runner = build_runner(cfg)
    runner.train()
    return runner


def _resume_latest(cfg):
    """``--resume`` without a checkpoint: the latest one in the work dir. On a first launch
    there is none; the config's ``load_from`` (a dense checkpoint to fine-tune) is then loaded
    as the weights to start from, where MMPretrain's own ``tools/train.py`` drops it and trains
    from random weights with a log line only (audit Y3 of the thirty-ninth session)."""
    from mmengine.runner import find_latest_checkpoint
    latest = find_latest_checkpoint(cfg.work_dir) if osp.isdir(cfg.work_dir) else None
    if latest is None and cfg.get("load_from"):
        print(f"evoplug: --resume: no checkpoint in {cfg.work_dir} yet; starting from "
              f"load_from={cfg.load_from}", flush=True)
        cfg.resume = False
        return
    cfg.resume = True
    cfg.load_from = None


def finish_distributed(exit=os._exit) -> bool:
    """End a distributed run: a barrier, ``destroy_process_group``, the ``atexit`` handlers
    (MMEngine's log files, torch's compile workers), then ``exit(0)`` without the interpreter's
    shutdown. Returns False (and does nothing) when no process group exists.

    Why not a plain return: gloo's worker threads destroy finished collectives, and a barrier's
    work holds the all-reduces of the last backward, whose captured thread-local state holds a
    Python object (autograd's ``contextvars`` context). Destroyed during interpreter shutdown,
    that object needs the GIL, the thread is ended inside a ``noexcept`` destructor and the
    process aborts (``terminate called without an active exception``, SIGABRT): 6 of 100 launches
    of a two-rank CPU DDP script here (torch 2.14.1, ``benchmarks/gloo_exit.py``), 0 of 100 ended
    this way. A
    ``destroy_process_group`` alone does not help: after a ``DistributedDataParallel`` the gloo
    backend stays alive with its threads (a reference torch keeps), so they outlive the
    interpreter. Ending the process with ``os._exit`` once everything that writes has finished
    avoids the race instead of narrowing it."""
    import atexit
    import sys
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    exit(0)
    return True


def run(argv: Optional[List[str]] = None):
    """The command (``python -m evoplug.mm.train``): :func:`main`, then
    :func:`finish_distributed` in a distributed run."""
    runner = main(argv)
    finish_distributed()
    return runner


def register_optim_wrappers():
    """:class:`CpuBf16OptimWrapper` in MMEngine's ``OPTIM_WRAPPERS`` (done by ``evoplug.mm``)."""
    from mmengine.optim import OptimWrapper
    from mmengine.registry import OPTIM_WRAPPERS

    if "CpuBf16OptimWrapper" in OPTIM_WRAPPERS.module_dict:
        return OPTIM_WRAPPERS.get("CpuBf16OptimWrapper")

    @OPTIM_WRAPPERS.register_module()
    class CpuBf16OptimWrapper(OptimWrapper):
        """Mixed precision on CPUs: the forward under ``torch.autocast('cpu', bfloat16)``
        (matmuls and convolutions in bfloat16, reductions and the loss in float32). bfloat16
        has float32's exponent range, so no loss scale; the parameters and the optimizer stay
        float32."""

        @contextlib.contextmanager
        def optim_context(self, model):
            with super().optim_context(model), torch.autocast("cpu", dtype=torch.bfloat16):
                yield

    return CpuBf16OptimWrapper


if __name__ == "__main__":
    run()
