# WeakCLIP head on frozen OpenAI CLIP ViT-B/16, VOC 2012 train_aug, 512x512 crops, 20k iterations, batch 8 per GPU
# on 2 GPUs (GPUS=2) as the reference. It refines the WeCLIP run's dump of train_aug (train that run first: make
# pseudo-labels DATASET=voc RUN=weclip_vit-b16_voc12aug), or set head.masks to any shard dir covering
# data.train_split (e.g. runs/voc/<run>/cams/ written by `make cams` with data.eval_split=train_aug).
_base_ = ["./_base_/weakclip_vit-b16.py", "./_base_/datasets/voc12aug.py"]
run = dict(name="weakclip_vit-b16_voc12aug", seed=504)
data = dict(crop_size=512, scale_range=(0.5, 2.0))
head = dict(masks="runs/voc/weclip_vit-b16_voc12aug/pseudo_masks")
