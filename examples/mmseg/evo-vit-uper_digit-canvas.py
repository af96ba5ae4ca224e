# Evo form of vit-uper_digit-canvas.py: mmseg's VisionTransformer converted at build time
# (evoplug.mmseg registers EvoVisionTransformer); same parameters and state_dict keys.
#   python -m evoplug.mm.train examples/mmseg/evo-vit-uper_digit-canvas.py
_base_ = ['./vit-uper_digit-canvas.py']

model = dict(backbone=dict(type='EvoVisionTransformer', evo=dict(keep_ratio=0.5, input_size=64)))
