# Evo form of retinanet_swin_digit-boxes.py: mmdet's SwinTransformer converted at build time
# (evoplug.mmdet registers EvoSwinTransformer); same parameters and state_dict keys. Other input
# sizes than 128 px (multi-scale training) are converted at their first call.
#   python -m evoplug.mm.train examples/mmdet/evo-retinanet_swin_digit-boxes.py
_base_ = ['./retinanet_swin_digit-boxes.py']

model = dict(backbone=dict(type='EvoSwinTransformer', evo=dict(keep_ratio=0.5, input_size=128)))
