# PASCAL VOC 2012 (+SBD train_aug): train on stage-1 pseudo-mask shards, validate on the real val split.
# Inherits mmseg's VOC dataset base (its multi-scale + flip tta_pipeline, IoU evaluator and loader
# settings) and swaps both datasets for the stage2_seg ones.
# The train entry point sets train_dataloader.dataset.shard_dir (--shards) and every data_root
# (--data-root, else $WSSS_DATA_ROOT/VOC2012, else the value below).
_base_ = ['mmseg::_base_/datasets/pascal_voc12.py']

custom_imports = dict(imports=['stage2_seg'], allow_failed_imports=False)

dataset_type = 'PseudoMaskSegDataset'

data_root = 'data/VOC2012'
class_set = 'voc'
crop_size = (512, 512)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadPseudoMaskFromShards'),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    # ground truth is loaded after the resize: metrics are computed at the original resolution
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        shard_dir=None,
        data_root=data_root,
        class_set=class_set,
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        _delete_=True,
        type='WSSSValDataset',
        data_root=data_root,
        class_set=class_set,
        split='val',
        pipeline=test_pipeline))
test_dataloader = val_dataloader
