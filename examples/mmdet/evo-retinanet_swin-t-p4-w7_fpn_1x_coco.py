# MMDetection's own RetinaNet + Swin-T (p4, w7) 1x COCO config with the Swin-T converted by
# evoplug at build time (keep 0.5): same parameters and state_dict keys, so MMDetection's Swin-T
# checkpoints and the ImageNet Swin-T weights (``init_cfg``, ``convert_weights``) load unchanged.
# Needs COCO under data/coco (MMDetection's layout). COCO's images are resized to 1333x800 and
# padded to a multiple of 32, so their maps come in several sizes: each new size converts a twin
# of the backbone at its first forward (about a second on a CPU core; docs/models.md) and keeps it.
#   python -m evoplug.mm.train examples/mmdet/evo-retinanet_swin-t-p4-w7_fpn_1x_coco.py
#   python -m evoplug.mm.train examples/mmdet/evo-retinanet_swin-t-p4-w7_fpn_1x_coco.py --launcher pytorch
_base_ = ['mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py']

custom_imports = dict(imports=['evoplug.integrations.mmcv_ops', 'evoplug.mmdet'],
                      allow_failed_imports=False)

model = dict(backbone=dict(type='EvoSwinTransformer', evo=dict(keep_ratio=0.5, input_size=(800, 1344))))
