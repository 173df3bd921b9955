# ExCEL demo config on the synthetic world: the in-repo tiny CLIP trained on captioned synthetic images
# (`make world`, cached under $WSSS_CACHE/world). Same code path as the VOC config; LVC (step 150) and the
# decoder's own affinity labels (step 240) both happen within the 300 steps.
_base_ = ["./_base_/excel_vit-b16.py", "./_base_/datasets/synthetic.py"]
run = dict(name="demo", seed=1)
# "world:default" names the weights `make world` (python -m stage1_cam.world_clip --preset default) trains.
clip = dict(model_name="wsss-world-ViT-16", pretrained=None, weights="world:default")
head = dict(embed_dim=64, decoder_layers=1, decoder_heads=2, lvc_start_step=150, aff_label_switch_step=240)
train = dict(max_iters=300, batch_size=4, amp="none", log_interval=25, ckpt_interval=100, val_interval=100,
             val_max_images=0)
# The WeCLIP dump protocol here: ExCEL's 320-square inputs upsample the 160x224 world images (its training-free maps
# score lower that way; docs/results.md).
dump = dict(protocol="weclip", long_side=224, scales=(1.0, 0.75), num_shards=4, batch_size=8,
            crf=dict(iterations=10, pos_xy_std=3.0, pos_w=3.0, bi_xy_std=64.0, bi_rgb_std=5.0, bi_w=4.0, workers=1))
