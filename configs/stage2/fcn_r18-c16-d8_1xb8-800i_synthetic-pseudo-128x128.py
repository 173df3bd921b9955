# Smoke config: FCN on a quarter-width ResNet-18 (16 base channels) at output stride 8, random init,
# synthetic pseudo-masks at 128x128, batch 8, AdamW 4e-3 with poly decay, no auxiliary head, 800 iterations
# (about 3-4 minutes on 2 CPU cores). Used by tests/test_stage2.py and `make demo`; shrink further with
# --cfg-options train_cfg.max_iters=N.
# Why these settings (measured learning curve): docs/results.md, "Stage-2 smoke FCN".
_base_ = [
    'mmseg::_base_/models/fcn_r50-d8.py',
    './_base_/datasets/synthetic_pseudo.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_20k.py',
]
num_classes = 21
max_iters = 800
norm_cfg = dict(type='BN', requires_grad=True)
crop_size = (128, 128)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(depth=18, stem_channels=16, base_channels=16, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                  norm_cfg=norm_cfg),
    decode_head=dict(in_channels=128, channels=64, num_classes=num_classes, norm_cfg=norm_cfg),
    auxiliary_head=None)
train_dataloader = dict(batch_size=8)
optim_wrapper = dict(_delete_=True, type='OptimWrapper', optimizer=dict(type='AdamW', lr=4e-3, weight_decay=1e-4))
param_scheduler = [dict(type='PolyLR', eta_min=1e-5, power=0.9, begin=0, end=max_iters, by_epoch=False)]
train_cfg = dict(max_iters=max_iters, val_interval=400)
default_hooks = dict(
    logger=dict(interval=50),
    checkpoint=dict(interval=400),
    visualization=dict(draw=False))
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
