# Evo-Swin-T: MMPretrain's Swin-T ImageNet config with evoplug's token evolution.
#
#   python -m evoplug.mm.train examples/mmpretrain/evo-swin-tiny_16xb64_in1k.py \
#       --cfg-options load_from=swin-tiny_dense.pth
#
# The windows run on the full map (every token keeps its exact attention update); the MLPs of
# the evolving blocks run on the kept tokens and the representative token. Blocks trace one
# program per batch size at their first call with it (MMPretrain's Swin bakes the batch size
# into its window helpers), so the last, smaller batch of an epoch costs one more trace.
_base_ = [
    'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py',
    __import__('evoplug.configs').configs.MMPRETRAIN_BASE,
]

model = dict(type='EvoImageClassifier', evo=dict(keep_ratio=0.5))

# load_from = 'swin-tiny_dense.pth'   # an existing dense checkpoint of MMPretrain's Swin-T
