"""FSDP on a converted model (CPUs, gloo, 2 processes: ``tests/fsdp_worker.py``): sharded by
``fully_shard`` (FSDP2) or ``FullyShardedDataParallel`` (FSDP1), a few training steps give each
rank the outputs and the parameters of the unsharded converted model trained on the whole
batch, the blocks evolve, and the gathered ``state_dict`` has the model's keys and loads
strictly into the dense model. What cannot work is said by name: FSDP units inside a block
(FSDP2: the block runs its own forward, with a warning; FSDP1: an error), and a call at a new
input size while blocks are sharded (a twin built before the sharding runs)."""
import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from fsdp_worker import SLOW  # noqa: E402

#: cases of tests/fsdp_worker.py that train -> tokens each block ran in the last step
TOKENS = {
    "fully_shard blocks": [65, 34, 34, 34],
    "fully_shard blocks, reselect_every=4": [65, 34, 34, 34],
    "fully_shard mlps": [65, 34, 34, 34],
    "fully_shard blocks, twin built before": [145, 74, 74, 74],     # (the last call at 48 px)
    "FSDP1 ModuleWrapPolicy(Block)": [65, 34, 34, 34],
    "fully_shard blocks, bfloat16": [65, 34, 34, 34],
    "fully_shard checkpointed blocks": [65, 34, 34, 34],
    "fully_shard compiled blocks": [65, 34, 34, 34],
    "fully_shard model": [65, 34, 34, 34],
    "fully_shard model, new size": [65, 34, 34, 34],
    "FSDP1 blocks, flat parameters": [65, 34, 34, 34],
    "FSDP1 blocks, twin built before": [145, 74, 74, 74],
    "FSDP1 model, new size": [65, 34, 34, 34],
    "FSDP1 mlps": [65, 34, 34, 34],
}
#: the worker's split (its ``SLOW`` cases run in ``make test-all`` only: more forms of the same
#: guarantee), read from it so that no case it runs goes unchecked
TRAINED = {k: v for k, v in TOKENS.items() if k not in SLOW}
TRAINED_SLOW = {k: TOKENS[k] for k in sorted(SLOW)}


def _run_worker(out, which="default"):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", os.path.join(ROOT, "tests", "fsdp_worker.py"), str(out), which]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    results = []
    for rank in (0, 1):
        with open(out / f"rank{rank}.json") as f:
            results.append(json.load(f))
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def slow_ranks(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("fsdp_slow"), "slow")


def _check_trained(ranks, case, tokens):
    for rank in ranks:
        r = rank[case]
        assert "error" not in r, r
        # every step, the rank's images; after the steps, the parameters gathered (bfloat16:
        # FSDP's mixed precision computes in bfloat16, against float32 unsharded)
        bf16 = "bfloat16" in case
        assert max(r["outputs"]) < (2e-2 if bf16 else 1e-5), r["outputs"]
        assert r["params"] < (2e-4 if bf16 else 1e-6), r["params"]
        assert r["moved"] > 1e-3, r["moved"]                   # (the steps trained it)
        assert r["keys"] and r["strict_load"], r
        assert r["tokens"] == tokens, r["tokens"]
        assert r["warnings"] == [], r["warnings"]    # (FSDP's own hooks on an MLP: no warning)


@pytest.mark.parametrize("case", list(TRAINED))
def test_a_sharded_converted_model_trains_as_the_unsharded_one(ranks, case):
    _check_trained(ranks, case, TRAINED[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TRAINED_SLOW))
def test_more_sharded_forms_train_as_the_unsharded_model(slow_ranks, case):
    """bfloat16 mixed precision, activation checkpointing or compiled blocks (aot_eager) before
    sharding (torchtitan's order), the model as one unit (at a new size too), FSDP1's flat
    parameters, its twin built before, the MLPs as units."""
    _check_trained(slow_ranks, case, TRAINED_SLOW[case])


def test_fully_shard_inside_a_block_runs_it_dense_and_says_why(ranks):
    for rank in ranks:
        r = rank["fully_shard attention"]
        assert r["outputs"][0] < 1e-5 and r["tokens"] == [-1] * 4, r    # the dense model's output
        assert len(r["warnings"]) == 1, r["warnings"]
        msg = r["warnings"][0]
        assert "`blocks.0.attn` (FSDPAttention) is sharded on its own by FSDP's fully_shard" in msg
        assert "Shard whole blocks" in msg


def test_fsdp1_inside_a_block_is_refused_with_the_way_out(ranks):
    for rank in ranks:
        err = rank["FSDP1 attention"]["error"]
        assert err.startswith("EvoplugError: `blocks.0`: its submodule `attn` was wrapped by "
                              "FSDP's FullyShardedDataParallel"), err
        assert "ModuleWrapPolicy({Block})" in err


@pytest.mark.parametrize("case,how", [("fully_shard blocks, new size", "FSDP's fully_shard"),
                                      ("FSDP1 blocks, new size", "FSDP's FullyShardedDataParallel")])
def test_a_new_input_size_while_blocks_are_sharded_is_refused_with_the_way_out(ranks, case, how):
    """(The twin's conversion ran on parameters FSDP had not gathered: an analysis error about
    shapes, or with FSDP1's flat parameters a crash of the process, until the fifty-sixth
    session.)"""
    for rank in ranks:
        err = rank[case]["error"]
        assert err.startswith("EvoplugError:") and f"`blocks.0` is sharded by {how}" in err, err
        assert "before sharding it" in err and "as one unit" in err


def test_revert_of_a_model_sharded_by_fully_shard_says_revert_before_sharding(ranks):
    for rank in ranks:
        err = rank["revert after fully_shard"]["error"]
        assert "its class FSDPEvoBlock was changed after the conversion" in err, err
        assert "by FSDP's fully_shard or replicate: revert before sharding" in err
