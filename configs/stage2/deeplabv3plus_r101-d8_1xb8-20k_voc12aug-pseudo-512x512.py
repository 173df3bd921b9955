# DeepLabV3+ ResNet-101 (d8) on VOC 2012 train_aug pseudo-masks; 1 GPU x batch 8, 20k iterations.
# Offline without cached ImageNet weights: pass --no-pretrained to stage2_seg.train (random init).
_base_ = [
    'mmseg::_base_/models/deeplabv3plus_r50-d8.py',
    './_base_/datasets/voc12aug_pseudo.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_20k.py',
]
num_classes = 21
# Plain BN for one GPU; with --launcher pytorch/slurm mmengine converts it to SyncBN (sync_bn below).
norm_cfg = dict(type='BN', requires_grad=True)
sync_bn = 'torch'
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained='open-mmlab://resnet101_v1c',
    backbone=dict(depth=101, norm_cfg=norm_cfg),
    decode_head=dict(num_classes=num_classes, norm_cfg=norm_cfg),
    auxiliary_head=dict(num_classes=num_classes, norm_cfg=norm_cfg))
randomness = dict(seed=0)
