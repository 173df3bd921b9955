# COCO 2014 (masks converted to VOC-style PNGs, 81 classes with background): train on stage-1
# pseudo-mask shards, validate on the real val split. Same pipelines and loaders as the VOC base;
# only the dataset folder and the class set differ.
# The train entry point sets train_dataloader.dataset.shard_dir (--shards) and every data_root
# (--data-root, else $WSSS_DATA_ROOT/coco2014, else the value below).
_base_ = ['./voc12aug_pseudo.py']

data_root = 'data/coco2014'
class_set = 'coco'
train_dataloader = dict(dataset=dict(data_root=data_root, class_set=class_set))
val_dataloader = dict(dataset=dict(data_root=data_root, class_set=class_set))
test_dataloader = val_dataloader
