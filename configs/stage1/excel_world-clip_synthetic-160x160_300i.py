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
dump = dict(long_side=224, num_shards=4, batch_size=8, crf=dict(workers=1))
