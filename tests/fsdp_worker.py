"""One rank of tests/test_fsdp.py (``torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT``):
converted ViTs sharded by FSDP on CPUs (gloo), trained for a few steps next to an unsharded
copy of the same converted model fed the whole batch; each case's result, per rank, goes to
``OUT/rank{R}.json``."""
import copy
import functools
import json
import os
import sys
import traceback
import warnings

import timm
import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, lambda_auto_wrap_policy

import evoplug

Block = timm.models.vision_transformer.Block

RANK, WORLD, BATCH, MESH = 0, 1, 4, None


def _models(reselect_every=1):
    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                              depth=4, embed_dim=64, num_heads=2, dynamic_img_size=True)
    fast = evoplug.convert(dense, keep_ratio=0.5, example_input=torch.randn(1, 3, 32, 32),
                           inplace=False, reselect_every=reselect_every)
    return dense, fast.train()


def _train(shard, sizes=(32, 32, 32), reselect_every=1, before=()):
    """Steps of SGD with momentum at the input sizes ``sizes`` (the same images on every rank,
    each rank taking its share) of the model sharded by ``shard`` and of an unsharded copy
    taking the whole batch; ``before``: sizes the converted model is called at before the
    sharding."""
    dense, fast = _models(reselect_every)
    with torch.no_grad():
        for s in before:
            fast(torch.randn(1, 3, s, s))
    ref = copy.deepcopy(fast)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = shard(fast)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        outputs = []
        for step, s in enumerate(sizes):
            x = torch.randn(BATCH, 3, s, s, generator=torch.Generator().manual_seed(step))
            want = ref(x)
            want.pow(2).mean().backward()
            ref_opt.step()
            ref_opt.zero_grad()
            got = model(x.chunk(WORLD)[RANK])
            got.pow(2).mean().backward()       # (FSDP averages the ranks' gradients)
            opt.step()
            opt.zero_grad()
            outputs.append((got - want.chunk(WORLD)[RANK]).abs().max().item())
    # the whole state_dict, gathered (FSDP1 and 2 alike): the model's own keys
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    theirs = ref.state_dict()
    params = max((state[k] - v).abs().max().item() for k, v in theirs.items()
                 if v.is_floating_point())
    moved = max((v - start[k]).abs().max().item() for k, v in theirs.items() if v.is_floating_point())
    loaded = dense.load_state_dict(state, strict=True)
    return dict(outputs=outputs, params=params, moved=moved, keys=sorted(state) == sorted(theirs),
                strict_load=not (loaded.missing_keys or loaded.unexpected_keys),
                tokens=[t for _, t in evoplug.tokens_per_block(fast)],
                warnings=[str(w.message) for w in caught if "evoplug" in str(w.message)])


def _dense_reference(shard):
    """The sharded model against the dense one, one forward: for a conversion that runs every
    block's own forward."""
    dense, fast = _models()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = shard(fast)
        x = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        diff = (model(x.chunk(WORLD)[RANK]) - dense.train()(x).chunk(WORLD)[RANK]).abs().max().item()
    return dict(outputs=[diff], tokens=[t for _, t in evoplug.tokens_per_block(fast)],
                warnings=[str(w.message) for w in caught if "evoplug" in str(w.message)])


def _blocks_then_model(model):
    for block in model.blocks:
        fully_shard(block, mesh=MESH)
    return fully_shard(model, mesh=MESH)


def _fsdp1(model, policy, flat=False):
    return FSDP(model, device_id=torch.device("cpu"), use_orig_params=not flat, auto_wrap_policy=policy)


def _modules_of(model, pick):
    chosen = {id(pick(b)) for b in model.blocks}
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in chosen)


def _blocks_then_model_bf16(model):
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=MESH, mp_policy=policy)
    return fully_shard(model, mesh=MESH, mp_policy=policy)


def _checkpointed_blocks_then_model(model):
    """Activation checkpointing (non-reentrant) on each block, then each wrapped block and the
    model sharded: the usual order of large-scale recipes."""
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    return _blocks_then_model(model)


def _compiled_blocks_then_model(model):
    """Each block compiled (``backend="aot_eager"``: AOTAutograd's graphs without Inductor's code
    generation, quick on a CPU), then sharded: torchtitan's order."""
    for block in model.blocks:
        block.compile(backend="aot_eager")
    return _blocks_then_model(model)


