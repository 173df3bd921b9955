# Smoke/demo config: the in-repo tiny CLIP (random weights unless `make world` has trained one) on the synthetic
# dataset. Runs on CPU in minutes. Same code path as the VOC config.
_base_ = ["./_base_/weclip_vit-b16.py", "./_base_/datasets/synthetic.py"]
run = dict(name="demo", seed=1)
clip = dict(model_name="wsss-tiny-ViT-16", pretrained=None)
head = dict(embed_dim=64, decoder_layers=1, decoder_heads=2, rfm=dict(start_step=150))
train = dict(max_iters=300, batch_size=4, amp="none", log_interval=25, ckpt_interval=100, val_interval=100,
             val_max_images=30)
dump = dict(long_side=224, num_shards=4, batch_size=8, crf=dict(workers=1))
