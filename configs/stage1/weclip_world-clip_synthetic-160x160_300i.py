# Demo config on the synthetic world: the in-repo tiny CLIP trained contrastively on captioned synthetic images
# (`make world`, cached under $WSSS_CACHE/world), so CAMs, pseudo-masks and the retrained model mean something
# offline. Same code path as the VOC config. Measured figures: docs/results.md.
_base_ = ["./_base_/weclip_vit-b16.py", "./_base_/datasets/synthetic.py"]
run = dict(name="demo", seed=1)
# "world:default" names the weights `make world` (python -m stage1_cam.world_clip --preset default) trains.
clip = dict(model_name="wsss-world-ViT-16", pretrained=None, weights="world:default")
# RFM with the paper's |A_f - A_l| layer score: on this world it beats the reference code's signed score
# (docs/results.md, "RFM on the synthetic world").
head = dict(embed_dim=64, decoder_layers=1, decoder_heads=2, rfm=dict(start_step=150, score="abs"))
train = dict(max_iters=300, batch_size=4, amp="none", log_interval=25, ckpt_interval=100, val_interval=100,
             val_max_images=0)
dump = dict(long_side=224, num_shards=4, batch_size=8, crf=dict(workers=1))
