# ExCEL head on frozen OpenAI CLIP ViT-B/16, COCO 2014 train, 100k iterations (reference_spec 4.8: box 0.88,
# warmup 200, LVC from 30k, affinity labels always from the online pseudo labels, 224 attributes).
_base_ = ["./_base_/excel_vit-b16.py", "./_base_/datasets/coco14.py"]
run = dict(name="excel_vit-b16_coco14", seed=0)
cam = dict(box_threshold=0.88, num_attributes=224)
head = dict(lvc_start_step=30000, aff_label_switch_step=None)
train = dict(max_iters=100000, warmup_iters=200, ckpt_interval=10000, val_interval=0)
