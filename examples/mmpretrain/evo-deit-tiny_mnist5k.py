# Evo version of deit-tiny_mnist5k.py: the same model, converted by evoplug at build time.
# Fine-tune a dense checkpoint of it:
#   python -m evoplug.mm.train examples/mmpretrain/evo-deit-tiny_mnist5k.py \
#       --cfg-options load_from=work_dirs/deit-tiny_mnist5k/epoch_25.pth
_base_ = [
    './deit-tiny_mnist5k.py',
    __import__('evoplug.configs').configs.MMPRETRAIN_BASE,
]

model = dict(type='EvoImageClassifier', evo=dict(keep_ratio=0.5))