def _mlps_then_model(model):
    for block in model.blocks:
        fully_shard(block.mlp, mesh=MESH)
    return fully_shard(model, mesh=MESH)


def _attn_then_model(model):
    for block in model.blocks:
        fully_shard(block.attn, mesh=MESH)
    return fully_shard(model, mesh=MESH)


CASES = {
    "fully_shard blocks": lambda: _train(_blocks_then_model),
    "fully_shard blocks, reselect_every=4": lambda: _train(_blocks_then_model, reselect_every=4),
    "fully_shard blocks, bfloat16": lambda: _train(_blocks_then_model_bf16),
    "fully_shard checkpointed blocks": lambda: _train(_checkpointed_blocks_then_model),
    "fully_shard compiled blocks": lambda: _train(_compiled_blocks_then_model),
    "fully_shard model": lambda: _train(lambda m: fully_shard(m, mesh=MESH)),
    "fully_shard model, new size": lambda: _train(lambda m: fully_shard(m, mesh=MESH), sizes=(32, 48, 32)),
    "FSDP1 model, new size": lambda: _train(lambda m: _fsdp1(m, None), sizes=(32, 48, 32)),
    "fully_shard mlps": lambda: _train(_mlps_then_model),
    "fully_shard blocks, twin built before": lambda: _train(_blocks_then_model, sizes=(32, 48, 32, 48),
                                                            before=(48,)),
    "FSDP1 ModuleWrapPolicy(Block)": lambda: _train(
        lambda m: _fsdp1(m, ModuleWrapPolicy({Block}))),
    "FSDP1 blocks, flat parameters": lambda: _train(
        lambda m: _fsdp1(m, ModuleWrapPolicy({Block}), flat=True)),
    "FSDP1 blocks, twin built before": lambda: _train(
        lambda m: _fsdp1(m, ModuleWrapPolicy({Block})),
        sizes=(32, 48, 32, 48), before=(48,)),
    "FSDP1 mlps": lambda: _train(lambda m: _fsdp1(m, _modules_of(m, lambda b: b.mlp))),
    "fully_shard attention": lambda: _dense_reference(_attn_then_model),
    # refusals last: a forward that raised leaves FSDP's state of those models mid-way
    "fully_shard blocks, new size": lambda: _train(_blocks_then_model, sizes=(32, 48)),
    "FSDP1 blocks, new size": lambda: _train(
        lambda m: _fsdp1(m, ModuleWrapPolicy({Block}), flat=True),
        sizes=(32, 48)),
    "revert after fully_shard": lambda: dict(reverted=type(evoplug.revert(_blocks_then_model(_models()[1]))).__name__),
    "FSDP1 attention": lambda: _train(lambda m: _fsdp1(m, _modules_of(m, lambda b: b.attn))),
}


#: cases the slow tests of tests/test_fsdp.py run (``which="slow"``); the others run by default
SLOW = {"fully_shard blocks, bfloat16", "fully_shard checkpointed blocks", "fully_shard compiled blocks",
        "fully_shard model", "fully_shard model, new size", "FSDP1 blocks, flat parameters",
        "FSDP1 blocks, twin built before", "FSDP1 model, new size", "FSDP1 mlps"}


def main(out, which="default"):
    """Run the default cases, the ``slow`` ones, or those whose name holds ``which``."""
    global RANK, WORLD, MESH
    dist.init_process_group("gloo")
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    MESH = init_device_mesh("cpu", (WORLD,))
    results = {}
    for name, case in CASES.items():
        picked = (name not in SLOW if which == "default" else name in SLOW if which == "slow"
                  else which in name)
        if not picked:
            continue
        try:
            results[name] = case()
        except Exception as e:           # noqa: BLE001 - the test reads what was raised
            results[name] = dict(error=f"{type(e).__name__}: {e}",
                                 where=traceback.format_exc()[-2000:])
    with open(os.path.join(out, f"rank{RANK}.json"), "w") as f:
        json.dump(results, f, indent=1)
    # ended as evoplug.mm.train ends a run (``finish_distributed``): gloo's threads outliving
    # the interpreter's shutdown abort a launch now and then (docs/mmpretrain.md)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
