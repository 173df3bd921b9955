# WeCLIP head on frozen OpenAI CLIP ViT-B/16, COCO 2014 train, 80k iterations (reference_spec 1.12).
_base_ = ["./_base_/weclip_vit-b16.py", "./_base_/datasets/coco14.py"]
run = dict(name="weclip_vit-b16_coco14", seed=1)
cam = dict(box_threshold=0.7)
head = dict(rfm=dict(start_step=40000, layers=10))
train = dict(max_iters=80000, ckpt_interval=10000, val_interval=0)
