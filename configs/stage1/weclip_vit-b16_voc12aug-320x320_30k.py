# WeCLIP head on frozen OpenAI CLIP ViT-B/16, VOC 2012 train_aug, 320x320 crops, 30k iterations, batch 4.
_base_ = ["./_base_/weclip_vit-b16.py", "./_base_/datasets/voc12aug.py"]
run = dict(name="weclip_vit-b16_voc12aug", seed=1)
