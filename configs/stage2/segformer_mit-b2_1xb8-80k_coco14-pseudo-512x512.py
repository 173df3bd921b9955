# SegFormer MiT-B2 on COCO 2014 train pseudo-masks; 1 GPU x batch 8, 80k iterations, AdamW.
# Offline without cached ImageNet weights: pass --no-pretrained to stage2_seg.train (random init).
_base_ = [
    'mmseg::_base_/models/segformer_mit-b0.py',
    './_base_/datasets/coco14_pseudo.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py',
]
num_classes = 81
max_iters = 80000
# Plain BN for one GPU; with --launcher pytorch/slurm mmengine converts it to SyncBN (sync_bn below).
norm_cfg = dict(type='BN', requires_grad=True)
sync_bn = 'torch'
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
mit_b2_weights = ('https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segformer/'
                  'mit_b2_20220624-66e8bf70.pth')
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        init_cfg=dict(type='Pretrained', checkpoint=mit_b2_weights),
        embed_dims=64,
        num_heads=[1, 2, 5, 8],
        num_layers=[3, 4, 6, 3]),
    decode_head=dict(in_channels=[64, 128, 320, 512], num_classes=num_classes, norm_cfg=norm_cfg))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'pos_block': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
        'head': dict(lr_mult=10.),
    }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=max_iters, by_epoch=False),
]
randomness = dict(seed=0)
