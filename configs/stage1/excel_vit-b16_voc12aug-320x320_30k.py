# ExCEL head on frozen OpenAI CLIP ViT-B/16, VOC 2012 train_aug, 320x320 crops, 30k iterations, batch 4
# (reference_spec 4.8: seed 0; LVC from 14k, affinity labels from the decoder from 24k).
_base_ = ["./_base_/excel_vit-b16.py", "./_base_/datasets/voc12aug.py"]
run = dict(name="excel_vit-b16_voc12aug", seed=0)
