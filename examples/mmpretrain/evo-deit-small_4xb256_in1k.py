# Evo-DeiT-S: MMPretrain's DeiT-S ImageNet config with evoplug's token evolution.
#
#   python -m evoplug.mm.train examples/mmpretrain/evo-deit-small_4xb256_in1k.py \
#       --cfg-options load_from=deit-small_dense.pth
#
# (or MMPretrain's tools/train.py with this config). `load_from` takes a dense checkpoint of
# MMPretrain's DeiT-S (state_dict keys of ImageClassifier): it loads strictly into the Evo model.
_base_ = [
    'mmpretrain::deit/deit-small_4xb256_in1k.py',
    __import__('evoplug.configs').configs.MMPRETRAIN_BASE,
]

model = dict(
    type='EvoImageClassifier',
    evo=dict(
        keep_ratio=0.5,   # half of the patch tokens take the slow update in blocks 5-12
        # the paper's training extras (off by default in evoplug):
        # learnable_trade_off=True, mean_token_head=True, aux_cls_head=dict(loss_weight=1.0),
        # from scratch, the authors' DeiT code carries the unselected tokens unchanged; in
        # evoplug's from-scratch runs that trained closer to dense (docs/benchmarks.md):
        # representative=False,
    ))

# load_from = 'deit-small_dense.pth'   # an existing dense checkpoint
