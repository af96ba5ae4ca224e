# evoplug's base config for MMPretrain (old-style mmengine config).
#
# Include it next to any MMPretrain model config, then give the model evoplug's type:
#
#   _base_ = [
#       'mmpretrain::deit/deit-small_4xb256_in1k.py',
#       __import__('evoplug.configs').configs.MMPRETRAIN_BASE,
#   ]
#   model = dict(type='EvoImageClassifier', evo=dict(keep_ratio=0.5))
#
# It only defines keys that MMPretrain's configs do not (mmengine refuses a key defined by two
# bases). `custom_imports` registers EvoImageClassifier / EvoVisionTransformer / EvoLeViT /
# EvoSwinTransformer into MMPretrain's registry and makes MMEngine load its own checkpoints on
# torch >= 2.6 with an allow-list (evoplug/mm/checkpoint.py). A config with its own `custom_imports` must list
# 'evoplug.mm' there too (a derived config replaces the list).
custom_imports = dict(imports=['evoplug.mm'], allow_failed_imports=False)
